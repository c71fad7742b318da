"""One trainer run as one object: setup, prepare data, tokenize, evaluate the base model, train,
save, evaluate the tuned model, decide the gates, publish, clean up. Pods
(`python -m kubetune_trainer train`) and `kubetune run` both call `run()`.
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
from kubetune_trainer.config import GateVerdict, TrainerConfig
from kubetune_trainer.data import InvalidDataError, PreparedData, prepare_data
from kubetune_trainer.errors import TrainingInterrupted
from kubetune_trainer.evaluate.evaluator import evaluate as evaluate_model
from kubetune_trainer.evaluate.gates import check_gates, gate_records, gates_passed
from kubetune_trainer.evaluate.metrics import compare
from kubetune_trainer.evaluate.modelcard import ModelCard, write_model_card
from kubetune_trainer.models.loading import (
    check_method,
    load_model,
    model_context_length,
    resolve_source,
)
from kubetune_trainer.store import Store, StoreNotFound, open_store, ride_out_outage
from kubetune_trainer.telemetry.progress import Phase, ProgressReporter
from kubetune_trainer.telemetry.prometheus import TrainerMetrics
from kubetune_trainer.telemetry.termination import final_report, write_success
from kubetune_trainer.tokenization import (
    TokenizeReport,
    causal_features,
    classification_features,
    effective_max_length,
    load_tokenizer,
)
from kubetune_trainer.train.checkpoint import CheckpointManager, attempt_from_env, grace_from_env
from kubetune_trainer.train.engine import (
    DistEnv,
    TrainHooks,
    TrainResult,
    init_distributed,
    precision_of,
    save_model,
)
from kubetune_trainer.train.engine import train as train_model

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


def run(
    cfg: TrainerConfig,
    *,
    base_dir: Path | None = None,
    on_step: StepCallback | None = None,
    on_phase: Callable[[str], None] | None = None,
) -> RunResult:
    """Run one job to the end. Raises on failure; the caller classifies the exception."""
    job = FineTuneRun(cfg, base_dir=base_dir, on_step=on_step, on_phase=on_phase)
    job.setup()
    try:
        return job.execute()
    finally:
        job.cleanup()


class FineTuneRun:
    """One run's state, filled in phase by phase; every rank runs every phase up to `save`,
    then rank 0 alone evaluates the tuned model and publishes the results."""

    # Set by setup() and the phases, in order; each phase reads what the earlier ones set.
    env: DistEnv
    store: Store
    metrics: TrainerMetrics
    reporter: ProgressReporter | None
    workdir: Path
    data: PreparedData
    model_dir: Path
    tok: Any
    max_len: int
    feats: _Features
    split_name: str
    eval_kwargs: dict[str, Any]
    trained: TrainResult
    model_out: Path
    tuned_eval: dict[str, Any]
    gates: list[GateVerdict]

    def __init__(
        self,
        cfg: TrainerConfig,
        *,
        base_dir: Path | None = None,
        on_step: StepCallback | None = None,
        on_phase: Callable[[str], None] | None = None,
    ) -> None:
        self.cfg = cfg
        self.base_dir = base_dir
        self.on_step = on_step
        self.on_phase = on_phase
        self.signals = _Signals()
        self.timings: dict[str, float] = {}
        self.base_eval: dict[str, Any] | None = None
        self.eval_report: dict[str, Any] = {}  # stays empty on ranks other than 0
        self.gates_passed = True
        self.checkpoints: CheckpointManager | None = None

    # -- lifecycle --------------------------------------------------------------------------

    def setup(self) -> None:
        """Join the job, open the store and telemetry; `cleanup` undoes it."""
        cfg = self.cfg
        _quiet_libraries()
        self.env = init_distributed()
        # Before any work: a method this machine cannot run must not cost a base evaluation.
        check_method(cfg, self.env.use_cuda)
        out = cfg.output
        self.store = open_store(out.uri, endpoint=out.s3_endpoint, region=out.s3_region)
        self.metrics = TrainerMetrics.for_job(cfg.job)
        self._serve_metrics()
        interval = cfg.telemetry.progress_interval_seconds
        self.reporter = ProgressReporter(self.store, interval) if self.env.is_main else None
        self.signals.previous = signal.signal(signal.SIGTERM, self.signals.handler)
        self.workdir = Path(tempfile.mkdtemp(prefix=f"kubetune-{cfg.job.name}-"))

    def execute(self) -> RunResult:
        self._setup_data()
        self._setup_tokenizer()
        self._check_enough_data()
        self._setup_evaluation()
        self._evaluate_base()
        self.train()
        self.save()
        if self.env.is_main:
            self.evaluate()
            self.publish()
        return self.result()

    def cleanup(self) -> None:
        signal.signal(signal.SIGTERM, self.signals.previous)
        if self.reporter:
            self.reporter.close()
        self.metrics.shutdown()
        shutil.rmtree(self.workdir, ignore_errors=True)

    def result(self) -> RunResult:
        state = self.trained.state
        return RunResult(
            eval=self.eval_report,
            model_uri=self.model_uri,
            timings=self.timings,
            steps=state.step,
            total_steps=self.trained.total_steps,
            resumed_from=state.resumed_from,
            gates_passed=self.gates_passed,
        )

    @property
    def model_uri(self) -> str:
        return f"{self.store.uri}/model"

    @contextlib.contextmanager
    def _phase(self, name: str, progress_phase: Phase) -> Iterator[None]:
        if self.on_phase and self.env.is_main:
            self.on_phase(name)
        if self.reporter:
            self.reporter.update(phase=progress_phase)
        started = time.monotonic()
        try:
            yield
        finally:
            self.timings[name] = round(time.monotonic() - started, 2)

    def _serve_metrics(self) -> None:
        host, port = self.cfg.telemetry.metrics_host, self.cfg.telemetry.metrics_port
        if not (self.env.is_main and port):
            return
        try:
            self.metrics.serve(host, port)
        except OSError as err:
            # /metrics is for watching, not for training: a port taken by another process on a
            # shared network (hostNetwork pods) must not fail, and gang-restart, the whole job.
            log.warning(
                "no /metrics: cannot listen on %s:%d (%s); training goes on", host, port, err
            )

    # -- inputs -----------------------------------------------------------------------------

    def _setup_data(self) -> None:
        cfg = self.cfg
        with self._phase("prepare data", "preparing"):
            self.data = prepare_data(
                cfg.data,
                cfg.task,
                seed=cfg.hyperparameters.seed,
                endpoint=cfg.output.s3_endpoint,
                base_dir=self.base_dir,
            )

    def _setup_tokenizer(self) -> None:
        model, endpoint = self.cfg.model, self.cfg.output.s3_endpoint
        with self._phase("tokenize", "preparing"):
            self.model_dir = resolve_source(
                model.source, revision=model.revision, endpoint=endpoint
            )
            tok_dir = (
                resolve_source(model.tokenizer, endpoint=endpoint) if model.tokenizer else None
            )
            self.tok = load_tokenizer(self.model_dir, model, tok_dir)
            context = model_context_length(self.model_dir)
            self.max_len = effective_max_length(model.max_seq_length, context)
            self.feats = _tokenize(self.cfg, self.tok, self.data, self.max_len)

    def _check_enough_data(self) -> None:
        feats, report, hp = self.feats, self.data.report, self.cfg.hyperparameters
        if not feats.train:
            raise InvalidDataError(
                "no training samples left after tokenization "
                f"({feats.report.dropped_overlong} dropped as overlong, "
                f"{feats.report.dropped_no_target} with no target tokens)",
                source=self.cfg.data.train,
            )
        need = hp.per_device_batch_size * self.env.world_size
        if len(feats.train) < need:
            # Each rank drops its last partial batch: with fewer samples than one full batch per
            # rank, an epoch has no steps at all, and training would loop over empty epochs
            # forever.
            raise InvalidDataError(
                f"too few training rows: {len(feats.train)} training samples left after cleaning "
                f"and tokenization ({report.dropped_duplicates} duplicate and "
                f"{report.dropped_empty} empty rows dropped), but one batch takes {need} "
                f"(hyperparameters.perDeviceBatchSize {hp.per_device_batch_size} x "
                f"{self.env.world_size} ranks); expected at least {need} distinct rows",
                source=self.cfg.data.train,
            )

    def _setup_evaluation(self) -> None:
        """What the base and the tuned model are both evaluated on, so they compare."""
        cfg = self.cfg
        self.split_name, rows, feats = _eval_split(self.data, self.feats)
        self.eval_kwargs = {
            "task": cfg.task,
            "fmt": cfg.data.format,
            "feats": feats,
            "rows": rows,
            "labels": self.data.labels,
            "metrics": cfg.effective_metrics(),
            "batch_size": cfg.hyperparameters.per_device_batch_size,
            "bleu_samples": cfg.evaluation.bleu_samples,
            "max_new_tokens": cfg.evaluation.max_new_tokens,
        }

    def _evaluate_base(self) -> None:
        if self.cfg.evaluation.compare_base and self.env.is_main:
            with self._phase("evaluate base", "evaluating-base"):
                self.base_eval = self._base_metrics()
        _barrier(self.env)

    def _base_metrics(self) -> dict[str, Any]:
        """The base model's metrics, cached in the store so a restarted run does not redo them."""
        cfg, data = self.cfg, self.data
        key = f"{cfg.model.source}|{data.report.fingerprint}|{cfg.model.max_seq_length}"
        try:
            cached = self.store.read_json(BASE_EVAL_FILE)
            if cached.get("key") == key:
                result: dict[str, Any] = cached["metrics"]
                return result
        except (StoreNotFound, AttributeError, KeyError):
            pass
        base_cfg = cfg.model_copy(update={"method": "full"})
        model = load_model(
            base_cfg, self.model_dir, labels=data.labels, vocab_size=len(self.tok), use_cuda=False
        )
        values = evaluate_model(model, self.tok, **self.eval_kwargs)
        self.store.write_json(BASE_EVAL_FILE, {"key": key, "metrics": values})
        return values

    # -- training ---------------------------------------------------------------------------

    def train(self) -> None:
        cfg, env, feats = self.cfg, self.env, self.feats
        checkpoints = self.checkpoints = CheckpointManager(
            self.store,
            self.workdir / "checkpoints",
            rank=env.rank,
            world_size=env.world_size,
            keep_last=cfg.checkpointing.keep_last,
            on_saved=self._on_saved,
            quantized=cfg.method == "qlora",
            # Set by the operator on rank pods (absent locally): fencing and the grace check.
            attempt=attempt_from_env(),
            grace_seconds=grace_from_env(),
        )
        with self._phase("train", "training"):
            model = load_model(
                cfg,
                self.model_dir,
                labels=self.data.labels,
                vocab_size=len(self.tok),
                use_cuda=env.use_cuda,
            )
            self.signals.in_training = True
            try:
                self.trained = train_model(
                    cfg,
                    model,
                    feats.train,
                    feats.validation,
                    pad_id=self.tok.pad_token_id,
                    labels=self.data.labels,
                    env=env,
                    checkpoints=checkpoints,
                    hooks=self._hooks(),
                )
            finally:
                self.signals.in_training = False
                checkpoints.close()
        if self.trained.interrupted:
            step = self.trained.state.step
            raise TrainingInterrupted(f"stopped by SIGTERM at step {step}; checkpoint saved")

    def _hooks(self) -> TrainHooks:
        return TrainHooks(
            on_step=self._on_step,
            on_eval=self._on_eval,
            on_resume=self._on_resume,
            interrupted=lambda: self.signals.requested,
        )

    def _on_step(
        self, step: int, total: int, epoch: float, loss: float, secs: float, toks: int
    ) -> None:
        self.metrics.observe_step(step, total, epoch, loss, secs, toks)
        rate = toks / secs if secs > 0 else None
        if self.reporter:
            self.reporter.update(
                step=step, total_steps=total, epoch=epoch, loss=loss, tokens_per_second=rate
            )
        if self.on_step and self.env.is_main:
            self.on_step(step, total, epoch, loss, rate or 0.0)

    def _on_resume(self, step: int, resumes: int) -> None:
        if self.reporter:
            self.reporter.update(step=step, restarts_seen=resumes)

    def _on_eval(self, step: int, values: dict[str, float]) -> None:
        self.metrics.observe_eval("validation", values)

    def _on_saved(self, step: int, seconds: float, size: int, uri: str) -> None:
        self.metrics.observe_checkpoint(step, seconds, size)
        if self.reporter:
            self.reporter.checkpoint_saved(step, uri)

    def save(self) -> None:
        """Every rank takes part (ZeRO-3 gathers the weights); rank 0 writes model/."""
        local = self.store.local_path()
        self.model_out = (local / "model") if local is not None else self.workdir / "model"
        with self._phase("save model", "saving"):
            if self.env.is_main and self.model_out.exists():
                shutil.rmtree(self.model_out)
            merge = self.cfg.lora.merge
            save_model(self.trained.engine, self.tok, self.model_out, merge=merge, env=self.env)
        del self.trained.engine  # frees the optimizer state before the tuned evaluation
        _barrier(self.env)

    # -- results (rank 0) -------------------------------------------------------------------

    def evaluate(self) -> None:
        """The tuned model as saved (as a server loads it), then the gates, decided once."""
        cfg = self.cfg
        with self._phase("evaluate tuned", "evaluating"):
            tuned_model = _load_saved(cfg, self.model_out, self.model_dir, self.data.labels)
            self.tuned_eval = evaluate_model(tuned_model, self.tok, **self.eval_kwargs)
            del tuned_model
        self.metrics.observe_eval(self.split_name, self.tuned_eval)
        self.gates = check_gates(cfg.evaluation, cfg.task, self.tuned_eval, self.base_eval)
        self.gates_passed = gates_passed(self.gates)

    def publish(self) -> None:
        """eval.json, the model card and the model in the store; then the termination message."""
        store, model_out = self.store, self.model_out
        if self.checkpoints is not None:
            # A gang of a newer attempt may have started while this one finished training (a
            # partition): then it owns the run's results, and this one publishes nothing.
            self.checkpoints.check_fence("publishing model/ and eval.json")
        report = self.eval_report = self._report()
        write_model_card(model_out, self._model_card())
        with self._phase("upload", "saving"):
            if store.local_path() is None:
                ride_out_outage(lambda: store.upload_dir(model_out, "model"), "model upload")
            ride_out_outage(lambda: store.write_json(EVAL_FILE, report), "eval.json upload")
        if self.reporter:
            message = "gates passed" if self.gates_passed else "gates failed"
            self.reporter.update(phase="done", message=message)
        state = self.trained.state
        final = final_report(
            self._headline(), self.gates, steps=state.step, total_steps=self.trained.total_steps
        )
        write_success(self.cfg.telemetry.termination_log, final)

    def _headline(self) -> dict[str, Any]:
        """The tuned model's top-level metrics (no sample counts, per-class tables or texts)."""
        return {
            k: v
            for k, v in self.tuned_eval.items()
            if isinstance(v, int | float) and k not in ("samples", "bleu_samples")
        }

    def _report(self) -> dict[str, Any]:
        base, headline = self.base_eval, self._headline()
        return {
            "task": self.cfg.task,
            "split": self.split_name,
            "base": base,
            "tuned": self.tuned_eval,
            "comparison": compare(_numbers(base), _numbers(headline)) if base else None,
            "gates": gate_records(self.gates),
            "gatesPassed": self.gates_passed,
            "data": self.data.report.to_dict(),
            "tokenization": self.feats.report.to_dict(),
            "training": self._training_summary(),
            "timings": self.timings,
            "model": self.model_uri,
        }

    def _training_summary(self) -> dict[str, Any]:
        trained, state = self.trained, self.trained.state
        return {
            "steps": state.step,
            "totalSteps": trained.total_steps,
            "stoppedEarly": trained.stopped_early,
            "resumedFrom": state.resumed_from,
            "resumes": len(state.resumed_steps),
            "resumedSteps": state.resumed_steps,
            "tokensSeen": state.tokens_seen,
            "positionsSeen": state.positions_seen,
            "stepSeconds": round(state.step_seconds, 3),
            "history": state.history,
            "precision": precision_of(self.cfg, self.env),
            "worldSize": self.env.world_size,
        }

    def _model_card(self) -> ModelCard:
        cfg, data = self.cfg, self.data
        adapter = cfg.method != "full" and not cfg.lora.merge
        return ModelCard(
            task=cfg.task,
            base_model=cfg.model.source,
            method=cfg.method,
            adapter=adapter,
            base_model_path=str(self.model_dir) if adapter else None,
            labels=data.labels or [],
            max_seq_length=self.max_len,
            data_fingerprint=data.report.fingerprint,
            hyperparameters=cfg.hyperparameters.wire(),
            metrics={"split": self.split_name, **self._headline()},
            seed=cfg.hyperparameters.seed,
            created_at=datetime.now(UTC).isoformat(timespec="seconds"),
            kubetune_version=__version__,
        )


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
