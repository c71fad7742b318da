"""One trainer run, phase by phase: prepare data, tokenize, evaluate the base model, train,
save, evaluate the tuned model, check gates, report. Pods (`python -m kubetune_trainer train`)
and `kubetune run` both call `run()`.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import signal
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import Any

from kubetune_trainer import __version__
from kubetune_trainer.config import TrainerConfig, check_gates
from kubetune_trainer.data import PreparedData, prepare_data
from kubetune_trainer.errors import TrainingInterrupted
from kubetune_trainer.evaluate.evaluator import evaluate
from kubetune_trainer.evaluate.metrics import compare
from kubetune_trainer.evaluate.modelcard import ModelCard, write_model_card
from kubetune_trainer.models.loading import (
    check_method,
    load_model,
    model_context_length,
    resolve_source,
)
from kubetune_trainer.store import Store, StoreNotFound, open_store, ride_out_outage
from kubetune_trainer.telemetry.progress import ProgressReporter
from kubetune_trainer.telemetry.prometheus import TrainerMetrics
from kubetune_trainer.telemetry.termination import write_success
from kubetune_trainer.tokenization import (
    TokenizeReport,
    causal_features,
    classification_features,
    effective_max_length,
    load_tokenizer,
)
from kubetune_trainer.train.checkpoint import CheckpointManager
from kubetune_trainer.train.engine import (
    DistEnv,
    TrainHooks,
    init_distributed,
    precision_of,
    save_model,
    train,
)

log = logging.getLogger(__name__)

EVAL_FILE = "eval.json"
BASE_EVAL_FILE = "eval-base.json"

StepCallback = Callable[[int, int, float, float, float], None]


@dataclass
class RunResult:
    """What a finished run produced, for the CLI summary."""

    eval: dict[str, Any]
    model_uri: str
    timings: dict[str, float]
    steps: int
    total_steps: int
    resumed_from: int | None
    gates_passed: bool


@dataclass
class _Signals:
    """SIGTERM outside the training loop ends the run at once; inside, after a checkpoint."""

    in_training: bool = False
    requested: bool = False
    previous: Any = None

    def handler(self, signum: int, frame: FrameType | None) -> None:
        self.requested = True
        if not self.in_training:
            raise TrainingInterrupted(f"received signal {signum} before training started")


@dataclass
class _Features:
    train: list[dict[str, Any]]
    validation: list[dict[str, Any]]
    test: list[dict[str, Any]]
    report: TokenizeReport = field(default_factory=TokenizeReport)


def _tokenize(cfg: TrainerConfig, tok: Any, data: PreparedData, max_len: int) -> _Features:
    report = TokenizeReport(max_length=max_len)
    splits: dict[str, list[dict[str, Any]]] = {}
    for name, rows in (("train", data.train), ("validation", data.validation), ("test", data.test)):
        if cfg.task == "causal-lm":
            splits[name] = causal_features(
                rows,
                cfg.data.format,
                tok,
                max_len=max_len,
                overlong=cfg.data.overlong,
                stride=cfg.data.chunk_stride,
                # Packing is a training-throughput trick; evaluation stays per sample.
                packing=cfg.data.packing and name == "train",
                report=report,
                split=name,
            )
        else:
            splits[name] = classification_features(
                rows, tok, max_len=max_len, overlong=cfg.data.overlong, report=report, split=name
            )
    return _Features(splits["train"], splits["validation"], splits["test"], report)


def _barrier(env: DistEnv) -> None:
    if env.world_size > 1:
        import deepspeed

        deepspeed.comm.barrier()


def _eval_split(data: PreparedData, feats: _Features) -> tuple[str, list[dict[str, Any]], Any]:
    if feats.test:
        return "test", data.test, feats.test
    if feats.validation:
        log.warning("no test split: the final evaluation uses the validation split")
        return "validation", data.validation, feats.validation
    log.warning("no test or validation split: the final evaluation uses the training data")
    return "train", data.train, feats.train


def run(
    cfg: TrainerConfig,
    *,
    base_dir: Path | None = None,
    on_step: StepCallback | None = None,
    on_phase: Callable[[str], None] | None = None,
) -> RunResult:
    """Run one job to the end. Raises on failure; the caller classifies the exception."""
    _quiet_libraries()
    env = init_distributed()
    check_method(cfg, env.use_cuda)
    store = open_store(cfg.output.uri, endpoint=cfg.output.s3_endpoint, region=cfg.output.s3_region)
    metrics = TrainerMetrics.for_job(cfg.job)
    if env.is_main and cfg.telemetry.metrics_port:
        host, port = cfg.telemetry.metrics_host, cfg.telemetry.metrics_port
        try:
            metrics.serve(host, port)
        except OSError as err:
            # /metrics is for watching, not for training: a port taken by another process on a
            # shared network (hostNetwork pods) must not fail, and gang-restart, the whole job.
            log.warning(
                "no /metrics: cannot listen on %s:%d (%s); training goes on", host, port, err
            )
    reporter = (
        ProgressReporter(store, cfg.telemetry.progress_interval_seconds) if env.is_main else None
    )
    signals = _Signals()
    signals.previous = signal.signal(signal.SIGTERM, signals.handler)
    timings: dict[str, float] = {}
    workdir = Path(tempfile.mkdtemp(prefix=f"kubetune-{cfg.job.name}-"))

    @contextlib.contextmanager
    def phase(name: str, progress_phase: Any = None) -> Iterator[None]:
        if on_phase and env.is_main:
            on_phase(name)
        if reporter and progress_phase:
            reporter.update(phase=progress_phase)
        started = time.monotonic()
        try:
            yield
        finally:
            timings[name] = round(time.monotonic() - started, 2)

    try:
        return _run(
            cfg, env, store, metrics, reporter, signals, phase, timings, workdir, base_dir, on_step
        )
    finally:
        signal.signal(signal.SIGTERM, signals.previous)
        if reporter:
            reporter.close()
        metrics.shutdown()
        shutil.rmtree(workdir, ignore_errors=True)


def _run(
    cfg: TrainerConfig,
    env: DistEnv,
    store: Store,
    metrics: TrainerMetrics,
    reporter: ProgressReporter | None,
    signals: _Signals,
    phase: Callable[..., contextlib.AbstractContextManager[None]],
    timings: dict[str, float],
    workdir: Path,
    base_dir: Path | None,
    on_step: StepCallback | None,
) -> RunResult:
    hp = cfg.hyperparameters
    with phase("prepare data", "preparing"):
        data = prepare_data(
            cfg.data, cfg.task, seed=hp.seed, endpoint=cfg.output.s3_endpoint, base_dir=base_dir
        )
    with phase("tokenize", "preparing"):
        model_dir = resolve_source(
            cfg.model.source, revision=cfg.model.revision, endpoint=cfg.output.s3_endpoint
        )
        tok_dir = (
            resolve_source(cfg.model.tokenizer, endpoint=cfg.output.s3_endpoint)
            if cfg.model.tokenizer
            else None
        )
        tok = load_tokenizer(model_dir, cfg.model, tok_dir)
        max_len = effective_max_length(cfg.model.max_seq_length, model_context_length(model_dir))
        feats = _tokenize(cfg, tok, data, max_len)
    if not feats.train:
        from kubetune_trainer.data import InvalidDataError

        raise InvalidDataError(
            "no training samples left after tokenization "
            f"({feats.report.dropped_overlong} dropped as overlong, "
            f"{feats.report.dropped_no_target} with no target tokens)",
            source=cfg.data.train,
        )
    need = hp.per_device_batch_size * env.world_size
    if len(feats.train) < need:
        # Each rank drops its last partial batch: with fewer samples than one full batch per
        # rank, an epoch has no steps at all, and training would loop over empty epochs forever.
        from kubetune_trainer.data import InvalidDataError

        raise InvalidDataError(
            f"too few training rows: {len(feats.train)} training samples left after cleaning "
            f"and tokenization ({data.report.dropped_duplicates} duplicate and "
            f"{data.report.dropped_empty} empty rows dropped), but one batch takes {need} "
            f"(hyperparameters.perDeviceBatchSize {hp.per_device_batch_size} x "
            f"{env.world_size} ranks); expected at least {need} distinct rows",
            source=cfg.data.train,
        )
    split_name, eval_rows, eval_feats = _eval_split(data, feats)
    metric_names = cfg.effective_metrics()
    eval_kwargs: dict[str, Any] = {
        "task": cfg.task,
        "fmt": cfg.data.format,
        "feats": eval_feats,
        "rows": eval_rows,
        "labels": data.labels,
        "metrics": metric_names,
        "batch_size": hp.per_device_batch_size,
        "bleu_samples": cfg.evaluation.bleu_samples,
        "max_new_tokens": cfg.evaluation.max_new_tokens,
    }

    base_eval: dict[str, Any] | None = None
    if cfg.evaluation.compare_base and env.is_main:
        with phase("evaluate base", "evaluating-base"):
            base_eval = _base_eval(cfg, store, data, model_dir, tok, env, eval_kwargs)
    _barrier(env)

    def step_hook(step: int, total: int, epoch: float, loss: float, secs: float, toks: int) -> None:
        metrics.observe_step(step, total, epoch, loss, secs, toks)
        if reporter:
            reporter.update(
                step=step,
                total_steps=total,
                epoch=epoch,
                loss=loss,
                tokens_per_second=toks / secs if secs > 0 else None,
            )
        if on_step and env.is_main:
            on_step(step, total, epoch, loss, toks / secs if secs > 0 else 0.0)

    def resume_hook(step: int, resumes: int) -> None:
        if reporter:
            reporter.update(step=step, restarts_seen=resumes)

    def eval_hook(step: int, values: dict[str, float]) -> None:
        metrics.observe_eval("validation", values)

    def saved_hook(step: int, seconds: float, size: int, uri: str) -> None:
        metrics.observe_checkpoint(step, seconds, size)
        if reporter:
            reporter.checkpoint_saved(step, uri)

    checkpoints = CheckpointManager(
        store,
        workdir / "checkpoints",
        rank=env.rank,
        world_size=env.world_size,
        keep_last=cfg.checkpointing.keep_last,
        on_saved=saved_hook,
        quantized=cfg.method == "qlora",
    )
    with phase("train", "training"):
        model = load_model(
            cfg, model_dir, labels=data.labels, vocab_size=len(tok), use_cuda=env.use_cuda
        )
        signals.in_training = True
        try:
            result = train(
                cfg,
                model,
                feats.train,
                feats.validation,
                pad_id=tok.pad_token_id,
                labels=data.labels,
                env=env,
                checkpoints=checkpoints,
                hooks=TrainHooks(
                    on_step=step_hook,
                    on_eval=eval_hook,
                    on_resume=resume_hook,
                    interrupted=lambda: signals.requested,
                ),
            )
        finally:
            signals.in_training = False
            checkpoints.close()
    if result.interrupted:
        raise TrainingInterrupted(
            f"stopped by SIGTERM at step {result.state.step}; checkpoint saved"
        )

    local = store.local_path()
    model_dir_out = (local / "model") if local is not None else workdir / "model"
    model_uri = f"{store.uri}/model"
    with phase("save model", "saving"):
        if env.is_main and model_dir_out.exists():
            shutil.rmtree(model_dir_out)
        save_model(result.engine, tok, model_dir_out, merge=cfg.lora.merge, env=env)
    del result.engine
    _barrier(env)
    if not env.is_main:
        return RunResult(
            {},
            model_uri,
            timings,
            result.state.step,
            result.total_steps,
            result.state.resumed_from,
            True,
        )

    with phase("evaluate tuned", "evaluating"):
        tuned_model = _load_saved(cfg, model_dir_out, model_dir, data.labels)
        tuned_eval = evaluate(tuned_model, tok, **eval_kwargs)
        del tuned_model
    metrics.observe_eval(split_name, tuned_eval)
    gates = check_gates(cfg.evaluation, cfg.task, tuned_eval, base_eval)
    gates_passed = all(g["passed"] for g in gates)
    headline = {
        k: v
        for k, v in tuned_eval.items()
        if isinstance(v, int | float) and k not in ("samples", "bleu_samples")
    }
    report = {
        "task": cfg.task,
        "split": split_name,
        "base": base_eval,
        "tuned": tuned_eval,
        "comparison": compare(_numbers(base_eval), _numbers(headline)) if base_eval else None,
        "gates": gates,
        "gatesPassed": gates_passed,
        "data": data.report.to_dict(),
        "tokenization": feats.report.to_dict(),
        "training": {
            "steps": result.state.step,
            "totalSteps": result.total_steps,
            "stoppedEarly": result.stopped_early,
            "resumedFrom": result.state.resumed_from,
            "resumes": len(result.state.resumed_steps),
            "resumedSteps": result.state.resumed_steps,
            "tokensSeen": result.state.tokens_seen,
            "positionsSeen": result.state.positions_seen,
            "stepSeconds": round(result.state.step_seconds, 3),
            "history": result.state.history,
            "precision": precision_of(cfg, env),
            "worldSize": env.world_size,
        },
        "timings": timings,
        "model": model_uri,
    }
    card = ModelCard(
        task=cfg.task,
        base_model=cfg.model.source,
        method=cfg.method,
        adapter=cfg.method != "full" and not cfg.lora.merge,
        base_model_path=str(model_dir) if cfg.method != "full" and not cfg.lora.merge else None,
        labels=data.labels or [],
        max_seq_length=max_len,
        data_fingerprint=data.report.fingerprint,
        hyperparameters=hp.wire(),
        metrics={"split": split_name, **headline},
        seed=hp.seed,
        created_at=datetime.now(UTC).isoformat(timespec="seconds"),
        kubetune_version=__version__,
    )
    write_model_card(model_dir_out, card)
    with phase("upload", "saving"):
        if local is None:
            ride_out_outage(lambda: store.upload_dir(model_dir_out, "model"), "model upload")
        ride_out_outage(lambda: store.write_json(EVAL_FILE, report), "eval.json upload")
    if reporter:
        reporter.update(phase="done", message="gates passed" if gates_passed else "gates failed")
    write_success(cfg.telemetry.termination_log, {**headline, "gatesPassed": int(gates_passed)})
    return RunResult(
        report,
        model_uri,
        timings,
        result.state.step,
        result.total_steps,
        result.state.resumed_from,
        gates_passed,
    )


def _quiet_libraries() -> None:
    """Load reports and per-file progress bars drown the run's own progress; keep warnings,
    except a deprecation that DeepSpeed's own call into transformers raises on every run."""
    import warnings

    from transformers.utils import logging as hf_logging

    warnings.filterwarnings(
        "ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning
    )

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def _numbers(d: dict[str, Any] | None) -> dict[str, float]:
    return {k: float(v) for k, v in (d or {}).items() if isinstance(v, int | float)}


def _base_eval(
    cfg: TrainerConfig,
    store: Store,
    data: PreparedData,
    model_dir: Path,
    tok: Any,
    env: DistEnv,
    eval_kwargs: dict[str, Any],
) -> dict[str, Any]:
    """The base model's metrics, cached in the store so a restarted run does not redo them."""
    key = f"{cfg.model.source}|{data.report.fingerprint}|{cfg.model.max_seq_length}"
    try:
        cached = store.read_json(BASE_EVAL_FILE)
        if cached.get("key") == key:
            result: dict[str, Any] = cached["metrics"]
            return result
    except (StoreNotFound, AttributeError, KeyError):
        pass
    base_cfg = cfg.model_copy(update={"method": "full"})
    model = load_model(base_cfg, model_dir, labels=data.labels, vocab_size=len(tok), use_cuda=False)
    values = evaluate(model, tok, **eval_kwargs)
    store.write_json(BASE_EVAL_FILE, {"key": key, "metrics": values})
    return values


def _load_saved(cfg: TrainerConfig, saved: Path, base_dir: Path, labels: list[str] | None) -> Any:
    """The model exactly as written to model/, as a server would load it."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    auto = AutoModelForCausalLM if cfg.task == "causal-lm" else AutoModelForSequenceClassification
    if (saved / "adapter_config.json").exists():
        from peft import PeftModel

        kwargs: dict[str, Any] = {"dtype": torch.float32}
        if labels:
            kwargs["num_labels"] = len(labels)
        base = auto.from_pretrained(str(base_dir), **kwargs)
        return PeftModel.from_pretrained(base, str(saved))
    return auto.from_pretrained(str(saved), dtype=torch.float32)
