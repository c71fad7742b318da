"""OpenAI-style error bodies and the exception handlers that produce them."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from kubetune_trainer.serve.schemas import ErrorDetail, ErrorResponse

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


def error_response(status: int, message: str, type_: str, param: str | None = None) -> JSONResponse:
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


async def on_validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    message, param = _validation_message(exc.errors(), _MAIN_FIELD.get(request.url.path))
    return error_response(400, message, "invalid_request_error", param)


async def on_http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    type_ = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
    message = f"{request.method} {request.url.path}: {exc.detail}"
    return error_response(exc.status_code, message, type_)


async def on_api_error(_: Request, exc: ApiError) -> JSONResponse:
    return error_response(exc.status, exc.message, exc.type, exc.param)


async def on_internal_error(_: Request, exc: Exception) -> JSONResponse:
    log.exception("internal error")
    return error_response(500, f"internal error: {type(exc).__name__}", "internal_error")


def install_exception_handlers(app: FastAPI) -> None:
    app.exception_handler(RequestValidationError)(on_validation_error)
    app.exception_handler(StarletteHTTPException)(on_http_error)
    app.exception_handler(ApiError)(on_api_error)
    app.exception_handler(Exception)(on_internal_error)
