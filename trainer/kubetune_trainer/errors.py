"""The one table of exit codes and failure reasons, for the trainer and the operator alike.

The trainer exits with these codes after writing a one-line termination message
`"<reason>: <message>"`; the operator reads both from the pod status and decides here-defined
retryable vs. permanent.

Exit codes (part of the operator contract; `classify_failure` maps exceptions to them):

    ====  ==================  ===========================================  ==========
    code  reason              cause                                        operator
    ====  ==================  ===========================================  ==========
    0     Succeeded           run finished                                 done
    1     Error               anything unclassified                        backoff*
    2     InvalidSpec         pydantic ValidationError, ConfigError        permanent
    3     InvalidData         kubetune_trainer.data.InvalidDataError       permanent
    4     OutOfMemory         MemoryError, CUDA/torch out of memory        retryable
    5     StorageUnavailable  kubetune_trainer.store.StorageUnavailable    retryable
    6     Superseded          AttemptSuperseded: a newer gang attempt      retryable
                              fenced the checkpoints (a stale rank)
    137   (none: SIGKILL)     kernel OOM killer or kubelet kill            retryable
    143   Interrupted         SIGTERM/KeyboardInterrupt after the final    retryable
                              checkpoint was saved (TrainingInterrupted)
    ====  ==================  ===========================================  ==========

    * an ordinary pod failure: retried only within the Job's backoffLimit.

This module imports neither torch nor boto3: the operator imports it (import-linter checks).
"""

from __future__ import annotations

import importlib
import logging
import re

from pydantic import ValidationError

from kubetune_trainer.telemetry.secrets import redact_secrets

log = logging.getLogger(__name__)

# Exit codes by reason; see the module docstring. The operator imports these (torch-free).
EXIT_CODES: dict[str, int] = {
    "Succeeded": 0,
    "Error": 1,
    "InvalidSpec": 2,
    "InvalidData": 3,
    "OutOfMemory": 4,
    "StorageUnavailable": 5,
    "Superseded": 6,
    "Interrupted": 143,
}
PERMANENT_REASONS: frozenset[str] = frozenset({"InvalidSpec", "InvalidData"})
# SIGKILL (the kernel's OOM killer, the kubelet): a code the trainer never chooses, so it sits
# beside the table rather than in it.
KILLED_EXIT_CODE = 128 + 9
RETRYABLE_EXIT_CODES: frozenset[int] = frozenset({4, 5, 6, KILLED_EXIT_CODE, 143})


class TrainingInterrupted(Exception):
    """Raised after SIGTERM once the final checkpoint is saved; the run exits 143."""


class AttemptSuperseded(RuntimeError):
    """A newer gang attempt fenced the run's checkpoints: this rank is stale (say, alive behind a
    network partition) and must neither upload nor move `latest`; the run exits 6."""


class ConfigError(ValueError):
    """The TrainerConfig is unusable beyond what pydantic validation catches; exits 2."""


def _has_class(exc: BaseException, name: str) -> bool:
    return any(cls.__name__ == name for cls in type(exc).__mro__)


def _is_instance_of(exc: BaseException, module: str, name: str) -> bool:
    """isinstance against module.name, imported lazily (data and store pull in heavier deps).

    When the module cannot be imported the class name decides, so classification still works
    in a trimmed image or while that module is broken.
    """
    if _has_class(exc, name):
        return True
    try:
        cls = getattr(importlib.import_module(module), name)
    except Exception:
        return False
    return isinstance(cls, type) and isinstance(exc, cls)


def _is_invalid_data(exc: BaseException) -> bool:
    return _is_instance_of(exc, "kubetune_trainer.data.errors", "InvalidDataError")


def _is_storage_unavailable(exc: BaseException) -> bool:
    return _is_instance_of(exc, "kubetune_trainer.store", "StorageUnavailable")


_OOM_TEXT = re.compile(r"out of memory", re.IGNORECASE)


def _is_oom(exc: BaseException) -> bool:
    return (
        isinstance(exc, MemoryError)
        or _has_class(
            exc, "OutOfMemoryError"
        )  # torch.OutOfMemoryError / torch.cuda.OutOfMemoryError
        or bool(_OOM_TEXT.search(str(exc)))
    )


def _classify_one(exc: BaseException) -> tuple[str, int] | None:
    if _is_invalid_data(exc):
        return "InvalidData", 3
    if isinstance(exc, KeyboardInterrupt | TrainingInterrupted):
        return "Interrupted", 143
    if isinstance(exc, ValidationError | ConfigError):
        return "InvalidSpec", 2
    if isinstance(exc, AttemptSuperseded):
        return "Superseded", 6
    if _is_storage_unavailable(exc):
        return "StorageUnavailable", 5
    if _is_oom(exc):
        return "OutOfMemory", 4
    return None


def classify_failure(exc: BaseException) -> tuple[str, str, int]:
    """(reason, message, exit code) for an exception that ended the run; see the module table.

    Explicit causes (`raise X from Y`) are followed, so a library wrapping, say, a CUDA OOM in
    its own error still classifies as OutOfMemory. Messages have secrets masked.
    """
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen and len(seen) < 16:
        seen.add(id(current))
        found = _classify_one(current)
        if found is not None:
            reason, code = found
            text = str(current) or type(current).__name__
            return reason, redact_secrets(text), code
        current = current.__cause__
    text = str(exc)
    message = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    return "Error", redact_secrets(message), 1


# Derived views of the table, for the operator's reading of a pod's exit code.
EXIT_REASONS: dict[int, str] = {
    **{code: reason for reason, code in EXIT_CODES.items()},
    KILLED_EXIT_CODE: "Killed",
}
PERMANENT_EXIT_CODES: frozenset[int] = frozenset(EXIT_CODES[r] for r in PERMANENT_REASONS)
