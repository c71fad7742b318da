"""TrainerConfig: the contract between the operator and the trainer.

The same models are embedded in the FineTuneJob spec, so they also define the CRD. This module
must never import torch, transformers or a Kubernetes client: the operator image has none.
Fields are snake_case in Python and camelCase on the wire.
"""

from __future__ import annotations

import math
import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic.alias_generators import to_camel

Task = Literal["causal-lm", "sequence-classification"]
DataFormat = Literal["chat", "instruction", "text", "classification"]
Method = Literal["full", "lora", "qlora"]
PiiKind = Literal["email", "phone", "ipv4", "ipv6", "credit_card"]
ALL_PII_KINDS: tuple[PiiKind, ...] = ("email", "phone", "ipv4", "ipv6", "credit_card")
MetricName = Literal["loss", "perplexity", "accuracy", "f1", "bleu"]

# Keys that look like credentials: they must never be written inline in a spec.
_SECRET_KEY_RE = re.compile(
    r"(secret|password|passwd|token|access_?key|accesskeyid|secretaccesskey|credentials?$)",
    re.IGNORECASE,
)
_URI_RE = re.compile(
    r"^(s3://[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9](/.*)?|hf://[\w.\-]+/[\w.\-]+|builtin:[a-z0-9\-]+|[^:]+)$"
)


class WireModel(BaseModel):
    """Base for every spec model: camelCase on the wire, unknown fields rejected."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        validate_default=True,
    )

    def wire(self) -> dict[str, Any]:
        """The camelCase dict as it appears in YAML/JSON, without unset optional fields."""
        return self.model_dump(by_alias=True, exclude_none=True, mode="json")


def check_uri(value: str, field: str, *, allow: tuple[str, ...]) -> str:
    """Validate a data/model URI: a local path, s3://bucket/key, hf://org/name or builtin:name."""
    if not value or value != value.strip():
        raise ValueError(f"{field} must be a non-empty URI without surrounding spaces")
    scheme = value.split("://", 1)[0] + "://" if "://" in value else ""
    if value.startswith("builtin:"):
        scheme = "builtin:"
    if scheme and scheme not in allow:
        raise ValueError(
            f"{field}: scheme {scheme!r} is not supported; "
            f"accepted: {', '.join(allow)} or a local path"
        )
    if not _URI_RE.match(value):
        raise ValueError(
            f"{field}: {value!r} is not a well-formed URI; accepted: s3://<bucket>/<key>, "
            "hf://<org>/<name>, builtin:<name> or a local path"
        )
    return value


class ModelSpec(WireModel):
    """Which pretrained model to start from and how to tokenize for it."""

    source: str = Field(
        description=(
            "Model to fine-tune: a local directory, an s3://bucket/prefix holding a saved model, "
            "hf://org/name (needs a reachable hub), or a built-in: builtin:minilm, "
            "builtin:smollm2, builtin:tiny-llama."
        ),
        min_length=1,
        max_length=1024,
    )
    revision: str | None = Field(
        default=None,
        description="Model revision (git tag/commit) for hf:// sources.",
        max_length=128,
    )
    tokenizer: str | None = Field(
        default=None,
        description="Tokenizer override: same URI forms as source. Default: the model's own.",
        max_length=1024,
    )
    extra_special_tokens: list[str] = Field(
        default_factory=list,
        description="Special tokens to add to the tokenizer; embeddings are resized to match.",
        max_length=256,
    )
    chat_template: str | None = Field(
        default=None,
        description="Jinja chat template overriding the tokenizer's own (chat format only).",
        max_length=65536,
    )
    max_seq_length: int = Field(
        default=512,
        ge=8,
        le=131072,
        description="Maximum tokens per training sample; bounded by the model's context length.",
    )

    @field_validator("source", "tokenizer")
    @classmethod
    def _uri(cls, v: str | None) -> str | None:
        if v is None:
            return v
        return check_uri(v, "model source", allow=("s3://", "hf://", "builtin:"))


class FieldNames(WireModel):
    """Names of the fields read from each data row."""

    messages: str = Field(default="messages", description="Chat format: list of {role, content}.")
    prompt: str = Field(default="prompt", description="Instruction format: the prompt field.")
    completion: str = Field(
        default="completion", description="Instruction format: the completion field."
    )
    text: str = Field(default="text", description="Text and classification formats: the text.")
    label: str = Field(default="label", description="Classification format: the label field.")


class CleaningSpec(WireModel):
    """Cleaning steps applied to every text before tokenization."""

    enabled: bool = Field(default=True, description="Run the cleaning steps at all.")
    strip_control_chars: bool = Field(
        default=True, description="Remove control characters (except newline and tab)."
    )
    normalize_whitespace: bool = Field(
        default=True, description="Collapse runs of spaces and trim each text."
    )
    drop_empty: bool = Field(
        default=True, description="Drop rows whose text is empty after cleaning."
    )
    dedupe: bool = Field(default=True, description="Drop exact duplicate rows (after cleaning).")


class PiiRedactionSpec(WireModel):
    """Replace personal data with placeholders such as <EMAIL> before training."""

    enabled: bool = Field(default=False, description="Redact PII in every text field.")
    kinds: list[PiiKind] = Field(
        default_factory=lambda: list(ALL_PII_KINDS),
        description="Which kinds of PII to redact.",
        min_length=1,
    )


class DataSpec(WireModel):
    """Where the task data lives and how to prepare it."""

    train: str = Field(
        description="Training data: JSONL, CSV or Parquet; a local path or s3://bucket/key.",
        min_length=1,
        max_length=1024,
    )
    validation: str | None = Field(
        default=None,
        description="Validation data. Default: split off the training data (validationSplit).",
        max_length=1024,
    )
    test: str | None = Field(
        default=None,
        description="Held-out test data for the final evaluation. Default: testSplit of train.",
        max_length=1024,
    )
    validation_split: float = Field(
        default=0.1,
        ge=0.0,
        le=0.5,
        description="Fraction of train used for validation when no validation file is given.",
    )
    test_split: float = Field(
        default=0.0,
        ge=0.0,
        le=0.5,
        description="Fraction of train held out for test when no test file is given.",
    )
    format: DataFormat = Field(
        description="Row format: chat (messages), instruction (prompt/completion), text, "
        "or classification (text + label)."
    )
    fields: FieldNames = Field(default_factory=FieldNames, description="Field names in each row.")
    labels: list[str] | None = Field(
        default=None,
        description="Classification labels, in id order. Default: the sorted labels in the data.",
        max_length=10000,
    )
    cleaning: CleaningSpec = Field(default_factory=CleaningSpec, description="Text cleaning.")
    pii_redaction: PiiRedactionSpec = Field(
        default_factory=PiiRedactionSpec, description="PII redaction."
    )
    overlong: Literal["truncate", "chunk", "drop"] = Field(
        default="truncate",
        description="What to do with samples longer than maxSeqLength: truncate, chunk "
        "(causal-lm only, with chunkStride tokens of overlap) or drop.",
    )
    chunk_stride: int = Field(
        default=32, ge=0, le=65536, description="Tokens of overlap between consecutive chunks."
    )
    packing: bool = Field(
        default=False,
        description="Pack several short samples into one maxSeqLength sequence (causal-lm).",
    )
    max_samples: int | None = Field(
        default=None, ge=1, le=1_000_000_000, description="Use at most this many training rows."
    )

    @field_validator("train", "validation", "test")
    @classmethod
    def _uri(cls, v: str | None) -> str | None:
        if v is None:
            return v
        return check_uri(v, "data URI", allow=("s3://",))

    @field_validator("labels")
    @classmethod
    def _labels(cls, v: list[str] | None) -> list[str] | None:
        if v is None:
            return v
        if len(v) < 2:
            raise ValueError("needs at least 2 labels for classification")
        if len(set(v)) != len(v):
            raise ValueError("labels must be unique")
        return v

    @model_validator(mode="after")
    def _splits(self) -> DataSpec:
        if self.validation_split + self.test_split >= 0.9:
            raise ValueError(
                "validationSplit: validationSplit + testSplit must leave at least 10% of the data "
                "for training"
            )
        return self


class LoraSpec(WireModel):
    """LoRA adapter settings (method lora or qlora)."""

    r: int = Field(default=16, ge=1, le=1024, description="LoRA rank.")
    alpha: int = Field(default=32, ge=1, le=4096, description="LoRA scaling alpha.")
    dropout: float = Field(default=0.05, ge=0.0, lt=1.0, description="LoRA dropout.")
    target_modules: list[str] | None = Field(
        default=None,
        description="Module names to adapt. Default: the attention projections of the model.",
        max_length=256,
    )
    merge: bool = Field(
        default=True,
        description="Merge the adapter into the base weights in model/; false keeps the adapter.",
    )


class Hyperparameters(WireModel):
    """Optimisation settings. Defaults follow common fine-tuning advice."""

    learning_rate: float = Field(default=2e-5, gt=0.0, le=1.0, description="Peak learning rate.")
    per_device_batch_size: int = Field(
        default=16, ge=1, le=4096, description="Samples per device per step."
    )
    gradient_accumulation_steps: int = Field(
        default=1, ge=1, le=4096, description="Micro-batches accumulated per optimizer step."
    )
    epochs: float = Field(
        default=3.0, gt=0.0, le=1000.0, description="Passes over the training data."
    )
    max_steps: int | None = Field(
        default=None, ge=1, le=100_000_000, description="Stop after this many optimizer steps."
    )
    warmup_ratio: float = Field(
        default=0.06, ge=0.0, le=0.5, description="Fraction of steps with linear LR warmup."
    )
    warmup_steps: int | None = Field(
        default=None, ge=0, le=100_000_000, description="Warmup steps; overrides warmupRatio."
    )
    scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup"] = Field(
        default="linear", description="Learning-rate schedule after warmup."
    )
    weight_decay: float = Field(default=0.0, ge=0.0, le=1.0, description="AdamW weight decay.")
    max_grad_norm: float = Field(default=1.0, gt=0.0, le=1000.0, description="Gradient clipping.")
    seed: int = Field(default=42, ge=0, le=2**31 - 1, description="Seed for data order and init.")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        default="auto",
        description="Training precision. auto: bf16 on GPUs that support it, else fp32.",
    )

    @field_validator("learning_rate", "epochs")
    @classmethod
    def _finite(cls, v: float) -> float:
        if not math.isfinite(v):
            raise ValueError("must be a finite number")
        return v


class EarlyStoppingSpec(WireModel):
    """Stop when the validation metric stops improving."""

    enabled: bool = Field(default=False, description="Enable early stopping.")
    metric: str = Field(
        default="loss",
        pattern=r"^[a-z][a-z0-9_]*$",
        max_length=64,
        description="Validation metric to watch: loss or perplexity (causal-lm); loss, "
        "accuracy, f1 or f1_macro (sequence-classification).",
    )
    mode: Literal["min", "max"] | None = Field(
        default=None,
        description="min: lower is better (loss, perplexity); max: higher is better (accuracy, "
        "f1). Default: the metric's own direction; a mode that contradicts it is rejected.",
    )
    patience: int = Field(
        default=3, ge=1, le=1000, description="Evaluations without improvement before stopping."
    )
    min_delta: float = Field(
        default=0.0, ge=0.0, description="Smallest change that counts as an improvement."
    )


class DeepSpeedSpec(WireModel):
    """DeepSpeed engine settings."""

    zero_stage: Literal[0, 1, 2, 3] = Field(default=2, description="ZeRO optimisation stage (0-3).")
    offload: Literal["none", "cpu"] = Field(
        default="none", description="Offload optimizer state (and params in ZeRO-3) to CPU."
    )
    config: dict[str, Any] | None = Field(
        default=None,
        description="A full DeepSpeed config; overrides zeroStage and offload when given.",
    )


class CheckpointingSpec(WireModel):
    """How often to checkpoint and what to keep."""

    every_steps: int = Field(
        default=100, ge=1, le=100_000_000, description="Save a checkpoint every N optimizer steps."
    )
    keep_last: int = Field(
        default=3, ge=1, le=1000, description="Keep only the newest K checkpoints."
    )
    resume: Literal["auto", "never", "required"] = Field(
        default="auto",
        description="auto: resume from the newest complete checkpoint if any; never: start fresh; "
        "required: fail when there is none.",
    )


class Gate(WireModel):
    """One evaluation gate: the fine-tuned model's metric must satisfy `metric op value`."""

    metric: str = Field(
        pattern=r"^[a-z_0-9]+$",
        max_length=64,
        description="Metric name from eval.json: loss, perplexity, accuracy, f1_macro, bleu.",
    )
    op: Literal[">", ">=", "<", "<="] = Field(description="Comparison operator.")
    value: float = Field(description="Threshold.")

    def passes(self, actual: float) -> bool:
        return {
            ">": actual > self.value,
            ">=": actual >= self.value,
            "<": actual < self.value,
            "<=": actual <= self.value,
        }[self.op]


class EvaluationSpec(WireModel):
    """Validation during training and the final evaluation on the test split."""

    every_steps: int | None = Field(
        default=None,
        ge=1,
        le=100_000_000,
        description="Validate every N steps. Default: each epoch.",
    )
    metrics: list[MetricName] | None = Field(
        default=None,
        description="Metrics to compute. Default: loss, perplexity and bleu for causal-lm; "
        "loss, accuracy and f1 for classification.",
    )
    compare_base: bool = Field(
        default=True, description="Also evaluate the base model, for the before/after comparison."
    )
    bleu_samples: int = Field(
        default=32, ge=1, le=100000, description="Test samples generated for BLEU."
    )
    max_new_tokens: int = Field(
        default=64, ge=1, le=4096, description="Generation length for BLEU samples."
    )
    gates: list[Gate] = Field(
        default_factory=list, description="Gates the fine-tuned model must pass to be deployed."
    )
    must_beat_base: bool = Field(
        default=False, description="Require the fine-tuned model to beat the base model's metrics."
    )


class TrainingSpec(WireModel):
    """The part of a FineTuneJob that the trainer consumes."""

    task: Task = Field(description="causal-lm (SFT) or sequence-classification.")
    model: ModelSpec = Field(description="The pretrained model and tokenizer.")
    data: DataSpec = Field(description="Task data and its preparation.")
    method: Method = Field(
        default="full", description="full fine-tuning, lora, or qlora (GPU only)."
    )
    lora: LoraSpec = Field(default_factory=LoraSpec, description="LoRA settings.")
    hyperparameters: Hyperparameters = Field(
        default_factory=Hyperparameters, description="Optimisation settings."
    )
    early_stopping: EarlyStoppingSpec = Field(
        default_factory=EarlyStoppingSpec, description="Early stopping on a validation metric."
    )
    deepspeed: DeepSpeedSpec = Field(default_factory=DeepSpeedSpec, description="DeepSpeed engine.")
    checkpointing: CheckpointingSpec = Field(
        default_factory=CheckpointingSpec, description="Checkpoint cadence and retention."
    )
    evaluation: EvaluationSpec = Field(
        default_factory=EvaluationSpec, description="Validation, final evaluation and gates."
    )

    @model_validator(mode="after")
    def _task_format(self) -> TrainingSpec:
        fmt = self.data.format
        if self.task == "sequence-classification" and fmt != "classification":
            raise ValueError(
                f"data.format: {fmt!r} does not fit task 'sequence-classification'; "
                "accepted: classification"
            )
        if self.task == "causal-lm" and fmt == "classification":
            raise ValueError(
                "data.format: 'classification' does not fit task 'causal-lm'; "
                "accepted: chat, instruction, text"
            )
        if self.data.overlong == "chunk" and self.task != "causal-lm":
            raise ValueError(
                "data.overlong: 'chunk' works only for causal-lm; accepted: truncate, drop"
            )
        if self.data.packing and self.task != "causal-lm":
            raise ValueError("data.packing: works only for task causal-lm")
        if self.data.chunk_stride >= self.model.max_seq_length:
            raise ValueError(
                f"data.chunkStride: {self.data.chunk_stride} must be smaller than "
                f"model.maxSeqLength ({self.model.max_seq_length})"
            )
        if self.data.labels is not None and self.task != "sequence-classification":
            raise ValueError("data.labels: applies only to task 'sequence-classification'")
        return self

    @model_validator(mode="after")
    def _metrics_fit_task(self) -> TrainingSpec:
        # Known before any data is read: rejecting here saves a pod start, data preparation and
        # backoffLimit gang restarts of a run that could never use the metric.
        if self.model.source.startswith("builtin:"):
            _check_builtin(self.model.source, self.task)
        computed = computed_metrics(self.task, self.data.format, self.effective_metrics())
        for name in self.evaluation.metrics or ():
            if name not in TASK_METRICS[self.task]:
                raise ValueError(
                    f"evaluation.metrics: {name!r} is not computed for task {self.task!r}; "
                    f"accepted: {', '.join(TASK_METRICS[self.task])}"
                )
        es = self.early_stopping
        direction = "min" if lower_is_better(es.metric) else "max"
        if es.mode is not None and es.mode != direction:
            raise ValueError(
                f"earlyStopping.mode: {es.mode!r} contradicts metric {es.metric!r} "
                f"({'lower' if direction == 'min' else 'higher'} is better); "
                f"accepted: {direction!r}, or leave mode unset"
            )
        watched = VALIDATION_METRICS[self.task]
        if self.early_stopping.metric not in watched:
            raise ValueError(
                f"earlyStopping.metric: {self.early_stopping.metric!r} is not computed on the "
                f"validation split for task {self.task!r}; accepted: {', '.join(watched)}"
            )
        for i, gate in enumerate(self.evaluation.gates):
            if gate.metric not in computed:
                why = (
                    " (bleu needs chat or instruction data and 'bleu' in evaluation.metrics)"
                    if gate.metric in ("bleu", "bleu_samples") and self.task == "causal-lm"
                    else ""
                )
                raise ValueError(
                    f"evaluation.gates[{i}].metric: {gate.metric!r} is not computed for task "
                    f"{self.task!r} with data.format {self.data.format!r}{why}; "
                    f"accepted: {', '.join(computed)}"
                )
        return self

    def effective_metrics(self) -> list[str]:
        if self.evaluation.metrics:
            return list(self.evaluation.metrics)
        if self.task == "causal-lm":
            return ["loss", "perplexity", "bleu"]
        return ["loss", "accuracy", "f1"]


# What the trainer computes, by task: on the validation split during training (what early
# stopping can watch) and on the test split at the end (what gates can check).
VALIDATION_METRICS: dict[str, tuple[str, ...]] = {
    "causal-lm": ("loss", "perplexity"),
    "sequence-classification": ("loss", "accuracy", "f1", "f1_macro"),
}
TASK_METRICS: dict[str, tuple[str, ...]] = {
    "causal-lm": ("loss", "perplexity", "bleu"),
    "sequence-classification": ("loss", "accuracy", "f1"),
}
# Built-in models and the task each suits ("both": either); models.builtin must agree (tested).
BUILTIN_MODEL_TASKS: dict[str, str] = {
    "minilm": "sequence-classification",
    "smollm2": "causal-lm",
    "tiny-llama": "both",
}


def computed_metrics(task: str, fmt: str, requested: list[str]) -> tuple[str, ...]:
    """Metric names the final evaluation reports for this task and data (gate-able names)."""
    if task == "sequence-classification":
        return ("loss", "samples", "accuracy", "f1", "f1_macro")
    names: tuple[str, ...] = ("loss", "samples", "perplexity")
    if "bleu" in requested and fmt in ("chat", "instruction"):
        names += ("bleu", "bleu_samples")
    return names


def _check_builtin(source: str, task: str) -> None:
    name = source.removeprefix("builtin:")
    suits = BUILTIN_MODEL_TASKS.get(name)
    if suits is None:
        known = ", ".join(f"builtin:{n}" for n in BUILTIN_MODEL_TASKS)
        raise ValueError(f"model.source: unknown built-in model {source!r}; accepted: {known}")
    if suits not in ("both", task):
        fits = ", ".join(
            f"builtin:{n}" for n, t in BUILTIN_MODEL_TASKS.items() if t in (task, "both")
        )
        raise ValueError(
            f"model.source: {source!r} is a {suits} model and does not fit task {task!r}; "
            f"accepted for this task: {fits}"
        )


class JobIdentity(WireModel):
    """Which job this run belongs to: used for metric labels and the model card."""

    name: str = Field(description="FineTuneJob name.", min_length=1, max_length=253)
    namespace: str = Field(default="default", description="FineTuneJob namespace.", max_length=63)


class OutputSpec(WireModel):
    """Where this run writes checkpoints, progress, eval.json and the model."""

    uri: str = Field(
        description="Run prefix: a local directory or s3://bucket/prefix/<namespace>/<job>.",
        min_length=1,
    )
    s3_endpoint: str | None = Field(
        default=None, description="S3 endpoint URL (for S3-compatible stores)."
    )
    s3_region: str = Field(default="us-east-1", description="S3 region.")


class TelemetrySpec(WireModel):
    """Where the trainer reports progress."""

    metrics_port: int = Field(
        default=9400, ge=0, le=65535, description="Prometheus port on rank 0; 0 disables it."
    )
    metrics_host: str = Field(default="0.0.0.0", description="Address the metrics server binds.")
    progress_interval_seconds: float = Field(
        default=5.0, gt=0.0, le=3600.0, description="How often progress.json is written."
    )
    termination_log: str = Field(
        default="/dev/termination-log",
        description="File for the one-line exit reason, when writable.",
    )


class TrainerConfig(TrainingSpec):
    """Everything one trainer run needs. The operator writes it to a ConfigMap as JSON."""

    job: JobIdentity = Field(description="The job this run belongs to.")
    output: OutputSpec = Field(description="Where results are written.")
    telemetry: TelemetrySpec = Field(default_factory=TelemetrySpec, description="Telemetry.")


def reject_inline_secrets(data: Any, where: str) -> None:
    """Raise when a mapping carries what looks like a credential instead of a reference."""
    if not isinstance(data, dict):
        return
    for key, value in data.items():
        if isinstance(key, str) and _SECRET_KEY_RE.search(key) and not key.endswith("Ref"):
            if key in {"credentialsSecretRef"}:
                continue
            raise ValueError(
                f"{where}{key}: secrets must never be written inline; put them in a Secret and "
                "reference it with credentialsSecretRef"
            )
        # A *Ref names where a secret lives (e.g. secretAccessKeyKey): that is not a secret.
        if isinstance(value, dict) and not (isinstance(key, str) and key.endswith("Ref")):
            reject_inline_secrets(value, f"{where}{key}.")


# The one lower-is-better set; higher is better for everything else (accuracy, f1_macro, bleu).
# Any metric named *_loss (eval_loss, test_loss) is lower-is-better too: see lower_is_better().
LOWER_IS_BETTER: frozenset[str] = frozenset({"loss", "perplexity", "eval_loss", "test_loss"})


def lower_is_better(metric: str) -> bool:
    return metric in LOWER_IS_BETTER or metric.endswith("_loss")


class GateVerdict(WireModel):
    """One gate as the trainer decided it. The operator reports it and never recomputes it."""

    metric: str
    op: str
    value: float | None = None
    actual: float | None = None
    passed: bool
    must_beat_base: bool = False


class FinalReport(WireModel):
    """Rank 0's `Succeeded: {json}` termination message: the operator's whole view of a result.

    Kubernetes keeps 4 KiB of it, so only top-level numbers travel (per-class reports and the
    confusion matrix stay in eval.json) and non-finite values become null.
    """

    metrics: dict[str, float | None] = Field(default_factory=dict)
    gates: list[GateVerdict] = Field(default_factory=list)
    gates_passed: bool
    # Optimizer steps done and planned: final progress needs no scrape of a pod that has exited.
    steps: int | None = None
    total_steps: int | None = None


def primary_metric(task: str) -> str:
    """The metric `mustBeatBase` compares: accuracy for classification, loss for causal-lm."""
    return "accuracy" if task == "sequence-classification" else "loss"
