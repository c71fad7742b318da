"""The Kubernetes termination message: one line `"<reason>: <message>"` the operator reads from
the pod status; on success `Succeeded: ` and the FinalReport (metrics and gate verdicts) as
compact JSON, which the operator parses with `FinalReport.model_validate_json`."""

from __future__ import annotations

import logging
import math
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

from kubetune_trainer.config import FinalReport, GateVerdict
from kubetune_trainer.telemetry.secrets import redact_secrets

log = logging.getLogger(__name__)

# Kubernetes keeps at most this many bytes of the termination message file.
TERMINATION_MESSAGE_MAX_BYTES = 4096
SUCCESS_REASON = "Succeeded"


def _one_line(text: str) -> str:
    return re.sub(r"\s*[\r\n]+\s*", " ", text).strip()


def _truncate_utf8(text: str, max_bytes: int) -> str:
    data = text.encode("utf-8")
    if len(data) <= max_bytes:
        return text
    # Cut on a character boundary: a split multi-byte sequence is dropped, not mangled.
    return data[:max_bytes].decode("utf-8", errors="ignore")


def _writable(path: str) -> bool:
    # /dev/termination-log is a file the kubelet mounts into a directory a non-root user cannot
    # write: the file itself being writable is enough.
    if os.path.exists(path):
        return os.path.isfile(path) and os.access(path, os.W_OK)
    directory = os.path.dirname(os.path.abspath(path))
    return os.path.isdir(directory) and os.access(directory, os.W_OK)


def write_termination_message(path: str, reason: str, message: str) -> None:
    """Write `"<reason>: <message>"` as one line, at most 4096 bytes, secrets masked.

    Skips silently when the path cannot be written (running outside Kubernetes); never raises.
    """
    try:
        if not path or not _writable(path):
            log.debug("termination log %s is not writable; skipped", path)
            return
        line = _truncate_utf8(
            _one_line(f"{reason}: {redact_secrets(message)}"), TERMINATION_MESSAGE_MAX_BYTES
        )
        with open(path, "w", encoding="utf-8") as fh:
            fh.write(line)
    except Exception as exc:  # the exit path must not fail on its own report
        log.debug("could not write termination log %s: %s", path, exc)


def report_metrics(metrics: Mapping[str, Any]) -> dict[str, float | None]:
    """The top-level numbers of an evaluation, as FinalReport carries them.

    per_class and the confusion matrix stay in eval.json, so the line fits the 4096-byte limit;
    non-finite values become null (JSON has no NaN).
    """
    flat: dict[str, float | None] = {}
    for key in sorted(metrics):
        value = metrics[key]
        if isinstance(value, bool) or not isinstance(value, int | float):
            continue
        flat[key] = round(float(value), 6) if math.isfinite(value) else None
    return flat


def final_report(
    metrics: Mapping[str, Any],
    gates: Sequence[GateVerdict],
    *,
    steps: int | None = None,
    total_steps: int | None = None,
) -> FinalReport:
    """Rank 0's result for the operator: the tuned metrics, the gates as the trainer decided
    them (the operator never recomputes a gate) and the steps trained."""
    return FinalReport(
        metrics=report_metrics(metrics),
        gates=list(gates),
        gates_passed=all(g.passed for g in gates),
        steps=steps,
        total_steps=total_steps,
    )


def success_message(report: FinalReport) -> str:
    """The FinalReport as compact camelCase JSON that fits the termination message.

    When it would not fit, metrics go first (they are in eval.json too), then gates from the
    end; `gatesPassed`, the decision itself, always stays.
    """
    budget = TERMINATION_MESSAGE_MAX_BYTES - len(f"{SUCCESS_REASON}: ".encode())
    text = report.model_dump_json(by_alias=True)
    if len(text.encode()) <= budget:
        return text
    log.warning("final report too long for the termination message; metrics left out")
    report = report.model_copy(update={"metrics": {}})
    gates = list(report.gates)
    while True:
        text = report.model_copy(update={"gates": gates}).model_dump_json(by_alias=True)
        if len(text.encode()) <= budget or not gates:
            return text
        gates.pop()


def write_success(path: str, report: FinalReport) -> None:
    """The termination message for a successful run: `Succeeded: {FinalReport JSON}`."""
    write_termination_message(path, SUCCESS_REASON, success_message(report))
