"""Stop-string handling, server-sent-event framing and the SSE stream of a generation."""

from __future__ import annotations

import asyncio
import json
import logging
import threading
from collections.abc import AsyncIterator
from concurrent.futures import Executor
from typing import TYPE_CHECKING, Any, Protocol

from fastapi.responses import StreamingResponse
from pydantic import BaseModel

from kubetune_trainer.serve.generation import count_tokens, usage
from kubetune_trainer.serve.metrics import ServeMetrics
from kubetune_trainer.serve.schemas import (
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatDelta,
    CompletionChunk,
    CompletionChunkChoice,
    Usage,
)

if TYPE_CHECKING:
    from kubetune_trainer.serve.engines import (
        CausalLMEngine,
        FinishReason,
        GenerationParams,
        GenerationResult,
    )

log = logging.getLogger("kubetune_trainer.serve")


def cut_at_stop(text: str, stops: list[str]) -> tuple[str, bool]:
    """``text`` up to the first stop string, and whether one was found."""
    cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=-1)
    return (text, False) if cut < 0 else (text[:cut], True)


class StopBuffer:
    """Releases streamed text only once it cannot be the start of a stop string.

    OpenAI semantics: the stop string itself is never sent, so a suffix that could still grow
    into one is held back until the next piece decides it.
    """

    def __init__(self, stops: list[str]) -> None:
        self.stops = stops
        self.pending = ""

    def feed(self, text: str) -> tuple[str, bool]:
        """Text safe to send now, and whether a stop string ended the stream."""
        self.pending += text
        out, found = cut_at_stop(self.pending, self.stops)
        if found:
            self.pending = ""
            return out, True
        keep = 0
        for stop in self.stops:
            for n in range(min(len(stop) - 1, len(self.pending)), keep, -1):
                if self.pending.endswith(stop[:n]):
                    keep = n
                    break
        cut = len(self.pending) - keep
        out, self.pending = self.pending[:cut], self.pending[cut:]
        return out, False

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out


def sse(payload: BaseModel | dict[str, Any]) -> str:
    """One server-sent event carrying a JSON object."""
    data = payload.model_dump(mode="json") if isinstance(payload, BaseModel) else payload
    if isinstance(data.get("choices"), list):
        for choice in data["choices"]:  # OpenAI deltas carry only the keys that are set
            delta = choice.get("delta")
            if isinstance(delta, dict):
                choice["delta"] = {k: v for k, v in delta.items() if v is not None}
    if data.get("usage", ...) is None:
        del data["usage"]
    return f"data: {json.dumps(data, separators=(',', ':'))}\n\n"


SSE_DONE = "data: [DONE]\n\n"


def sse_response(events: AsyncIterator[str]) -> StreamingResponse:
    return StreamingResponse(
        events, media_type="text/event-stream", headers={"cache-control": "no-cache"}
    )


class ChunkFn(Protocol):
    """Renders one event of a stream: ``role`` marks the first one, ``usage`` the usage one."""

    def __call__(
        self,
        text: str | None,
        finish: FinishReason | None,
        role: bool = False,
        usage: Usage | None = None,
    ) -> str: ...


def chat_chunker(rid: str, created: int, model: str) -> ChunkFn:
    def chunk(
        text: str | None,
        finish: FinishReason | None,
        role: bool = False,
        usage: Usage | None = None,
    ) -> str:
        delta = ChatDelta(role="assistant" if role else None, content=text)
        choices = [] if usage else [ChatChunkChoice(delta=delta, finish_reason=finish)]
        return sse(
            ChatCompletionChunk(id=rid, created=created, model=model, choices=choices, usage=usage)
        )

    return chunk


def completion_chunker(rid: str, created: int, model: str) -> ChunkFn:
    def chunk(
        text: str | None,
        finish: FinishReason | None,
        role: bool = False,
        usage: Usage | None = None,
    ) -> str:
        if role:  # completions have no role chunk; send an empty first chunk
            text = ""
        choices = [] if usage else [CompletionChunkChoice(text=text or "", finish_reason=finish)]
        return sse(
            CompletionChunk(id=rid, created=created, model=model, choices=choices, usage=usage)
        )

    return chunk


def _start_generation(
    engine: CausalLMEngine,
    ids: list[int],
    params: GenerationParams,
    executor: Executor,
    cancel: threading.Event,
) -> tuple[asyncio.Queue[str | None], asyncio.Future[GenerationResult]]:
    """Runs the generation in ``executor``; its text arrives on the queue, ``None`` last."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[str | None] = asyncio.Queue()

    def push(text: str | None) -> None:
        loop.call_soon_threadsafe(queue.put_nowait, text)

    def work() -> GenerationResult:
        try:
            return engine.generate(ids, params, cancel, on_text=push)
        finally:
            push(None)  # end of stream, also after an error

    return queue, loop.run_in_executor(executor, work)


def _error_event(exc: Exception) -> str:
    error = {
        "message": f"internal error: {type(exc).__name__}",
        "type": "internal_error",
        "param": None,
        "code": None,
    }
    return sse({"error": error})


async def stream_generation(
    engine: CausalLMEngine,
    ids: list[int],
    params: GenerationParams,
    executor: Executor,
    chunk: ChunkFn,
    include_usage: bool,
    metrics: ServeMetrics,
    endpoint: str,
) -> AsyncIterator[str]:
    cancel = threading.Event()
    queue, future = _start_generation(engine, ids, params, executor, cancel)
    buffer = StopBuffer(params.stops)
    stopped = False
    try:
        yield chunk(None, None, role=True)
        while (piece := await queue.get()) is not None:
            text, stopped = buffer.feed(piece)
            if text:
                yield chunk(text, None)
            if stopped:
                cancel.set()
                break
        try:
            result = await future
        except Exception as exc:  # headers are gone already: report in-band, then end
            log.exception("generation failed mid-stream")
            yield _error_event(exc)
            yield SSE_DONE
            return
        tail = "" if stopped else buffer.flush()
        if tail:
            yield chunk(tail, None)
        yield chunk(None, "stop" if stopped else result.finish_reason)
        used = usage(result.prompt_tokens, result.completion_tokens)
        count_tokens(metrics, endpoint, used.prompt_tokens, used.completion_tokens)
        if include_usage:
            yield chunk(None, None, usage=used)
        yield SSE_DONE
    finally:
        cancel.set()  # client went away or we are done: free the worker
