"""Model loading after the server starts listening, and the shutdown that undoes it."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path

from fastapi import FastAPI

from kubetune_trainer.evaluate.modelcard import read_model_card
from kubetune_trainer.serve.deps import ServeContext, context
from kubetune_trainer.serve.state import ServerState

log = logging.getLogger("kubetune_trainer.serve")


def _local_model_dir(state: ServerState) -> Path:
    """The model as a local directory, downloading an s3:// URI first."""
    source = state.settings.model
    if not source.startswith("s3://"):
        return Path(source)
    from kubetune_trainer.store import download_tree  # boto3 is only needed for s3 models

    # download_tree replaces its destination, so it gets a folder of its own.
    parent = state.settings.download_dir or Path(tempfile.mkdtemp(prefix="kubetune-model-"))
    dest = parent / state.settings.model_name
    log.info("downloading %s to %s", source, dest)
    return Path(download_tree(source, dest))


async def load_model(ctx: ServeContext) -> None:
    state, metrics, settings = ctx.state, ctx.metrics, ctx.state.settings
    try:
        if settings.load_delay_s > 0:
            await asyncio.sleep(settings.load_delay_s)
        model_dir = await asyncio.to_thread(_local_model_dir, state)
        card = state.card
        if card is None:  # s3 models: the card arrives with the download
            card = await asyncio.to_thread(read_model_card, model_dir)
        state.model_dir, state.card = model_dir, card
        log.info("loading %s model from %s", card.task, model_dir)
        started = time.perf_counter()
        from kubetune_trainer.serve import (
            engines as serve_engine,  # torch + transformers load here
        )

        engine = await asyncio.to_thread(serve_engine.load_engine, model_dir, card, settings.device)
        if isinstance(engine, serve_engine.ClassifierEngine):
            state.batcher = serve_engine.MicroBatcher(
                engine,
                ctx.cls_executor,
                settings.max_batch_size,
                settings.batch_wait_ms / 1000,
                on_depth=metrics.queue_depth.set,
                on_batch=metrics.batch_size.observe,
            )
            state.batcher.start()
        state.engine = engine
        metrics.ready.set(0 if state.draining else 1)
        log.info("model ready in %.1f s", time.perf_counter() - started)
    except Exception as exc:  # surfaced on /readyz; server.py then stops the server
        log.exception("loading the model failed")
        state.load_error = f"loading the model failed: {type(exc).__name__}: {exc}"


@contextlib.asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    ctx = context(app)
    # Loading runs in the background so the server listens (and /readyz answers 503) now.
    loader = asyncio.create_task(load_model(ctx), name="load-model")
    try:
        yield
    finally:
        loader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await loader
        if ctx.state.batcher is not None:
            await ctx.state.batcher.stop()
        ctx.gen_executor.shutdown(wait=True, cancel_futures=True)
        ctx.cls_executor.shutdown(wait=True, cancel_futures=True)
