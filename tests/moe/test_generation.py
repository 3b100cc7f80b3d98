"""Batched decoding with joins and drops equals each sequence decoded alone; a cached step equals a full forward."""

from __future__ import annotations

import pytest
import torch

from moe import Expert, RoutedModel, RoutingSpec
from moe.generation import DecodeBatch, decode_one_token, prefill
from tests.tiny import tiny_backbone

PROMPTS = [[5, 17, 42, 9], [7, 3], [11, 12, 13, 14, 15, 16, 17], [100, 101, 102]]
STEPS = 6


def _routed(family: str) -> RoutedModel:
    model = RoutedModel(tiny_backbone(family, seed=1))
    # an always-eligible expert with a nonzero adapter, so token routing changes the logits
    expert = Expert.fresh(
        "shouty", model.hidden_size, list(range(model.num_layers)), rank=4, generator=torch.Generator().manual_seed(0)
    )
    expert.up = torch.randn_like(expert.up) * 0.5
    expert.thresholds = torch.full_like(expert.thresholds, -2.0)
    model.plug(expert)
    return model


def _alone(model: RoutedModel, prompt: list[int], spec: RoutingSpec, steps: int) -> list[torch.Tensor]:
    """Greedy decode one sequence by itself; returns the logits of each step."""
    batch, out = DecodeBatch.prefill_rows(model, [prompt], [spec])
    logits = [out.logits[0]]
    for _ in range(steps - 1):
        out = decode_one_token(model, batch, [int(logits[-1].argmax())], [spec])
        logits.append(out.logits[0])
    return logits


@pytest.mark.parametrize("family", ["llama", "gpt2", "qwen2"])
def test_joins_and_drops_match_decoding_alone(family: str) -> None:
    model = _routed(family)
    specs = [RoutingSpec("token"), RoutingSpec("off"), RoutingSpec("pin", expert="shouty"), RoutingSpec("token")]
    expected = [_alone(model, p, s, STEPS) for p, s in zip(PROMPTS, specs, strict=True)]

    # rows 0 and 1 start together (padded prefill), row 2 joins after 2 steps, row 3 after 3; row 1 stops early
    join_at = {0: [0, 1], 2: [2], 3: [3]}
    batch = DecodeBatch()
    live: list[int] = []
    got: dict[int, list[torch.Tensor]] = {i: [] for i in range(len(PROMPTS))}
    last: dict[int, int] = {}
    for t in range(STEPS + 3):
        if live:
            out = decode_one_token(model, batch, [last[i] for i in live], [specs[i] for i in live])
            for row, i in enumerate(live):
                got[i].append(out.logits[row])
                last[i] = int(out.logits[row].argmax())
        done = [i for i in live if len(got[i]) == (3 if i == 1 else STEPS)]
        if done:
            batch.keep([row for row, i in enumerate(live) if i not in done])
            live = [i for i in live if i not in done]
        if t in join_at:
            new = join_at[t]
            joined, out = DecodeBatch.prefill_rows(model, [PROMPTS[i] for i in new], [specs[i] for i in new])
            batch.extend(joined)
            for row, i in enumerate(new):
                got[i].append(out.logits[row])
                last[i] = int(out.logits[row].argmax())
            live += new
    for i in range(len(PROMPTS)):
        n = len(got[i])
        assert n == (3 if i == 1 else STEPS)
        torch.testing.assert_close(torch.stack(got[i]), torch.stack(expected[i][:n]), atol=1e-4, rtol=1e-4)
    assert len(batch) == 0


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_cached_step_equals_full_forward(family: str) -> None:
    model = _routed(family)
    prompt = PROMPTS[2]
    batch, _ = DecodeBatch.prefill_rows(model, [prompt[:-1]], [RoutingSpec("off")])
    step = decode_one_token(model, batch, [prompt[-1]], [RoutingSpec("off")])
    with torch.inference_mode():
        full = model(torch.tensor([prompt]), routing=[RoutingSpec("off")]).logits[0, -1]
        plain = model.backbone(torch.tensor([prompt])).logits[0, -1]
    torch.testing.assert_close(step.logits[0], full, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(full, plain, atol=0, rtol=0)


def test_keep_compacts_leading_padding() -> None:
    model = _routed("llama")
    batch, _ = DecodeBatch.prefill_rows(model, [PROMPTS[2], PROMPTS[1]], [RoutingSpec()] * 2)
    assert batch.length == 7
    batch.keep([1])
    assert batch.length == 2 and batch.mask.tolist() == [[1, 1]]
    assert batch.cache.layers[0].keys.shape[2] == 2
    assert batch.positions.tolist() == [2]


def test_trace_counts_real_tokens_only() -> None:
    model = _routed("llama")
    specs = [RoutingSpec("off"), RoutingSpec("pin", expert="shouty")]
    _, out = DecodeBatch.prefill_rows(model, [PROMPTS[0], PROMPTS[1]], specs)
    layers = model.num_layers
    assert out.row_counts[0] == {"shouty": 0.0, "base": 4.0 * layers}
    assert out.row_counts[1] == {"shouty": 2.0 * layers, "base": 0.0}


def test_prefill_prompt_logits_equal_a_full_forward_under_each_rows_routing() -> None:
    """prompt_logits=True keeps every prompt position's logits, also through sequence mode's two prefills
    (a row that chose base keeps its observed pass, the others are prefilled again with their expert)."""
    model = _routed("llama")
    specs = [RoutingSpec("sequence"), RoutingSpec("token"), RoutingSpec("sequence", allow=()), RoutingSpec("off")]
    pre = prefill(model, PROMPTS, specs, prompt_logits=True)
    assert [s.expert for s in pre.specs] == ["shouty", None, "base", None]
    for row, (prompt, spec, logits) in enumerate(zip(PROMPTS, pre.specs, pre.prompt_logits, strict=True)):
        with torch.inference_mode():
            full = model(torch.tensor([prompt]), routing=[spec]).logits[0]  # [T, V]
        assert logits.shape == full.shape
        torch.testing.assert_close(logits, full, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(pre.logits[row], full[-1], atol=1e-4, rtol=1e-4)
    assert prefill(model, PROMPTS, specs).prompt_logits is None
