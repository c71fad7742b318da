"""The reconcile plan: everything one pass decides for one FineTuneJob, with no I/O.

`plan(job, status, children, now, settings)` takes the job as the API server holds it, its
status, and a snapshot of what exists (`Children`), and returns a `Plan`: the new status, the
events, the actions in the order the executor performs them, and when to look again.

The steps, in order (the first that applies ends the pass):
  1. terminal phase: keep Serving honest, apply the TTL; never recreate children
  2. validate the spec (InvalidSpec ends the job)
  3. refuse changes to fields fixed at launch (the launched spec keeps running)
  4. cancel, 5. active deadline, 6. trained: deploy, 7. suspend
  8. budget (maxGpuHours) spent: stop after a checkpoint
  9. not launched: launch the gang (after its back-off); launched: watch the ranks, which
     may be queued (no capacity, quota), interrupted (preempted, evicted), failed or done
Usage (GPU-seconds, attempts, cost) is brought up to date at the end of every pass and written
at transitions or once a minute (reconcile/usage.py).
Decisions read conditions; the phase is derived for people, and every phase change is an Event.
"""

from __future__ import annotations

import json
import re
from datetime import datetime, timedelta

from kubetune_operator import status as st
from kubetune_operator.api.models import (
    TERMINAL_PHASES,
    CheckpointRef,
    FailureInfo,
    FineTuneJob,
    FineTuneJobSpec,
    FineTuneJobStatus,
    Progress,
)
from kubetune_operator.api.validation import SpecError
from kubetune_operator.builders import inference
from kubetune_operator.builders.common import ATTEMPT_LABEL, pod_name, serve_name
from kubetune_operator.builders.configmap import build_config_map
from kubetune_operator.builders.pods import METRICS_PORT, build_rank_pods
from kubetune_operator.builders.service import build_headless_service
from kubetune_operator.builders.trainer_config import run_prefix
from kubetune_operator.reconcile import scheduling as sched
from kubetune_operator.reconcile import usage as usage_
from kubetune_operator.reconcile.checks import describe, secret_name, validate_job
from kubetune_operator.reconcile.plan_types import (
    Action,
    Annotate,
    Apply,
    Children,
    Delete,
    Event,
    GangRestarted,
    GateResult,
    Needs,
    Obj,
    Observation,
    Orphan,
    Plan,
    QuotaRefusal,
    RankRunning,
    Rejection,
    Sample,
    ScrapeTarget,
    Settings,
    UsageSample,
)
from kubetune_trainer.config import FinalReport

ANN_PREFIX = "kubetune.io"
ANN_ATTEMPT = f"{ANN_PREFIX}/attempt"
ANN_SPEC_HASH = f"{ANN_PREFIX}/spec-hash"
ANN_LAUNCHED_SPEC = f"{ANN_PREFIX}/launched-spec"
# Not before this time (RFC 3339) may the next gang launch: back-off after a quota refusal or a
# released partial gang. An annotation, so the wait survives an operator restart.
ANN_NEXT_LAUNCH = f"{ANN_PREFIX}/next-launch"
# Grace for ranks of a gang that is being torn down after a failure: the survivors may be stuck
# in a collective with the dead rank, so they get little time.
GANG_TEARDOWN_GRACE = 30


class _Draft:
    """The plan being built: conditions, phase changes (each an Event), actions, requeue."""

    def __init__(self, job: Obj, status: FineTuneJobStatus, now: datetime, settings: Settings):
        self.body = job
        self.status = status
        self.now = now
        self.settings = settings
        self.events: list[Event] = []
        self.actions: list[Action] = []
        self.observations: list[Observation] = []
        self.requeue: float | None = None
        self.scrape: ScrapeTarget | None = None
        self.invalid_spec = False
        self.launched_now = False  # a gang was launched this pass (a new attempt)

    @property
    def namespace(self) -> str:
        return str(self.body["metadata"].get("namespace") or "default")

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
        self.events.append(Event(type_, reason, message))

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

    def result(self) -> Plan:
        return Plan(
            status=self.status,
            events=self.events,
            actions=self.actions,
            requeue=self.requeue,
            observations=self.observations,
            scrape=self.scrape,
            invalid_spec=self.invalid_spec,
        )


# --------------------------------------------------------------------------- entry points


def needs(job: Obj, status: FineTuneJobStatus) -> Needs:
    """What the executor must read for `plan`: nothing for a spec that fails validation (its
    name may not even make a valid label selector), no rank pods for a finished job."""
    if status.phase in TERMINAL_PHASES:
        return Needs(deployment=bool(status.endpoint and st.is_true(status, st.SERVING)))
    try:
        validate_job(job)  # without the Secret: that check only counts when the rest is valid
    except SpecError:
        return Needs()
    inference_on = bool(((job.get("spec") or {}).get("inference") or {}).get("enabled"))
    return Needs(
        rank_pods=True,
        deployment=inference_on and st.is_true(status, st.TRAINED),
        secret=None if _secret_checked(job, status) else secret_name(job),
        launched=st.is_true(status, st.LAUNCHED),
    )


def plan(
    job: Obj, status: FineTuneJobStatus, children: Children, now: datetime, settings: Settings
) -> Plan:
    """One pass for one job: the raw object as the API server holds it, its (parsed) status,
    what exists, the time. Pure: the same inputs give the same plan."""
    draft = _Draft(job, status.model_copy(deep=True), now, settings)
    _decide(draft, children)
    if not draft.invalid_spec and (status.phase not in TERMINAL_PHASES):
        _account(draft, children, force=draft.status.phase != status.phase)
    return draft.result()


def _usage(d: _Draft, children: Children, force: bool = False) -> usage_.UsageUpdate:
    s = d.status
    prev = s.usage
    attempts = (prev.attempts if prev else 0) + (1 if d.launched_now else 0)
    labels = {n: info.label_map for n, info in (children.nodes or {}).items()}
    return usage_.update(
        prev,
        children.rank_pods,
        labels,
        d.settings.pricing,
        start_time=s.start_time,
        end_time=s.completion_time,
        now=d.now,
        attempts=attempts,
        interruptions=s.interruptions,
        force=force,
    )


def _account(d: _Draft, children: Children, force: bool) -> None:
    """Bring status.usage up to date (written when due) and export the live figure."""
    update = _usage(d, children, force=force)
    d.status.usage = update.usage
    d.observations.append(UsageSample(d.namespace, d.name, update.live_gpu_seconds))


def _decide(d: _Draft, children: Children) -> None:
    s = d.status
    if s.phase in TERMINAL_PHASES:
        _finished(d, children)
        return
    ftj = _validated(d, children)
    if ftj is None:
        d.invalid_spec = True
        return
    ftj = _guard_spec_change(d, ftj)
    policy = ftj.spec.run_policy
    if policy.cancel:
        _stop_ranks(d, children.rank_pods, grace=None)
        d.cond(st.CANCELLED, True, "CancelRequested", "spec.runPolicy.cancel is true")
        d.cond(st.LAUNCHED, False, "Cancelled", "ranks stopped with a final checkpoint")
        d.phase("Cancelled", "Cancelled", "cancelled by spec.runPolicy.cancel")
        return
    if st.deadline_exceeded(s.start_time, policy.active_deadline_seconds, d.now):
        _stop_ranks(d, children.rank_pods, grace=GANG_TEARDOWN_GRACE)
        msg = f"ran longer than activeDeadlineSeconds={policy.active_deadline_seconds}"
        d.cond(st.FAILED, True, "DeadlineExceeded", msg)
        d.cond(st.LAUNCHED, False, "DeadlineExceeded", msg)
        d.phase("Failed", "DeadlineExceeded", msg)
        return
    if st.is_true(s, st.TRAINED):
        _deploy(d, ftj, children)
        return
    if policy.suspend:
        _stop_ranks(d, children.rank_pods, grace=None)
        d.cond(st.SUSPENDED, True, "Suspended", "ranks stopped; checkpoints kept")
        d.cond(st.LAUNCHED, False, "Suspended", "suspended by spec.runPolicy.suspend")
        d.phase("Suspended", "Suspended", "ranks stopped; checkpoints stay in the store")
        return
    if st.is_true(s, st.SUSPENDED):
        d.cond(st.SUSPENDED, False, "Resumed", "resuming from the newest checkpoint")
    if _over_budget(d, ftj, children):
        return
    if st.is_true(s, st.LAUNCHED):
        _watch_ranks(d, ftj, children)
    elif not _launch(d, ftj, children):
        return  # the API server refused the rank pods: the job failed
    if policy.active_deadline_seconds and s.start_time:
        left = st.seconds_until(s.start_time, policy.active_deadline_seconds, d.now)
        d.again(max(1.0, left))


def _over_budget(d: _Draft, ftj: FineTuneJob, children: Children) -> bool:
    """maxGpuHours spent: the ranks get their grace to checkpoint, and the job fails."""
    budget = ftj.spec.run_policy.max_gpu_hours
    if budget is None:
        return False
    update = _usage(d, children, force=True)
    if update.live_gpu_seconds < budget * 3600:
        return False
    _stop_ranks(d, children.rank_pods, grace=None)
    used = update.live_gpu_seconds / 3600
    msg = (
        f"used {used:.4g} GPU-hours of spec.runPolicy.maxGpuHours={budget:g} "
        f"({usage_.describe(update.usage)}); ranks stopped after a checkpoint"
    )
    d.cond(st.LAUNCHED, False, "BudgetExceeded", msg)
    d.cond(st.FAILED, True, "BudgetExceeded", msg)
    d.phase("Failed", "BudgetExceeded", msg)
    return True


# --------------------------------------------------------------------------- validation


def _secret_checked(job: Obj, status: FineTuneJobStatus) -> bool:
    # The Secret is read once per spec generation, not on every pass: at 500 jobs the extra
    # GET per 5 s timer tick was a large share of the API traffic (benchmarks/operator_scale.py),
    # and a Secret removed mid-run must not fail a job whose pods already hold the keys.
    generation = job["metadata"].get("generation")
    return st.is_true(status, st.VALIDATED) and status.observed_generation == generation


def _validated(d: _Draft, children: Children) -> FineTuneJob | None:
    secret = None if _secret_checked(d.body, d.status) else children.secret
    try:
        ftj = validate_job(d.body, secret=secret)
    except SpecError as err:
        _invalid(d, describe(err))
        return None
    d.cond(st.VALIDATED, True, "Valid", "spec and preflight checks passed")
    return ftj


def _invalid(d: _Draft, msg: str) -> None:
    d.cond(st.VALIDATED, False, "InvalidSpec", msg)
    d.cond(st.FAILED, True, "InvalidSpec", msg)
    d.phase("Failed", "InvalidSpec", msg)  # the phase change is the Event


def _guard_spec_change(d: _Draft, ftj: FineTuneJob) -> FineTuneJob:
    """Refuse changes to fields fixed at launch: keep running the launched spec."""
    ann = d.annotations
    launched_hash, launched_raw = ann.get(ANN_SPEC_HASH), ann.get(ANN_LAUNCHED_SPEC)
    if not launched_hash or not launched_raw or launched_hash == st.spec_hash(ftj.spec):
        st.remove_condition(d.status, st.SPEC_CHANGE_REFUSED)
        return ftj
    # Raw specs as the user wrote them (not wire(): defaults such as credentialsSecretRef's
    # key names would trip the inline-secret check when re-validated).
    launched = json.loads(launched_raw)
    current = dict(d.body.get("spec") or {})
    fields = st.changed_fields(st.immutable_spec(launched), st.immutable_spec(current))
    msg = (
        f"{', '.join(fields[:8]) or 'spec'} cannot change while the job runs; the job continues "
        "with the launched spec (mutable: runPolicy.suspend/cancel/backoffLimit/"
        "activeDeadlineSeconds/ttlSecondsAfterFinished, inference.*)"
    )
    if d.cond(st.SPEC_CHANGE_REFUSED, True, "ImmutableField", msg):
        d.event("Warning", "SpecChangeRefused", msg)
    # Launched training spec + the current mutable fields.
    merged = dict(launched)
    merged["runPolicy"] = current.get("runPolicy", {})
    merged["inference"] = current.get("inference", {})
    spec = FineTuneJobSpec.model_validate(merged)
    return ftj.model_copy(update={"spec": spec})


# --------------------------------------------------------------------------- ranks


def _image(d: _Draft, ftj: FineTuneJob) -> str:
    return ftj.spec.resources.image or d.settings.image


def _attempt(d: _Draft) -> int:
    try:
        return int(d.annotations.get(ANN_ATTEMPT, "0"))
    except ValueError:
        return 0


def _live(pods: list[Obj]) -> list[str]:
    """Names of the pods not already being deleted."""
    return [p["metadata"]["name"] for p in pods if not p["metadata"].get("deletionTimestamp")]


def _stop_ranks(d: _Draft, pods: list[Obj], grace: int | None) -> None:
    """Delete every rank; the default grace lets the trainer save a final checkpoint."""
    names = _live(pods)
    d.actions.extend(Delete("Pod", name, grace) for name in names)
    if names:
        d.event("Normal", "RanksDeleted", f"deleted {len(names)} rank pod(s)")


def _launch(d: _Draft, ftj: FineTuneJob, children: Children) -> bool:
    """Launch the next attempt's gang; False when the API server refused its pods."""
    s = d.status
    launched = st.get_condition(s, st.LAUNCHED)
    if launched is not None and launched.reason == "GangRestart":
        delay = st.restart_delay(s.restarts - 1, d.settings.restart_backoff)
        wait = st.seconds_until(launched.last_transition_time, delay, d.now)
        if wait > 0:
            d.again(wait)
            return True
    not_before = st.parse_time(d.annotations.get(ANN_NEXT_LAUNCH))
    if not_before is not None and not_before > d.now:
        d.again(max(1.0, (not_before - d.now).total_seconds()))
        return True
    # Same pod names for every attempt: wait until the previous gang is gone.
    if children.rank_pods:
        _clear_old_gang(d, ftj, children)
        d.again(2.0)
        return True
    if children.rejection is not None:
        _pods_rejected(d, children.rejection)
        return False
    if children.quota is not None:
        _quota_refused(d, children.quota)
        return True
    attempt = _attempt(d) + 1
    d.actions.append(Apply(build_config_map(ftj, owner=d.body)))
    d.actions.append(Apply(build_headless_service(ftj, owner=d.body)))
    # Record the attempt and the launched spec before the pods exist, so a restarted operator
    # recognises them as current and never launches a second gang.
    annotations: dict[str, str | None] = {ANN_ATTEMPT: str(attempt)}
    if ANN_SPEC_HASH not in d.annotations:
        annotations[ANN_SPEC_HASH] = st.spec_hash(ftj.spec)
        annotations[ANN_LAUNCHED_SPEC] = json.dumps(d.body.get("spec") or {}, sort_keys=True)
    d.actions.append(Annotate(d.name, annotations))
    pods = build_rank_pods(ftj, attempt, image=_image(d, ftj), owner=d.body)
    d.actions.extend(Apply(pod) for pod in pods)
    d.launched_now = True
    nodes = ftj.spec.resources.nodes
    d.cond(st.LAUNCHED, True, "Launched", f"{nodes} rank pod(s), attempt {attempt}")
    if s.start_time is None:
        s.start_time = st.now_rfc3339(d.now)
    if not st.is_true(s, st.QUEUED):
        verb = "restarted" if s.restarts or s.interruptions or s.gang_releases else "launched"
        d.phase("Running", "Launched", f"{verb} {nodes} rank pod(s) (attempt {attempt})")
    else:
        d.event("Normal", "Launched", f"launched {nodes} rank pod(s) (attempt {attempt})")
    d.again(5.0)
    return True


def _clear_old_gang(d: _Draft, ftj: FineTuneJob, children: Children) -> None:
    """Delete what is left of the previous gang. A rank stuck Terminating on a node lost for
    nodeFailureTolerationSeconds is force-deleted: that node will never confirm the deletion,
    and the next attempt reuses the pod names. A rank still alive behind a partition cannot
    corrupt the run: checkpoints carry their attempt and the store's fence refuses it."""
    toleration = float(ftj.spec.run_policy.node_failure_toleration_seconds)
    for pod in children.rank_pods:
        meta = pod["metadata"]
        if not meta.get("deletionTimestamp"):
            d.actions.append(Delete("Pod", meta["name"], GANG_TEARDOWN_GRACE))
            continue
        node = str((pod.get("spec") or {}).get("nodeName") or "")
        if not node or children.nodes is None:
            continue
        if sched.node_lost(children.nodes.get(node), d.now, toleration):
            d.actions.append(Delete("Pod", meta["name"], 0))
            d.event(
                "Warning",
                "RankForceDeleted",
                f"{meta['name']} was stuck terminating on lost node {node} for more than "
                f"nodeFailureTolerationSeconds={toleration:g}: force-deleted",
            )


def _queued(d: _Draft, reason: str, message: str) -> None:
    """Queued: waiting for Kubernetes to admit the gang. The condition's lastTransitionTime says
    since when (it moves only when the job starts or stops waiting)."""
    d.cond(st.QUEUED, True, reason, message)
    d.phase("Queued", reason, message)


def _quota_refused(d: _Draft, refusal: QuotaRefusal) -> None:
    """A ResourceQuota refused a rank: give back what was created (a partial gang would hold
    quota), stay Queued, and try again after a back-off that grows with the wait."""
    d.actions.extend(Delete("Pod", name, 0) for name in refusal.created)
    msg = sched.quota_message(refusal.body)
    _queued(d, "QuotaExceeded", msg)
    queued = st.get_condition(d.status, st.QUEUED)
    since = st.parse_time(queued.last_transition_time if queued else None) or d.now
    waited = (d.now - since).total_seconds()
    delay = sched.queue_backoff(waited, f"{d.namespace}/{d.name}/{int(waited)}")
    when = st.now_rfc3339(d.now + timedelta(seconds=delay))
    d.actions.append(Annotate(d.name, {ANN_NEXT_LAUNCH: when}))
    d.cond(st.LAUNCHED, False, "QuotaExceeded", msg)
    d.again(delay)


def _pods_rejected(d: _Draft, rejection: Rejection) -> None:
    """The spec passed our checks but makes an invalid pod (e.g. a toleration with operator
    Exists and a value): retrying cannot fix it."""
    d.actions.extend(Delete("Pod", name, 0) for name in rejection.created)
    if rejection.created:
        d.event("Normal", "RanksDeleted", f"deleted {len(rejection.created)} rank pod(s)")
    _invalid(d, st.pod_rejection(rejection.body))
    d.invalid_spec = True


def _current_gang(d: _Draft, pods: list[Obj]) -> dict[str, Obj]:
    attempt = str(_attempt(d))
    return {
        p["metadata"]["name"]: p
        for p in pods
        if p["metadata"].get("labels", {}).get(ATTEMPT_LABEL) == attempt
    }


def _watch_ranks(d: _Draft, ftj: FineTuneJob, children: Children) -> None:
    attempt, nodes = _attempt(d), ftj.spec.resources.nodes
    current = _current_gang(d, children.rank_pods)
    if not current and not children.rank_pods:
        # The launch was interrupted (operator restarted between the annotation and the pods),
        # or someone removed the whole gang: re-create this attempt; names make it idempotent.
        pods = build_rank_pods(ftj, attempt, image=_image(d, ftj), owner=d.body)
        d.actions.extend(Apply(pod) for pod in pods)
        d.event("Normal", "RanksRecreated", f"re-created {nodes} rank pod(s), attempt {attempt}")
        return
    fenced = _fenced_out(current)
    if fenced is not None:
        _renumber(d, fenced, children.rank_pods)
        return
    failures = [f for p in current.values() if (f := st.classify_failure(p)) is not None]
    permanent = [f for f in failures if not f.retryable]
    if permanent:
        _on_failure(d, ftj, permanent[0], children.rank_pods)
        return
    cause = _interrupted(d, current, nodes, children)
    if cause is not None:
        _on_interrupted(d, cause, children.rank_pods)
        return
    if failures:
        _on_failure(d, ftj, failures[0], children.rank_pods)
        return
    if _cannot_configure(d, ftj, current, children.rank_pods):
        return
    if _waiting_for_capacity(d, ftj, current, children):
        return
    if st.is_true(d.status, st.QUEUED):
        d.cond(st.QUEUED, False, "Scheduled", f"all {nodes} rank(s) placed")
        d.phase("Running", "Scheduled", f"all {nodes} rank(s) placed (attempt {attempt})")
    phases = [str((p.get("status") or {}).get("phase")) for p in current.values()]
    rank0 = current.get(pod_name(d.name, 0))
    if phases.count("Succeeded") == nodes and rank0 is not None:
        _on_trained(d, ftj, rank0, children)
        return
    if "Running" in phases:
        d.observations.append(RankRunning(_since_creation(d)))
    _read_progress(d, ftj, rank0, children.metrics)
    d.again(10.0)


_SUPERSEDED_RE = re.compile(r"^Superseded: gang attempt (\d+) superseded")


def _fenced_out(current: dict[str, Obj]) -> int | None:
    """The attempt the store's fence names when it refused a rank of the current gang.

    Attempts count per job object, but the store prefix is per job name: a job deleted and
    created again under the same name finds the old job's fence ahead of its own attempts."""
    for pod in current.values():
        m = _SUPERSEDED_RE.match((st.terminated_message(pod) or "").strip())
        if m:
            return int(m.group(1))
    return None


def _renumber(d: _Draft, fence: int, pods: list[Obj]) -> None:
    """Relaunch past the fence: not a failure (backoffLimit untouched)."""
    attempt = max(fence, _attempt(d))
    msg = (
        f"the store's fence names attempt {fence} (an earlier job of this name wrote there): "
        f"relaunching as attempt {attempt + 1}"
    )
    _stop_ranks(d, pods, grace=0)
    d.actions.append(Annotate(d.name, {ANN_ATTEMPT: str(attempt)}))
    d.cond(st.LAUNCHED, False, "AttemptRenumbered", msg)
    d.event("Normal", "AttemptRenumbered", msg)
    d.again(1.0)


# The kubelet retries a pod whose Secret is missing; a Secret created right after the job
# still counts, so wait this long before failing the job.
CONFIG_ERROR_GRACE = 20.0


def _cannot_configure(
    d: _Draft, ftj: FineTuneJob, current: dict[str, Obj], pods: list[Obj]
) -> bool:
    """A rank waits in CreateContainerConfigError: under the chart's RBAC the operator may not
    read Secrets, so this is where a missing credentials Secret or key shows. Not retryable."""
    for name, pod in sorted(current.items()):
        text = st.config_error(pod)
        if text is None:
            continue
        created = st.parse_time(pod["metadata"].get("creationTimestamp"))
        left = CONFIG_ERROR_GRACE - ((d.now - created).total_seconds() if created else 0.0)
        if left > 0:
            d.again(max(1.0, left))
            return False
        ref = ftj.spec.storage.credentials_secret_ref if ftj.spec.storage else None
        field = (
            f"spec.storage.credentialsSecretRef (Secret {ref.name!r}, keys "
            f"{ref.access_key_id_key!r} and {ref.secret_access_key_key!r})"
            if ref is not None and "secret" in text.lower()
            else "the rank pod's configuration"
        )
        msg = (
            f"{name} cannot start: {text}; check {field} in namespace {d.namespace}, "
            "then re-create the job"
        )
        _stop_ranks(d, pods, grace=0)
        d.status.last_failure = FailureInfo(
            pod=name, reason="CreateContainerConfigError", message=msg
        )
        d.cond(st.LAUNCHED, False, "CreateContainerConfigError", msg)
        d.cond(st.FAILED, True, "CreateContainerConfigError", msg)
        d.phase("Failed", "CreateContainerConfigError", msg)
        return True
    return False


def _interrupted(
    d: _Draft, current: dict[str, Obj], nodes: int, children: Children
) -> tuple[str, str] | None:
    """(rank pod, why) when Kubernetes took a rank of this gang away; None otherwise."""
    for rank in range(nodes):
        name = pod_name(d.name, rank)
        cause = sched.interruption(current.get(name), children.pod_events.get(name, []))
        if cause is not None:
            return name, cause
    return None


def _on_interrupted(d: _Draft, cause: tuple[str, str], pods: list[Obj]) -> None:
    """Not a failure: backoffLimit untouched. The taken rank keeps its own grace to save a
    checkpoint; the rest of the gang is stopped; the job waits Queued for the next attempt,
    which resumes from that checkpoint."""
    s = d.status
    pod, why = cause
    s.interruptions += 1
    msg = f"{pod}: {why}; waiting to run again from the newest checkpoint"
    for p in pods:
        meta = p["metadata"]
        if not meta.get("deletionTimestamp") and meta["name"] != pod:
            d.actions.append(Delete("Pod", meta["name"], GANG_TEARDOWN_GRACE))
    d.cond(st.LAUNCHED, False, "Interrupted", msg)
    d.event("Warning", "Interrupted", f"interruption {s.interruptions}: {msg}")
    _queued(d, "Interrupted", msg)
    d.again(2.0)


def _waiting_for_capacity(
    d: _Draft, ftj: FineTuneJob, current: dict[str, Obj], children: Children
) -> bool:
    """True while some rank of the gang is not placed: the job is Queued. Handles the three
    ways out besides being scheduled: a request no node can ever meet (fail at once), a partial
    gang held past gangTimeoutSeconds (release it), and the queue timeout (fail)."""
    policy, nodes = ftj.spec.run_policy, ftj.spec.resources.nodes
    messages = [m for p in current.values() if (m := sched.unscheduled_message(p)) is not None]
    if not messages:
        return False
    impossible = sched.never_fits(ftj.spec.resources.gpus_per_node, children.nodes)
    if impossible is not None:
        _fail_unschedulable(d, children.rank_pods, impossible)
        return True
    text = sched.waiting_for_capacity(messages, nodes)
    _queued(d, "WaitingForCapacity", text)
    if _queue_timed_out(d, ftj, children, text):
        return True
    placed = [p for p in current.values() if (p.get("spec") or {}).get("nodeName")]
    launched = st.get_condition(d.status, st.LAUNCHED)
    held = st.seconds_until(
        launched.last_transition_time if launched else None,
        float(policy.gang_timeout_seconds),
        d.now,
    )
    if placed and held <= 0:
        _release_gang(d, ftj, children.rank_pods, len(placed))
        return True
    d.again(max(1.0, min(held, 10.0)) if placed else 10.0)
    return True


def _queue_timeout(d: _Draft, ftj: FineTuneJob) -> float | None:
    spec_value = ftj.spec.run_policy.queue_timeout_seconds
    return float(spec_value) if spec_value is not None else d.settings.queue_timeout


def _queue_timed_out(d: _Draft, ftj: FineTuneJob, children: Children, text: str) -> bool:
    timeout = _queue_timeout(d, ftj)
    queued = st.get_condition(d.status, st.QUEUED)
    if timeout is None or queued is None:
        return False
    left = st.seconds_until(queued.last_transition_time, timeout, d.now)
    if left > 0:
        d.again(max(1.0, left))
        return False
    where = (
        "spec.runPolicy.queueTimeoutSeconds"
        if ftj.spec.run_policy.queue_timeout_seconds is not None
        else "the operator's queue timeout (chart value scheduling.queueTimeoutSeconds; "
        "spec.runPolicy.queueTimeoutSeconds overrides it)"
    )
    _fail_unschedulable(d, children.rank_pods, f"queued longer than {timeout:g}s ({where}): {text}")
    return True


def _fail_unschedulable(d: _Draft, pods: list[Obj], msg: str) -> None:
    """Not retryable: a new gang would ask for the same resources again."""
    _stop_ranks(d, pods, grace=0)
    d.status.last_failure = FailureInfo(reason="Unschedulable", message=msg)
    d.cond(st.QUEUED, False, "Unschedulable", msg)
    d.cond(st.LAUNCHED, False, "Unschedulable", msg)
    d.cond(st.FAILED, True, "Unschedulable", msg)
    d.phase("Failed", "Unschedulable", msg)


def _release_gang(d: _Draft, ftj: FineTuneJob, pods: list[Obj], placed: int) -> None:
    """A partial gang holds GPUs another gang may be waiting for: give them all back and try
    again after a jittered back-off, so two partial gangs cannot hold each other forever."""
    s = d.status
    s.gang_releases += 1
    nodes = ftj.spec.resources.nodes
    delay = sched.release_backoff(
        s.gang_releases, d.settings.restart_backoff, f"{d.namespace}/{d.name}"
    )
    msg = (
        f"only {placed}/{nodes} rank(s) placed after gangTimeoutSeconds="
        f"{ftj.spec.run_policy.gang_timeout_seconds}: released the partial gang, relaunching "
        f"in {delay:.0f}s (release {s.gang_releases}; not a failure)"
    )
    _stop_ranks(d, pods, grace=0)  # they never started training: nothing to checkpoint
    d.cond(st.LAUNCHED, False, "GangReleased", msg)
    d.event("Normal", "GangReleased", msg)
    when = st.now_rfc3339(d.now + timedelta(seconds=delay))
    d.actions.append(Annotate(d.name, {ANN_NEXT_LAUNCH: when}))
    d.again(delay)


def _since_creation(d: _Draft) -> float | None:
    """Seconds from creation to now, for the first gang only (restarts say nothing about it)."""
    created = st.parse_time(d.body["metadata"].get("creationTimestamp"))
    if created is None or d.status.restarts != 0:
        return None
    return (d.now - created).total_seconds()


def _on_failure(d: _Draft, ftj: FineTuneJob, failure: st.Failure, pods: list[Obj]) -> None:
    s = d.status
    base = d.settings.restart_backoff
    decision = st.decide_restart(failure, s.restarts, ftj.spec.run_policy.backoff_limit, base)
    s.last_failure = failure.info()
    _stop_ranks(d, pods, grace=GANG_TEARDOWN_GRACE)
    if decision.restart:
        s.restarts += 1
        d.observations.append(GangRestarted(d.namespace))
        d.cond(st.LAUNCHED, False, "GangRestart", decision.message)
        d.event("Warning", "GangRestart", decision.message)
        s.phase = "Running"  # so the Restarting transition below always emits an event
        d.phase("Restarting", decision.reason, decision.message)
        d.again(decision.delay)
        return
    d.cond(st.LAUNCHED, False, decision.reason, decision.message)
    d.cond(st.TRAINED, False, decision.reason, decision.message)
    d.cond(st.FAILED, True, decision.reason, decision.message)
    d.phase("Failed", decision.reason, decision.message)


# --------------------------------------------------------------------------- results, serving


def _on_trained(d: _Draft, ftj: FineTuneJob, rank0: Obj, children: Children) -> None:
    """All ranks Succeeded: the gates as the trainer decided them, from rank 0's termination
    message (`Succeeded: {FinalReport}`).

    Why the termination message and not eval.json: it needs no S3 access and no Secret in the
    operator; the full report stays in the store for people.
    """
    s = d.status
    d.cond(st.TRAINED, True, "Completed", "every rank exited 0")
    s.model_uri = inference.model_uri(ftj)
    report = st.parse_final_report(st.terminated_message(rank0))
    if report is None:
        msg = "rank 0 reported no final metrics (termination message missing); see eval.json"
        d.cond(st.EVALUATED, False, "ResultsMissing", msg)
        d.cond(st.FAILED, True, "ResultsMissing", msg)
        d.phase("Failed", "ResultsMissing", msg)
        return
    decision = st.decide_gates(report, ftj.spec.task)
    s.metrics = {**s.metrics, **{f"test_{k}": v for k, v in decision.metrics.items()}}
    s.eval_summary = decision.summary
    d.observations.append(GateResult(decision.passed))
    _final_progress(s, report)
    if not decision.passed:
        d.cond(st.EVALUATED, False, "GatesFailed", decision.message)
        d.cond(st.FAILED, True, "GatesFailed", decision.message + "; model not deployed")
        d.phase("Failed", "GatesFailed", decision.message + "; model not deployed")
        return
    d.cond(st.EVALUATED, True, "GatesPassed", decision.message)
    d.event("Normal", "Evaluated", decision.message)
    _deploy(d, ftj, children)


def _final_progress(s: FineTuneJobStatus, report: FinalReport) -> None:
    # From the report, not a scrape: a short run can end between two timer passes.
    if s.progress is None:
        s.progress = Progress()
    s.progress.percent = 100
    s.progress.step = max(s.progress.step, s.progress.total_steps, report.steps or 0)
    s.progress.total_steps = max(s.progress.total_steps, report.total_steps or 0)
    s.progress.eta_seconds = 0


def _ready(deployment: Obj | None) -> tuple[int, int]:
    """(available, wanted) replicas of a Deployment (0, 0 when it does not exist)."""
    dep = deployment or {}
    want = int((dep.get("spec") or {}).get("replicas") or 0)
    return int((dep.get("status") or {}).get("availableReplicas") or 0), want


def _deploy(d: _Draft, ftj: FineTuneJob, children: Children) -> None:
    s = d.status
    if not ftj.spec.inference.enabled:
        d.phase("Succeeded", "Succeeded", f"trained and evaluated: {s.eval_summary}")
        return
    d.actions.append(Apply(inference.build_deployment(ftj, image=_image(d, ftj), owner=d.body)))
    d.actions.append(Apply(inference.build_serve_service(ftj, owner=d.body)))
    s.endpoint = inference.endpoint(ftj)
    want = ftj.spec.inference.replicas
    available, _ = _ready(children.deployment)
    if want > 0 and available >= want:
        msg = f"{available}/{want} replica(s) ready at {s.endpoint}"
        d.cond(st.SERVING, True, "Available", msg)
        d.phase("Succeeded", "Serving", f"serving at {s.endpoint}")
        return
    d.cond(st.SERVING, False, "Deploying", f"{available}/{want} replica(s) ready")
    d.phase("Deploying", "Deploying", f"starting {want} inference replica(s)")
    d.again(3.0)


def _finished(d: _Draft, children: Children) -> None:
    """Terminal: never recreate children; keep Serving honest; apply the TTL."""
    s = d.status
    raw_spec = d.body.get("spec") or {}
    ttl = (raw_spec.get("runPolicy") or {}).get("ttlSecondsAfterFinished")
    if s.endpoint and st.is_true(s, st.SERVING):
        available, want = _ready(children.deployment)
        if children.deployment is None or (want > 0 and available < want):
            d.cond(st.SERVING, False, "Unavailable", f"{available}/{want} replica(s) ready")
    if not isinstance(ttl, int) or isinstance(ttl, bool) or ttl < 0:
        return  # unset, or the raw spec of a job that failed validation holds anything here
    if not st.ttl_expired(s.completion_time, ttl, d.now):
        d.again(max(1.0, st.seconds_until(s.completion_time, float(ttl), d.now)))
        return
    if (raw_spec.get("inference") or {}).get("keepAfterTtl"):
        # Orphan the inference objects first, so the garbage collector leaves them alone.
        d.actions.extend(Orphan(kind, serve_name(d.name)) for kind in ("Deployment", "Service"))
    d.event("Normal", "TTLExpired", f"deleting the job {ttl}s after it finished")
    d.actions.append(Delete("FineTuneJob", d.name))


# --------------------------------------------------------------------------- progress


def _read_progress(d: _Draft, ftj: FineTuneJob, rank0: Obj | None, sample: Sample | None) -> None:
    """Progress from rank 0's Prometheus endpoint: ask for it, and use it when it came.

    Why scrape and not progress.json: the operator then needs no S3 client and no Secret; the
    store stays the truth for people and for resuming.
    """
    status = (rank0 or {}).get("status") or {}
    if rank0 is None or status.get("phase") != "Running" or not status.get("podIP"):
        return
    url = f"http://{status['podIP']}:{METRICS_PORT}/metrics"
    d.scrape = ScrapeTarget(url, str(_attempt(d)))
    if sample is None or sample.scrape.step is None:
        return
    scrape, s = sample.scrape, d.status
    rate = sample.rate if sample.rate and sample.rate > 0 else None
    progress = st.progress_from_scrape(scrape, rate)
    if progress is not None:
        s.progress = progress
    if scrape.loss is not None:
        s.metrics = {**s.metrics, "train_loss": round(scrape.loss, 6)}
    s.metrics = {**s.metrics, **{k: round(v, 6) for k, v in scrape.eval_metrics.items()}}
    if scrape.checkpoint_step and ftj.spec.storage is not None:
        _note_checkpoint(d, ftj, scrape.checkpoint_step)


def _note_checkpoint(d: _Draft, ftj: FineTuneJob, step: int) -> None:
    assert ftj.spec.storage is not None
    s = d.status
    prefix = run_prefix(ftj.spec.storage, d.namespace, d.name)
    attempt = _attempt(d)
    # The trainer's folder names (train/checkpoint.py): one per attempt, so a stale rank of an
    # older attempt can never write into the current attempt's checkpoint.
    folder = f"step-{step}-attempt-{attempt}" if attempt > 0 else f"step-{step}"
    uri = f"{prefix}/checkpoints/{folder}"
    if uri in {c.uri for c in s.checkpoints}:
        return
    ref = CheckpointRef(step=step, uri=uri, time=st.now_rfc3339(d.now))
    keep = ftj.spec.checkpointing.keep_last
    s.checkpoints = [*s.checkpoints, ref][-keep:]  # in the order they were saved
