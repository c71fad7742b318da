"""Operator entry point: `kopf run -m kubetune_operator.main [--namespace NS ...]`.

Liveness: pass `--liveness=http://0.0.0.0:8080/healthz` to kopf run.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import kopf

from kubetune_operator import kube, metrics
from kubetune_operator.handlers import jobs, pods  # noqa: F401 - registers the handlers

ANNOTATION_PREFIX = "kubetune.io"


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
    # Kopf's own bookkeeping lives in annotations; .status belongs to FineTuneJobStatus.
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(
        prefix=ANNOTATION_PREFIX
    )
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=ANNOTATION_PREFIX, key="last-handled-configuration"
    )
    settings.persistence.finalizer = f"{ANNOTATION_PREFIX}/finalizer"
    # Events come from the reconcile plan (posted by kube.emit_event); kopf posts only warnings.
    settings.posting.enabled = True
    settings.posting.level = logging.WARNING
    settings.posting.reporting_component = "kubetune-operator"
    # Leader election: one active operator per peering name. Not mandatory, so a cluster
    # without kopf's peering CRDs still works (standalone, with a log line).
    settings.peering.name = "kubetune"
    settings.peering.mandatory = False
    settings.peering.priority = int(os.environ.get("KUBETUNE_OPERATOR_PRIORITY", "0"))
    settings.execution.max_workers = 8
    settings.watching.server_timeout = 300
    kube.configure_from_env()
    metrics.serve()
