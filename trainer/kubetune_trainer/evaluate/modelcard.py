"""The model card: ``kubetune.json`` next to a saved model, plus a human ``README.md``.

The trainer writes it; the inference server (and anything else) reads it to know which task the
model serves, its labels, how to escalate and where an adapter's base model lives. Unknown keys
are ignored on read so an older server can still load a model written by a newer trainer.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

__all__ = [
    "MODEL_CARD_FILE",
    "README_FILE",
    "ModelCard",
    "ModelCardError",
    "read_model_card",
    "render_readme",
    "resolve_base_model",
    "write_model_card",
]

MODEL_CARD_FILE = "kubetune.json"
README_FILE = "README.md"


class ModelCardError(ValueError):
    """``kubetune.json`` is missing or invalid; the message names the file and the field."""


class ModelCard(BaseModel):
    """Machine-readable description of one trained model directory."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    task: Literal["causal-lm", "sequence-classification"] = Field(
        description="What the model does: generate text (causal-lm) or label text "
        "(sequence-classification)."
    )
    base_model: str = Field(
        min_length=1,
        description="The model it was fine-tuned from, as given in the job spec "
        "(builtin:NAME, hf://org/name, s3://... or a path).",
    )
    method: Literal["full", "lora", "qlora"] = Field(
        description="Fine-tuning method: all weights (full) or low-rank adapters (lora/qlora)."
    )
    adapter: bool = Field(
        description="True when the directory holds only a PEFT adapter that must be applied to "
        "the base model; False when it holds complete (possibly merged) weights."
    )
    base_model_path: str | None = Field(
        default=None,
        description="For adapters: where the base model's files are, absolute or relative to this "
        "directory. When unset, a builtin: base_model is resolved locally.",
    )
    labels: list[str] = Field(
        default_factory=list,
        description="Classification labels in model-id order (labels[i] is class id i). Empty for "
        "causal-lm.",
    )
    escalation_label: str | None = Field(
        default="escalate",
        description="A label that always means 'hand over to a human'; None disables it.",
    )
    escalation_threshold: float = Field(
        default=0.5,
        ge=0.0,
        le=1.0,
        description="Escalate when the top class probability is below this value.",
    )
    max_seq_length: int = Field(
        ge=1, description="Longest input, in tokens, the model was trained on."
    )
    data_fingerprint: str = Field(
        description="Hash of the prepared training data, to tie the model to its data."
    )
    hyperparameters: dict[str, Any] = Field(
        default_factory=dict, description="Training hyperparameters as resolved for the run."
    )
    metrics: dict[str, Any] = Field(
        default_factory=dict, description="Final evaluation metrics (e.g. eval_loss, accuracy)."
    )
    seed: int = Field(description="Random seed of the training run.")
    created_at: str = Field(description="When the model was written (ISO 8601, UTC).")
    kubetune_version: str = Field(description="Version of kubetune that wrote the model.")

    @model_validator(mode="after")
    def _check_consistency(self) -> ModelCard:
        if self.task == "sequence-classification":
            if not self.labels:
                raise ValueError("labels: a sequence-classification model needs at least one label")
            if len(set(self.labels)) != len(self.labels):
                raise ValueError(f"labels: duplicate labels in {self.labels}")
        if self.adapter and self.method == "full":
            raise ValueError("adapter: a full fine-tune cannot be an adapter (method is 'full')")
        return self


def write_model_card(directory: Path | str, card: ModelCard) -> Path:
    """Write ``kubetune.json`` and ``README.md`` into ``directory``; return the JSON's path.

    Each file is written to a temporary name and renamed, so a reader never sees half a card.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / MODEL_CARD_FILE
    _atomic_write(path, json.dumps(card.model_dump(mode="json"), indent=2, sort_keys=True) + "\n")
    _atomic_write(directory / README_FILE, render_readme(card))
    return path


def read_model_card(directory: Path | str) -> ModelCard:
    """Read and validate ``directory/kubetune.json``.

    Raises :class:`ModelCardError` naming the file and the offending field.
    """
    path = Path(directory) / MODEL_CARD_FILE
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ModelCardError(
            f"{path}: model card not found; a kubetune model directory must contain "
            f"{MODEL_CARD_FILE} (written by the trainer)"
        ) from None
    except OSError as exc:
        raise ModelCardError(f"{path}: cannot read model card: {exc}") from exc
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ModelCardError(
            f"{path}: not valid JSON (line {exc.lineno}, column {exc.colno}): {exc.msg}"
        ) from exc
    try:
        return ModelCard.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(
            f"field '{'.'.join(str(p) for p in err['loc']) or '<root>'}': {err['msg']}"
            for err in exc.errors()
        )
        raise ModelCardError(f"{path}: invalid model card: {problems}") from exc


def resolve_base_model(directory: Path | str, card: ModelCard) -> Path:
    """Where an adapter's base model lives: ``base_model_path`` or a resolved ``builtin:``."""
    directory = Path(directory)
    if card.base_model_path:
        base = Path(card.base_model_path)
        return base if base.is_absolute() else (directory / base).resolve()
    if card.base_model.startswith("builtin:"):
        from kubetune_trainer.models.builtin import resolve_builtin  # heavy deps: import lazily

        return resolve_builtin(card.base_model)
    local = Path(card.base_model)
    if local.is_dir():
        return local
    raise ModelCardError(
        f"{directory / MODEL_CARD_FILE}: field 'base_model_path' is needed: the adapter's base "
        f"model {card.base_model!r} is neither builtin: nor a local directory"
    )


def render_readme(card: ModelCard) -> str:
    """A human model card (Hugging Face README with YAML front matter) rendered from ``card``."""
    pipeline = "text-generation" if card.task == "causal-lm" else "text-classification"
    lines = [
        "---",
        "library_name: " + ("peft" if card.adapter else "transformers"),
        f"pipeline_tag: {pipeline}",
        f"base_model: {json.dumps(card.base_model)}",
        "tags: [kubetune]",
        "---",
        "",
        f"# {card.task} model fine-tuned from `{card.base_model}`",
        "",
        f"Trained with kubetune {card.kubetune_version} on {card.created_at}. "
        f"The machine-readable version of this card is `{MODEL_CARD_FILE}`.",
        "",
        "| Field | Value |",
        "| --- | --- |",
        f"| Task | {card.task} |",
        f"| Method | {card.method}{' (adapter only)' if card.adapter else ''} |",
        f"| Max sequence length | {card.max_seq_length} |",
        f"| Seed | {card.seed} |",
        f"| Data fingerprint | `{card.data_fingerprint}` |",
    ]
    if card.adapter:
        lines.append(
            f"| Base model path | {card.base_model_path or '(resolved from base_model)'} |"
        )
    if card.task == "sequence-classification":
        lines += [
            f"| Escalation label | {card.escalation_label or '(none)'} |",
            f"| Escalation threshold | {card.escalation_threshold} |",
            "",
            "## Labels",
            "",
            *(f"{i}. `{label}`" for i, label in enumerate(card.labels)),
        ]
    for title, values in (("Metrics", card.metrics), ("Hyperparameters", card.hyperparameters)):
        lines += ["", f"## {title}", ""]
        if values:
            lines += ["| Name | Value |", "| --- | --- |"]
            lines += [f"| {k} | {_cell(v)} |" for k, v in sorted(values.items())]
        else:
            lines.append("(none recorded)")
    return "\n".join(lines) + "\n"


def _cell(value: Any) -> str:
    text = f"{value:.4g}" if isinstance(value, float) else json.dumps(value, default=str)
    return text.replace("|", "\\|")


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
