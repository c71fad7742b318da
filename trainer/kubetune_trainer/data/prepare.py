"""Preparation: validate -> clean -> drop empty -> drop duplicates -> redact PII, then split
and fingerprint."""

from __future__ import annotations

import hashlib
import random
import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from kubetune_trainer.config import DataSpec
from kubetune_trainer.data.cleaning import Cleaner
from kubetune_trainer.data.errors import InvalidDataError
from kubetune_trainer.data.pii import redact_pii
from kubetune_trainer.data.readers import Opened, Source, iter_records, resolve_uri
from kubetune_trainer.data.rows import SPLITS, DataReport, PreparedData, Row
from kubetune_trainer.data.validation import canon_json, canonical, is_empty, map_texts, row_hash

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
        self.cleaner = Cleaner(spec.cleaning)
        self.drop_empty = spec.cleaning.enabled and spec.cleaning.drop_empty
        self.dedupe = spec.cleaning.enabled and spec.cleaning.dedupe
        self.pii_kinds = list(spec.pii_redaction.kinds) if spec.pii_redaction.enabled else []
        self.report = DataReport(pii_redacted={k: 0 for k in self.pii_kinds})
        self.known_labels = set(spec.labels) if spec.labels is not None else None

    def read(self, name: str, uri: str, exclude: set[bytes] | None = None) -> _Split:
        """Validate, clean and dedupe one file. Rows hashing into `exclude` are dropped."""
        resolved = resolve_uri(uri, self.base_dir)
        rows: list[tuple[int, Row]] = []
        hashes: list[bytes] = []
        seen: set[bytes] = set()
        # Raw JSONL lines already handled -> True: duplicate, False: dropped as empty. Identical
        # lines give identical rows, so repeats skip parsing entirely.
        raw_seen: dict[bytes, bool] = {}
        read = 0
        with Opened(resolved, self.endpoint) as src:
            for rec in iter_records(src):
                read += 1
                raw_key = row_hash(rec.raw) if rec.raw is not None and self.dedupe else None
                if raw_key is not None and raw_key in raw_seen:
                    if raw_seen[raw_key]:
                        self.report.dropped_duplicates += 1
                    else:
                        self.report.dropped_empty += 1
                    continue
                row = canonical(self.fmt, self.spec.fields, src, rec)
                if self.known_labels is not None and row.get("label") is not None:
                    self._check_label(src, rec.line, row["label"], self.known_labels)
                self.cleaner.removed = 0
                row = map_texts(self.fmt, row, self.cleaner)
                if self.drop_empty and is_empty(self.fmt, row):
                    self.report.dropped_empty += 1
                    if raw_key is not None:
                        raw_seen[raw_key] = False
                    continue
                digest = row_hash(canon_json(row))
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
                    row = map_texts(self.fmt, row, self._redact)
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
        self, src: Source, line: int, label: str, accepted: set[str] | list[str]
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


Numbered = list[tuple[int, Row]]  # (line, row): the line stays for error messages


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

    splits = _carve(spec, seed, train, val, test)
    if not splits["train"]:
        raise InvalidDataError(
            "no training rows left after cleaning and splitting "
            f"({prep.report.dropped_empty} empty, {prep.report.dropped_duplicates} duplicates)",
            source=train.source,
        )
    labels: list[str] | None = None
    if fmt == "classification":
        labels, final = _classification(spec, prep, train, (val, test), splits)
    else:
        final = {name: [row for _, row in rows] for name, rows in splits.items()}

    report = prep.report
    report.split_sizes = {name: len(final[name]) for name in SPLITS}
    report.fingerprint = fingerprint(final, labels)
    return PreparedData(
        train=final["train"],
        validation=final["validation"],
        test=final["test"],
        labels=labels,
        report=report,
    )


def _carve(
    spec: DataSpec, seed: int, train: _Split, val: _Split | None, test: _Split | None
) -> dict[str, Numbered]:
    """Deterministic shuffle of train, then test/validation carved off it when no file was
    given; maxSamples caps what is left for training."""
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
    return {"train": train_rows, "validation": val_rows, "test": test_rows}


def _classification(
    spec: DataSpec,
    prep: _Preparer,
    train: _Split,
    given: tuple[_Split | None, ...],
    splits: dict[str, Numbered],
) -> tuple[list[str], dict[str, list[Row]]]:
    """The label list (given, or sorted from train), checked against every split; label
    counts into the report; rows with label names replaced by their ids."""
    labels = (
        list(spec.labels)
        if spec.labels is not None
        else _sorted_labels(row["label"] for _, row in train.rows)
    )
    if spec.labels is None:
        known = set(labels)
        for split in given:
            if split is not None:
                src = Source(split.source, Path(split.source))
                for line, row in split.rows:
                    prep._check_label(src, line, row["label"], known)
    distinct = {row["label"] for _, row in splits["train"]}
    if len(distinct) < 2:
        raise InvalidDataError(
            f"one-class data: the training rows have only the label {sorted(distinct)}; "
            "expected at least 2 distinct labels for classification",
            source=train.source,
            field=spec.fields.label,
        )
    counts = {name: Counter(row["label"] for _, row in rows) for name, rows in splits.items()}
    # Every label in id order, zeros included: a class missing from a split is worth seeing.
    prep.report.label_counts = {
        name: {label: c[label] for label in labels} for name, c in counts.items()
    }
    ids = {name: i for i, name in enumerate(labels)}
    final = {
        name: [{"text": row["text"], "label": ids[row["label"]]} for _, row in rows]
        for name, rows in splits.items()
    }
    return labels, final


def fingerprint(splits: dict[str, list[Row]], labels: list[str] | None) -> str:
    """sha256 over the canonical JSON of the labels and every prepared row, split by split."""
    h = hashlib.sha256()
    h.update(canon_json({"labels": labels}) + b"\n")
    for name in SPLITS:
        h.update(f"#{name}\n".encode())
        for row in splits.get(name, []):
            h.update(canon_json(row) + b"\n")
    return f"sha256:{h.hexdigest()}"
