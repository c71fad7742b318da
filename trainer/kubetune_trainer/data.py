"""Task data: load, validate, clean, redact PII, split and fingerprint.

Every problem with the data raises `InvalidDataError` naming the file, the line (JSONL/CSV) or row
(Parquet), the field and what was expected; nothing is skipped silently. The prepared rows are
canonical, whatever the input field names were:

    chat            {"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}
    instruction     {"prompt": str, "completion": str}
    text            {"text": str}
    classification  {"text": str, "label": int}     (an index into PreparedData.labels)

Order of work per row: validate -> clean -> drop empty -> drop duplicates -> redact PII. Rows are
streamed and duplicates are found with a set of 16-byte hashes, so a file of a million repeated
lines costs memory only for its distinct rows.
"""

from __future__ import annotations

import csv
import hashlib
import ipaddress
import json
import random
import re
import tempfile
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from kubetune_trainer.config import ALL_PII_KINDS, CleaningSpec, DataSpec, FieldNames

ROLES = ("system", "user", "assistant")
EXTENSIONS = (".jsonl", ".json", ".csv", ".parquet")
SPLITS = ("train", "validation", "test")

Row = dict[str, Any]


class InvalidDataError(ValueError):
    """The task data cannot be used. The message says where and what was expected."""

    def __init__(
        self,
        message: str,
        *,
        source: str = "",
        line: int | None = None,
        field: str | None = None,
        unit: str = "line",
    ) -> None:
        self.reason = message
        self.source = source
        self.line = line
        self.field = field
        self.unit = unit
        parts = [source] if source else []
        if line is not None:
            parts.append(f"{unit} {line}")
        if field is not None:
            parts.append(f"field {field!r}")
        super().__init__(f"{', '.join(parts)}: {message}" if parts else message)

    def __reduce__(self) -> tuple[Any, ...]:
        # Keyword-only arguments: without this, pickling (multiprocessing) loses the parts.
        return (_rebuild_invalid, (self.reason, self.source, self.line, self.field, self.unit))


def _rebuild_invalid(
    message: str, source: str, line: int | None, field: str | None, unit: str
) -> InvalidDataError:
    return InvalidDataError(message, source=source, line=line, field=field, unit=unit)


@dataclass
class DataReport:
    """What preparation did, for the run summary and the model card."""

    rows_read: dict[str, int] = field(default_factory=dict)
    dropped_empty: int = 0
    dropped_duplicates: int = 0
    control_chars_removed: int = 0
    pii_redacted: dict[str, int] = field(default_factory=dict)
    split_sizes: dict[str, int] = field(default_factory=dict)
    label_counts: dict[str, dict[str, int]] | None = None
    fingerprint: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class PreparedData:
    train: list[Row]
    validation: list[Row]
    test: list[Row]
    labels: list[str] | None
    report: DataReport


# -- PII ----------------------------------------------------------------------------------------

_EMAIL = re.compile(
    r"(?<![\w.%+-])[\w.%+-]+@(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)+[A-Za-z]{2,63}"
    r"(?![\w-])"
)
# 13-19 digits, optionally grouped by spaces or dashes; the Luhn check decides.
_CARD = re.compile(r"(?<![\w-])\d(?:[ -]?\d){12,18}(?![\w]|-\d)")
# Candidates only: ipaddress decides. No word char, ':' or '.' just before, so "std::vector",
# "10:30" (one colon) and "12:30:00" (not a valid address) never become <IPV6>.
_IPV6 = re.compile(
    r"(?<![\w:.])(?:[0-9A-Fa-f]{0,4}:){2,7}(?:\d{1,3}(?:\.\d{1,3}){3}|[0-9A-Fa-f]{1,4})?"
    r"(?![\w:]|\.\d)"
)
_OCTET = r"(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)"
_IPV4 = re.compile(rf"(?<![\w.]){_OCTET}(?:\.{_OCTET}){{3}}(?!\.?\d|\w)")
# North American: (212) 555-0187, 415-555-0132, 415.555.0132, 1-800-555-0199. The separator must
# repeat, so dates (2024-01-15), versions (10.2.3) and IPv4 addresses do not match.
_PHONE_NANP = re.compile(
    r"(?<![\w.+-])(?:\+?1[-. ]?)?(?:\(\d{3}\)[ -]?\d{3}[-. ]|\d{3}([-. ])\d{3}\1)\d{4}"
    r"(?![\w]|[-.]\d)"
)
# Local seven-digit numbers: 555-0123. Dash only, exchange code 2-9 as in the NANP (so ranges
# like 100-2000 stay), and not part of an ID such as INV-555-0123.
_PHONE_LOCAL = re.compile(r"(?<![\w.+#/-])[2-9]\d{2}-\d{4}(?![\w]|[-./]\d)")
# International: a leading + and 8-15 digits in groups: +44 20 7946 0958, +1 415-555-0132.
_PHONE_INTL = re.compile(
    r"(?<![\w+])\+\d{1,3}(?:[ .-]?\(\d{1,4}\))?(?:[ .-]?\d{1,5}){1,5}(?![\w]|[-.]\d)"
)

PLACEHOLDERS = {
    "email": "<EMAIL>",
    "phone": "<PHONE>",
    "ipv4": "<IPV4>",
    "ipv6": "<IPV6>",
    "credit_card": "<CREDIT_CARD>",
}
# Order matters: emails hold digits, cards are long digit runs, IPv6 can embed an IPv4.
_ORDER = ("email", "credit_card", "ipv6", "ipv4", "phone")


def luhn_ok(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch)
        if i % 2 == 1:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def _card(s: str) -> str | None:
    # Try the whole run, then without trailing groups: "4111 1111 1111 1111 123" ends in a CVV.
    groups = re.split(r"([ -])", s)
    for end in range(len(groups), 0, -2):
        head = "".join(groups[:end])
        digits = head.replace(" ", "").replace("-", "")
        if len(digits) < 13:
            break
        if len(digits) <= 19 and luhn_ok(digits):
            return PLACEHOLDERS["credit_card"] + "".join(groups[end:])
    return None


def _ipv6(s: str) -> str | None:
    for cand, rest in ((s, ""), (s[:-1], s[-1:])):
        if not cand or (cand.endswith(":") and not cand.endswith("::")):
            continue
        try:
            ipaddress.IPv6Address(cand)
        except ValueError:
            continue
        if not any(c.isdigit() for c in cand):
            return None  # "Face::add" is C++, not an address; real ones nearly always hold digits
        return PLACEHOLDERS["ipv6"] + rest
    return None


def _phone_intl(s: str) -> str | None:
    digits = sum(c.isdigit() for c in s)
    return PLACEHOLDERS["phone"] if 8 <= digits <= 15 else None


_CHECKS: dict[str, list[tuple[re.Pattern[str], Callable[[str], str | None]]]] = {
    "email": [(_EMAIL, lambda s: PLACEHOLDERS["email"])],
    "credit_card": [(_CARD, _card)],
    "ipv6": [(_IPV6, _ipv6)],
    "ipv4": [(_IPV4, lambda s: PLACEHOLDERS["ipv4"])],
    "phone": [
        (_PHONE_INTL, _phone_intl),
        (_PHONE_NANP, lambda s: PLACEHOLDERS["phone"]),
        (_PHONE_LOCAL, lambda s: PLACEHOLDERS["phone"]),
    ],
}


def redact_pii(text: str, kinds: Iterable[str]) -> tuple[str, dict[str, int]]:
    """Replace each kind of PII with its placeholder; returns (text, {kind: replacements})."""
    wanted = set(kinds)
    unknown = wanted - set(ALL_PII_KINDS)
    if unknown:
        raise ValueError(f"unknown PII kinds {sorted(unknown)}; accepted: {list(ALL_PII_KINDS)}")
    counts: dict[str, int] = {}
    for kind in _ORDER:
        if kind not in wanted:
            continue
        for pattern, check in _CHECKS[kind]:
            text, n = _count_sub(pattern, text, check)
            if n:
                counts[kind] = counts.get(kind, 0) + n
    return text, counts


def _count_sub(
    pattern: re.Pattern[str], text: str, check: Callable[[str], str | None]
) -> tuple[str, int]:
    n = 0

    def repl(m: re.Match[str]) -> str:
        nonlocal n
        out = check(m.group(0))
        if out is None:
            return m.group(0)
        n += 1
        return out

    return pattern.sub(repl, text), n


# -- cleaning -----------------------------------------------------------------------------------

# C0/C1 control characters except \t and \n (\r goes too: "\r\n" becomes "\n").
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")
# Runs of horizontal whitespace between two non-space characters on one line. Leading
# indentation is kept: it carries meaning in code completions.
_INNER_WS = re.compile(r"(?<=\S)[^\S\n]+(?=\S)")
_TRAILING_WS = re.compile(r"[^\S\n]+(?=\n)")
_MANY_NEWLINES = re.compile(r"\n{3,}")


class _Cleaner:
    def __init__(self, spec: CleaningSpec) -> None:
        self.strip_control = spec.enabled and spec.strip_control_chars
        self.normalize = spec.enabled and spec.normalize_whitespace
        self.removed = 0  # control characters removed from the row being cleaned

    def __call__(self, text: str) -> str:
        if self.strip_control:
            text, n = _CONTROL.subn("", text)
            self.removed += n
        if self.normalize:
            if "  " in text or "\t" in text or "\n" in text or not text.isascii():
                text = _INNER_WS.sub(" ", text)
                text = _TRAILING_WS.sub("", text)
                text = _MANY_NEWLINES.sub("\n\n", text)
            text = text.strip()
        return text


# -- reading ------------------------------------------------------------------------------------


@dataclass
class _Record:
    line: int
    row: Any
    raw: bytes | None = None  # the JSONL line, for the duplicate shortcut


class _Source:
    """One data file: where it is and how to name it in errors."""

    def __init__(self, uri: str, path: Path) -> None:
        self.uri = uri
        self.path = path
        self.ext = _extension(uri)
        self.unit = "row" if self.ext == ".parquet" else "line"
        self.columns: list[str] | None = None  # CSV header / Parquet schema, once read

    def error(self, message: str, line: int | None = None, fld: str | None = None) -> Exception:
        return InvalidDataError(message, source=self.uri, line=line, field=fld, unit=self.unit)


def _extension(uri: str) -> str:
    return PurePosixPath(uri.split("?", 1)[0]).suffix.lower()


def _decode(src: _Source, raw: bytes, lineno: int) -> str:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise src.error(
            f"invalid UTF-8 (byte {err.start + 1} of the line); expected UTF-8 text", lineno
        ) from None
    if lineno == 1 and text.startswith("\ufeff"):
        text = text[1:]  # byte-order mark written by some editors
    return text


def _iter_jsonl(src: _Source) -> Iterator[_Record]:
    with src.path.open("rb") as f:
        head = f.read(64).lstrip(b"\xef\xbb\xbf \t\r\n")
        f.seek(0)
        if src.ext == ".json" and head.startswith(b"["):
            yield from _iter_json_array(src, f.read())
            return
        for lineno, raw in enumerate(f, 1):
            if not raw.strip():
                continue  # blank lines separate nothing; they are not rows
            text = _decode(src, raw, lineno)
            try:
                row = json.loads(text)
            except json.JSONDecodeError as err:
                raise src.error(
                    f"invalid JSON ({err.msg} at column {err.colno}); expected one JSON object "
                    "per line",
                    lineno,
                ) from None
            yield _Record(lineno, row, raw)


def _iter_json_array(src: _Source, data: bytes) -> Iterator[_Record]:
    text = _decode(src, data, 1)
    try:
        rows = json.loads(text)
    except json.JSONDecodeError as err:
        raise src.error(
            f"invalid JSON ({err.msg}); expected a JSON array of objects", err.lineno
        ) from None
    if not isinstance(rows, list):
        raise src.error("expected a JSON array of objects or one JSON object per line", 1)
    # Without per-item line numbers, report the item's position (1-based) as the line.
    for i, row in enumerate(rows, 1):
        yield _Record(i, row)


def _iter_csv(src: _Source) -> Iterator[_Record]:
    csv.field_size_limit(2**31 - 1)  # long texts are normal in training data

    def lines() -> Iterator[str]:
        with src.path.open("rb") as f:
            for lineno, raw in enumerate(f, 1):
                yield _decode(src, raw, lineno)

    reader = csv.reader(lines())
    try:
        header = next(reader, None)
        if header is None:
            return
        header = [h.strip() for h in header]
        src.columns = header
        end = reader.line_num
        for values in reader:
            # A quoted field can span lines: report the line where the record starts.
            start, end = end + 1, reader.line_num
            if not any(v.strip() for v in values):
                continue
            if len(values) > len(header):
                raise src.error(
                    f"{len(values)} values but the header has {len(header)} columns", start
                )
            yield _Record(start, dict(zip(header, values, strict=False)))
    except csv.Error as err:
        raise src.error(f"malformed CSV ({err})", reader.line_num) from None


def _iter_parquet(src: _Source) -> Iterator[_Record]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(src.path)
    except (pa.ArrowException, OSError) as err:
        raise src.error(f"not a readable Parquet file ({err})") from None
    src.columns = list(pf.schema_arrow.names)
    n = 0
    try:
        for batch in pf.iter_batches(batch_size=8192):
            for row in batch.to_pylist():
                n += 1
                yield _Record(n, row)
    except (pa.ArrowException, OSError) as err:
        raise src.error(f"corrupt Parquet data ({err})", n + 1) from None


def _iter_records(src: _Source) -> Iterator[_Record]:
    if src.ext in (".jsonl", ".json"):
        return _iter_jsonl(src)
    if src.ext == ".csv":
        return _iter_csv(src)
    return _iter_parquet(src)


def _resolve(uri: str, base_dir: Path | None) -> str:
    if uri.startswith("s3://"):
        return uri
    path = Path(uri.removeprefix("file://")).expanduser()
    if not path.is_absolute():
        path = (base_dir or Path.cwd()) / path
    return str(path)


class _Opened:
    """A data file available locally: S3 objects are downloaded to a temporary folder."""

    def __init__(self, uri: str, endpoint: str | None) -> None:
        self.uri = uri
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        ext = _extension(uri)
        if ext not in EXTENSIONS:
            raise InvalidDataError(
                f"unsupported file extension {ext or '(none)'!r}; expected one of "
                f"{', '.join(EXTENSIONS)}",
                source=uri,
            )
        if uri.startswith("s3://"):
            from kubetune_trainer.store import StoreNotFound, open_store

            parent, _, name = uri.rpartition("/")
            self._tmp = tempfile.TemporaryDirectory(prefix="kubetune-data-")
            path = Path(self._tmp.name) / PurePosixPath(name).name
            try:
                open_store(parent, endpoint=endpoint).download_file(name, path)
            except StoreNotFound:
                self.close()
                raise InvalidDataError("no such object", source=uri) from None
            except BaseException:
                self.close()
                raise
        else:
            path = Path(uri)
            if not path.is_file():
                what = "a directory, not a file" if path.is_dir() else "no such file"
                raise InvalidDataError(what, source=uri)
        self.source = _Source(uri, path)

    def close(self) -> None:
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> _Source:
        return self.source

    def __exit__(self, *exc: object) -> None:
        self.close()


def load_rows(uri: str, *, endpoint: str | None = None) -> list[tuple[int, dict[str, Any]]]:
    """Every row of a JSONL, JSON, CSV or Parquet file (local or s3://) with its line number.

    Rows must be objects; an empty file is an error. No validation of fields happens here.
    """
    out: list[tuple[int, dict[str, Any]]] = []
    with _Opened(uri, endpoint) as src:
        for rec in _iter_records(src):
            out.append((rec.line, _as_object(src, rec)))
    if not out:
        raise InvalidDataError("the file has no rows; expected at least one", source=uri)
    return out


def _as_object(src: _Source, rec: _Record) -> dict[str, Any]:
    if not isinstance(rec.row, dict):
        raise src.error(f"expected a JSON object, got {_typename(rec.row)}", rec.line)
    return rec.row


def _typename(value: Any) -> str:
    if value is None:
        return "null"
    return {
        bool: "a boolean",
        int: "a number",
        float: "a number",
        str: "a string",
        list: "a list",
        dict: "an object",
    }.get(type(value), type(value).__name__)


# -- validation ---------------------------------------------------------------------------------


def _missing(src: _Source, name: str, line: int, expected: str) -> Exception:
    if src.columns is not None and name not in src.columns:
        where = "header (line 1)" if src.ext == ".csv" else "schema"
        return src.error(
            f"the {where} has no column {name!r} (columns: {', '.join(src.columns)}); "
            f"expected a column with {expected}",
            1 if src.ext == ".csv" else None,
            name,
        )
    return src.error(f"missing field {name!r}; expected {expected}", line, name)


def _text(src: _Source, row: dict[str, Any], name: str, line: int) -> str:
    if name not in row or row[name] is None:
        raise _missing(src, name, line, "a string")
    value = row[name]
    if not isinstance(value, str):
        raise src.error(f"expected a string, got {_typename(value)}", line, name)
    return value


def _messages(src: _Source, row: dict[str, Any], name: str, line: int) -> list[dict[str, str]]:
    if name not in row or row[name] is None:
        raise _missing(src, name, line, "a list of messages")
    value = row[name]
    if isinstance(value, str) and src.ext in (".csv", ".parquet"):
        # Tabular files carry the message list as a JSON string.
        try:
            value = json.loads(value)
        except json.JSONDecodeError as err:
            raise src.error(
                f"invalid JSON ({err.msg}); expected a JSON list of messages", line, name
            ) from None
    if not isinstance(value, list):
        raise src.error(f"expected a list of messages, got {_typename(value)}", line, name)
    if not value:
        raise src.error("the message list is empty; expected at least one message", line, name)
    out: list[dict[str, str]] = []
    for i, msg in enumerate(value):
        where = f"{name}[{i}]"
        if not isinstance(msg, dict):
            raise src.error(
                f"expected an object with 'role' and 'content', got {_typename(msg)}", line, where
            )
        role = msg.get("role")
        if role not in ROLES:
            shown = "missing" if role is None else repr(role)
            raise src.error(
                f"role {shown} is not accepted; expected one of {', '.join(ROLES)}",
                line,
                f"{where}.role",
            )
        content = msg.get("content")
        if not isinstance(content, str):
            got = "missing" if "content" not in msg else _typename(content)
            raise src.error(f"expected a string, got {got}", line, f"{where}.content")
        out.append({"role": role, "content": content})
    if not any(m["role"] == "assistant" for m in out):
        raise src.error(
            "no assistant message; expected at least one turn with role 'assistant' to learn from",
            line,
            name,
        )
    return out


def _label(src: _Source, row: dict[str, Any], name: str, line: int) -> str:
    if name not in row or row[name] is None:
        raise _missing(src, name, line, "a label (string or integer)")
    value = row[name]
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise src.error(f"expected a label (string or integer), got {_typename(value)}", line, name)
    label = str(value).strip()
    if not label:
        raise src.error("the label is empty; expected a label (string or integer)", line, name)
    return label


def _canonical(fmt: str, fields: FieldNames, src: _Source, rec: _Record) -> Row:
    row = _as_object(src, rec)
    line = rec.line
    if fmt == "chat":
        return {"messages": _messages(src, row, fields.messages, line)}
    if fmt == "instruction":
        return {
            "prompt": _text(src, row, fields.prompt, line),
            "completion": _text(src, row, fields.completion, line),
        }
    if fmt == "text":
        return {"text": _text(src, row, fields.text, line)}
    if fmt == "classification":
        return {
            "text": _text(src, row, fields.text, line),
            "label": _label(src, row, fields.label, line),
        }
    raise ValueError(f"unknown data format {fmt!r}")


def _map_texts(fmt: str, row: Row, fn: Callable[[str], str]) -> Row:
    if fmt == "chat":
        return {
            "messages": [{"role": m["role"], "content": fn(m["content"])} for m in row["messages"]]
        }
    if fmt == "instruction":
        return {"prompt": fn(row["prompt"]), "completion": fn(row["completion"])}
    out = dict(row)
    out["text"] = fn(row["text"])
    return out


def _is_empty(fmt: str, row: Row) -> bool:
    if fmt == "chat":
        # Nothing to learn from when every assistant turn is empty.
        return not any(m["content"] for m in row["messages"] if m["role"] == "assistant")
    if fmt == "instruction":
        return not row["prompt"] or not row["completion"]
    return not row["text"]


def _canon_json(row: Row) -> bytes:
    return json.dumps(row, sort_keys=True, ensure_ascii=False, separators=(",", ":")).encode()


def _digest(data: bytes) -> bytes:
    return hashlib.blake2b(data, digest_size=16).digest()


# -- preparation --------------------------------------------------------------------------------


@dataclass
class _Split:
    source: str
    rows: list[tuple[int, Row]]  # (line, canonical row); classification labels still names
    hashes: list[bytes]


class _Preparer:
    def __init__(self, spec: DataSpec, endpoint: str | None, base_dir: Path | None) -> None:
        self.spec = spec
        self.fmt = spec.format
        self.endpoint = endpoint
        self.base_dir = base_dir
        self.cleaner = _Cleaner(spec.cleaning)
        self.drop_empty = spec.cleaning.enabled and spec.cleaning.drop_empty
        self.dedupe = spec.cleaning.enabled and spec.cleaning.dedupe
        self.pii_kinds = list(spec.pii_redaction.kinds) if spec.pii_redaction.enabled else []
        self.report = DataReport(pii_redacted={k: 0 for k in self.pii_kinds})
        self.known_labels = set(spec.labels) if spec.labels is not None else None

    def read(self, name: str, uri: str, exclude: set[bytes] | None = None) -> _Split:
        """Validate, clean and dedupe one file. Rows hashing into `exclude` are dropped."""
        resolved = _resolve(uri, self.base_dir)
        rows: list[tuple[int, Row]] = []
        hashes: list[bytes] = []
        seen: set[bytes] = set()
        # Raw JSONL lines already handled -> True: duplicate, False: dropped as empty. Identical
        # lines give identical rows, so repeats skip parsing entirely.
        raw_seen: dict[bytes, bool] = {}
        read = 0
        with _Opened(resolved, self.endpoint) as src:
            for rec in _iter_records(src):
                read += 1
                raw_key = _digest(rec.raw) if rec.raw is not None and self.dedupe else None
                if raw_key is not None and raw_key in raw_seen:
                    if raw_seen[raw_key]:
                        self.report.dropped_duplicates += 1
                    else:
                        self.report.dropped_empty += 1
                    continue
                row = _canonical(self.fmt, self.spec.fields, src, rec)
                if self.known_labels is not None and row.get("label") is not None:
                    self._check_label(src, rec.line, row["label"], self.known_labels)
                self.cleaner.removed = 0
                row = _map_texts(self.fmt, row, self.cleaner)
                if self.drop_empty and _is_empty(self.fmt, row):
                    self.report.dropped_empty += 1
                    if raw_key is not None:
                        raw_seen[raw_key] = False
                    continue
                digest = _digest(_canon_json(row))
                if self.dedupe and (digest in seen or (exclude is not None and digest in exclude)):
                    self.report.dropped_duplicates += 1
                    if raw_key is not None:
                        raw_seen[raw_key] = True
                    continue
                if self.dedupe:
                    seen.add(digest)
                    if raw_key is not None:
                        raw_seen[raw_key] = True
                self.report.control_chars_removed += self.cleaner.removed
                if self.pii_kinds:
                    row = _map_texts(self.fmt, row, self._redact)
                rows.append((rec.line, row))
                hashes.append(digest)
        self.report.rows_read[name] = read
        if read == 0:
            raise InvalidDataError("the file has no rows; expected at least one", source=resolved)
        return _Split(resolved, rows, hashes)

    def _redact(self, text: str) -> str:
        text, counts = redact_pii(text, self.pii_kinds)
        for kind, n in counts.items():
            self.report.pii_redacted[kind] += n
        return text

    def _check_label(
        self, src: _Source, line: int, label: str, accepted: set[str] | list[str]
    ) -> None:
        if label in accepted:
            return
        names = self.spec.labels or _sorted_labels(accepted)
        shown = ", ".join(repr(a) for a in names[:50])
        more = f" (and {len(names) - 50} more)" if len(names) > 50 else ""
        raise src.error(
            f"label {label!r} is not one of the accepted labels: {shown}{more}",
            line,
            self.spec.fields.label,
        )


def _sorted_labels(labels: Iterable[str]) -> list[str]:
    """Sorted label names; numerically when every label is an integer ("2" before "10")."""
    items = set(labels)
    if items and all(re.fullmatch(r"-?\d+", x) for x in items):
        return sorted(items, key=int)
    return sorted(items)


def _split_counts(n: int, validation: float, test: float) -> tuple[int, int]:
    """Rows carved off for (validation, test); each asked-for split gets at least one row as
    long as one row stays for training."""
    n_test = round(n * test)
    n_val = round(n * validation)
    if test > 0 and n_test == 0 and n - n_val > 1:
        n_test = 1
    if validation > 0 and n_val == 0 and n - n_test > 1:
        n_val = 1
    while n_val + n_test >= n and (n_val or n_test):
        if n_val >= n_test:
            n_val -= 1
        else:
            n_test -= 1
    return n_val, n_test


def prepare_data(
    spec: DataSpec,
    task: str,
    *,
    seed: int,
    endpoint: str | None = None,
    base_dir: Path | None = None,
) -> PreparedData:
    """Load every split, validate, clean, redact, split and fingerprint (see the module doc)."""
    fmt = spec.format
    if (task == "sequence-classification") != (fmt == "classification"):
        raise InvalidDataError(
            f"data format {fmt!r} does not fit task {task!r}", source=spec.train, field="format"
        )
    prep = _Preparer(spec, endpoint, base_dir)
    train = prep.read("train", spec.train)
    train_hashes = set(train.hashes) if prep.dedupe else None
    val = prep.read("validation", spec.validation, train_hashes) if spec.validation else None
    test = prep.read("test", spec.test, train_hashes) if spec.test else None
    del train_hashes

    # Deterministic shuffle of train, then carve test/validation off it when no file was given.
    order = list(range(len(train.rows)))
    random.Random(seed).shuffle(order)
    n_val, n_test = _split_counts(
        len(order),
        0.0 if val is not None else spec.validation_split,
        0.0 if test is not None else spec.test_split,
    )
    test_rows = [train.rows[i] for i in order[:n_test]] if test is None else test.rows
    val_rows = [train.rows[i] for i in order[n_test : n_test + n_val]] if val is None else val.rows
    train_rows = [train.rows[i] for i in order[n_test + n_val :]]
    if spec.max_samples is not None:
        train_rows = train_rows[: spec.max_samples]
    if not train_rows:
        raise InvalidDataError(
            "no training rows left after cleaning and splitting "
            f"({prep.report.dropped_empty} empty, {prep.report.dropped_duplicates} duplicates)",
            source=train.source,
        )

    labels: list[str] | None = None
    report = prep.report
    if fmt == "classification":
        labels = (
            list(spec.labels)
            if spec.labels is not None
            else _sorted_labels(row["label"] for _, row in train.rows)
        )
        if spec.labels is None:
            known = set(labels)
            for split in (val, test):
                if split is not None:
                    src = _Source(split.source, Path(split.source))
                    for line, row in split.rows:
                        prep._check_label(src, line, row["label"], known)
        distinct = {row["label"] for _, row in train_rows}
        if len(distinct) < 2:
            raise InvalidDataError(
                f"one-class data: the training rows have only the label {sorted(distinct)}; "
                "expected at least 2 distinct labels for classification",
                source=train.source,
                field=spec.fields.label,
            )
        counts = {
            name: Counter(row["label"] for _, row in rows)
            for name, rows in (("train", train_rows), ("validation", val_rows), ("test", test_rows))
        }
        # Every label in id order, zeros included: a class missing from a split is worth seeing.
        report.label_counts = {
            name: {label: c[label] for label in labels} for name, c in counts.items()
        }
        ids = {name: i for i, name in enumerate(labels)}
        final = {
            name: [{"text": row["text"], "label": ids[row["label"]]} for _, row in rows]
            for name, rows in (("train", train_rows), ("validation", val_rows), ("test", test_rows))
        }
    else:
        final = {
            "train": [row for _, row in train_rows],
            "validation": [row for _, row in val_rows],
            "test": [row for _, row in test_rows],
        }

    report.split_sizes = {name: len(final[name]) for name in SPLITS}
    report.fingerprint = fingerprint(final, labels)
    return PreparedData(
        train=final["train"],
        validation=final["validation"],
        test=final["test"],
        labels=labels,
        report=report,
    )


def fingerprint(splits: dict[str, list[Row]], labels: list[str] | None) -> str:
    """sha256 over the canonical JSON of the labels and every prepared row, split by split."""
    h = hashlib.sha256()
    h.update(_canon_json({"labels": labels}) + b"\n")
    for name in SPLITS:
        h.update(f"#{name}\n".encode())
        for row in splits.get(name, []):
            h.update(_canon_json(row) + b"\n")
    return f"sha256:{h.hexdigest()}"
