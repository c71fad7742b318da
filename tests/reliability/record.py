"""Figures the reliability tests produce, appended as JSON lines for the report.

Each test calls ``record(...)`` with what it tried and what it saw; ``python -m
tests.reliability.report`` sums them into one table. The file is
``$KUBETUNE_RELIABILITY_RESULTS`` (the report points it at a fresh file) or a default under
the system temp dir.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

# What the table shows, in order, and whether a non-zero total fails the suite.
FIGURES: dict[str, tuple[str, bool]] = {
    "inputs_tried": ("bad inputs tried", False),
    "inputs_rejected": ("bad inputs rejected with a clear error", False),
    "inputs_unhandled": ("bad inputs crashing, hanging or misreported", True),
    "server_requests": ("requests sent to the inference server", False),
    "valid_requests_answered": ("valid server requests answered correctly", False),
    "server_wrong_answers": ("other server requests answered wrongly or hung", True),
    "faults_injected": ("faults injected", False),
    "jobs_run": ("jobs created (invalid ones included)", False),
    "jobs_succeeded": ("jobs expected to succeed that did", False),
    "jobs_lost": ("jobs not succeeded after a fault", True),
    "steps_redone": ("steps redone after faults (total)", False),
    "steps_redone_over_interval": ("faults redoing more than one checkpoint interval", True),
    "duplicates": ("duplicate child objects", True),
    "orphans": ("orphaned objects", True),
    "operator_restarts": ("operator crashes/restarts", True),
    "stuck": ("jobs stuck in a non-terminal phase", True),
    "server_5xx": ("inference server 5xx / crashes", True),
    "secret_leaks": ("secret canary leaks", True),
    "secret_places_scanned": ("places scanned for the canary", False),
    "rbac_refusals_checked": ("RBAC refusals checked", False),
    "rbac_violations": ("RBAC requests wrongly allowed", True),
    "pod_security_fields_checked": ("pod security fields checked", False),
    "pod_security_violations": ("pod security violations", True),
}


def results_path() -> Path:
    default = Path(tempfile.gettempdir()) / "kubetune-reliability" / "results.jsonl"
    return Path(os.environ.get("KUBETUNE_RELIABILITY_RESULTS", str(default)))


def record(test: str, **figures: int) -> None:
    """Append one test's figures. Unknown names are a bug in the test, so they raise."""
    unknown = set(figures) - set(FIGURES)
    if unknown:
        raise KeyError(f"unknown reliability figures {sorted(unknown)}; known: {sorted(FIGURES)}")
    path = results_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        f.write(json.dumps({"test": test, **figures}) + "\n")


def load(path: Path | None = None) -> list[dict[str, Any]]:
    path = path or results_path()
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def totals(rows: list[dict[str, Any]]) -> dict[str, int]:
    out = dict.fromkeys(FIGURES, 0)
    for row in rows:
        for key in FIGURES:
            out[key] += int(row.get(key, 0))
    return out
