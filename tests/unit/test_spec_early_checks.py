"""Spec checks that need no data: metrics the task never computes and built-in model fit.

Each check runs in the shared pydantic model, so `kubetune validate`, the operator's admission
(validate_document) and the trainer's own config load all reject the same specs, before a pod
starts or a row is read.
"""

from __future__ import annotations

from typing import Any

import pytest

from kubetune_operator.api.validation import SpecError, validate_document
from kubetune_trainer.config import (
    BUILTIN_MODEL_TASKS,
    TASK_METRICS,
    VALIDATION_METRICS,
    computed_metrics,
)

CLS = {
    "task": "sequence-classification",
    "model": {"source": "builtin:minilm"},
    "data": {"train": "s3://data/train.jsonl", "format": "classification"},
}
LM = {
    "task": "causal-lm",
    "model": {"source": "builtin:tiny-llama"},
    "data": {"train": "s3://data/train.jsonl", "format": "chat"},
}


def doc(spec: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": "demo", "namespace": "team-a"},
        "spec": {**spec, **extra},
    }


def only_error(d: dict[str, Any]) -> tuple[str, str]:
    with pytest.raises(SpecError) as info:
        validate_document(d)
    errors = info.value.errors
    assert len(errors) == 1, errors
    return errors[0].path, errors[0].message


@pytest.mark.parametrize(
    ("spec", "extra", "path", "accepted"),
    [
        (
            CLS,
            {"earlyStopping": {"enabled": True, "metric": "bleu"}},
            "spec.earlyStopping.metric",
            "loss, accuracy, f1, f1_macro",
        ),
        (
            LM,
            {"earlyStopping": {"metric": "accuracy"}},
            "spec.earlyStopping.metric",
            "loss, perplexity",
        ),
        (
            CLS,
            {"evaluation": {"gates": [{"metric": "bleu", "op": ">", "value": 1}]}},
            "spec.evaluation.gates[0].metric",
            "loss, samples, accuracy, f1, f1_macro",
        ),
        (
            LM,
            {
                "data": {"train": "x.jsonl", "format": "text"},
                "evaluation": {
                    "gates": [
                        {"metric": "loss", "op": "<", "value": 9},
                        {"metric": "bleu", "op": ">", "value": 1},
                    ]
                },
            },
            "spec.evaluation.gates[1].metric",
            "loss, samples, perplexity",
        ),
        (
            LM,
            {"evaluation": {"metrics": ["loss", "accuracy"]}},
            "spec.evaluation.metrics",
            "loss, perplexity, bleu",
        ),
        (
            LM,
            {"model": {"source": "builtin:gpt5"}},
            "spec.model.source",
            "builtin:minilm, builtin:smollm2, builtin:tiny-llama",
        ),
        (
            LM,
            {"model": {"source": "builtin:minilm"}},
            "spec.model.source",
            "builtin:smollm2, builtin:tiny-llama",
        ),
    ],
    ids=[
        "es-bleu-cls",
        "es-accuracy-lm",
        "gate-bleu-cls",
        "gate-bleu-text",
        "metrics-accuracy-lm",
        "unknown-builtin",
        "encoder-for-lm",
    ],
)
def test_rejected_with_field_and_accepted_values(
    spec: dict[str, Any], extra: dict[str, Any], path: str, accepted: str
) -> None:
    got_path, message = only_error(doc(spec, **extra))
    assert got_path == path
    assert f"accepted: {accepted}" in message or f"accepted for this task: {accepted}" in message


@pytest.mark.parametrize(
    "extra",
    [
        {"earlyStopping": {"enabled": True, "metric": "f1"}},
        {"earlyStopping": {"enabled": True, "metric": "f1_macro", "mode": "max"}},
        {
            "evaluation": {
                "gates": [
                    {"metric": "f1", "op": ">=", "value": 0.5},
                    {"metric": "f1_macro", "op": ">=", "value": 0.5},
                    {"metric": "accuracy", "op": ">=", "value": 0.5},
                ]
            }
        },
    ],
)
def test_classification_metrics_accepted(extra: dict[str, Any]) -> None:
    validate_document(doc(CLS, **extra))


@pytest.mark.parametrize(
    ("spec", "es", "accepted"),
    [
        (CLS, {"metric": "accuracy", "mode": "min"}, "accepted: 'max', or leave mode unset"),
        (LM, {"metric": "loss", "mode": "max"}, "accepted: 'min', or leave mode unset"),
    ],
)
def test_early_stopping_mode_must_fit_the_metric(
    spec: dict[str, Any], es: dict[str, Any], accepted: str
) -> None:
    path, message = only_error(doc(spec, earlyStopping=es))
    assert path == "spec.earlyStopping.mode"
    assert accepted in message


def test_early_stopping_mode_defaults_to_the_metric_direction() -> None:
    job = validate_document(doc(CLS, earlyStopping={"metric": "accuracy"}))
    assert job.spec.early_stopping.mode is None  # the trainer takes the metric's direction
    validate_document(doc(CLS, earlyStopping={"metric": "accuracy", "mode": "max"}))


def test_bleu_gate_accepted_on_chat_data() -> None:
    validate_document(
        doc(
            LM,
            evaluation={"gates": [{"metric": "bleu", "op": ">", "value": 1}]},
            earlyStopping={"enabled": True, "metric": "perplexity"},
        )
    )


def test_tables_agree_with_the_trainer() -> None:
    # The torch-free tables in config must match what the trainer code knows.
    from kubetune_trainer.models.builtin import BUILTIN_MODELS

    assert {n: m.task for n, m in BUILTIN_MODELS.items()} == BUILTIN_MODEL_TASKS
    for task, names in VALIDATION_METRICS.items():
        assert set(names) <= set(computed_metrics(task, "chat", ["bleu"]))
    assert set(TASK_METRICS["causal-lm"]) <= set(computed_metrics("causal-lm", "chat", ["bleu"]))
