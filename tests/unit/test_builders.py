"""Builders are pure: FineTuneJob -> manifest dicts with fixed names, no secrets inline."""

from __future__ import annotations

import ast
import json
from pathlib import Path
from typing import Any

from kubetune_operator.api.models import FineTuneJob
from kubetune_operator.builders import common, inference, pods
from kubetune_operator.builders.configmap import CONFIG_KEY, build_config_map
from kubetune_operator.builders.service import build_headless_service

OWNER = {
    "apiVersion": "kubetune.io/v1alpha1",
    "kind": "FineTuneJob",
    "metadata": {"name": "demo", "namespace": "ns", "uid": "u-1"},
}


def _job(**spec: Any) -> FineTuneJob:
    base: dict[str, Any] = {
        "task": "causal-lm",
        "model": {"source": "builtin:tiny-llama"},
        "data": {"train": "s3://data/train.jsonl", "format": "text"},
        "storage": {
            "bucket": "runs",
            "prefix": "kt",
            "endpoint": "http://127.0.0.1:9000",
            "credentialsSecretRef": {"name": "s3-creds"},
        },
    }
    base.update(spec)
    return FineTuneJob.model_validate(
        {
            "apiVersion": "kubetune.io/v1alpha1",
            "kind": "FineTuneJob",
            "metadata": {"name": "demo", "namespace": "ns"},
            "spec": base,
        }
    )


def _env(container: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e for e in container["env"]}


def test_configmap_holds_trainer_config_with_run_prefix() -> None:
    cm = build_config_map(_job(), owner=OWNER)
    assert cm["metadata"]["name"] == "demo-config"
    assert cm["metadata"]["ownerReferences"][0]["uid"] == "u-1"
    cfg = json.loads(cm["data"][CONFIG_KEY])
    assert cfg["output"]["uri"] == "s3://runs/kt/ns/demo"
    assert cfg["output"]["s3Endpoint"] == "http://127.0.0.1:9000"
    assert cfg["telemetry"]["terminationLog"] == "/dev/termination-log"
    assert cfg["job"] == {"name": "demo", "namespace": "ns"}
    assert "s3-creds" not in cm["data"][CONFIG_KEY]


def test_headless_service_selects_ranks() -> None:
    svc = build_headless_service(_job())
    assert svc["metadata"]["name"] == "demo-ranks"
    assert svc["spec"]["clusterIP"] == "None"
    assert svc["spec"]["publishNotReadyAddresses"] is True
    assert svc["spec"]["selector"] == {
        "app.kubernetes.io/name": "kubetune",
        "kubetune.io/job": "demo",
        "kubetune.io/role": "rank",
    }


def test_single_rank_pod_runs_trainer_directly() -> None:
    pod = pods.build_rank_pod(_job(), 0, 1, image="img:1", owner=OWNER)
    assert pod["metadata"]["name"] == "demo-rank-0"
    labels = pod["metadata"]["labels"]
    assert labels["kubetune.io/rank"] == "0" and labels["kubetune.io/attempt"] == "1"
    spec = pod["spec"]
    assert spec["hostname"] == "demo-rank-0" and spec["subdomain"] == "demo-ranks"
    assert spec["restartPolicy"] == "Never"
    assert spec["terminationGracePeriodSeconds"] >= 60
    assert spec["securityContext"]["runAsNonRoot"] is True
    c = spec["containers"][0]
    assert c["command"] == ["python", "-m", "kubetune_trainer", "train"]
    assert c["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    assert c["securityContext"]["allowPrivilegeEscalation"] is False
    assert c["terminationMessagePolicy"] == "FallbackToLogsOnError"
    assert c["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert {"name": "metrics", "containerPort": 9400, "protocol": "TCP"} in c["ports"]
    env = _env(c)
    assert env["MASTER_ADDR"]["value"] == "demo-rank-0.demo-ranks"
    assert env["KUBETUNE_CONFIG"]["valueFrom"]["configMapKeyRef"]["name"] == "demo-config"
    assert env["AWS_ACCESS_KEY_ID"]["valueFrom"]["secretKeyRef"] == {
        "name": "s3-creds",
        "key": "AWS_ACCESS_KEY_ID",
    }
    assert env["AWS_ENDPOINT_URL"]["value"] == "http://127.0.0.1:9000"
    assert all("value" not in e for k, e in env.items() if k.startswith("AWS_") and "KEY" in k)


def test_multi_node_pods_use_torchrun_and_scheduling_fields() -> None:
    job = _job(
        resources={
            "nodes": 2,
            "gpusPerNode": 0,
            "nodeSelector": {"pool": "gpu"},
            "tolerations": [{"key": "gpu", "operator": "Exists"}],
            "priorityClassName": "high",
        }
    )
    gang = pods.build_rank_pods(job, 3, image="img")
    assert [p["metadata"]["name"] for p in gang] == ["demo-rank-0", "demo-rank-1"]
    c = gang[1]["spec"]["containers"][0]
    assert c["command"][:3] == ["python", "-m", "torch.distributed.run"]
    assert "$(NODE_RANK)" in c["command"]
    env = _env(c)
    assert env["NODE_RANK"]["value"] == "1" and env["NNODES"]["value"] == "2"
    assert env["NPROC_PER_NODE"]["value"] == "1"
    assert "nvidia.com/gpu" not in c["resources"]["limits"]
    assert gang[1]["spec"]["nodeSelector"] == {"pool": "gpu"}
    assert gang[1]["spec"]["tolerations"][0] == {"key": "gpu", "operator": "Exists"}
    assert gang[1]["spec"]["priorityClassName"] == "high"
    assert "ownerReferences" not in gang[0]["metadata"]


def test_ranks_leave_a_failed_node_after_the_configured_toleration() -> None:
    def node_tolerations(job: Any) -> dict[str, Any]:
        tol = pods.build_rank_pod(job, 0, 1, image="i")["spec"]["tolerations"]
        return {t["key"]: t for t in tol if t["key"].startswith("node.kubernetes.io/")}

    default = node_tolerations(_job())
    assert set(default) == {"node.kubernetes.io/not-ready", "node.kubernetes.io/unreachable"}
    assert {(t["effect"], t["tolerationSeconds"]) for t in default.values()} == {("NoExecute", 60)}
    custom = node_tolerations(_job(runPolicy={"nodeFailureTolerationSeconds": 15}))
    assert {t["tolerationSeconds"] for t in custom.values()} == {15}
    # The user's own toleration for one of the taints wins over ours.
    own = {"key": "node.kubernetes.io/unreachable", "operator": "Exists", "effect": "NoExecute"}
    mixed = node_tolerations(_job(resources={"tolerations": [own]}))
    assert mixed["node.kubernetes.io/unreachable"] == own
    assert mixed["node.kubernetes.io/not-ready"]["tolerationSeconds"] == 60
    wildcard = _job(resources={"tolerations": [{"operator": "Exists"}]})
    assert pods.build_rank_pod(wildcard, 0, 1, image="i")["spec"]["tolerations"] == [
        {"operator": "Exists"}
    ]


def test_builders_are_deterministic() -> None:
    job = _job()
    assert pods.build_rank_pod(job, 0, 1, image="i") == pods.build_rank_pod(job, 0, 1, image="i")


def test_inference_deployment_and_service() -> None:
    job = _job(inference={"enabled": True, "replicas": 2, "port": 8081})
    dep = inference.build_deployment(job, image="img", owner=OWNER)
    assert dep["metadata"]["name"] == "demo-serve"
    assert dep["spec"]["replicas"] == 2
    c = dep["spec"]["template"]["spec"]["containers"][0]
    assert c["command"][:4] == ["python", "-m", "kubetune_trainer", "serve"]
    assert c["command"][c["command"].index("--model") + 1] == "s3://runs/kt/ns/demo/model"
    assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": 8081}
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert _env(c)["AWS_SECRET_ACCESS_KEY"]["valueFrom"]["secretKeyRef"]["name"] == "s3-creds"
    assert c["securityContext"]["runAsNonRoot"] is True
    svc = inference.build_serve_service(job)
    assert svc["metadata"]["name"] == "demo-serve"
    assert svc["spec"]["selector"] == dep["spec"]["selector"]["matchLabels"]
    assert inference.endpoint(job) == "http://demo-serve.ns.svc:8081"


def _builder_imports() -> dict[str, set[str]]:
    """builders module -> the builders modules it imports (at any depth, lazy ones too)."""
    root = Path(pods.__file__).parent
    graph: dict[str, set[str]] = {}
    for path in root.glob("*.py"):
        mod = f"kubetune_operator.builders.{path.stem}"
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            deps |= {n for n in names if n.startswith("kubetune_operator.builders.")}
        graph[mod] = deps - {mod}
    return graph


def test_builders_have_no_import_cycle() -> None:
    graph = _builder_imports()
    assert "kubetune_operator.builders.common" in graph
    assert graph["kubetune_operator.builders.common"] == set()
    done: set[str] = set()

    def visit(mod: str, path: tuple[str, ...]) -> None:
        assert mod not in path, " -> ".join((*path, mod))
        if mod in done:
            return
        for dep in graph.get(mod, set()):
            visit(dep, (*path, mod))
        done.add(mod)

    for mod in graph:
        visit(mod, ())


def test_child_names_and_owner_come_from_common() -> None:
    job = _job(resources={"nodes": 2}, inference={"enabled": True})
    made = [
        build_config_map(job, owner=OWNER),
        build_headless_service(job, owner=OWNER),
        *pods.build_rank_pods(job, 1, image="i", owner=OWNER),
        inference.build_deployment(job, image="i", owner=OWNER),
        inference.build_serve_service(job, owner=OWNER),
    ]
    assert [(m["kind"], m["metadata"]["name"]) for m in made] == [
        ("ConfigMap", common.config_map_name("demo")),
        ("Service", common.headless_service_name("demo")),
        ("Pod", common.pod_name("demo", 0)),
        ("Pod", common.pod_name("demo", 1)),
        ("Deployment", common.serve_name("demo")),
        ("Service", common.serve_name("demo")),
    ]
    assert [m["metadata"]["name"] for m in made] == [
        "demo-config",
        "demo-ranks",
        "demo-rank-0",
        "demo-rank-1",
        "demo-serve",
        "demo-serve",
    ]
    for m in made:
        assert m["metadata"]["ownerReferences"] == [common.owner_reference(OWNER)]
        assert m["metadata"]["labels"][common.JOB_LABEL] == "demo"
