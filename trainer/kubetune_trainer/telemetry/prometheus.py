"""The trainer's Prometheus metrics on rank 0, labelled by job and namespace."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import start_http_server

from kubetune_trainer.config import JobIdentity

if TYPE_CHECKING:
    from wsgiref.simple_server import WSGIServer


log = logging.getLogger(__name__)


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
