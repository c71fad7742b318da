"""Node partition (``faults.freeze_node``) and evictions (``faults.evict_pod``) in the test cluster.

A frozen node behaves like a kubelet behind a network partition: no heartbeats, no pod status,
no reaction to deletions, while its processes keep running.  That is what the operator meets
when a GPU node drops off the network: Terminating pods that never finish and stale ranks that
keep writing.  Waits poll with timeouts; "nothing happens" is checked after the node lifecycle
controller needed its ~40 s to notice the node is gone, which gives the agent ample time to
(wrongly) act.
"""

from __future__ import annotations

import os
import signal
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest

from tests.cluster import faults
from tests.cluster.controlplane import ControlPlane, wait_for

pytestmark = pytest.mark.cluster

Obj = dict[str, Any]

# Prints a tick every 0.2 s; on SIGTERM says so and exits 0; exits 0 once argv[1] exists.
TICKER = textwrap.dedent("""
    import os, signal, sys, time
    def bye(*_):
        print("got SIGTERM", flush=True)
        sys.exit(0)
    signal.signal(signal.SIGTERM, bye)
    stop = sys.argv[1] if len(sys.argv) > 1 else None
    i = 0
    while not (stop and os.path.exists(stop)):
        print(f"tick {i}", flush=True)
        i += 1
        time.sleep(0.2)
    print("stopping by myself", flush=True)
""")

FORCE = {"apiVersion": "v1", "kind": "DeleteOptions", "gracePeriodSeconds": 0}


def _pod(name: str, args: list[str], node: str | None = None, labels: Obj | None = None) -> Obj:
    spec: Obj = {
        "restartPolicy": "Never",
        "containers": [
            {"name": "main", "image": "kubetune/test", "command": ["python", "-c", *args]}
        ],
    }
    if node:
        spec["nodeName"] = node
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "labels": labels or {}},
        "spec": spec,
    }


def _get(cp: ControlPlane, ns: str, pod: str) -> Obj | None:
    status, body = cp.request("GET", f"/api/v1/namespaces/{ns}/pods/{pod}")
    return dict(body) if status == 200 else None


def _delete(cp: ControlPlane, ns: str, pod: str, body: Obj | None = None) -> None:
    status, answer = cp.request("DELETE", f"/api/v1/namespaces/{ns}/pods/{pod}", body)
    assert status == 200, answer


def _alive(pid: int) -> bool:
    """Running (a zombie does not count: its exit is merely not collected yet)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _state(pod: Obj) -> Obj:
    return dict(pod["status"]["containerStatuses"][0]["state"])


def _lease_renew_time(cp: ControlPlane, node: str) -> str:
    lease = cp.get_json(f"/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases/{node}")
    return str(lease["spec"]["renewTime"])


def _node_ready(cp: ControlPlane, node: str) -> Obj:
    conds = cp.get_json(f"/api/v1/nodes/{node}")["status"]["conditions"]
    return dict(next(c for c in conds if c["type"] == "Ready"))


def _start(cp: ControlPlane, ns: str, pods: list[Obj]) -> dict[str, int]:
    """Create the pods, wait until each runs and has ticked once; their pids."""
    for p in pods:
        cp.apply(p, ns)
    pids = {}
    for p in pods:
        name = p["metadata"]["name"]
        cp.wait_pod_phase(ns, name, ["Running"], 60)
        wait_for(f"{name} to tick", lambda: "tick" in cp.pod_log(ns, name), 30)  # noqa: B023
        pids[name] = faults.container_pid(cp, ns, name)
    return pids


def test_frozen_node_is_partitioned_until_unfrozen(
    control_plane: ControlPlane, namespace: str
) -> None:
    cp, ns = control_plane, namespace
    node = cp.nodes[-1]
    pids = _start(cp, ns, [_pod(n, [TICKER], node) for n in ("graceful", "crasher", "orphan")])
    try:
        t0 = time.monotonic()
        faults.freeze_node(cp, node)
        renewed = _lease_renew_time(cp, node)
        beat = _node_ready(cp, node)["lastHeartbeatTime"]

        _delete(cp, ns, "graceful")  # graceful: 30 s, but nobody tells the process
        _delete(cp, ns, "orphan", FORCE)  # gone from the API at once ...
        assert _get(cp, ns, "orphan") is None
        orphan_log = cp.pod_log_path(ns, "orphan").stat().st_size
        os.killpg(pids["crasher"], signal.SIGKILL)  # ... an exit nobody reports ...
        cp.apply(_pod("late", ["print('late ran')"], node), ns)  # ... a pod nobody starts

        # The node lifecycle controller notices (node-monitor-grace-period 40 s).
        wait_for(
            f"{node} Ready=Unknown",
            lambda: _node_ready(cp, node)["status"] == "Unknown",
            max(5.0, 75 - (time.monotonic() - t0)),
            1.0,
        )
        frozen_for = time.monotonic() - t0
        assert frozen_for > 20, f"node went Unknown after {frozen_for:.0f}s only"

        # Meanwhile the agent sent nothing for the node ...
        assert _lease_renew_time(cp, node) == renewed
        assert _node_ready(cp, node)["lastHeartbeatTime"] == beat
        # ... did not signal the Terminating pod nor finish its deletion ...
        graceful = _get(cp, ns, "graceful")
        assert graceful is not None and graceful["metadata"].get("deletionTimestamp")
        assert "running" in _state(graceful)
        assert _alive(pids["graceful"])
        assert "got SIGTERM" not in cp.pod_log(ns, "graceful")
        # ... did not kill the force-deleted pod's process, which kept writing ...
        assert _alive(pids["orphan"])
        assert cp.pod_log_path(ns, "orphan").stat().st_size > orphan_log
        # ... did not report the crash ...
        crasher = _get(cp, ns, "crasher")
        assert crasher is not None and "running" in _state(crasher)
        assert not _alive(pids["crasher"])
        # ... and did not start the newly bound pod.
        late = _get(cp, ns, "late")
        assert late is not None and not late.get("status", {}).get("containerStatuses")
        assert not cp.pod_dir(ns, "late").exists()

        faults.unfreeze_node(cp, node)  # kill_orphans=True; returns with the node Ready

        # Reconciled like a kubelet after a partition: the orphan was killed by the thaw ...
        assert not _alive(pids["orphan"])
        # ... the Terminating pod now gets SIGTERM and its deletion is finished ...
        wait_for("graceful to be deleted", lambda: _get(cp, ns, "graceful") is None, 30)
        assert "got SIGTERM" in cp.pod_log(ns, "graceful")
        # ... the crash is reported, and the late pod runs.
        crashed = cp.wait_pod_phase(ns, "crasher", ["Failed"], 30)
        assert _state(crashed)["terminated"]["exitCode"] == 137
        cp.wait_pod_phase(ns, "late", ["Succeeded"], 30)
        assert "late ran" in cp.pod_log(ns, "late")
        assert _lease_renew_time(cp, node) > renewed
    finally:
        faults.unfreeze_node(cp, node)


def test_unfreeze_can_leave_orphans_running(
    control_plane: ControlPlane, namespace: str, tmp_path: Path
) -> None:
    """A force-deleted rank on a partitioned node outlives the partition (kill_orphans=False)."""
    cp, ns = control_plane, namespace
    node = cp.nodes[-1]
    stop = tmp_path / "stop"
    pid = _start(cp, ns, [_pod("stale", [TICKER, str(stop)], node)])["stale"]
    log = cp.pod_log_path(ns, "stale")
    try:
        faults.freeze_node(cp, node)
        _delete(cp, ns, "stale", FORCE)
        assert _get(cp, ns, "stale") is None
        faults.unfreeze_node(cp, node, kill_orphans=False)

        assert _alive(pid)
        size = log.stat().st_size
        wait_for("the stale rank to keep writing", lambda: log.stat().st_size > size + 20, 10)
        assert _get(cp, ns, "stale") is None

        stop.touch()  # it ends by itself; the agent collects it
        wait_for("the stale rank to exit", lambda: not Path(f"/proc/{pid}").exists(), 15)
        assert "stopping by myself" in log.read_text()
        wait_for("its pid file to go", lambda: not (log.parent / "main.pid").exists(), 5)
    finally:
        faults.unfreeze_node(cp, node)


def test_evict_pod_terminates_gracefully(control_plane: ControlPlane, namespace: str) -> None:
    cp, ns = control_plane, namespace
    pid = _start(cp, ns, [_pod("evictee", [TICKER])])["evictee"]
    faults.evict_pod(cp, ns, "evictee")
    wait_for("evicted pod to be deleted", lambda: _get(cp, ns, "evictee") is None, 30)
    assert "got SIGTERM" in cp.pod_log(ns, "evictee")
    assert not _alive(pid)


def test_evict_pod_refused_by_disruption_budget(
    control_plane: ControlPlane, namespace: str
) -> None:
    cp, ns = control_plane, namespace
    labels = {"app": "guarded"}
    _start(cp, ns, [_pod("guarded", [TICKER], labels=labels)])
    cp.apply(
        {
            "apiVersion": "policy/v1beta1",
            "kind": "PodDisruptionBudget",
            "metadata": {"name": "guard"},
            "spec": {"minAvailable": 1, "selector": {"matchLabels": labels}},
        },
        ns,
    )

    def observed() -> bool:
        pdb = cp.get_json(f"/apis/policy/v1beta1/namespaces/{ns}/poddisruptionbudgets/guard")
        st = pdb.get("status", {})
        return bool(
            st.get("observedGeneration", 0) >= pdb["metadata"]["generation"]
            and st.get("currentHealthy") == 1
        )

    wait_for("disruption controller to count the pod", observed, 30)
    with pytest.raises(faults.EvictionRefused) as refused:
        faults.evict_pod(cp, ns, "guarded")
    assert refused.value.status == 429
    pod = _get(cp, ns, "guarded")
    assert pod is not None and not pod["metadata"].get("deletionTimestamp")
    with pytest.raises(faults.EvictionRefused) as missing:
        faults.evict_pod(cp, ns, "no-such-pod")
    assert missing.value.status == 404
