"""Carry out the reconcile plan for one FineTuneJob: read, plan, act, patch status once, post
events. The only part of reconcile that does I/O; every API call goes through `kube.py`.

Every trigger (create/update/resume, pod events, the timer) runs `reconcile`; it is idempotent
because children have fixed names, so a retried or duplicated pass never duplicates anything.
"""

from __future__ import annotations

import logging
import os
import time
import urllib.request
from dataclasses import replace
from datetime import UTC, datetime

from kubetune_operator import __version__, kube, metrics
from kubetune_operator import status as st
from kubetune_operator.api.models import FineTuneJob, FineTuneJobStatus
from kubetune_operator.builders.common import rank_selector, serve_name
from kubetune_operator.builders.pods import default_image
from kubetune_operator.reconcile import plan as planner
from kubetune_operator.reconcile.checks import secret_name
from kubetune_operator.reconcile.checks import validate_job as check_job
from kubetune_operator.reconcile.plan_types import (
    Action,
    Annotate,
    Apply,
    Children,
    Delete,
    GangRestarted,
    GateResult,
    Needs,
    Obj,
    Orphan,
    Plan,
    RankRunning,
    Rejection,
    Sample,
    ScrapeTarget,
    SecretRead,
    Settings,
)
from kubetune_operator.reconcile.state import JobState

log = logging.getLogger("kubetune.controller")

IMAGE_ENV = "KUBETUNE_TRAINER_IMAGE"
BACKOFF_ENV = "KUBETUNE_RESTART_BACKOFF_SECONDS"
# How long a rank may stay unschedulable (no node has what the spec asks for) before the job
# fails; long enough for a cluster autoscaler to add a node.
UNSCHEDULABLE_ENV = "KUBETUNE_UNSCHEDULABLE_TIMEOUT_SECONDS"
SCRAPE_TIMEOUT = 2.0


class InvalidSpec(Exception):
    """The job was marked Failed/InvalidSpec; create/update handlers turn it into PermanentError."""


class _PodsRejected(Exception):
    """The API server refused a rank pod (422): the executor re-plans with the rejection."""

    def __init__(self, rejection: Rejection) -> None:
        super().__init__(rejection.body[:300])
        self.rejection = rejection


def settings_from_env() -> Settings:
    return Settings(
        image=os.environ.get(IMAGE_ENV) or default_image(__version__),
        restart_backoff=float(os.environ.get(BACKOFF_ENV, "10")),
        unschedulable_timeout=float(os.environ.get(UNSCHEDULABLE_ENV, "600")),
    )


def reconcile(
    namespace: str, name: str, trigger: str, state: JobState, scrape: bool = False
) -> Plan | None:
    """One pass for one job; returns the plan carried out (None: the job is gone)."""
    started = time.monotonic()
    with state.lock:
        body = kube.get_job(namespace, name)
        if body is None or body["metadata"].get("deletionTimestamp"):
            metrics.observe_phase(f"{namespace}/{name}", None)
            return None
        status = _read_status(body)
        phase: str = status.phase
        try:
            result = _pass(body, status, state, scrape)
            phase = result.status.phase
        finally:
            metrics.observe_phase(f"{namespace}/{name}", phase)
            metrics.reconcile_seconds.labels(trigger=trigger).observe(time.monotonic() - started)
        if result.invalid_spec:
            raise InvalidSpec(name)
        return result


def _read_status(body: Obj) -> FineTuneJobStatus:
    try:
        return FineTuneJobStatus.model_validate(body.get("status") or {})
    except ValueError:
        meta = body["metadata"]
        log.warning("%s/%s: unreadable status; starting over", meta["namespace"], meta["name"])
        return FineTuneJobStatus()


def _pass(body: Obj, status: FineTuneJobStatus, state: JobState, scrape: bool) -> Plan:
    """Read what the plan needs, plan, act; then patch the status and post the events."""
    settings, now = settings_from_env(), datetime.now(UTC)
    children = read_children(body, planner.needs(body, status))
    result = planner.plan(body, status, children, now, settings)
    if scrape and result.scrape is not None:
        sample = _sample(body, result.scrape, state)
        if sample is not None:
            children = replace(children, metrics=sample)
            result = planner.plan(body, status, children, now, settings)
    namespace = str(body["metadata"]["namespace"])
    try:
        perform(namespace, result.actions)
    except _PodsRejected as err:
        children = replace(children, rejection=err.rejection)
        result = planner.plan(body, status, children, now, settings)
        perform(namespace, result.actions)
    _flush(body, status, result)
    _observe(result, state)
    return result


# --------------------------------------------------------------------------- reading


def read_children(body: Obj, needs: Needs) -> Children:
    meta = body["metadata"]
    namespace, name = str(meta["namespace"]), str(meta["name"])
    pods = kube.list_pods(namespace, rank_selector(name)) if needs.rank_pods else []
    deployment = None
    if needs.deployment:
        deployment = kube.get("Deployment", namespace, serve_name(name))
    secret = read_secret(namespace, needs.secret) if needs.secret else None
    return Children(rank_pods=pods, deployment=deployment, secret=secret)


def read_secret(namespace: str, name: str) -> SecretRead:
    """The key names of a Secret (never values); not found is an answer, not an error."""
    try:
        keys = kube.secret_keys(namespace, name)
    except kube.ApiError as err:
        if err.status != 404:
            raise
        return SecretRead(name, None, found=False)
    return SecretRead(name, None if keys is None else frozenset(keys))


def validate_on_cluster(body: Obj, *, check_secret: bool = True) -> FineTuneJob:
    """The job validated as the operator does, the Secret read when asked (for callers outside
    the reconcile pass, such as tests that check specs against a cluster)."""
    namespace = str((body.get("metadata") or {}).get("namespace") or "default")
    name = secret_name(body) if check_secret else None
    return check_job(body, secret=read_secret(namespace, name) if name else None)


def _sample(body: Obj, target: ScrapeTarget, state: JobState) -> Sample | None:
    """Rank 0's metrics, with the step rate since the attempt's first sample (for the ETA)."""
    try:
        with urllib.request.urlopen(target.url, timeout=SCRAPE_TIMEOUT) as resp:
            text = resp.read().decode()
    except OSError as exc:
        meta = body["metadata"]
        log.debug("%s/%s: metrics not reachable yet: %s", meta["namespace"], meta["name"], exc)
        return None
    scrape = st.parse_metrics(text)
    if scrape.step is None:
        return None
    now = time.monotonic()
    first_time, first_step = state.first_sample(target.attempt, now, scrape.step)
    rate = (scrape.step - first_step) / (now - first_time) if now > first_time else None
    return Sample(scrape, rate)


# --------------------------------------------------------------------------- acting


def perform(namespace: str, actions: list[Action]) -> None:
    """The plan's actions, in order. A rank pod the API server refuses (422) stops the run."""
    created: list[str] = []
    for action in actions:
        if isinstance(action, Apply):
            try:
                kube.apply(action.manifest)
            except kube.ApiError as err:
                if err.status != 422 or action.kind != "Pod":
                    raise
                raise _PodsRejected(Rejection(err.body, tuple(created))) from None
            if action.kind == "Pod":
                created.append(action.name)
        elif isinstance(action, Delete):
            kube.delete(action.kind, namespace, action.name, action.grace)
        elif isinstance(action, Annotate):
            kube.annotate_job(namespace, action.name, action.annotations)
        elif isinstance(action, Orphan):
            orphan = {"metadata": {"ownerReferences": None}}
            kube.patch(action.kind, namespace, action.name, orphan, missing_ok=True)


def _flush(body: Obj, status: FineTuneJobStatus, result: Plan) -> None:
    """One status patch (only what changed), then the events."""
    meta = body["metadata"]
    namespace, name = meta["namespace"], meta["name"]
    before, after = status.wire(), result.status.wire()
    if after != before:
        after.setdefault("observedGeneration", meta.get("generation"))
        kube.patch_job_status(namespace, name, st.merge_patch(before, after))
    for type_, reason, message in result.events:
        log.info("%s/%s %s: %s", namespace, name, reason, message)
        kube.emit_event(body, type_, reason, message)


def _observe(result: Plan, state: JobState) -> None:
    """The plan's metric observations into the operator's registry."""
    for obs in result.observations:
        if isinstance(obs, GangRestarted):
            metrics.restarts_total.labels(namespace=obs.namespace).inc()
        elif isinstance(obs, GateResult):
            metrics.gate_results_total.labels(result="pass" if obs.passed else "fail").inc()
        elif isinstance(obs, RankRunning) and state.first_running() and obs.seconds is not None:
            # once per job (first_running flips on its first call), for the first gang only
            metrics.time_to_running_seconds.observe(obs.seconds)
