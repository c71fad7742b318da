"""kopf handler for kubetune pods: a rank changing state wakes its job's reconcile at once."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import kopf

from kubetune_operator import kube
from kubetune_operator.builders.common import APP, APP_LABEL, JOB_LABEL
from kubetune_operator.reconcile.executor import InvalidSpec, reconcile
from kubetune_operator.reconcile.state import JOBS

log = logging.getLogger("kubetune.handlers")


@kopf.on.event("", "v1", "pods", labels={APP_LABEL: APP, JOB_LABEL: kopf.PRESENT})
def on_pod_event(namespace: str | None, labels: Mapping[str, str], **_: Any) -> None:
    # Event handlers are fire-and-forget: a failed pass is repeated by the job's timer.
    ns, job = namespace or "default", labels[JOB_LABEL]
    try:
        # The pod's memo is not the job's: find the job's state (and its lock) by name.
        reconcile(ns, job, "pod", JOBS.get(ns, job))
    except InvalidSpec:
        pass
    except (kube.ApiError, OSError) as err:
        log.warning("reconcile after a pod event failed: %s", err)
