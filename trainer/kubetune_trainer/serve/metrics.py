"""Prometheus metrics of the inference server, on their own registry (not the global one).

An explicit registry keeps several servers in one process (tests) from colliding and keeps
process-wide collectors of other libraries out of the server's /metrics.
"""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.types import ASGIApp, Message, Receive, Scope, Send

# Only these paths get their own label value; anything else is "other", so random 404 paths
# cannot blow up the number of time series.
KNOWN_ENDPOINTS = frozenset(
    {
        "/v1/chat/completions",
        "/v1/completions",
        "/v1/classify",
        "/v1/models",
        "/healthz",
        "/readyz",
        "/metrics",
    }
)


class ServeMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "kubetune_serve_requests_total",
            "HTTP requests by endpoint and status code.",
            ["endpoint", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "kubetune_serve_request_duration_seconds",
            "Time from request start to the last response byte (whole stream for SSE).",
            ["endpoint"],
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
            registry=self.registry,
        )
        self.tokens_in = Counter(
            "kubetune_serve_prompt_tokens_total",
            "Input tokens processed (prompts and texts to classify).",
            ["endpoint"],
            registry=self.registry,
        )
        self.tokens_out = Counter(
            "kubetune_serve_completion_tokens_total",
            "Tokens generated.",
            ["endpoint"],
            registry=self.registry,
        )
        self.in_flight = Gauge(
            "kubetune_serve_in_flight_requests",
            "Inference requests being handled now.",
            registry=self.registry,
        )
        self.queue_depth = Gauge(
            "kubetune_serve_queue_depth",
            "Texts waiting for a classification batch.",
            registry=self.registry,
        )
        self.batch_size = Histogram(
            "kubetune_serve_batch_size",
            "Texts per classification forward pass.",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128),
            registry=self.registry,
        )
        self.ready = Gauge(
            "kubetune_serve_ready",
            "1 when the model is loaded and serving.",
            registry=self.registry,
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)


class MetricsMiddleware:
    """Counts every HTTP request by endpoint and status and times it to the last byte."""

    def __init__(self, app: ASGIApp, metrics: ServeMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        endpoint = path if path in KNOWN_ENDPOINTS else "other"
        status = 500  # what the client sees if the app dies before answering
        start = time.perf_counter()

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            self.metrics.requests.labels(endpoint, str(status)).inc()
            self.metrics.latency.labels(endpoint).observe(time.perf_counter() - start)
