"""The inference server's pure parts: model card, stop strings, CLI settings, startup errors.

Everything over HTTP, on models the trainer produces in the test, is in
tests/integration/test_serve.py.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("fastapi")

from kubetune_trainer.evaluate.modelcard import (
    ModelCard,
    ModelCardError,
    read_model_card,
    write_model_card,
)
from kubetune_trainer.serve.server import build_parser, main, settings_from_args
from kubetune_trainer.serve.state import ServerState
from kubetune_trainer.serve.streaming import StopBuffer, cut_at_stop

LABELS = ["billing", "technical", "escalate"]


def _card(task: Any, labels: list[str] | None = None, **extra: Any) -> ModelCard:
    return ModelCard(
        task=task,
        base_model="builtin:tiny-llama" if task == "causal-lm" else "builtin:minilm",
        method="full",
        adapter=False,
        labels=labels or [],
        max_seq_length=128,
        data_fingerprint="sha256:test",
        hyperparameters={"learning_rate": 1e-4},
        metrics={"eval_loss": 1.25},
        seed=0,
        created_at="2026-01-01T00:00:00Z",
        kubetune_version="0.1.0",
        **extra,
    )


# ------------------------------------------------------------------------------ model card


def test_model_card_round_trip_and_readme(tmp_path: Path) -> None:
    card = _card("sequence-classification", LABELS, escalation_threshold=0.7)
    write_model_card(tmp_path, card)
    assert read_model_card(tmp_path) == card
    readme = (tmp_path / "README.md").read_text()
    assert "sequence-classification" in readme and "`escalate`" in readme
    assert "eval_loss" in readme and "kubetune.json" in readme


def test_model_card_errors_name_file_and_field(tmp_path: Path) -> None:
    with pytest.raises(ModelCardError, match=r"kubetune\.json.*not found"):
        read_model_card(tmp_path)
    data = _card("causal-lm").model_dump(mode="json")
    data["escalation_threshold"] = 3
    (tmp_path / "kubetune.json").write_text(json.dumps(data))
    with pytest.raises(ModelCardError, match=r"kubetune\.json.*'escalation_threshold'"):
        read_model_card(tmp_path)
    del data["seed"]
    data["escalation_threshold"] = 0.5
    (tmp_path / "kubetune.json").write_text(json.dumps(data))
    with pytest.raises(ModelCardError, match="field 'seed'"):
        read_model_card(tmp_path)
    (tmp_path / "kubetune.json").write_text("{nope")
    with pytest.raises(ModelCardError, match="not valid JSON"):
        read_model_card(tmp_path)
    with pytest.raises(ValueError, match="labels"):
        _card("sequence-classification", [])


# ------------------------------------------------------------------------------ pure helpers


def test_stop_buffer_holds_back_partial_stop_strings() -> None:
    buf = StopBuffer(["</s>", "STOP"])
    assert buf.feed("hello <") == ("hello ", False)
    assert buf.feed("/") == ("", False)
    assert buf.feed("x") == ("</x", False)
    assert buf.feed(" ST") == (" ", False)
    assert buf.feed("OP and more") == ("", True)
    assert cut_at_stop("abcSTOPdef</s>", ["</s>", "STOP"]) == ("abc", True)
    assert cut_at_stop("abc", ["x"]) == ("abc", False)


def test_cli_settings_and_threshold_override() -> None:
    args = build_parser().parse_args(
        ["--model", "/models/support/", "--escalation-threshold", "0.99", "--port", "9000"]
    )
    settings = settings_from_args(args)
    assert settings.model_name == "support" and settings.port == 9000
    state = ServerState(settings=settings, card=_card("sequence-classification", LABELS))
    assert state.threshold() == 0.99
    no_override = settings_from_args(build_parser().parse_args(["--model", "m"]))
    assert ServerState(settings=no_override, card=state.card).threshold() == 0.5


def test_main_rejects_missing_dir_and_bad_card(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["--model", str(tmp_path / "nope")]) == 2
    assert "no such directory" in capsys.readouterr().err
    assert main(["--model", str(tmp_path)]) == 2
    assert "kubetune.json" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--model", str(tmp_path), "--max-concurrency", "0"])
