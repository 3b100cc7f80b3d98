"""A Llama backbone's decode step, written out: what transformers' LlamaForCausalLM computes for one new token per
row over the decoder's slot cache, without its per-layer machinery (the decorators, keyword plumbing and
attention-interface lookups around every layer, attention block and rotary call), on the backbone's own modules.

    h = embed(ids)                                             [B, 1, H]
    cos, sin = rotary(positions)                               [B, 1, D], unsqueezed to [B, 1, 1, D] over heads
    per layer:
        x = input_norm(h)
        q, k, v = q_proj(x), k_proj(x), v_proj(x)              [B, heads or kv, 1, D]
        q, k = q * cos + rotate_half(q) * sin, (same for k)
        keys, values = cache.update(k, v)                      [B, kv, S, D]: the row's column written first
        h = h + o_proj(attention(q, keys, values, mask))       mask [B, 1, 1, S] additive
        h = h + mlp(post_attention_norm(h))                    the routed MLP block (moe.model.routed.RoutedMLP)
    logits = lm_head(norm(h))                                  [B, 1, V]

The same modules and the same ops in the same order as transformers' path with the decoder's attention
(moe.model.kv_cache.cpu_decode_attention), so the logits are bit for bit those of that path (tests/moe/model/
test_llama_decode.py). It saves about 15% of an eager CPU decode forward on the demo model at 16 rows (`python
bench/decode_ops.py`), where a step is bound by the dispatch of small ops, not by arithmetic.

RoutedModel takes it for eager CPU decode steps of a `llama` backbone over a SlotCache, while no plugged expert
adapts attention (moe.model.routed.RoutedAttention decides those experts at the attention input); everything else
(prefill, compiled or captured steps, other families) runs transformers' forward.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.models.llama.modeling_llama import rotate_half

from moe.model.kv_cache import DECODE_ATTENTION, SlotCache, cpu_decode_attention


def llama_decode_applies(backbone: nn.Module) -> bool:
    """Whether `backbone` is a Llama model this forward reproduces: transformers' `llama` classes (one tensor-parallel
    slice, the rotary module computing the positions' cos and sin, one set of q/k/v/o projections per layer)."""
    config = backbone.config
    if getattr(config, "model_type", None) != "llama" or getattr(config, "pretraining_tp", 1) != 1:
        return False
    model = getattr(backbone, "model", None)
    needed = ("embed_tokens", "rotary_emb", "norm", "layers")
    return model is not None and all(hasattr(model, name) for name in needed) and hasattr(backbone, "lm_head")


def llama_decode_step_applies(
    backbone: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    cache: object | None,
    logits_to_keep: int,
) -> bool:
    """Whether this call is a step the written-out forward runs: one token per row on the CPU, eager, over a
    SlotCache with the decoder's 4D additive mask, keeping the last position's logits, with the decoder's attention."""
    return (
        input_ids.shape[1] == 1
        and input_ids.device.type == "cpu"
        and isinstance(cache, SlotCache)
        and attention_mask is not None
        and attention_mask.ndim == 4
        and attention_mask.is_floating_point()
        and logits_to_keep == 1
        and getattr(backbone.config, "_attn_implementation", None) == DECODE_ATTENTION
        and not torch.compiler.is_compiling()
    )


def llama_decode_forward(
    backbone: nn.Module, input_ids: torch.Tensor, position_ids: torch.Tensor, mask: torch.Tensor, cache: SlotCache
) -> torch.Tensor:
    """input_ids [B, 1], position_ids [B, 1], mask [B, 1, 1, S] additive, cache (written at each row's column)
    -> logits [B, 1, V]. The attention block and its projections run unwrapped (RoutedAttention, and LoRA's
    RoutedProjection: their `base_layer`): the caller runs this only while no expert adapts attention, when the
    wrappers pass through; the MLP block runs wrapped (RoutedMLP routes it)."""
    model = backbone.model
    batch = input_ids.shape[0]
    hidden = model.embed_tokens(input_ids)  # [B, 1, H]
    cos, sin = model.rotary_emb(hidden, position_ids=position_ids)  # [B, 1, D]
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # [B, 1, 1, D]: the same angle for every head
    for index, layer in enumerate(model.layers):
        attention = _unwrapped(layer.self_attn)
        x = layer.input_layernorm(hidden)
        shape = (batch, 1, -1, attention.head_dim)
        q = _unwrapped(attention.q_proj)(x).view(shape).transpose(1, 2)  # [B, heads, 1, D]
        k = _unwrapped(attention.k_proj)(x).view(shape).transpose(1, 2)  # [B, kv, 1, D]
        v = _unwrapped(attention.v_proj)(x).view(shape).transpose(1, 2)
        q = (q * cos) + (rotate_half(q) * sin)
        k = (k * cos) + (rotate_half(k) * sin)
        keys, values = cache.layers[index].update(k, v)  # [B, kv, S, D]
        out = cpu_decode_attention(q, keys, values, mask, attention.scaling)  # [B, 1, heads, D]
        hidden = hidden + _unwrapped(attention.o_proj)(out.reshape(batch, 1, -1).contiguous())
        hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
    return backbone.lm_head(model.norm(hidden))


def _unwrapped(module: nn.Module) -> nn.Module:
    """The module a routing wrapper holds (`base_layer`, PEFT's habit), else the module."""
    return getattr(module, "base_layer", module)
