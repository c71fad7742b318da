"""The inference Deployment + Service `<job>-serve`, created once the evaluation gates pass."""

from __future__ import annotations

from kubetune_operator.api.models import FineTuneJob
from kubetune_operator.builders.common import (
    Obj,
    container_security_context,
    job_labels,
    metadata,
    namespace_of,
    pod_ip_env,
    pod_security_context,
    serve_name,
    storage_env,
)
from kubetune_operator.builders.trainer_config import run_prefix

__all__ = ["build_deployment", "build_serve_service", "endpoint", "model_uri", "serve_name"]

SERVE_CONTAINER = "server"


def model_uri(job: FineTuneJob) -> str:
    if job.spec.storage is None:
        raise ValueError("spec.storage is required to serve a model on a cluster")
    prefix = run_prefix(job.spec.storage, namespace_of(job), job.metadata.name)
    return f"{prefix}/model"


def endpoint(job: FineTuneJob) -> str:
    ns = namespace_of(job)
    return f"http://{serve_name(job.metadata.name)}.{ns}.svc:{job.spec.inference.port}"


def _labels(job: FineTuneJob) -> dict[str, str]:
    return job_labels(job.metadata.name, "serve")


def _server_container(job: FineTuneJob, image: str) -> Obj:
    inf = job.spec.inference
    limits: Obj = {"cpu": inf.resources.cpu, "memory": inf.resources.memory}
    if inf.resources.gpus > 0:
        limits["nvidia.com/gpu"] = str(inf.resources.gpus)
    port = inf.port
    return {
        "name": SERVE_CONTAINER,
        "image": image,
        # Bind the pod IP, not 0.0.0.0: the same on a real cluster, and pods that share a host
        # network (the test cluster) do not collide on the port.
        "command": [
            "python",
            "-m",
            "kubetune_trainer",
            "serve",
            "--model",
            model_uri(job),
            "--host",
            "$(POD_IP)",
            "--port",
            str(port),
            "--escalation-threshold",
            str(inf.escalation_threshold),
        ],
        "env": [pod_ip_env(), *storage_env(job)],
        "ports": [{"name": "http", "containerPort": port, "protocol": "TCP"}],
        "readinessProbe": {
            "httpGet": {"path": "/readyz", "port": port},
            "periodSeconds": 2,
            "failureThreshold": 3,
        },
        "livenessProbe": {
            "httpGet": {"path": "/healthz", "port": port},
            # Loading a model from S3 takes a while; do not kill a replica that is still loading.
            "initialDelaySeconds": 60,
            "periodSeconds": 10,
            "failureThreshold": 6,
        },
        "resources": {"requests": dict(limits), "limits": limits},
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "securityContext": container_security_context(),
    }


def build_deployment(job: FineTuneJob, *, image: str, owner: Obj | None = None) -> Obj:
    labels = _labels(job)
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": metadata(serve_name(job.metadata.name), namespace_of(job), labels, owner),
        "spec": {
            "replicas": job.spec.inference.replicas,
            "selector": {"matchLabels": labels},
            "template": {
                "metadata": {"labels": labels},
                "spec": {
                    "automountServiceAccountToken": False,
                    "enableServiceLinks": False,
                    "securityContext": pod_security_context(),
                    "containers": [_server_container(job, image)],
                },
            },
        },
    }


def build_serve_service(job: FineTuneJob, *, owner: Obj | None = None) -> Obj:
    labels = _labels(job)
    port = job.spec.inference.port
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": metadata(serve_name(job.metadata.name), namespace_of(job), labels, owner),
        "spec": {
            "selector": labels,
            "ports": [{"name": "http", "port": port, "targetPort": port, "protocol": "TCP"}],
        },
    }
