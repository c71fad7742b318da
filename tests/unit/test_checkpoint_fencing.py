"""Checkpoint fencing (a stale rank of an old gang attempt), attempts in `latest`, the grace check.

CheckpointManager runs against the real store code (LocalStore, and S3Store on a moto server for
the refusal itself); DeepSpeed's engine is replaced by a stand-in that writes and reads one file.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kubetune_trainer.errors import AttemptSuperseded, classify_failure
from kubetune_trainer.store import Store, open_store
from kubetune_trainer.train.checkpoint import (
    FENCE,
    GRACE_FIELD,
    LATEST,
    PREFIX,
    CheckpointId,
    CheckpointManager,
    attempt_from_env,
    grace_from_env,
    tag,
)

LOGGER = "kubetune_trainer.train.checkpoint"
GRACE_TEXT = "a SIGTERM checkpoint may not finish within the grace period"


class FakeEngine:
    """DeepSpeed's save_checkpoint/load_checkpoint, as CheckpointManager calls them."""

    def __init__(self, payload: str = "weights") -> None:
        self.payload = payload
        self.saves = 0
        self.loaded: tuple[str, str] | None = None

    def save_checkpoint(self, save_dir: str, tag: str, save_latest: bool = True) -> None:
        self.saves += 1
        folder = Path(save_dir) / tag
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "mp_rank_00_model_states.pt").write_text(self.payload)

    def load_checkpoint(self, load_dir: str, tag: str, **_: Any) -> tuple[str | None, Any]:
        path = Path(load_dir) / tag / "mp_rank_00_model_states.pt"
        self.loaded = (tag, path.read_text())
        return str(path), {}


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return open_store(str(tmp_path / "store"))


@pytest.fixture(params=["local", "s3"])
def any_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    if request.param == "local":
        yield open_store(str(tmp_path / "store"))
    else:
        endpoint = request.getfixturevalue("moto_server")
        bucket = request.getfixturevalue("s3_bucket")
        yield open_store(f"s3://{bucket}/runs/job", endpoint=endpoint)


def _manager(store: Store, tmp_path: Path, attempt: int, **kw: Any) -> CheckpointManager:
    kw.setdefault("rank", 0)
    kw.setdefault("world_size", 1)
    kw.setdefault("keep_last", 3)
    staging = tmp_path / f"staging-attempt-{attempt}"
    return CheckpointManager(store, staging, attempt=attempt, outage_tolerance=0.0, **kw)


def _save(mgr: CheckpointManager, step: int, engine: FakeEngine | None = None) -> None:
    mgr.save(engine or FakeEngine(f"attempt {mgr.attempt} step {step}"), step, {"step": step})
    mgr.wait()


def _folders(store: Store) -> set[str]:
    return {k.split("/")[0] for k in store.list(PREFIX) if "/" in k}


def _warnings(caplog: pytest.LogCaptureFixture, text: str) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.levelno == logging.WARNING and text in r.getMessage()
    ]


# -- attempts in the records --------------------------------------------------------------------


def test_complete_and_latest_record_the_attempt_and_the_fence_is_claimed(
    store: Store, tmp_path: Path
) -> None:
    mgr = _manager(store, tmp_path, attempt=2)
    try:
        assert mgr.restore(FakeEngine()) is None  # nothing to resume; rank 0 claims the fence
        assert store.read_json(FENCE) == {"attempt": 2}
        _save(mgr, 5)
    finally:
        mgr.close()
    assert store.read_json(LATEST) == {"step": 5, "attempt": 2}
    complete = store.read_json(f"{PREFIX}/step-5-attempt-2/COMPLETE")
    assert (complete["step"], complete["attempt"]) == (5, 2)
    assert _folders(store) == {"step-5-attempt-2"}


def test_attempt_zero_keeps_the_old_folder_names() -> None:
    assert tag(7) == tag(7, 0) == "step-7"
    assert tag(7, 3) == "step-7-attempt-3"
    assert CheckpointId.parse("step-7") == CheckpointId(0, 7)
    assert CheckpointId.parse("step-7-attempt-3") == CheckpointId(3, 7)
    assert CheckpointId.parse("step-x") is None
    assert CheckpointId.parse("fence") is None
    # Lineage order: every checkpoint of a later attempt is newer, whatever its step.
    assert sorted([CheckpointId(2, 5), CheckpointId(1, 90), CheckpointId(2, 3)]) == [
        CheckpointId(1, 90),
        CheckpointId(2, 3),
        CheckpointId(2, 5),
    ]


def test_env_helpers() -> None:
    assert attempt_from_env({}) == 0
    assert attempt_from_env({"KUBETUNE_ATTEMPT": "3"}) == 3
    for bad in ("x", "-1", "1.5"):
        with pytest.raises(ValueError, match="KUBETUNE_ATTEMPT"):
            attempt_from_env({"KUBETUNE_ATTEMPT": bad})
    assert grace_from_env({}) is None
    assert grace_from_env({"KUBETUNE_CHECKPOINT_GRACE_SECONDS": "120"}) == 120.0
    assert grace_from_env({"KUBETUNE_CHECKPOINT_GRACE_SECONDS": "soon"}) is None
    assert grace_from_env({"KUBETUNE_CHECKPOINT_GRACE_SECONDS": "0"}) is None


# -- fencing ------------------------------------------------------------------------------------


def test_stale_attempt_is_refused(
    any_store: Store, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store = any_store
    new = _manager(store, tmp_path, attempt=2)
    old = _manager(store, tmp_path, attempt=1)  # started long ago, alive behind a partition
    try:
        new.restore(FakeEngine())
        _save(new, 10)
        latest_before = store.read_bytes(LATEST)
        keys_before = store.list(PREFIX)
        caplog.set_level(logging.WARNING, logger=LOGGER)

        engine = FakeEngine()
        old.save(engine, 12, {"step": 12})  # the local save is not the store's business
        with pytest.raises(AttemptSuperseded) as info:
            old.wait()
        # Nothing uploaded, `latest` untouched to the byte, the fence still the new attempt's.
        assert store.read_bytes(LATEST) == latest_before
        assert json.loads(latest_before) == {"step": 10, "attempt": 2}
        assert store.list(PREFIX) == keys_before
        assert store.read_json(FENCE) == {"attempt": 2}
        message = str(info.value)
        assert "gang attempt 2 superseded this rank (rank 0, attempt 1)" in message
        assert "uploads nothing more" in message
        assert len(_warnings(caplog, "superseded")) == 1
        # The run ends with its own exit reason (retryable for the operator).
        reason, _, code = classify_failure(info.value)
        assert (reason, code) == ("Superseded", 6)
        # Any later checkpoint is refused at once: no local save, still one warning line.
        with pytest.raises(AttemptSuperseded):
            old.save(engine, 14, {"step": 14})
        assert engine.saves == 1
        assert len(_warnings(caplog, "superseded")) == 1
        assert store.list(PREFIX) == keys_before
    finally:
        new.close()
        old.close()


def test_stale_non_zero_rank_uploads_nothing(store: Store, tmp_path: Path) -> None:
    new = _manager(store, tmp_path, attempt=2, world_size=2)
    new.check_fence("test")  # what rank 0 of attempt 2 did at restore
    stale = _manager(store, tmp_path, attempt=1, rank=1, world_size=2)
    try:
        stale.save(FakeEngine(), 12, {"step": 12})
        with pytest.raises(AttemptSuperseded, match="rank 1, attempt 1"):
            stale.wait()
        assert store.list(PREFIX) == ["fence"]
    finally:
        new.close()
        stale.close()


def test_restore_by_a_stale_attempt_is_refused_and_leaves_the_fence(
    store: Store, tmp_path: Path
) -> None:
    new = _manager(store, tmp_path, attempt=3)
    new.restore(FakeEngine())
    new.close()
    late = _manager(store, tmp_path, attempt=2)
    engine = FakeEngine()
    with pytest.raises(AttemptSuperseded, match="gang attempt 3 superseded"):
        late.restore(engine)
    late.close()
    assert engine.loaded is None
    assert store.read_json(FENCE) == {"attempt": 3}


def test_latest_of_a_newer_attempt_is_never_replaced_even_without_a_fence(
    store: Store, tmp_path: Path
) -> None:
    new = _manager(store, tmp_path, attempt=2)
    old = _manager(store, tmp_path, attempt=1)
    try:
        new.restore(FakeEngine())
        _save(new, 10)
        # The fence is gone (deleted by hand, say): `latest` itself still names attempt 2.
        store.delete_prefix(FENCE)
        with pytest.raises(AttemptSuperseded, match="checkpoints/latest names attempt 2"):
            _save(old, 12)
        assert store.read_json(LATEST) == {"step": 10, "attempt": 2}
        # Attempt 2's next checkpoint raises the fence again (the stale rank 0 lowered it)...
        assert store.read_json(FENCE) == {"attempt": 1}
        _save(new, 20)
        assert store.read_json(FENCE) == {"attempt": 2}
        assert store.read_json(LATEST) == {"step": 20, "attempt": 2}
        # The stale rank's folder is an orphan: never marked COMPLETE, so never restored.
        assert store.list(f"{PREFIX}/step-12-attempt-1") == [
            ".done-rank-0",
            "mp_rank_00_model_states.pt",
            "trainer-state-rank0.json",
        ]
    finally:
        new.close()
        old.close()


def test_restore_falls_back_in_lineage_order(store: Store, tmp_path: Path) -> None:
    one = _manager(store, tmp_path, attempt=1)
    _save(one, 100)  # say, completed by attempt 1 just before attempt 2 fenced the run
    one.close()
    two = _manager(store, tmp_path, attempt=2)
    _save(two, 60)
    two.close()
    store.delete_prefix(LATEST)  # lost: the newest in lineage order wins, not the highest step
    three = _manager(store, tmp_path, attempt=3)
    engine = FakeEngine()
    assert three.restore(engine) == {"step": 60}
    three.close()
    assert engine.loaded == ("step-60-attempt-2", "attempt 2 step 60")


def test_rank0_waiting_for_peers_stops_when_fenced(store: Store, tmp_path: Path) -> None:
    # Rank 0 of attempt 1 uploaded; its peer never will (it was fenced). Without the fence check
    # in the wait it would sit out peer_timeout and end as a storage error.
    old = _manager(store, tmp_path, attempt=1, world_size=2, peer_timeout=5.0, fence_poll=0.1)
    try:
        old.save(FakeEngine(), 12, {"step": 12})
        deadline = time.monotonic() + 10
        while not store.exists(f"{PREFIX}/step-12-attempt-1/.done-rank-0"):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        store.write_json(FENCE, {"attempt": 2})
        started = time.monotonic()
        with pytest.raises(AttemptSuperseded):
            old.wait()
        assert time.monotonic() - started < 4
        assert not store.exists(LATEST)
        assert not store.exists(f"{PREFIX}/step-12-attempt-1/COMPLETE")
    finally:
        old.close()


def test_latest_never_moves_back_within_an_attempt_but_a_new_attempt_may_restart_lower(
    store: Store, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger=LOGGER)
    one = _manager(store, tmp_path, attempt=1)
    try:
        _save(one, 10)
        _save(one, 5)  # out of order: a complete checkpoint, but `latest` stays at 10
        assert store.read_json(LATEST) == {"step": 10, "attempt": 1}
        assert _warnings(caplog, "not moving checkpoints/latest back")
    finally:
        one.close()
    two = _manager(store, tmp_path, attempt=2)
    try:
        _save(two, 4)  # attempt 2 resumed from an earlier checkpoint: that is progress
        assert store.read_json(LATEST) == {"step": 4, "attempt": 2}
    finally:
        two.close()


def test_prune_keeps_the_newest_of_the_lineage(store: Store, tmp_path: Path) -> None:
    one = _manager(store, tmp_path, attempt=1, keep_last=2)
    _save(one, 10)
    _save(one, 20)
    one.close()
    two = _manager(store, tmp_path, attempt=2, keep_last=2)
    _save(two, 12)  # resumed from step 10: step 20 of attempt 1 is older than this one
    two.close()
    assert _folders(store) == {"step-20-attempt-1", "step-12-attempt-2"}


# -- reading what older trainers wrote ----------------------------------------------------------


def test_old_latest_without_attempt_still_restores(store: Store, tmp_path: Path) -> None:
    # What a trainer before attempts left: step-<N> folders and {"step": N}, no fence.
    before = _manager(store, tmp_path, attempt=0)
    _save(before, 3)
    _save(before, 6)
    before.close()
    store.write_json(LATEST, {"step": 3})  # latest names the older one: it must win
    store.delete_prefix(FENCE)
    assert _folders(store) == {"step-3", "step-6"}

    mgr = _manager(store, tmp_path, attempt=1)
    engine = FakeEngine()
    try:
        assert mgr.restore(engine) == {"step": 3}
        assert engine.loaded == ("step-3", "attempt 0 step 3")
        assert store.read_json(FENCE) == {"attempt": 1}
        _save(mgr, 8)
    finally:
        mgr.close()
    assert store.read_json(LATEST) == {"step": 8, "attempt": 1}


# -- grace check --------------------------------------------------------------------------------


@pytest.mark.parametrize(("grace", "warned"), [(0.001, True), (3600.0, False), (None, False)])
def test_grace_warning_when_a_save_is_slow(
    store: Store,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    grace: float | None,
    warned: bool,
) -> None:
    caplog.set_level(logging.WARNING, logger=LOGGER)
    mgr = _manager(store, tmp_path, attempt=1, grace_seconds=grace)
    try:
        _save(mgr, 2)
    finally:
        mgr.close()
    found = _warnings(caplog, GRACE_TEXT)
    assert bool(found) == warned
    if warned:
        assert len(found) == 1
        assert GRACE_FIELD == "spec.runPolicy.checkpointGraceSeconds"
        assert GRACE_FIELD in found[0] and "step-2-attempt-1 took" in found[0]
