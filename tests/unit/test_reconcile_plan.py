"""The reconcile plan, table-driven, with no API server: one row per situation.

Each row gives the job (spec overrides, annotations), its status and what exists (rank pods,
the Deployment, the Secret's keys, rank 0's metrics), and asserts the phase, conditions, the
exact actions (verb, kind/name, grace) and the exact events (type, reason, message fragment).
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from kubetune_operator import kube
from kubetune_operator import status as st
from kubetune_operator.api.models import FineTuneJobStatus
from kubetune_operator.reconcile import executor
from kubetune_operator.reconcile.plan import (
    ANN_ATTEMPT,
    ANN_LAUNCHED_SPEC,
    ANN_NEXT_LAUNCH,
    ANN_SPEC_HASH,
    needs,
    plan,
)
from kubetune_operator.reconcile.plan_types import (
    Action,
    Annotate,
    Apply,
    Children,
    Delete,
    GangRestarted,
    GateResult,
    Needs,
    Plan,
    QuotaRefusal,
    RankRunning,
    Rejection,
    Sample,
    SecretRead,
    Settings,
    UsageSample,
)
from kubetune_operator.reconcile.scheduling import NodeInfo
from kubetune_operator.reconcile.state import JobState
from kubetune_trainer.config import FinalReport, GateVerdict

Obj = dict[str, Any]
NOW = datetime(2024, 1, 1, 12, 0, 0, tzinfo=UTC)
SETTINGS = Settings(image="kubetune/trainer:test", restart_backoff=10.0)
KEYS = SecretRead("s3-creds", frozenset({"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}))


def ago(seconds: float) -> str:
    return st.now_rfc3339(NOW - timedelta(seconds=seconds))


def spec(**over: Any) -> Obj:
    base: Obj = {
        "task": "causal-lm",
        "model": {"source": "builtin:tiny-llama"},
        "data": {"train": "s3://data/train.jsonl", "format": "text"},
        "evaluation": {"gates": [{"metric": "loss", "op": "<", "value": 2.0}]},
        "resources": {"nodes": 2, "gpusPerNode": 0},
        "storage": {"bucket": "runs", "prefix": "kt", "credentialsSecretRef": {"name": "s3-creds"}},
    }
    for key, value in over.items():
        base[key] = {**base[key], **value} if isinstance(base.get(key), dict) else value
    return base


def job(spec_over: Obj | None = None, annotations: dict[str, str] | None = None) -> Obj:
    return {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {
            "name": "demo",
            "namespace": "ns",
            "uid": "u-1",
            "generation": 1,
            "creationTimestamp": ago(120),
            "annotations": dict(annotations or {}),
        },
        "spec": spec(**(spec_over or {})),
    }


def cond(type_: str, status: str, reason: str, since: float = 60) -> Obj:
    return {"type": type_, "status": status, "reason": reason, "lastTransitionTime": ago(since)}


def launched(*extra: Obj, launch: Obj | None = None, **fields: Any) -> Obj:
    """The status of a job whose gang (attempt 1) was launched a minute ago; `launch` replaces
    the Launched condition."""
    launch = launch or cond("Launched", "True", "Launched")
    return {
        "phase": "Running",
        "startTime": ago(60),
        "observedGeneration": 1,
        "conditions": [cond("Validated", "True", "Valid"), launch, *extra],
        **fields,
    }


def restarting(since: float) -> Obj:
    """After one gang restart `since` seconds ago."""
    gone = cond("Launched", "False", "GangRestart", since=since)
    return launched(launch=gone, restarts=1, phase="Restarting")


def pod(rank: int, phase: str = "Running", attempt: int = 1, **state: Any) -> Obj:
    term = state.pop("terminated", None)
    container = {"state": {"terminated": term} if term else {"running": {}}}
    return {
        "metadata": {
            "name": f"demo-rank-{rank}",
            "labels": {"kubetune.io/attempt": str(attempt), "kubetune.io/rank": str(rank)},
            **state,
        },
        "spec": {"nodeName": "node-0"},
        "status": {"phase": phase, "podIP": f"10.0.0.{rank + 1}", "containerStatuses": [container]},
    }


def succeeded(rank: int, message: str = "") -> Obj:
    return pod(rank, "Succeeded", terminated={"exitCode": 0, "message": message})


def report(passed: bool, actual: float = 1.5) -> str:
    verdict = GateVerdict(metric="loss", op="<", value=2.0 if passed else 0.1, actual=actual,
                          passed=passed)  # fmt: skip
    final = FinalReport(
        metrics={"loss": actual, "bleu": None},
        gates=[verdict],
        gates_passed=passed,
        steps=118,
        total_steps=120,
    )
    return "Succeeded: " + final.model_dump_json(by_alias=True)


METRICS = """
kubetune_train_step{job="demo"} 30.0
kubetune_train_total_steps{job="demo"} 120.0
kubetune_train_loss{job="demo"} 1.25
kubetune_checkpoint_last_step{job="demo"} 20.0
kubetune_eval_metric{job="demo",metric="loss",split="validation"} 1.5
"""
ATTEMPT_1 = {ANN_ATTEMPT: "1"}


QUOTA_403 = json.dumps(
    {
        "kind": "Status",
        "status": "Failure",
        "message": 'pods "demo-rank-1" is forbidden: exceeded quota: team-gpus, requested: '
        "requests.nvidia.com/gpu=1, used: requests.nvidia.com/gpu=1, limited: "
        "requests.nvidia.com/gpu=1",
        "reason": "Forbidden",
        "code": 403,
    }
)
VALID = cond("Validated", "True", "Valid")
NODES = {f"node-{i}": NodeInfo(f"node-{i}", ready=True, since=ago(999), gpus=1) for i in range(3)}


def pending(rank: int) -> Obj:
    """A rank the scheduler cannot place."""
    p = pod(rank, "Pending")
    p["spec"] = {}
    p["status"] = {
        "phase": "Pending",
        "conditions": [
            {
                "type": "PodScheduled",
                "status": "False",
                "reason": "Unschedulable",
                "message": "0/3 nodes are available: 3 Insufficient nvidia.com/gpu.",
                "lastTransitionTime": ago(50),
            }
        ],
    }
    return p


def gpu_pod(rank: int, seconds: float) -> Obj:
    """A running rank with one GPU whose container started `seconds` ago."""
    p = pod(rank)
    p["metadata"]["uid"] = f"uid-{rank}"
    p["spec"]["containers"] = [
        {"name": "trainer", "resources": {"limits": {"nvidia.com/gpu": "1"}}}
    ]
    p["status"]["containerStatuses"] = [{"state": {"running": {"startedAt": ago(seconds)}}}]
    return p


def _interrupted(p: Plan, restarts: int) -> None:
    assert p.status.interruptions == 1 and p.status.restarts == restarts
    assert p.status.last_failure is None  # not a failure
    assert GangRestarted("ns") not in p.observations


def config_error(rank: int, message: str, age: float = 30) -> Obj:
    """A rank placed but waiting in CreateContainerConfigError for `age` seconds."""
    p = pod(rank, "Pending")
    p["metadata"]["creationTimestamp"] = ago(age)
    waiting = {"reason": "CreateContainerConfigError", "message": message}
    p["status"]["containerStatuses"] = [{"state": {"waiting": waiting}}]
    return p


def _renumbered(p: Plan, attempt: int) -> None:
    note = next(a for a in p.actions if isinstance(a, Annotate))
    assert note.annotations == {ANN_ATTEMPT: str(attempt)}
    assert p.status.restarts == 0 and p.status.last_failure is None


def _since(p: Plan, seconds: float) -> None:
    queued = st.get_condition(p.status, "Queued")
    assert queued is not None and queued.last_transition_time == ago(seconds)


def _released(p: Plan) -> None:
    assert p.status.gang_releases == 1 and p.status.restarts == 0
    note = next(a for a in p.actions if isinstance(a, Annotate))
    when = st.parse_time(note.annotations[ANN_NEXT_LAUNCH])
    assert when is not None and p.requeue is not None
    # base 10 s plus up to 50% jitter, and the annotation says the same time
    assert 10.0 <= p.requeue < 15.0
    assert abs((when - NOW).total_seconds() - p.requeue) < 1.0


def _quota_backoff(p: Plan) -> None:
    assert p.requeue is not None and 5.0 <= p.requeue <= 6.25
    queued = st.get_condition(p.status, "Queued")
    assert queued is not None and "limited requests.nvidia.com/gpu=1" in queued.message
    usage = p.status.usage
    assert usage is not None and usage.attempts == 0  # a refused launch is no attempt


def _budget(p: Plan) -> None:
    usage = p.status.usage
    assert usage is not None and usage.gpu_seconds == 60.0 and usage.attempts == 0
    assert set(usage.open_pods) == {"uid-0", "uid-1"}


@dataclass
class Row:
    id: str
    phase: str
    actions: list[str]
    events: list[tuple[str, str, str]]  # (type, reason, a fragment of the message)
    conditions: dict[str, tuple[str, str]] = field(default_factory=dict)  # type -> status, reason
    job: Obj = field(default_factory=job)
    status: Obj = field(default_factory=dict)
    children: Children = field(default_factory=Children)
    requeue: float | None = None
    check: Callable[[Plan], None] | None = None


def describe(action: Action) -> str:
    text = f"{action.verb} {action.kind}/{action.name}"
    if isinstance(action, Delete) and action.grace is not None:
        text += f" grace={action.grace}"
    return text


def _obs(p: Plan) -> list[Any]:
    """The plan's observations but the usage sample every pass carries."""
    return [o for o in p.observations if not isinstance(o, UsageSample)]


def _fresh(p: Plan) -> None:
    pods = [a.manifest for a in p.actions if isinstance(a, Apply) and a.kind == "Pod"]
    assert {x["metadata"]["labels"]["kubetune.io/attempt"] for x in pods} == {"1"}
    assert pods[0]["spec"]["containers"][0]["image"] == "kubetune/trainer:test"
    annotate = next(a for a in p.actions if isinstance(a, Annotate))
    assert annotate.annotations[ANN_ATTEMPT] == "1" and ANN_SPEC_HASH in annotate.annotations
    assert p.status.start_time == st.now_rfc3339(NOW)


def _progress(p: Plan) -> None:
    assert p.scrape is not None and p.scrape.url == "http://10.0.0.1:9400/metrics"
    prog = p.status.progress
    assert prog is not None and (prog.step, prog.percent, prog.eta_seconds) == (30, 25, 45)
    assert p.status.metrics == {"train_loss": 1.25, "validation_loss": 1.5}
    assert [c.uri for c in p.status.checkpoints] == [
        "s3://runs/kt/ns/demo/checkpoints/step-20-attempt-1"
    ]
    assert _obs(p) == [RankRunning(120.0)]


def _restart(p: Plan) -> None:
    assert p.status.restarts == 1 and _obs(p) == [GangRestarted("ns")]
    failure = p.status.last_failure
    assert failure is not None and (failure.pod, failure.exit_code) == ("demo-rank-1", 137)


def _relaunch(p: Plan) -> None:
    pods = [a.manifest for a in p.actions if isinstance(a, Apply) and a.kind == "Pod"]
    assert {x["metadata"]["labels"]["kubetune.io/attempt"] for x in pods} == {"2"}
    annotate = next(a for a in p.actions if isinstance(a, Annotate))
    assert annotate.annotations == {ANN_ATTEMPT: "2"}  # the launched spec is kept
    config = next(a.manifest for a in p.actions if isinstance(a, Apply) and a.kind == "ConfigMap")
    assert '"learningRate": 0.5' not in config["data"]["config.json"]
    refused = st.get_condition(p.status, "SpecChangeRefused")
    assert refused is not None and refused.message.startswith("spec.hyperparameters ")


def _permanent(p: Plan) -> None:
    assert p.status.restarts == 0 and p.status.completion_time == st.now_rfc3339(NOW)
    assert p.status.last_failure is not None and p.status.last_failure.reason == "InvalidData"


def _gates_pass(p: Plan) -> None:
    assert p.status.eval_summary == "loss=1.5 PASS"
    assert p.status.metrics == {"test_loss": 1.5}  # nulls skipped
    assert p.status.endpoint == "http://demo-serve.ns.svc:8080"
    assert p.status.model_uri == "s3://runs/kt/ns/demo/model"
    assert _obs(p) == [GateResult(True)]
    # No scrape ever reached rank 0 (status had no progress): the report's steps fill it in.
    prog = p.status.progress
    assert prog is not None and (prog.percent, prog.step, prog.total_steps) == (100, 118, 120)
    assert prog.eta_seconds == 0


def _gates_fail(p: Plan) -> None:
    assert p.status.eval_summary == "loss=1.5 FAIL" and p.status.endpoint is None
    evaluated = st.get_condition(p.status, "Evaluated")
    assert evaluated is not None
    assert evaluated.message == "gates failed: loss=1.5 (needs < 0.1) FAIL"
    assert _obs(p) == [GateResult(False)]


def _invalid(p: Plan) -> None:
    assert p.invalid_spec


def _no_secret(p: Plan) -> None:
    assert p.invalid_spec
    validated = st.get_condition(p.status, "Validated")
    assert validated is not None and "credentialsSecretRef.name" in validated.message


def _named(name: str) -> Obj:
    body = job()
    body["metadata"]["name"] = name
    return body


ROWS = [
    Row(
        "fresh job creates the configmap, the service and the rank pods",
        job=job(),
        children=Children(secret=KEYS),
        phase="Running",
        conditions={"Validated": ("True", "Valid"), "Launched": ("True", "Launched")},
        actions=[
            "apply ConfigMap/demo-config",
            "apply Service/demo-ranks",
            "annotate FineTuneJob/demo",
            "apply Pod/demo-rank-0",
            "apply Pod/demo-rank-1",
        ],
        events=[("Normal", "Launched", "Running: launched 2 rank pod(s) (attempt 1)")],
        requeue=5.0,
        check=_fresh,
    ),
    Row(
        "ranks running: progress from rank 0's metrics",
        job=job(annotations=ATTEMPT_1),
        status=launched(),
        children=Children(
            rank_pods=[pod(0), pod(1)], metrics=Sample(st.parse_metrics(METRICS), 2.0)
        ),
        phase="Running",
        actions=[],
        events=[],
        requeue=10.0,
        check=_progress,
    ),
    Row(
        "rank failed retryable: gang teardown and restart after the back-off",
        job=job(annotations=ATTEMPT_1),
        status=launched(),
        children=Children(rank_pods=[pod(0), pod(1, "Failed", terminated={"exitCode": 137})]),
        phase="Restarting",
        conditions={"Launched": ("False", "GangRestart")},
        actions=["delete Pod/demo-rank-0 grace=30", "delete Pod/demo-rank-1 grace=30"],
        events=[
            ("Normal", "RanksDeleted", "deleted 2 rank pod(s)"),
            ("Warning", "GangRestart", "gang restart 1/3 in 10s"),
            ("Warning", "Killed", "Restarting: demo-rank-1 failed: Killed (exit code 137)"),
        ],
        requeue=10.0,
        check=_restart,
    ),
    Row(
        "gang restart waits out the back-off",
        job=job(annotations=ATTEMPT_1),
        status=restarting(since=4),
        phase="Restarting",
        actions=[],
        events=[],
        requeue=6.0,
    ),
    Row(
        "gang restart launches attempt 2 once the old gang is gone",
        job=job(
            {"hyperparameters": {"learningRate": 0.5}},
            {**ATTEMPT_1, ANN_SPEC_HASH: "launched", ANN_LAUNCHED_SPEC: json.dumps(spec())},
        ),
        status=restarting(since=11),
        phase="Running",
        conditions={"Launched": ("True", "Launched")},
        actions=[
            "apply ConfigMap/demo-config",
            "apply Service/demo-ranks",
            "annotate FineTuneJob/demo",
            "apply Pod/demo-rank-0",
            "apply Pod/demo-rank-1",
        ],
        events=[
            ("Warning", "SpecChangeRefused", "cannot change while the job runs"),
            ("Normal", "Launched", "Running: restarted 2 rank pod(s) (attempt 2)"),
        ],
        requeue=5.0,
        check=_relaunch,
    ),
    Row(
        "the previous gang is still there: delete it and wait",
        job=job(annotations=ATTEMPT_1),
        status=restarting(since=30),
        children=Children(rank_pods=[pod(0), pod(1, deletionTimestamp=ago(1))]),
        phase="Restarting",
        actions=["delete Pod/demo-rank-0 grace=30"],
        events=[],
        requeue=2.0,
    ),
    Row(
        "rank failed permanent: Failed, no restart",
        job=job(annotations=ATTEMPT_1),
        status=launched(),
        children=Children(
            rank_pods=[
                pod(0, "Failed", terminated={"exitCode": 3, "message": "InvalidData: row 4"}),
                pod(1),
            ]
        ),
        phase="Failed",
        conditions={"Failed": ("True", "InvalidData"), "Launched": ("False", "InvalidData")},
        actions=["delete Pod/demo-rank-0 grace=30", "delete Pod/demo-rank-1 grace=30"],
        events=[
            ("Normal", "RanksDeleted", "deleted 2 rank pod(s)"),
            ("Warning", "InvalidData", "Failed: demo-rank-0 failed: InvalidData (exit code 3)"),
        ],
        check=_permanent,
    ),
    Row(
        "rank removed by someone else: an interruption, not a failure",
        job=job(annotations=ATTEMPT_1),
        status=launched(),
        children=Children(rank_pods=[pod(0)]),
        phase="Queued",
        conditions={"Launched": ("False", "Interrupted"), "Queued": ("True", "Interrupted")},
        actions=["delete Pod/demo-rank-0 grace=30"],
        events=[
            ("Warning", "Interrupted", "interruption 1: demo-rank-1: the rank pod was removed"),
            ("Normal", "Interrupted", "Queued: demo-rank-1"),
        ],
        requeue=2.0,
        check=lambda p: _interrupted(p, restarts=0),
    ),
    Row(
        "the whole gang vanished after launch: re-create this attempt",
        job=job(annotations=ATTEMPT_1),
        status=launched(),
        phase="Running",
        actions=["apply Pod/demo-rank-0", "apply Pod/demo-rank-1"],
        events=[("Normal", "RanksRecreated", "re-created 2 rank pod(s), attempt 1")],
    ),
    Row(
        "gates pass: inference Deployment and Service, then Deploying",
        job=job({"inference": {"enabled": True}}, ATTEMPT_1),
        status=launched(),
        children=Children(rank_pods=[succeeded(0, report(True)), succeeded(1)]),
        phase="Deploying",
        conditions={
            "Trained": ("True", "Completed"),
            "Evaluated": ("True", "GatesPassed"),
            "Serving": ("False", "Deploying"),
        },
        actions=["apply Deployment/demo-serve", "apply Service/demo-serve"],
        events=[
            ("Normal", "Evaluated", "gates passed: loss=1.5 (needs < 2) pass"),
            ("Normal", "Deploying", "Deploying: starting 1 inference replica(s)"),
        ],
        requeue=3.0,
        check=_gates_pass,
    ),
    Row(
        "serving replicas ready: Succeeded",
        job=job({"inference": {"enabled": True}}, ATTEMPT_1),
        status={
            **launched(cond("Trained", "True", "Completed")),
            "phase": "Deploying",
            "evalSummary": "loss=1.5 PASS",
        },
        children=Children(
            rank_pods=[succeeded(0), succeeded(1)],
            deployment={"spec": {"replicas": 1}, "status": {"availableReplicas": 1}},
        ),
        phase="Succeeded",
        conditions={"Serving": ("True", "Available")},
        actions=["apply Deployment/demo-serve", "apply Service/demo-serve"],
        events=[("Normal", "Serving", "Succeeded: serving at http://demo-serve.ns.svc:8080")],
    ),
    Row(
        "gates pass without inference: Succeeded",
        job=job(annotations=ATTEMPT_1),
        status=launched(),
        children=Children(rank_pods=[succeeded(0, report(True)), succeeded(1)]),
        phase="Succeeded",
        conditions={"Evaluated": ("True", "GatesPassed")},
        actions=[],
        events=[
            ("Normal", "Evaluated", "gates passed"),
            ("Normal", "Succeeded", "Succeeded: trained and evaluated: loss=1.5 PASS"),
        ],
    ),
    Row(
        "gates fail: Failed GatesFailed, no deploy",
        job=job({"inference": {"enabled": True}}, ATTEMPT_1),
        status=launched(),
        children=Children(rank_pods=[succeeded(0, report(False)), succeeded(1)]),
        phase="Failed",
        conditions={"Evaluated": ("False", "GatesFailed"), "Failed": ("True", "GatesFailed")},
        actions=[],
        events=[("Warning", "GatesFailed", "; model not deployed")],
        check=_gates_fail,
    ),
    Row(
        "no final report from rank 0: ResultsMissing",
        job=job(annotations=ATTEMPT_1),
        status=launched(),
        children=Children(rank_pods=[succeeded(0, 'Succeeded: {"loss": 1.5}'), succeeded(1)]),
        phase="Failed",
        conditions={"Evaluated": ("False", "ResultsMissing")},
        actions=[],
        events=[("Warning", "ResultsMissing", "rank 0 reported no final metrics")],
    ),
    Row(
        "suspend stops the ranks",
        job=job({"runPolicy": {"suspend": True}}, ATTEMPT_1),
        status=launched(),
        children=Children(rank_pods=[pod(0), pod(1)]),
        phase="Suspended",
        conditions={"Suspended": ("True", "Suspended"), "Launched": ("False", "Suspended")},
        actions=["delete Pod/demo-rank-0", "delete Pod/demo-rank-1"],
        events=[
            ("Normal", "RanksDeleted", "deleted 2 rank pod(s)"),
            ("Normal", "Suspended", "Suspended: ranks stopped"),
        ],
    ),
    Row(
        "resume after suspend launches again",
        job=job(annotations=ATTEMPT_1),
        status=launched(
            cond("Suspended", "True", "Suspended"),
            launch=cond("Launched", "False", "Suspended"),
            phase="Suspended",
        ),
        phase="Running",
        conditions={"Suspended": ("False", "Resumed"), "Launched": ("True", "Launched")},
        actions=[
            "apply ConfigMap/demo-config",
            "apply Service/demo-ranks",
            "annotate FineTuneJob/demo",
            "apply Pod/demo-rank-0",
            "apply Pod/demo-rank-1",
        ],
        events=[("Normal", "Launched", "(attempt 2)")],
        requeue=5.0,
    ),
    Row(
        "cancel stops the ranks and ends Cancelled",
        job=job({"runPolicy": {"cancel": True}}, ATTEMPT_1),
        status=launched(),
        children=Children(rank_pods=[pod(0), pod(1)]),
        phase="Cancelled",
        conditions={"Cancelled": ("True", "CancelRequested"), "Launched": ("False", "Cancelled")},
        actions=["delete Pod/demo-rank-0", "delete Pod/demo-rank-1"],
        events=[
            ("Normal", "RanksDeleted", "deleted 2 rank pod(s)"),
            ("Normal", "Cancelled", "Cancelled: cancelled by spec.runPolicy.cancel"),
        ],
    ),
    Row(
        "active deadline exceeded: Failed DeadlineExceeded",
        job=job({"runPolicy": {"activeDeadlineSeconds": 30}}, ATTEMPT_1),
        status=launched(),
        children=Children(rank_pods=[pod(0), pod(1)]),
        phase="Failed",
        conditions={"Failed": ("True", "DeadlineExceeded")},
        actions=["delete Pod/demo-rank-0 grace=30", "delete Pod/demo-rank-1 grace=30"],
        events=[
            ("Normal", "RanksDeleted", "deleted 2 rank pod(s)"),
            ("Warning", "DeadlineExceeded", "ran longer than activeDeadlineSeconds=30"),
        ],
    ),
    Row(
        "active deadline ahead: look again when it is due",
        job=job({"runPolicy": {"activeDeadlineSeconds": 64}}, ATTEMPT_1),
        status=launched(),
        children=Children(rank_pods=[pod(0, "Pending"), pod(1, "Pending")]),
        phase="Running",
        actions=[],
        events=[],
        requeue=4.0,
    ),
    Row(
        "TTL after finish deletes the job",
        job=job({"runPolicy": {"ttlSecondsAfterFinished": 10}}),
        status={"phase": "Succeeded", "completionTime": ago(11)},
        phase="Succeeded",
        actions=["delete FineTuneJob/demo"],
        events=[("Normal", "TTLExpired", "deleting the job 10s after it finished")],
    ),
    Row(
        "TTL with keepAfterTtl orphans the inference objects first",
        job=job({"runPolicy": {"ttlSecondsAfterFinished": 0}, "inference": {"keepAfterTtl": True}}),
        status={"phase": "Failed", "completionTime": ago(1)},
        phase="Failed",
        actions=[
            "orphan Deployment/demo-serve",
            "orphan Service/demo-serve",
            "delete FineTuneJob/demo",
        ],
        events=[("Normal", "TTLExpired", "0s after it finished")],
    ),
    Row(
        "TTL not yet due: look again then",
        job=job({"runPolicy": {"ttlSecondsAfterFinished": 30}}),
        status={"phase": "Cancelled", "completionTime": ago(10)},
        phase="Cancelled",
        actions=[],
        events=[],
        requeue=20.0,
    ),
    Row(
        "finished and serving, the Deployment is gone: Serving False",
        job=job({"inference": {"enabled": True}}),
        status={
            "phase": "Succeeded",
            "endpoint": "http://demo-serve.ns.svc:8080",
            "conditions": [cond("Serving", "True", "Available")],
        },
        phase="Succeeded",
        conditions={"Serving": ("False", "Unavailable")},
        actions=[],
        events=[],
    ),
    Row(
        "invalid spec: Failed InvalidSpec, nothing created",
        job=job({"resources": {"nodes": 0}}),
        children=Children(secret=KEYS),
        phase="Failed",
        conditions={"Validated": ("False", "InvalidSpec"), "Failed": ("True", "InvalidSpec")},
        actions=[],
        events=[("Warning", "InvalidSpec", "spec.resources.nodes")],
        check=_invalid,
    ),
    Row(
        "a name too long for the pods' labels: InvalidSpec, nothing read or created",
        job=_named("x" * 70),
        phase="Failed",
        conditions={"Validated": ("False", "InvalidSpec")},
        actions=[],
        events=[("Warning", "InvalidSpec", "metadata.name")],
        check=_invalid,
    ),
    Row(
        "the credentials Secret does not exist: InvalidSpec naming the field",
        job=job(),
        children=Children(secret=SecretRead("s3-creds", None, found=False)),
        phase="Failed",
        conditions={"Validated": ("False", "InvalidSpec")},
        actions=[],
        events=[("Warning", "InvalidSpec", "Secret not found in namespace ns")],
        check=_no_secret,
    ),
    Row(
        "the API server refused a rank pod (422): delete what was made, InvalidSpec",
        job=job(),
        children=Children(
            secret=KEYS,
            rejection=Rejection(
                '{"details": {"causes": [{"field": "spec.tolerations[0].operator", '
                '"message": "must be Equal"}]}}',
                ("demo-rank-0",),
            ),
        ),
        phase="Failed",
        conditions={"Validated": ("False", "InvalidSpec")},
        actions=["delete Pod/demo-rank-0 grace=0"],
        events=[
            ("Normal", "RanksDeleted", "deleted 1 rank pod(s)"),
            ("Warning", "InvalidSpec", "spec.resources.tolerations[0].operator: must be Equal"),
        ],
        check=_invalid,
    ),
    # ---------------------------------------------------------------- sharing the cluster
    Row(
        "a rank cannot start (its Secret is missing, seen by the kubelet): Failed, naming the ref",
        job=job(annotations=ATTEMPT_1),
        status=launched(),
        children=Children(rank_pods=[pod(0), config_error(1, 'secret "s3-creds" not found')]),
        phase="Failed",
        conditions={"Failed": ("True", "CreateContainerConfigError")},
        actions=["delete Pod/demo-rank-0 grace=0", "delete Pod/demo-rank-1 grace=0"],
        events=[
            ("Normal", "RanksDeleted", "deleted 2 rank pod(s)"),
            (
                "Warning",
                "CreateContainerConfigError",
                'demo-rank-1 cannot start: secret "s3-creds" not found; check '
                "spec.storage.credentialsSecretRef (Secret 's3-creds'",
            ),
        ],
    ),
    Row(
        "a rank cannot start yet, but the Secret may still come: wait",
        job=job(annotations=ATTEMPT_1),
        status=launched(),
        children=Children(
            rank_pods=[pod(0), config_error(1, 'secret "s3-creds" not found', age=5)]
        ),
        phase="Running",
        actions=[],
        events=[],
        requeue=10.0,
    ),
    Row(
        "the store's fence is ahead (a same-named job ran before): relaunch past it",
        job=job(annotations=ATTEMPT_1),
        status=launched(),
        children=Children(
            rank_pods=[
                pod(
                    0,
                    "Failed",
                    terminated={
                        "exitCode": 6,
                        "message": "Superseded: gang attempt 3 superseded this rank (rank 0, ...",
                    },
                ),
                pod(1),
            ]
        ),
        phase="Running",
        conditions={"Launched": ("False", "AttemptRenumbered")},
        actions=[
            "delete Pod/demo-rank-0 grace=0",
            "delete Pod/demo-rank-1 grace=0",
            "annotate FineTuneJob/demo",
        ],
        events=[
            ("Normal", "RanksDeleted", "deleted 2 rank pod(s)"),
            ("Normal", "AttemptRenumbered", "fence names attempt 3 (an earlier job of this name"),
        ],
        requeue=1.0,
        check=lambda p: _renumbered(p, 3),
    ),
    Row(
        "preempted rank: Queued/Interrupted with the scheduler's words, backoffLimit untouched",
        job=job({"runPolicy": {"backoffLimit": 0}}, ATTEMPT_1),
        status=launched(),
        children=Children(
            rank_pods=[pod(0, deletionTimestamp=ago(1)), pod(1)],
            pod_events={"demo-rank-0": [("Preempted", "Preempted by ns/urgent on node node-0")]},
        ),
        phase="Queued",
        conditions={"Launched": ("False", "Interrupted"), "Queued": ("True", "Interrupted")},
        actions=["delete Pod/demo-rank-1 grace=30"],
        events=[
            ("Warning", "Interrupted", "demo-rank-0: Preempted: Preempted by ns/urgent"),
            ("Normal", "Interrupted", "Queued: demo-rank-0"),
        ],
        requeue=2.0,
        check=lambda p: _interrupted(p, restarts=0),
    ),
    Row(
        "rank exited 143 after its SIGTERM checkpoint: an interruption",
        job=job(annotations=ATTEMPT_1),
        status=launched(),
        children=Children(
            rank_pods=[
                pod(0, "Failed", terminated={"exitCode": 143, "message": "Interrupted: x"}),
                pod(1),
            ]
        ),
        phase="Queued",
        conditions={"Launched": ("False", "Interrupted")},
        actions=["delete Pod/demo-rank-1 grace=30"],
        events=[
            ("Warning", "Interrupted", "saved a checkpoint and exited 143"),
            ("Normal", "Interrupted", "Queued: "),
        ],
        requeue=2.0,
        check=lambda p: _interrupted(p, restarts=0),
    ),
    Row(
        "no node has room: Queued/WaitingForCapacity, the scheduler's message and the field",
        job=job({"resources": {"gpusPerNode": 1}}, ATTEMPT_1),
        status=launched(),
        children=Children(rank_pods=[pending(0), pending(1)], nodes=NODES),
        phase="Queued",
        conditions={"Queued": ("True", "WaitingForCapacity")},
        actions=[],
        events=[
            (
                "Normal",
                "WaitingForCapacity",
                "Queued: 2/2 rank(s) waiting for capacity (spec.resources.gpusPerNode): "
                "0/3 nodes are available: 3 Insufficient nvidia.com/gpu.",
            )
        ],
        requeue=10.0,
    ),
    Row(
        "queued past spec.runPolicy.queueTimeoutSeconds: Failed naming the field",
        job=job(
            {"resources": {"gpusPerNode": 1}, "runPolicy": {"queueTimeoutSeconds": 30}}, ATTEMPT_1
        ),
        status=launched(cond("Queued", "True", "WaitingForCapacity", since=31), phase="Queued"),
        children=Children(rank_pods=[pending(0), pending(1)], nodes=NODES),
        phase="Failed",
        conditions={"Failed": ("True", "Unschedulable"), "Queued": ("False", "Unschedulable")},
        actions=["delete Pod/demo-rank-0 grace=0", "delete Pod/demo-rank-1 grace=0"],
        events=[
            ("Normal", "RanksDeleted", "deleted 2 rank pod(s)"),
            ("Warning", "Unschedulable", "queued longer than 30s (spec.runPolicy.queueTimeout"),
        ],
    ),
    Row(
        "queued a day with no timeout set anywhere: still waiting",
        job=job({"resources": {"gpusPerNode": 1}}, ATTEMPT_1),
        status=launched(cond("Queued", "True", "WaitingForCapacity", since=86400), phase="Queued"),
        children=Children(rank_pods=[pending(0), pending(1)], nodes=NODES),
        phase="Queued",
        conditions={"Queued": ("True", "WaitingForCapacity")},
        actions=[],
        events=[],
        requeue=10.0,
        check=lambda p: _since(p, 86400),
    ),
    Row(
        "partial gang past gangTimeoutSeconds: released (not a failure), relaunch after back-off",
        job=job({"resources": {"gpusPerNode": 1}}, ATTEMPT_1),
        status=launched(launch=cond("Launched", "True", "Launched", since=121)),
        children=Children(rank_pods=[pod(0), pending(1)], nodes=NODES),
        phase="Queued",
        conditions={
            "Launched": ("False", "GangReleased"),
            "Queued": ("True", "WaitingForCapacity"),
        },
        actions=[
            "delete Pod/demo-rank-0 grace=0",
            "delete Pod/demo-rank-1 grace=0",
            "annotate FineTuneJob/demo",
        ],
        events=[
            ("Normal", "WaitingForCapacity", "Queued: 1/2 rank(s) waiting"),
            ("Normal", "RanksDeleted", "deleted 2 rank pod(s)"),
            ("Normal", "GangReleased", "only 1/2 rank(s) placed after gangTimeoutSeconds=120"),
        ],
        requeue=pytest.approx(10.86, abs=0.01),  # 10 s base, jitter fixed by the job's name
        check=_released,
    ),
    Row(
        "partial gang within gangTimeoutSeconds: keeps its ranks and waits",
        job=job({"resources": {"gpusPerNode": 1}}, ATTEMPT_1),
        status=launched(
            cond("Queued", "True", "WaitingForCapacity", since=60),
            launch=cond("Launched", "True", "Launched", since=115),
            phase="Queued",
        ),
        children=Children(rank_pods=[pod(0), pending(1)], nodes=NODES),
        phase="Queued",
        actions=[],
        events=[],
        requeue=5.0,
    ),
    Row(
        "more GPUs per node than any node has: Failed at once, naming gpusPerNode",
        job=job({"resources": {"gpusPerNode": 4}}, ATTEMPT_1),
        status=launched(),
        children=Children(rank_pods=[pending(0), pending(1)], nodes=NODES),
        phase="Failed",
        conditions={"Failed": ("True", "Unschedulable")},
        actions=["delete Pod/demo-rank-0 grace=0", "delete Pod/demo-rank-1 grace=0"],
        events=[
            ("Normal", "RanksDeleted", "deleted 2 rank pod(s)"),
            ("Warning", "Unschedulable", "spec.resources.gpusPerNode=4: no node has that many"),
        ],
    ),
    Row(
        "a ResourceQuota refused rank 1: rank 0 given back, Queued/QuotaExceeded, back-off",
        job=job({"resources": {"gpusPerNode": 1}}),
        status={"phase": "Pending", "observedGeneration": 1, "conditions": [VALID]},
        children=Children(quota=QuotaRefusal(QUOTA_403, ("demo-rank-0",))),
        phase="Queued",
        conditions={"Queued": ("True", "QuotaExceeded"), "Launched": ("False", "QuotaExceeded")},
        actions=["delete Pod/demo-rank-0 grace=0", "annotate FineTuneJob/demo"],
        events=[
            (
                "Normal",
                "QuotaExceeded",
                "Queued: ResourceQuota team-gpus is full for requests.nvidia.com/gpu",
            )
        ],
        requeue=pytest.approx(5.31, abs=0.01),  # 5 s at first, jitter fixed by the name
        check=_quota_backoff,
    ),
    Row(
        "a back-off is running (next-launch annotation): no launch yet",
        job=job(annotations={**ATTEMPT_1, ANN_NEXT_LAUNCH: st.now_rfc3339(NOW + timedelta(30))}),
        status=launched(launch=cond("Launched", "False", "GangReleased"), phase="Queued"),
        phase="Queued",
        actions=[],
        events=[],
        requeue=30.0 * 86400,
    ),
    Row(
        "old rank stuck terminating on a node lost past the toleration: force-deleted",
        job=job(annotations=ATTEMPT_1),
        status=launched(launch=cond("Launched", "False", "Interrupted"), phase="Queued"),
        children=Children(
            rank_pods=[pod(0, deletionTimestamp=ago(5)), pod(1, deletionTimestamp=ago(5))],
            nodes={"node-0": NodeInfo("node-0", ready=False, since=ago(61), gpus=1)},
        ),
        phase="Queued",
        actions=["delete Pod/demo-rank-0 grace=0", "delete Pod/demo-rank-1 grace=0"],
        events=[
            ("Warning", "RankForceDeleted", "stuck terminating on lost node node-0"),
            ("Warning", "RankForceDeleted", "demo-rank-1"),
        ],
        requeue=2.0,
    ),
    Row(
        "old rank terminating on a node NotReady for less than the toleration: wait",
        job=job(annotations=ATTEMPT_1),
        status=launched(launch=cond("Launched", "False", "Interrupted"), phase="Queued"),
        children=Children(
            rank_pods=[pod(0, deletionTimestamp=ago(5))],
            nodes={"node-0": NodeInfo("node-0", ready=False, since=ago(30), gpus=1)},
        ),
        phase="Queued",
        actions=[],
        events=[],
        requeue=2.0,
    ),
    Row(
        "maxGpuHours spent: ranks stop with their own grace, Failed BudgetExceeded",
        job=job({"resources": {"gpusPerNode": 1}, "runPolicy": {"maxGpuHours": 0.01}}, ATTEMPT_1),
        status=launched(),
        children=Children(rank_pods=[gpu_pod(0, 30), gpu_pod(1, 30)]),
        phase="Failed",
        conditions={"Failed": ("True", "BudgetExceeded")},
        actions=["delete Pod/demo-rank-0", "delete Pod/demo-rank-1"],
        events=[
            ("Normal", "RanksDeleted", "deleted 2 rank pod(s)"),
            ("Warning", "BudgetExceeded", "used 0.01667 GPU-hours of spec.runPolicy.maxGpuHours"),
        ],
        check=_budget,
    ),
]


@pytest.mark.parametrize("row", ROWS, ids=[r.id for r in ROWS])
def test_plan(row: Row) -> None:
    status = FineTuneJobStatus.model_validate(row.status)
    body_before, status_before = copy.deepcopy(row.job), status.model_copy(deep=True)
    p = plan(row.job, status, row.children, NOW, SETTINGS)

    assert p.status.phase == row.phase
    for type_, (want, reason) in row.conditions.items():
        got = st.get_condition(p.status, type_)
        assert got is not None, type_
        assert (got.status, got.reason) == (want, reason), (type_, got)
    assert [describe(a) for a in p.actions] == row.actions
    assert [(e.type, e.reason) for e in p.events] == [(t, r) for t, r, _ in row.events]
    for event, (_, _, fragment) in zip(p.events, row.events, strict=True):
        assert fragment in event.message, (event, fragment)
    assert p.requeue == row.requeue
    if row.check is not None:
        row.check(p)
    # Pure: the inputs are left as they were, and the same inputs give the same plan.
    assert row.job == body_before and status == status_before
    assert plan(row.job, status, row.children, NOW, SETTINGS) == p


NEEDS = [
    ("fresh job: rank pods and the Secret", job(), {}, Needs(rank_pods=True, secret="s3-creds")),
    (
        "validated this generation: no Secret",
        job(),
        launched(),
        Needs(rank_pods=True, launched=True),
    ),
    (
        "trained, deploying: the Deployment too",
        job({"inference": {"enabled": True}}),
        launched(cond("Trained", "True", "Completed")),
        Needs(rank_pods=True, deployment=True, launched=True),
    ),
    # A name too long for a label value would make the pod list itself fail (HTTP 400).
    ("invalid spec: nothing", _named("x" * 70), {}, Needs()),
    ("finished: nothing", job(), {"phase": "Failed"}, Needs()),
    (
        "finished and serving: the Deployment",
        job(),
        {"phase": "Succeeded", "endpoint": "e", "conditions": [cond("Serving", "True", "A")]},
        Needs(deployment=True),
    ),
]


@pytest.mark.parametrize(
    ("body", "status", "want"), [n[1:] for n in NEEDS], ids=[n[0] for n in NEEDS]
)
def test_needs(body: Obj, status: Obj, want: Needs) -> None:
    assert needs(body, FineTuneJobStatus.model_validate(status)) == want


def test_a_row_can_fail() -> None:
    """The table checks specific names: a plan that names another child fails its row."""
    row = ROWS[0]
    p = plan(row.job, FineTuneJobStatus(), row.children, NOW, SETTINGS)
    renamed = [describe(a).replace("demo-rank-1", "demo-rank-9") for a in p.actions]
    assert renamed != row.actions


def test_plan_imports_no_cluster_client() -> None:
    code = (
        "import sys, kubetune_operator.reconcile.plan\n"
        "bad = [m for m in ('kopf', 'kubernetes', 'torch') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


# --------------------------------------------------------------------------- the executor


class FakeApi:
    """kube.py's functions the executor calls, recorded; no API server."""

    def __init__(self, body: Obj, pods: list[Obj], reject: str | None = None) -> None:
        self.body, self.pods, self.reject = body, pods, reject
        self.calls: list[str] = []
        self.status_patches: list[Obj] = []
        self.events: list[str] = []

    def install(self, mp: pytest.MonkeyPatch) -> None:
        mp.setattr(kube, "get_job", lambda ns, name: copy.deepcopy(self.body))
        mp.setattr(kube, "list_pods", lambda ns, sel: copy.deepcopy(self.pods))
        mp.setattr(kube, "secret_keys", lambda ns, name: set(KEYS.keys or ()))
        mp.setattr(kube, "apply", self.apply)
        mp.setattr(kube, "delete", self.delete)
        mp.setattr(
            kube, "annotate_job", lambda ns, name, ann: self.calls.append(f"annotate {name}")
        )
        mp.setattr(kube, "patch_job_status", lambda ns, name, p: self.status_patches.append(p))
        mp.setattr(kube, "emit_event", lambda body, t, reason, msg: self.events.append(reason))
        mp.setenv(executor.IMAGE_ENV, "img:1")

    def apply(self, obj: Obj) -> Obj:
        name = obj["metadata"]["name"]
        if obj["kind"] == "Pod" and name == self.reject:
            raise kube.ApiError(422, '{"message": "bad pod"}')
        self.calls.append(f"apply {obj['kind']}/{name}")
        return obj

    def delete(self, kind: str, ns: str, name: str, grace: int | None = None) -> bool:
        self.calls.append(f"delete {kind}/{name} grace={grace}")
        return True


def test_executor_acts_in_order_then_patches_status_once(monkeypatch: pytest.MonkeyPatch) -> None:
    api = FakeApi(job(), [])
    api.install(monkeypatch)
    result = executor.reconcile("ns", "demo", "create", JobState())
    assert result is not None and result.status.phase == "Running"
    assert api.calls == [
        "apply ConfigMap/demo-config",
        "apply Service/demo-ranks",
        "annotate demo",
        "apply Pod/demo-rank-0",
        "apply Pod/demo-rank-1",
    ]
    assert len(api.status_patches) == 1 and api.status_patches[0]["phase"] == "Running"
    assert api.status_patches[0]["observedGeneration"] == 1
    assert api.events == ["Launched"]


def test_executor_replans_when_a_rank_pod_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    api = FakeApi(job(), [], reject="demo-rank-1")
    api.install(monkeypatch)
    with pytest.raises(executor.InvalidSpec):
        executor.reconcile("ns", "demo", "create", JobState())
    assert api.calls[-1] == "delete Pod/demo-rank-0 grace=0"
    (patch,) = api.status_patches
    assert patch["phase"] == "Failed"
    assert "the API server rejected the rank pods: bad pod" in str(patch["conditions"])
    assert api.events == ["RanksDeleted", "InvalidSpec"]


def test_job_state_is_freed_with_the_memo() -> None:
    from kubetune_operator.reconcile.state import JobIndex

    index = JobIndex()
    memo: dict[str, Any] = {"state": index.get("ns", "demo")}
    assert index.get("ns", "demo") is memo["state"] and len(index) == 1
    assert memo["state"].first_running() and not memo["state"].first_running()
    memo.clear()  # kopf drops the object's memo when the job is deleted
    assert len(index) == 0
