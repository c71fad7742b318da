"""Evaluation: loss/perplexity, accuracy/F1 and BLEU for a model on a split."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import Any

from kubetune_trainer.evaluate.metrics import bleu, classification_metrics, perplexity
from kubetune_trainer.tokenization import IGNORE, Collator, chat_prompt

log = logging.getLogger(__name__)

Forward = Callable[[dict[str, Any]], Any]


def loss_and_predictions(
    forward: Forward,
    feats: list[dict[str, Any]],
    collator: Collator,
    *,
    batch_size: int,
    task: str,
    device: Any = None,
) -> tuple[float, list[int]]:
    """Mean loss over targets (tokens or samples) and, for classification, predicted ids."""
    import torch
    import torch.nn.functional as F

    total, weight = 0.0, 0
    preds: list[int] = []
    with torch.no_grad():
        for start in range(0, len(feats), batch_size):
            batch = collator(feats[start : start + batch_size])
            if device is not None:
                batch = {k: v.to(device) for k, v in batch.items()}
            labels = batch.pop("labels")
            logits = forward(batch).logits.float()
            if task == "causal-lm":
                # Sum, not mean: batches hold different numbers of target tokens.
                shift_logits = logits[:, :-1].reshape(-1, logits.shape[-1])
                shift_labels = labels[:, 1:].reshape(-1)
                loss = F.cross_entropy(
                    shift_logits, shift_labels, ignore_index=IGNORE, reduction="sum"
                )
                n = int((shift_labels != IGNORE).sum())
            else:
                loss = F.cross_entropy(logits, labels, reduction="sum")
                n = int(labels.numel())
                preds.extend(int(p) for p in logits.argmax(dim=-1).tolist())
            total += float(loss)
            weight += n
    return (total / weight if weight else float("nan")), preds


def evaluate(
    model: Any,
    tok: Any,
    *,
    task: str,
    fmt: str,
    feats: list[dict[str, Any]],
    rows: list[dict[str, Any]],
    labels: list[str] | None,
    metrics: list[str],
    batch_size: int,
    bleu_samples: int,
    max_new_tokens: int,
) -> dict[str, Any]:
    """Every requested metric for a plain (non-DeepSpeed) model on one split."""
    model.eval()
    collator = Collator(tok.pad_token_id, task)
    loss, preds = loss_and_predictions(
        lambda b: model(**b), feats, collator, batch_size=batch_size, task=task
    )
    result: dict[str, Any] = {"loss": round(loss, 6), "samples": len(feats)}
    if task == "causal-lm":
        result["perplexity"] = round(perplexity(loss), 4)
        if "bleu" in metrics:
            if fmt in ("chat", "instruction"):
                result.update(generation_bleu(model, tok, rows, fmt, bleu_samples, max_new_tokens))
            else:
                log.info("BLEU needs prompt/reference pairs (chat or instruction data); skipped")
    else:
        assert labels is not None
        gold = [int(f["label"]) for f in feats]
        result.update(classification_metrics(preds, gold, labels))
    return result


def _prompt_and_reference(row: dict[str, Any], fmt: str) -> tuple[list[dict[str, str]], str]:
    if fmt == "instruction":
        return [{"role": "user", "content": row["prompt"]}], row["completion"]
    messages = row["messages"]
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    return messages[:last], messages[last]["content"]


def generation_bleu(
    model: Any, tok: Any, rows: list[dict[str, Any]], fmt: str, samples: int, max_new_tokens: int
) -> dict[str, Any]:
    """Greedy answers to the first `samples` prompts, scored with corpus BLEU."""
    import torch

    hyps: list[str] = []
    refs: list[str] = []
    examples: list[dict[str, str]] = []
    tok.padding_side = "left"
    chosen = rows[:samples]
    with torch.no_grad():
        for start in range(0, len(chosen), 8):
            part = chosen[start : start + 8]
            pairs = [_prompt_and_reference(r, fmt) for r in part]
            prompts = [chat_prompt(tok, p) for p, _ in pairs]
            enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
            out = model.generate(
                **enc,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=tok.pad_token_id,
            )
            for i, (_, ref) in enumerate(pairs):
                text = tok.decode(out[i, enc["input_ids"].shape[1] :], skip_special_tokens=True)
                hyps.append(text.strip())
                refs.append(ref)
                if len(examples) < 3:
                    examples.append({"prompt": prompts[i][-200:], "output": text, "reference": ref})
    tok.padding_side = "right"
    score = bleu(hyps, refs)
    return {
        "bleu": round(score if math.isfinite(score) else 0.0, 4),
        "bleu_samples": len(hyps),
        "generations": examples,
    }
