"""Tests for kubetune_trainer.telemetry and .errors: metrics, progress.json, exit reasons."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
import urllib.parse
from pathlib import Path
from typing import Any

import pytest
import requests
from prometheus_client import REGISTRY, generate_latest

from kubetune_trainer.config import FinalReport, GateVerdict, JobIdentity
from kubetune_trainer.errors import ConfigError, TrainingInterrupted, classify_failure
from kubetune_trainer.store import StorageUnavailable, Store, open_store
from kubetune_trainer.telemetry.progress import PROGRESS_FILE, ProgressReporter, read_progress
from kubetune_trainer.telemetry.prometheus import TrainerMetrics
from kubetune_trainer.telemetry.secrets import redact_secrets
from kubetune_trainer.telemetry.termination import (
    TERMINATION_MESSAGE_MAX_BYTES,
    final_report,
    success_message,
    write_success,
    write_termination_message,
)

SECRET = "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY"
KEY_ID = "AKIAIOSFODNN7EXAMPLE"


def _wait_for(pred: Any, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.01)
    return bool(pred())


# -- Prometheus -------------------------------------------------------------------------------


def test_metrics_served_over_http() -> None:
    m = TrainerMetrics.for_job(JobIdentity(name="sentiment", namespace="team-a"))
    port = m.serve("127.0.0.1", 0)
    try:
        assert port > 0
        m.observe_step(step=10, total=100, epoch=0.5, loss=1.25, step_seconds=0.5, tokens=2048)
        m.observe_step(step=11, total=100, epoch=0.55, loss=1.0, step_seconds=0.25, tokens=1024)
        m.observe_eval("validation", {"accuracy": 0.9, "f1_macro": 0.8, "per_class": {"a": {}}})
        m.observe_eval("test", {"loss": 0.3})
        m.observe_checkpoint(step=11, seconds=3.0, size_bytes=123456, timestamp=1700000000.0)

        resp = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=5)
        assert resp.status_code == 200
        text = resp.text
        lbl = 'job="sentiment",namespace="team-a"'
        for line in (
            f"kubetune_train_step{{{lbl}}} 11.0",
            f"kubetune_train_total_steps{{{lbl}}} 100.0",
            f"kubetune_train_epoch{{{lbl}}} 0.55",
            f"kubetune_train_loss{{{lbl}}} 1.0",
            f"kubetune_train_tokens_per_second{{{lbl}}} 4096.0",
            f"kubetune_train_tokens_total{{{lbl}}} 3072.0",
            f"kubetune_train_step_seconds_count{{{lbl}}} 2.0",
            f"kubetune_checkpoint_last_step{{{lbl}}} 11.0",
            f"kubetune_checkpoint_last_timestamp_seconds{{{lbl}}} 1.7e+09",
            f"kubetune_checkpoint_size_bytes{{{lbl}}} 123456.0",
            f"kubetune_checkpoint_duration_seconds_count{{{lbl}}} 1.0",
            'kubetune_eval_metric{job="sentiment",metric="accuracy",namespace="team-a",'
            'split="validation"} 0.9',
            'kubetune_eval_metric{job="sentiment",metric="loss",namespace="team-a",'
            'split="test"} 0.3',
        ):
            assert line in text, line
        assert "per_class" not in text
        assert m.render() == generate_latest(m.registry)
    finally:
        m.shutdown()


def test_metrics_use_private_registries() -> None:
    # Two instances in one process must not clash (they would on the global registry).
    a, b = TrainerMetrics("a", "ns"), TrainerMetrics("b", "ns")
    a.observe_step(1, 10, 0.1, 2.0, 0.1, 10)
    assert b'job="a"' in a.render() and b'job="a"' not in b.render()
    assert b"kubetune_train_step" not in generate_latest(REGISTRY)


# -- progress.json ----------------------------------------------------------------------------


def _store(tmp_path: Path) -> Store:
    return open_store(str(tmp_path / "run"))


def test_progress_written_within_interval(tmp_path: Path) -> None:
    store = _store(tmp_path)
    rep = ProgressReporter(store, interval_seconds=0.2)
    try:
        t0 = time.monotonic()
        rep.update(phase="training", step=5, total_steps=20, epoch=0.25, loss=1.5)
        assert _wait_for(lambda: store.exists(PROGRESS_FILE), timeout=3.0)
        # One 0.2 s interval, plus generous slack for a busy 2-core CI machine.
        assert time.monotonic() - t0 < 3.0
        doc = store.read_json(PROGRESS_FILE)
        assert doc["phase"] == "training"
        assert doc["step"] == 5 and doc["totalSteps"] == 20
        assert doc["percent"] == 25.0
        assert doc["loss"] == 1.5
        assert doc["latestCheckpoint"] is None
        assert doc["restartsSeen"] == 0
        assert doc["updatedAt"].endswith("Z")
        assert set(doc) == {
            "phase", "step", "totalSteps", "epoch", "percent", "etaSeconds", "loss",
            "tokensPerSecond", "updatedAt", "latestCheckpoint", "restartsSeen", "message",
            "stepsByAttempt",
        }  # fmt: skip
        assert doc["stepsByAttempt"] == {"0": 5}

        # A later update reaches the store on a later tick.
        rep.update(step=10)
        assert _wait_for(lambda: store.read_json(PROGRESS_FILE)["step"] == 10, timeout=3.0)
    finally:
        rep.close()
    final = store.read_json(PROGRESS_FILE)
    assert final["step"] == 10


def test_progress_final_flush_and_checkpoint(tmp_path: Path) -> None:
    store = _store(tmp_path)
    rep = ProgressReporter(store, interval_seconds=3600, restarts_seen=2)
    rep.update(phase="training", step=50, total_steps=50, epoch=1.0, tokens_per_second=900.0)
    rep.checkpoint_saved(50, "s3://bucket/ns/job/checkpoints/step-50")
    rep.update(phase="done", message="finished")
    assert not store.exists(PROGRESS_FILE)  # an hour-long interval: nothing written yet
    assert rep.close() is True
    rep.close()  # idempotent
    doc = store.read_json(PROGRESS_FILE)
    assert doc["phase"] == "done" and doc["percent"] == 100.0 and doc["etaSeconds"] == 0.0
    assert doc["latestCheckpoint"]["step"] == 50
    assert doc["latestCheckpoint"]["uri"].endswith("step-50")
    assert doc["latestCheckpoint"]["time"].endswith("Z")
    assert doc["restartsSeen"] == 2
    assert doc["tokensPerSecond"] == 900.0
    prev = read_progress(store)
    assert prev is not None and prev.restarts_seen == 2 and prev.phase == "done"
    assert read_progress(_store(tmp_path / "empty")) is None
    # A newer trainer's extra fields do not hide restartsSeen from an older one.
    store.write_json(PROGRESS_FILE, {**doc, "futureField": 1})
    again = read_progress(store)
    assert again is not None and again.restarts_seen == 2


def test_progress_keeps_the_highest_step_of_every_attempt(tmp_path: Path) -> None:
    store = _store(tmp_path)
    first = ProgressReporter(store, interval_seconds=3600, attempt=1)
    first.update(step=30)
    first.update(step=12)  # a resume inside the attempt never lowers its highest step
    first.close()
    assert store.read_json(PROGRESS_FILE)["stepsByAttempt"] == {"1": 30}
    second = ProgressReporter(store, interval_seconds=3600, attempt=2)
    second.update(step=25)
    second.close()
    assert store.read_json(PROGRESS_FILE)["stepsByAttempt"] == {"1": 30, "2": 25}


def test_progress_eta_from_recent_rate(tmp_path: Path) -> None:
    now = [100.0]
    rep = ProgressReporter(_store(tmp_path), 1, clock=lambda: now[0], start=False)
    rep.update(step=0, total_steps=1000)
    assert rep.eta_seconds() is None  # one sample: no rate yet
    for _ in range(10):
        now[0] += 1.0
        rep.update(step=int(now[0] - 100) * 2)  # 2 steps per second
    assert rep.snapshot().step == 20
    assert rep.eta_seconds() == pytest.approx((1000 - 20) / 2)
    # The rate follows recent steps: after slowing to 1 step/s the window forgets the old pace.
    for _ in range(40):
        now[0] += 1.0
        rep.update(step=rep.snapshot().step + 1)
    assert rep.eta_seconds() == pytest.approx(1000 - 60)
    # Non-finite loss is stored as null (JSON has no NaN).
    rep.update(loss=float("nan"))
    assert rep.snapshot().loss is None
    rep.update(step=1000)
    assert rep.eta_seconds() == 0.0


def test_failing_store_never_crashes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    store = _store(tmp_path)
    real_write = store.write_json
    calls = {"n": 0}

    def flaky(rel: str, obj: Any) -> None:
        calls["n"] += 1
        if calls["n"] <= 3:
            raise StorageUnavailable(f"endpoint down (key {SECRET})")
        real_write(rel, obj)

    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    monkeypatch.setattr(store, "write_json", flaky)
    caplog.set_level(logging.DEBUG, logger="kubetune_trainer.telemetry.progress")
    rep = ProgressReporter(store, interval_seconds=0.05)
    try:
        rep.update(phase="training", step=1, total_steps=10)
        # The thread survives three failures and then gets through.
        assert _wait_for(lambda: store.exists(PROGRESS_FILE), timeout=5.0)
        assert calls["n"] >= 4
    finally:
        rep.close()
    warnings = [
        r
        for r in caplog.records
        if r.levelno == logging.WARNING and r.name == "kubetune_trainer.telemetry.progress"
    ]
    assert len(warnings) == 1  # one warning per outage, not one per tick
    assert SECRET not in caplog.text

    # flush() reports a failure instead of raising.
    def broken(rel: str, obj: Any) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(store, "write_json", broken)
    rep2 = ProgressReporter(store, interval_seconds=0.05)
    rep2.update(step=2)
    time.sleep(0.2)
    assert rep2.flush() is False
    assert rep2.close() is False


def test_progress_message_redacted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", KEY_ID)
    store = _store(tmp_path)
    rep = ProgressReporter(store, interval_seconds=3600, start=False)
    rep.update(phase="failed", message=f"s3 said: bad key {KEY_ID} / {SECRET}")
    assert rep.flush()
    raw = json.dumps(store.read_json(PROGRESS_FILE))
    assert SECRET not in raw and KEY_ID not in raw
    assert "***" in raw


# -- termination message ----------------------------------------------------------------------


def test_termination_message_format(tmp_path: Path) -> None:
    path = tmp_path / "termination-log"
    write_termination_message(str(path), "InvalidData", "row 3: missing field 'label'\n  detail")
    assert path.read_text() == "InvalidData: row 3: missing field 'label' detail"
    write_termination_message(str(path), "Error", "second")  # overwrites, one line
    assert path.read_text() == "Error: second"


def test_termination_message_truncated(tmp_path: Path) -> None:
    path = tmp_path / "termination-log"
    write_termination_message(str(path), "Error", "é" * 5000)  # 2 bytes per character
    data = path.read_bytes()
    assert len(data) <= 4096
    assert len(data) >= 4094
    data.decode("utf-8")  # cut on a character boundary
    assert data.startswith(b"Error: ")


def test_termination_message_unwritable_path(tmp_path: Path) -> None:
    missing = tmp_path / "no" / "such" / "dir" / "termination-log"
    write_termination_message(str(missing), "Error", "x")  # must not raise
    assert not missing.exists()
    write_termination_message("", "Error", "x")
    a_dir = tmp_path / "is-a-directory"
    a_dir.mkdir()
    write_termination_message(str(a_dir), "Error", "x")
    if os.geteuid() != 0:  # root ignores permission bits
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o500)
        try:
            write_termination_message(str(ro / "termination-log"), "Error", "x")
            assert not (ro / "termination-log").exists()
        finally:
            ro.chmod(0o700)


def _verdict(metric: str = "accuracy", passed: bool = True, **over: Any) -> GateVerdict:
    fields: dict[str, Any] = {"metric": metric, "op": ">=", "value": 0.8, "actual": 0.93}
    return GateVerdict(**{**fields, **over}, passed=passed)


def test_success_message_is_the_final_report(tmp_path: Path) -> None:
    metrics = {
        "accuracy": 0.93,
        "f1_macro": 0.92,
        "loss": 0.31,
        "perplexity": float("inf"),
        "per_class": {"a": {"f1": 1.0}},
        "confusion_matrix": [[1]],
        "steps": 40,
        "flag": True,
    }
    report = final_report(
        metrics,
        [_verdict(), _verdict(op=">", value=0.5, must_beat_base=True)],
        steps=40,
        total_steps=42,
    )
    assert report.metrics == {
        "accuracy": 0.93, "f1_macro": 0.92, "loss": 0.31, "perplexity": None, "steps": 40.0,
    }  # fmt: skip
    assert report.gates_passed is True
    text = success_message(report)
    assert json.loads(text) == {
        "metrics": {
            "accuracy": 0.93, "f1_macro": 0.92, "loss": 0.31, "perplexity": None, "steps": 40.0,
        },
        "gates": [
            {"metric": "accuracy", "op": ">=", "value": 0.8, "actual": 0.93, "passed": True,
             "mustBeatBase": False},
            {"metric": "accuracy", "op": ">", "value": 0.5, "actual": 0.93, "passed": True,
             "mustBeatBase": True},
        ],
        "gatesPassed": True,
        "steps": 40,
        "totalSteps": 42,
    }  # fmt: skip
    assert " " not in text  # compact: one line, every byte counts

    path = tmp_path / "termination-log"
    write_success(str(path), report)
    reason, _, payload = path.read_text().partition(": ")
    assert reason == "Succeeded"
    # The operator's side of the contract.
    assert FinalReport.model_validate_json(payload) == report


def test_success_message_gates_passed_follows_the_verdicts() -> None:
    report = final_report({"loss": 2.0}, [_verdict(), _verdict("loss", passed=False)])
    assert report.gates_passed is False
    assert final_report({}, []).gates_passed is True  # no gates: nothing to fail
    assert json.loads(success_message(final_report({}, []))) == {
        "metrics": {}, "gates": [], "gatesPassed": True, "steps": None, "totalSteps": None,
    }  # fmt: skip


def test_success_message_fits_by_dropping_metrics_first(tmp_path: Path) -> None:
    metrics = {f"metric_{i:04d}": 0.123456 for i in range(300)}  # ~7 KB of metrics
    gates = [_verdict(passed=False)]
    text = success_message(final_report(metrics, gates))
    assert len(f"Succeeded: {text}".encode()) <= TERMINATION_MESSAGE_MAX_BYTES
    report = FinalReport.model_validate_json(text)
    assert report.metrics == {} and report.gates == gates and report.gates_passed is False

    # Far too many gates: they go from the end, the decision itself always stays.
    many = [_verdict(f"metric_{i:04d}") for i in range(200)]
    text = success_message(final_report({}, [*many, _verdict(passed=False)]))
    assert len(f"Succeeded: {text}".encode()) <= TERMINATION_MESSAGE_MAX_BYTES
    report = FinalReport.model_validate_json(text)
    assert 0 < len(report.gates) < 200 and report.gates == many[: len(report.gates)]
    assert report.gates_passed is False

    path = tmp_path / "termination-log"
    write_success(str(path), final_report(metrics, gates))
    data = path.read_bytes()
    assert len(data) <= TERMINATION_MESSAGE_MAX_BYTES
    FinalReport.model_validate_json(data.decode().removeprefix("Succeeded: "))


def test_termination_message_redacted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    path = tmp_path / "termination-log"
    write_termination_message(str(path), "StorageUnavailable", f"signature for {SECRET} rejected")
    assert path.read_text() == "StorageUnavailable: signature for *** rejected"


# -- classification of failures ---------------------------------------------------------------


class InvalidDataError(ValueError):
    """Same name as kubetune_trainer.data's: recognised by name when data.py is unavailable."""


class OutOfMemoryError(RuntimeError):
    """Same name as torch.OutOfMemoryError."""


def _validation_error() -> Exception:
    try:
        JobIdentity.model_validate({})
    except Exception as exc:
        return exc
    raise AssertionError("expected a ValidationError")


def _chained() -> BaseException:
    try:
        try:
            raise MemoryError()
        except MemoryError as inner:
            raise RuntimeError("allocator failed") from inner
    except RuntimeError as exc:
        return exc


@pytest.mark.parametrize(
    ("exc", "reason", "code"),
    [
        (InvalidDataError("row 3: no label"), "InvalidData", 3),
        (MemoryError(), "OutOfMemory", 4),
        (RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB"), "OutOfMemory", 4),
        (OutOfMemoryError("alloc"), "OutOfMemory", 4),
        (StorageUnavailable("s3 endpoint unreachable"), "StorageUnavailable", 5),
        (KeyboardInterrupt(), "Interrupted", 143),
        (TrainingInterrupted("SIGTERM: saved step 40"), "Interrupted", 143),
        (_validation_error(), "InvalidSpec", 2),
        (ConfigError("model.source: unknown builtin"), "InvalidSpec", 2),
        (_chained(), "OutOfMemory", 4),
        (ValueError("bad"), "Error", 1),
        (ZeroDivisionError(), "Error", 1),
    ],
)
def test_classify_failure(exc: BaseException, reason: str, code: int) -> None:
    got_reason, message, got_code = classify_failure(exc)
    assert (got_reason, got_code) == (reason, code)
    assert message


def test_classify_failure_messages(monkeypatch: pytest.MonkeyPatch) -> None:
    assert classify_failure(ValueError("bad")) == ("Error", "ValueError: bad", 1)
    assert classify_failure(ZeroDivisionError()) == ("Error", "ZeroDivisionError", 1)
    assert classify_failure(InvalidDataError("row 3")) == ("InvalidData", "row 3", 3)
    monkeypatch.setenv("AWS_SESSION_TOKEN", "FwoGZXIvYXdzEBEaDExampleToken")
    _, message, _ = classify_failure(RuntimeError("token FwoGZXIvYXdzEBEaDExampleToken expired"))
    assert "FwoGZ" not in message


def test_classify_real_invalid_data_error() -> None:
    data = pytest.importorskip("kubetune_trainer.data")
    assert classify_failure(data.InvalidDataError("bad row"))[::2] == ("InvalidData", 3)


# -- secrets ----------------------------------------------------------------------------------


def test_redact_secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", KEY_ID)
    monkeypatch.setenv("AWS_SESSION_TOKEN", "abc")  # too short to mask safely
    text = f"id={KEY_ID} secret={SECRET} enc={urllib.parse.quote(SECRET, safe='')} abc"
    out = redact_secrets(text)
    assert KEY_ID not in out and SECRET not in out
    assert urllib.parse.quote(SECRET, safe="") not in out
    assert out == "id=*** secret=*** enc=*** abc"
    # An assignment is masked even when the value is not in this environment.
    assert redact_secrets("aws_secret_access_key = hunter2hunter2", env={}) == (
        "aws_secret_access_key = ***"
    )
    assert redact_secrets("nothing secret here", env={}) == "nothing secret here"


def test_modules_import_without_heavy_dependencies() -> None:
    code = (
        "import sys, kubetune_trainer.errors, kubetune_trainer.telemetry.progress,"
        " kubetune_trainer.telemetry.termination, kubetune_trainer.evaluate.metrics;"
        "print(sorted(m for m in ('torch', 'sklearn', 'sacrebleu', 'boto3') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_every_retryable_or_permanent_exit_code_has_one_reason() -> None:
    # The operator reads a rank's exit code through this table only (kubetune_trainer.errors).
    from kubetune_trainer.errors import (
        EXIT_CODES,
        EXIT_REASONS,
        KILLED_EXIT_CODE,
        PERMANENT_EXIT_CODES,
        RETRYABLE_EXIT_CODES,
    )

    assert EXIT_REASONS[KILLED_EXIT_CODE] == "Killed"
    assert set(RETRYABLE_EXIT_CODES) | set(PERMANENT_EXIT_CODES) <= set(EXIT_REASONS)
    assert not RETRYABLE_EXIT_CODES & PERMANENT_EXIT_CODES
    assert all(EXIT_REASONS[code] == reason for reason, code in EXIT_CODES.items())
