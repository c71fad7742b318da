"""What the routers and the lifespan take from ``app.state``, with the types mypy needs.

Starlette's ``app.state`` is untyped; everything goes through :func:`context` so a wrong key or
type fails at one place instead of as an ``Any`` deep inside a route.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, cast

from starlette.applications import Starlette

from kubetune_trainer.serve.errors import ApiError
from kubetune_trainer.serve.metrics import ServeMetrics
from kubetune_trainer.serve.state import ServerState, ServeSettings

if TYPE_CHECKING:  # the engine module pulls in torch; routes import it only once it is loaded
    from kubetune_trainer.serve.engines import CausalLMEngine, ClassifierEngine, MicroBatcher


@dataclass(frozen=True)
class ServeContext:
    state: ServerState
    metrics: ServeMetrics
    gen_executor: ThreadPoolExecutor
    cls_executor: ThreadPoolExecutor


def context(app: Starlette) -> ServeContext:
    ctx = app.state.serve
    assert isinstance(ctx, ServeContext)
    return ctx


def check_model(settings: ServeSettings, name: str | None) -> None:
    if name is not None and name != settings.model_name:
        raise ApiError(
            404,
            f"model {name!r} does not exist; this server serves {settings.model_name!r}",
            "not_found_error",
            "model",
        )


def causal_engine(state: ServerState) -> CausalLMEngine:
    from kubetune_trainer.serve.engines import CausalLMEngine

    engine = state.engine
    assert isinstance(engine, CausalLMEngine)  # the admission middleware checked the task
    return engine


def classifier(state: ServerState) -> tuple[MicroBatcher, ClassifierEngine]:
    batcher, engine = state.batcher, state.engine
    # A batcher exists only for a classifier (see lifespan), so the engine is one.
    assert batcher is not None and engine is not None
    return batcher, cast("ClassifierEngine", engine)
