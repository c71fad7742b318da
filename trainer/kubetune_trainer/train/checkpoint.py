"""Checkpoints: save locally, upload in the background, mark complete, point `latest`, prune.

Store layout under the run prefix:

    checkpoints/step-<N>/...            DeepSpeed files from every rank + trainer-state-rank<r>.json
    checkpoints/step-<N>/.done-rank-<r> each rank's upload finished
    checkpoints/step-<N>/COMPLETE       written by rank 0 once every rank is done (files, sizes)
    checkpoints/latest                  {"step": N} -- written last, so it only ever names a
                                        complete checkpoint

Each rank saves into its own staging folder, so ranks sharing a disk never upload each other's
half-written files. Uploads run on one background thread: training stalls only for the local save,
unless the previous upload is still running at the next checkpoint; then it waits for it, so
uploads never overlap and a staging folder is never removed before it is in the store. An
unreachable store is retried with back-off for `outage_tolerance` seconds (a storage blip must
not cost the run its progress) before the error ends the run as StorageUnavailable.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

from kubetune_trainer.store import Store, StoreError, StoreNotFound, ride_out_outage

log = logging.getLogger(__name__)

PREFIX = "checkpoints"
LATEST = f"{PREFIX}/latest"


def tag(step: int) -> str:
    return f"step-{step}"


def _dir_files(root: Path) -> dict[str, int]:
    return {
        str(p.relative_to(root)): p.stat().st_size for p in sorted(root.rglob("*")) if p.is_file()
    }


class CheckpointManager:
    """Owns one run's checkpoints in the store, for one rank."""

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
    ) -> None:
        self.store = store
        self.staging = staging / f"rank-{rank}"
        self.rank = rank
        self.world_size = world_size
        self.keep_last = keep_last
        self.on_saved = on_saved
        self.peer_timeout = peer_timeout
        self.outage_tolerance = outage_tolerance
        self.quantized = quantized
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ckpt-upload")
        self._pending: Future[None] | None = None

    # -- saving ---------------------------------------------------------------------------
    def save(self, engine: Any, step: int, state: dict[str, Any]) -> None:
        """Every rank calls this at the same step. Returns once the local save is done."""
        if self._pending is not None and not self._pending.done():
            waiting = time.monotonic()
            log.info("checkpoint %s: waiting for the previous upload to finish", tag(step))
            self._pending.result()
            log.info("previous checkpoint upload finished after %.1fs", time.monotonic() - waiting)
        self.raise_upload_error()
        started = time.monotonic()
        name = tag(step)
        local = self.staging / name
        if local.exists():
            shutil.rmtree(local)
        engine.save_checkpoint(str(self.staging), tag=name, save_latest=False)
        local.mkdir(parents=True, exist_ok=True)
        (local / f"trainer-state-rank{self.rank}.json").write_text(json.dumps(state))
        saved = time.monotonic() - started
        self._pending = self._pool.submit(self._upload, step, local, started, saved)

    def _upload(self, step: int, local: Path, started: float, saved: float) -> None:
        ride_out_outage(
            lambda: self._upload_once(step, local, started, saved),
            f"checkpoint {tag(step)} upload (training goes on)",
            self.outage_tolerance,
        )

    def _upload_once(self, step: int, local: Path, started: float, saved: float) -> None:
        name = tag(step)
        dest = f"{PREFIX}/{name}"
        size = self.store.upload_dir(local, dest)
        # The marker lists what this rank uploaded, so rank 0 can record every file's size.
        self.store.write_json(f"{dest}/.done-rank-{self.rank}", _dir_files(local))
        if self.rank == 0:
            self._wait_for_peers(dest)
            files: dict[str, int] = {}
            for r in range(self.world_size):
                files.update(self.store.read_json(f"{dest}/.done-rank-{r}"))
            self.store.write_json(
                f"{dest}/COMPLETE",
                {"step": step, "worldSize": self.world_size, "files": files, "time": time.time()},
            )
            self.store.write_json(LATEST, {"step": step})
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
        # Older local copies are never read again (resume downloads from the store).
        for old in self.staging.glob("step-*"):
            if old != local:
                shutil.rmtree(old, ignore_errors=True)

    def _wait_for_peers(self, dest: str) -> None:
        deadline = time.monotonic() + self.peer_timeout
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
            time.sleep(0.5)

    def _prune(self) -> None:
        steps = self.complete_steps()
        for step in steps[: -self.keep_last]:
            removed = self.store.delete_prefix(f"{PREFIX}/{tag(step)}")
            log.info("pruned checkpoint %s (%d objects)", tag(step), removed)

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
    def complete_steps(self) -> list[int]:
        steps = set()
        for key in self.store.list(PREFIX):
            parts = key.split("/")
            if len(parts) == 2 and parts[1] == "COMPLETE" and parts[0].startswith("step-"):
                steps.add(int(parts[0].removeprefix("step-")))
        return sorted(steps)

    def restore(self, engine: Any) -> dict[str, Any] | None:
        """Load the newest complete, intact checkpoint into the engine; None when there is none."""
        try:
            pointer = self.store.read_json(LATEST)
            newest = int(pointer["step"])
        except (StoreNotFound, KeyError, ValueError, TypeError):
            newest = None
        candidates = sorted(self.complete_steps(), reverse=True)
        if newest is not None and newest in candidates:
            candidates.remove(newest)
            candidates.insert(0, newest)
        for step in candidates:
            name = tag(step)
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
