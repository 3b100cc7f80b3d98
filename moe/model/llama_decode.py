"""A Llama backbone's decode step, written out: what transformers' LlamaForCausalLM computes for one new token per
row over the decoder's slot cache, without its per-layer machinery (the decorators, keyword plumbing and
attention-interface lookups around every layer, attention block and rotary call), on the backbone's own modules.
Qwen2's and Mistral's decoders are Llama's but for Qwen2's q/k/v biases (computed here too) and a sliding window
(refused here): they run it as well (LLAMA_FAMILIES).

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

The same modules and the same arithmetic as transformers' path with the decoder's attention
(moe.model.kv_cache.cpu_decode_attention), so the logits are bit for bit those of that path (tests/moe/model/
test_llama_decode.py). It saves about 15% of an eager CPU decode forward on the demo model at 16 rows (`python
bench/decode_ops.py`), where a step is bound by the dispatch of small ops, not by arithmetic. A float32 RMSNorm is
one call of torch's rms_norm where transformers' module makes seven (torch's composite dispatches the same ops in the
same order from C++: the same numbers, fewer Python-to-C++ crossings).

RoutedModel takes it for eager CPU decode steps of a backbone of LLAMA_FAMILIES over a SlotCache, while no plugged
expert adapts attention (moe.model.routed.RoutedAttention decides those experts at the attention input); everything
else (prefill, compiled or captured steps, other families) runs transformers' forward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers.models.llama.modeling_llama import LlamaRMSNorm, rotate_half
from transformers.models.mistral.modeling_mistral import MistralRMSNorm
from transformers.models.qwen2.modeling_qwen2 import Qwen2RMSNorm

from moe.model.kv_cache import DECODE_ATTENTION, SlotCache, cpu_decode_attention

# the families whose decoder is Llama's: embedding, rotary angles, layers of RMSNorm, q/k/v/o attention and an MLP
# block, a final RMSNorm and the head, each attention block computing LlamaAttention's maths without a sliding window
LLAMA_FAMILIES = ("llama", "qwen2", "mistral")
_RMS_NORMS = (LlamaRMSNorm, Qwen2RMSNorm, MistralRMSNorm)  # one forward, source for source


def llama_decode_applies(backbone: nn.Module) -> bool:
    """Whether `backbone` is a model this forward reproduces: transformers' classes of one of LLAMA_FAMILIES (one
    tensor-parallel slice, the rotary module computing the positions' cos and sin, one set of q/k/v/o projections per
    layer, no sliding window on any layer)."""
    config = backbone.config
    if getattr(config, "model_type", None) not in LLAMA_FAMILIES or getattr(config, "pretraining_tp", 1) != 1:
        return False
    if getattr(config, "sliding_window", None) is not None:  # Mistral's window (Qwen2's is None unless it is used)
        return False
    model = getattr(backbone, "model", None)
    needed = ("embed_tokens", "rotary_emb", "norm", "layers")
    if model is None or not all(hasattr(model, name) for name in needed) or not hasattr(backbone, "lm_head"):
        return False
    return all(getattr(_unwrapped(layer.self_attn), "sliding_window", None) is None for layer in model.layers)


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
        x = _norm(layer.input_layernorm, hidden)
        shape = (batch, 1, -1, attention.head_dim)
        q = _unwrapped(attention.q_proj)(x).view(shape).transpose(1, 2)  # [B, heads, 1, D]
        k = _unwrapped(attention.k_proj)(x).view(shape).transpose(1, 2)  # [B, kv, 1, D]
        v = _unwrapped(attention.v_proj)(x).view(shape).transpose(1, 2)
        q = (q * cos) + (rotate_half(q) * sin)
        k = (k * cos) + (rotate_half(k) * sin)
        keys, values = cache.layers[index].update(k, v)  # [B, kv, S, D]
        out = cpu_decode_attention(q, keys, values, mask, attention.scaling)  # [B, 1, heads, D]
        hidden = hidden + _unwrapped(attention.o_proj)(out.reshape(batch, 1, -1).contiguous())
        hidden = hidden + layer.mlp(_norm(layer.post_attention_layernorm, hidden))
    return backbone.lm_head(_norm(model.norm, hidden))


def _norm(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """transformers' Llama RMSNorm (_RMS_NORMS) of float32 `x` as one call of torch's rms_norm (the same mean of
    squares, rsqrt and scale); any other norm or dtype (a lower precision's casts) through the module."""
    if x.dtype == torch.float32 and type(module) in _RMS_NORMS:
        return F.rms_norm(x, module.weight.shape, module.weight, module.variance_epsilon)
    return module(x)


def _unwrapped(module: nn.Module) -> nn.Module:
    """The module a routing wrapper holds (`base_layer`, PEFT's habit), else the module."""
    return getattr(module, "base_layer", module)
