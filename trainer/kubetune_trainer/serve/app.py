"""The FastAPI application factory: shared context, middleware, error handlers and routers.

The routes live in :mod:`kubetune_trainer.serve.routers`, model loading in
:mod:`kubetune_trainer.serve.lifespan`, the error bodies in :mod:`kubetune_trainer.serve.errors`.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

from fastapi import FastAPI

from kubetune_trainer.serve.deps import ServeContext
from kubetune_trainer.serve.errors import install_exception_handlers
from kubetune_trainer.serve.lifespan import lifespan
from kubetune_trainer.serve.metrics import MetricsMiddleware, ServeMetrics
from kubetune_trainer.serve.middleware import AdmissionMiddleware, BodyLimitMiddleware
from kubetune_trainer.serve.routers import chat, classify, completions, health, models
from kubetune_trainer.serve.state import ServerState


def create_app(state: ServerState, metrics: ServeMetrics) -> FastAPI:
    settings = state.settings
    app = FastAPI(
        title="kubetune inference server",
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
        strict_content_type=False,  # curl -d without a header still works
    )
    app.state.serve = ServeContext(
        state=state,
        metrics=metrics,
        gen_executor=ThreadPoolExecutor(settings.max_concurrency, thread_name_prefix="generate"),
        # One forward pass at a time: torch already parallelises inside an op.
        cls_executor=ThreadPoolExecutor(1, thread_name_prefix="classify"),
    )
    # Added last = outermost: metrics see every response, including 413/429/503.
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes)
    app.add_middleware(AdmissionMiddleware, state=state, metrics=metrics)
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    install_exception_handlers(app)
    # Included in this order so /openapi.json lists the paths as it always has.
    for module in (health, models, chat, completions, classify):
        app.include_router(module.router)
    return app
