"""Fault injection against a running test cluster (``ControlPlane``).

Why: the operator must cope with dying trainer processes, lost nodes and apiserver outages;
these helpers make those happen on demand, deterministically and by pid.
"""

from __future__ import annotations

import contextlib
import os
import signal
from typing import Any

from tests.cluster.controlplane import ClusterError, ControlPlane, wait_for


def container_pid(cp: ControlPlane, namespace: str, pod: str, container: str | None = None) -> int:
    """Pid (= process group) of a running container; ClusterError if it is not running."""
    pod_dir = cp.pod_dir(namespace, pod)
    if container is None:
        container = cp.pod_log_path(namespace, pod).stem
    pid_file = pod_dir / f"{container}.pid"
    try:
        return int(pid_file.read_text())
    except (OSError, ValueError):
        raise ClusterError(f"container {namespace}/{pod}/{container} is not running") from None


def kill_pod_process(
    cp: ControlPlane,
    namespace: str,
    pod: str,
    container: str | None = None,
    sig: int = signal.SIGKILL,
    wait: bool = True,
    timeout: float = 30.0,
) -> dict[str, Any]:
    """Kill a container's process group (SIGKILL -> exit code 137, as after an OOM kill).

    With ``wait``, returns the container status once the agent reported the termination.
    """
    if container is None:
        container = cp.pod_log_path(namespace, pod).stem
    before = _container_status(cp, namespace, pod, container)
    restarts = before.get("restartCount", 0) if before else 0
    pid = container_pid(cp, namespace, pod, container)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, sig)
    if not wait:
        return {}

    def reported() -> dict[str, Any] | None:
        st = _container_status(cp, namespace, pod, container)
        if not st:
            return None
        if "terminated" in st.get("state", {}):
            return st
        if st.get("restartCount", 0) > restarts and "terminated" in st.get("lastState", {}):
            return st
        return None

    return dict(
        wait_for(f"termination of {namespace}/{pod}/{container} to be reported", reported, timeout)
    )


def _container_status(
    cp: ControlPlane, namespace: str, pod: str, container: str
) -> dict[str, Any] | None:
    status, body = cp.request("GET", f"/api/v1/namespaces/{namespace}/pods/{pod}")
    if status != 200:
        return None
    for st in body.get("status", {}).get("containerStatuses") or []:
        if st["name"] == container:
            return dict(st)
    return None


def _node_ready(cp: ControlPlane, node: str) -> str:
    n = cp.get_json(f"/api/v1/nodes/{node}")
    for c in n.get("status", {}).get("conditions") or []:
        if c["type"] == "Ready":
            return str(c["status"])
    return "Unknown"


def mark_node_not_ready(cp: ControlPlane, node: str, timeout: float = 30.0) -> None:
    """Stop the node's heartbeats and report Ready=False (its pods keep running, as in a
    partition); the node lifecycle controller then taints it like a real NotReady node."""
    (cp.dir / "agent" / "control").mkdir(parents=True, exist_ok=True)
    (cp.dir / "agent" / "control" / f"{node}.notready").write_text("")
    wait_for(f"node {node} NotReady", lambda: _node_ready(cp, node) == "False", timeout)


def mark_node_ready(cp: ControlPlane, node: str, timeout: float = 30.0) -> None:
    """Undo ``mark_node_not_ready``: heartbeats resume and the taints are removed."""
    with contextlib.suppress(FileNotFoundError):
        (cp.dir / "agent" / "control" / f"{node}.notready").unlink()

    def ready() -> bool:
        n = cp.get_json(f"/api/v1/nodes/{node}")
        taints = [
            t for t in n["spec"].get("taints") or [] if t["key"].startswith("node.kubernetes.io/")
        ]
        return _node_ready(cp, node) == "True" and not taints

    wait_for(f"node {node} Ready again", ready, timeout)


def stop_apiserver(cp: ControlPlane) -> None:
    """Stop kube-apiserver (etcd, controllers, scheduler and agent keep running)."""
    cp.stop_apiserver()


def start_apiserver(cp: ControlPlane, timeout: float = 60.0) -> None:
    """Start kube-apiserver again on the same port against the same etcd."""
    cp.start_apiserver(timeout)


def restart_apiserver(cp: ControlPlane, timeout: float = 60.0) -> None:
    cp.restart_apiserver(timeout)
