"""Pure status logic: conditions, failure classification, restarts, gate reports, progress.

No kopf, no Kubernetes client: the reconcile plan feeds in plain dicts (pods, metrics text) and
turns what these return into status, events and actions.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from kubetune_operator.api.models import (
    Condition,
    FailureInfo,
    FineTuneJobSpec,
    FineTuneJobStatus,
    Progress,
)
from kubetune_trainer.config import FinalReport, GateVerdict, primary_metric
from kubetune_trainer.errors import EXIT_REASONS, PERMANENT_EXIT_CODES, PERMANENT_REASONS

Obj = dict[str, Any]

# Condition types. Decisions read these; status.phase only summarises them for people.
VALIDATED = "Validated"
LAUNCHED = "Launched"
TRAINED = "Trained"
EVALUATED = "Evaluated"
SERVING = "Serving"
SUSPENDED = "Suspended"
CANCELLED = "Cancelled"
FAILED = "Failed"
SPEC_CHANGE_REFUSED = "SpecChangeRefused"
QUEUED = "Queued"

# Pod-level reasons (kubelet, eviction, node lifecycle) that say nothing about the job itself.
RETRYABLE_POD_REASONS = frozenset(
    {
        "OOMKilled",
        "OutOfMemory",
        "Evicted",
        "Preempted",
        "Preempting",
        "NodeLost",
        "Shutdown",
        "Terminated",
        "NodeShutdown",
        "UnexpectedAdmissionError",
        "PodLost",
    }
)
SUCCESS_PREFIX = "Succeeded: "
_REASON_RE = re.compile(r"^([A-Z][A-Za-z]+): ?(.*)$", re.DOTALL)

# Spec fields that may change while a job runs; everything else is fixed at launch.
MUTABLE_RUN_POLICY = (
    "suspend",
    "cancel",
    "backoffLimit",
    "activeDeadlineSeconds",
    "ttlSecondsAfterFinished",
    "queueTimeoutSeconds",
    "gangTimeoutSeconds",
    "maxGpuHours",
)


def now_rfc3339(now: datetime | None = None) -> str:
    return (now or datetime.now(UTC)).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_time(value: str | None) -> datetime | None:
    if not value:
        return None
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None


# --------------------------------------------------------------------------- conditions


def get_condition(status: FineTuneJobStatus, type_: str) -> Condition | None:
    return next((c for c in status.conditions if c.type == type_), None)


def is_true(status: FineTuneJobStatus, type_: str) -> bool:
    cond = get_condition(status, type_)
    return cond is not None and cond.status == "True"


def set_condition(
    status: FineTuneJobStatus,
    type_: str,
    value: bool | str,
    reason: str,
    message: str = "",
    *,
    now: datetime | None = None,
    generation: int | None = None,
) -> bool:
    """Set a condition in place; lastTransitionTime moves only when the status changes.

    Returns True when anything changed.
    """
    text = value if isinstance(value, str) else ("True" if value else "False")
    old = get_condition(status, type_)
    if old is not None and (old.status, old.reason, old.message) == (text, reason, message):
        if generation is not None and old.observed_generation != generation:
            old.observed_generation = generation
            return True
        return False
    when = now_rfc3339(now)
    if old is not None and old.status == text and old.last_transition_time:
        when = old.last_transition_time
    new = Condition.model_validate(
        {
            "type": type_,
            "status": text,
            "reason": reason,
            "message": message,
            "lastTransitionTime": when,
            "observedGeneration": generation,
        }
    )
    status.conditions = [c for c in status.conditions if c.type != type_] + [new]
    return True


def remove_condition(status: FineTuneJobStatus, type_: str) -> bool:
    before = len(status.conditions)
    status.conditions = [c for c in status.conditions if c.type != type_]
    return len(status.conditions) != before


# --------------------------------------------------------------------------- failures


@dataclass(frozen=True)
class Failure:
    """A rank that failed, classified."""

    pod: str
    node: str
    exit_code: int | None
    reason: str
    message: str
    retryable: bool

    def info(self) -> FailureInfo:
        return FailureInfo(
            pod=self.pod or None,
            node=self.node or None,
            exit_code=self.exit_code,
            reason=self.reason or None,
            message=self.message or None,
        )


def parse_termination_message(message: str | None) -> tuple[str | None, str]:
    """`"<Reason>: <message>"` -> (Reason, message); (None, text) for anything else."""
    text = (message or "").strip()
    m = _REASON_RE.match(text.splitlines()[0] if text else "")
    if m and "\n" not in text:
        return m.group(1), m.group(2)
    return None, text


def _tail(text: str, lines: int = 3, limit: int = 512) -> str:
    """The end of a log-fallback termination message: the last lines say what happened."""
    kept = "\n".join([line for line in text.splitlines() if line.strip()][-lines:])
    if len(kept) <= limit:
        return kept
    # Keep both ends: the trainer's one-line reason starts with the file, line and field.
    head = limit // 2
    return kept[:head] + " ... " + kept[-(limit - head - 5) :]


def _terminated(pod: Mapping[str, Any]) -> Mapping[str, Any] | None:
    for cs in (pod.get("status") or {}).get("containerStatuses") or []:
        state = cs.get("state") or {}
        if "terminated" in state:
            return dict(state["terminated"])
        last = cs.get("lastState") or {}
        if "terminated" in last:
            return dict(last["terminated"])
    return None


def merge_patch(before: Mapping[str, Any], after: Mapping[str, Any]) -> dict[str, Any]:
    """The JSON merge patch (RFC 7386) that turns `before` into `after`: keys that went away
    are nulled at every depth (a nested key left out would otherwise keep its old value)."""
    patch: dict[str, Any] = {}
    for key, value in after.items():
        old = before.get(key)
        if isinstance(value, Mapping) and isinstance(old, Mapping):
            patch[key] = merge_patch(old, value)
        else:
            patch[key] = value
    for key in before:
        if key not in after:
            patch[key] = None
    return patch


def _exit_reason(exit_code: int | None) -> str | None:
    """The reason an exit code stands for (kubetune_trainer.errors), for a failed rank."""
    if not exit_code:  # 0 is "Succeeded": never the reason of a failure
        return None
    return EXIT_REASONS.get(exit_code)


def terminated_message(pod: Mapping[str, Any]) -> str | None:
    """The termination message of a pod's (first) terminated container, or None."""
    for cs in (pod.get("status") or {}).get("containerStatuses") or []:
        term = (cs.get("state") or {}).get("terminated")
        if term:
            return str(term.get("message") or "")
    return None


def _memory_limit(pod: Mapping[str, Any]) -> str:
    for c in (pod.get("spec") or {}).get("containers") or []:
        limit = ((c.get("resources") or {}).get("limits") or {}).get("memory")
        if limit:
            return f"limits.memory {limit}"
    return "no memory limit set"


# What to change when ranks keep running out of memory (said once backoffLimit is spent).
OOM_ADVICE = (
    "to fit in memory: lower spec.hyperparameters.perDeviceBatchSize (raise "
    "gradientAccumulationSteps to keep the effective batch), raise spec.deepspeed.zeroStage, "
    "train with spec.method lora or qlora, shorten spec.model.maxSeqLength, or raise "
    "spec.resources.memory"
)


def config_error(pod: Mapping[str, Any]) -> str | None:
    """The kubelet's CreateContainerConfigError message (a Secret or key the pod needs is
    missing), or None."""
    for cs in (pod.get("status") or {}).get("containerStatuses") or []:
        waiting = (cs.get("state") or {}).get("waiting") or {}
        if waiting.get("reason") == "CreateContainerConfigError":
            return str(waiting.get("message") or "the container could not be configured")
    return None


def classify_failure(pod: Mapping[str, Any]) -> Failure | None:
    """The failure of a rank pod, or None when it has not failed (running or succeeded).

    Permanent: the trainer said InvalidSpec/InvalidData (exit 2/3): retrying cannot help.
    Retryable: everything else, bounded by backoffLimit: OOM, storage outages, SIGKILL (137),
    SIGTERM after a checkpoint (143), eviction, preemption, a lost node, plain errors (exit 1).
    """
    meta = pod.get("metadata") or {}
    status = pod.get("status") or {}
    name = str(meta.get("name", ""))
    node = str((pod.get("spec") or {}).get("nodeName") or "")
    term = _terminated(pod)
    phase = status.get("phase")
    if term is None:
        if phase == "Failed":
            reason = str(status.get("reason") or "PodFailed")
            return Failure(name, node, None, reason, str(status.get("message") or ""), True)
        return None
    code = term.get("exitCode")
    exit_code = int(code) if isinstance(code, int) else None
    if exit_code == 0 and phase != "Failed":
        return None
    said, text = parse_termination_message(term.get("message"))
    kube_reason = str(term.get("reason") or "")
    if said in PERMANENT_REASONS or exit_code in PERMANENT_EXIT_CODES:
        reason = said or _exit_reason(exit_code) or "Error"
        return Failure(name, node, exit_code, reason, _tail(text), False)
    if kube_reason == "OOMKilled":
        reason = "OutOfMemory"
        limit = _memory_limit(pod)
        text = f"the kernel killed the trainer at its memory limit ({limit}) on node {node or '?'}"
    elif said and said != "Succeeded":
        reason = said
    elif (known := _exit_reason(exit_code)) is not None:
        reason = known
    elif status.get("reason") in RETRYABLE_POD_REASONS:
        reason = str(status["reason"])
    else:
        reason = kube_reason or "Error"
    if phase == "Failed" and status.get("reason") in RETRYABLE_POD_REASONS:
        reason = str(status["reason"])
    return Failure(name, node, exit_code, reason, _tail(text), True)


# Pod fields the operator fills from spec.resources: the API server names the pod's field.
_POD_FIELDS = (
    ("spec.tolerations", "spec.resources.tolerations"),
    ("spec.nodeSelector", "spec.resources.nodeSelector"),
    ("spec.priorityClassName", "spec.resources.priorityClassName"),
    ("spec.containers[0].image", "spec.resources.image"),
    ("spec.containers[0].resources", "spec.resources"),
)


def pod_rejection(body: str) -> str:
    """The API server's 422 for a rank pod, its fields translated to the job's spec fields."""
    try:
        status = json.loads(body)
    except ValueError:
        status = {}
    if not isinstance(status, dict):
        status = {}
    parts = []
    for cause in (status.get("details") or {}).get("causes") or []:
        field_ = str(cause.get("field") or "")
        for pod_field, spec_field in _POD_FIELDS:
            if field_.startswith(pod_field):
                field_ = spec_field + field_[len(pod_field) :]
                break
        parts.append(f"{field_}: {cause.get('message', '')}")
    text = "; ".join(parts) or str(status.get("message") or body)[:500]
    return f"the API server rejected the rank pods: {text}"


def restart_delay(restarts: int, base: float = 10.0, cap: float = 300.0) -> float:
    """Back-off before gang restart number `restarts + 1`: base * 2^restarts, capped."""
    return float(min(cap, base * (2 ** max(0, restarts))))


@dataclass(frozen=True)
class RestartDecision:
    restart: bool
    delay: float
    reason: str
    message: str


def decide_restart(
    failure: Failure, restarts: int, backoff_limit: int, base: float = 10.0
) -> RestartDecision:
    """Gang restart (delete every rank, relaunch after a back-off) or give up."""
    what = f"{failure.pod} failed: {failure.reason}"
    if failure.exit_code is not None:
        what += f" (exit code {failure.exit_code})"
    if failure.message:
        what += f": {failure.message}"
    if not failure.retryable:
        return RestartDecision(False, 0.0, failure.reason, f"{what}; not retryable")
    if restarts >= backoff_limit:
        advice = f"; {OOM_ADVICE}" if failure.reason == "OutOfMemory" else ""
        return RestartDecision(
            False,
            0.0,
            "BackoffLimitExceeded",
            f"{what}; backoffLimit {backoff_limit} reached after {restarts} restart(s){advice}",
        )
    delay = restart_delay(restarts, base)
    return RestartDecision(
        True,
        delay,
        failure.reason,
        f"{what}; gang restart {restarts + 1}/{backoff_limit} in {delay:g}s",
    )


# --------------------------------------------------------------------------- gates


@dataclass
class GateDecision:
    """What the conditions say about the trainer's gate verdicts."""

    passed: bool
    verdicts: list[GateVerdict]
    message: str
    summary: str
    metrics: dict[str, float] = field(default_factory=dict)


def parse_final_report(message: str | None) -> FinalReport | None:
    """Rank 0's `Succeeded: {FinalReport JSON}` termination message; None when it is missing or
    does not parse (the results are then missing)."""
    text = (message or "").strip()
    if not text.startswith(SUCCESS_PREFIX):
        return None
    try:
        return FinalReport.model_validate_json(text[len(SUCCESS_PREFIX) :])
    except ValueError:  # pydantic's ValidationError is a ValueError
        return None


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "n/a" if value is None else str(value)


def _verdict_text(v: GateVerdict) -> str:
    verdict = "pass" if v.passed else "FAIL"
    if v.must_beat_base:
        return f"mustBeatBase on {v.metric}={_fmt(v.actual)} {verdict}"
    return f"{v.metric}={_fmt(v.actual)} (needs {v.op} {_fmt(v.value)}) {verdict}"


def decide_gates(report: FinalReport, task: str) -> GateDecision:
    """The conditions' words for the trainer's verdicts, taken as they are (never recomputed:
    the gates are decided once, in the trainer's evaluation)."""
    finite = {k: v for k, v in report.metrics.items() if v is not None}
    passed = report.gates_passed
    parts = [_verdict_text(v) for v in report.gates] or ["no gates configured"]
    if report.gates:
        name, value = report.gates[0].metric, report.gates[0].actual
    else:
        name = primary_metric(task)
        value = finite.get(name)
    summary = f"{name}={_fmt(value)} {'PASS' if passed else 'FAIL'}"
    message = ("gates passed: " if passed else "gates failed: ") + "; ".join(parts)
    return GateDecision(passed, list(report.gates), message, summary, finite)


# --------------------------------------------------------------------------- progress


@dataclass
class Scrape:
    """What rank 0's /metrics endpoint said."""

    step: int | None = None
    total_steps: int | None = None
    epoch: float | None = None
    loss: float | None = None
    tokens_per_second: float | None = None
    checkpoint_step: int | None = None
    eval_metrics: dict[str, float] = field(default_factory=dict)


_GAUGES = {
    "kubetune_train_step": "step",
    "kubetune_train_total_steps": "total_steps",
    "kubetune_train_epoch": "epoch",
    "kubetune_train_loss": "loss",
    "kubetune_train_tokens_per_second": "tokens_per_second",
    "kubetune_checkpoint_last_step": "checkpoint_step",
}


def parse_metrics(text: str) -> Scrape:
    """Parse the trainer's Prometheus text exposition."""
    out = Scrape()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            value = float(sample.value)
            if not math.isfinite(value):
                continue
            attr = _GAUGES.get(sample.name)
            if attr in ("step", "total_steps", "checkpoint_step"):
                setattr(out, attr, int(value))
            elif attr is not None:
                setattr(out, attr, value)
            elif sample.name == "kubetune_eval_metric":
                key = f"{sample.labels.get('split', 'eval')}_{sample.labels.get('metric', '')}"
                out.eval_metrics[key] = value
    return out


def progress_from_scrape(
    scrape: Scrape, rate_steps_per_second: float | None = None
) -> Progress | None:
    if scrape.step is None:
        return None
    total = scrape.total_steps or 0
    step = scrape.step
    percent = min(100, int(100 * step / total)) if total > 0 else 0
    eta: int | None = None
    if rate_steps_per_second and rate_steps_per_second > 0 and total >= step:
        eta = int((total - step) / rate_steps_per_second)
    return Progress(
        step=step,
        total_steps=total,
        epoch=scrape.epoch or 0.0,
        percent=percent,
        eta_seconds=eta,
        tokens_per_second=scrape.tokens_per_second,
        loss=scrape.loss,
    )


# --------------------------------------------------------------------------- spec changes


def immutable_spec(spec_wire: Mapping[str, Any]) -> Obj:
    """The part of a spec fixed at launch: all but runPolicy's lifecycle knobs and inference."""
    fixed = {k: v for k, v in spec_wire.items() if k != "inference"}
    policy = {
        k: v for k, v in dict(fixed.get("runPolicy") or {}).items() if k not in MUTABLE_RUN_POLICY
    }
    fixed["runPolicy"] = policy
    return fixed


def spec_hash(spec: FineTuneJobSpec) -> str:
    data = json.dumps(immutable_spec(spec.wire()), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(data.encode()).hexdigest()[:16]


def changed_fields(
    old: Mapping[str, Any], new: Mapping[str, Any], prefix: str = "spec"
) -> list[str]:
    """Dotted paths that differ between two wire dicts (for the SpecChangeRefused message)."""
    out: list[str] = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        path = f"{prefix}.{key}"
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            out.extend(changed_fields(a, b, path))
        elif a != b:
            out.append(path)
    return out


# --------------------------------------------------------------------------- deadlines, TTL


def deadline_exceeded(
    start_time: str | None, active_deadline_seconds: int | None, now: datetime
) -> bool:
    started = parse_time(start_time)
    if started is None or active_deadline_seconds is None:
        return False
    return (now - started).total_seconds() >= active_deadline_seconds


def ttl_expired(completion_time: str | None, ttl_seconds: int | None, now: datetime) -> bool:
    done = parse_time(completion_time)
    if done is None or ttl_seconds is None:
        return False
    return (now - done).total_seconds() >= ttl_seconds


def seconds_until(when: str | None, delay: float, now: datetime) -> float:
    """Seconds left until `when + delay` (0 when due or unknown)."""
    start = parse_time(when)
    if start is None:
        return 0.0
    return max(0.0, delay - (now - start).total_seconds())
