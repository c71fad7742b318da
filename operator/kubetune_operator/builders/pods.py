"""Rank pods: one pod per node, named <job>-rank-<i>, run as one gang.

Pure: FineTuneJob -> plain dicts. Names are fixed so a retried handler re-applies the same pods.
"""

from __future__ import annotations

from kubetune_operator.api.models import FineTuneJob
from kubetune_operator.builders.common import (
    ATTEMPT_LABEL,
    CONFIG_KEY,
    RANK_LABEL,
    Obj,
    config_map_name,
    container_security_context,
    headless_service_name,
    job_labels,
    metadata,
    namespace_of,
    pod_ip_env,
    pod_name,
    pod_security_context,
    storage_env,
)

DEFAULT_IMAGE = "ghcr.io/kubetune/trainer"
MASTER_PORT = 29500
METRICS_PORT = 9400
# The trainer reads these: the gang attempt (checkpoints carry it; the store's fence refuses a
# stale attempt) and the grace it has for a SIGTERM checkpoint (it warns when saves take longer).
ATTEMPT_ENV = "KUBETUNE_ATTEMPT"
GRACE_ENV = "KUBETUNE_CHECKPOINT_GRACE_SECONDS"
STALL_ENV = "KUBETUNE_STALL_TIMEOUT_SECONDS"  # the trainer's progress watchdog
CONTAINER = "trainer"


def default_image(version: str) -> str:
    return f"{DEFAULT_IMAGE}:{version}"


NODE_FAILURE_TAINTS = ("node.kubernetes.io/not-ready", "node.kubernetes.io/unreachable")


def node_failure_tolerations(job: FineTuneJob) -> list[Obj]:
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


def _rank_env(job: FineTuneJob, rank: int, attempt: int) -> list[Obj]:
    name, res = job.metadata.name, job.spec.resources
    return [
        {"name": "MASTER_ADDR", "value": f"{pod_name(name, 0)}.{headless_service_name(name)}"},
        {"name": "MASTER_PORT", "value": str(MASTER_PORT)},
        {"name": "NNODES", "value": str(res.nodes)},
        {"name": "NODE_RANK", "value": str(rank)},
        {"name": "NPROC_PER_NODE", "value": str(max(1, res.gpus_per_node))},
        {"name": ATTEMPT_ENV, "value": str(attempt)},
        {"name": GRACE_ENV, "value": str(job.spec.run_policy.checkpoint_grace_seconds)},
        {"name": STALL_ENV, "value": str(job.spec.run_policy.stall_timeout_seconds)},
        {
            "name": "KUBETUNE_CONFIG",
            "valueFrom": {"configMapKeyRef": {"name": config_map_name(name), "key": CONFIG_KEY}},
        },
        pod_ip_env(),
        *storage_env(job),
    ]


def _trainer_container(job: FineTuneJob, rank: int, attempt: int, image: str) -> Obj:
    res = job.spec.resources
    limits: Obj = {"cpu": res.cpu, "memory": res.memory}
    if res.gpus_per_node > 0:
        limits["nvidia.com/gpu"] = str(res.gpus_per_node)
    return {
        "name": CONTAINER,
        "image": image,
        "command": trainer_command(job),
        "env": _rank_env(job, rank, attempt),
        "ports": [
            {"name": "metrics", "containerPort": METRICS_PORT, "protocol": "TCP"},
            {"name": "rendezvous", "containerPort": MASTER_PORT, "protocol": "TCP"},
        ],
        "resources": {"requests": dict(limits), "limits": limits},
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "securityContext": container_security_context(),
    }


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
    res = job.spec.resources
    labels = {**job_labels(name, "rank"), RANK_LABEL: str(rank), ATTEMPT_LABEL: str(attempt)}
    spec: Obj = {
        "restartPolicy": "Never",
        "hostname": pod_name(name, rank),
        "subdomain": headless_service_name(name),
        # Long enough for the trainer to save and upload a final checkpoint after SIGTERM.
        "terminationGracePeriodSeconds": job.spec.run_policy.checkpoint_grace_seconds,
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "securityContext": pod_security_context(),
        "containers": [_trainer_container(job, rank, attempt, image)],
    }
    if res.node_selector:
        spec["nodeSelector"] = dict(res.node_selector)
    spec["tolerations"] = [t.wire() for t in res.tolerations] + node_failure_tolerations(job)
    if res.priority_class_name:
        spec["priorityClassName"] = res.priority_class_name
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": metadata(pod_name(name, rank), namespace_of(job), labels, owner),
        "spec": spec,
    }


def build_rank_pods(
    job: FineTuneJob, attempt: int, *, image: str, owner: Obj | None = None
) -> list[Obj]:
    return [
        build_rank_pod(job, rank, attempt, image=image, owner=owner)
        for rank in range(job.spec.resources.nodes)
    ]
