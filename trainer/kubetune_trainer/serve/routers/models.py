"""/v1/models: the one model this server serves, with its card once known."""

from __future__ import annotations

from fastapi import APIRouter, Request

from kubetune_trainer.serve.deps import context
from kubetune_trainer.serve.schemas import ModelInfo, ModelList

router = APIRouter()


@router.get("/v1/models")
async def models(request: Request) -> ModelList:
    state = context(request.app).state
    card = state.card
    info = ModelInfo(
        id=state.settings.model_name,
        created=state.created,
        task=card.task if card else None,
        ready=state.ready,
        card=card.model_dump(mode="json") if card else None,
    )
    return ModelList(data=[info])
