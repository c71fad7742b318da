"""FineTuneJob models: defaults, camelCase wire format, cross-field checks, secrets."""

from __future__ import annotations

from typing import Any

import pytest

from kubetune_operator.api.models import FineTuneJob
from kubetune_operator.api.validation import SpecError, validate_document
from kubetune_operator.builders.trainer_config import trainer_config
from kubetune_trainer.config import TrainerConfig


def job(**spec: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "task": "causal-lm",
        "model": {"source": "builtin:tiny-llama"},
        "data": {"train": "s3://data/train.jsonl", "format": "chat"},
    }
    base.update(spec)
    return {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": "demo", "namespace": "team-a"},
        "spec": base,
    }


def errors_of(doc: dict[str, Any]) -> list[str]:
    with pytest.raises(SpecError) as info:
        validate_document(doc)
    return [str(e) for e in info.value.errors]


def test_defaults_follow_fine_tuning_advice() -> None:
    spec = validate_document(job()).spec
    assert spec.hyperparameters.learning_rate == 2e-5
    assert spec.hyperparameters.per_device_batch_size == 16
    assert spec.hyperparameters.epochs == 3
    assert spec.method == "full"
    assert spec.resources.nodes == 1


def test_wire_format_is_camel_case_and_round_trips() -> None:
    parsed = validate_document(job(hyperparameters={"learningRate": 1e-4}))
    wire = parsed.spec.wire()
    assert wire["hyperparameters"]["learningRate"] == 1e-4
    assert "learning_rate" not in wire["hyperparameters"]
    again = FineTuneJob.model_validate({**job(), "spec": wire})
    assert again.spec == parsed.spec


def test_every_field_has_a_description() -> None:
    missing = []
    seen: set[type] = set()

    def walk(model: type, path: str) -> None:
        if model in seen:
            return
        seen.add(model)
        for name, field in model.model_fields.items():  # type: ignore[attr-defined]
            if not field.description:
                missing.append(f"{path}.{name}")
            for arg in (*getattr(field.annotation, "__args__", ()), field.annotation):
                if isinstance(arg, type) and hasattr(arg, "model_fields"):
                    walk(arg, f"{path}.{name}")

    walk(FineTuneJob, "FineTuneJob")
    walk(TrainerConfig, "TrainerConfig")
    assert not missing


@pytest.mark.parametrize(
    ("spec", "path"),
    [
        ({"method": "qlora", "resources": {"gpusPerNode": 0}}, "spec.resources.gpusPerNode"),
        ({"data": {"train": "x.jsonl", "format": "classification"}}, "spec.data.format"),
        ({"hyperparameters": {"perDeviceBatchSize": 0}}, "spec.hyperparameters.perDeviceBatchSize"),
        ({"hyperparameters": {"learningRate": "fast"}}, "spec.hyperparameters.learningRate"),
        ({"deepspeed": {"zeroStage": 4}}, "spec.deepspeed.zeroStage"),
        ({"storage": {"bucket": "b", "accessKeyId": "AKIA"}}, "spec.storage"),
        ({"storage": {"bucket": "runs", "password": "hunter2"}}, "spec.storage.password"),
        ({"resources": {"memory": "lots"}}, "spec.resources.memory"),
        ({"model": {"source": "ftp://x/y"}}, "spec.model.source"),
        (
            {"data": {"train": "a", "format": "text", "validationSplit": 0.5, "testSplit": 0.45}},
            "spec.data.validationSplit",
        ),
        (
            {"data": {"train": "a", "format": "chat", "overlong": "chunk", "chunkStride": 900}},
            "spec.data.chunkStride",
        ),
    ],
)
def test_bad_specs_name_the_field(spec: dict[str, Any], path: str) -> None:
    messages = errors_of(job(**spec))
    assert any(m.startswith(path) for m in messages), messages


def test_inline_secret_value_is_never_echoed() -> None:
    messages = errors_of(job(storage={"bucket": "runs", "secretAccessKey": "CANARY-123"}))
    assert all("CANARY-123" not in m for m in messages)


def test_wrong_api_version_and_kind() -> None:
    doc = job()
    doc["apiVersion"], doc["kind"] = "batch/v1", "Job"
    messages = errors_of(doc)
    assert any(m.startswith("apiVersion") for m in messages)
    assert any(m.startswith("kind") for m in messages)


def test_trainer_config_carries_the_run_prefix() -> None:
    parsed = validate_document(
        job(storage={"bucket": "runs", "prefix": "kt/", "endpoint": "http://127.0.0.1:9000"})
    )
    cfg = trainer_config(parsed)
    assert cfg.output.uri == "s3://runs/kt/team-a/demo"
    assert cfg.output.s3_endpoint == "http://127.0.0.1:9000"
    assert cfg.job.namespace == "team-a"
    # The trainer contract round-trips through JSON, as it does through the ConfigMap.
    assert TrainerConfig.model_validate_json(cfg.model_dump_json(by_alias=True)) == cfg


def test_cluster_run_without_storage_is_refused() -> None:
    with pytest.raises(ValueError, match=r"spec\.storage"):
        trainer_config(validate_document(job()))
