"""Proof that the test cluster behaves like Kubernetes where the operator depends on it.

Each test gets its own namespace; waits poll with timeouts (``wait_for``), never bare sleeps.
"""

from __future__ import annotations

import http.client
import socket
import textwrap
import urllib.request
from typing import Any

import pytest

from tests.cluster import faults
from tests.cluster.controlplane import ControlPlane, free_port, wait_for

pytestmark = pytest.mark.cluster

Obj = dict[str, Any]


def _pod_ready(pod: Obj) -> bool:
    return any(
        c["type"] == "Ready" and c["status"] == "True"
        for c in pod.get("status", {}).get("conditions") or []
    )


def _container_status(pod: Obj, name: str | None = None) -> Obj:
    statuses = pod.get("status", {}).get("containerStatuses") or [{}]
    if name is None:
        return dict(statuses[0])
    return dict(next(s for s in statuses if s["name"] == name))


def _pod(name: str, command: list[str], **spec: Any) -> Obj:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name},
        "spec": {
            "restartPolicy": "Never",
            "containers": [{"name": "main", "image": "kubetune/test", "command": command}],
            **spec,
        },
    }


def test_nodes_are_fake_gpu_nodes(control_plane: ControlPlane) -> None:
    nodes = control_plane.get_json("/api/v1/nodes")["items"]
    assert {n["metadata"]["name"] for n in nodes} >= {"gpu-node-0", "gpu-node-1"}
    for n in nodes:
        assert n["status"]["allocatable"]["nvidia.com/gpu"] == "8"
        assert n["metadata"]["labels"]["nvidia.com/gpu.present"] == "true"
        assert not [
            t for t in n["spec"].get("taints") or [] if t["key"].startswith("node.kubernetes.io/")
        ]


def test_deployment_pods_ready_and_serve_http(control_plane: ControlPlane, namespace: str) -> None:
    cp = control_plane
    labels = {"app": "web"}
    cp.apply(
        {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": {"name": "web"},
            "spec": {
                "replicas": 2,
                "selector": {"matchLabels": labels},
                "template": {
                    "metadata": {"labels": labels},
                    "spec": {
                        "containers": [
                            {
                                "name": "web",
                                "image": "python:3.11",
                                "command": [
                                    "python",
                                    "-m",
                                    "http.server",
                                    "8080",
                                    "--bind",
                                    "$(POD_IP)",
                                ],
                                "env": [
                                    {
                                        "name": "POD_IP",
                                        "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}},
                                    }
                                ],
                                "ports": [{"name": "http", "containerPort": 8080}],
                                "readinessProbe": {
                                    "httpGet": {"path": "/", "port": "http"},
                                    "periodSeconds": 1,
                                },
                                "resources": {"limits": {"nvidia.com/gpu": 1}},
                            }
                        ]
                    },
                },
            },
        },
        namespace,
    )
    cp.apply(
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": "web"},
            "spec": {"selector": labels, "ports": [{"port": 8080, "targetPort": 8080}]},
        },
        namespace,
    )

    def available() -> bool:
        dep = cp.get_json(f"/apis/apps/v1/namespaces/{namespace}/deployments/web")
        return bool(dep.get("status", {}).get("availableReplicas") == 2)

    wait_for("deployment web available", available, 90)
    pods = cp.pods(namespace, "app=web")
    assert len(pods) == 2
    ips = set()
    for pod in pods:
        assert pod["status"]["phase"] == "Running"
        assert _pod_ready(pod)
        ip = pod["status"]["podIP"]
        ips.add(ip)
        with urllib.request.urlopen(f"http://{ip}:8080/", timeout=5) as resp:
            assert resp.status == 200
    assert len(ips) == 2, "each pod gets its own loopback IP"
    # The Service name resolves to a ready pod (via /etc/hosts).
    wait_for("service DNS name", lambda: socket.gethostbyname(f"web.{namespace}.svc") in ips, 30)
    # kubectl logs goes apiserver -> node agent.
    name = pods[0]["metadata"]["name"]
    wait_for(
        "GET lines in kubectl logs",
        lambda: "GET / HTTP" in cp.kubectl("logs", "-n", namespace, name).stdout,
        30,
    )


def test_job_runs_to_completion_with_config(control_plane: ControlPlane, namespace: str) -> None:
    cp = control_plane
    cp.apply(
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"name": "cfg"},
            "data": {"greeting": "hello from a configmap", "mode": "fast"},
        },
        namespace,
    )
    cp.apply(
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": "sec"},
            "stringData": {"token": "s3cret"},
        },
        namespace,
    )
    script = textwrap.dedent("""
        import os, pathlib
        print("greeting:", pathlib.Path("/etc/kt/greeting").read_text())
        print("mode:", os.environ["MODE"], "token:", os.environ["TOKEN"])
        print("pod:", os.environ["MY_POD"], os.environ["MY_NS"], os.environ["NODE"])
        pathlib.Path("/scratch/x").write_text("ok")
        print("scratch:", pathlib.Path("/scratch/x").read_text())
    """)
    cp.apply(
        {
            "apiVersion": "batch/v1",
            "kind": "Job",
            "metadata": {"name": "hello"},
            "spec": {
                "backoffLimit": 0,
                "template": {
                    "spec": {
                        "restartPolicy": "Never",
                        "containers": [
                            {
                                "name": "hello",
                                "image": "kubetune/trainer:test",
                                "command": ["python", "-c", script],
                                "env": [
                                    {
                                        "name": "MODE",
                                        "valueFrom": {
                                            "configMapKeyRef": {"name": "cfg", "key": "mode"}
                                        },
                                    },
                                    {
                                        "name": "TOKEN",
                                        "valueFrom": {
                                            "secretKeyRef": {"name": "sec", "key": "token"}
                                        },
                                    },
                                    {
                                        "name": "MY_POD",
                                        "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}},
                                    },
                                    {
                                        "name": "MY_NS",
                                        "valueFrom": {
                                            "fieldRef": {"fieldPath": "metadata.namespace"}
                                        },
                                    },
                                    {
                                        "name": "NODE",
                                        "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}},
                                    },
                                ],
                                "volumeMounts": [
                                    {"name": "cfg", "mountPath": "/etc/kt"},
                                    {"name": "scratch", "mountPath": "/scratch"},
                                ],
                            }
                        ],
                        "volumes": [
                            {"name": "cfg", "configMap": {"name": "cfg"}},
                            {"name": "scratch", "emptyDir": {}},
                        ],
                    }
                },
            },
        },
        namespace,
    )

    def succeeded() -> bool:
        job = cp.get_json(f"/apis/batch/v1/namespaces/{namespace}/jobs/hello")
        if job.get("status", {}).get("failed"):
            raise AssertionError(f"job failed: {job['status']}")
        return bool(job.get("status", {}).get("succeeded") == 1)

    wait_for("job hello to succeed", succeeded, 90)
    (pod,) = cp.pods(namespace, "job-name=hello")
    name = pod["metadata"]["name"]
    st = _container_status(pod)
    assert pod["status"]["phase"] == "Succeeded"
    assert st["state"]["terminated"]["exitCode"] == 0
    assert st["state"]["terminated"]["reason"] == "Completed"
    out = cp.pod_log(namespace, name, "hello")
    assert "greeting: hello from a configmap" in out
    assert "mode: fast token: s3cret" in out
    assert f"pod: {name} {namespace} {pod['spec']['nodeName']}" in out
    assert "scratch: ok" in out


def test_killed_pod_reports_137_and_termination_message(
    control_plane: ControlPlane, namespace: str
) -> None:
    cp = control_plane
    script = (
        "import time; open('/dev/termination-log', 'w').write('checkpoint saved at step 7');"
        "print('up', flush=True); time.sleep(3600)"
    )
    cp.apply(_pod("victim", ["python", "-c", script]), namespace)
    cp.wait_pod_phase(namespace, "victim", ["Running"], 60)
    wait_for("victim to print", lambda: "up" in cp.pod_log(namespace, "victim"), 30)
    faults.kill_pod_process(cp, namespace, "victim")
    pod = cp.wait_pod_phase(namespace, "victim", ["Failed"], 30)
    term = _container_status(pod)["state"]["terminated"]
    assert term["exitCode"] == 137
    assert term["reason"] == "Error"
    assert term["message"] == "checkpoint saved at step 7"


def test_restart_policy_always_restarts_killed_container(
    control_plane: ControlPlane, namespace: str
) -> None:
    cp = control_plane
    script = (
        "import os, time; open(os.environ['KUBETUNE_TERMINATION_LOG'], 'w').write('bye');"
        "time.sleep(3600)"
    )
    cp.apply(_pod("phoenix", ["python", "-c", script], restartPolicy="Always"), namespace)
    cp.wait_pod_phase(namespace, "phoenix", ["Running"], 60)
    wait_for(
        "termination message written",
        lambda: (cp.pod_dir(namespace, "phoenix") / "termination" / "main").read_text(),
        30,
    )
    st = faults.kill_pod_process(cp, namespace, "phoenix")
    assert st["restartCount"] == 1

    def running_again() -> Obj | None:
        s = _container_status(cp.pod(namespace, "phoenix"))
        return s if "running" in s["state"] and s["restartCount"] == 1 else None

    st = wait_for("container restarted", running_again, 30)
    assert st["lastState"]["terminated"]["exitCode"] == 137
    assert st["lastState"]["terminated"]["message"] == "bye"


def test_graceful_delete_sends_sigterm(control_plane: ControlPlane, namespace: str) -> None:
    cp = control_plane
    script = textwrap.dedent("""
        import signal, sys, time
        def bye(*_):
            print("got SIGTERM", flush=True)
            sys.exit(0)
        signal.signal(signal.SIGTERM, bye)
        print("up", flush=True)
        time.sleep(3600)
    """)
    cp.apply(_pod("graceful", ["python", "-c", script]), namespace)
    cp.wait_pod_phase(namespace, "graceful", ["Running"], 60)
    wait_for("graceful to print", lambda: "up" in cp.pod_log(namespace, "graceful"), 30)
    cp.kubectl("delete", "pod", "-n", namespace, "graceful", "--wait=false")
    wait_for(
        "pod object removed",
        lambda: cp.request("GET", f"/api/v1/namespaces/{namespace}/pods/graceful")[0] == 404,
        30,
    )
    assert "got SIGTERM" in cp.pod_log(namespace, "graceful")


def test_torchrun_rendezvous_over_headless_service(
    control_plane: ControlPlane, namespace: str
) -> None:
    cp = control_plane
    script = textwrap.dedent("""
        import torch, torch.distributed as dist
        dist.init_process_group("gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
        t = torch.tensor([float(rank + 1)])
        dist.all_reduce(t)
        print(f"RESULT rank={rank} world={world} sum={t.item()}", flush=True)
        dist.destroy_process_group()
    """)
    cp.apply(
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"name": "script"},
            "data": {"allreduce.py": script},
        },
        namespace,
    )
    cp.apply(
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": "trainers"},
            "spec": {
                "clusterIP": "None",
                "selector": {"app": "trainers"},
                "publishNotReadyAddresses": True,
                "ports": [{"name": "c10d", "port": 29500}],
            },
        },
        namespace,
    )
    port = free_port()
    for rank in range(2):
        pod = _pod(
            f"trainer-{rank}",
            [
                "python",
                "-m",
                "torch.distributed.run",
                "--nnodes=2",
                "--nproc_per_node=1",
                f"--node_rank={rank}",
                "--master_addr=trainer-0.trainers",
                f"--master_port={port}",
                "--max_restarts=0",
                "/scripts/allreduce.py",
            ],
            hostname=f"trainer-{rank}",
            subdomain="trainers",
            volumes=[{"name": "script", "configMap": {"name": "script"}}],
        )
        pod["metadata"]["labels"] = {"app": "trainers"}
        pod["spec"]["containers"][0]["volumeMounts"] = [{"name": "script", "mountPath": "/scripts"}]
        pod["spec"]["containers"][0]["env"] = [{"name": "OMP_NUM_THREADS", "value": "1"}]
        cp.apply(pod, namespace)
    for rank in range(2):
        cp.wait_pod_phase(namespace, f"trainer-{rank}", ["Succeeded"], 240)
    for rank in range(2):
        assert f"RESULT rank={rank} world=2 sum=3.0" in cp.pod_log(namespace, f"trainer-{rank}")


def test_rbac_refuses_unprivileged_service_account(
    control_plane: ControlPlane, namespace: str
) -> None:
    cp = control_plane
    cp.apply(
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "nobody"}}, namespace
    )
    token = cp.service_account_token(namespace, "nobody")
    status, body = cp.request("GET", f"/api/v1/namespaces/{namespace}/pods", token=token)
    assert status == 403, body
    assert f"system:serviceaccount:{namespace}:nobody" in body["message"]
    status, _ = cp.request("GET", "/api/v1/namespaces/kube-system/secrets", token=token)
    assert status == 403
    status, _ = cp.request("GET", "/api/v1/namespaces", token="not-a-token")
    assert status == 401
    # Granting a Role makes the same token work: RBAC, not a broken token, refused it.
    cp.kubectl("create", "role", "pod-reader", "-n", namespace, "--verb=list", "--resource=pods")
    cp.kubectl(
        "create",
        "rolebinding",
        "nobody-reads",
        "-n",
        namespace,
        "--role=pod-reader",
        f"--serviceaccount={namespace}:nobody",
    )
    wait_for(
        "role binding to take effect",
        lambda: cp.request("GET", f"/api/v1/namespaces/{namespace}/pods", token=token)[0] == 200,
        30,
    )


def test_node_not_ready_fault(control_plane: ControlPlane) -> None:
    cp = control_plane
    node = cp.nodes[-1]
    faults.mark_node_not_ready(cp, node)
    try:

        def tainted() -> bool:
            n = cp.get_json(f"/api/v1/nodes/{node}")
            return any(
                t["key"] == "node.kubernetes.io/not-ready" for t in n["spec"].get("taints") or []
            )

        wait_for("node lifecycle controller to taint the node", tainted, 60)
    finally:
        faults.mark_node_ready(cp, node)


def test_agent_survives_apiserver_restart(control_plane: ControlPlane, namespace: str) -> None:
    cp = control_plane
    cp.apply(_pod("before", ["python", "-c", "import time; time.sleep(3600)"]), namespace)
    cp.wait_pod_phase(namespace, "before", ["Running"], 60)
    faults.restart_apiserver(cp)
    # A pod created after the restart is still run (the agent re-watched) ...
    cp.apply(_pod("after", ["python", "-c", "print('after restart')"]), namespace)
    cp.wait_pod_phase(namespace, "after", ["Succeeded"], 90)
    # ... and the one from before is still running and managed.
    assert cp.pod(namespace, "before")["status"]["phase"] == "Running"
    faults.kill_pod_process(cp, namespace, "before")
    assert cp.wait_pod_phase(namespace, "before", ["Failed"], 30)


def test_probe_of_unready_server(control_plane: ControlPlane, namespace: str) -> None:
    """A readiness probe that never passes keeps the pod Running but not Ready."""
    cp = control_plane
    pod = _pod("unready", ["python", "-c", "import time; time.sleep(3600)"])
    pod["spec"]["containers"][0]["readinessProbe"] = {"tcpSocket": {"port": 9}, "periodSeconds": 1}
    cp.apply(pod, namespace)
    cp.wait_pod_phase(namespace, "unready", ["Running"], 60)
    wait_for(
        "a probe round",
        lambda: (cp.pod(namespace, "unready")["status"].get("containerStatuses") or [{}])[0].get(
            "started"
        ),
        30,
    )
    assert not _pod_ready(cp.pod(namespace, "unready"))
    with pytest.raises((ConnectionError, OSError)):
        c = http.client.HTTPConnection(
            cp.pod(namespace, "unready")["status"]["podIP"], 9, timeout=2
        )
        c.request("GET", "/")


def test_pod_runs_with_its_service_account_identity(
    control_plane: ControlPlane, namespace: str
) -> None:
    """Pods get a KUBECONFIG with their ServiceAccount token, so RBAC applies to them."""
    cp = control_plane
    script = textwrap.dedent("""
        from kubernetes import client, config
        config.load_kube_config()
        v1 = client.CoreV1Api()
        print("configmaps:", len(v1.list_namespaced_config_map(NS).items), flush=True)
        try:
            v1.list_namespaced_secret(NS)
        except client.ApiException as e:
            print("secrets:", e.status, flush=True)
    """).replace("NS", repr(namespace))
    cp.kubectl(
        "create", "role", "cm-reader", "-n", namespace, "--verb=list", "--resource=configmaps"
    )
    cp.kubectl(
        "create",
        "rolebinding",
        "default-cm",
        "-n",
        namespace,
        "--role=cm-reader",
        f"--serviceaccount={namespace}:default",
    )
    cp.apply(_pod("whoami", ["python", "-c", script]), namespace)
    cp.wait_pod_phase(namespace, "whoami", ["Succeeded"], 90)
    out = cp.pod_log(namespace, "whoami")
    assert "configmaps:" in out
    assert "secrets: 403" in out


def test_init_containers_and_on_failure_restarts(
    control_plane: ControlPlane, namespace: str
) -> None:
    """Init containers run first, in order; OnFailure restarts a failing container."""
    cp = control_plane
    pod = _pod(
        "flaky",
        ["sh", "-c", "echo run >> /shared/trace; [ $(grep -c run /shared/trace) -ge 2 ] || exit 3"],
        restartPolicy="OnFailure",
        volumes=[{"name": "shared", "emptyDir": {}}],
        initContainers=[
            {
                "name": f"init-{i}",
                "image": "busybox",
                "command": ["sh", "-c", f"echo init-{i} >> /shared/trace"],
                "volumeMounts": [{"name": "shared", "mountPath": "/shared"}],
            }
            for i in range(2)
        ],
    )
    pod["spec"]["containers"][0]["volumeMounts"] = [{"name": "shared", "mountPath": "/shared"}]
    cp.apply(pod, namespace)
    done = cp.wait_pod_phase(namespace, "flaky", ["Succeeded"], 60)
    st = _container_status(done)
    assert st["restartCount"] == 1
    assert st["lastState"]["terminated"]["exitCode"] == 3
    trace = (cp.pod_dir(namespace, "flaky") / "volumes" / "shared" / "trace").read_text()
    assert trace.split() == ["init-0", "init-1", "run", "run"]
