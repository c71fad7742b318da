"""Evaluation gates, decided once, here in the trainer.

eval.json, the `kubetune run` summary and the termination message all carry these verdicts; the
operator reports them and never recomputes them (it has no base metrics for `mustBeatBase`).
Pure and torch-free.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from kubetune_trainer.config import EvaluationSpec, GateVerdict, lower_is_better, primary_metric

# Gates may name macro F1 "f1"; the final evaluation reports it as "f1_macro".
_METRIC_ALIASES = {"f1": "f1_macro"}


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def check_gates(
    spec: EvaluationSpec,
    task: str,
    tuned: Mapping[str, Any],
    base: Mapping[str, Any] | None,
) -> list[GateVerdict]:
    """Each gate against the fine-tuned metrics, then `mustBeatBase` when asked for.

    A gate on a metric that was not computed fails, with actual None; so does `mustBeatBase`
    without base metrics.
    """
    verdicts: list[GateVerdict] = []
    for gate in spec.gates:
        name = _METRIC_ALIASES.get(gate.metric, gate.metric)
        actual = _number(tuned.get(name))
        passed = actual is not None and gate.passes(actual)
        verdicts.append(
            GateVerdict(metric=name, op=gate.op, value=gate.value, actual=actual, passed=passed)
        )
    if spec.must_beat_base:
        verdicts.append(_beat_base(task, tuned, base))
    return verdicts


def _beat_base(task: str, tuned: Mapping[str, Any], base: Mapping[str, Any] | None) -> GateVerdict:
    name = primary_metric(task)
    lower = lower_is_better(name)
    mine, theirs = _number(tuned.get(name)), _number((base or {}).get(name))
    passed = False
    if mine is not None and theirs is not None:
        passed = mine < theirs if lower else mine > theirs
    return GateVerdict(
        metric=name,
        op="<" if lower else ">",
        value=theirs,
        actual=mine,
        passed=passed,
        must_beat_base=True,
    )


def gates_passed(verdicts: Sequence[GateVerdict]) -> bool:
    return all(v.passed for v in verdicts)


def gate_records(verdicts: Sequence[GateVerdict]) -> list[dict[str, Any]]:
    """The verdicts as eval.json lists them: `mustBeatBase` only on the mustBeatBase gate,
    `value` and `actual` always present (null when unknown)."""
    return [
        v.model_dump(by_alias=True, exclude=None if v.must_beat_base else {"must_beat_base"})
        for v in verdicts
    ]
