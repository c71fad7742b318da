"""Tests for kubetune_trainer.evaluate.metrics: known values computed by hand."""

from __future__ import annotations

import json
import math

import pytest

from kubetune_trainer.evaluate.metrics import (
    PERPLEXITY_CAP,
    bleu,
    classification_metrics,
    compare,
    perplexity,
)


def test_classification_hand_computed() -> None:
    labels = ["neg", "pos", "neu"]
    gold = [0, 0, 0, 1, 1, 2]
    pred = [0, 0, 1, 1, 1, 0]
    m = classification_metrics(pred, gold, labels)
    # 4 of 6 correct.
    assert m["accuracy"] == pytest.approx(4 / 6)
    # neg: tp=2 fp=1 fn=1 -> p=2/3 r=2/3 f1=2/3
    # pos: tp=2 fp=1 fn=0 -> p=2/3 r=1 f1=0.8
    # neu: tp=0 fp=0 fn=1 -> p=0 (zero_division) r=0 f1=0
    pc = m["per_class"]
    assert pc["neg"] == pytest.approx(
        {"precision": 2 / 3, "recall": 2 / 3, "f1": 2 / 3, "support": 3}
    )
    assert pc["pos"] == pytest.approx({"precision": 2 / 3, "recall": 1.0, "f1": 0.8, "support": 2})
    assert pc["neu"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1}
    assert m["f1_macro"] == pytest.approx((2 / 3 + 0.8 + 0.0) / 3)
    # rows: true class, columns: predicted class
    assert m["confusion_matrix"] == [[2, 1, 0], [0, 2, 0], [1, 0, 0]]
    json.dumps(m)  # plain Python types only, ready for eval.json


def test_classification_perfect_and_absent_class() -> None:
    m = classification_metrics([0, 1, 1], [0, 1, 1], ["a", "b", "c"])
    assert m["accuracy"] == 1.0
    # "c" never occurs: it does not drag the macro average down...
    assert m["f1_macro"] == 1.0
    # ...but is still listed.
    assert m["per_class"]["c"]["support"] == 0
    assert m["confusion_matrix"][2] == [0, 0, 0]


def test_classification_empty_and_invalid() -> None:
    m = classification_metrics([], [], ["a", "b"])
    assert m["accuracy"] == 0.0 and m["f1_macro"] == 0.0
    assert m["confusion_matrix"] == [[0, 0], [0, 0]]
    with pytest.raises(ValueError, match="items"):
        classification_metrics([0], [0, 1], ["a", "b"])
    with pytest.raises(ValueError, match="outside"):
        classification_metrics([0, 2], [0, 1], ["a", "b"])


def test_perplexity() -> None:
    assert perplexity(0.0) == 1.0
    assert perplexity(1.0) == pytest.approx(math.e)
    assert perplexity(1e6) == PERPLEXITY_CAP
    assert perplexity(float("inf")) == PERPLEXITY_CAP
    assert perplexity(float("nan")) == PERPLEXITY_CAP
    assert perplexity(math.log(PERPLEXITY_CAP) - 1) < PERPLEXITY_CAP


def test_bleu() -> None:
    refs = ["the cat sat on the mat today", "a quick brown fox jumps over the dog"]
    assert bleu(list(refs), refs) == pytest.approx(100.0)
    disjoint = ["zebra yacht xylophone walrus violin", "umbrella tangerine saxophone radish q"]
    assert bleu(disjoint, refs) == pytest.approx(0.0, abs=1e-6)
    partial = bleu(
        ["the cat sat on the mat yesterday", "a quick brown fox jumps over the dog"], refs
    )
    assert 0.0 < partial < 100.0
    assert bleu([], []) == 0.0
    with pytest.raises(ValueError):
        bleu(["a"], [])


def test_compare_directions() -> None:
    base = {"loss": 2.0, "perplexity": 7.4, "accuracy": 0.5, "f1_macro": 0.4, "bleu": 10.0}
    tuned = {"loss": 1.0, "perplexity": 8.0, "accuracy": 0.9, "f1_macro": 0.4, "bleu": 5.0}
    c = compare(base, tuned)
    assert c["loss"] == {"base": 2.0, "tuned": 1.0, "delta": -1.0, "improved": True}
    assert c["perplexity"]["improved"] is False  # went up: worse
    assert c["accuracy"]["improved"] is True
    assert c["accuracy"]["delta"] == pytest.approx(0.4)
    assert c["f1_macro"]["improved"] is False  # unchanged is not an improvement
    assert c["bleu"]["improved"] is False


def test_compare_skips_missing_and_nested() -> None:
    base = {"loss": 1.0, "accuracy": 0.5, "per_class": {"a": 1}}
    tuned = {"loss": 0.5, "bleu": 3.0, "per_class": {"a": 2}}
    assert set(compare(base, tuned)) == {"loss"}  # type: ignore[arg-type]


def test_compare_uses_the_one_lower_is_better_set() -> None:
    from kubetune_trainer.config import LOWER_IS_BETTER
    from kubetune_trainer.evaluate import metrics

    assert not hasattr(metrics, "LOWER_IS_BETTER")  # config's set is the only one
    for name in [*LOWER_IS_BETTER, "val_loss"]:  # and any *_loss
        assert compare({name: 2.0}, {name: 1.0})[name]["improved"] is True
    assert compare({"accuracy": 2.0}, {"accuracy": 1.0})["accuracy"]["improved"] is False
