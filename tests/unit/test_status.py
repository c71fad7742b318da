"""Pure status logic: conditions, failure classification, restarts, gates, progress."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from kubetune_operator import status as st
from kubetune_operator.api.models import FineTuneJobSpec, FineTuneJobStatus
from kubetune_trainer.config import FinalReport, GateVerdict
from kubetune_trainer.errors import EXIT_CODES, PERMANENT_EXIT_CODES

T0 = datetime(2024, 1, 1, tzinfo=UTC)


def _pod(
    code: int | None, message: str = "", reason: str = "Error", phase: str = "Failed", **extra: Any
) -> dict[str, Any]:
    state: dict[str, Any] = {"running": {}}
    if code is not None:
        state = {"terminated": {"exitCode": code, "message": message, "reason": reason}}
    return {
        "metadata": {"name": "job-rank-0"},
        "spec": {"nodeName": "gpu-node-0"},
        "status": {"phase": phase, "containerStatuses": [{"state": state}], **extra},
    }


def test_set_condition_keeps_transition_time_when_status_is_unchanged() -> None:
    s = FineTuneJobStatus()
    assert st.set_condition(s, "Launched", True, "Launched", "a", now=T0)
    assert not st.set_condition(s, "Launched", True, "Launched", "a", now=T0 + timedelta(1))
    assert st.set_condition(s, "Launched", True, "Launched", "b", now=T0 + timedelta(1))
    cond = st.get_condition(s, "Launched")
    assert cond is not None and cond.last_transition_time == "2024-01-01T00:00:00Z"
    st.set_condition(s, "Launched", False, "GangRestart", now=T0 + timedelta(days=2))
    cond = st.get_condition(s, "Launched")
    assert cond is not None and cond.last_transition_time == "2024-01-03T00:00:00Z"
    assert not st.is_true(s, "Launched")
    assert st.remove_condition(s, "Launched") and s.conditions == []


def test_running_and_succeeded_pods_are_not_failures() -> None:
    assert st.classify_failure(_pod(None, phase="Running")) is None
    assert st.classify_failure(_pod(0, "Succeeded: {}", "Completed", "Succeeded")) is None


def test_permanent_failures() -> None:
    f = st.classify_failure(_pod(3, "InvalidData: row 4 has no label"))
    assert f is not None and not f.retryable
    assert (f.reason, f.exit_code, f.message) == ("InvalidData", 3, "row 4 has no label")
    assert f.node == "gpu-node-0" and f.pod == "job-rank-0"
    f = st.classify_failure(_pod(2, "some traceback\nmore lines"))
    assert f is not None and not f.retryable and f.reason == "InvalidSpec"


def test_retryable_failures() -> None:
    cases = {
        137: ("", "Error", "Killed"),
        143: ("Interrupted: checkpoint saved", "Error", "Interrupted"),
        4: ("OutOfMemory: CUDA out of memory", "Error", "OutOfMemory"),
        5: ("StorageUnavailable: connect refused", "Error", "StorageUnavailable"),
        1: ("Error: boom", "Error", "Error"),
    }
    for code, (msg, kube_reason, want) in cases.items():
        f = st.classify_failure(_pod(code, msg, kube_reason))
        assert f is not None and f.retryable, code
        assert f.reason == want, (code, f.reason)
    f = st.classify_failure(_pod(137, "", "OOMKilled"))
    assert f is not None and f.retryable and f.reason == "OutOfMemory"
    assert "memory limit" in f.message
    # After backoffLimit, the message says what to change.
    spent = st.decide_restart(f, restarts=2, backoff_limit=2)
    assert not spent.restart and "perDeviceBatchSize" in spent.message
    assert "zeroStage" in spent.message and "resources.memory" in spent.message
    other = st.decide_restart(st.classify_failure(_pod(1, "Error: boom", "Error")), 2, 2)  # type: ignore[arg-type]
    assert "perDeviceBatchSize" not in other.message
    evicted = {"metadata": {"name": "p"}, "status": {"phase": "Failed", "reason": "Evicted"}}
    f = st.classify_failure(evicted)
    assert f is not None and f.retryable and f.reason == "Evicted"


def test_exit_codes_come_from_the_trainers_table() -> None:
    for reason, code in EXIT_CODES.items():
        if code == 0:
            continue
        f = st.classify_failure(_pod(code, "no reason line"))
        assert f is not None and f.reason == reason, (code, f)
        assert f.retryable == (code not in PERMANENT_EXIT_CODES)
    # A rank that exited 0 yet failed is not "Succeeded".
    f = st.classify_failure(_pod(0, "", "Completed", "Failed"))
    assert f is not None and f.retryable and f.reason == "Completed"


def test_restart_decision_backoff_and_limit() -> None:
    f = st.Failure("p", "n", 137, "Killed", "", True)
    assert [st.restart_delay(i) for i in range(6)] == [10, 20, 40, 80, 160, 300]
    d = st.decide_restart(f, 0, 3)
    assert d.restart and d.delay == 10 and "gang restart 1/3" in d.message
    d = st.decide_restart(f, 3, 3)
    assert not d.restart and d.reason == "BackoffLimitExceeded"
    permanent = st.Failure("p", "n", 3, "InvalidData", "bad row", False)
    d = st.decide_restart(permanent, 0, 3)
    assert not d.restart and d.reason == "InvalidData" and "bad row" in d.message


def _report(metrics: dict[str, float | None], *gates: GateVerdict, passed: bool) -> str:
    report = FinalReport(metrics=metrics, gates=list(gates), gates_passed=passed)
    return "Succeeded: " + report.model_dump_json(by_alias=True)


def test_final_report_is_parsed_or_missing() -> None:
    gate = GateVerdict(metric="accuracy", op=">=", value=0.8, actual=0.93, passed=True)
    report = st.parse_final_report(_report({"accuracy": 0.93, "loss": None}, gate, passed=True))
    assert report is not None and report.gates_passed and report.gates == [gate]
    assert report.metrics == {"accuracy": 0.93, "loss": None}
    # The wire form is camelCase, as the trainer writes it.
    wire = '{"metrics":{},"gates":[],"gatesPassed":false}'
    assert st.parse_final_report(f"Succeeded: {wire}") is not None
    for missing in (None, "", "Error: x", "Succeeded: {}", 'Succeeded: {"accuracy":0.9}'):
        assert st.parse_final_report(missing) is None, missing


def test_gates_are_reported_as_the_trainer_decided() -> None:
    ok = GateVerdict(metric="accuracy", op=">=", value=0.8, actual=0.93, passed=True)
    text = _report({"accuracy": 0.93, "loss": 0.2, "f1_macro": None}, ok, passed=True)
    report = st.parse_final_report(text)
    assert report is not None
    d = st.decide_gates(report, "sequence-classification")
    assert d.passed and d.summary == "accuracy=0.93 PASS"
    assert d.message == "gates passed: accuracy=0.93 (needs >= 0.8) pass"
    assert d.metrics == {"accuracy": 0.93, "loss": 0.2}  # nulls skipped
    bad = GateVerdict(metric="accuracy", op=">=", value=0.8, actual=0.5, passed=False)
    d = st.decide_gates(FinalReport(gates=[bad], gates_passed=False), "sequence-classification")
    assert not d.passed and d.summary == "accuracy=0.5 FAIL"
    assert d.message == "gates failed: accuracy=0.5 (needs >= 0.8) FAIL"


def test_verdicts_are_never_recomputed() -> None:
    # The trainer says pass on a number the operator would call a failure: its word stands.
    odd = GateVerdict(metric="loss", op="<", value=0.1, actual=0.5, passed=True)
    d = st.decide_gates(FinalReport(gates=[odd], gates_passed=True), "causal-lm")
    assert d.passed and "loss=0.5 (needs < 0.1) pass" in d.message
    # And the overall flag decides, even when every listed verdict passed (gates dropped to fit).
    d = st.decide_gates(FinalReport(gates=[odd], gates_passed=False), "causal-lm")
    assert not d.passed and d.message.startswith("gates failed: ")


def test_must_beat_base_verdict_and_no_gates() -> None:
    beat = GateVerdict(
        metric="loss", op="<", value=1.2, actual=1.0, passed=False, must_beat_base=True
    )
    d = st.decide_gates(FinalReport(gates=[beat], gates_passed=False), "causal-lm")
    assert not d.passed and d.message == "gates failed: mustBeatBase on loss=1 FAIL"
    assert d.summary == "loss=1 FAIL"
    none = st.decide_gates(FinalReport(metrics={"loss": 1.0}, gates_passed=True), "causal-lm")
    assert none.passed and none.summary == "loss=1 PASS"
    assert none.message == "gates passed: no gates configured"


METRICS = """
# HELP kubetune_train_step Latest optimizer step.
# TYPE kubetune_train_step gauge
kubetune_train_step{job="j",namespace="n"} 30.0
kubetune_train_total_steps{job="j",namespace="n"} 120.0
kubetune_train_loss{job="j",namespace="n"} 1.25
kubetune_train_epoch{job="j",namespace="n"} 0.5
kubetune_train_tokens_per_second{job="j",namespace="n"} 900.0
kubetune_checkpoint_last_step{job="j",namespace="n"} 20.0
kubetune_eval_metric{job="j",metric="loss",namespace="n",split="validation"} 1.5
"""


def test_progress_from_metrics() -> None:
    scrape = st.parse_metrics(METRICS)
    assert scrape.step == 30 and scrape.total_steps == 120 and scrape.checkpoint_step == 20
    assert scrape.eval_metrics == {"validation_loss": 1.5}
    p = st.progress_from_scrape(scrape, rate_steps_per_second=2.0)
    assert p is not None
    assert (p.percent, p.eta_seconds, p.loss, p.tokens_per_second) == (25, 45, 1.25, 900.0)
    assert st.progress_from_scrape(st.Scrape()) is None


def test_spec_hash_ignores_mutable_fields() -> None:
    spec = FineTuneJobSpec.model_validate(
        {
            "task": "causal-lm",
            "model": {"source": "builtin:tiny-llama"},
            "data": {"train": "s3://bucket/t.jsonl", "format": "text"},
        }
    )
    h = st.spec_hash(spec)
    mutable = spec.model_copy(deep=True)
    mutable.run_policy.suspend = True
    mutable.run_policy.backoff_limit = 9
    mutable.inference.replicas = 3
    assert st.spec_hash(mutable) == h
    fixed = spec.model_copy(deep=True)
    fixed.hyperparameters.learning_rate = 0.1
    assert st.spec_hash(fixed) != h
    assert st.changed_fields(spec.wire(), fixed.wire()) == ["spec.hyperparameters.learningRate"]


def test_deadline_and_ttl() -> None:
    assert st.deadline_exceeded("2024-01-01T00:00:00Z", 60, T0 + timedelta(seconds=61))
    assert not st.deadline_exceeded("2024-01-01T00:00:00Z", 60, T0 + timedelta(seconds=59))
    assert not st.deadline_exceeded(None, 60, T0)
    assert st.ttl_expired("2024-01-01T00:00:00Z", 0, T0)
    assert not st.ttl_expired("2024-01-01T00:00:00Z", None, T0)
    assert st.seconds_until("2024-01-01T00:00:00Z", 10, T0 + timedelta(seconds=4)) == 6


def test_merge_patch_nulls_keys_that_went_away_at_every_depth() -> None:
    before = {"phase": "Running", "lastFailure": {"pod": "a", "exitCode": 137}, "endpoint": "x"}
    after = {"phase": "Restarting", "lastFailure": {"pod": "a", "reason": "PodLost"}}
    assert st.merge_patch(before, after) == {
        "phase": "Restarting",
        "lastFailure": {"pod": "a", "reason": "PodLost", "exitCode": None},
        "endpoint": None,
    }
    assert st.merge_patch({}, after) == after


def test_failure_info_leaves_unknown_fields_out_instead_of_empty_strings() -> None:
    lost = st.Failure("job-rank-0", "", None, "PodLost", "", True)
    status = FineTuneJobStatus(last_failure=lost.info())
    assert status.wire()["lastFailure"] == {"pod": "job-rank-0", "reason": "PodLost"}


def test_long_failure_messages_keep_their_start_and_end() -> None:
    message = "data/train.jsonl line 7, field 'label': unknown label 'x'; accepted: " + ", ".join(
        f"label{i}" for i in range(200)
    )
    pod = {
        "metadata": {"name": "j-rank-0"},
        "spec": {"nodeName": "n"},
        "status": {
            "phase": "Failed",
            "containerStatuses": [
                {"state": {"terminated": {"exitCode": 3, "message": "InvalidData: " + message}}}
            ],
        },
    }
    failure = st.classify_failure(pod)
    assert failure is not None and failure.reason == "InvalidData"
    assert len(failure.message) <= 512
    assert failure.message.startswith("data/train.jsonl line 7, field 'label'")
    assert failure.message.endswith("label199")
