"""Model loading and the blocking inference calls behind the HTTP server.

Everything here runs in worker threads (never on the event loop), and is the only serve module
that imports torch and transformers, so the HTTP server can start listening before they load.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import logging
import threading
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    StoppingCriteria,
    StoppingCriteriaList,
    TextIteratorStreamer,
)

from kubetune_trainer.evaluate.modelcard import ModelCard, resolve_base_model
from kubetune_trainer.serve.streaming import cut_at_stop

log = logging.getLogger(__name__)

FinishReason = Literal["stop", "length"]


class PromptTooLongError(ValueError):
    """The prompt plus the requested tokens do not fit the model's context."""


@dataclass(frozen=True)
class GenerationParams:
    max_tokens: int
    temperature: float
    top_p: float
    stops: list[str]


@dataclass(frozen=True)
class GenerationResult:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: FinishReason


def _load_weights(auto_cls: Any, model_dir: Path, card: ModelCard, **kwargs: Any) -> Any:
    """Complete weights, or an adapter applied to (and merged into) its base model."""
    if not card.adapter:
        return auto_cls.from_pretrained(str(model_dir), dtype=torch.float32, **kwargs)
    from peft import PeftModel  # only adapters need peft

    base_dir = resolve_base_model(model_dir, card)
    base = auto_cls.from_pretrained(str(base_dir), dtype=torch.float32, **kwargs)
    # Merging once at load time makes each forward pass as cheap as a full model's.
    return PeftModel.from_pretrained(base, str(model_dir)).merge_and_unload()


class _StopOnEvent(StoppingCriteria):
    """Stops generation when the request is cancelled (client gone) or a stop string appears."""

    def __init__(
        self, cancel: threading.Event, tokenizer: Any, prompt_len: int, stops: list[str]
    ) -> None:
        self.cancel = cancel
        self.tokenizer = tokenizer
        self.prompt_len = prompt_len
        self.stops = stops
        # A stop string spans at most this many tokens (each token decodes to >= 1 char).
        self.window = max((len(s) for s in stops), default=0) + 2

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> Any:
        done = self.cancel.is_set()
        if not done and self.stops:
            start = max(self.prompt_len, input_ids.shape[1] - self.window)
            tail = self.tokenizer.decode(input_ids[0, start:], skip_special_tokens=True)
            done = any(s in tail for s in self.stops)
        return torch.full((input_ids.shape[0],), done, dtype=torch.bool, device=input_ids.device)


class _PushStreamer(TextIteratorStreamer):
    """TextIteratorStreamer that hands text to a callback instead of a blocking queue."""

    def __init__(self, tokenizer: Any, on_text: Callable[[str], None]) -> None:
        super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
        self._on_text = on_text

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        if text:
            self._on_text(text)


def pick_device(name: str) -> torch.device:
    """``auto`` means the GPU when there is one."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


class CausalLMEngine:
    task: Literal["causal-lm"] = "causal-lm"

    def __init__(self, model_dir: Path, card: ModelCard, device: str = "auto") -> None:
        from kubetune_trainer.tokenization import CHATML_TEMPLATE

        self.tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
        if not self.tokenizer.chat_template:
            # Same fallback the trainer uses, so serving matches training.
            self.tokenizer.chat_template = CHATML_TEMPLATE
        self.device = pick_device(device)
        self.model = _load_weights(AutoModelForCausalLM, model_dir, card).to(self.device).eval()
        config = self.model.config
        self.context_length = int(
            getattr(config, "max_position_embeddings", None) or self.tokenizer.model_max_length
        )
        eos = self.model.generation_config.eos_token_id
        eos_list = eos if isinstance(eos, list) else [eos]
        self.eos_ids = {int(e) for e in eos_list if e is not None}
        pad = self.model.generation_config.pad_token_id
        if pad is None:
            pad = self.tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else (min(self.eos_ids) if self.eos_ids else 0)

    def encode_chat(self, messages: list[dict[str, str]]) -> list[int]:
        # sanitize_control_tokens: special tokens typed by a user stay plain text, so a message
        # cannot forge a system turn.
        ids = self.tokenizer.apply_chat_template(
            messages,
            add_generation_prompt=True,
            tokenize=True,
            return_dict=False,
            sanitize_control_tokens=True,
        )
        assert isinstance(ids, list)  # return_dict=False, one conversation: a list of ids
        return [int(i) for i in ids]  # type: ignore[arg-type]

    def encode_prompt(self, prompt: str) -> list[int]:
        ids: list[int] = self.tokenizer(prompt)["input_ids"]
        return [int(i) for i in ids]

    def check_fits(self, prompt_len: int, max_tokens: int | None, limit: int) -> int:
        """The number of tokens to generate; raises PromptTooLongError when nothing fits."""
        room = self.context_length - prompt_len
        if room < 1 or (max_tokens is not None and max_tokens > room):
            want = max_tokens or 1
            raise PromptTooLongError(
                f"the prompt has {prompt_len} tokens and {want} more were requested, but the "
                f"model's context is {self.context_length} tokens"
            )
        return min(max_tokens or limit, room, limit)

    def generate(
        self,
        prompt_ids: list[int],
        params: GenerationParams,
        cancel: threading.Event,
        on_text: Callable[[str], None] | None = None,
    ) -> GenerationResult:
        """Blocking generation of one completion; call it from a worker thread."""
        input_ids = torch.tensor([prompt_ids], dtype=torch.long, device=self.device)
        gen_config = copy.deepcopy(self.model.generation_config)
        gen_config.max_new_tokens = params.max_tokens
        gen_config.max_length = None
        gen_config.pad_token_id = self.pad_id
        # Below 1e-4 sampling is greedy in all but name, and a far tinier temperature (5e-324
        # is valid JSON) turns the logits into inf/nan and fails the request: decode greedily.
        gen_config.do_sample = params.temperature >= 1e-4
        if gen_config.do_sample:
            gen_config.temperature = params.temperature
            gen_config.top_p = params.top_p
            gen_config.top_k = None
        else:  # greedy: sampling knobs would only trigger warnings
            gen_config.temperature = None
            gen_config.top_p = None
            gen_config.top_k = None
        criteria = StoppingCriteriaList(
            [_StopOnEvent(cancel, self.tokenizer, len(prompt_ids), params.stops)]
        )
        streamer = _PushStreamer(self.tokenizer, on_text) if on_text is not None else None
        with torch.inference_mode():
            output = self.model.generate(
                input_ids=input_ids,
                attention_mask=torch.ones_like(input_ids),
                generation_config=gen_config,
                stopping_criteria=criteria,
                streamer=streamer,
            )
        new_ids: list[int] = output[0, len(prompt_ids) :].tolist()
        text, stopped = cut_at_stop(
            str(self.tokenizer.decode(new_ids, skip_special_tokens=True)), params.stops
        )
        hit_eos = bool(new_ids) and new_ids[-1] in self.eos_ids
        ran_out = len(new_ids) >= params.max_tokens and not (stopped or hit_eos)
        finish: FinishReason = "length" if ran_out else "stop"
        return GenerationResult(text, len(prompt_ids), len(new_ids), finish)


@dataclass(frozen=True)
class ClassifyOutput:
    probabilities: list[float]
    tokens: int


class ClassifierEngine:
    task: Literal["sequence-classification"] = "sequence-classification"

    def __init__(self, model_dir: Path, card: ModelCard, device: str = "auto") -> None:
        self.tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
        self.device = pick_device(device)
        self.model = (
            _load_weights(
                AutoModelForSequenceClassification, model_dir, card, num_labels=len(card.labels)
            )
            .to(self.device)
            .eval()
        )
        self.labels = list(card.labels)
        self.max_length = min(card.max_seq_length, int(self.tokenizer.model_max_length))
        n_out = int(self.model.config.num_labels)
        if n_out != len(self.labels):
            raise ValueError(
                f"the model has {n_out} outputs but kubetune.json lists {len(self.labels)} labels"
            )

    def classify(self, texts: list[str]) -> list[ClassifyOutput]:
        """One forward pass over a batch; call it from a worker thread."""
        batch = self.tokenizer(
            texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
        )
        lengths = batch["attention_mask"].sum(dim=1).tolist()
        with torch.inference_mode():
            logits = self.model(**batch.to(self.device)).logits
            probs = torch.softmax(logits.float(), dim=-1).cpu()
        return [
            ClassifyOutput([float(p) for p in row], int(n))
            for row, n in zip(probs.tolist(), lengths, strict=True)
        ]


Engine = CausalLMEngine | ClassifierEngine


def load_engine(model_dir: Path, card: ModelCard, device: str = "auto") -> Engine:
    torch.set_grad_enabled(False)
    if card.task == "causal-lm":
        return CausalLMEngine(model_dir, card, device)
    return ClassifierEngine(model_dir, card, device)


@dataclass
class _Item:
    text: str
    future: asyncio.Future[ClassifyOutput]


class MicroBatcher:
    """Collects concurrent classify calls into one forward pass.

    A batch closes when it holds ``max_batch`` texts or ``max_wait_s`` after its first text
    arrived. Only one forward pass runs at a time, so texts arriving meanwhile pile up and form
    the next batch: under load batches fill without extra waiting.
    """

    def __init__(
        self,
        engine: ClassifierEngine,
        executor: Executor,
        max_batch: int,
        max_wait_s: float,
        on_depth: Callable[[int], None] = lambda _: None,
        on_batch: Callable[[int], None] = lambda _: None,
    ) -> None:
        self._engine = engine
        self._executor = executor
        self._max_batch = max_batch
        self._max_wait_s = max_wait_s
        self._queue: asyncio.Queue[_Item] = asyncio.Queue()
        self._on_depth = on_depth
        self._on_batch = on_batch
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="micro-batcher")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def classify(self, texts: list[str]) -> list[ClassifyOutput]:
        loop = asyncio.get_running_loop()
        items = [_Item(t, loop.create_future()) for t in texts]
        for item in items:
            self._queue.put_nowait(item)
        self._on_depth(self._queue.qsize())
        return list(await asyncio.gather(*(item.future for item in items)))

    async def _next_batch(self) -> list[_Item]:
        batch = [await self._queue.get()]
        deadline = asyncio.get_running_loop().time() + self._max_wait_s
        while len(batch) < self._max_batch:
            if not self._queue.empty():
                batch.append(self._queue.get_nowait())
                continue
            remaining = deadline - asyncio.get_running_loop().time()
            if remaining <= 0:
                break
            try:
                batch.append(await asyncio.wait_for(self._queue.get(), remaining))
            except TimeoutError:
                break
        return batch

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [item for item in await self._next_batch() if not item.future.done()]
            self._on_depth(self._queue.qsize())
            if not batch:
                continue
            self._on_batch(len(batch))
            try:
                outputs = await loop.run_in_executor(
                    self._executor, self._engine.classify, [item.text for item in batch]
                )
            except Exception as exc:  # a model fault fails this batch, not the server
                log.exception("classification batch of %d failed", len(batch))
                for item in batch:
                    if not item.future.done():
                        item.future.set_exception(exc)
                continue
            for item, out in zip(batch, outputs, strict=True):
                if not item.future.done():  # the caller may have gone away
                    item.future.set_result(out)
