"""Usage accounting, prices and the scheduler/quota/interruption readings (pure functions)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from kubetune_operator.api.models import PodUsage, Usage
from kubetune_operator.reconcile import scheduling as sched
from kubetune_operator.reconcile import usage
from kubetune_operator.reconcile.executor import settings_from_env

NOW = datetime(2024, 1, 1, 12, 0, 0, tzinfo=UTC)


def ago(seconds: float) -> str:
    return (NOW - timedelta(seconds=seconds)).strftime("%Y-%m-%dT%H:%M:%SZ")


def rank(uid: str, gpus: int, started: float, finished: float | None = None, node: str = "n0"):  # type: ignore[no-untyped-def]
    state: dict[str, Any]
    if finished is None:
        state = {"running": {"startedAt": ago(started)}}
    else:
        state = {"terminated": {"startedAt": ago(started), "finishedAt": ago(finished)}}
    return {
        "metadata": {"uid": uid, "name": uid},
        "spec": {
            "nodeName": node,
            "containers": [{"resources": {"limits": {"nvidia.com/gpu": str(gpus)}}}],
        },
        "status": {"containerStatuses": [{"state": state}]},
    }


def update(prev: Usage | None, pods: list[Any], **kw: Any) -> usage.UsageUpdate:
    args: dict[str, Any] = {
        "start_time": ago(600),
        "end_time": None,
        "now": NOW,
        "attempts": 1,
        "interruptions": 0,
    }
    args.update(kw)
    labels = args.pop("labels", {})
    pricing = args.pop("pricing", usage.Pricing())
    return usage.update(prev, pods, labels, pricing, **args)


def test_gpu_seconds_sum_every_pod_and_keep_pods_that_are_gone() -> None:
    first = update(None, [rank("a", 2, 100), rank("b", 2, 100, finished=40)])
    assert first.usage.gpu_seconds == 2 * 100 + 2 * 60
    assert first.live_gpu_seconds == 320
    # Pod b is gone, a new attempt's pod c runs: b keeps what it had.
    later = update(first.usage, [rank("c", 2, 10)], now=NOW, attempts=2)
    assert later.usage.gpu_seconds == 120 + 200 + 20  # b closed at 120, a closed at 200
    assert later.usage.closed_gpu_seconds == 320
    assert set(later.usage.open_pods) == {"c"}


def test_usage_is_written_at_transitions_and_once_a_minute_otherwise() -> None:
    first = update(None, [rank("a", 1, 100)])
    # 30 s later, nothing changed but time: not written (status stays the same object).
    same = update(first.usage, [rank("a", 1, 100)], now=NOW + timedelta(seconds=30))
    assert same.usage is first.usage and same.live_gpu_seconds == 130
    # 60 s later: written.
    minute = update(first.usage, [rank("a", 1, 100)], now=NOW + timedelta(seconds=60))
    assert minute.usage.gpu_seconds == 160
    # A pod finished: written at once, with its exact run time.
    done = update(first.usage, [rank("a", 1, 100, finished=-5)], now=NOW + timedelta(seconds=6))
    assert done.usage is not first.usage and done.usage.gpu_seconds == 105
    forced = update(first.usage, [rank("a", 1, 100)], now=NOW + timedelta(seconds=10), force=True)
    assert forced.usage.gpu_seconds == 110


def test_cost_by_node_label_and_default_price() -> None:
    pricing = usage.Pricing.parse("2", "gpu", '{"H100": 4.0}', "EUR")
    labels = {"n0": {"gpu": "H100"}, "n1": {"gpu": "T4"}}
    pods = [rank("a", 1, 3600, node="n0"), rank("b", 1, 3600, node="n1")]
    got = update(None, pods, labels=labels, pricing=pricing).usage
    assert got.estimated_cost == 6.0 and got.currency == "EUR"
    # Pod a is gone: its cost stays at its node's price.
    later = update(got, [pods[1]], labels={}, pricing=pricing, force=True).usage
    assert later.estimated_cost == 6.0 and later.closed_cost == 4.0
    assert update(None, pods).usage.estimated_cost is None  # unpriced: no cost at all


@pytest.mark.parametrize(
    ("price", "prices", "fragment"),
    [
        ("cheap", "", "KUBETUNE_GPU_HOUR_PRICE='cheap' is not a number"),
        ("", "[1, 2]", "KUBETUNE_GPU_PRICES='[1, 2]' is not a JSON object"),
        ("", '{"H100": "x"}', "is not a JSON object"),
        ("-1", "", "cannot be negative"),
    ],
)
def test_bad_prices_name_the_variable(price: str, prices: str, fragment: str) -> None:
    with pytest.raises(ValueError) as err:
        usage.Pricing.parse(price, "", prices, "")
    assert fragment in str(err.value)


def test_operator_settings_read_queue_timeout_and_prices(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KUBETUNE_QUEUE_TIMEOUT_SECONDS", "90")
    monkeypatch.setenv("KUBETUNE_GPU_HOUR_PRICE", "2.5")
    got = settings_from_env()
    assert got.queue_timeout == 90.0 and got.pricing.gpu_hour_price == 2.5
    monkeypatch.setenv("KUBETUNE_QUEUE_TIMEOUT_SECONDS", "")
    assert settings_from_env().queue_timeout is None  # unset: wait forever
    monkeypatch.setenv("KUBETUNE_QUEUE_TIMEOUT_SECONDS", "soon")
    with pytest.raises(ValueError, match="KUBETUNE_QUEUE_TIMEOUT_SECONDS='soon'"):
        settings_from_env()


def test_quota_message_names_the_quota_and_resource() -> None:
    body = (
        '{"kind":"Status","message":"pods \\"j-rank-0\\" is forbidden: exceeded quota: '
        "team-a, requested: requests.nvidia.com/gpu=2, used: requests.nvidia.com/gpu=1, "
        'limited: requests.nvidia.com/gpu=2","reason":"Forbidden","code":403}'
    )
    assert sched.is_quota_refusal(403, body) and not sched.is_quota_refusal(422, body)
    text = sched.quota_message(body)
    assert text.startswith("ResourceQuota team-a is full for requests.nvidia.com/gpu"), text
    assert "limited requests.nvidia.com/gpu=2" in text


def test_backoffs_grow_and_jitter_is_stable() -> None:
    assert sched.queue_backoff(0, "k") >= 5.0
    assert sched.queue_backoff(10_000, "k") <= 75.0
    assert sched.release_backoff(1, 10, "a") == sched.release_backoff(1, 10, "a")
    assert sched.release_backoff(1, 10, "a") != sched.release_backoff(1, 10, "b")
    assert 20.0 <= sched.release_backoff(2, 10, "a") < 30.0


def test_interruptions_and_their_causes() -> None:
    running = rank("a", 1, 10)
    assert sched.interruption(running, []) is None
    doomed = {**running, "metadata": {**running["metadata"], "deletionTimestamp": ago(1)}}
    cause = sched.interruption(doomed, [("Scheduled", "x"), ("Preempted", "by ns/urgent")])
    assert cause == "Preempted: by ns/urgent"
    assert "being deleted" in (sched.interruption(doomed, []) or "")
    assert "removed" in (sched.interruption(None, []) or "")
    killed = rank("a", 1, 10, finished=0)
    killed["status"]["containerStatuses"][0]["state"]["terminated"]["exitCode"] = 143
    assert "exited 143" in (sched.interruption(killed, []) or "")
    killed["status"]["containerStatuses"][0]["state"]["terminated"]["exitCode"] = 137
    assert sched.interruption(killed, []) is None  # SIGKILL/OOM is a failure


def test_node_lost_only_after_the_toleration() -> None:
    node = sched.node_info(
        {
            "metadata": {"name": "n", "labels": {"a": "b"}},
            "status": {
                "allocatable": {"nvidia.com/gpu": "4"},
                "conditions": [
                    {"type": "Ready", "status": "Unknown", "lastTransitionTime": ago(30)}
                ],
            },
        }
    )
    assert node.gpus == 4 and not node.ready and node.label_map == {"a": "b"}
    assert not sched.node_lost(node, NOW, 60) and sched.node_lost(node, NOW, 20)
    assert sched.node_lost(None, NOW, 60)  # deleted from the cluster
    assert sched.never_fits(5, {"n": node}) is not None
    assert sched.never_fits(4, {"n": node}) is None
    assert sched.never_fits(5, {}) is None  # no nodes yet: an autoscaler may add one


def test_pod_usage_roundtrips_on_the_wire() -> None:
    u = Usage(open_pods={"x": PodUsage(gpu_seconds=1.0, price=2.0)}, gpu_seconds=1.0)
    assert Usage.model_validate(u.wire()) == u
    assert "openPods" in u.wire() and "gpuSeconds" in u.wire()


def test_a_running_pod_that_vanished_counts_until_it_was_seen_gone() -> None:
    first = update(None, [rank("a", 2, 100), rank("b", 1, 100, finished=50)])
    gone = update(first.usage, [], now=NOW + timedelta(seconds=20))
    # a: 2 GPUs x (100 s + the 20 s until its deletion was seen); b had finished: 50 s.
    assert gone.usage.closed_gpu_seconds == 2 * 120 + 50
    assert gone.usage.open_pods == {}
