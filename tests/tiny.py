"""Tiny random backbones and a tokenizer, built offline from configs (as transformers' own tests do)."""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    GPTNeoXConfig,
    LlamaConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
)

VOCAB = 384
EOS = "<|endoftext|>"
FAMILIES = ("gpt2", "gpt_neox", "llama", "qwen2")

_TEXT = [
    "The quick brown fox jumps over the lazy dog near the river bank.",
    "Question: Tom has 3 apples and buys 4 more. How many apples does he have?\nAnswer: 3 + 4 = 7.\n#### 7",
    "def add(a, b):\n    return a + b\n",
    "In the morning the weather was cold, so the children stayed inside and read books.",
    "Mia walks to the market. She buys bread, milk and 12 eggs for her family.",
    "0123456789 + - * / = ( ) : , . ? ! #",
]


def tiny_config(family: str, hidden: int = 32, layers: int = 2, vocab: int = VOCAB):
    common = {"vocab_size": vocab, "bos_token_id": 0, "eos_token_id": 0, "pad_token_id": 0}
    if family == "gpt2":
        return GPT2Config(n_embd=hidden, n_layer=layers, n_head=4, n_positions=256, **common)
    if family == "gpt_neox":
        return GPTNeoXConfig(
            hidden_size=hidden,
            num_hidden_layers=layers,
            num_attention_heads=4,
            intermediate_size=2 * hidden,
            max_position_embeddings=256,
            **common,
        )
    if family == "llama":
        return LlamaConfig(
            hidden_size=hidden,
            num_hidden_layers=layers,
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=2 * hidden,
            max_position_embeddings=256,
            **common,
        )
    if family == "qwen2":
        return Qwen2Config(
            hidden_size=hidden,
            num_hidden_layers=layers,
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=2 * hidden,
            max_position_embeddings=256,
            **common,
        )
    raise ValueError(family)


def tiny_backbone(family: str = "llama", seed: int = 0, **kwargs) -> torch.nn.Module:
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(tiny_config(family, **kwargs)).eval()


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on a few lines, with EOS as token 0."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB, special_tokens=[EOS], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(_TEXT, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, bos_token=EOS, pad_token=EOS)
    fast.chat_template = (
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}assistant: {% endif %}"
    )
    return fast


def save_tiny_model(directory: Path, family: str = "llama", seed: int = 0, **kwargs) -> Path:
    """A loadable model directory (config, safetensors, tokenizer.json) for AutoModelForCausalLM."""
    tokenizer = tiny_tokenizer()
    model = tiny_backbone(family, seed=seed, vocab=len(tokenizer), **kwargs)
    model.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    return directory
