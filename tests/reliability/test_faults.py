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
from collections.abc import Callable, Iterator
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

    with contextlib.suppress(AssertionError, TimeoutError):  # counted below instead
        wait_for(f"{name}: children garbage-collected", gone, 120)
    return sum(len(v) for v in _children(cp, ns, name).values())


TERMINAL = {"Succeeded", "Failed", "Cancelled"}


def _measure(
    cp: ControlPlane,
    op: Operator,
    s3: dict[str, str],
    ns: str,
    name: str,
    fault_steps: list[int],
    fig: dict[str, int],
    seen: dict[str, Any],
    wait: float,
) -> None:
    """Wait up to `wait` s for the end, then measure, step by step, into `fig` (the recorded
    figures) and `seen` (what the asserts need): an exception leaves in both what was observed
    before it."""
    try:
        status = wait_phase(cp, op, ns, name, TERMINAL, wait)["status"]
    except TimeoutError:
        seen["status"] = get_job(cp, ns, name).get("status") or {}
        fig["stuck"] = int(seen["status"].get("phase") not in TERMINAL)
        raise
    seen["status"] = status
    succeeded = status["phase"] == "Succeeded"
    fig.update(jobs_succeeded=int(succeeded), jobs_lost=int(not succeeded))
    report = _store_json(s3, ns, name, "eval.json") or {}
    training = report.get("training", {})
    resumed = list(training.get("resumedSteps", []))
    # Pair each fault with the attempt that followed it; faults that needed no restart (the
    # trainer rode them out) redo nothing.
    redone = [max(0, f - r) for f, r in zip(fault_steps, resumed, strict=False)]
    seen.update(training=training, resumed=resumed, redone=redone)
    fig.update(
        steps_redone=sum(redone), steps_redone_over_interval=sum(1 for r in redone if r > EVERY)
    )
    seen["children"] = _children(cp, ns, name)
    fig["duplicates"] = _duplicates(seen["children"])


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
    wait: float = TIMEOUT,
) -> dict[str, Any]:
    """Wait for the end, measure, record, and assert everything the suite promises.

    The figures are recorded whatever happens (a job that never ends, an operator that died, a
    measurement that failed): the job counts as lost until it is seen to succeed, a job still
    running when the wait ran out counts as stuck, and the job is always deleted and its
    leftover children counted as orphans."""
    fig = {"faults_injected": faults_injected, "jobs_run": 1, "jobs_lost": 1}
    seen: dict[str, Any] = {}
    measured = False
    try:
        _measure(cp, op, s3, ns, name, fault_steps, fig, seen, wait)
        measured = True
    finally:
        fig["operator_restarts"] = int(op.proc is None or op.proc.poll() is not None)
        try:
            fig["orphans"] = _orphans_after_delete(cp, ns, name)
        except Exception:
            if measured:
                raise  # otherwise the first failure is the one to report
        finally:
            record(request.node.nodeid, **fig)
    status, training, redone = seen["status"], seen["training"], seen["redone"]
    print(
        f"{name}: {status['phase']}, steps {training.get('steps')}/{training.get('totalSteps')}, "
        f"fault steps {fault_steps}, resumed {seen['resumed']}, redone {redone}, restarts "
        f"{status.get('restarts', 0)}, operator kills {operator_kills}, duplicates "
        f"{fig['duplicates']}, orphans {fig['orphans']}"
    )
    assert fig["jobs_succeeded"], json.dumps(status, indent=1)
    assert training["steps"] == training["totalSteps"], training
    assert all(r <= EVERY for r in redone), (fault_steps, seen["resumed"])
    assert fig["duplicates"] == 0, seen["children"]
    assert fig["orphans"] == 0
    assert not fig["operator_restarts"], "the operator died on its own"
    return dict(status)


@dataclass
class Env:
    """What every fault test needs: the cluster, its namespace, the operator, the canary S3.

    Tests create their job with ``apply`` and count each fault with ``injected``, so that a
    test failing before ``finish`` still records its job (see the ``env`` fixture)."""

    cp: ControlPlane
    ns: str
    op: Operator
    s3: dict[str, str]
    request: pytest.FixtureRequest
    job: str | None = None
    faults: int = 0
    recorded: bool = False

    def apply(self, job: dict[str, Any]) -> None:
        self.job = job["metadata"]["name"]
        self.cp.apply(job, self.ns)

    def injected(self, n: int = 1) -> None:
        self.faults += n

    def finish(self, name: str, fault_steps: list[int], **kw: Any) -> dict[str, Any]:
        self.recorded = True
        return _finish(
            self.cp,
            self.op,
            self.s3,
            self.ns,
            name,
            fault_steps,
            self.request,
            faults_injected=self.faults,
            **kw,
        )

    def checkpointed_step(self, name: str, *, after: int = 0, attempt: int = 1) -> int:
        return _checkpointed_step(self.cp, self.s3, self.ns, name, after=after, attempt=attempt)


@pytest.fixture
def env(
    control_plane: ControlPlane,
    namespace: str,
    operator: Operator,
    canary_s3: dict[str, str],
    request: pytest.FixtureRequest,
) -> Iterator[Env]:
    env = Env(control_plane, namespace, operator, canary_s3, request)
    yield env
    if env.job is not None and not env.recorded:
        # The test failed before finish (a fault that never took, a wait that ran out): record
        # the job as it stands now, lost, stuck if not ended, and its orphans.
        with contextlib.suppress(Exception):
            env.finish(env.job, [], wait=0)


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
    env.apply(_job(name, canary_s3, 4, runPolicy={"backoffLimit": 5}))
    fault_steps: list[int] = []
    latest = 0
    for attempt in (1, 2, 3):
        step = env.checkpointed_step(name, after=latest, attempt=attempt)
        latest = _latest(canary_s3, ns, name)
        faults.kill_pod_process(cp, ns, f"{name}-rank-0", wait=False)
        env.injected()
        fault_steps.append(step)
    status = env.finish(name, fault_steps)
    assert status["restarts"] == 3


def test_operator_killed_mid_reconcile(env: Env) -> None:
    cp, ns, operator, canary_s3 = env.cp, env.ns, env.op, env.s3
    name = "opkill"
    env.apply(_job(name, canary_s3, 2))
    kills = 0
    # While it validates and launches: the handlers must be idempotent on the retry.
    for delay in (0.3, 0.8):
        time.sleep(delay)
        operator.stop(signal.SIGKILL)
        env.injected()
        operator.start()
        kills += 1
    step = env.checkpointed_step(name)
    operator.stop(signal.SIGKILL)  # while it tracks progress
    env.injected()
    time.sleep(3)
    operator.start()
    kills += 1
    status = env.finish(name, [step], operator_kills=kills)
    assert status["restarts"] == 0
    events = cp.get_json(f"/api/v1/namespaces/{ns}/events")["items"]
    launched = [
        e for e in events if e["reason"] == "Launched" and e["involvedObject"]["name"] == name
    ]
    assert sum(e.get("count", 1) for e in launched) <= 1, launched


def test_apiserver_restart_mid_run(env: Env) -> None:
    cp, canary_s3 = env.cp, env.s3
    name = "apirestart"
    env.apply(_job(name, canary_s3, 2))
    step = env.checkpointed_step(name)
    faults.restart_apiserver(cp)
    env.injected()
    status = env.finish(name, [step])
    assert status["restarts"] == 0


def test_s3_unavailable_for_30s(env: Env) -> None:
    cp, ns, operator, canary_s3 = env.cp, env.ns, env.op, env.s3
    name = "s3down"
    host, port = canary_s3["endpoint"].removeprefix("http://").split(":")
    with TcpProxy(host, int(port)) as proxy:
        # The job talks to S3 through the proxy; the test reads the store directly.
        via_proxy = {**canary_s3, "endpoint": proxy.url}
        env.apply(_job(name, via_proxy, 3))
        step = env.checkpointed_step(name)
        proxy.block()
        env.injected()
        time.sleep(30)
        proxy.unblock()
        wait_phase(cp, operator, ns, name, {"Succeeded", "Failed"}, TIMEOUT)
        log = cp.pod_log(ns, f"{name}-rank-0")
        status = env.finish(name, [step])
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
    env.apply(job)
    step = env.checkpointed_step(name)
    node = _rank0(cp, ns, name)["spec"]["nodeName"]  # type: ignore[index]
    restore: Callable[[], None] = lambda: faults.mark_node_ready(cp, node, timeout=60)  # noqa: E731
    faults.mark_node_not_ready(cp, node)
    env.injected()
    try:
        wait_phase(cp, operator, ns, name, {"Succeeded", "Failed"}, TIMEOUT)
        final_node = (_rank0(cp, ns, name) or {}).get("spec", {}).get("nodeName")
        status = env.finish(name, [step])
    finally:
        restore()
    # The taint eviction is Kubernetes taking the rank away: an interruption, not a failure.
    moved = status.get("interruptions", 0) + status["restarts"]
    assert moved >= 1, "the ranks never left the NotReady node"
    assert status["restarts"] == 0, "an eviction was counted as a failure"
    assert final_node and final_node != node, (node, final_node)
