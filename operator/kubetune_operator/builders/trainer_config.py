"""FineTuneJob -> TrainerConfig: the one place that maps the cluster spec onto the trainer."""

from __future__ import annotations

from kubetune_operator.api.models import FineTuneJob, StorageSpec
from kubetune_trainer.config import (
    JobIdentity,
    OutputSpec,
    TelemetrySpec,
    TrainerConfig,
    TrainingSpec,
)


def run_prefix(storage: StorageSpec, namespace: str, name: str) -> str:
    """s3://bucket/prefix/<namespace>/<job>: where everything durable for the run lives."""
    prefix = storage.prefix.strip("/")
    key = f"{prefix}/{namespace}/{name}" if prefix else f"{namespace}/{name}"
    return f"s3://{storage.bucket}/{key}"


def trainer_config(
    job: FineTuneJob,
    *,
    output_uri: str | None = None,
    telemetry: TelemetrySpec | None = None,
) -> TrainerConfig:
    """The trainer's view of a job. `output_uri` overrides the store (local runs)."""
    namespace = job.metadata.namespace or "default"
    if output_uri is None:
        if job.spec.storage is None:
            raise ValueError("spec.storage is required to run on a cluster")
        output_uri = run_prefix(job.spec.storage, namespace, job.metadata.name)
    storage = job.spec.storage
    shared = {name: getattr(job.spec, name) for name in TrainingSpec.model_fields}
    return TrainerConfig(
        **shared,
        job=JobIdentity(name=job.metadata.name, namespace=namespace),
        output=OutputSpec(
            uri=output_uri,
            s3_endpoint=storage.endpoint if storage else None,
            s3_region=storage.region if storage else "us-east-1",
        ),
        telemetry=telemetry or TelemetrySpec(),
    )
