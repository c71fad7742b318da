"""``builtin:tiny-llama``: a tiny randomly initialised Llama for fast tests of the causal-LM
pipeline, with a byte-level BPE tokenizer trained on ``tiny_corpus.txt`` (package data).

Deterministic: the same corpus, vocabulary size and seed give byte-identical files, so any change
to this recipe (corpus included) must bump the ``tiny-llama`` version tag in ``builtin``.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any

CORPUS_FILE = "tiny_corpus.txt"

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


def corpus() -> str:
    """The tokenizer's training text (support dialogues, prose, a little code)."""
    return (
        resources.files("kubetune_trainer.models").joinpath(CORPUS_FILE).read_text(encoding="utf-8")
    )


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
    lines = corpus().splitlines(keepends=True)
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


def build_tiny_llama(out: Path) -> dict[str, Any]:
    """Fill the empty directory `out` with the model and tokenizer; returns marker info."""
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
