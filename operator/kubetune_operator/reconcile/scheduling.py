"""Sharing the cluster: what the scheduler, ResourceQuota, preemption and dead nodes say about a
gang, in words the job's status can use. Pure: plain dicts in, plain values out.

Kubernetes owns the queue (the scheduler, PriorityClasses, ResourceQuota; Kueue on top): the
operator only reads what they decided and keeps the job's status honest about it.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

Obj = dict[str, Any]

# What the scheduler says when no node fits a rank -> the spec field that asks for too much.
UNSCHEDULABLE_FIELDS = (
    ("nvidia.com/gpu", "spec.resources.gpusPerNode"),
    ("Insufficient cpu", "spec.resources.cpu"),
    ("Insufficient memory", "spec.resources.memory"),
    ("node selector", "spec.resources.nodeSelector"),
    ("node affinity", "spec.resources.nodeSelector"),
    ("taint", "spec.resources.tolerations"),
    ("Too many pods", "spec.resources.nodes"),
)

# Pod status reasons that mean Kubernetes took the pod away (not the job's fault).
INTERRUPTION_POD_REASONS = frozenset(
    {"Preempted", "Preempting", "Evicted", "Shutdown", "NodeShutdown", "Terminated", "NodeLost"}
)
# Event reasons on a rank pod that name who took it away, most telling first.
INTERRUPTION_EVENT_REASONS = ("Preempted", "TaintManagerEviction", "Evicted", "NodeNotReady")
INTERRUPTED_EXIT_CODE = 143  # SIGTERM after the final checkpoint (kubetune_trainer.errors)


@dataclass(frozen=True)
class NodeInfo:
    """What the operator needs to know about a node."""

    name: str
    ready: bool
    since: str | None = None  # when the Ready condition last changed
    gpus: int = 0  # allocatable nvidia.com/gpu
    labels: tuple[tuple[str, str], ...] = ()

    @property
    def label_map(self) -> dict[str, str]:
        return dict(self.labels)


def node_info(node: Obj) -> NodeInfo:
    meta, status = node.get("metadata") or {}, node.get("status") or {}
    ready, since = False, None
    for cond in status.get("conditions") or []:
        if cond.get("type") == "Ready":
            ready, since = cond.get("status") == "True", cond.get("lastTransitionTime")
    try:
        gpus = int(str((status.get("allocatable") or {}).get("nvidia.com/gpu", "0")))
    except ValueError:
        gpus = 0
    labels = tuple(sorted((str(k), str(v)) for k, v in (meta.get("labels") or {}).items()))
    return NodeInfo(str(meta.get("name", "")), ready, since, gpus, labels)


def _time(value: str | None) -> datetime | None:
    if not value:
        return None
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None


# --------------------------------------------------------------------------- capacity


def unscheduled_message(pod: Obj) -> str | None:
    """The scheduler's message when it could not place this pod; None once it is placed."""
    if (pod.get("spec") or {}).get("nodeName"):
        return None
    for cond in (pod.get("status") or {}).get("conditions") or []:
        if (cond.get("type"), cond.get("status"), cond.get("reason")) == (
            "PodScheduled",
            "False",
            "Unschedulable",
        ):
            return str(cond.get("message") or "no node fits").strip()
    return None


def fields_for(scheduler_message: str) -> list[str]:
    return sorted({f for needle, f in UNSCHEDULABLE_FIELDS if needle in scheduler_message})


def waiting_for_capacity(messages: list[str], ranks: int) -> str:
    text = messages[0]
    fields = ", ".join(fields_for(text)) or "spec.resources"
    return f"{len(messages)}/{ranks} rank(s) waiting for capacity ({fields}): {text}"


def never_fits(gpus_per_node: int, nodes: Mapping[str, NodeInfo] | None) -> str | None:
    """Why no node can ever run a rank (more GPUs per node than any node has), or None.

    Not on an empty node list: on an autoscaled cluster the first GPU node may be on its way.
    """
    if not nodes or gpus_per_node <= 0:
        return None
    largest = max(n.gpus for n in nodes.values())
    if gpus_per_node <= largest:
        return None
    return (
        f"spec.resources.gpusPerNode={gpus_per_node}: no node has that many GPUs (the largest "
        f"has {largest}); ask for at most {largest} per node and use more nodes"
    )


_QUOTA_RE = re.compile(
    r"exceeded quota: (?P<quota>[^,]+), requested: (?P<requested>[^,]+(?:,[^,=]+=[^,]+)*?), "
    r"used: (?P<used>.*?), limited: (?P<limited>.*?)(?:\"|$)"
)


def quota_message(body: str) -> str:
    """The API server's 403 'exceeded quota' in words that name the quota and the resource."""
    text = body
    m = re.search(r'"message"\s*:\s*"((?:[^"\\]|\\.)*)"', body)
    if m:
        text = m.group(1)
    q = _QUOTA_RE.search(text)
    if q is None:
        return f"a ResourceQuota refused the rank pods: {text[:300]}"
    requested = q.group("requested")
    resources = ", ".join(sorted({part.split("=")[0] for part in requested.split(",")}))
    return (
        f"ResourceQuota {q.group('quota').strip()} is full for {resources} (requested "
        f"{requested}, used {q.group('used')}, limited {q.group('limited')})"
    )


def is_quota_refusal(status: int, body: str) -> bool:
    return status == 403 and "exceeded quota" in body


def queue_backoff(waited: float, key: str) -> float:
    """Seconds before trying a refused launch again: grows with the wait (no counter in status),
    between 5 s and 60 s, with jitter so many jobs do not retry in step."""
    return float(min(60.0, max(5.0, waited / 4)) * (1 + 0.25 * jitter(key)))


def release_backoff(releases: int, base: float, key: str) -> float:
    """Back-off before relaunching a released partial gang: base * 2^n, capped at 300 s, plus up
    to 50% jitter (derived from the job and the release number, so the plan stays pure), so two
    gangs that blocked each other do not come back in step."""
    delay = float(min(300.0, base * (2 ** max(0, releases - 1))))
    return delay * (1 + 0.5 * jitter(f"{key}/{releases}"))


def jitter(key: str) -> float:
    """A stable number in [0, 1) for `key`."""
    return int(hashlib.sha256(key.encode()).hexdigest()[:8], 16) / 0x100000000


# --------------------------------------------------------------------------- interruptions


def interruption(pod: Obj | None, events: list[tuple[str, str]]) -> str | None:
    """Why Kubernetes took this rank away, or None when it did not.

    Kubernetes 1.20 has no DisruptionTarget condition, so: a rank pod deleted by someone other
    than the operator (preemption, `kubectl drain`, the Eviction API, a taint), one that exited
    143 after its SIGTERM checkpoint, or one the kubelet failed with an eviction reason.
    """
    if pod is None:
        return _cause(events) or "the rank pod was removed (eviction, drain or another client)"
    meta, status = pod.get("metadata") or {}, pod.get("status") or {}
    if meta.get("deletionTimestamp"):
        return _cause(events) or "the rank pod is being deleted (preemption, drain or eviction)"
    if status.get("phase") == "Failed" and status.get("reason") in INTERRUPTION_POD_REASONS:
        return f"{status['reason']}: {status.get('message') or 'the node took the pod away'}"
    for cs in status.get("containerStatuses") or []:
        term = (cs.get("state") or {}).get("terminated") or {}
        if term.get("exitCode") == INTERRUPTED_EXIT_CODE:
            return _cause(events) or "the rank got SIGTERM, saved a checkpoint and exited 143"
    return None


def _cause(events: list[tuple[str, str]]) -> str | None:
    for wanted in INTERRUPTION_EVENT_REASONS:
        for reason, message in events:
            if reason == wanted:
                return f"{reason}: {message}"
    return None


# --------------------------------------------------------------------------- dead nodes


def node_lost(node: NodeInfo | None, now: datetime, toleration: float) -> bool:
    """A node that has not been Ready for `toleration` seconds (or no longer exists): its pods
    will never finish terminating on their own."""
    if node is None:
        return True
    if node.ready:
        return False
    since = _time(node.since)
    return since is not None and (now - since).total_seconds() >= toleration
