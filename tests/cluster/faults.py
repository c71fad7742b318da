"""Fault injection against a running test cluster (``ControlPlane``).

Why: the operator must cope with dying trainer processes, lost nodes and apiserver outages;
these helpers make those happen on demand, deterministically and by pid.

Node faults are requests to the node agent through files in ``DIR/agent/control/`` (see the
docstring of ``nodeagent.py``); ``freeze_node``/``unfreeze_node`` wait for the agent's
acknowledgement (``<node>.state``), so they take effect before they return.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
from collections.abc import Callable
from pathlib import Path
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

    wait_for(f"node {node} Ready again", lambda: _node_ready_untainted(cp, node), timeout)


def _control_dir(cp: ControlPlane) -> Path:
    d = cp.dir / "agent" / "control"
    d.mkdir(parents=True, exist_ok=True)
    return d


def _write_atomic(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)


def _agent_state(cp: ControlPlane, node: str) -> dict[str, Any]:
    """The agent's acknowledgement for ``node`` (``{"frozen": bool, "token": str}``)."""
    try:
        data = json.loads((_control_dir(cp) / f"{node}.state").read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _wait_agent_state(
    cp: ControlPlane, node: str, frozen: bool, token: str | None, timeout: float
) -> None:
    def acked() -> bool:
        st = _agent_state(cp, node)
        return st.get("frozen") is frozen and (token is None or st.get("token") == token)

    what = f"node agent to {'freeze' if frozen else 'unfreeze'} {node}"
    wait_for(what, acked, timeout, 0.1, fail_fast=_agent_alive(cp))


def _agent_alive(cp: ControlPlane) -> Callable[[], None]:
    def check() -> None:
        rec = cp.state.procs.get("node-agent")
        if rec is not None and not rec.alive():
            raise ClusterError(f"node agent is not running (log: {rec.log})")

    return check


def _node(cp: ControlPlane, node: str) -> None:
    if node not in cp.nodes:
        raise ClusterError(f"{node!r} is not a node of this cluster ({cp.nodes})")


def node_frozen(cp: ControlPlane, node: str) -> bool:
    """Whether a freeze of ``node`` has been requested and not undone."""
    return (_control_dir(cp) / f"{node}.frozen").exists()


def freeze_node(cp: ControlPlane, node: str, timeout: float = 30.0) -> None:
    """Cut ``node`` off as by a network partition (a harder fault than ``mark_node_not_ready``).

    Returns once the node agent acknowledged; from then on, until ``unfreeze_node``, the agent
    sends nothing for the node: no node status, no Lease renewal, no pod status.  It does not
    act on the node's pods either: a deleted pod is not signalled and stays Terminating in the
    API server, a force-deleted pod's processes are not killed, newly bound pods are not
    started, exited containers are not restarted.  The processes keep running.  The node
    lifecycle controller marks the node Ready=Unknown (and taints it unreachable) after its
    node-monitor-grace-period (40 s).  Freezing a frozen node again is harmless.
    """
    _node(cp, node)
    ctl = _control_dir(cp)
    with contextlib.suppress(FileNotFoundError):
        (ctl / f"{node}.unfreeze").unlink()
    token = secrets.token_hex(8)
    _write_atomic(ctl / f"{node}.frozen", {"token": token})
    _wait_agent_state(cp, node, True, token, timeout)


def unfreeze_node(
    cp: ControlPlane, node: str, kill_orphans: bool = True, timeout: float = 30.0
) -> None:
    """Undo ``freeze_node``; the agent reconciles as a kubelet would after a partition.

    Processes of pods removed from the API server meanwhile (force deletions) are killed,
    or, with ``kill_orphans=False``, left running unmanaged until they exit by themselves (a
    stale rank that keeps writing); pods deleted gracefully meanwhile get SIGTERM and their
    grace period now; pod statuses are pushed again; pods bound meanwhile start.  Returns
    once the agent acknowledged the thaw (the orphans are dealt with by then) and the node
    is Ready and without not-ready/unreachable taints again.  A no-op on a node that is not
    frozen (safe in ``finally``).
    """
    _node(cp, node)
    ctl = _control_dir(cp)
    if (ctl / f"{node}.frozen").exists():
        token = secrets.token_hex(8)
        _write_atomic(ctl / f"{node}.unfreeze", {"token": token, "kill_orphans": kill_orphans})
        (ctl / f"{node}.frozen").unlink()
        _wait_agent_state(cp, node, False, token, timeout)
        with contextlib.suppress(FileNotFoundError):
            (ctl / f"{node}.unfreeze").unlink()
    elif _agent_state(cp, node).get("frozen"):  # the request file went some other way
        _wait_agent_state(cp, node, False, None, timeout)
    if not (ctl / f"{node}.notready").exists():
        wait_for(f"node {node} Ready again", lambda: _node_ready_untainted(cp, node), timeout)


def _node_ready_untainted(cp: ControlPlane, node: str) -> bool:
    n = cp.get_json(f"/api/v1/nodes/{node}")
    taints = [
        t for t in n["spec"].get("taints") or [] if t["key"].startswith("node.kubernetes.io/")
    ]
    return _node_ready(cp, node) == "True" and not taints


class EvictionRefused(ClusterError):
    """The API server did not accept an eviction (``status`` 429: a PodDisruptionBudget)."""

    def __init__(self, namespace: str, pod: str, status: int, body: Any) -> None:
        msg = body.get("message", body) if isinstance(body, dict) else body
        super().__init__(f"eviction of {namespace}/{pod} refused: HTTP {status}: {msg}")
        self.status = status
        self.body = body


def evict_pod(
    cp: ControlPlane, namespace: str, pod: str, grace_period_seconds: int | None = None
) -> None:
    """Evict a pod through the Eviction API, as ``kubectl drain`` does (policy/v1beta1 on
    Kubernetes 1.20), so PodDisruptionBudgets are honoured.

    Returns once the API server accepted the eviction (the pod is then being deleted
    gracefully: its node's agent sends SIGTERM); raises ``EvictionRefused`` with the server's
    status and answer otherwise (429 when a PodDisruptionBudget forbids it, 404 if no pod).
    """
    body: dict[str, Any] = {
        "apiVersion": "policy/v1beta1",
        "kind": "Eviction",
        "metadata": {"name": pod, "namespace": namespace},
    }
    if grace_period_seconds is not None:
        body["deleteOptions"] = {
            "apiVersion": "v1",
            "kind": "DeleteOptions",
            "gracePeriodSeconds": grace_period_seconds,
        }
    status, answer = cp.request("POST", f"/api/v1/namespaces/{namespace}/pods/{pod}/eviction", body)
    if status not in (200, 201):
        raise EvictionRefused(namespace, pod, status, answer)


def stop_apiserver(cp: ControlPlane) -> None:
    """Stop kube-apiserver (etcd, controllers, scheduler and agent keep running)."""
    cp.stop_apiserver()


def start_apiserver(cp: ControlPlane, timeout: float = 60.0) -> None:
    """Start kube-apiserver again on the same port against the same etcd."""
    cp.start_apiserver(timeout)


def restart_apiserver(cp: ControlPlane, timeout: float = 60.0) -> None:
    cp.restart_apiserver(timeout)
