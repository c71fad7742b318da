"""/v1/completions: OpenAI text completions; several prompts per request unless streamed."""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import TYPE_CHECKING

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from kubetune_trainer.serve.deps import causal_engine, check_model, context
from kubetune_trainer.serve.errors import ApiError
from kubetune_trainer.serve.generation import count_tokens, params_for, run_generation, usage
from kubetune_trainer.serve.schemas import CompletionChoice, CompletionRequest, CompletionResponse
from kubetune_trainer.serve.state import ServeSettings
from kubetune_trainer.serve.streaming import completion_chunker, sse_response, stream_generation

if TYPE_CHECKING:
    from kubetune_trainer.serve.engines import CausalLMEngine

ENDPOINT = "/v1/completions"

router = APIRouter()


async def encode_prompts_or_400(
    engine: CausalLMEngine, req: CompletionRequest, settings: ServeSettings
) -> list[list[int]]:
    prompts = [req.prompt] if isinstance(req.prompt, str) else req.prompt
    if req.stream and len(prompts) > 1:
        raise ApiError(400, "prompt: streaming takes a single prompt", param="prompt")
    if len(prompts) > settings.max_prompts_per_request:
        raise ApiError(
            400,
            f"prompt: {len(prompts)} prompts is over the limit of "
            f"{settings.max_prompts_per_request} per request",
            param="prompt",
        )
    encoded = [await asyncio.to_thread(engine.encode_prompt, p) for p in prompts]
    for i, ids in enumerate(encoded):
        if not ids:
            where = "prompt" if isinstance(req.prompt, str) else f"prompt[{i}]"
            raise ApiError(400, f"{where}: must not be empty", param=where)
    return encoded


@router.post(ENDPOINT, response_model=CompletionResponse)
async def completions(req: CompletionRequest, request: Request) -> Response:
    ctx = context(request.app)
    settings = ctx.state.settings
    check_model(settings, req.model)
    engine = causal_engine(ctx.state)
    encoded = await encode_prompts_or_400(engine, req, settings)
    all_params = [params_for(req, engine, len(ids), settings) for ids in encoded]
    rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
    if req.stream:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        chunk = completion_chunker(rid, created, settings.model_name)
        return sse_response(
            stream_generation(
                engine,
                encoded[0],
                all_params[0],
                ctx.gen_executor,
                chunk,
                include_usage,
                ctx.metrics,
                ENDPOINT,
            )
        )
    choices: list[CompletionChoice] = []
    prompt_tokens = completion_tokens = 0
    for i, (ids, params) in enumerate(zip(encoded, all_params, strict=True)):
        result = await run_generation(ctx.gen_executor, engine, ids, params)
        choices.append(
            CompletionChoice(index=i, text=result.text, finish_reason=result.finish_reason)
        )
        prompt_tokens += result.prompt_tokens
        completion_tokens += result.completion_tokens
    count_tokens(ctx.metrics, ENDPOINT, prompt_tokens, completion_tokens)
    body = CompletionResponse(
        id=rid,
        created=created,
        model=settings.model_name,
        choices=choices,
        usage=usage(prompt_tokens, completion_tokens),
    )
    return JSONResponse(body.model_dump(mode="json"))
