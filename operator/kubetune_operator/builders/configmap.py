"""The trainer's config as a ConfigMap: the pods read it through a configMapKeyRef."""

from __future__ import annotations

import json
from typing import Any

from kubetune_operator.api.models import FineTuneJob
from kubetune_operator.builders.trainer_config import trainer_config
from kubetune_trainer.config import TelemetrySpec

CONFIG_KEY = "config.json"
TERMINATION_LOG = "/dev/termination-log"


def config_map_name(job: str) -> str:
    return f"{job}-config"


def build_config_map(job: FineTuneJob, *, owner: dict[str, Any] | None = None) -> dict[str, Any]:
    """TrainerConfig JSON (output = the run prefix). Holds no secret: keys come from env refs."""
    from kubetune_operator.builders.pods import job_labels, metadata

    cfg = trainer_config(job, telemetry=TelemetrySpec(termination_log=TERMINATION_LOG))
    name = job.metadata.name
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": metadata(
            config_map_name(name), job.metadata.namespace or "default", job_labels(name), owner
        ),
        "data": {CONFIG_KEY: json.dumps(cfg.wire(), sort_keys=True)},
    }
