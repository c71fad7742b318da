"""Level-triggered reconcile of one FineTuneJob: read the job and its children, decide, act.

Every trigger (create/update/resume, pod events, the timer) calls `reconcile`; it is idempotent
because children have fixed names, so a retried or duplicated pass never duplicates anything.
Decisions read conditions; the phase is derived for people.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from kubetune_operator import __version__, kube, metrics
from kubetune_operator import status as st
from kubetune_operator.api.models import (
    TERMINAL_PHASES,
    CheckpointRef,
    FineTuneJob,
    FineTuneJobSpec,
    FineTuneJobStatus,
)
from kubetune_operator.api.validation import SpecError
from kubetune_operator.builders import inference, pods
from kubetune_operator.builders.configmap import build_config_map
from kubetune_operator.builders.service import build_headless_service
from kubetune_operator.builders.trainer_config import run_prefix
from kubetune_operator.handlers.validate import describe, validate_job

log = logging.getLogger("kubetune.controller")
Obj = dict[str, Any]

ANN_PREFIX = "kubetune.io"
ANN_ATTEMPT = f"{ANN_PREFIX}/attempt"
ANN_SPEC_HASH = f"{ANN_PREFIX}/spec-hash"
ANN_LAUNCHED_SPEC = f"{ANN_PREFIX}/launched-spec"
IMAGE_ENV = "KUBETUNE_TRAINER_IMAGE"
BACKOFF_ENV = "KUBETUNE_RESTART_BACKOFF_SECONDS"
# How long a rank may stay unschedulable (no node has what the spec asks for) before the job
# fails; long enough for a cluster autoscaler to add a node.
UNSCHEDULABLE_ENV = "KUBETUNE_UNSCHEDULABLE_TIMEOUT_SECONDS"
# Grace for ranks of a gang that is being torn down after a failure: the survivors may be stuck
# in a collective with the dead rank, so they get little time.
GANG_TEARDOWN_GRACE = 30
SCRAPE_TIMEOUT = 2.0

_locks: dict[tuple[str, str], threading.Lock] = {}
_locks_guard = threading.Lock()
# First (time, step) seen per job attempt: the step rate for the ETA.
_rates: dict[tuple[str, str, str], tuple[float, int]] = {}
_running_seen: set[str] = set()


def _lock(namespace: str, name: str) -> threading.Lock:
    with _locks_guard:
        return _locks.setdefault((namespace, name), threading.Lock())


def trainer_image(job: FineTuneJob) -> str:
    return job.spec.resources.image or os.environ.get(IMAGE_ENV) or pods.default_image(__version__)


class InvalidSpec(Exception):
    """The job was marked Failed/InvalidSpec; create/update handlers turn it into PermanentError."""


@dataclass
class Ctx:
    body: Obj
    status: FineTuneJobStatus
    before: Obj
    now: datetime
    events: list[tuple[str, str, str]] = field(default_factory=list)
    requeue: float | None = None

    @property
    def namespace(self) -> str:
        return str(self.body["metadata"]["namespace"])

    @property
    def name(self) -> str:
        return str(self.body["metadata"]["name"])

    @property
    def generation(self) -> int | None:
        gen = self.body["metadata"].get("generation")
        return int(gen) if gen is not None else None

    @property
    def annotations(self) -> dict[str, str]:
        return dict(self.body["metadata"].get("annotations") or {})

    def cond(self, type_: str, value: bool | str, reason: str, message: str = "") -> bool:
        return st.set_condition(
            self.status, type_, value, reason, message, now=self.now, generation=self.generation
        )

    def event(self, type_: str, reason: str, message: str) -> None:
        self.events.append((type_, reason, message))

    def phase(self, phase: str, reason: str, message: str) -> None:
        """Move to `phase`; every phase change is an Event."""
        if self.status.phase == phase:
            return
        self.status.phase = phase  # type: ignore[assignment]
        warn = phase in ("Failed", "Restarting")
        self.event("Warning" if warn else "Normal", reason, f"{phase}: {message}")
        if phase in TERMINAL_PHASES and not self.status.completion_time:
            self.status.completion_time = st.now_rfc3339(self.now)

    def again(self, seconds: float) -> None:
        self.requeue = seconds if self.requeue is None else min(self.requeue, seconds)


def reconcile(namespace: str, name: str, trigger: str, scrape: bool = False) -> Ctx | None:
    """One pass for one job; returns the context (for the handlers' error mapping)."""
    started = time.monotonic()
    with _lock(namespace, name):
        body = kube.get_job(namespace, name)
        if body is None or body["metadata"].get("deletionTimestamp"):
            metrics.observe_phase(f"{namespace}/{name}", None)
            return None
        raw = body.get("status") or {}
        try:
            status = FineTuneJobStatus.model_validate(raw)
        except ValueError:
            log.warning("%s/%s: unreadable status; starting over", namespace, name)
            status = FineTuneJobStatus()
        ctx = Ctx(body, status, status.wire(), datetime.now(UTC))
        try:
            _reconcile(ctx, scrape)
        finally:
            _flush(ctx)
            metrics.observe_phase(f"{namespace}/{name}", ctx.status.phase)
            metrics.reconcile_seconds.labels(trigger=trigger).observe(time.monotonic() - started)
        return ctx


def _flush(ctx: Ctx) -> None:
    after = ctx.status.wire()
    if after != ctx.before:
        after.setdefault("observedGeneration", ctx.generation)
        kube.patch_job_status(ctx.namespace, ctx.name, st.merge_patch(ctx.before, after))
    for type_, reason, message in ctx.events:
        log.info("%s/%s %s: %s", ctx.namespace, ctx.name, reason, message)
        kube.emit_event(ctx.body, type_, reason, message)


# --------------------------------------------------------------------------- the decision tree


def _reconcile(ctx: Ctx, scrape: bool) -> None:
    s = ctx.status
    if s.phase in TERMINAL_PHASES:
        _finished(ctx)
        return
    job = _validated(ctx)
    if job is None:
        raise InvalidSpec(ctx.name)
    job = _guard_spec_change(ctx, job)
    policy = job.spec.run_policy
    if policy.cancel:
        _stop_ranks(ctx, job, grace=None)
        ctx.cond(st.CANCELLED, True, "CancelRequested", "spec.runPolicy.cancel is true")
        ctx.cond(st.LAUNCHED, False, "Cancelled", "ranks stopped with a final checkpoint")
        ctx.phase("Cancelled", "Cancelled", "cancelled by spec.runPolicy.cancel")
        return
    if st.deadline_exceeded(s.start_time, policy.active_deadline_seconds, ctx.now):
        _stop_ranks(ctx, job, grace=GANG_TEARDOWN_GRACE)
        msg = f"ran longer than activeDeadlineSeconds={policy.active_deadline_seconds}"
        ctx.cond(st.FAILED, True, "DeadlineExceeded", msg)
        ctx.cond(st.LAUNCHED, False, "DeadlineExceeded", msg)
        ctx.phase("Failed", "DeadlineExceeded", msg)
        return
    if st.is_true(s, st.TRAINED):
        _deploy(ctx, job)
        return
    if policy.suspend:
        _stop_ranks(ctx, job, grace=None)
        ctx.cond(st.SUSPENDED, True, "Suspended", "ranks stopped; checkpoints kept")
        ctx.cond(st.LAUNCHED, False, "Suspended", "suspended by spec.runPolicy.suspend")
        ctx.phase("Suspended", "Suspended", "ranks stopped; checkpoints stay in the store")
        return
    if st.is_true(s, st.SUSPENDED):
        ctx.cond(st.SUSPENDED, False, "Resumed", "resuming from the newest checkpoint")
    if st.is_true(s, st.LAUNCHED):
        _watch_ranks(ctx, job, scrape)
    else:
        _launch(ctx, job)
    if policy.active_deadline_seconds and s.start_time:
        left = st.seconds_until(s.start_time, policy.active_deadline_seconds, ctx.now)
        ctx.again(max(1.0, left))


def _validated(ctx: Ctx) -> FineTuneJob | None:
    # The Secret is read once per spec generation, not on every pass: at 500 jobs the extra
    # GET per 5 s timer tick was a large share of the API traffic (benchmarks/operator_scale.py),
    # and a Secret removed mid-run must not fail a job whose pods already hold the keys.
    checked = (
        st.is_true(ctx.status, st.VALIDATED) and ctx.status.observed_generation == ctx.generation
    )
    try:
        job = validate_job(ctx.body, check_secret=not checked)
    except SpecError as err:
        msg = describe(err)
        ctx.cond(st.VALIDATED, False, "InvalidSpec", msg)
        ctx.cond(st.FAILED, True, "InvalidSpec", msg)
        ctx.phase("Failed", "InvalidSpec", msg)  # the phase change is the Event
        return None
    ctx.cond(st.VALIDATED, True, "Valid", "spec and preflight checks passed")
    return job


def _guard_spec_change(ctx: Ctx, job: FineTuneJob) -> FineTuneJob:
    """Refuse changes to fields fixed at launch: keep running the launched spec."""
    ann = ctx.annotations
    launched_hash, launched_raw = ann.get(ANN_SPEC_HASH), ann.get(ANN_LAUNCHED_SPEC)
    if not launched_hash or not launched_raw or launched_hash == st.spec_hash(job.spec):
        st.remove_condition(ctx.status, st.SPEC_CHANGE_REFUSED)
        return job
    # Raw specs as the user wrote them (not wire(): defaults such as credentialsSecretRef's
    # key names would trip the inline-secret check when re-validated).
    launched = json.loads(launched_raw)
    current = dict(ctx.body.get("spec") or {})
    fields = st.changed_fields(st.immutable_spec(launched), st.immutable_spec(current))
    msg = (
        f"{', '.join(fields[:8]) or 'spec'} cannot change while the job runs; the job continues "
        "with the launched spec (mutable: runPolicy.suspend/cancel/backoffLimit/"
        "activeDeadlineSeconds/ttlSecondsAfterFinished, inference.*)"
    )
    if ctx.cond(st.SPEC_CHANGE_REFUSED, True, "ImmutableField", msg):
        ctx.event("Warning", "SpecChangeRefused", msg)
    # Launched training spec + the current mutable fields.
    merged = dict(launched)
    merged["runPolicy"] = current.get("runPolicy", {})
    merged["inference"] = current.get("inference", {})
    spec = FineTuneJobSpec.model_validate(merged)
    return job.model_copy(update={"spec": spec})


def _owner(ctx: Ctx) -> Obj:
    return ctx.body


def _rank_pods(ctx: Ctx) -> list[Obj]:
    return kube.list_pods(ctx.namespace, pods.rank_selector(ctx.name))


def _stop_ranks(ctx: Ctx, job: FineTuneJob, grace: int | None) -> None:
    """Delete every rank; the default grace lets the trainer save a final checkpoint."""
    deleted = kube.delete_by_label("Pod", ctx.namespace, pods.rank_selector(ctx.name), grace)
    if deleted:
        ctx.event("Normal", "RanksDeleted", f"deleted {deleted} rank pod(s)")


def _attempt(ctx: Ctx) -> int:
    try:
        return int(ctx.annotations.get(ANN_ATTEMPT, "0"))
    except ValueError:
        return 0


def _launch(ctx: Ctx, job: FineTuneJob) -> None:
    s = ctx.status
    launched = st.get_condition(s, st.LAUNCHED)
    if launched is not None and launched.reason == "GangRestart":
        base = float(os.environ.get(BACKOFF_ENV, "10"))
        wait = st.seconds_until(
            launched.last_transition_time, st.restart_delay(s.restarts - 1, base), ctx.now
        )
        if wait > 0:
            ctx.again(wait)
            return
    # Same pod names for every attempt: wait until the previous gang is gone.
    leftovers = _rank_pods(ctx)
    if leftovers:
        for pod in leftovers:
            if not pod["metadata"].get("deletionTimestamp"):
                kube.delete("Pod", ctx.namespace, pod["metadata"]["name"], GANG_TEARDOWN_GRACE)
        ctx.again(2.0)
        return
    attempt = _attempt(ctx) + 1
    owner = _owner(ctx)
    kube.apply(build_config_map(job, owner=owner))
    kube.apply(build_headless_service(job, owner=owner))
    # Record the attempt and the launched spec before the pods exist, so a restarted operator
    # recognises them as current and never launches a second gang.
    annotations: dict[str, str | None] = {ANN_ATTEMPT: str(attempt)}
    if ANN_SPEC_HASH not in ctx.annotations:
        annotations[ANN_SPEC_HASH] = st.spec_hash(job.spec)
        annotations[ANN_LAUNCHED_SPEC] = json.dumps(ctx.body.get("spec") or {}, sort_keys=True)
    kube.annotate_job(ctx.namespace, ctx.name, annotations)
    ctx.body["metadata"].setdefault("annotations", {}).update(annotations)
    try:
        for pod in pods.build_rank_pods(job, attempt, image=trainer_image(job), owner=owner):
            kube.apply(pod)
    except kube.ApiError as err:
        if err.status != 422:
            raise
        # The spec passed our checks but makes an invalid pod (e.g. a toleration with
        # operator Exists and a value): retrying cannot fix it.
        _stop_ranks(ctx, job, grace=0)
        msg = st.pod_rejection(err.body)
        ctx.cond(st.VALIDATED, False, "InvalidSpec", msg)
        ctx.cond(st.FAILED, True, "InvalidSpec", msg)
        ctx.phase("Failed", "InvalidSpec", msg)
        raise InvalidSpec(ctx.name) from None
    nodes = job.spec.resources.nodes
    ctx.cond(st.LAUNCHED, True, "Launched", f"{nodes} rank pod(s), attempt {attempt}")
    if s.start_time is None:
        s.start_time = st.now_rfc3339(ctx.now)
    verb = "restarted" if s.restarts else "launched"
    ctx.phase("Running", "Launched", f"{verb} {nodes} rank pod(s) (attempt {attempt})")
    ctx.again(5.0)


def _watch_ranks(ctx: Ctx, job: FineTuneJob, scrape: bool) -> None:
    s = ctx.status
    attempt = str(_attempt(ctx))
    nodes = job.spec.resources.nodes
    current = {
        p["metadata"]["name"]: p
        for p in _rank_pods(ctx)
        if p["metadata"].get("labels", {}).get(pods.ATTEMPT_LABEL) == attempt
    }
    if not current and not _rank_pods(ctx):
        # The launch was interrupted (operator restarted between the annotation and the pods),
        # or someone removed the whole gang: re-create this attempt; names make it idempotent.
        for pod in pods.build_rank_pods(
            job, int(attempt), image=trainer_image(job), owner=_owner(ctx)
        ):
            kube.apply(pod)
        ctx.event("Normal", "RanksRecreated", f"re-created {nodes} rank pod(s), attempt {attempt}")
        return
    failures = [f for p in current.values() if (f := st.classify_failure(p)) is not None]
    names = [pods.pod_name(ctx.name, r) for r in range(nodes)]
    missing = [
        n for n in names if n not in current or current[n]["metadata"].get("deletionTimestamp")
    ]
    if not failures and missing:
        failures = [st.Failure(missing[0], "", None, "PodLost", "rank pod disappeared", True)]
    if not failures:
        limit = float(os.environ.get(UNSCHEDULABLE_ENV, "600"))
        failures = [f for p in current.values() if (f := st.unschedulable(p, ctx.now, limit))]
    if failures:
        _on_failure(ctx, job, sorted(failures, key=lambda f: f.retryable)[0])
        return
    phases = [str((p.get("status") or {}).get("phase")) for p in current.values()]
    if phases.count("Succeeded") == nodes:
        _on_trained(ctx, job, current[pods.pod_name(ctx.name, 0)])
        return
    if "Running" in phases and ctx.body["metadata"]["uid"] not in _running_seen:
        _running_seen.add(ctx.body["metadata"]["uid"])
        created = st.parse_time(ctx.body["metadata"].get("creationTimestamp"))
        if created is not None and s.restarts == 0:
            metrics.time_to_running_seconds.observe((ctx.now - created).total_seconds())
    if scrape:
        _scrape(ctx, job, current.get(pods.pod_name(ctx.name, 0)), attempt)
    ctx.again(10.0)


def _on_failure(ctx: Ctx, job: FineTuneJob, failure: st.Failure) -> None:
    s = ctx.status
    base = float(os.environ.get(BACKOFF_ENV, "10"))
    decision = st.decide_restart(failure, s.restarts, job.spec.run_policy.backoff_limit, base)
    s.last_failure = failure.info()
    _stop_ranks(ctx, job, grace=GANG_TEARDOWN_GRACE)
    if decision.restart:
        s.restarts += 1
        metrics.restarts_total.labels(namespace=ctx.namespace).inc()
        ctx.cond(st.LAUNCHED, False, "GangRestart", decision.message)
        ctx.event("Warning", "GangRestart", decision.message)
        ctx.status.phase = "Running"  # so the Restarting transition below always emits an event
        ctx.phase("Restarting", decision.reason, decision.message)
        ctx.again(decision.delay)
        return
    ctx.cond(st.LAUNCHED, False, decision.reason, decision.message)
    ctx.cond(st.TRAINED, False, decision.reason, decision.message)
    ctx.cond(st.FAILED, True, decision.reason, decision.message)
    ctx.phase("Failed", decision.reason, decision.message)


def _terminated_message(pod: Obj) -> str | None:
    for cs in (pod.get("status") or {}).get("containerStatuses") or []:
        term = (cs.get("state") or {}).get("terminated")
        if term:
            return str(term.get("message") or "")
    return None


def _on_trained(ctx: Ctx, job: FineTuneJob, rank0: Obj) -> None:
    """All ranks Succeeded: decide the gates from rank 0's termination message.

    Why the termination message and not eval.json: it needs no S3 access and no Secret in the
    operator; the trainer puts the final metrics there (`Succeeded: {json}`), and the full
    report stays in the store for people.
    """
    s = ctx.status
    ctx.cond(st.TRAINED, True, "Completed", "every rank exited 0")
    s.model_uri = inference.model_uri(job)
    final = st.parse_success_message(_terminated_message(rank0))
    if final is None:
        msg = "rank 0 reported no final metrics (termination message missing); see eval.json"
        ctx.cond(st.EVALUATED, False, "ResultsMissing", msg)
        ctx.cond(st.FAILED, True, "ResultsMissing", msg)
        ctx.phase("Failed", "ResultsMissing", msg)
        return
    decision = st.decide_gates(job.spec.evaluation, job.spec.task, final)
    s.metrics = {**s.metrics, **{f"test_{k}": v for k, v in decision.metrics.items()}}
    s.eval_summary = decision.summary
    metrics.gate_results_total.labels(result="pass" if decision.passed else "fail").inc()
    if s.progress is not None:
        s.progress.percent = 100
        s.progress.step = max(s.progress.step, s.progress.total_steps)
        s.progress.eta_seconds = 0
    if not decision.passed:
        ctx.cond(st.EVALUATED, False, "GatesFailed", decision.message)
        ctx.cond(st.FAILED, True, "GatesFailed", decision.message + "; model not deployed")
        ctx.phase("Failed", "GatesFailed", decision.message + "; model not deployed")
        return
    ctx.cond(st.EVALUATED, True, "GatesPassed", decision.message)
    ctx.event("Normal", "Evaluated", decision.message)
    _deploy(ctx, job)


def _deploy(ctx: Ctx, job: FineTuneJob) -> None:
    s = ctx.status
    if not job.spec.inference.enabled:
        ctx.phase("Succeeded", "Succeeded", f"trained and evaluated: {s.eval_summary}")
        return
    image = trainer_image(job)
    dep = kube.apply(inference.build_deployment(job, image=image, owner=_owner(ctx)))
    kube.apply(inference.build_serve_service(job, owner=_owner(ctx)))
    s.endpoint = inference.endpoint(job)
    want = job.spec.inference.replicas
    available = int((dep.get("status") or {}).get("availableReplicas") or 0)
    if want > 0 and available >= want:
        ctx.cond(
            st.SERVING, True, "Available", f"{available}/{want} replica(s) ready at {s.endpoint}"
        )
        ctx.phase("Succeeded", "Serving", f"serving at {s.endpoint}")
        return
    ctx.cond(st.SERVING, False, "Deploying", f"{available}/{want} replica(s) ready")
    ctx.phase("Deploying", "Deploying", f"starting {want} inference replica(s)")
    ctx.again(3.0)


def _finished(ctx: Ctx) -> None:
    """Terminal: never recreate children; keep Serving honest; apply the TTL."""
    s = ctx.status
    ttl = ((ctx.body.get("spec") or {}).get("runPolicy") or {}).get("ttlSecondsAfterFinished")
    if s.endpoint and st.is_true(s, st.SERVING):
        dep = kube.get("Deployment", ctx.namespace, inference.serve_name(ctx.name))
        want = int(((dep or {}).get("spec") or {}).get("replicas") or 0)
        available = int(((dep or {}).get("status") or {}).get("availableReplicas") or 0)
        if dep is None or (want > 0 and available < want):
            ctx.cond(st.SERVING, False, "Unavailable", f"{available}/{want} replica(s) ready")
    if not isinstance(ttl, int) or isinstance(ttl, bool) or ttl < 0:
        return  # unset, or the raw spec of a job that failed validation holds anything here
    if not st.ttl_expired(s.completion_time, int(ttl), ctx.now):
        ctx.again(max(1.0, st.seconds_until(s.completion_time, float(ttl), ctx.now)))
        return
    keep = bool(((ctx.body.get("spec") or {}).get("inference") or {}).get("keepAfterTtl"))
    if keep:
        # Orphan the inference objects first, so the garbage collector leaves them alone.
        for kind in ("Deployment", "Service"):
            if kube.get(kind, ctx.namespace, inference.serve_name(ctx.name)) is not None:
                kube.patch(
                    kind,
                    ctx.namespace,
                    inference.serve_name(ctx.name),
                    {"metadata": {"ownerReferences": None}},
                )
    ctx.event("Normal", "TTLExpired", f"deleting the job {ttl}s after it finished")
    kube.delete("FineTuneJob", ctx.namespace, ctx.name)


# --------------------------------------------------------------------------- progress


def _scrape(ctx: Ctx, job: FineTuneJob, rank0: Obj | None, attempt: str) -> None:
    """Progress from rank 0's Prometheus endpoint.

    Why scrape and not progress.json: the operator then needs no S3 client and no Secret; the
    store stays the truth for people and for resuming.
    """
    if rank0 is None or (rank0.get("status") or {}).get("phase") != "Running":
        return
    ip = (rank0.get("status") or {}).get("podIP")
    if not ip:
        return
    try:
        with urllib.request.urlopen(
            f"http://{ip}:{pods.METRICS_PORT}/metrics", timeout=SCRAPE_TIMEOUT
        ) as resp:
            text = resp.read().decode()
    except OSError as exc:
        log.debug("%s/%s: metrics not reachable yet: %s", ctx.namespace, ctx.name, exc)
        return
    scrape = st.parse_metrics(text)
    if scrape.step is None:
        return
    key = (ctx.namespace, ctx.name, attempt)
    now = time.monotonic()
    first = _rates.setdefault(key, (now, scrape.step))
    rate = (scrape.step - first[1]) / (now - first[0]) if now > first[0] else None
    progress = st.progress_from_scrape(scrape, rate if rate and rate > 0 else None)
    s = ctx.status
    if progress is not None:
        s.progress = progress
    if scrape.loss is not None:
        s.metrics = {**s.metrics, "train_loss": round(scrape.loss, 6)}
    s.metrics = {**s.metrics, **{k: round(v, 6) for k, v in scrape.eval_metrics.items()}}
    if scrape.checkpoint_step and job.spec.storage is not None:
        prefix = run_prefix(job.spec.storage, ctx.namespace, ctx.name)
        known = {c.step for c in s.checkpoints}
        if scrape.checkpoint_step not in known:
            ref = CheckpointRef(
                step=scrape.checkpoint_step,
                uri=f"{prefix}/checkpoints/step-{scrape.checkpoint_step}",
                time=st.now_rfc3339(ctx.now),
            )
            keep = job.spec.checkpointing.keep_last
            s.checkpoints = sorted([*s.checkpoints, ref], key=lambda c: c.step)[-keep:]
