"""Tokenization on the locally built tiny Llama: chat masking, overlong policies, packing."""

from __future__ import annotations

from typing import Any

import pytest

from kubetune_trainer.config import ModelSpec
from kubetune_trainer.models.builtin import resolve_builtin
from kubetune_trainer.tokenization import (
    IGNORE,
    Collator,
    TokenizeReport,
    causal_features,
    classification_features,
    encode_chat,
    load_tokenizer,
    pack,
)

CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "My printer is jammed"},
    {"role": "assistant", "content": "Open tray 2 and remove the paper."},
    {"role": "user", "content": "Done"},
    {"role": "assistant", "content": "Great, print a test page."},
]


@pytest.fixture(scope="module")
def tok() -> Any:
    return load_tokenizer(resolve_builtin("tiny-llama"), ModelSpec(source="builtin:tiny-llama"))


def test_chat_loss_counts_only_assistant_tokens(tok: Any) -> None:
    ids, labels = encode_chat(tok, CHAT)
    target = tok.decode([i for i, lab in zip(ids, labels, strict=True) if lab != IGNORE])
    assert "Open tray 2 and remove the paper." in target
    assert "Great, print a test page." in target
    assert "printer is jammed" not in target
    assert "Be brief" not in target


def test_extra_special_tokens_are_single_tokens() -> None:
    spec = ModelSpec(source="builtin:tiny-llama", extra_special_tokens=["<|ticket|>"])
    t = load_tokenizer(resolve_builtin("tiny-llama"), spec)
    assert len(t("<|ticket|>", add_special_tokens=False)["input_ids"]) == 1


@pytest.mark.parametrize("policy", ["truncate", "chunk", "drop"])
def test_overlong_policies(tok: Any, policy: str) -> None:
    report = TokenizeReport(max_length=16)
    feats = causal_features(
        [{"messages": CHAT}],
        "chat",
        tok,
        max_len=16,
        overlong=policy,
        stride=4,
        packing=False,
        report=report,
        split="train",
    )
    assert all(len(f["input_ids"]) <= 16 for f in feats)
    if policy == "drop":
        assert feats == [] and report.dropped_overlong == 1
    elif policy == "truncate":
        assert report.truncated == 1
    else:
        assert report.chunked == 1 and report.chunks_created >= 3
        # Overlapping tokens are context in the later chunk, never a second target.
        targets = sum(sum(1 for x in f["labels"] if x != IGNORE) for f in feats)
        _, full_labels = encode_chat(tok, CHAT)
        assert targets == sum(1 for x in full_labels if x != IGNORE)


def test_packing_fills_sequences_without_losing_tokens(tok: Any) -> None:
    samples = [([1] * 5, [1] * 5), ([2] * 6, [2] * 6), ([3] * 7, [3] * 7)]
    packed = pack(samples, 12)
    # Best fit decreasing: 7 and 5 fill one sequence exactly; in order, 5+6 | 7 would pad 6.
    assert [len(i) for i, _ in packed] == [12, 6]
    assert packed[0][0] == [1] * 5 + [3] * 7  # whole samples, in their original order
    assert sum(len(i) for i, _ in packed) == 18


def test_packing_keeps_every_sample_whole_and_within_the_limit() -> None:
    import random

    rng = random.Random(7)
    samples = [([k] * n, [k] * n) for k, n in enumerate(rng.randint(20, 300) for _ in range(400))]
    packed = pack(samples, 512)
    assert all(len(ids) <= 512 for ids, _ in packed)
    flat = sorted(t for ids, _ in packed for t in ids)
    assert flat == sorted(t for ids, _ in samples for t in ids)
    for ids, labels in packed:  # each sample's tokens sit together
        assert ids == labels
        runs = [k for i, k in enumerate(ids) if i == 0 or ids[i - 1] != k]
        assert len(runs) == len(set(runs))
    fill = sum(len(i) for i, _ in packed) / (512 * len(packed))
    assert fill > 0.95, fill


def test_classification_truncation_keeps_last_token(tok: Any) -> None:
    report = TokenizeReport()
    feats = classification_features(
        [{"text": "word " * 50, "label": 1}],
        tok,
        max_len=10,
        overlong="truncate",
        report=report,
        split="train",
    )
    full = tok("word " * 50)["input_ids"]
    assert len(feats[0]["input_ids"]) == 10 and feats[0]["input_ids"][-1] == full[-1]


def test_collator_pads_and_masks(tok: Any) -> None:
    batch = Collator(0, "causal-lm")(
        [
            {"input_ids": [5, 6, 7], "labels": [IGNORE, 6, 7]},
            {"input_ids": [8], "labels": [8]},
        ]
    )
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[IGNORE, 6, 7], [8, IGNORE, IGNORE]]
