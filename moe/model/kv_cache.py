"""The fixed-slot KV cache a decode step writes into, and the attention that reads it.

    keys[l], values[l]   [B, kv_heads, S, D]   one slot (row) per sequence, written from column 0
    write_pos            [B] long              the column each slot's newest token is written to

`SlotLayer.update` writes every row's new key and value at that row's own column (one `index_put_` each:
no host read, no shape that depends on a length) and hands back the first `visible` columns: which of them
a row may attend to is the caller's 4D additive mask, never the cache. Views of the first b slots share
storage with the full buffers, so a step captured on a bucket sees what prefill later writes into a slot.

Compiled (torch.compile), the write stays in place only if the layer holds one tensor per buffer: the visible
columns are sliced from it inside `update`, after the write. A second stored view of the same buffer (as a
precomputed `keys[:, :, :visible]` was) is a second graph input aliasing the mutated one; AOTAutograd then
rebuilds both from a synthetic base with as_strided, and inductor copied the whole buffer out, wrote the
column into the copy and copied it back: two full copies of each layer's keys and values per step.

`grouped_decode_attention` is registered as the attention implementation `plugmoe_decode`: a one-token
step with a 4D float mask (what the decoder passes) attends each KV head once, as

    q [B, kv, g, D] @ keys [B, kv, S, D]^T * scale + mask [B, 1, 1, S] -> softmax -> @ values [B, kv, S, D]

with no `repeat_kv` copy of the cache (`grouped_attention`: what a captured or compiled step runs); an eager CPU step
runs the same as torch's one fused CPU attention op (`cpu_decode_attention`, the KV heads shared by `enable_gqa`:
three ops a layer where the plain form dispatches about 19). Anything else (prefill, boolean masks) goes to
transformers' sdpa unchanged. Captured decode needs the plain form: on an H100 with transformers 5.17, the sdpa path
with repeat_kv gave different tokens captured than eager, the grouped form gave identical logits.

transformers renamed `past_key_values=` to `cache=` (5.2x; the old name is deprecated until 5.40):
`cache_kwarg` picks the name the installed version's forward takes.
"""

from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.cache_utils import Cache, CacheLayerMixin
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

DECODE_ATTENTION = "plugmoe_decode"


class SlotLayer(CacheLayerMixin):
    """One decoder layer's slots; only decode steps (one new token per row) write through here."""

    is_compileable = True
    is_sliding = False
    is_croppable = False
    supports_early_init = False

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, write_pos: torch.Tensor, visible: int) -> None:
        super().__init__()
        self.keys, self.values, self.write_pos = keys, values, write_pos  # views owned by the decoder
        self.visible = visible  # columns attention reads (a column bucket; the host keeps pos < visible)
        self._rows = torch.arange(keys.shape[0], device=keys.device)  # [B]
        self.device = keys.device
        self.is_initialized = True

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        pass

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """key_states, value_states [B, kv, 1, D] -> (keys, values) [B, kv, visible, D].

        Semantics: for b in range(B): keys[b, :, write_pos[b]] = key_states[b, :, 0]
        (index_put_, not scatter_: inductor updates index_put_ in place; a functionalised scatter_ copied
        the whole buffer.) The visible columns are sliced here, after the write, not stored: see the module
        docstring.
        """
        assert key_states.shape[2] == 1, "slot layers take decode steps only; prefill uses a DynamicCache"
        self.keys[self._rows, :, self.write_pos] = key_states[:, :, 0]
        self.values[self._rows, :, self.write_pos] = value_states[:, :, 0]
        return self.keys[:, :, : self.visible], self.values[:, :, : self.visible]

    def get_mask_sizes(self, *args, **kwargs) -> tuple[int, int]:
        return self.visible, 0

    def get_seq_length(self) -> int:
        return 0  # lengths are per row, on the device: the decoder passes position_ids and a 4D mask

    def get_max_length(self) -> int:
        return self.visible

    def reset(self) -> None:  # slots are reset row by row by the decoder
        pass


class SlotCache(Cache):
    """The cache object one bucket's forward gets: a SlotLayer view per decoder layer."""

    def __init__(self, layers: list[SlotLayer]) -> None:
        super().__init__(layers=layers)


def cache_kwarg(model: torch.nn.Module) -> str:
    """'cache' where the forward takes it (transformers >= 5.2x), else 'past_key_values'."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def dynamic_layers_kv(cache: Cache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(keys, values) per layer of a DynamicCache, each [B, kv, T, D]."""
    if hasattr(cache, "layers"):
        return [(layer.keys, layer.values) for layer in cache.layers]
    return list(zip(cache.key_cache, cache.value_cache, strict=True))  # transformers 4.x


def grouped_decode_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """query [B, heads, 1, D], key/value [B, kv, S, D], attention_mask [B, 1, 1, S] additive -> [B, 1, heads, D]."""
    decode = (
        query.shape[2] == 1
        and attention_mask is not None
        and attention_mask.ndim == 4
        and attention_mask.is_floating_point()
        and not kwargs.get("softcap")
        and not kwargs.get("sliding_window")
        and dropout == 0.0
    )
    if not decode:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout, scaling, **kwargs)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    if query.device.type == "cpu" and not torch.compiler.is_compiling():
        return cpu_decode_attention(query, key, value, attention_mask, scale), None
    return grouped_attention(query, key, value, attention_mask, scale), None


def grouped_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor, scale: float
) -> torch.Tensor:
    """The decode step's attention as plain ops (what a captured or compiled step runs): query [B, heads, 1, D],
    key/value [B, kv, S, D], mask [B, 1, 1, S] additive -> [B, 1, heads, Dv]; each KV head attended once."""
    batch, heads, _, dim = query.shape
    kv_heads = key.shape[1]
    q = query.view(batch, kv_heads, heads // kv_heads, dim)  # heads j*g .. j*g+g-1 share KV head j
    weights = torch.matmul(q, key.transpose(-1, -2)) * scale + mask  # [B, kv, g, S]
    softmax_dtype = torch.float32 if weights.dtype in (torch.float16, torch.bfloat16) else weights.dtype
    probs = torch.softmax(weights, dim=-1, dtype=softmax_dtype).to(value.dtype)
    out = torch.matmul(probs, value)  # [B, kv, g, Dv]
    return out.reshape(batch, heads, 1, -1).transpose(1, 2)


def cpu_decode_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor, scale: float
) -> torch.Tensor:
    """grouped_attention as one op (an eager CPU step: torch's fused CPU attention, where the plain form is about
    19 dispatched ops a layer): no repeat_kv copy either, the KV heads shared by `enable_gqa`."""
    gqa = key.shape[1] != query.shape[1]
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scale, enable_gqa=gqa)
    return out.transpose(1, 2)  # [B, 1, heads, Dv]


def use_decode_attention(model: torch.nn.Module) -> bool:
    """Switch a backbone whose attention is sdpa to `plugmoe_decode` (sdpa for everything but decode steps).
    Returns whether the backbone now uses it."""
    current = getattr(model.config, "_attn_implementation", None)
    if current == DECODE_ATTENTION:
        return True
    if current not in ("sdpa", None):
        return False
    AttentionInterface.register(DECODE_ATTENTION, grouped_decode_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(DECODE_ATTENTION, sdpa_mask)
    model.set_attn_implementation(DECODE_ATTENTION)
    return True
