"""The trainer's config as a ConfigMap: the pods read it through a configMapKeyRef."""

from __future__ import annotations

import json

from kubetune_operator.api.models import FineTuneJob
from kubetune_operator.builders.common import (
    CONFIG_KEY,
    Obj,
    config_map_name,
    job_labels,
    metadata,
    namespace_of,
)
from kubetune_operator.builders.trainer_config import trainer_config
from kubetune_trainer.config import TelemetrySpec

__all__ = ["CONFIG_KEY", "TERMINATION_LOG", "build_config_map", "config_map_name"]

TERMINATION_LOG = "/dev/termination-log"


def build_config_map(job: FineTuneJob, *, owner: Obj | None = None) -> Obj:
    """TrainerConfig JSON (output = the run prefix). Holds no secret: keys come from env refs."""
    cfg = trainer_config(job, telemetry=TelemetrySpec(termination_log=TERMINATION_LOG))
    name = job.metadata.name
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": metadata(config_map_name(name), namespace_of(job), job_labels(name), owner),
        "data": {CONFIG_KEY: json.dumps(cfg.wire(), sort_keys=True)},
    }
