"""kopf handlers for FineTuneJobs: every trigger runs the same reconcile pass."""

from __future__ import annotations

import logging
from typing import Any

import kopf

from kubetune_operator import kube
from kubetune_operator.api.models import GROUP, PLURAL, VERSION
from kubetune_operator.reconcile.executor import InvalidSpec, reconcile
from kubetune_operator.reconcile.state import JOBS, JobState

log = logging.getLogger("kubetune.handlers")
RESOURCE = (GROUP, VERSION, PLURAL)
TIMER_INTERVAL = 5.0
MEMO_KEY = "kubetune_job"


def job_state(memo: kopf.Memo, namespace: str, name: str) -> JobState:
    """The job's state lives in its kopf memo: dropped with the object when it is deleted."""
    state = memo.get(MEMO_KEY)
    if not isinstance(state, JobState):
        state = memo[MEMO_KEY] = JOBS.get(namespace, name)
    return state


def _run(namespace: str, name: str, trigger: str, memo: kopf.Memo) -> None:
    try:
        reconcile(namespace, name, trigger, job_state(memo, namespace, name))
    except InvalidSpec:
        # Status and Event already say which field is wrong; retrying cannot fix it.
        raise kopf.PermanentError(f"{namespace}/{name}: invalid spec (see status)") from None
    except kube.ApiError as err:
        if 400 <= err.status < 500 and err.status not in (404, 409, 429):
            raise
        raise kopf.TemporaryError(f"API server: {err}", delay=5) from err
    except OSError as err:  # connection refused/reset while the API server restarts
        raise kopf.TemporaryError(f"API server unreachable: {err}", delay=5) from err


@kopf.on.resume(*RESOURCE)
@kopf.on.create(*RESOURCE)
@kopf.on.update(*RESOURCE)
def on_job(namespace: str | None, name: str, reason: str, memo: kopf.Memo, **_: Any) -> None:
    _run(namespace or "default", name, str(reason), memo)


@kopf.timer(*RESOURCE, interval=TIMER_INTERVAL, initial_delay=1.0)
def on_timer(namespace: str | None, name: str, memo: kopf.Memo, **_: Any) -> None:
    """Back-offs, deadlines, TTLs and progress scraping; errors wait for the next tick."""
    ns = namespace or "default"
    try:
        reconcile(ns, name, "timer", job_state(memo, ns, name), scrape=True)
    except InvalidSpec:
        pass
    except (kube.ApiError, OSError) as err:
        log.warning("%s/%s: reconcile failed, retrying on the next tick: %s", namespace, name, err)
