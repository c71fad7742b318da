"""Tests for kubetune_trainer.train.early_stopping."""

from __future__ import annotations

import pytest

from kubetune_trainer.config import EarlyStoppingSpec
from kubetune_trainer.train.early_stopping import EarlyStopping


def es(**over: object) -> EarlyStopping:
    return EarlyStopping.from_spec(EarlyStoppingSpec.model_validate({"enabled": True, **over}))


def test_stops_after_patience_evaluations_without_improvement() -> None:
    stop = es(metric="loss", patience=2)
    assert stop.lower_is_better
    assert [stop.update(v) for v in (1.0, 0.8, 0.9, 0.85)] == [False, False, False, True]
    assert stop.best == 0.8 and stop.evals_without_improvement == 2


def test_an_improvement_resets_the_count() -> None:
    stop = es(metric="loss", patience=2)
    assert [stop.update(v) for v in (1.0, 1.1, 0.5, 0.6)] == [False, False, False, False]
    assert stop.evals_without_improvement == 1
    assert stop.update(0.7)


def test_min_delta() -> None:
    stop = es(metric="loss", patience=1, minDelta=0.1)
    stop.update(1.0)
    assert not stop.improved(0.95)  # better, but by less than minDelta
    assert stop.improved(0.85)
    assert stop.update(0.95)


@pytest.mark.parametrize("metric", ["accuracy", "f1", "f1_macro"])
def test_higher_is_better_metrics_maximise(metric: str) -> None:
    stop = es(metric=metric, mode="max", patience=1)
    assert not stop.lower_is_better
    assert not stop.update(0.5)
    assert not stop.update(0.7)
    assert stop.update(0.6)
    assert stop.best == 0.7


def test_direction_comes_from_the_metric_when_mode_is_unset() -> None:
    # An unset mode takes the metric's direction: accuracy is maximised, perplexity minimised.
    stop = es(metric="accuracy", patience=1)
    assert not stop.lower_is_better
    assert not stop.update(0.5)
    assert stop.update(0.4)
    assert es(metric="perplexity").lower_is_better


def test_observe_picks_the_watched_metric() -> None:
    stop = es(metric="f1_macro", mode="max", patience=1)
    # Validation reports macro F1 as "f1".
    assert not stop.observe({"loss": 0.3, "accuracy": 0.9, "f1": 0.8})
    assert stop.best == 0.8
    with pytest.raises(ValueError, match=r"not computed.*accepted: accuracy, loss"):
        es(metric="perplexity").observe({"loss": 1.0, "accuracy": 0.5})


def test_resumes_from_checkpointed_state() -> None:
    spec = EarlyStoppingSpec(enabled=True, metric="loss", patience=3)
    stop = EarlyStopping.from_spec(spec, best=0.5, evals_without_improvement=2)
    assert stop.update(0.6)  # the third evaluation in a row without improvement
