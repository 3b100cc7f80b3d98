"""Tiny random backbones, a tokenizer and experts, built offline from configs (as transformers' own tests do)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    GPT2Config,
    GPTNeoXConfig,
    LlamaConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
)

from moe import Expert
from moe.adapters.lora import LoraAdapter, LoraPair

VOCAB = 384
HIDDEN = 32  # tiny_config's default hidden size
EOS = "<|endoftext|>"
FAMILIES = ("gpt2", "gpt_neox", "llama", "qwen2")
# the other rows of moe.model.backbone.FAMILIES (Llama-like blocks; phi3 fuses gate and up): tiny_config builds them too
MORE_FAMILIES = ("qwen3", "mistral", "gemma", "gemma2", "phi3", "olmo", "olmo2", "smollm3")

_TEXT = [
    "The quick brown fox jumps over the lazy dog near the river bank.",
    "Question: Tom has 3 apples and buys 4 more. How many apples does he have?\nAnswer: 3 + 4 = 7.\n#### 7",
    "def add(a, b):\n    return a + b\n",
    "In the morning the weather was cold, so the children stayed inside and read books.",
    "Mia walks to the market. She buys bread, milk and 12 eggs for her family.",
    "0123456789 + - * / = ( ) : , . ? ! #",
]


def tiny_config(family: str, hidden: int = HIDDEN, layers: int = 2, vocab: int = VOCAB):
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
    if family in MORE_FAMILIES:
        return AutoConfig.for_model(
            family,
            hidden_size=hidden,
            num_hidden_layers=layers,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=hidden // 4,
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


def tiny_expert(
    name: str,
    *,
    seed: int = 0,
    hidden: int = HIDDEN,
    layers: Sequence[int] = (0, 1),
    rank: int = 4,
    up_scale: float = 0.5,
    threshold: float | None = None,
    offset: float = 0.0,
    description: str = "",
    examples: tuple[str, ...] = (),
    metadata: dict | None = None,
) -> Expert:
    """A small random expert (the one factory every test uses), seeded: the same arguments give the same tensors.

    up_scale: `up` is drawn N(0, up_scale^2) after Expert.fresh's draws, from the same generator, so the
        adapter changes outputs; 0 keeps Expert.fresh's zero `up` (an adapter that changes nothing).
    threshold: every layer's gate threshold; None keeps Expert.fresh's closed gate (2.0, above any cosine);
        -2.0 opens it on every token (it wins everything it may in token mode).
    """
    generator = torch.Generator().manual_seed(seed)
    expert = Expert.fresh(name, hidden, list(layers), rank=rank, generator=generator)
    if up_scale:
        expert.up = torch.randn(expert.up.shape, generator=generator) * up_scale
    if threshold is not None:
        expert.thresholds = torch.full_like(expert.thresholds, threshold)
    expert.offsets = torch.full_like(expert.offsets, offset)
    expert.description, expert.examples = description, tuple(examples)
    expert.metadata = dict(metadata or {})
    return expert


def tiny_lora_expert(
    name: str,
    shapes: dict[str, tuple[int, int]],
    *,
    seed: int = 0,
    hidden: int = HIDDEN,
    layers: Sequence[int] = (0, 1),
    rank: int | dict[str, int] = 4,
    scale: float = 0.5,
    targets: Sequence[str] | None = None,
    threshold: float | None = None,
    offset: float = 0.0,
    examples: tuple[str, ...] = (),
) -> Expert:
    """A small random LoRA expert (seeded) for projections {name: (in, out)} (RoutedModel.projection_shapes).

    rank: one rank, or one per projection; scale: the std of A and B (B is not zero: the expert changes outputs);
    scaling per layer 2.0, 1.5, ... (not 1, so a forgotten scaling shows); targets: a subset of `shapes`;
    threshold/offset as in tiny_expert (None: the gate stays closed).
    """
    generator = torch.Generator().manual_seed(seed)
    n = len(layers)
    pairs = {}
    for p in targets or list(shapes):
        d_in, d_out = shapes[p]
        r = rank[p] if isinstance(rank, dict) else rank
        a = torch.randn(n, r, d_in, generator=generator) * scale
        b = torch.randn(n, d_out, r, generator=generator) * scale
        pairs[p] = LoraPair(a, b, torch.tensor([2.0 - 0.5 * i for i in range(n)]))
    gate = Expert.closed_gate(n, hidden, generator)
    expert = Expert(name=name, layers=tuple(layers), adapter=LoraAdapter(pairs), **gate, examples=tuple(examples))
    if threshold is not None:
        expert.thresholds = torch.full_like(expert.thresholds, threshold)
    expert.offsets = torch.full_like(expert.offsets, offset)
    return expert
