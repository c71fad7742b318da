"""Carry out the reconcile plan for one FineTuneJob: read, plan, act, patch status once, post
events. The only part of reconcile that does I/O; every API call goes through `kube.py`.

Every trigger (create/update/resume, pod events, the timer) runs `reconcile`; it is idempotent
because children have fixed names, so a retried or duplicated pass never duplicates anything.
"""

from __future__ import annotations

import logging
import os
import threading
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
from kubetune_operator.reconcile import scheduling as sched
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
    QuotaRefusal,
    RankRunning,
    Rejection,
    Sample,
    ScrapeTarget,
    SecretRead,
    Settings,
    UsageSample,
)
from kubetune_operator.reconcile.scheduling import NodeInfo
from kubetune_operator.reconcile.state import JobState
from kubetune_operator.reconcile.usage import Pricing

log = logging.getLogger("kubetune.controller")

IMAGE_ENV = "KUBETUNE_TRAINER_IMAGE"
BACKOFF_ENV = "KUBETUNE_RESTART_BACKOFF_SECONDS"
# How long a job may wait Queued when its spec does not say; unset: forever (on an autoscaled
# cluster a GPU node may appear only after a job asks for it). Chart: scheduling.*.
QUEUE_TIMEOUT_ENV = "KUBETUNE_QUEUE_TIMEOUT_SECONDS"
# Prices for status.usage.estimatedCost (chart: cost.*).
PRICE_ENV = "KUBETUNE_GPU_HOUR_PRICE"
PRICE_LABEL_ENV = "KUBETUNE_GPU_PRICE_NODE_LABEL"
PRICES_ENV = "KUBETUNE_GPU_PRICES"
CURRENCY_ENV = "KUBETUNE_COST_CURRENCY"
SCRAPE_TIMEOUT = 2.0
# Nodes are read only when a pass needs them (a rank waits or is being deleted, or prices
# depend on node labels), and then shared by every job for this long.
NODE_CACHE_SECONDS = 10.0


class InvalidSpec(Exception):
    """The job was marked Failed/InvalidSpec; create/update handlers turn it into PermanentError."""


class _QuotaRefused(Exception):
    """A ResourceQuota refused a rank pod (403): the executor re-plans with the refusal."""

    def __init__(self, refusal: QuotaRefusal) -> None:
        super().__init__(refusal.body[:300])
        self.refusal = refusal


class _PodsRejected(Exception):
    """The API server refused a rank pod (422): the executor re-plans with the rejection."""

    def __init__(self, rejection: Rejection) -> None:
        super().__init__(rejection.body[:300])
        self.rejection = rejection


def settings_from_env() -> Settings:
    """The operator's configuration; a bad value fails loudly, naming the variable."""
    env = os.environ
    queue = (env.get(QUEUE_TIMEOUT_ENV) or "").strip()
    try:
        queue_timeout = float(queue) if queue else None
    except ValueError:
        raise ValueError(f"{QUEUE_TIMEOUT_ENV}={queue!r} is not a number of seconds") from None
    pricing = Pricing.parse(
        env.get(PRICE_ENV, ""),
        env.get(PRICE_LABEL_ENV, ""),
        env.get(PRICES_ENV, ""),
        env.get(CURRENCY_ENV, ""),
    )
    return Settings(
        image=env.get(IMAGE_ENV) or default_image(__version__),
        restart_backoff=float(env.get(BACKOFF_ENV, "10")),
        queue_timeout=queue_timeout if queue_timeout and queue_timeout > 0 else None,
        pricing=pricing,
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
            metrics.observe_gpu_seconds(namespace, name, None)
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
    children = read_children(body, planner.needs(body, status), settings.pricing)
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
    except _QuotaRefused as err:
        children = replace(children, quota=err.refusal)
        result = planner.plan(body, status, children, now, settings)
        perform(namespace, result.actions)
    _flush(body, status, result)
    _observe(result, state)
    return result


# --------------------------------------------------------------------------- reading


def read_children(body: Obj, needs: Needs, pricing: Pricing | None = None) -> Children:
    meta = body["metadata"]
    namespace, name = str(meta["namespace"]), str(meta["name"])
    pods = kube.list_pods(namespace, rank_selector(name)) if needs.rank_pods else []
    deployment = None
    if needs.deployment:
        deployment = kube.get("Deployment", namespace, serve_name(name))
    secret = read_secret(namespace, needs.secret) if needs.secret else None
    doomed = [p["metadata"]["name"] for p in pods if p["metadata"].get("deletionTimestamp")]
    waiting = any(sched.unscheduled_message(p) is not None for p in pods)
    priced = (
        pricing is not None
        and bool(pricing.by_label)
        and any((p.get("spec") or {}).get("nodeName") for p in pods)
    )
    nodes = read_nodes() if (doomed or waiting or priced) else None
    events: dict[str, list[tuple[str, str]]] = {}
    if needs.launched:
        taken = doomed + [
            p["metadata"]["name"]
            for p in pods
            if sched.interruption(p, []) is not None and p["metadata"]["name"] not in doomed
        ]
        for pod in taken:
            events[pod] = pod_events(namespace, pod)
    return Children(
        rank_pods=pods,
        deployment=deployment,
        secret=secret,
        nodes=nodes,
        pod_events=events,
    )


_nodes_cache: tuple[float, dict[str, NodeInfo]] | None = None
_nodes_lock = threading.Lock()


def read_nodes() -> dict[str, NodeInfo] | None:
    """Every node (shared by all jobs for NODE_CACHE_SECONDS); None when the operator may not
    read nodes (then dead-node clean-up and the never-fits check are off, nothing else)."""
    global _nodes_cache
    with _nodes_lock:
        now = time.monotonic()
        if _nodes_cache is not None and now - _nodes_cache[0] < NODE_CACHE_SECONDS:
            return _nodes_cache[1]
        try:
            items = kube.list_nodes()
        except kube.ApiError as err:
            if err.status != 403:
                raise
            log.warning("no permission to list nodes: dead-node clean-up is off")
            return None
        nodes = {info.name: info for info in map(sched.node_info, items)}
        _nodes_cache = (now, nodes)
        return nodes


def pod_events(namespace: str, pod: str) -> list[tuple[str, str]]:
    """(reason, message) of the Events on a rank pod; none when Events may not be read."""
    try:
        items = kube.list_events(namespace, pod, kind="Pod")
    except kube.ApiError as err:
        if err.status != 403:
            raise
        return []
    return [(str(e.get("reason") or ""), str(e.get("message") or "")) for e in items]


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
                if action.kind == "Pod" and sched.is_quota_refusal(err.status, err.body):
                    raise _QuotaRefused(QuotaRefusal(err.body, tuple(created))) from None
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
        elif isinstance(obs, UsageSample):
            metrics.observe_gpu_seconds(obs.namespace, obs.name, obs.gpu_seconds)
        elif isinstance(obs, RankRunning) and state.first_running() and obs.seconds is not None:
            # once per job (first_running flips on its first call), for the first gang only
            metrics.time_to_running_seconds.observe(obs.seconds)
