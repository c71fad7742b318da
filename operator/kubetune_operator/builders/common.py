"""What every builder shares: child names, labels, metadata with the owner reference, and the
pod pieces (security contexts, env) both the rank pods and the inference server use.

Names are fixed functions of the job name (and, for rank pods, the rank), so a retried pass
re-applies the same objects and never duplicates them.
"""

from __future__ import annotations

from typing import Any

from kubetune_operator.api.models import API_VERSION, KIND, FineTuneJob

Obj = dict[str, Any]

APP_LABEL = "app.kubernetes.io/name"
APP = "kubetune"
JOB_LABEL = "kubetune.io/job"
ROLE_LABEL = "kubetune.io/role"
RANK_LABEL = "kubetune.io/rank"
ATTEMPT_LABEL = "kubetune.io/attempt"
# The key in the ConfigMap that holds the trainer config; the rank pods read it by this key.
CONFIG_KEY = "config.json"

# --------------------------------------------------------------------------- names


def config_map_name(job: str) -> str:
    return f"{job}-config"


def headless_service_name(job: str) -> str:
    return f"{job}-ranks"


def pod_name(job: str, rank: int) -> str:
    return f"{job}-rank-{rank}"


def serve_name(job: str) -> str:
    return f"{job}-serve"


def namespace_of(job: FineTuneJob) -> str:
    return job.metadata.namespace or "default"


# --------------------------------------------------------------------------- labels, metadata


def job_labels(name: str, role: str | None = None) -> dict[str, str]:
    labels = {APP_LABEL: APP, JOB_LABEL: name}
    if role:
        labels[ROLE_LABEL] = role
    return labels


def rank_selector(name: str) -> str:
    """Label selector (string form) for every rank pod of a job."""
    return f"{JOB_LABEL}={name},{ROLE_LABEL}=rank"


def owner_reference(owner: Obj) -> Obj:
    """A controller ownerReference to the FineTuneJob: the garbage collector removes children."""
    meta = owner["metadata"]
    return {
        "apiVersion": owner.get("apiVersion", API_VERSION),
        "kind": owner.get("kind", KIND),
        "name": meta["name"],
        "uid": meta["uid"],
        "controller": True,
        "blockOwnerDeletion": True,
    }


def metadata(name: str, namespace: str, labels: dict[str, str], owner: Obj | None) -> Obj:
    meta: Obj = {"name": name, "namespace": namespace, "labels": dict(labels)}
    if owner is not None:
        meta["ownerReferences"] = [owner_reference(owner)]
    return meta


# --------------------------------------------------------------------------- pod pieces


def pod_security_context() -> Obj:
    """The `restricted` Pod Security Standard, pod level."""
    return {
        "runAsNonRoot": True,
        "runAsUser": 1000,
        "runAsGroup": 1000,
        "fsGroup": 1000,
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def container_security_context() -> Obj:
    return {
        "runAsNonRoot": True,
        "runAsUser": 1000,
        "allowPrivilegeEscalation": False,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def storage_env(job: FineTuneJob) -> list[Obj]:
    """S3 endpoint/region as values; keys only as secretKeyRef (never inline)."""
    storage = job.spec.storage
    env: list[Obj] = []
    if storage is None:
        return env
    if storage.endpoint:
        env.append({"name": "AWS_ENDPOINT_URL", "value": storage.endpoint})
    env.append({"name": "AWS_DEFAULT_REGION", "value": storage.region})
    ref = storage.credentials_secret_ref
    if ref is not None:
        for var, key in (
            ("AWS_ACCESS_KEY_ID", ref.access_key_id_key),
            ("AWS_SECRET_ACCESS_KEY", ref.secret_access_key_key),
        ):
            env.append({"name": var, "valueFrom": {"secretKeyRef": {"name": ref.name, "key": key}}})
    return env


def pod_ip_env() -> Obj:
    return {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}
