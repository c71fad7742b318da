"""Model sources (local, s3://, hf://, builtin:) and model setup (full, LoRA, QLoRA)."""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import socket
from pathlib import Path
from typing import Any

from kubetune_trainer.config import LoraSpec, TrainerConfig
from kubetune_trainer.errors import ConfigError
from kubetune_trainer.models.builtin import BUILTIN_PREFIX, cache_dir, resolve_builtin

log = logging.getLogger(__name__)

HUB_HOST = "huggingface.co"


class ModelSourceError(ConfigError):
    """The model (or tokenizer) source cannot be used; the message says why and what works."""


def _hub_reachable(timeout: float = 3.0) -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0"):
        return False
    try:
        with socket.create_connection((HUB_HOST, 443), timeout=timeout):
            return True
    except OSError:
        return False


def resolve_source(
    source: str, *, revision: str | None = None, endpoint: str | None = None
) -> Path:
    """A local directory holding the model for any supported source URI."""
    if source.startswith(BUILTIN_PREFIX):
        try:
            return resolve_builtin(source.removeprefix(BUILTIN_PREFIX))
        except ValueError as err:
            raise ModelSourceError(f"model.source {source!r}: {err}") from None
    if source.startswith("s3://"):
        from kubetune_trainer.store import download_tree

        digest = hashlib.sha256(source.encode()).hexdigest()[:16]
        dest = cache_dir() / "models" / "s3" / digest
        if not (dest / "config.json").exists():
            log.info("downloading %s", source)
            download_tree(source, dest, endpoint=endpoint)
        if not (dest / "config.json").exists():
            raise ModelSourceError(f"model.source {source!r}: no config.json under that prefix")
        return dest
    if source.startswith("hf://"):
        name = source.removeprefix("hf://")
        if not _hub_reachable():
            raise ModelSourceError(
                f"model.source {source!r} needs the Hugging Face hub, which this machine cannot "
                "reach (offline). Use a local directory, an s3:// prefix or a builtin: model."
            )
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(name, revision=revision))
    path = Path(source).expanduser()
    if not path.is_dir():
        raise ModelSourceError(f"model.source {source!r}: no such directory")
    if not (path / "config.json").exists():
        raise ModelSourceError(
            f"model.source {source!r}: not a saved model (no config.json); expected a "
            "directory written by save_pretrained"
        )
    return path


def model_context_length(model_dir: Path) -> int | None:
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(str(model_dir))
    value = getattr(cfg, "max_position_embeddings", None)
    return int(value) if value else None


def check_method(cfg: TrainerConfig, use_cuda: bool) -> None:
    """Fail before any work when the training method cannot run here (the runner calls this
    first, so a bad combination never costs a base evaluation)."""
    if cfg.method != "qlora":
        return
    if not use_cuda:
        raise ModelSourceError(
            "method 'qlora' needs a CUDA GPU (4-bit weights via bitsandbytes) and this run has "
            "none; use method 'lora' on CPU"
        )
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ModelSourceError(
            "method 'qlora' needs the bitsandbytes package, which is not installed in this image;"
            " install kubetune[trainer,gpu] (the trainer image has it) or use method 'lora'"
        )


def load_model(
    cfg: TrainerConfig,
    model_dir: Path,
    *,
    labels: list[str] | None,
    vocab_size: int,
    use_cuda: bool,
) -> Any:
    """The pretrained model for the task, resized for added tokens, with LoRA if asked."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    check_method(cfg, use_cuda)
    # The classification head is freshly initialised: seed it so runs are reproducible.
    torch.manual_seed(cfg.hyperparameters.seed)
    kwargs: dict[str, Any] = {"dtype": torch.float32}
    if cfg.method == "qlora":
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16
        )
    if cfg.task == "sequence-classification":
        assert labels is not None
        model = AutoModelForSequenceClassification.from_pretrained(
            str(model_dir),
            num_labels=len(labels),
            id2label=dict(enumerate(labels)),
            label2id={name: i for i, name in enumerate(labels)},
            ignore_mismatched_sizes=True,
            **kwargs,
        )
    else:
        model = AutoModelForCausalLM.from_pretrained(str(model_dir), **kwargs)
    if vocab_size > model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(vocab_size)
    if cfg.method in ("lora", "qlora"):
        model = apply_lora(model, cfg.lora, cfg.task, quantized=cfg.method == "qlora")
    return model


def apply_lora(model: Any, spec: LoraSpec, task: str, *, quantized: bool) -> Any:
    from peft import LoraConfig, TaskType, get_peft_model, prepare_model_for_kbit_training

    if quantized:
        model = prepare_model_for_kbit_training(model)
    lora = LoraConfig(
        r=spec.r,
        lora_alpha=spec.alpha,
        lora_dropout=spec.dropout,
        target_modules=spec.target_modules,
        task_type=TaskType.CAUSAL_LM if task == "causal-lm" else TaskType.SEQ_CLS,
    )
    try:
        peft_model = get_peft_model(model, lora)
    except ValueError as err:
        raise ModelSourceError(f"lora.targetModules: {err}") from None
    trainable, total = peft_model.get_nb_trainable_parameters()
    share = 100 * trainable / total
    log.info("LoRA: %d of %d parameters trainable (%.2f%%)", trainable, total, share)
    return peft_model
