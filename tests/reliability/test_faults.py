"""Faults mid-run: every job must still succeed, redo at most one checkpoint interval, and leave
no duplicate or orphaned children.

"Steps redone" per fault = the step the trainer had reached when the fault hit (scraped from
rank 0's live metrics just before it) minus the step the next attempt resumed from (the
trainer lists those in eval.json, training.resumedSteps). Scraping first can only under-read
the step, so a redo over one interval cannot hide.
"""

from __future__ import annotations

import contextlib
import json
import re
import signal
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest

from tests.cluster import faults
from tests.cluster.controlplane import ControlPlane, wait_for
from tests.e2e.conftest import Operator, chat_job, get_job, wait_phase
from tests.reliability.record import record
from tests.tcpproxy import TcpProxy

pytestmark = pytest.mark.cluster

EVERY = 5  # checkpoint interval of every job here
TIMEOUT = 600
CHILD_KINDS = {
    "pods": "/api/v1/namespaces/{ns}/pods",
    "configmaps": "/api/v1/namespaces/{ns}/configmaps",
    "services": "/api/v1/namespaces/{ns}/services",
    "deployments": "/apis/apps/v1/namespaces/{ns}/deployments",
}


def _s3(endpoint: str) -> Any:
    import boto3

    return boto3.session.Session().client("s3", endpoint_url=endpoint, region_name="us-east-1")


def _store_json(s3: dict[str, str], ns: str, name: str, key: str) -> Any:
    try:
        body = _s3(s3["endpoint"]).get_object(Bucket=s3["bucket"], Key=f"runs/{ns}/{name}/{key}")
        return json.loads(body["Body"].read())
    except Exception:
        return None


def _latest(s3: dict[str, str], ns: str, name: str) -> int:
    latest = _store_json(s3, ns, name, "checkpoints/latest")
    return int(latest["step"]) if latest else 0


def _rank0(cp: ControlPlane, ns: str, name: str) -> dict[str, Any] | None:
    status, pod = cp.request("GET", f"/api/v1/namespaces/{ns}/pods/{name}-rank-0")
    return pod if status == 200 and not pod["metadata"].get("deletionTimestamp") else None


def _live_step(cp: ControlPlane, ns: str, name: str) -> int | None:
    """kubetune_train_step from rank 0's metrics endpoint, as the operator scrapes it."""
    pod = _rank0(cp, ns, name)
    ip = pod and pod.get("status", {}).get("podIP")
    if not pod or pod["status"].get("phase") != "Running" or not ip:
        return None
    try:
        with urllib.request.urlopen(f"http://{ip}:9400/metrics", timeout=2) as r:
            text = r.read().decode()
    except OSError:
        return None
    m = re.search(r"^kubetune_train_step\{[^}]*\} ([0-9.e+]+)$", text, re.M)
    return int(float(m.group(1))) if m else None


def _attempt(pod: dict[str, Any] | None) -> int:
    return int(pod["metadata"]["labels"].get("kubetune.io/attempt", "0")) if pod else 0


def _checkpointed_step(
    cp: ControlPlane, s3: dict[str, str], ns: str, name: str, *, after: int, attempt: int
) -> int:
    """Wait until attempt `attempt` runs with a checkpoint newer than `after`; its live step."""

    def ready() -> int | None:
        phase = (get_job(cp, ns, name).get("status") or {}).get("phase")
        if phase in ("Succeeded", "Failed", "Cancelled"):
            raise AssertionError(f"{name} ended {phase} before the fault (attempt {attempt})")
        if _attempt(_rank0(cp, ns, name)) != attempt or _latest(s3, ns, name) <= after:
            return None
        return _live_step(cp, ns, name)

    return int(wait_for(f"{name}: attempt {attempt} past a checkpoint > {after}", ready, TIMEOUT))


def _children(cp: ControlPlane, ns: str, name: str) -> dict[str, list[str]]:
    from urllib.parse import quote

    sel = quote(f"kubetune.io/job={name}")
    out = {}
    for kind, path in CHILD_KINDS.items():
        items = cp.get_json(path.format(ns=ns) + f"?labelSelector={sel}")["items"]
        out[kind] = [
            i["metadata"]["name"] for i in items if not i["metadata"].get("deletionTimestamp")
        ]
    return out


def _duplicates(children: dict[str, list[str]], nodes: int = 1) -> int:
    """Children beyond what one job owns: a rank pod per node, one ConfigMap, one Service."""
    expected = {"pods": nodes, "configmaps": 1, "services": 1, "deployments": 0}
    return sum(max(0, len(children[k]) - n) for k, n in expected.items())


def _orphans_after_delete(cp: ControlPlane, ns: str, name: str) -> int:
    """Delete the job; whatever still carries its label after the garbage collector ran."""
    cp.kubectl("delete", "ftj", name, "-n", ns, "--wait=false")

    def gone() -> bool:
        return not any(_children(cp, ns, name).values())

    with contextlib.suppress(AssertionError):  # counted below instead
        wait_for(f"{name}: children garbage-collected", gone, 120)
    return sum(len(v) for v in _children(cp, ns, name).values())


def _finish(
    cp: ControlPlane,
    op: Operator,
    s3: dict[str, str],
    ns: str,
    name: str,
    fault_steps: list[int],
    request: pytest.FixtureRequest,
    *,
    faults_injected: int,
    operator_kills: int = 0,
) -> dict[str, Any]:
    """Wait for the end, measure, record, and assert everything the suite promises."""
    done = wait_phase(cp, op, ns, name, {"Succeeded", "Failed", "Cancelled"}, TIMEOUT)
    status = done["status"]
    report = _store_json(s3, ns, name, "eval.json") or {}
    training = report.get("training", {})
    resumed = list(training.get("resumedSteps", []))
    # Pair each fault with the attempt that followed it; faults that needed no restart (the
    # trainer rode them out) redo nothing.
    redone = [max(0, f - r) for f, r in zip(fault_steps, resumed, strict=False)]
    children = _children(cp, ns, name)
    dupes = _duplicates(children)
    crashed = int(op.proc is None or op.proc.poll() is not None)
    orphans = _orphans_after_delete(cp, ns, name)
    succeeded = status["phase"] == "Succeeded"
    record(
        request.node.nodeid,
        faults_injected=faults_injected,
        jobs_run=1,
        jobs_succeeded=int(succeeded),
        jobs_lost=int(not succeeded),
        steps_redone=sum(redone),
        steps_redone_over_interval=sum(1 for r in redone if r > EVERY),
        duplicates=dupes,
        orphans=orphans,
        operator_restarts=crashed,
    )
    print(
        f"{name}: {status['phase']}, steps {training.get('steps')}/{training.get('totalSteps')}, "
        f"fault steps {fault_steps}, resumed {resumed}, redone {redone}, restarts "
        f"{status.get('restarts', 0)}, operator kills {operator_kills}, duplicates {dupes}, "
        f"orphans {orphans}"
    )
    assert succeeded, json.dumps(status, indent=1)
    assert training["steps"] == training["totalSteps"], training
    assert all(r <= EVERY for r in redone), (fault_steps, resumed)
    assert dupes == 0, children
    assert orphans == 0
    assert not crashed, "the operator died on its own"
    return dict(status)


@dataclass
class Env:
    """What every fault test needs: the cluster, its namespace, the operator, the canary S3."""

    cp: ControlPlane
    ns: str
    op: Operator
    s3: dict[str, str]
    request: pytest.FixtureRequest

    def finish(self, name: str, fault_steps: list[int], **kw: Any) -> dict[str, Any]:
        return _finish(self.cp, self.op, self.s3, self.ns, name, fault_steps, self.request, **kw)

    def checkpointed_step(self, name: str, *, after: int = 0, attempt: int = 1) -> int:
        return _checkpointed_step(self.cp, self.s3, self.ns, name, after=after, attempt=attempt)


@pytest.fixture
def env(
    control_plane: ControlPlane,
    namespace: str,
    operator: Operator,
    canary_s3: dict[str, str],
    request: pytest.FixtureRequest,
) -> Env:
    return Env(control_plane, namespace, operator, canary_s3, request)


def _job(name: str, s3: dict[str, str], epochs: int, **over: Any) -> dict[str, Any]:
    return chat_job(
        name,
        s3,
        hyperparameters={"epochs": epochs},
        checkpointing={"everySteps": EVERY, "keepLast": 2},
        **over,
    )


def test_rank_killed_three_times(env: Env) -> None:
    cp, ns, canary_s3 = env.cp, env.ns, env.s3
    name = "kill3"
    cp.apply(_job(name, canary_s3, 4, runPolicy={"backoffLimit": 5}), ns)
    fault_steps: list[int] = []
    latest = 0
    for attempt in (1, 2, 3):
        step = env.checkpointed_step(name, after=latest, attempt=attempt)
        latest = _latest(canary_s3, ns, name)
        faults.kill_pod_process(cp, ns, f"{name}-rank-0", wait=False)
        fault_steps.append(step)
    status = env.finish(name, fault_steps, faults_injected=3)
    assert status["restarts"] == 3


def test_operator_killed_mid_reconcile(env: Env) -> None:
    cp, ns, operator, canary_s3 = env.cp, env.ns, env.op, env.s3
    name = "opkill"
    cp.apply(_job(name, canary_s3, 2), ns)
    kills = 0
    # While it validates and launches: the handlers must be idempotent on the retry.
    for delay in (0.3, 0.8):
        time.sleep(delay)
        operator.stop(signal.SIGKILL)
        operator.start()
        kills += 1
    step = env.checkpointed_step(name)
    operator.stop(signal.SIGKILL)  # while it tracks progress
    time.sleep(3)
    operator.start()
    kills += 1
    status = env.finish(name, [step], faults_injected=kills, operator_kills=kills)
    assert status["restarts"] == 0
    events = cp.get_json(f"/api/v1/namespaces/{ns}/events")["items"]
    launched = [
        e for e in events if e["reason"] == "Launched" and e["involvedObject"]["name"] == name
    ]
    assert sum(e.get("count", 1) for e in launched) <= 1, launched


def test_apiserver_restart_mid_run(env: Env) -> None:
    cp, ns, canary_s3 = env.cp, env.ns, env.s3
    name = "apirestart"
    cp.apply(_job(name, canary_s3, 2), ns)
    step = env.checkpointed_step(name)
    faults.restart_apiserver(cp)
    status = env.finish(name, [step], faults_injected=1)
    assert status["restarts"] == 0


def test_s3_unavailable_for_30s(env: Env) -> None:
    cp, ns, operator, canary_s3 = env.cp, env.ns, env.op, env.s3
    name = "s3down"
    host, port = canary_s3["endpoint"].removeprefix("http://").split(":")
    with TcpProxy(host, int(port)) as proxy:
        # The job talks to S3 through the proxy; the test reads the store directly.
        via_proxy = {**canary_s3, "endpoint": proxy.url}
        cp.apply(_job(name, via_proxy, 3), ns)
        step = env.checkpointed_step(name)
        proxy.block()
        time.sleep(30)
        proxy.unblock()
        wait_phase(cp, operator, ns, name, {"Succeeded", "Failed"}, TIMEOUT)
        log = cp.pod_log(ns, f"{name}-rank-0")
        status = env.finish(name, [step], faults_injected=1)
    # The outage really hit the run: the trainer retried its uploads (and carried on).
    assert "retrying in" in log, log[-3000:]
    print(f"s3down: restarts {status['restarts']}")


def test_node_not_ready(env: Env) -> None:
    cp, ns, operator, canary_s3 = env.cp, env.ns, env.op, env.s3
    name = "nodedown"
    # Long enough (about 30 s of training on a quiet 2-core box) that the eviction, some 10 s
    # after the node goes NotReady, lands mid-run: with 4 epochs a fast machine finished first.
    policy = {"backoffLimit": 3, "nodeFailureTolerationSeconds": 5}
    job = _job(name, canary_s3, 16, runPolicy=policy)
    cp.apply(job, ns)
    step = env.checkpointed_step(name)
    node = _rank0(cp, ns, name)["spec"]["nodeName"]  # type: ignore[index]
    restore: Callable[[], None] = lambda: faults.mark_node_ready(cp, node, timeout=60)  # noqa: E731
    faults.mark_node_not_ready(cp, node)
    try:
        wait_phase(cp, operator, ns, name, {"Succeeded", "Failed"}, TIMEOUT)
        final_node = (_rank0(cp, ns, name) or {}).get("spec", {}).get("nodeName")
        status = env.finish(name, [step], faults_injected=1)
    finally:
        restore()
    assert status["restarts"] >= 1, "the ranks never left the NotReady node"
    assert final_node and final_node != node, (node, final_node)
