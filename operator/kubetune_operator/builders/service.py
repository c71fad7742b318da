"""The headless Service that gives rank pods stable DNS names (<job>-rank-<i>.<job>-ranks)."""

from __future__ import annotations

from kubetune_operator.api.models import FineTuneJob
from kubetune_operator.builders.common import (
    Obj,
    headless_service_name,
    job_labels,
    metadata,
    namespace_of,
)
from kubetune_operator.builders.pods import MASTER_PORT, METRICS_PORT


def build_headless_service(job: FineTuneJob, *, owner: Obj | None = None) -> Obj:
    name = job.metadata.name
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": metadata(
            headless_service_name(name), namespace_of(job), job_labels(name), owner
        ),
        "spec": {
            "clusterIP": "None",
            # Rank 0 must resolve before it is Ready: the rendezvous happens during startup.
            "publishNotReadyAddresses": True,
            "selector": job_labels(name, "rank"),
            "ports": [
                {"name": "rendezvous", "port": MASTER_PORT, "targetPort": MASTER_PORT},
                {"name": "metrics", "port": METRICS_PORT, "targetPort": METRICS_PORT},
            ],
        },
    }
