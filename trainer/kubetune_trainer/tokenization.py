"""Tokenizers, special tokens, chat templates, overlong samples, packing and batching.

Chat loss masking works with any chat template: each assistant turn's character span is found by
rendering the conversation up to that turn with and without it, and only tokens inside those spans
carry labels. So the model learns to answer, not to repeat the user.
"""

from __future__ import annotations

import bisect
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from kubetune_trainer.config import ModelSpec
from kubetune_trainer.errors import ConfigError

log = logging.getLogger(__name__)

IGNORE = -100
# Used only when a tokenizer ships without a chat template and the spec gives none.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


class TokenizationError(ConfigError):
    """A sample cannot be tokenized as the spec asks (e.g. a non-prefix-stable chat template)."""


@dataclass
class TokenizeReport:
    """Counts for the run summary: what happened to samples on the way to token ids."""

    samples_in: int = 0
    samples_out: int = 0
    truncated: int = 0
    chunked: int = 0
    chunks_created: int = 0
    dropped_overlong: int = 0
    dropped_no_target: int = 0
    tokens: int = 0
    target_tokens: int = 0
    packed_sequences: int = 0
    max_length: int = 0
    longest_sample: int = 0
    per_split: dict[str, dict[str, int]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def load_tokenizer(model_dir: Path, spec: ModelSpec, tokenizer_dir: Path | None = None) -> Any:
    """The model's tokenizer (or an override), with extra special tokens, chat template and pad."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir or model_dir))
    if spec.extra_special_tokens:
        added = tok.add_tokens(list(spec.extra_special_tokens), special_tokens=True)
        log.info("added %d special tokens: %s", added, spec.extra_special_tokens)
    if spec.chat_template:
        tok.chat_template = spec.chat_template
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token or tok.unk_token
    if tok.pad_token is None:
        tok.add_special_tokens({"pad_token": "<|pad|>"})
    return tok


def effective_max_length(requested: int, model_context: int | None) -> int:
    """The sequence length actually used: the spec's, bounded by the model's context window."""
    if model_context and requested > model_context:
        log.warning(
            "model.maxSeqLength %d exceeds the model's context of %d tokens; using %d",
            requested,
            model_context,
            model_context,
        )
        return model_context
    return requested


def _render(tok: Any, messages: list[dict[str, str]], *, generation_prompt: bool) -> str:
    text = tok.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=generation_prompt
    )
    return str(text)


def chat_prompt(tok: Any, messages: list[dict[str, str]]) -> str:
    """The prompt text for generating the next assistant turn."""
    if not tok.chat_template:
        tok.chat_template = CHATML_TEMPLATE
    return _render(tok, messages, generation_prompt=True)


def encode_chat(tok: Any, messages: list[dict[str, str]]) -> tuple[list[int], list[int]]:
    """Token ids and labels for a conversation; labels cover assistant turns only."""
    if not tok.chat_template:
        tok.chat_template = CHATML_TEMPLATE
    full = _render(tok, messages, generation_prompt=False)
    spans: list[tuple[int, int]] = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = _render(tok, messages[:i], generation_prompt=True) if i else ""
        upto = _render(tok, messages[: i + 1], generation_prompt=False)
        if not upto.startswith(before) or not full.startswith(upto):
            raise TokenizationError(
                "the chat template does not render conversations prefix-stably, so assistant "
                "tokens cannot be located; set model.chatTemplate to a ChatML-style template"
            )
        spans.append((len(before), len(upto)))
    enc = tok(full, add_special_tokens=False, return_offsets_mapping=True)
    ids: list[int] = list(enc["input_ids"])
    labels = [IGNORE] * len(ids)
    for t, (start, end) in enumerate(enc["offset_mapping"]):
        if end > start and any(s <= start < e for s, e in spans):
            labels[t] = ids[t]
    return ids, labels


def encode_text(tok: Any, text: str) -> tuple[list[int], list[int]]:
    ids = list(tok(text, add_special_tokens=True)["input_ids"])
    if tok.eos_token_id is not None and (not ids or ids[-1] != tok.eos_token_id):
        ids.append(tok.eos_token_id)
    return ids, list(ids)


def _fit(
    ids: list[int],
    labels: list[int],
    max_len: int,
    overlong: str,
    stride: int,
    report: TokenizeReport,
) -> list[tuple[list[int], list[int]]]:
    """Apply the overlong policy to one causal-LM sample."""
    report.longest_sample = max(report.longest_sample, len(ids))
    if len(ids) <= max_len:
        return [(ids, labels)]
    if overlong == "drop":
        report.dropped_overlong += 1
        return []
    if overlong == "truncate":
        report.truncated += 1
        return [(ids[:max_len], labels[:max_len])]
    pieces: list[tuple[list[int], list[int]]] = []
    step = max_len - stride
    for start in range(0, len(ids), step):
        chunk_ids = ids[start : start + max_len]
        chunk_labels = list(labels[start : start + max_len])
        if start:
            # The overlap was already a target in the previous chunk: context only here.
            chunk_labels[:stride] = [IGNORE] * min(stride, len(chunk_labels))
        pieces.append((chunk_ids, chunk_labels))
        if start + max_len >= len(ids):
            break
    report.chunked += 1
    report.chunks_created += len(pieces)
    return pieces


def pack(
    samples: list[tuple[list[int], list[int]]], max_len: int
) -> list[tuple[list[int], list[int]]]:
    """Concatenate whole samples into sequences of at most max_len tokens, best fit decreasing.

    Longest first, each into the fullest sequence it still fits: sequences come out nearly
    full and alike in length, so a batch pads little (filling in order leaves ragged ends that
    padding to the batch's longest then wastes). No sample is split; the result is ordered by
    first sample for determinism (the sampler shuffles anyway).
    """
    order = sorted(range(len(samples)), key=lambda i: (-len(samples[i][0]), i))
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (space left, bin index), sorted
    for i in order:
        size = len(samples[i][0])
        at = bisect.bisect_left(free, (size, -1))
        if at < len(free):
            space, b = free.pop(at)
            bins[b].append(i)
            bisect.insort(free, (space - size, b))
        else:
            bins.append([i])
            bisect.insort(free, (max_len - size, len(bins) - 1))
    packed: list[tuple[list[int], list[int]]] = []
    for members in sorted(bins, key=min):
        ids: list[int] = []
        labels: list[int] = []
        for i in sorted(members):
            ids += samples[i][0]
            labels += samples[i][1]
        packed.append((ids, labels))
    return packed


def causal_features(
    rows: list[dict[str, Any]],
    fmt: str,
    tok: Any,
    *,
    max_len: int,
    overlong: str,
    stride: int,
    packing: bool,
    report: TokenizeReport,
    split: str,
) -> list[dict[str, list[int]]]:
    """Rows in canonical form (see data.py) -> {input_ids, labels} features."""
    samples: list[tuple[list[int], list[int]]] = []
    before = report.samples_out
    for row in rows:
        report.samples_in += 1
        if fmt == "chat":
            ids, labels = encode_chat(tok, row["messages"])
        elif fmt == "instruction":
            convo = [
                {"role": "user", "content": row["prompt"]},
                {"role": "assistant", "content": row["completion"]},
            ]
            ids, labels = encode_chat(tok, convo)
        else:
            ids, labels = encode_text(tok, row["text"])
        for piece_ids, piece_labels in _fit(ids, labels, max_len, overlong, stride, report):
            if all(label == IGNORE for label in piece_labels):
                report.dropped_no_target += 1
                continue
            samples.append((piece_ids, piece_labels))
    if packing:
        samples = pack(samples, max_len)
        report.packed_sequences += len(samples)
    feats = [{"input_ids": i, "labels": lab} for i, lab in samples]
    report.samples_out += len(feats)
    report.tokens += sum(len(i) for i, _ in samples)
    report.target_tokens += sum(sum(1 for x in lab if x != IGNORE) for _, lab in samples)
    report.per_split[split] = {"samples": report.samples_out - before}
    return feats


def classification_features(
    rows: list[dict[str, Any]],
    tok: Any,
    *,
    max_len: int,
    overlong: str,
    report: TokenizeReport,
    split: str,
) -> list[dict[str, Any]]:
    """Rows {text, label} -> {input_ids, label} features."""
    feats: list[dict[str, Any]] = []
    for row in rows:
        report.samples_in += 1
        ids = list(tok(row["text"], add_special_tokens=True)["input_ids"])
        report.longest_sample = max(report.longest_sample, len(ids))
        if len(ids) > max_len:
            if overlong == "drop":
                report.dropped_overlong += 1
                continue
            report.truncated += 1
            # Keep the final [SEP]-style token so the encoder sees a well-formed sequence.
            ids = ids[: max_len - 1] + ids[-1:]
        feats.append({"input_ids": ids, "label": int(row["label"])})
        report.tokens += len(ids)
    report.samples_out += len(feats)
    report.per_split[split] = {"samples": len(feats)}
    return feats


class Collator:
    """Pads a list of features into a batch of tensors (right padding)."""

    def __init__(self, pad_id: int, task: str) -> None:
        self.pad_id = pad_id
        self.task = task

    def __call__(self, feats: list[dict[str, Any]]) -> dict[str, Any]:
        import torch

        width = max(len(f["input_ids"]) for f in feats)
        ids = torch.full((len(feats), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(feats), width), dtype=torch.long)
        batch: dict[str, Any] = {"input_ids": ids, "attention_mask": mask}
        if self.task == "causal-lm":
            labels = torch.full((len(feats), width), IGNORE, dtype=torch.long)
            batch["labels"] = labels
        for row, f in enumerate(feats):
            n = len(f["input_ids"])
            ids[row, :n] = torch.tensor(f["input_ids"], dtype=torch.long)
            mask[row, :n] = 1
            if self.task == "causal-lm":
                labels[row, :n] = torch.tensor(f["labels"], dtype=torch.long)
        if self.task != "causal-lm":
            batch["labels"] = torch.tensor([f["label"] for f in feats], dtype=torch.long)
        return batch
