"""progress.json in the run's store, written from a background thread so that slow or failing
storage never stalls or kills the training loop."""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from collections import deque
from collections.abc import Callable
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field

from kubetune_trainer.config import WireModel

if TYPE_CHECKING:
    from kubetune_trainer.store import Store

from kubetune_trainer.telemetry.secrets import redact_secrets

log = logging.getLogger(__name__)

PROGRESS_FILE = "progress.json"

Phase = Literal[
    "preparing", "evaluating-base", "training", "evaluating", "saving", "done", "failed"
]


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
    steps_by_attempt: dict[str, int] = Field(
        default_factory=dict,
        description=(
            "The highest optimizer step each gang attempt reached (KUBETUNE_ATTEMPT; 0 when run"
            " locally), carried over from the previous attempt's progress.json: with the step"
            " each attempt resumed from, it says how much work a fault cost."
        ),
    )

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


def _attempt_from_env() -> int:
    """The gang attempt the operator set on the rank pod (0 when run locally or unreadable)."""
    try:
        return max(0, int(os.environ.get("KUBETUNE_ATTEMPT", "0") or 0))
    except ValueError:
        return 0


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
        attempt: int | None = None,
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
        self._attempt = str(_attempt_from_env() if attempt is None else attempt)
        previous = read_progress(store) if start else None
        self._steps_by_attempt = dict(previous.steps_by_attempt) if previous else {}
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
                best = self._steps_by_attempt.get(self._attempt, 0)
                self._steps_by_attempt[self._attempt] = max(best, step)
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
            steps_by_attempt=dict(self._steps_by_attempt),
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
