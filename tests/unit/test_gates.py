"""Tests for kubetune_trainer.evaluate.gates: the one place gates are decided."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from typing import Any

from kubetune_trainer.config import EvaluationSpec, GateVerdict
from kubetune_trainer.evaluate.gates import check_gates, gate_records, gates_passed


def spec(**over: Any) -> EvaluationSpec:
    return EvaluationSpec.model_validate(over)


def test_gates_and_must_beat_base() -> None:
    s = spec(
        gates=[
            {"metric": "f1", "op": ">=", "value": 0.5},
            {"metric": "bleu", "op": ">", "value": 1},
        ],
        mustBeatBase=True,
    )
    res = check_gates(
        s, "sequence-classification", {"f1_macro": 0.7, "accuracy": 0.8}, {"accuracy": 0.2}
    )
    assert all(isinstance(r, GateVerdict) for r in res)
    assert [r.passed for r in res] == [True, False, True]
    assert res[0].metric == "f1_macro"  # "f1" names the macro F1 the evaluation reports
    assert res[1].actual is None  # a gate on a metric never computed fails
    assert [r.must_beat_base for r in res] == [False, False, True]
    assert (res[2].metric, res[2].op, res[2].value, res[2].actual) == ("accuracy", ">", 0.2, 0.8)
    assert not gates_passed(res)
    assert gates_passed(res[::2])


def test_must_beat_base_direction_follows_the_metric() -> None:
    # causal-lm compares loss: lower is better.
    res = check_gates(spec(mustBeatBase=True), "causal-lm", {"loss": 2.0}, {"loss": 1.5})
    assert (res[0].metric, res[0].op, res[0].passed) == ("loss", "<", False)
    res = check_gates(spec(mustBeatBase=True), "causal-lm", {"loss": 1.0}, {"loss": 1.5})
    assert res[0].passed
    # No base metrics (compareBase off): cannot be beaten, so the gate fails.
    res = check_gates(spec(mustBeatBase=True), "sequence-classification", {"accuracy": 1.0}, None)
    assert (res[0].value, res[0].passed) == (None, False)


def test_thresholds_are_inclusive_or_strict_as_written() -> None:
    gates = [{"metric": "accuracy", "op": op, "value": 0.8} for op in (">=", ">", "<=", "<")]
    res = check_gates(spec(gates=gates), "sequence-classification", {"accuracy": 0.8}, None)
    assert [r.passed for r in res] == [True, False, True, False]
    nan = check_gates(
        spec(gates=gates[:1]), "sequence-classification", {"accuracy": math.nan}, None
    )
    assert nan[0].passed is False


def test_no_gates_pass() -> None:
    assert check_gates(spec(), "causal-lm", {"loss": 1.0}, None) == []
    assert gates_passed([])


def test_records_keep_the_eval_json_shape() -> None:
    s = spec(gates=[{"metric": "bleu", "op": ">", "value": 1}], mustBeatBase=True)
    records = gate_records(check_gates(s, "causal-lm", {"loss": 1.0}, {"loss": 2.0}))
    assert records == [
        {"metric": "bleu", "op": ">", "value": 1.0, "actual": None, "passed": False},
        {
            "metric": "loss",
            "op": "<",
            "value": 2.0,
            "actual": 1.0,
            "passed": True,
            "mustBeatBase": True,
        },
    ]
    json.dumps(records)


def test_gates_module_is_torch_free() -> None:
    code = (
        "import sys, kubetune_trainer.evaluate.gates;"
        "print(sorted(m for m in ('torch', 'sklearn', 'transformers') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
