"""Trainer telemetry: Prometheus metrics, progress.json, the termination message and exit codes.

Three channels, each readable without the others:

* Prometheus metrics on rank 0 (`TrainerMetrics`), labelled by job and namespace.
* `progress.json` in the run's store (`ProgressReporter`), written from a background thread so
  that slow or failing storage never stalls or kills the training loop.
* The Kubernetes termination message (`write_termination_message`): one line
  `"<reason>: <message>"` that the operator reads from the pod status. On success the message is
  the final metrics as compact JSON, so the operator needs no S3 access to report them.

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
    137   (none: SIGKILL)     kernel OOM killer or kubelet kill            retryable
    143   Interrupted         SIGTERM/KeyboardInterrupt after the final    retryable
                              checkpoint was saved (TrainingInterrupted)
    ====  ==================  ===========================================  ==========

    * an ordinary pod failure: retried only within the Job's backoffLimit.

This module imports neither torch nor boto3: it must import fast and run in the operator image.
"""

from __future__ import annotations

import importlib
import json
import logging
import math
import os
import re
import threading
import time
import urllib.parse
from collections import deque
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Literal

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import start_http_server
from pydantic import Field, ValidationError

from kubetune_trainer.config import JobIdentity, WireModel

if TYPE_CHECKING:
    from wsgiref.simple_server import WSGIServer

    from kubetune_trainer.store import Store

log = logging.getLogger(__name__)

PROGRESS_FILE = "progress.json"
# Kubernetes keeps at most this many bytes of the termination message file.
TERMINATION_MESSAGE_MAX_BYTES = 4096

Phase = Literal[
    "preparing", "evaluating-base", "training", "evaluating", "saving", "done", "failed"
]

# Exit codes by reason; see the module docstring.
EXIT_CODES: dict[str, int] = {
    "Succeeded": 0,
    "Error": 1,
    "InvalidSpec": 2,
    "InvalidData": 3,
    "OutOfMemory": 4,
    "StorageUnavailable": 5,
    "Interrupted": 143,
}
PERMANENT_REASONS: frozenset[str] = frozenset({"InvalidSpec", "InvalidData"})
RETRYABLE_EXIT_CODES: frozenset[int] = frozenset({4, 5, 137, 143})


class TrainingInterrupted(Exception):
    """Raised after SIGTERM once the final checkpoint is saved; the run exits 143."""


class ConfigError(ValueError):
    """The TrainerConfig is unusable beyond what pydantic validation catches; exits 2."""


# --------------------------------------------------------------------------------------------
# Secrets


SECRET_ENV_VARS: tuple[str, ...] = (
    "AWS_SECRET_ACCESS_KEY",
    "AWS_ACCESS_KEY_ID",
    "AWS_SESSION_TOKEN",
)
REDACTED = "***"
# Values shorter than this are not masked: replacing every "a" in a message would garble it, and
# no real AWS credential is that short.
_MIN_SECRET_LEN = 4
_SECRET_ASSIGNMENT_RE = re.compile(
    r"(?i)\b(aws_secret_access_key|aws_session_token|secret_?access_?key|session_?token)"
    r"(\s*[=:]\s*|\"\s*:\s*\")([^\s\"',;&]+)"
)


def redact_secrets(text: str, env: Mapping[str, str] | None = None) -> str:
    """Mask the values of the AWS credential env vars wherever they occur in `text`.

    Also masks their URL-encoded form (session tokens appear encoded in presigned URLs) and
    `secret_access_key=...`-style assignments whose value is not in the environment.
    """
    environ = os.environ if env is None else env
    values: set[str] = set()
    for var in SECRET_ENV_VARS:
        value = environ.get(var, "")
        if len(value) >= _MIN_SECRET_LEN:
            values.add(value)
            values.add(urllib.parse.quote(value, safe=""))
            values.add(urllib.parse.quote_plus(value, safe=""))
    # Longest first, so a value containing another is masked whole.
    for value in sorted(values, key=len, reverse=True):
        text = text.replace(value, REDACTED)
    return _SECRET_ASSIGNMENT_RE.sub(lambda m: f"{m.group(1)}{m.group(2)}{REDACTED}", text)


# --------------------------------------------------------------------------------------------
# Prometheus metrics

_LABELS = ("job", "namespace")
# Optimizer steps range from tens of ms (tiny models on CPU) to minutes (large models, ZeRO-3).
_STEP_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
_CHECKPOINT_BUCKETS = (0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1200, 1800, 3600)


class TrainerMetrics:
    """The trainer's Prometheus metrics on their own registry (never the process-global one)."""

    def __init__(
        self,
        job: str,
        namespace: str = "default",
        registry: CollectorRegistry | None = None,
    ) -> None:
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        self.job = job
        self.namespace = namespace
        self._server: WSGIServer | None = None
        self._server_thread: threading.Thread | None = None
        r = self.registry
        lv = {"job": job, "namespace": namespace}

        def gauge(name: str, doc: str) -> Gauge:
            return Gauge(name, doc, _LABELS, registry=r)

        self.loss = gauge("kubetune_train_loss", "Training loss of the latest step.").labels(**lv)
        self.step = gauge("kubetune_train_step", "Latest optimizer step.").labels(**lv)
        self.total_steps = gauge(
            "kubetune_train_total_steps", "Optimizer steps this run will take."
        ).labels(**lv)
        self.epoch = gauge("kubetune_train_epoch", "Current (fractional) epoch.").labels(**lv)
        self.tokens_per_second = gauge(
            "kubetune_train_tokens_per_second", "Training throughput of the latest step."
        ).labels(**lv)
        # Kept as a family: its children are created per (metric, split) as results arrive.
        self._eval = Gauge(
            "kubetune_eval_metric",
            "Evaluation metric by split: validation during training, test at the end.",
            (*_LABELS, "metric", "split"),
            registry=r,
        )
        self.checkpoint_last_step = gauge(
            "kubetune_checkpoint_last_step", "Step of the newest saved checkpoint."
        ).labels(**lv)
        self.checkpoint_last_timestamp = gauge(
            "kubetune_checkpoint_last_timestamp_seconds",
            "Unix time the newest checkpoint was saved (age: time() - this).",
        ).labels(**lv)
        self.checkpoint_size = gauge(
            "kubetune_checkpoint_size_bytes", "Size of the newest checkpoint."
        ).labels(**lv)
        self.step_seconds = Histogram(
            "kubetune_train_step_seconds",
            "Wall time per optimizer step.",
            _LABELS,
            buckets=_STEP_BUCKETS,
            registry=r,
        ).labels(**lv)
        self.checkpoint_seconds = Histogram(
            "kubetune_checkpoint_duration_seconds",
            "Wall time to save a checkpoint.",
            _LABELS,
            buckets=_CHECKPOINT_BUCKETS,
            registry=r,
        ).labels(**lv)
        self.tokens_total = Counter(
            "kubetune_train_tokens", "Training tokens processed.", _LABELS, registry=r
        ).labels(**lv)

    @classmethod
    def for_job(cls, job: JobIdentity, registry: CollectorRegistry | None = None) -> TrainerMetrics:
        return cls(job.name, job.namespace, registry)

    def observe_step(
        self,
        step: int,
        total: int | None,
        epoch: float,
        loss: float | None,
        step_seconds: float,
        tokens: int,
    ) -> None:
        self.step.set(step)
        if total is not None:
            self.total_steps.set(total)
        self.epoch.set(epoch)
        if loss is not None:
            self.loss.set(loss)
        if step_seconds >= 0:
            self.step_seconds.observe(step_seconds)
        if tokens > 0:
            self.tokens_total.inc(tokens)
        if step_seconds > 0:
            self.tokens_per_second.set(tokens / step_seconds)

    def observe_eval(self, split: str, metrics: Mapping[str, Any]) -> None:
        """Set kubetune_eval_metric for each numeric entry; nested ones (per_class) are skipped."""
        for name, value in metrics.items():
            if isinstance(value, int | float) and not isinstance(value, bool):
                self._eval.labels(self.job, self.namespace, name, split).set(float(value))

    def observe_checkpoint(
        self, step: int, seconds: float, size_bytes: int, timestamp: float | None = None
    ) -> None:
        self.checkpoint_last_step.set(step)
        self.checkpoint_last_timestamp.set(time.time() if timestamp is None else timestamp)
        self.checkpoint_size.set(size_bytes)
        self.checkpoint_seconds.observe(max(seconds, 0.0))

    def serve(self, host: str = "0.0.0.0", port: int = 0) -> int:
        """Serve /metrics from a daemon thread; port 0 picks a free port. Returns the bound port."""
        if self._server is not None:
            return int(self._server.server_port)
        started = start_http_server(port, addr=host, registry=self.registry)
        # prometheus-client >= 0.19 returns (server, thread); older releases return None.
        if isinstance(started, tuple):
            self._server, self._server_thread = started
            return int(self._server.server_port)
        if port == 0:  # pragma: no cover - old prometheus-client only
            raise RuntimeError("this prometheus-client cannot report the port it picked")
        return port

    def shutdown(self) -> None:
        """Stop the HTTP server started by serve(), if any."""
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()
        thread, self._server_thread = self._server_thread, None
        if thread is not None:
            thread.join(timeout=5)

    def render(self) -> bytes:
        """The registry in the Prometheus text exposition format."""
        return generate_latest(self.registry)


# --------------------------------------------------------------------------------------------
# progress.json


def rfc3339(dt: datetime | None = None) -> str:
    """UTC timestamp such as 2025-01-31T12:00:00.123Z."""
    dt = datetime.now(UTC) if dt is None else dt.astimezone(UTC)
    return dt.isoformat(timespec="milliseconds").replace("+00:00", "Z")


class CheckpointRef(WireModel):
    """The newest complete checkpoint."""

    step: int = Field(ge=0, description="Optimizer step the checkpoint was taken at.")
    uri: str = Field(description="Where the checkpoint lives.")
    time: str = Field(description="When it was saved (RFC 3339, UTC).")


class ProgressDoc(WireModel):
    """progress.json: what the operator shows in the FineTuneJob status while the run goes on."""

    phase: Phase = Field(description="What the trainer is doing.")
    step: int = Field(default=0, ge=0, description="Latest optimizer step.")
    total_steps: int | None = Field(default=None, ge=0, description="Steps this run will take.")
    epoch: float = Field(default=0.0, ge=0.0, description="Current (fractional) epoch.")
    percent: float | None = Field(default=None, ge=0.0, le=100.0, description="step/totalSteps.")
    eta_seconds: float | None = Field(
        default=None, ge=0.0, description="Seconds left at the recent step rate."
    )
    loss: float | None = Field(default=None, description="Training loss of the latest step.")
    tokens_per_second: float | None = Field(default=None, ge=0.0, description="Throughput.")
    updated_at: str = Field(description="When this document was written (RFC 3339, UTC).")
    latest_checkpoint: CheckpointRef | None = Field(
        default=None, description="The newest complete checkpoint."
    )
    restarts_seen: int = Field(default=0, ge=0, description="How many times this run resumed.")
    message: str | None = Field(default=None, description="Human-readable detail.")

    def to_json(self) -> dict[str, Any]:
        # Every key present (null when unknown): a stable shape for the operator to read.
        return self.model_dump(by_alias=True, mode="json")


def read_progress(store: Store) -> ProgressDoc | None:
    """The progress.json a previous attempt left, or None (absent or unreadable).

    A resuming trainer reads it to carry restartsSeen forward.
    """
    try:
        data = store.read_json(PROGRESS_FILE)
        # Drop keys this version does not know (written by a newer trainer) instead of failing.
        known = {f.alias or name for name, f in ProgressDoc.model_fields.items()}
        return ProgressDoc.model_validate({k: v for k, v in data.items() if k in known})
    except Exception as exc:  # any failure just means "no usable previous progress"
        log.debug("no previous %s: %s", PROGRESS_FILE, exc)
        return None


def _finite(value: float | None) -> float | None:
    # NaN/inf are not JSON; a diverged loss shows as null rather than breaking the document.
    if value is None or not math.isfinite(value):
        return None
    return float(value)


class ProgressReporter:
    """Keeps the latest progress in memory and writes progress.json from a background thread.

    `update()` only touches memory, so the training loop never waits on storage. The thread
    writes at most once per `interval_seconds`, and only when something changed. A failed write
    is logged as a warning and retried on the next tick; it never raises into training.
    `flush()` writes synchronously (the final state); `close()` stops the thread and flushes.
    """

    # Step samples kept for the ETA: enough to smooth jitter, few enough to follow rate changes.
    _RATE_WINDOW = 20

    def __init__(
        self,
        store: Store,
        interval_seconds: float,
        clock: Callable[[], float] = time.monotonic,
        *,
        restarts_seen: int = 0,
        start: bool = True,
    ) -> None:
        if interval_seconds <= 0:
            raise ValueError("interval_seconds must be positive")
        self.store = store
        self.interval_seconds = interval_seconds
        self._clock = clock
        self._lock = threading.Lock()  # guards the fields below
        self._write_lock = threading.Lock()  # serialises writes: thread vs flush()
        self._phase: Phase = "preparing"
        self._step = 0
        self._total_steps: int | None = None
        self._epoch = 0.0
        self._loss: float | None = None
        self._tokens_per_second: float | None = None
        self._message: str | None = None
        self._checkpoint: CheckpointRef | None = None
        self._restarts_seen = restarts_seen
        self._samples: deque[tuple[float, int]] = deque(maxlen=self._RATE_WINDOW)
        self._version = 1  # bumped by every change; unwritten state starts dirty
        self._written_version = 0
        self._failing = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if start:
            self.start()

    # -- state ---------------------------------------------------------------------------------

    def update(
        self,
        *,
        step: int | None = None,
        total_steps: int | None = None,
        epoch: float | None = None,
        loss: float | None = None,
        tokens_per_second: float | None = None,
        phase: Phase | None = None,
        message: str | None = None,
        restarts_seen: int | None = None,
    ) -> None:
        """Record new progress; omitted arguments keep their value. Never blocks on I/O."""
        now = self._clock()
        with self._lock:
            if step is not None:
                if step < self._step:  # went backwards (a resume from an older checkpoint)
                    self._samples.clear()
                if not self._samples or self._samples[-1][1] != step:
                    self._samples.append((now, step))
                self._step = step
            if total_steps is not None:
                self._total_steps = total_steps
            if epoch is not None:
                self._epoch = epoch
            if loss is not None:
                self._loss = _finite(loss)
            if tokens_per_second is not None:
                self._tokens_per_second = _finite(tokens_per_second)
            if phase is not None:
                self._phase = phase
            if message is not None:
                self._message = redact_secrets(message)
            if restarts_seen is not None:
                self._restarts_seen = restarts_seen
            self._version += 1

    def checkpoint_saved(self, step: int, uri: str, when: datetime | None = None) -> None:
        """Record the newest complete checkpoint (shown as latestCheckpoint)."""
        ref = CheckpointRef(step=step, uri=redact_secrets(uri), time=rfc3339(when))
        with self._lock:
            self._checkpoint = ref
            self._version += 1

    def eta_seconds(self) -> float | None:
        with self._lock:
            return self._eta_locked()

    def _eta_locked(self) -> float | None:
        total = self._total_steps
        if total is None:
            return None
        if self._step >= total:
            return 0.0
        if len(self._samples) < 2:
            return None
        (t0, s0), (t1, s1) = self._samples[0], self._samples[-1]
        if t1 <= t0 or s1 <= s0:
            return None
        rate = (s1 - s0) / (t1 - t0)
        return round((total - self._step) / rate, 1)

    def snapshot(self) -> ProgressDoc:
        """The document as it would be written now."""
        with self._lock:
            return self._snapshot_locked()

    def _snapshot_locked(self) -> ProgressDoc:
        percent: float | None = None
        if self._phase == "done":
            percent = 100.0
        elif self._total_steps:
            percent = round(min(100.0, 100.0 * self._step / self._total_steps), 2)
        return ProgressDoc(
            phase=self._phase,
            step=self._step,
            total_steps=self._total_steps,
            epoch=max(self._epoch, 0.0),
            percent=percent,
            eta_seconds=self._eta_locked(),
            loss=self._loss,
            tokens_per_second=self._tokens_per_second,
            updated_at=rfc3339(),
            latest_checkpoint=self._checkpoint,
            restarts_seen=self._restarts_seen,
            message=self._message,
        )

    # -- writing -------------------------------------------------------------------------------

    def start(self) -> None:
        if self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="kubetune-progress", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_seconds):
            self._write(only_if_changed=True)

    def _write(self, *, only_if_changed: bool) -> bool:
        with self._write_lock:
            with self._lock:
                version = self._version
                if only_if_changed and version == self._written_version:
                    return True
                doc = self._snapshot_locked()
            try:
                self.store.write_json(PROGRESS_FILE, doc.to_json())
            except Exception as exc:  # storage trouble must never reach the training loop
                # Warn on the first failure of a streak only: a long outage would flood the log.
                level = logging.DEBUG if self._failing else logging.WARNING
                log.log(
                    level,
                    "could not write %s (retrying): %s",
                    PROGRESS_FILE,
                    redact_secrets(str(exc)),
                )
                self._failing = True
                return False
            if self._failing:
                log.info("%s written again after earlier failures", PROGRESS_FILE)
                self._failing = False
            with self._lock:
                self._written_version = max(self._written_version, version)
            return True

    def flush(self) -> bool:
        """Write progress.json now, from the calling thread. Returns False when storage failed."""
        return self._write(only_if_changed=False)

    def close(self) -> bool:
        """Stop the background thread and write the final state. Safe to call twice."""
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.join(timeout=max(self.interval_seconds, 1.0) + 30.0)
        return self.flush()

    def __enter__(self) -> ProgressReporter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --------------------------------------------------------------------------------------------
# Termination message and failure classification


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
    return _is_instance_of(exc, "kubetune_trainer.data", "InvalidDataError")


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
