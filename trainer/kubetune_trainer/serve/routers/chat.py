"""/v1/chat/completions: OpenAI chat completions, whole or streamed as server-sent events."""

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
from kubetune_trainer.serve.schemas import (
    AssistantMessage,
    ChatChoice,
    ChatCompletionRequest,
    ChatCompletionResponse,
)
from kubetune_trainer.serve.streaming import chat_chunker, sse_response, stream_generation

if TYPE_CHECKING:
    from kubetune_trainer.serve.engines import CausalLMEngine

ENDPOINT = "/v1/chat/completions"

router = APIRouter()


def encode_chat_or_400(engine: CausalLMEngine, req: ChatCompletionRequest) -> list[int]:
    from jinja2 import TemplateError

    messages = [{"role": m.role, "content": m.text()} for m in req.messages]
    try:
        return engine.encode_chat(messages)
    except TemplateError as exc:  # e.g. a template that insists roles alternate
        raise ApiError(
            400, f"messages: rejected by the chat template: {exc}", param="messages"
        ) from None


@router.post(ENDPOINT, response_model=ChatCompletionResponse)
async def chat_completions(req: ChatCompletionRequest, request: Request) -> Response:
    ctx = context(request.app)
    settings = ctx.state.settings
    check_model(settings, req.model)
    engine = causal_engine(ctx.state)
    ids = await asyncio.to_thread(encode_chat_or_400, engine, req)
    params = params_for(req, engine, len(ids), settings)
    rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
    if req.stream:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        chunk = chat_chunker(rid, created, settings.model_name)
        return sse_response(
            stream_generation(
                engine, ids, params, ctx.gen_executor, chunk, include_usage, ctx.metrics, ENDPOINT
            )
        )
    result = await run_generation(ctx.gen_executor, engine, ids, params)
    count_tokens(ctx.metrics, ENDPOINT, result.prompt_tokens, result.completion_tokens)
    body = ChatCompletionResponse(
        id=rid,
        created=created,
        model=settings.model_name,
        choices=[
            ChatChoice(
                index=0,
                message=AssistantMessage(content=result.text),
                finish_reason=result.finish_reason,
            )
        ],
        usage=usage(result.prompt_tokens, result.completion_tokens),
    )
    return JSONResponse(body.model_dump(mode="json"))
