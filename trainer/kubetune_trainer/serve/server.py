"""``kubetune_trainer serve``: an OpenAI-compatible HTTP server for one trained model.

Causal LMs get /v1/chat/completions and /v1/completions, classifiers /v1/classify; every model
gets /v1/models, /healthz, /readyz and /metrics. The model loads in the background after the
server starts listening, so /readyz answers 503 until it is ready.

On SIGTERM readiness turns false at once, the server keeps serving for ``--shutdown-delay``
seconds (time for Kubernetes to take the pod out of its Service), then stops accepting
connections, lets in-flight requests finish and exits 0.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path
from types import FrameType

import uvicorn

from kubetune_trainer.evaluate.modelcard import ModelCardError, read_model_card
from kubetune_trainer.serve.app import create_app
from kubetune_trainer.serve.metrics import ServeMetrics
from kubetune_trainer.serve.state import ServerState, ServeSettings

__all__ = ["build_parser", "main", "settings_from_args"]

log = logging.getLogger("kubetune_trainer.serve")


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _probability(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, got {value}")
    return value


def _non_negative(text: str) -> float:
    value = float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must not be negative, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="kubetune serve", description="Serve a kubetune model over HTTP (OpenAI-compatible)."
    )
    p.add_argument("--model", required=True, help="model directory or s3://bucket/prefix")
    p.add_argument("--model-name", help="name clients use in 'model' (default: directory name)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8080)
    _add_limit_args(p)
    _add_lifecycle_args(p)
    return p


def _add_limit_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--max-concurrency",
        type=_positive_int,
        default=64,
        help="in-flight inference requests before answering 429 (default 64)",
    )
    p.add_argument(
        "--escalation-threshold",
        type=_probability,
        help="override the model card's escalation threshold",
    )
    p.add_argument(
        "--max-body-bytes",
        type=_positive_int,
        default=1 << 20,
        help="largest request body accepted (default 1 MiB)",
    )
    p.add_argument(
        "--max-tokens-limit",
        type=_positive_int,
        default=1024,
        help="largest max_tokens a request may ask for (default 1024)",
    )
    p.add_argument(
        "--max-batch-size",
        type=_positive_int,
        default=32,
        help="texts per classification forward pass (default 32)",
    )
    p.add_argument(
        "--batch-wait-ms",
        type=_non_negative,
        default=2.0,
        help="how long a classification batch waits to fill (default 2 ms)",
    )


def _add_lifecycle_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--shutdown-delay",
        type=_non_negative,
        default=0.0,
        help="seconds to keep serving after SIGTERM with readiness false",
    )
    p.add_argument(
        "--graceful-timeout",
        type=_non_negative,
        default=30.0,
        help="seconds in-flight requests get to finish on shutdown; 0 waits forever (default 30)",
    )
    p.add_argument(
        "--download-dir",
        type=Path,
        help="folder an s3:// model is downloaded into (as DIR/<model-name>, replaced); "
        "default: a new temporary folder",
    )
    p.add_argument(
        "--device", default="auto", help="torch device: auto (GPU if present), cpu, cuda, ..."
    )
    p.add_argument(
        "--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"]
    )
    p.add_argument("--load-delay", type=_non_negative, default=0.0, help=argparse.SUPPRESS)


def settings_from_args(args: argparse.Namespace) -> ServeSettings:
    name = args.model_name or args.model.rstrip("/").rsplit("/", 1)[-1] or "model"
    return ServeSettings(
        model=args.model,
        model_name=name,
        host=args.host,
        port=args.port,
        max_concurrency=args.max_concurrency,
        escalation_threshold=args.escalation_threshold,
        max_body_bytes=args.max_body_bytes,
        max_tokens_limit=args.max_tokens_limit,
        max_batch_size=args.max_batch_size,
        batch_wait_ms=args.batch_wait_ms,
        shutdown_delay_s=args.shutdown_delay,
        download_dir=args.download_dir,
        device=args.device,
        load_delay_s=args.load_delay,
    )


class _Server(uvicorn.Server):
    """uvicorn with a readiness flag and an optional delay between SIGTERM and shutdown."""

    def __init__(self, config: uvicorn.Config, state: ServerState, metrics: ServeMetrics) -> None:
        super().__init__(config)
        self.state = state
        self.metrics = metrics
        self._stop_at: float | None = None

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # Not calling super(): uvicorn would re-raise the signal once shut down, so a graceful
        # SIGTERM would end in "killed by signal" instead of exit code 0.
        if self.state.draining:  # a second signal: stop waiting for anything
            self.should_exit = True
            self.force_exit = True
            return
        self.state.draining = True
        self.metrics.ready.set(0)
        log.info("signal %d: not ready any more; draining", sig)
        self._stop_at = time.monotonic() + self.state.settings.shutdown_delay_s

    async def on_tick(self, counter: int) -> bool:
        if self._stop_at is not None and time.monotonic() >= self._stop_at:
            self.should_exit = True
        if self.state.load_error is not None:  # never going to be ready: exit non-zero
            self.should_exit = True
        return bool(await super().on_tick(counter))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    # torch loads later (in the loader thread), so this still reaches its OpenMP runtime. Idle
    # OpenMP threads otherwise spin, stealing CPU from the event loop and from neighbours under
    # a CPU limit; measured 3-5x slower classify latency on a busy 2-core node without it.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    settings = settings_from_args(args)
    state = ServerState(settings=settings, created=int(time.time()))
    if not settings.model.startswith("s3://"):
        # Fail fast on a wrong directory; the weights themselves load in the background.
        model_dir = Path(settings.model)
        if not model_dir.is_dir():
            print(f"error: --model {settings.model}: no such directory", file=sys.stderr)
            return 2
        try:
            state.card = read_model_card(model_dir)
        except ModelCardError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    metrics = ServeMetrics()
    app = create_app(state, metrics)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=args.log_level,
        timeout_graceful_shutdown=int(args.graceful_timeout) or None,
        access_log=False,
    )
    server = _Server(config, state, metrics)
    server.run()
    if state.load_error is not None:
        print(f"error: {state.load_error}", file=sys.stderr)
        return 1
    return 0 if server.started else 1


if __name__ == "__main__":
    sys.exit(main())
