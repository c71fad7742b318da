"""/v1/classify: labels with scores, and whether a person should take over (escalation)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, Request

from kubetune_trainer.serve.deps import check_model, classifier, context
from kubetune_trainer.serve.errors import ApiError
from kubetune_trainer.serve.schemas import (
    Classification,
    ClassifyRequest,
    ClassifyResponse,
    Usage,
)

if TYPE_CHECKING:
    from kubetune_trainer.serve.engines import ClassifyOutput

ENDPOINT = "/v1/classify"

router = APIRouter()


def to_classification(
    out: ClassifyOutput, labels: list[str], threshold: float, escalation_label: str | None
) -> Classification:
    best = max(range(len(out.probabilities)), key=out.probabilities.__getitem__)
    label, score = labels[best], out.probabilities[best]
    reason: Any = None
    if escalation_label is not None and label == escalation_label:
        reason = "escalation_label"
    elif score < threshold:
        reason = "low_confidence"
    return Classification(
        label=label,
        score=score,
        scores=dict(zip(labels, out.probabilities, strict=True)),
        escalate=reason is not None,
        escalation_reason=reason,
    )


@router.post(ENDPOINT)
async def classify(req: ClassifyRequest, request: Request) -> ClassifyResponse:
    ctx = context(request.app)
    state, settings = ctx.state, ctx.state.settings
    check_model(settings, req.model)
    texts = req.texts()
    if len(texts) > settings.max_texts_per_request:
        raise ApiError(
            400,
            f"text: {len(texts)} texts is over the limit of "
            f"{settings.max_texts_per_request} per request",
            param="text",
        )
    batcher, engine = classifier(state)
    outputs = await batcher.classify(texts)
    threshold = state.threshold()
    escalation_label = state.card.escalation_label if state.card else None
    results = [to_classification(o, engine.labels, threshold, escalation_label) for o in outputs]
    tokens = sum(out.tokens for out in outputs)
    ctx.metrics.tokens_in.labels(ENDPOINT).inc(tokens)
    return ClassifyResponse(
        model=settings.model_name,
        results=results,
        usage=Usage(prompt_tokens=tokens, total_tokens=tokens),
    )
