"""Checkpoints: save locally, upload in the background, mark complete, point `latest`, prune.

Store layout under the run prefix (A: the gang attempt, env KUBETUNE_ATTEMPT; 0 when run locally):

    checkpoints/fence                   {"attempt": A} -- the newest attempt that owns the run
    checkpoints/<tag>/...               DeepSpeed files from every rank + trainer-state-rank<r>.json
    checkpoints/<tag>/.done-rank-<r>    each rank's upload finished
    checkpoints/<tag>/COMPLETE          written by rank 0 once every rank is done (files, sizes,
                                        step, attempt)
    checkpoints/latest                  {"step": N, "attempt": A} -- written last, so it only
                                        ever names a complete checkpoint (older trainers wrote
                                        no "attempt": read as 0)

    <tag> is step-<N> for attempt 0 (local runs, and every checkpoint written before attempts
    existed) and step-<N>-attempt-<A> for attempt A > 0.

Each rank saves into its own staging folder, so ranks sharing a disk never upload each other's
half-written files. Uploads run on one background thread: training stalls only for the local save,
unless the previous upload is still running at the next checkpoint; then it waits for it, so
uploads never overlap and a staging folder is never removed before it is in the store. An
unreachable store is retried with back-off for `outage_tolerance` seconds (a storage blip must
not cost the run its progress) before the error ends the run as StorageUnavailable.

Fencing. A rank of an old gang attempt may live on behind a network partition after the operator
started a new one. At restore (or before its first upload) rank 0 writes the fence; every rank
re-reads it before each upload, rank 0 also before COMPLETE and before moving `latest`. A rank
that finds a higher attempt there (or in `latest`) uploads nothing more, never moves `latest`,
and ends the run as Superseded (errors.AttemptSuperseded). `latest` moves only to a checkpoint
of the writer's attempt, and never back to a lower step of the attempt it already names.
Folders are per attempt because the fence check cannot be atomic with an upload that takes
minutes (S3 has no compare-and-swap): with shared step-<N> folders a stale rank that passed the
check could still overwrite the new attempt's files and `.done-rank` markers for the same step,
and so get an incomplete checkpoint marked COMPLETE. With its own folder the worst a stale rank
can leave is an orphan folder that nothing reads; pruning only ever deletes checkpoints of the
pruning attempt or older ones.

Grace check. Each save (local save + upload; on rank 0 until `latest` moved) is timed; one that
took more than half of KUBETUNE_CHECKPOINT_GRACE_SECONDS (the pod's termination grace period,
spec.runPolicy.checkpointGraceSeconds) is logged as a warning, since the final checkpoint after
SIGTERM may then not finish before the kubelet's SIGKILL.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, NamedTuple

from kubetune_trainer.errors import AttemptSuperseded
from kubetune_trainer.store import Store, StoreError, StoreNotFound, ride_out_outage

log = logging.getLogger(__name__)

PREFIX = "checkpoints"
LATEST = f"{PREFIX}/latest"
FENCE = f"{PREFIX}/fence"
ATTEMPT_ENV = "KUBETUNE_ATTEMPT"
GRACE_ENV = "KUBETUNE_CHECKPOINT_GRACE_SECONDS"
GRACE_FIELD = "spec.runPolicy.checkpointGraceSeconds"

_TAG = re.compile(r"step-(\d+)(?:-attempt-(\d+))?")


def tag(step: int, attempt: int = 0) -> str:
    """The folder (and DeepSpeed tag) of one checkpoint; see the module docstring."""
    return f"step-{step}" if attempt == 0 else f"step-{step}-attempt-{attempt}"


class CheckpointId(NamedTuple):
    """One checkpoint; orders as the run's lineage does: a later attempt's checkpoints are newer
    than every checkpoint of the attempts before it, whatever their steps."""

    attempt: int
    step: int

    @property
    def tag(self) -> str:
        return tag(self.step, self.attempt)

    @classmethod
    def parse(cls, name: str) -> CheckpointId | None:
        m = _TAG.fullmatch(name)
        return cls(int(m.group(2) or 0), int(m.group(1))) if m else None


def attempt_from_env(environ: Mapping[str, str] | None = None) -> int:
    """KUBETUNE_ATTEMPT, the gang attempt the operator launched this rank in; 0 when unset."""
    raw = (os.environ if environ is None else environ).get(ATTEMPT_ENV, "").strip()
    if not raw:
        return 0
    try:
        attempt = int(raw)
    except ValueError:
        attempt = -1
    if attempt < 0:
        raise ValueError(f"{ATTEMPT_ENV}={raw!r}: expected a non-negative integer")
    return attempt


def grace_from_env(environ: Mapping[str, str] | None = None) -> float | None:
    """KUBETUNE_CHECKPOINT_GRACE_SECONDS (the pod's termination grace period); None when unset
    or unusable (it only decides a warning)."""
    raw = (os.environ if environ is None else environ).get(GRACE_ENV, "").strip()
    if not raw:
        return None
    try:
        grace = float(raw)
    except ValueError:
        grace = -1.0
    if grace <= 0:
        log.warning("ignoring %s=%r: expected a positive number of seconds", GRACE_ENV, raw)
        return None
    return grace


def _dir_files(root: Path) -> dict[str, int]:
    return {
        str(p.relative_to(root)): p.stat().st_size for p in sorted(root.rglob("*")) if p.is_file()
    }


class CheckpointManager:
    """Owns one run's checkpoints in the store, for one rank of one gang attempt."""

    def __init__(
        self,
        store: Store,
        staging: Path,
        *,
        rank: int,
        world_size: int,
        keep_last: int,
        on_saved: Callable[[int, float, int, str], None] | None = None,
        peer_timeout: float = 600.0,
        outage_tolerance: float = 300.0,
        quantized: bool = False,
        attempt: int = 0,
        grace_seconds: float | None = None,
        fence_poll: float = 5.0,
    ) -> None:
        if attempt < 0:
            raise ValueError(f"attempt must be >= 0, got {attempt}")
        self.store = store
        self.staging = staging / f"rank-{rank}"
        self.rank = rank
        self.world_size = world_size
        self.keep_last = keep_last
        self.on_saved = on_saved
        self.peer_timeout = peer_timeout
        self.outage_tolerance = outage_tolerance
        self.quantized = quantized
        self.attempt = attempt
        self.grace_seconds = grace_seconds
        self.fence_poll = fence_poll
        self._superseded: AttemptSuperseded | None = None
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ckpt-upload")
        self._pending: Future[None] | None = None

    # -- fencing --------------------------------------------------------------------------
    def _supersede(self, newer: int, where: str, refused: str) -> AttemptSuperseded:
        """The error that ends a stale rank's run; its warning is logged once."""
        if self._superseded is None:
            self._superseded = AttemptSuperseded(
                f"gang attempt {newer} superseded this rank (rank {self.rank}, attempt "
                f"{self.attempt}): {self.store.uri}/{where} names attempt {newer}; {refused} "
                "refused, this rank uploads nothing more and stops"
            )
            log.warning("%s", self._superseded)
        return self._superseded

    def _read_fence(self) -> int | None:
        """The attempt the fence names; None when there is none. An unreadable fence is an
        error (fail closed): deleting it by hand lets rank 0 write a fresh one."""
        try:
            doc = self.store.read_json(FENCE)
        except StoreNotFound:
            return None
        try:
            return int(doc["attempt"])
        except (TypeError, KeyError, ValueError):
            raise StoreError(
                f'{self.store.uri}/{FENCE}: malformed fence {doc!r}; expected {{"attempt": N}}'
            ) from None

    def _read_latest(self) -> CheckpointId | None:
        """What `latest` names; a pointer from before attempts existed names attempt 0."""
        try:
            doc = self.store.read_json(LATEST)
            return CheckpointId(int(doc.get("attempt", 0)), int(doc["step"]))
        except (StoreNotFound, AttributeError, KeyError, ValueError, TypeError):
            return None

    def check_fence(self, refused: str) -> None:
        """Raise AttemptSuperseded when a newer attempt holds the fence; rank 0 (re)claims it
        for this attempt when it is absent or lower (healing a stale rank's overwrite)."""
        if self._superseded is not None:
            raise self._superseded
        fence = self._read_fence()
        if fence is not None and fence > self.attempt:
            raise self._supersede(fence, FENCE, refused)
        if self.rank == 0 and (fence is None or fence < self.attempt):
            self.store.write_json(FENCE, {"attempt": self.attempt})
            log.info("checkpoints fenced for gang attempt %d", self.attempt)

    def _check_owner(self, refused: str) -> CheckpointId | None:
        """check_fence, then `latest`: a pointer naming a newer attempt fences this rank too
        (the fence may have been deleted, or lowered by a stale rank 0). Returns `latest`."""
        self.check_fence(refused)
        current = self._read_latest()
        if current is not None and current.attempt > self.attempt:
            raise self._supersede(current.attempt, LATEST, refused)
        return current

    # -- saving ---------------------------------------------------------------------------
    def save(self, engine: Any, step: int, state: dict[str, Any]) -> None:
        """Every rank calls this at the same step. Returns once the local save is done."""
        if self._superseded is not None:
            raise self._superseded
        if self._pending is not None and not self._pending.done():
            waiting = time.monotonic()
            log.info("checkpoint %s: waiting for the previous upload to finish", self._tag(step))
            self._pending.result()
            log.info("previous checkpoint upload finished after %.1fs", time.monotonic() - waiting)
        self.raise_upload_error()
        started = time.monotonic()
        name = self._tag(step)
        local = self.staging / name
        if local.exists():
            shutil.rmtree(local)
        engine.save_checkpoint(str(self.staging), tag=name, save_latest=False)
        local.mkdir(parents=True, exist_ok=True)
        (local / f"trainer-state-rank{self.rank}.json").write_text(json.dumps(state))
        saved = time.monotonic() - started
        self._pending = self._pool.submit(self._upload, step, local, started, saved)

    def _tag(self, step: int) -> str:
        return tag(step, self.attempt)

    def _upload(self, step: int, local: Path, started: float, saved: float) -> None:
        ride_out_outage(
            lambda: self._upload_once(step, local, started, saved),
            f"checkpoint {self._tag(step)} upload (training goes on)",
            self.outage_tolerance,
        )

    def _upload_once(self, step: int, local: Path, started: float, saved: float) -> None:
        name = self._tag(step)
        dest = f"{PREFIX}/{name}"
        self.check_fence(f"checkpoint {name} upload")
        size = self.store.upload_dir(local, dest)
        # The upload took a while: a newer attempt may have fenced the run meanwhile.
        self.check_fence(f"checkpoint {name} upload marker")
        # The marker lists what this rank uploaded, so rank 0 can record every file's size.
        self.store.write_json(f"{dest}/.done-rank-{self.rank}", _dir_files(local))
        if self.rank == 0:
            self._wait_for_peers(dest)
            files: dict[str, int] = {}
            for r in range(self.world_size):
                files.update(self.store.read_json(f"{dest}/.done-rank-{r}"))
            self._check_owner(f"checkpoint {name} COMPLETE")
            self.store.write_json(
                f"{dest}/COMPLETE",
                {
                    "step": step,
                    "attempt": self.attempt,
                    "worldSize": self.world_size,
                    "files": files,
                    "time": time.time(),
                },
            )
            self._move_latest(CheckpointId(self.attempt, step))
            self._prune()
            total = time.monotonic() - started
            log.info(
                "checkpoint %s: local save %.1fs, uploaded %.1f MB in %.1fs total",
                name,
                saved,
                size / 1e6,
                total,
            )
            if self.on_saved:
                self.on_saved(step, total, size, f"{self.store.uri}/{dest}")
        self._check_grace(name, time.monotonic() - started)
        # Older local copies are never read again (resume downloads from the store).
        for old in self.staging.glob("step-*"):
            if old != local:
                shutil.rmtree(old, ignore_errors=True)

    def _move_latest(self, new: CheckpointId) -> None:
        """Point `latest` at this attempt's new checkpoint, never backwards (see module doc)."""
        current = self._check_owner(f"moving {LATEST} to {new.tag}")
        if current is not None and current > new:
            log.warning("not moving %s back from %s to the older %s", LATEST, current.tag, new.tag)
            return
        self.store.write_json(LATEST, {"step": new.step, "attempt": new.attempt})

    def _check_grace(self, name: str, seconds: float) -> None:
        grace = self.grace_seconds
        if grace is not None and seconds > grace / 2:
            log.warning(
                "checkpoint %s took %.2fs (local save + upload), more than half of %s (%gs): "
                "a SIGTERM checkpoint may not finish within the grace period; raise %s",
                name,
                seconds,
                GRACE_FIELD,
                grace,
                GRACE_FIELD,
            )

    def _wait_for_peers(self, dest: str) -> None:
        deadline = time.monotonic() + self.peer_timeout
        next_fence = time.monotonic() + self.fence_poll
        want = {f".done-rank-{r}" for r in range(self.world_size)}
        while True:
            have = {k for k in self.store.list(dest) if k.startswith(".done-rank-")}
            if want <= have:
                return
            if time.monotonic() > deadline:
                raise StoreError(
                    f"checkpoint {dest}: ranks {sorted(want - have)} did not finish uploading "
                    f"within {self.peer_timeout:.0f}s"
                )
            if time.monotonic() >= next_fence:
                # A superseded gang's peers stop uploading: do not wait peer_timeout for them.
                self.check_fence(f"{dest} COMPLETE")
                next_fence = time.monotonic() + self.fence_poll
            time.sleep(0.5)

    def _prune(self) -> None:
        """Keep the newest keep_last checkpoints of this attempt and the ones before it."""
        ours = [c for c in self.complete_checkpoints() if c.attempt <= self.attempt]
        for old in ours[: -self.keep_last]:
            removed = self.store.delete_prefix(f"{PREFIX}/{old.tag}")
            log.info("pruned checkpoint %s (%d objects)", old.tag, removed)

    def raise_upload_error(self) -> None:
        if self._pending is not None and self._pending.done():
            self._pending.result()

    def wait(self) -> None:
        """Block until the last upload finished; re-raise its error."""
        if self._pending is not None:
            self._pending.result()

    def close(self) -> None:
        self._pool.shutdown(wait=True)

    # -- resuming -------------------------------------------------------------------------
    def complete_checkpoints(self) -> list[CheckpointId]:
        """Every checkpoint with a COMPLETE record, oldest first (see CheckpointId)."""
        found: set[CheckpointId] = set()
        for key in self.store.list(PREFIX):
            parts = key.split("/")
            if len(parts) == 2 and parts[1] == "COMPLETE":
                ckpt = CheckpointId.parse(parts[0])
                if ckpt is not None:
                    found.add(ckpt)
        return sorted(found)

    def complete_steps(self) -> list[int]:
        return sorted({c.step for c in self.complete_checkpoints()})

    def restore(self, engine: Any) -> dict[str, Any] | None:
        """Load the newest complete, intact checkpoint into the engine; None when there is none.

        Claims the fence first (rank 0), so that a stale rank of an older attempt stops at its
        next upload; raises AttemptSuperseded when a newer attempt already owns the run."""
        newest = ride_out_outage(
            lambda: self._check_owner("restoring"), "checkpoint fence", self.outage_tolerance
        )
        complete = self.complete_checkpoints()
        if complete and complete[-1].attempt > self.attempt:
            newer = complete[-1]
            raise self._supersede(newer.attempt, f"{PREFIX}/{newer.tag}", "restoring")
        candidates = sorted(complete, reverse=True)
        if newest is not None and newest in candidates:
            candidates.remove(newest)
            candidates.insert(0, newest)
        for ckpt in candidates:
            name = ckpt.tag
            local = self.staging / "restore" / name
            try:
                manifest = self.store.read_json(f"{PREFIX}/{name}/COMPLETE")
                shutil.rmtree(local, ignore_errors=True)
                self.store.download_dir(f"{PREFIX}/{name}", local)
                have = _dir_files(local)
                bad = [f for f, size in manifest["files"].items() if have.get(f) != size]
                if bad:
                    log.warning("skipping checkpoint %s: missing or truncated files %s", name, bad)
                    continue
                state_file = local / f"trainer-state-rank{self.rank}.json"
                if not state_file.exists():
                    state_file = local / "trainer-state-rank0.json"
                state: dict[str, Any] = json.loads(state_file.read_text())
            except (StoreError, OSError, ValueError, KeyError) as err:
                log.warning("skipping checkpoint %s: %s", name, err)
                continue
            path, _ = engine.load_checkpoint(
                str(local.parent),
                tag=name,
                load_optimizer_states=True,
                load_lr_scheduler_states=True,
                # 4-bit (QLoRA) weights save their quantization state as extra keys that a
                # strict load rejects, though bitsandbytes restores from them (seen on an H100).
                load_module_strict=not self.quantized,
            )
            if path is None:
                log.warning("skipping checkpoint %s: DeepSpeed could not load it", name)
                continue
            log.info("resumed from checkpoint %s", name)
            return state
        return None
