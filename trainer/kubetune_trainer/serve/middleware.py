"""ASGI middleware that turns requests away before any body parsing or model work.

Pure ASGI (not BaseHTTPMiddleware) so streaming responses pass through untouched and the
in-flight count covers a whole SSE stream.
"""

from __future__ import annotations

import json

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from kubetune_trainer.serve.metrics import ServeMetrics
from kubetune_trainer.serve.schemas import ErrorDetail, ErrorResponse
from kubetune_trainer.serve.state import TASK_ENDPOINTS, ServerState


def error_body(
    message: str, type_: str, param: str | None = None, code: str | None = None
) -> bytes:
    # The one error shape (schemas.ErrorResponse), as the route handlers' errors send it.
    detail = ErrorDetail(message=message, type=type_, param=param, code=code)
    return json.dumps(ErrorResponse(error=detail).model_dump(mode="json")).encode()


async def send_error(
    send: Send,
    status: int,
    message: str,
    type_: str,
    param: str | None = None,
    headers: list[tuple[bytes, bytes]] | None = None,
) -> None:
    body = error_body(message, type_, param)
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                *(headers or []),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


class AdmissionMiddleware:
    """For inference endpoints: 404 for the other task, 503 while loading, 429 when full.

    Health, readiness, metrics and the model list are never limited, so probes keep working
    under overload.
    """

    def __init__(self, app: ASGIApp, state: ServerState, metrics: ServeMetrics) -> None:
        self.app = app
        self.state = state
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        task = TASK_ENDPOINTS.get(scope["path"]) if scope["type"] == "http" else None
        if task is None:
            await self.app(scope, receive, send)
            return
        state = self.state
        card = state.card
        if card is not None and card.task != task:
            await send_error(
                send,
                404,
                f"{scope['path']} is not available: this server's model serves {card.task}, "
                f"and {scope['path']} is for {task} models",
                "not_found_error",
            )
            return
        if state.engine is None:
            detail = state.load_error or "the model is still loading"
            await send_error(
                send,
                503,
                f"not ready: {detail}",
                "service_unavailable",
                headers=[(b"retry-after", b"1")],
            )
            return
        # No await between the check and the increment: the event loop cannot interleave here.
        if state.in_flight >= state.settings.max_concurrency:
            await send_error(
                send,
                429,
                f"server is at its limit of {state.settings.max_concurrency} concurrent "
                "requests; retry later",
                "rate_limit_error",
                headers=[(b"retry-after", b"1")],
            )
            return
        state.in_flight += 1
        self.metrics.in_flight.set(state.in_flight)
        try:
            await self.app(scope, receive, send)
        finally:
            state.in_flight -= 1
            self.metrics.in_flight.set(state.in_flight)


class BodyLimitMiddleware:
    """413 for bodies over ``max_bytes``, decided from Content-Length or while streaming in.

    The body is read chunk by chunk with a running total, so an oversized upload is refused
    after at most ``max_bytes`` were buffered; the buffered body is then replayed to the app.
    """

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        ctype = headers.get(b"content-type", b"").split(b";")[0].strip().lower()
        if ctype in (b"", b"application/x-www-form-urlencoded", b"text/plain"):
            # Every endpoint takes JSON: `curl -d '{...}'` labels it a form; read it as JSON.
            rest = [(k, v) for k, v in scope["headers"] if k != b"content-type"]
            scope = {**scope, "headers": [*rest, (b"content-type", b"application/json")]}
        declared = headers.get(b"content-length")
        if declared is not None:
            try:
                length = int(declared)
            except ValueError:
                await send_error(
                    send, 400, "invalid Content-Length header", "invalid_request_error"
                )
                return
            if length > self.max_bytes:
                await self._too_large(send)
                return
        chunks: list[bytes] = []
        total = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            total += len(chunk)
            if total > self.max_bytes:
                await self._too_large(send)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # later calls wait for the disconnect, as the app expects

        await self.app(scope, replay, send)

    async def _too_large(self, send: Send) -> None:
        await send_error(
            send,
            413,
            f"request body is larger than the limit of {self.max_bytes} bytes",
            "invalid_request_error",
        )
