"""Readers for JSONL, JSON, CSV and Parquet, local or in S3: one record at a time, with its line."""

from __future__ import annotations

import csv
import json
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from kubetune_trainer.data.errors import InvalidDataError
from kubetune_trainer.data.rows import EXTENSIONS

# -- reading ------------------------------------------------------------------------------------


@dataclass
class Record:
    line: int
    row: Any
    raw: bytes | None = None  # the JSONL line, for the duplicate shortcut


class Source:
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


def _decode(src: Source, raw: bytes, lineno: int) -> str:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise src.error(
            f"invalid UTF-8 (byte {err.start + 1} of the line); expected UTF-8 text", lineno
        ) from None
    if lineno == 1 and text.startswith("\ufeff"):
        text = text[1:]  # byte-order mark written by some editors
    return text


def _iter_jsonl(src: Source) -> Iterator[Record]:
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
            yield Record(lineno, row, raw)


def _iter_json_array(src: Source, data: bytes) -> Iterator[Record]:
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
        yield Record(i, row)


def _iter_csv(src: Source) -> Iterator[Record]:
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
            yield Record(start, dict(zip(header, values, strict=False)))
    except csv.Error as err:
        raise src.error(f"malformed CSV ({err})", reader.line_num) from None


def _iter_parquet(src: Source) -> Iterator[Record]:
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
                yield Record(n, row)
    except (pa.ArrowException, OSError) as err:
        raise src.error(f"corrupt Parquet data ({err})", n + 1) from None


def iter_records(src: Source) -> Iterator[Record]:
    if src.ext in (".jsonl", ".json"):
        return _iter_jsonl(src)
    if src.ext == ".csv":
        return _iter_csv(src)
    return _iter_parquet(src)


def resolve_uri(uri: str, base_dir: Path | None) -> str:
    if uri.startswith("s3://"):
        return uri
    path = Path(uri.removeprefix("file://")).expanduser()
    if not path.is_absolute():
        path = (base_dir or Path.cwd()) / path
    return str(path)


class Opened:
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
        self.source = Source(uri, path)

    def close(self) -> None:
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> Source:
        return self.source

    def __exit__(self, *exc: object) -> None:
        self.close()


def load_rows(uri: str, *, endpoint: str | None = None) -> list[tuple[int, dict[str, Any]]]:
    """Every row of a JSONL, JSON, CSV or Parquet file (local or s3://) with its line number.

    Rows must be objects; an empty file is an error. No validation of fields happens here.
    """
    out: list[tuple[int, dict[str, Any]]] = []
    with Opened(uri, endpoint) as src:
        for rec in iter_records(src):
            out.append((rec.line, as_object(src, rec)))
    if not out:
        raise InvalidDataError("the file has no rows; expected at least one", source=uri)
    return out


def as_object(src: Source, rec: Record) -> dict[str, Any]:
    if not isinstance(rec.row, dict):
        raise src.error(f"expected a JSON object, got {typename(rec.row)}", rec.line)
    return rec.row


def typename(value: Any) -> str:
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
