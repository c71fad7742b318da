"""The prepared data's shapes: canonical rows, splits and the preparation report."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

ROLES = ("system", "user", "assistant")
EXTENSIONS = (".jsonl", ".json", ".csv", ".parquet")
SPLITS = ("train", "validation", "test")

Row = dict[str, Any]


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
