"""Real model shapes with random weights, for benchmarks: built from configs, nothing downloaded.

build(shape, device, dtype) -> a frozen HF causal LM of that shape, weights random (seed 0)
"""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig, Qwen2Config

SHAPES = {
    "gpt2-124m": lambda: GPT2Config(n_embd=768, n_layer=12, n_head=12, vocab_size=50257, n_positions=1024),
    "qwen2.5-0.5b": lambda: Qwen2Config(
        hidden_size=896,
        intermediate_size=4864,
        num_hidden_layers=24,
        num_attention_heads=14,
        num_key_value_heads=2,
        vocab_size=151936,
        max_position_embeddings=32768,
        rope_theta=1000000.0,
        tie_word_embeddings=True,
    ),
    "llama-3.2-1b": lambda: LlamaConfig(
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=64,
        vocab_size=128256,
        max_position_embeddings=131072,
        rope_theta=500000.0,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 32.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
        tie_word_embeddings=True,
    ),
    "qwen2.5-7b": lambda: Qwen2Config(
        hidden_size=3584,
        intermediate_size=18944,
        num_hidden_layers=28,
        num_attention_heads=28,
        num_key_value_heads=4,
        vocab_size=152064,
        max_position_embeddings=32768,
        rope_theta=1000000.0,
        tie_word_embeddings=False,
    ),
}

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def build(shape: str, device: str = "cpu", dtype: str = "float32", seed: int = 0) -> torch.nn.Module:
    """A random-weight model of a named shape, created directly on `device` in `dtype`, in eval mode."""
    config = SHAPES[shape]()
    config.pad_token_id = config.eos_token_id = config.bos_token_id = 0
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=DTYPES[dtype])
    return model.eval().requires_grad_(False)


def mlp_down_projection(shape: str) -> str:
    """The MLP's output projection, where a PEFT LoRA goes (module name suffix)."""
    return "mlp.c_proj" if shape.startswith("gpt2") else "down_proj"
