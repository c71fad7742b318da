"""Rank pods: one pod per node, named <job>-rank-<i>, run as one gang.

Pure: FineTuneJob -> plain dicts. Names are fixed so a retried handler re-applies the same pods.
"""

from __future__ import annotations

from typing import Any

from kubetune_operator.api.models import API_VERSION, KIND, FineTuneJob
from kubetune_operator.builders.configmap import CONFIG_KEY, config_map_name

Obj = dict[str, Any]

APP_LABEL = "app.kubernetes.io/name"
APP = "kubetune"
JOB_LABEL = "kubetune.io/job"
ROLE_LABEL = "kubetune.io/role"
RANK_LABEL = "kubetune.io/rank"
ATTEMPT_LABEL = "kubetune.io/attempt"

DEFAULT_IMAGE = "ghcr.io/kubetune/trainer"
MASTER_PORT = 29500
METRICS_PORT = 9400
# Long enough for the trainer to save and upload a final checkpoint after SIGTERM.
TERMINATION_GRACE_SECONDS = 300
CONTAINER = "trainer"


def default_image(version: str) -> str:
    return f"{DEFAULT_IMAGE}:{version}"


def job_labels(name: str, role: str | None = None) -> dict[str, str]:
    labels = {APP_LABEL: APP, JOB_LABEL: name}
    if role:
        labels[ROLE_LABEL] = role
    return labels


def rank_selector(name: str) -> str:
    """Label selector (string form) for every rank pod of a job."""
    return f"{JOB_LABEL}={name},{ROLE_LABEL}=rank"


def pod_name(job: str, rank: int) -> str:
    return f"{job}-rank-{rank}"


def headless_service_name(job: str) -> str:
    return f"{job}-ranks"


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


NODE_FAILURE_TAINTS = ("node.kubernetes.io/not-ready", "node.kubernetes.io/unreachable")


def node_failure_tolerations(job: FineTuneJob) -> list[dict[str, Any]]:
    """Bound how long a rank waits on a failed node. Kubernetes evicts after 300 s by default;
    a gang stalls that whole time, so evict sooner and let the restart resume elsewhere. A
    user toleration for the same taint wins."""
    own = {t.key for t in job.spec.resources.tolerations}
    if None in own:  # a wildcard toleration: the user chose how taints apply
        return []
    seconds = job.spec.run_policy.node_failure_toleration_seconds
    return [
        {"key": key, "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": seconds}
        for key in NODE_FAILURE_TAINTS
        if key not in own
    ]


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


def trainer_command(job: FineTuneJob) -> list[str]:
    res = job.spec.resources
    if res.nodes == 1 and res.gpus_per_node <= 1:
        # One process: no rendezvous needed, the trainer sets up a world of one itself.
        return ["python", "-m", "kubetune_trainer", "train"]
    # $(VAR) is expanded by the kubelet from the container env.
    return [
        "python",
        "-m",
        "torch.distributed.run",
        "--nnodes",
        "$(NNODES)",
        "--node_rank",
        "$(NODE_RANK)",
        "--nproc_per_node",
        "$(NPROC_PER_NODE)",
        "--master_addr",
        "$(MASTER_ADDR)",
        "--master_port",
        "$(MASTER_PORT)",
        "-m",
        "kubetune_trainer",
        "train",
    ]


def build_rank_pod(
    job: FineTuneJob,
    rank: int,
    attempt: int,
    *,
    image: str,
    owner: Obj | None = None,
) -> Obj:
    """Rank `rank` of the gang for restart attempt `attempt`."""
    name = job.metadata.name
    namespace = job.metadata.namespace or "default"
    res = job.spec.resources
    labels = {
        **job_labels(name, "rank"),
        RANK_LABEL: str(rank),
        ATTEMPT_LABEL: str(attempt),
    }
    limits: Obj = {"cpu": res.cpu, "memory": res.memory}
    if res.gpus_per_node > 0:
        limits["nvidia.com/gpu"] = str(res.gpus_per_node)
    service = headless_service_name(name)
    env: list[Obj] = [
        {"name": "MASTER_ADDR", "value": f"{pod_name(name, 0)}.{service}"},
        {"name": "MASTER_PORT", "value": str(MASTER_PORT)},
        {"name": "NNODES", "value": str(res.nodes)},
        {"name": "NODE_RANK", "value": str(rank)},
        {"name": "NPROC_PER_NODE", "value": str(max(1, res.gpus_per_node))},
        {
            "name": "KUBETUNE_CONFIG",
            "valueFrom": {"configMapKeyRef": {"name": config_map_name(name), "key": CONFIG_KEY}},
        },
        pod_ip_env(),
        *storage_env(job),
    ]
    spec: Obj = {
        "restartPolicy": "Never",
        "hostname": pod_name(name, rank),
        "subdomain": service,
        "terminationGracePeriodSeconds": TERMINATION_GRACE_SECONDS,
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "securityContext": pod_security_context(),
        "containers": [
            {
                "name": CONTAINER,
                "image": image,
                "command": trainer_command(job),
                "env": env,
                "ports": [
                    {"name": "metrics", "containerPort": METRICS_PORT, "protocol": "TCP"},
                    {"name": "rendezvous", "containerPort": MASTER_PORT, "protocol": "TCP"},
                ],
                "resources": {"requests": dict(limits), "limits": limits},
                "terminationMessagePolicy": "FallbackToLogsOnError",
                "securityContext": container_security_context(),
            }
        ],
    }
    if res.node_selector:
        spec["nodeSelector"] = dict(res.node_selector)
    spec["tolerations"] = [t.wire() for t in res.tolerations] + node_failure_tolerations(job)
    if res.priority_class_name:
        spec["priorityClassName"] = res.priority_class_name
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": metadata(pod_name(name, rank), namespace, labels, owner),
        "spec": spec,
    }


def build_rank_pods(
    job: FineTuneJob, attempt: int, *, image: str, owner: Obj | None = None
) -> list[Obj]:
    return [
        build_rank_pod(job, rank, attempt, image=image, owner=owner)
        for rank in range(job.spec.resources.nodes)
    ]
