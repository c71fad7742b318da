"""The FastAPI application: routes, error mapping and background model loading."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import tempfile
import threading
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException as StarletteHTTPException

from kubetune_trainer.evaluate.modelcard import read_model_card
from kubetune_trainer.serve.metrics import MetricsMiddleware, ServeMetrics
from kubetune_trainer.serve.middleware import AdmissionMiddleware, BodyLimitMiddleware
from kubetune_trainer.serve.schemas import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatDelta,
    Classification,
    ClassifyRequest,
    ClassifyResponse,
    CompletionChoice,
    CompletionChunk,
    CompletionChunkChoice,
    CompletionRequest,
    CompletionResponse,
    ErrorDetail,
    ErrorResponse,
    HealthResponse,
    ModelInfo,
    ModelList,
    Usage,
)
from kubetune_trainer.serve.state import ServerState
from kubetune_trainer.serve.streaming import SSE_DONE, StopBuffer, sse

if TYPE_CHECKING:
    from kubetune_trainer.serve.engines import CausalLMEngine, ClassifierEngine, GenerationParams

log = logging.getLogger("kubetune_trainer.serve")


class ApiError(Exception):
    """A request the server refuses, rendered as an OpenAI-style error body."""

    def __init__(
        self,
        status: int,
        message: str,
        type_: str = "invalid_request_error",
        param: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type_
        self.param = param


def _error(status: int, message: str, type_: str, param: str | None = None) -> JSONResponse:
    body = ErrorResponse(error=ErrorDetail(message=message, type=type_, param=param))
    return JSONResponse(body.model_dump(mode="json"), status_code=status)


# Union members show up in pydantic error locations ("str", "list[TextPart]"); they are not
# fields, so they are left out of the reported parameter path.
_UNION_TAGS = frozenset({"str", "int", "float", "bool", "dict", "list", "none"})


def _param(loc: Sequence[int | str]) -> str | None:
    parts = list(loc[1:]) if loc and loc[0] == "body" else list(loc)
    out = ""
    for part in parts:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in _UNION_TAGS or "[" in part or part.startswith("function-"):
            continue
        else:
            out += f".{part}" if out else part
    return out or None


# The field an empty body most needs, per endpoint: the error names it (house rule: name the field).
_MAIN_FIELD = {
    "/v1/classify": "text",
    "/v1/chat/completions": "messages",
    "/v1/completions": "prompt",
}


def _validation_message(
    errors: Sequence[Any], main_field: str | None = None
) -> tuple[str, str | None]:
    first = errors[0]
    loc = tuple(first.get("loc", ()))
    kind = first.get("type")
    if kind == "json_invalid":
        detail = first.get("ctx", {}).get("error", "invalid JSON")
        pos = loc[1] if len(loc) > 1 else "?"
        return f"request body is not valid JSON: {detail} (at character {pos})", None
    param = _param(loc)
    if param is None:
        if kind == "missing":
            if main_field:
                return (
                    f"{main_field}: field required, but the request body is empty; expected a"
                    f' JSON object such as {{"{main_field}": ...}}',
                    main_field,
                )
            return "request body is empty; expected a JSON object", None
        return (
            "request body must be a JSON object sent with Content-Type: application/json",
            None,
        )
    # Each alternative of a union fails separately. The deepest path under the first error's
    # field is the most precise ("prompt[0]" beats "prompt" for {"prompt": [1]}); alternatives
    # failing at that same path are reported together.
    params = [_param(tuple(err.get("loc", ()))) for err in errors]
    nested = [p for p in params if p is not None and (p == param or p.startswith(param))]
    param = max(nested, key=len)
    if kind == "extra_forbidden" and param == params[0]:
        return f"{param}: unknown field", param
    msgs: list[str] = []
    for err, p in zip(errors, params, strict=True):
        if p == param and err["msg"] not in msgs:
            msgs.append(err["msg"])
    return f"{param}: {' or '.join(msgs)}", param


def create_app(state: ServerState, metrics: ServeMetrics) -> FastAPI:
    settings = state.settings
    gen_executor = ThreadPoolExecutor(settings.max_concurrency, thread_name_prefix="generate")
    # One forward pass at a time: torch already parallelises inside an op.
    cls_executor = ThreadPoolExecutor(1, thread_name_prefix="classify")

    async def load_model() -> None:
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

            engine = await asyncio.to_thread(
                serve_engine.load_engine, model_dir, card, settings.device
            )
            if isinstance(engine, serve_engine.ClassifierEngine):
                state.batcher = serve_engine.MicroBatcher(
                    engine,
                    cls_executor,
                    settings.max_batch_size,
                    settings.batch_wait_ms / 1000,
                    on_depth=metrics.queue_depth.set,
                    on_batch=metrics.batch_size.observe,
                )
                state.batcher.start()
            state.engine = engine
            metrics.ready.set(0 if state.draining else 1)
            log.info("model ready in %.1f s", time.perf_counter() - started)
        except Exception as exc:  # surfaced on /readyz; serve.py then stops the server
            log.exception("loading the model failed")
            state.load_error = f"loading the model failed: {type(exc).__name__}: {exc}"

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        # Loading runs in the background so the server listens (and /readyz answers 503) now.
        loader = asyncio.create_task(load_model(), name="load-model")
        try:
            yield
        finally:
            loader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await loader
            if state.batcher is not None:
                await state.batcher.stop()
            gen_executor.shutdown(wait=True, cancel_futures=True)
            cls_executor.shutdown(wait=True, cancel_futures=True)

    app = FastAPI(
        title="kubetune inference server",
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
        strict_content_type=False,  # curl -d without a header still works
    )
    # Added last = outermost: metrics see every response, including 413/429/503.
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes)
    app.add_middleware(AdmissionMiddleware, state=state, metrics=metrics)
    app.add_middleware(MetricsMiddleware, metrics=metrics)

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(exc.errors(), _MAIN_FIELD.get(request.url.path))
        return _error(400, message, "invalid_request_error", param)

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        type_ = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        message = f"{request.method} {request.url.path}: {exc.detail}"
        return _error(exc.status_code, message, type_)

    @app.exception_handler(ApiError)
    async def on_api_error(_: Request, exc: ApiError) -> JSONResponse:
        return _error(exc.status, exc.message, exc.type, exc.param)

    @app.exception_handler(Exception)
    async def on_internal_error(_: Request, exc: Exception) -> JSONResponse:
        log.exception("internal error")
        return _error(500, f"internal error: {type(exc).__name__}", "internal_error")

    def check_model(name: str | None) -> None:
        if name is not None and name != settings.model_name:
            raise ApiError(
                404,
                f"model {name!r} does not exist; this server serves {settings.model_name!r}",
                "not_found_error",
                "model",
            )

    @app.get("/healthz")
    async def healthz() -> HealthResponse:
        return HealthResponse(status="ok")

    @app.get("/readyz", response_model=HealthResponse)
    async def readyz() -> JSONResponse:
        if state.ready:
            return JSONResponse(HealthResponse(status="ready").model_dump(), status_code=200)
        if state.draining:
            status, detail = "draining", "shutting down"
        elif state.load_error:
            status, detail = "failed", state.load_error
        else:
            status, detail = "loading", "the model is still loading"
        body = HealthResponse(status=status, detail=detail)
        return JSONResponse(body.model_dump(), status_code=503)

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models() -> ModelList:
        card = state.card
        info = ModelInfo(
            id=settings.model_name,
            created=state.created,
            task=card.task if card else None,
            ready=state.ready,
            card=card.model_dump(mode="json") if card else None,
        )
        return ModelList(data=[info])

    # ------------------------------------------------------------------ text generation

    def causal_engine() -> CausalLMEngine:
        from kubetune_trainer.serve.engines import CausalLMEngine

        engine = state.engine
        assert isinstance(engine, CausalLMEngine)  # the admission middleware checked the task
        return engine

    def params_for(
        req: ChatCompletionRequest | CompletionRequest, engine: CausalLMEngine, prompt_len: int
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
        engine: CausalLMEngine, ids: list[int], params: GenerationParams
    ) -> Any:
        cancel = threading.Event()
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(gen_executor, engine.generate, ids, params, cancel)
        finally:
            cancel.set()  # if this request was cancelled, stop the worker at its next token

    def count_tokens(endpoint: str, prompt: int, completion: int) -> None:
        metrics.tokens_in.labels(endpoint).inc(prompt)
        metrics.tokens_out.labels(endpoint).inc(completion)

    async def stream_generation(
        endpoint: str,
        engine: CausalLMEngine,
        ids: list[int],
        params: GenerationParams,
        chunk: Any,
        include_usage: bool,
    ) -> AsyncIterator[str]:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[str | None] = asyncio.Queue()
        cancel = threading.Event()

        def push(text: str | None) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, text)

        def work() -> Any:
            try:
                return engine.generate(ids, params, cancel, on_text=push)
            finally:
                push(None)  # end of stream, also after an error

        future = loop.run_in_executor(gen_executor, work)
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
                yield sse(
                    {
                        "error": {
                            "message": f"internal error: {type(exc).__name__}",
                            "type": "internal_error",
                            "param": None,
                            "code": None,
                        }
                    }
                )
                yield SSE_DONE
                return
            tail = "" if stopped else buffer.flush()
            if tail:
                yield chunk(tail, None)
            yield chunk(None, "stop" if stopped else result.finish_reason)
            usage = Usage(
                prompt_tokens=result.prompt_tokens,
                completion_tokens=result.completion_tokens,
                total_tokens=result.prompt_tokens + result.completion_tokens,
            )
            count_tokens(endpoint, usage.prompt_tokens, usage.completion_tokens)
            if include_usage:
                yield chunk(None, None, usage=usage)
            yield SSE_DONE
        finally:
            cancel.set()  # client went away or we are done: free the worker

    def encode_chat_or_400(engine: CausalLMEngine, req: ChatCompletionRequest) -> list[int]:
        from jinja2 import TemplateError

        messages = [{"role": m.role, "content": m.text()} for m in req.messages]
        try:
            return engine.encode_chat(messages)
        except TemplateError as exc:  # e.g. a template that insists roles alternate
            raise ApiError(
                400, f"messages: rejected by the chat template: {exc}", param="messages"
            ) from None

    @app.post("/v1/chat/completions", response_model=ChatCompletionResponse)
    async def chat_completions(req: ChatCompletionRequest) -> Response:
        check_model(req.model)
        engine = causal_engine()
        ids = await asyncio.to_thread(encode_chat_or_400, engine, req)
        params = params_for(req, engine, len(ids))
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        endpoint = "/v1/chat/completions"
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)

            def chunk(
                text: str | None, finish: Any, role: bool = False, usage: Usage | None = None
            ) -> str:
                delta = ChatDelta(role="assistant" if role else None, content=text)
                choices = [] if usage else [ChatChunkChoice(delta=delta, finish_reason=finish)]
                return sse(
                    ChatCompletionChunk(
                        id=rid,
                        created=created,
                        model=settings.model_name,
                        choices=choices,
                        usage=usage,
                    )
                )

            return StreamingResponse(
                stream_generation(endpoint, engine, ids, params, chunk, include_usage),
                media_type="text/event-stream",
                headers={"cache-control": "no-cache"},
            )
        result = await run_generation(engine, ids, params)
        count_tokens(endpoint, result.prompt_tokens, result.completion_tokens)
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
            usage=Usage(
                prompt_tokens=result.prompt_tokens,
                completion_tokens=result.completion_tokens,
                total_tokens=result.prompt_tokens + result.completion_tokens,
            ),
        )
        return JSONResponse(body.model_dump(mode="json"))

    @app.post("/v1/completions", response_model=CompletionResponse)
    async def completions(req: CompletionRequest) -> Response:
        check_model(req.model)
        engine = causal_engine()
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
        all_params = [params_for(req, engine, len(ids)) for ids in encoded]
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        endpoint = "/v1/completions"
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)

            def chunk(
                text: str | None, finish: Any, role: bool = False, usage: Usage | None = None
            ) -> str:
                if role:  # completions have no role chunk; send an empty first chunk
                    text = ""
                choices = (
                    [] if usage else [CompletionChunkChoice(text=text or "", finish_reason=finish)]
                )
                return sse(
                    CompletionChunk(
                        id=rid,
                        created=created,
                        model=settings.model_name,
                        choices=choices,
                        usage=usage,
                    )
                )

            return StreamingResponse(
                stream_generation(
                    endpoint, engine, encoded[0], all_params[0], chunk, include_usage
                ),
                media_type="text/event-stream",
                headers={"cache-control": "no-cache"},
            )
        choices: list[CompletionChoice] = []
        prompt_tokens = completion_tokens = 0
        for i, (ids, params) in enumerate(zip(encoded, all_params, strict=True)):
            result = await run_generation(engine, ids, params)
            choices.append(
                CompletionChoice(index=i, text=result.text, finish_reason=result.finish_reason)
            )
            prompt_tokens += result.prompt_tokens
            completion_tokens += result.completion_tokens
        count_tokens(endpoint, prompt_tokens, completion_tokens)
        body = CompletionResponse(
            id=rid,
            created=created,
            model=settings.model_name,
            choices=choices,
            usage=Usage(
                prompt_tokens=prompt_tokens,
                completion_tokens=completion_tokens,
                total_tokens=prompt_tokens + completion_tokens,
            ),
        )
        return JSONResponse(body.model_dump(mode="json"))

    # ------------------------------------------------------------------- classification

    @app.post("/v1/classify")
    async def classify(req: ClassifyRequest) -> ClassifyResponse:
        check_model(req.model)
        texts = req.texts()
        if len(texts) > settings.max_texts_per_request:
            raise ApiError(
                400,
                f"text: {len(texts)} texts is over the limit of "
                f"{settings.max_texts_per_request} per request",
                param="text",
            )
        batcher, engine = state.batcher, state.engine
        assert batcher is not None and engine is not None
        classifier: ClassifierEngine = engine  # type: ignore[assignment]
        outputs = await batcher.classify(texts)
        threshold = state.threshold()
        escalation_label = state.card.escalation_label if state.card else None
        results = []
        for out in outputs:
            best = max(range(len(out.probabilities)), key=out.probabilities.__getitem__)
            label, score = classifier.labels[best], out.probabilities[best]
            reason: Any = None
            if escalation_label is not None and label == escalation_label:
                reason = "escalation_label"
            elif score < threshold:
                reason = "low_confidence"
            results.append(
                Classification(
                    label=label,
                    score=score,
                    scores=dict(zip(classifier.labels, out.probabilities, strict=True)),
                    escalate=reason is not None,
                    escalation_reason=reason,
                )
            )
        tokens = sum(out.tokens for out in outputs)
        metrics.tokens_in.labels("/v1/classify").inc(tokens)
        return ClassifyResponse(
            model=settings.model_name,
            results=results,
            usage=Usage(prompt_tokens=tokens, total_tokens=tokens),
        )

    return app


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
