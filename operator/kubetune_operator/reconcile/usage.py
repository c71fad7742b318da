"""GPU-seconds and cost per job, counted from the rank pods' own timestamps. Pure.

Every rank pod that exists contributes GPUs x the seconds its container ran (startedAt to
finishedAt, or to now while it runs). A pod that is gone keeps what it had at the last update
(`closedGpuSeconds`), so attempts that failed, were interrupted or released still count.
Status is written at transitions (a pod appears, goes or finishes; a new attempt; a phase
change) and at most once a minute otherwise, so a running job does not patch status every pass.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from kubetune_operator.api.models import PodUsage, Usage

Obj = dict[str, Any]
GPU_RESOURCE = "nvidia.com/gpu"
WRITE_EVERY = 60.0
DEFAULT_PRICE_LABEL = "nvidia.com/gpu.product"


@dataclass(frozen=True)
class Pricing:
    """The operator's prices (chart values `cost.*`): one per GPU-hour, optionally per node
    label value (e.g. the GPU product)."""

    gpu_hour_price: float | None = None
    node_label: str = DEFAULT_PRICE_LABEL
    by_label: tuple[tuple[str, float], ...] = ()
    currency: str = "USD"

    @property
    def priced(self) -> bool:
        return self.gpu_hour_price is not None or bool(self.by_label)

    def price(self, labels: Mapping[str, str] | None) -> float | None:
        value = (labels or {}).get(self.node_label)
        for label_value, price in self.by_label:
            if label_value == value:
                return price
        return self.gpu_hour_price

    @classmethod
    def parse(cls, price: str, label: str, prices: str, currency: str) -> Pricing:
        """From the operator's environment; a bad value is an error naming the variable."""
        try:
            default = float(price) if price.strip() else None
        except ValueError:
            raise ValueError(f"KUBETUNE_GPU_HOUR_PRICE={price!r} is not a number") from None
        table: tuple[tuple[str, float], ...] = ()
        if prices.strip():
            try:
                raw = json.loads(prices)
                if not isinstance(raw, dict):
                    raise TypeError
                table = tuple(sorted((str(k), float(v)) for k, v in raw.items()))
            except (ValueError, TypeError):
                raise ValueError(
                    f"KUBETUNE_GPU_PRICES={prices!r} is not a JSON object of "
                    '{"<node label value>": <price per GPU-hour>}'
                ) from None
        for value in (default, *(p for _, p in table)):
            if value is not None and value < 0:
                raise ValueError(f"GPU-hour prices cannot be negative (got {value})")
        return cls(default, label or DEFAULT_PRICE_LABEL, table, currency or "USD")


def _time(value: Any) -> datetime | None:
    if not isinstance(value, str) or not value:
        return None
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None


def pod_gpus(pod: Obj) -> int:
    total = 0
    for c in (pod.get("spec") or {}).get("containers") or []:
        res = c.get("resources") or {}
        value = (res.get("limits") or {}).get(GPU_RESOURCE) or (res.get("requests") or {}).get(
            GPU_RESOURCE
        )
        try:
            total += int(str(value)) if value is not None else 0
        except ValueError:
            continue
    return total


def run_seconds(pod: Obj, now: datetime) -> tuple[float, bool]:
    """(seconds the pod's containers ran, finished?) from their startedAt/finishedAt."""
    longest, finished = 0.0, True
    statuses = (pod.get("status") or {}).get("containerStatuses") or []
    if not statuses:
        return 0.0, False
    for cs in statuses:
        state = cs.get("state") or {}
        start: datetime | None
        end: datetime | None
        if "running" in state:
            start, end, finished = _time(state["running"].get("startedAt")), now, False
        elif "terminated" in state:
            term = state["terminated"]
            start, end = _time(term.get("startedAt")), _time(term.get("finishedAt"))
        else:
            start, end, finished = None, None, False
        if start is not None and end is not None:
            longest = max(longest, (end - start).total_seconds())
    return max(0.0, longest), finished


@dataclass(frozen=True)
class UsageUpdate:
    usage: Usage  # what status should hold after this pass (the old value when not due)
    live_gpu_seconds: float  # as of now, for the budget check


def _cost(pods: Mapping[str, PodUsage]) -> float:
    return sum(p.gpu_seconds / 3600 * p.price for p in pods.values() if p.price is not None)


def update(
    prev: Usage | None,
    pods: list[Obj],
    node_labels: Mapping[str, Mapping[str, str]],
    pricing: Pricing,
    *,
    start_time: str | None,
    end_time: str | None,
    now: datetime,
    attempts: int,
    interruptions: int,
    force: bool = False,
) -> UsageUpdate:
    old = prev or Usage()
    current: dict[str, PodUsage] = {}
    finished: set[str] = set()
    for pod in pods:
        meta = pod.get("metadata") or {}
        uid = str(meta.get("uid") or meta.get("name") or "")
        seconds, done = run_seconds(pod, now)
        if not seconds and uid not in old.open_pods:
            continue  # never ran: nothing to count yet
        node = str((pod.get("spec") or {}).get("nodeName") or "")
        price = pricing.price(node_labels.get(node)) if pricing.priced else None
        if uid in old.open_pods and price is None:
            price = old.open_pods[uid].price  # node gone from the cache: keep its price
        gpus = pod_gpus(pod)
        current[uid] = PodUsage(
            gpu_seconds=round(gpus * seconds, 3), price=price, gpus=gpus, running=not done
        )
        if done:
            finished.add(uid)
    # A pod that went away while running (deleted, preempted) ran until about now: the pass
    # that notices is triggered by its deletion, not by a timer.
    since = _time(old.updated)
    extra = max(0.0, (now - since).total_seconds()) if since is not None else 0.0
    gone = {
        u: p.model_copy(
            update={"gpu_seconds": p.gpu_seconds + (p.gpus * extra if p.running else 0)}
        )
        for u, p in old.open_pods.items()
        if u not in current
    }
    closed = old.closed_gpu_seconds + sum(p.gpu_seconds for p in gone.values())
    closed_cost = old.closed_cost + _cost(gone)
    gpu_seconds = closed + sum(p.gpu_seconds for p in current.values())
    start, end = _time(start_time), _time(end_time) or now
    wall = max(0.0, (end - start).total_seconds()) if start is not None else 0.0
    cost = round(closed_cost + _cost(current), 4) if pricing.priced else None
    new = Usage(
        gpu_seconds=round(gpu_seconds, 1),
        gpu_hours=round(gpu_seconds / 3600, 4),
        closed_gpu_seconds=round(closed, 3),
        closed_cost=round(closed_cost, 6),
        open_pods=current,
        wall_seconds=round(wall, 1),
        attempts=attempts,
        interruptions=interruptions,
        estimated_cost=cost,
        currency=pricing.currency if pricing.priced else None,
        updated=now.strftime("%Y-%m-%dT%H:%M:%SZ"),
    )
    last = _time(old.updated)
    due = (
        force
        or prev is None
        or set(current) != set(old.open_pods)
        or any(abs(current[u].gpu_seconds - old.open_pods[u].gpu_seconds) > 0.5 for u in finished)
        or (attempts, interruptions) != (old.attempts, old.interruptions)
        or last is None
        or (now - last).total_seconds() >= WRITE_EVERY
    )
    return UsageUpdate(new if due else old, gpu_seconds)


def describe(usage: Usage) -> str:
    """One line for people: GPU-hours, attempts, interruptions, cost."""
    text = (
        f"{usage.gpu_hours:.4g} GPU-hours over {usage.attempts} attempt(s), "
        f"{usage.interruptions} interruption(s)"
    )
    if usage.estimated_cost is not None:
        text += f", about {usage.estimated_cost:.2f} {usage.currency or ''}".rstrip()
    return text
