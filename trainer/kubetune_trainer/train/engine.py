"""The DeepSpeed engine and the training loop: steps, validation, early stopping, checkpoints.

Built on `deepspeed.initialize` rather than the HF Trainer: the loop owns the data position, so a
resumed run continues with exactly the batches it would have seen, and every rank provably reads
its own shard (DistributedSampler), which the HF Trainer on CPU does not do under torchrun.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import logging
import math
import os
import random
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kubetune_trainer.config import TrainerConfig
from kubetune_trainer.evaluate.evaluator import loss_and_predictions
from kubetune_trainer.evaluate.metrics import classification_metrics, perplexity
from kubetune_trainer.models.builtin import cache_dir
from kubetune_trainer.tokenization import Collator
from kubetune_trainer.train.checkpoint import CheckpointManager
from kubetune_trainer.train.early_stopping import EarlyStopping

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits in the job."""

    rank: int
    world_size: int
    local_rank: int
    use_cuda: bool

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed() -> DistEnv:
    """Join the process group (gloo on CPU, NCCL on GPU). A lone process forms a group of one.

    Without RANK/WORLD_SIZE/... DeepSpeed falls back to MPI discovery and fails on a missing
    mpi4py, so a local single-process run sets them itself.
    """
    alone = "RANK" not in os.environ
    if alone:
        os.environ.update(
            RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1"
        )
    import torch

    use_cuda = torch.cuda.is_available()
    if not use_cuda:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    # DeepSpeed JIT-compiles C++ ops into this folder: keep it in the project cache.
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(cache_dir() / "torch_extensions"))
    import deepspeed

    if not use_cuda:
        # Otherwise DeepSpeed JIT-compiles a shared-memory allreduce op at every CPU start
        # (~35 s and 1.5 GB, and a stale build lock hangs the next run); gloo suffices here.
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    if not deepspeed.comm.is_initialized():
        _join_process_group("nccl" if use_cuda else "gloo", alone=alone)
    env = DistEnv(
        rank=int(os.environ["RANK"]),
        world_size=int(os.environ["WORLD_SIZE"]),
        local_rank=int(os.environ.get("LOCAL_RANK", "0")),
        use_cuda=use_cuda,
    )
    if use_cuda:
        torch.cuda.set_device(env.local_rank)
    return env


def _join_process_group(backend: str, *, alone: bool) -> None:
    import deepspeed

    if not alone:
        deepspeed.init_distributed(dist_backend=backend, verbose=False)
        return
    # A world of one rendezvouses through a file: a "free" TCP port picked here could be
    # taken by the time the store binds it (seen with many trainers starting at once).
    init_dir = tempfile.mkdtemp(prefix="kubetune-pg-")
    atexit.register(shutil.rmtree, init_dir, ignore_errors=True)
    init = Path(init_dir) / "store"
    deepspeed.init_distributed(
        dist_backend=backend,
        init_method=f"file://{init}",
        auto_mpi_discovery=False,
        rank=0,
        world_size=1,
        verbose=False,
    )


def precision_of(cfg: TrainerConfig, env: DistEnv) -> str:
    wanted = cfg.hyperparameters.precision
    if wanted != "auto":
        return wanted
    if env.use_cuda:
        import torch

        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "fp32"


def deepspeed_config(cfg: TrainerConfig, env: DistEnv) -> dict[str, Any]:
    """The DeepSpeed config for this run: the user's full config, or one built from the spec."""
    hp = cfg.hyperparameters
    ds = cfg.deepspeed
    precision = precision_of(cfg, env)
    if ds.config is not None:
        conf = dict(ds.config)
    else:
        zero: dict[str, Any] = {"stage": ds.zero_stage}
        if ds.offload == "cpu" and ds.zero_stage > 0:
            zero["offload_optimizer"] = {"device": "cpu"}
            if ds.zero_stage == 3:
                zero["offload_param"] = {"device": "cpu"}
        if ds.zero_stage == 3:
            # Without this a ZeRO-3 checkpoint holds no consolidated weights.
            zero["stage3_gather_16bit_weights_on_model_save"] = True
        conf = {
            "zero_optimization": zero,
            "bf16": {"enabled": precision == "bf16"},
            "fp16": {"enabled": precision == "fp16"},
        }
    # Batch geometry always comes from the spec, so the data position stays meaningful.
    conf["train_micro_batch_size_per_gpu"] = hp.per_device_batch_size
    conf["gradient_accumulation_steps"] = hp.gradient_accumulation_steps
    conf.pop("train_batch_size", None)
    conf.setdefault("gradient_clipping", hp.max_grad_norm)
    # A torch optimizer is passed in: DeepSpeed's fused/cpu Adam would JIT-compile for minutes.
    conf["zero_allow_untested_optimizer"] = True
    conf.setdefault("steps_per_print", 10**9)
    conf.setdefault("wall_clock_breakdown", False)
    return conf


@dataclass
class TrainState:
    """What a checkpoint must carry besides weights and optimizer: where training stood."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    tokens_seen: int = 0  # non-padding input tokens, all ranks
    positions_seen: int = 0  # input positions incl. padding, all ranks
    step_seconds: float = 0.0  # forward/backward/step only: no validation or checkpoints
    best_metric: float | None = None
    evals_without_improvement: int = 0
    resumed_from: int | None = None
    resumed_steps: list[int] = field(default_factory=list)  # where each later attempt began
    history: list[dict[str, Any]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        import numpy as np
        import torch

        py_state = random.getstate()
        np_state: Any = np.random.get_state()
        return {
            "step": self.step,
            "epoch": self.epoch,
            "batchInEpoch": self.batch_in_epoch,
            "tokensSeen": self.tokens_seen,
            "positionsSeen": self.positions_seen,
            "resumedSteps": self.resumed_steps,
            "stepSeconds": self.step_seconds,
            "bestMetric": self.best_metric,
            "evalsWithoutImprovement": self.evals_without_improvement,
            "history": self.history[-200:],
            "rng": {
                "python": [py_state[0], list(py_state[1]), py_state[2]],
                "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
                "torch": torch.get_rng_state().tolist(),
            },
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> TrainState:
        import numpy as np
        import torch

        rng = data["rng"]
        random.setstate((rng["python"][0], tuple(rng["python"][1]), rng["python"][2]))
        np_state = rng["numpy"]
        np.random.set_state((np_state[0], np.array(np_state[1], dtype=np.uint32), *np_state[2:]))
        torch.set_rng_state(torch.tensor(rng["torch"], dtype=torch.uint8))
        return cls(
            step=data["step"],
            epoch=data["epoch"],
            batch_in_epoch=data["batchInEpoch"],
            tokens_seen=data["tokensSeen"],
            positions_seen=data.get("positionsSeen", 0),
            step_seconds=data.get("stepSeconds", 0.0),
            best_metric=data["bestMetric"],
            evals_without_improvement=data["evalsWithoutImprovement"],
            resumed_from=data["step"],
            resumed_steps=[*data.get("resumedSteps", []), data["step"]],
            history=list(data.get("history", [])),
        )


@dataclass
class TrainHooks:
    """Callbacks from the loop to telemetry and the CLI."""

    on_step: Callable[[int, int, float, float, float, int], None] | None = None
    on_eval: Callable[[int, dict[str, float]], None] | None = None
    on_resume: Callable[[int, int], None] | None = None  # (step, resumes so far)
    interrupted: Callable[[], bool] = lambda: False


@dataclass
class TrainResult:
    state: TrainState
    total_steps: int
    stopped_early: bool
    interrupted: bool
    engine: Any


def plan_steps(cfg: TrainerConfig, n_train: int, world_size: int) -> tuple[int, int]:
    """(optimizer steps per epoch, total optimizer steps)."""
    hp = cfg.hyperparameters
    micro_per_epoch = math.ceil(math.ceil(n_train / world_size) / hp.per_device_batch_size)
    per_epoch = max(1, micro_per_epoch // hp.gradient_accumulation_steps)
    total = max(1, math.floor(per_epoch * hp.epochs))
    if hp.max_steps is not None:
        total = min(total, hp.max_steps) if hp.epochs else hp.max_steps
    return per_epoch, total


class _Batches:
    """The micro-batches of one epoch for one rank, optionally skipping the first k."""

    def __init__(self, sampler: Any, feats: list[dict[str, Any]], bs: int, collator: Collator):
        self.sampler, self.feats, self.bs, self.collator = sampler, feats, bs, collator

    def epoch(self, epoch: int, skip: int) -> Iterator[dict[str, Any]]:
        self.sampler.set_epoch(epoch)
        order = list(self.sampler)
        trace = os.environ.get("KUBETUNE_TRACE_DATA")
        if trace:
            # Debug aid (and test hook): which samples this rank reads, to prove sharding.
            path = Path(trace) / f"rank-{self.sampler.rank}-epoch-{epoch}.json"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(order[skip * self.bs :]))
        for start in range(skip * self.bs, len(order) - self.bs + 1, self.bs):
            yield self.collator([self.feats[i] for i in order[start : start + self.bs]])


class _Loop:
    """One call of `train`: the engine, the data order and the state, with one short method per
    concern (resume, step, validate, checkpoint). Setup order is fixed: it consumes the seeded
    RNGs, and a resumed run must see the same initial weights and batches."""

    def __init__(
        self,
        cfg: TrainerConfig,
        model: Any,
        train_feats: list[dict[str, Any]],
        val_feats: list[dict[str, Any]],
        *,
        pad_id: int,
        labels: list[str] | None,
        env: DistEnv,
        checkpoints: CheckpointManager,
        hooks: TrainHooks,
    ) -> None:
        import torch

        self.cfg, self.hp, self.env = cfg, cfg.hyperparameters, env
        self.val_feats, self.labels = val_feats, labels
        self.checkpoints, self.hooks = checkpoints, hooks
        random.seed(self.hp.seed)
        torch.manual_seed(self.hp.seed)
        self.per_epoch, self.total_steps = plan_steps(cfg, len(train_feats), env.world_size)
        self.engine = self._engine(model)
        self.device = self.engine.device
        self.collator = Collator(pad_id, cfg.task)
        self.batches = self._batches(train_feats)
        self.state = TrainState()
        self.eval_every = cfg.evaluation.every_steps or self.per_epoch
        self.early_stopping: EarlyStopping | None = None
        self.stopped_early = self.interrupted = False
        self.last_saved = 0
        self.micro_losses: list[float] = []
        self.step_tokens = 0
        self.step_started = time.monotonic()

    def _engine(self, model: Any) -> Any:
        import deepspeed
        import torch
        from transformers import get_scheduler

        hp, total = self.hp, self.total_steps
        warmup = hp.warmup_steps if hp.warmup_steps is not None else int(total * hp.warmup_ratio)
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=hp.learning_rate, weight_decay=hp.weight_decay)
        scheduler = get_scheduler(
            hp.scheduler, optimizer, num_warmup_steps=warmup, num_training_steps=total
        )
        engine, _, _, _ = deepspeed.initialize(
            model=model,
            optimizer=optimizer,
            lr_scheduler=scheduler,
            config=deepspeed_config(self.cfg, self.env),
        )
        return engine

    def _batches(self, train_feats: list[dict[str, Any]]) -> _Batches:
        from torch.utils.data import DistributedSampler

        sampler: DistributedSampler[int] = DistributedSampler(
            range(len(train_feats)),  # type: ignore[arg-type]
            num_replicas=self.env.world_size,
            rank=self.env.rank,
            shuffle=True,
            seed=self.hp.seed,
            drop_last=True,
        )
        return _Batches(sampler, train_feats, self.hp.per_device_batch_size, self.collator)

    def resume(self) -> None:
        resume = self.cfg.checkpointing.resume
        if resume != "never":
            restored = self.checkpoints.restore(self.engine)
            if restored is not None:
                self.state = TrainState.from_json(restored)
                if self.hooks.on_resume:
                    self.hooks.on_resume(self.state.step, len(self.state.resumed_steps))
            elif resume == "required":
                raise RuntimeError(
                    "checkpointing.resume is 'required' but the store has no checkpoint"
                )
        self.last_saved = self.state.step
        if self.cfg.early_stopping.enabled:
            self.early_stopping = EarlyStopping.from_spec(
                self.cfg.early_stopping,
                best=self.state.best_metric,
                evals_without_improvement=self.state.evals_without_improvement,
            )

    def run(self) -> TrainResult:
        self.resume()
        self.step_started = time.monotonic()
        self.engine.train()
        epoch = self.state.epoch
        while self.state.step < self.total_steps and not self._run_epoch(epoch):
            epoch += 1
            self.state.batch_in_epoch = 0
            self.state.epoch = epoch
        if self.state.step != self.last_saved:
            self._save()
        self.checkpoints.wait()
        if self.stopped_early:
            log.info(
                "early stopping at step %d (%s did not improve)",
                self.state.step,
                self.cfg.early_stopping.metric,
            )
        return TrainResult(
            self.state, self.total_steps, self.stopped_early, self.interrupted, self.engine
        )

    def _run_epoch(self, epoch: int) -> bool:
        """Train through one epoch (the rest of it, when resumed); True when training is done."""
        state = self.state
        skip = state.batch_in_epoch * self.hp.gradient_accumulation_steps
        for batch in self.batches.epoch(epoch, skip if epoch == state.epoch else 0):
            if not self._micro_step(batch):
                continue
            self._end_step(epoch)
            if self.stopped_early or self.interrupted or state.step >= self.total_steps:
                return True
        return False

    def _micro_step(self, batch: dict[str, Any]) -> bool:
        """Forward and backward on one micro-batch; True when it completed an optimizer step."""
        engine, world = self.engine, self.env.world_size
        batch = {k: v.to(self.device) for k, v in batch.items()}
        boundary = bool(engine.is_gradient_accumulation_boundary())
        loss = engine(**batch).loss
        engine.backward(loss)
        engine.step()
        self.micro_losses.append(float(loss.detach()))
        self.step_tokens += int(batch["attention_mask"].sum()) * world
        self.state.positions_seen += batch["input_ids"].numel() * world
        return boundary

    def _end_step(self, epoch: int) -> None:
        state = self.state
        state.step += 1
        state.batch_in_epoch += 1
        state.epoch = epoch
        self._record_step(epoch)
        if self.val_feats and (state.step % self.eval_every == 0 or state.step == self.total_steps):
            self._after_validation(self._validate())
        if state.step % self.cfg.checkpointing.every_steps == 0:
            self._save()
        self.step_started = time.monotonic()  # step time excludes validation and checkpoints
        if self.hooks.interrupted():
            self.interrupted = True

    def _record_step(self, epoch: int) -> None:
        state = self.state
        elapsed = time.monotonic() - self.step_started
        step_loss = sum(self.micro_losses) / len(self.micro_losses)
        state.tokens_seen += self.step_tokens
        state.step_seconds += elapsed
        if self.hooks.on_step:
            frac_epoch = epoch + state.batch_in_epoch / self.per_epoch
            self.hooks.on_step(
                state.step, self.total_steps, frac_epoch, step_loss, elapsed, self.step_tokens
            )
        state.history.append({"step": state.step, "loss": round(step_loss, 5)})
        self.micro_losses, self.step_tokens = [], 0

    def _validate(self) -> dict[str, float]:
        engine, cfg = self.engine, self.cfg
        engine.eval()
        loss, preds = loss_and_predictions(
            lambda b: engine(**b),
            self.val_feats,
            self.collator,
            batch_size=self.hp.per_device_batch_size,
            task=cfg.task,
            device=self.device,
        )
        engine.train()
        metrics = {"loss": loss}
        if cfg.task == "causal-lm":
            metrics["perplexity"] = perplexity(loss)
        elif self.labels is not None:
            gold = [int(f["label"]) for f in self.val_feats]
            cls = classification_metrics(preds, gold, self.labels)
            metrics["accuracy"], metrics["f1"] = cls["accuracy"], cls["f1_macro"]
        return metrics

    def _after_validation(self, metrics: dict[str, float]) -> None:
        state = self.state
        if self.hooks.on_eval:
            self.hooks.on_eval(state.step, metrics)
        state.history.append({"step": state.step, "validation": metrics})
        es = self.early_stopping
        if es is not None:
            self.stopped_early = es.observe(metrics)
            state.best_metric, state.evals_without_improvement = (
                es.best,
                es.evals_without_improvement,
            )

    def _save(self) -> None:
        self.checkpoints.save(self.engine, self.state.step, self.state.to_json())
        self.last_saved = self.state.step


def train(
    cfg: TrainerConfig,
    model: Any,
    train_feats: list[dict[str, Any]],
    val_feats: list[dict[str, Any]],
    *,
    pad_id: int,
    labels: list[str] | None,
    env: DistEnv,
    checkpoints: CheckpointManager,
    hooks: TrainHooks,
) -> TrainResult:
    """Train to the planned step count, early stop or SIGTERM; always ends on a checkpoint."""
    loop = _Loop(
        cfg,
        model,
        train_feats,
        val_feats,
        pad_id=pad_id,
        labels=labels,
        env=env,
        checkpoints=checkpoints,
        hooks=hooks,
    )
    return loop.run()


def gathered(engine: Any) -> contextlib.AbstractContextManager[Any]:
    """Full parameters on every rank for the duration (ZeRO-3 partitions them)."""
    if engine.zero_optimization_stage() == 3:
        import deepspeed

        ctx: contextlib.AbstractContextManager[Any] = deepspeed.zero.GatheredParameters(
            list(engine.module.parameters()), modifier_rank=None
        )
        return ctx
    return contextlib.nullcontext()


def save_model(engine: Any, tok: Any, out: Path, *, merge: bool, env: DistEnv) -> None:
    """Write the final model (merged or adapter) and tokenizer to `out` on rank 0."""
    import torch

    module = engine.module
    with gathered(engine):
        if env.is_main:
            out.mkdir(parents=True, exist_ok=True)
            if hasattr(module, "merge_and_unload") and merge:
                module = module.merge_and_unload()
            module.to(torch.float32).save_pretrained(str(out), safe_serialization=True)
            tok.save_pretrained(str(out))
