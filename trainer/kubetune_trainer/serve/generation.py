"""Text generation glue shared by /v1/chat/completions and /v1/completions."""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import Executor
from typing import TYPE_CHECKING

from kubetune_trainer.serve.errors import ApiError
from kubetune_trainer.serve.metrics import ServeMetrics
from kubetune_trainer.serve.schemas import ChatCompletionRequest, CompletionRequest, Usage
from kubetune_trainer.serve.state import ServeSettings

if TYPE_CHECKING:
    from kubetune_trainer.serve.engines import (
        CausalLMEngine,
        GenerationParams,
        GenerationResult,
    )


def params_for(
    req: ChatCompletionRequest | CompletionRequest,
    engine: CausalLMEngine,
    prompt_len: int,
    settings: ServeSettings,
) -> GenerationParams:
    from kubetune_trainer.serve.engines import GenerationParams, PromptTooLongError

    limit = settings.max_tokens_limit
    if req.max_tokens is not None and req.max_tokens > limit:
        raise ApiError(
            400,
            f"max_tokens: {req.max_tokens} is over this server's limit of {limit}",
            param="max_tokens",
        )
    try:
        max_tokens = engine.check_fits(prompt_len, req.max_tokens, limit)
    except PromptTooLongError as exc:
        param = "messages" if isinstance(req, ChatCompletionRequest) else "prompt"
        raise ApiError(400, f"{param}: {exc}", param=param) from None
    return GenerationParams(max_tokens, req.temperature, req.top_p, req.stops())


async def run_generation(
    executor: Executor, engine: CausalLMEngine, ids: list[int], params: GenerationParams
) -> GenerationResult:
    cancel = threading.Event()
    loop = asyncio.get_running_loop()
    try:
        return await loop.run_in_executor(executor, engine.generate, ids, params, cancel)
    finally:
        cancel.set()  # if this request was cancelled, stop the worker at its next token


def usage(prompt_tokens: int, completion_tokens: int) -> Usage:
    return Usage(
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        total_tokens=prompt_tokens + completion_tokens,
    )


def count_tokens(metrics: ServeMetrics, endpoint: str, prompt: int, completion: int) -> None:
    metrics.tokens_in.labels(endpoint).inc(prompt)
    metrics.tokens_out.labels(endpoint).inc(completion)
