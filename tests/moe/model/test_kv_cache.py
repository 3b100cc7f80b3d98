"""The fixed-slot KV cache and the grouped decode attention: each row written at its own column, the grouped
form equal to transformers' sdpa (which repeats KV heads), everything else handed to sdpa unchanged, and the
cache keyword the installed transformers takes; under inductor the slot write is done in place."""

from __future__ import annotations

import os
import shutil

import pytest
import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from moe.model.kv_cache import (
    DECODE_ATTENTION,
    SlotLayer,
    cache_kwarg,
    grouped_attention,
    grouped_decode_attention,
    use_decode_attention,
)
from tests.tiny import tiny_backbone


def test_slot_layer_writes_each_row_at_its_own_column() -> None:
    keys, values = torch.zeros(3, 2, 8, 4), torch.zeros(3, 2, 8, 4)
    pos = torch.tensor([0, 5, 2])
    layer = SlotLayer(keys, values, pos, visible=6)
    new_k, new_v = torch.randn(3, 2, 1, 4), torch.randn(3, 2, 1, 4)
    seen_k, seen_v = layer.update(new_k, new_v, 0)
    assert seen_k.shape == (3, 2, 6, 4) and seen_k.data_ptr() == keys.data_ptr(), "a view of the slots"
    for row in range(3):
        want = torch.zeros(2, 8, 4)
        want[:, pos[row]] = new_k[row, :, 0]
        assert torch.equal(keys[row], want), row
        assert torch.equal(values[row, :, pos[row]], new_v[row, :, 0])
    assert layer.get_mask_sizes(1) == (6, 0) and layer.get_seq_length() == 0


@pytest.mark.slow
@pytest.mark.skipif(
    shutil.which(os.environ.get("CXX", "g++")) is None, reason="inductor's CPU backend needs a C++ compiler (g++)"
)
def test_inductor_writes_the_slots_in_place() -> None:
    """The compiled write updates the slot buffers where they are: the generated code allocates no buffer of the
    slots' shape (a functionalised write the compiler did not re-inplace copies the whole cache into one, writes
    the column there and copies it back), and the result and the buffers equal the eager step's."""
    from torch._inductor.utils import run_and_get_code

    def make() -> tuple[SlotLayer, torch.Tensor, torch.Tensor]:
        keys, values = torch.zeros(4, 2, 40, 8), torch.zeros(4, 2, 40, 8)  # the decoder's full buffers
        return SlotLayer(keys[:3], values[:3], torch.tensor([0, 37, 5]), visible=40), keys, values  # 3 rows seen

    def step(layer: SlotLayer, new_k: torch.Tensor, new_v: torch.Tensor) -> torch.Tensor:
        seen_k, seen_v = layer.update(new_k, new_v, 0)
        return (seen_k.sum(-1, keepdim=True) * seen_v).sum(2)  # reads every column written

    new_k, new_v = torch.randn(3, 2, 1, 8), torch.randn(3, 2, 1, 8)
    eager_layer, eager_keys, eager_values = make()
    want = step(eager_layer, new_k, new_v)
    layer, keys, values = make()
    torch._dynamo.reset()
    compiled = torch.compile(lambda: step(layer, new_k, new_v), backend="inductor", fullgraph=True, dynamic=False)
    got, code = run_and_get_code(compiled)
    source = "\n".join(code)
    assert "(3, 2, 40, 8)" in source, "the slots are the compiled step's inputs"
    assert "empty_strided_cpu((3, 2, 40, 8)" not in source, "a copy of the whole slot buffer"
    torch.testing.assert_close(got, want)
    assert torch.equal(keys, eager_keys) and torch.equal(values, eager_values)


@pytest.mark.parametrize("form", ["eager cpu", "plain ops"])
@pytest.mark.parametrize(("heads", "kv_heads"), [(8, 2), (4, 4)], ids=["grouped", "one-to-one"])
def test_grouped_decode_attention_equals_sdpa(heads: int, kv_heads: int, form: str) -> None:
    """Both forms of the decode attention: the fused op an eager CPU step runs, and the plain ops a compiled or
    captured step runs, each against transformers' sdpa with repeat_kv."""
    g = torch.Generator().manual_seed(0)
    batch, columns, dim = 3, 10, 8
    module = torch.nn.Module()
    module.num_key_value_groups, module.is_causal, module.training = heads // kv_heads, True, False
    query = torch.randn(batch, heads, 1, dim, generator=g, dtype=torch.float64)
    key = torch.randn(batch, kv_heads, columns, dim, generator=g, dtype=torch.float64)
    value = torch.randn(batch, kv_heads, columns, dim, generator=g, dtype=torch.float64)
    mask = torch.full((batch, 1, 1, columns), torch.finfo(torch.float64).min, dtype=torch.float64)
    for row, length in enumerate((10, 3, 1)):  # rows see different prefixes; one sees a single column
        mask[row, ..., :length] = 0.0
    if form == "eager cpu":  # what the registered attention runs here (eager, CPU)
        got, _ = grouped_decode_attention(module, query, key, value, mask, scaling=0.3)
    else:
        got = grouped_attention(query, key, value, mask, 0.3)
    want, _ = sdpa_attention_forward(module, query, key, value, mask, scaling=0.3)
    assert got.shape == (batch, 1, heads, dim)
    torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-12)


def test_anything_but_a_decode_step_goes_to_sdpa_unchanged() -> None:
    g = torch.Generator().manual_seed(1)
    module = torch.nn.Module()
    module.num_key_value_groups, module.is_causal, module.training = 2, True, False
    prefill = torch.randn(2, 4, 5, 8, generator=g), torch.randn(2, 2, 5, 8, generator=g)
    boolean = torch.ones(2, 1, 1, 5, dtype=torch.bool)
    cases = [
        (prefill[0], prefill[1], None),  # several query tokens, causal
        (prefill[0][:, :, :1], prefill[1], boolean),  # a boolean mask (transformers' own decode)
        (prefill[0][:, :, :1], prefill[1], None),  # no mask
    ]
    for query, key, mask in cases:
        got, _ = grouped_decode_attention(module, query, key, key, mask)
        want, _ = sdpa_attention_forward(module, query, key, key, mask)
        assert torch.equal(got, want)


def test_decode_attention_and_the_cache_keyword_on_a_backbone() -> None:
    model = tiny_backbone("llama")
    assert model.config._attn_implementation == "sdpa"
    assert use_decode_attention(model) and model.config._attn_implementation == DECODE_ATTENTION
    eager = tiny_backbone("llama")
    eager.set_attn_implementation("eager")
    assert not use_decode_attention(eager) and eager.config._attn_implementation == "eager", "only sdpa is swapped"
    assert cache_kwarg(model) in ("cache", "past_key_values")

    class Old(torch.nn.Module):
        def forward(self, input_ids, past_key_values=None): ...

    class New(torch.nn.Module):
        def forward(self, input_ids, cache=None, **kwargs): ...

    assert cache_kwarg(Old()) == "past_key_values" and cache_kwarg(New()) == "cache"
