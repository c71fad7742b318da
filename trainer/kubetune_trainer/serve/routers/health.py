"""Liveness, readiness and Prometheus metrics: never limited, so probes work under overload."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from kubetune_trainer.serve.deps import context
from kubetune_trainer.serve.schemas import HealthResponse

router = APIRouter()


@router.get("/healthz")
async def healthz() -> HealthResponse:
    return HealthResponse(status="ok")


@router.get("/readyz", response_model=HealthResponse)
async def readyz(request: Request) -> JSONResponse:
    state = context(request.app).state
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


@router.get("/metrics")
async def prometheus(request: Request) -> Response:
    return Response(context(request.app).metrics.render(), media_type=CONTENT_TYPE_LATEST)
