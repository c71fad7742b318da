"""The Kubernetes termination message: one line `"<reason>: <message>"` the operator reads from
the pod status; on success the final metrics as compact JSON."""

from __future__ import annotations

import json
import logging
import math
import os
import re
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    pass

from kubetune_trainer.telemetry.secrets import redact_secrets

log = logging.getLogger(__name__)

# Kubernetes keeps at most this many bytes of the termination message file.
TERMINATION_MESSAGE_MAX_BYTES = 4096


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


def success_message(metrics: Mapping[str, Any]) -> str:
    """Final metrics as compact JSON for the Succeeded message, e.g. {"accuracy":0.93,...}.

    Only top-level numbers are kept (per_class and the confusion matrix stay in eval.json) so
    the line fits the 4096-byte limit; non-finite values become null.
    """
    flat: dict[str, float | int | None] = {}
    for key in sorted(metrics):
        value = metrics[key]
        if isinstance(value, bool) or not isinstance(value, int | float):
            continue
        if isinstance(value, float):
            flat[key] = round(value, 6) if math.isfinite(value) else None
        else:
            flat[key] = value
    return json.dumps(flat, separators=(",", ":"), sort_keys=True)


def write_success(path: str, metrics: Mapping[str, Any]) -> None:
    """The termination message for a successful run: `Succeeded: {...final metrics...}`."""
    write_termination_message(path, "Succeeded", success_message(metrics))
