"""What the operator remembers about one job between passes, and how any handler finds it.

The job's kopf memo holds its `JobState` (per object, dropped with the object when kopf
forgets the deleted job). Pod handlers see only the pod's memo, so `JOBS` points at each
job's state, weakly: it keeps nothing alive and needs no cleanup.
"""

from __future__ import annotations

import threading
import weakref
from dataclasses import dataclass, field


@dataclass(eq=False)
class JobState:
    # One pass at a time per job: job, timer and pod handlers run in kopf's thread pool.
    lock: threading.Lock = field(default_factory=threading.Lock)
    # (attempt, monotonic time, step) of the first progress sample: the step rate for the ETA.
    _first: tuple[str, float, int] | None = None
    _running_seen: bool = False

    def first_sample(self, attempt: str, now: float, step: int) -> tuple[float, int]:
        """(time, step) of this attempt's first sample; this one when it is the first."""
        if self._first is None or self._first[0] != attempt:
            self._first = (attempt, now, step)
        return self._first[1], self._first[2]

    def first_running(self) -> bool:
        """True once: the first time a rank of this job is seen running."""
        seen, self._running_seen = self._running_seen, True
        return not seen


class JobIndex:
    """(namespace, name) -> the job's state, held weakly (the job's memo holds it)."""

    def __init__(self) -> None:
        self._guard = threading.Lock()
        self._states: weakref.WeakValueDictionary[tuple[str, str], JobState] = (
            weakref.WeakValueDictionary()
        )

    def get(self, namespace: str, name: str) -> JobState:
        """The job's state; a new one when no handler holds it (the caller must keep it)."""
        with self._guard:
            state = self._states.get((namespace, name))
            if state is None:
                state = JobState()
                self._states[(namespace, name)] = state
            return state

    def __len__(self) -> int:
        return len(self._states)


JOBS = JobIndex()
