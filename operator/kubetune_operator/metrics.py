"""Operator metrics on an explicit registry (never prometheus_client's global one)."""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterator
from typing import get_args

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.exposition import start_http_server

from kubetune_operator.api.models import Phase

log = logging.getLogger(__name__)

PORT_ENV = "KUBETUNE_OPERATOR_METRICS_PORT"
DEFAULT_PORT = 9300
PHASES: tuple[str, ...] = get_args(Phase)

registry = CollectorRegistry(auto_describe=True)
jobs_by_phase = Gauge(
    "kubetune_operator_jobs", "FineTuneJobs by phase.", ["phase"], registry=registry
)
reconcile_seconds = Histogram(
    "kubetune_operator_reconcile_duration_seconds",
    "Wall time of one reconcile pass.",
    ["trigger"],
    registry=registry,
)
restarts_total = Counter(
    "kubetune_operator_gang_restarts",
    "Gang restarts after retryable rank failures.",
    ["namespace"],
    registry=registry,
)
gate_results_total = Counter(
    "kubetune_operator_gate_results",
    "Evaluation gate decisions.",
    ["result"],
    registry=registry,
)
time_to_running_seconds = Histogram(
    "kubetune_operator_time_to_first_rank_running_seconds",
    "From job creation to the first rank pod Running.",
    buckets=(1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1800),
    registry=registry,
)


class _GpuSeconds:
    """kubetune_job_gpu_seconds_total{namespace,job}: each job's GPU-seconds as status.usage
    counts them (over every attempt), so the counter continues across operator restarts."""

    def __init__(self) -> None:
        self.values: dict[tuple[str, str], float] = {}
        self.lock = threading.Lock()

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily(
            "kubetune_job_gpu_seconds",
            "GPUs x seconds the job's rank pods ran, over all attempts.",
            labels=["namespace", "job"],
        )
        with self.lock:
            for (namespace, job), value in sorted(self.values.items()):
                family.add_metric([namespace, job], value)
        yield family


gpu_seconds = _GpuSeconds()
registry.register(gpu_seconds)


def observe_gpu_seconds(namespace: str, job: str, value: float | None) -> None:
    """A job's GPU-seconds so far (None: the job is gone); never goes down while it exists."""
    with gpu_seconds.lock:
        key = (namespace, job)
        if value is None:
            gpu_seconds.values.pop(key, None)
        else:
            gpu_seconds.values[key] = max(value, gpu_seconds.values.get(key, 0.0))


_phases: dict[str, str] = {}
_phase_lock = threading.Lock()
_started = False


def observe_phase(key: str, phase: str | None) -> None:
    """Record a job's phase (None: the job is gone) and refresh the by-phase gauge."""
    with _phase_lock:
        if phase is None:
            _phases.pop(key, None)
        else:
            _phases[key] = phase
        counts = {p: 0 for p in PHASES}
        for value in _phases.values():
            counts[value] = counts.get(value, 0) + 1
        for name, count in counts.items():
            jobs_by_phase.labels(phase=name).set(count)


def serve(port: int | None = None) -> int:
    """Serve /metrics once per process; port from KUBETUNE_OPERATOR_METRICS_PORT (0: off)."""
    global _started
    if port is None:
        port = int(os.environ.get(PORT_ENV, DEFAULT_PORT))
    if _started or port == 0:
        return port
    start_http_server(
        port, addr=os.environ.get("KUBETUNE_OPERATOR_METRICS_HOST", "0.0.0.0"), registry=registry
    )
    _started = True
    log.info("operator metrics on port %d", port)
    return port
