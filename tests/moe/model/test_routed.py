"""The routed model on every supported family: exact backbone, padding, mixed modes, the trace, and the whole
routed forward against a plain per-token loop on the unwrapped backbone."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from moe import Expert, RoutedModel, RoutingSpec
from moe.adapters.bottleneck import adapter_delta
from moe.model import routed as routed_module
from moe.model.backbone import decoder_layers, mlp_attribute
from moe.routing.router import RouterConfig
from tests.tiny import FAMILIES, tiny_backbone, tiny_expert


def routed(family: str = "llama", top_k: int = 1) -> tuple[RoutedModel, torch.nn.Module]:
    """A routed model and an untouched copy of the same backbone to compare against."""
    plain = tiny_backbone(family, seed=0)
    return RoutedModel(tiny_backbone(family, seed=0), RouterConfig(top_k=top_k)), plain


def ids(batch: int = 2, length: int = 9, seed: int = 1) -> torch.Tensor:
    return torch.randint(1, 300, (batch, length), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def reference_forward(
    plain: torch.nn.Module, experts: list[Expert], x: torch.Tensor, top_k: int
) -> tuple[torch.Tensor, list[dict[str, float]]]:
    """The routed forward of token-mode rows, spelled out on the unwrapped backbone: a hook on every MLP block
    adds, per token, the mean adapter delta of its top-k experts with score = cos(x, key) + offset > threshold.
    Returns (logits, per-row decision counts)."""
    counts = [dict.fromkeys([*(e.name for e in experts), "base"], 0.0) for _ in range(x.shape[0])]

    def hook(layer: int, module: torch.nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
        h, out = inputs[0], output.clone()
        for b in range(h.shape[0]):
            for t in range(h.shape[1]):
                scored = []
                for e in experts:
                    if layer in e.layers:
                        i = e.layers.index(layer)
                        score = F.cosine_similarity(h[b, t], e.keys[i], dim=0) + e.offsets[i]
                        if score > e.thresholds[i]:
                            scored.append((float(score), e, i))
                chosen = sorted(scored, key=lambda s: -s[0])[:top_k]
                for _, e, i in chosen:
                    out[b, t] += adapter_delta(h[b, t][None], e.down[i], e.up[i])[0] / len(chosen)
                    counts[b][e.name] += 1
                if not chosen:
                    counts[b]["base"] += 1
        return out

    handles = [
        getattr(block, mlp_attribute(plain)).register_forward_hook(lambda m, i, o, layer=layer: hook(layer, m, i, o))
        for layer, block in enumerate(decoder_layers(plain))
    ]
    try:
        return plain(x).logits, counts
    finally:
        for handle in handles:
            handle.remove()


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("top_k", [1, 2])
@pytest.mark.parametrize("path", ["gathered", "grouped"])
@torch.no_grad()
def test_token_routing_equals_the_plain_per_token_loop(
    family: str, top_k: int, path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    if path == "grouped":  # every step through grouped dispatch, as prefill and training run
        monkeypatch.setattr(routed_module, "GATHER_MAX_TOKENS", 0)
    model, plain = routed(family, top_k)
    experts = [
        tiny_expert("a", seed=1, threshold=0.0),
        tiny_expert("b", seed=2, threshold=0.02, offset=0.05, layers=(1,)),
        tiny_expert("c", seed=3, threshold=-0.05, rank=2),
    ]
    for expert in experts:
        model.plug(expert)
    x = ids(2, 9)
    want, counts = reference_forward(plain, experts, x, top_k)
    out = model(x)
    torch.testing.assert_close(out.logits, want, atol=1e-5, rtol=1e-4)
    assert out.trace.row_counts() == counts
    routed_names = {name for row in counts for name, count in row.items() if count and name != "base"}
    assert routed_names == {"a", "b", "c"} and all(row["base"] for row in counts), "the case needs every route"


@pytest.mark.parametrize("family", FAMILIES)
@torch.no_grad()
def test_exact_backbone_without_experts_off_mode_and_all_base(family: str) -> None:
    model, plain = routed(family)
    x = ids()
    want = plain(x).logits
    assert torch.equal(model(x).logits, want)  # nothing plugged
    model.plug(tiny_expert("always", seed=1, threshold=-5.0))
    model.plug(tiny_expert("never", seed=2, threshold=5.0))
    out = model(x, routing=[RoutingSpec("off"), RoutingSpec("token", allow=("never",))])
    assert torch.equal(out.logits, want)  # off, and a row whose only allowed expert never passes
    assert out.trace.row_counts() == [{"always": 0, "never": 0, "base": 18.0}] * 2
    routed_out = model(x)  # token mode: 'always' takes everything, so the logits change
    assert not torch.allclose(routed_out.logits, want)
    assert routed_out.trace.row_counts()[0]["always"] == 18.0


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("side", ["left", "right"])
@torch.no_grad()
def test_batched_equals_unbatched_with_padding(family: str, side: str) -> None:
    model, _ = routed(family)
    model.plug(tiny_expert("a", seed=1, threshold=0.0))
    model.plug(tiny_expert("b", seed=2, threshold=0.05))
    long, short = ids(1, 9, seed=3), ids(1, 5, seed=4)
    pad = torch.zeros(1, 4, dtype=torch.long)
    batch = torch.cat([long, torch.cat([pad, short], 1) if side == "left" else torch.cat([short, pad], 1)])
    mask = torch.ones_like(batch)
    if side == "left":
        mask[1, :4] = 0
        position_ids = (mask.cumsum(1) - 1).clamp(min=0)
    else:
        mask[1, 5:] = 0
        position_ids = None
    out = model(batch, attention_mask=mask, position_ids=position_ids)
    alone_long, alone_short = model(long), model(short)
    torch.testing.assert_close(out.logits[0], alone_long.logits[0], atol=1e-5, rtol=1e-4)
    real = slice(4, None) if side == "left" else slice(0, 5)
    torch.testing.assert_close(out.logits[1, real], alone_short.logits[0], atol=1e-5, rtol=1e-4)
    # padding is not counted: the short row has 5 tokens x 2 layers of decisions
    assert sum(out.trace.row_counts()[1].values()) == 10
    assert out.trace.row_counts()[1] == pytest.approx(alone_short.trace.row_counts()[0])


@torch.no_grad()
def test_mixed_modes_in_one_batch_match_each_alone() -> None:
    model, plain = routed()
    model.plug(tiny_expert("a", seed=1, threshold=0.0))
    model.plug(tiny_expert("b", seed=2, threshold=0.0))
    x = ids(4, 7)
    specs = [RoutingSpec("off"), RoutingSpec("pin", "b"), RoutingSpec(), RoutingSpec("token", allow=("a",))]
    out = model(x, routing=specs)
    for row, spec in enumerate(specs):
        alone = model(x[row : row + 1], routing=[spec])
        torch.testing.assert_close(out.logits[row], alone.logits[0], atol=1e-5, rtol=1e-4)
    assert torch.equal(out.logits[0], plain(x).logits[0]), "the off row is the backbone, bit for bit"
    counts = out.trace.row_counts()
    assert counts[1] == {"a": 0, "b": 14, "base": 0}
    assert counts[3]["b"] == 0 and counts[3]["a"] > 0


@torch.no_grad()
def test_pin_on_uncovered_layer_takes_base() -> None:
    model, _ = routed()
    model.plug(tiny_expert("only0", seed=1, threshold=0.0, layers=(0,)))
    out = model(ids(1, 6), routing=[RoutingSpec("pin", "only0")])
    assert out.trace.row_counts() == [{"only0": 6, "base": 6}]
    assert out.trace.layer_counts() == [{"only0": 6, "base": 0}, {"only0": 0, "base": 6}]


@torch.no_grad()
def test_trace_rows_and_layers_agree_and_count_every_real_decision() -> None:
    model, _ = routed(top_k=2)
    model.plug(tiny_expert("a", seed=1, threshold=0.0))
    model.plug(tiny_expert("b", seed=2, threshold=0.0, layers=(1,)))
    x = ids(3, 6)
    mask = torch.ones_like(x)
    mask[2, 4:] = 0  # right padding on the last row: not counted
    out = model(x, attention_mask=mask, routing=[RoutingSpec(), RoutingSpec("off"), RoutingSpec("pin", "a")])
    rows, layers = out.trace.row_counts(), out.trace.layer_counts()
    assert out.trace.names == ("a", "b") and all(list(r) == ["a", "b", "base"] for r in rows + layers)
    for route in ("a", "b", "base"):
        assert sum(r[route] for r in rows) == sum(layer[route] for layer in layers)
    assert rows[1] == {"a": 0, "b": 0, "base": 12} and rows[2] == {"a": 8, "b": 0, "base": 0}
    # a top-2 token counts once per expert it took, a base token once: one or two per (token, layer)
    assert 12 <= sum(rows[0].values()) <= 24


@torch.no_grad()
def test_decode_sized_and_prefill_sized_batches_agree() -> None:
    """The gathered path (<= GATHER_MAX_TOKENS tokens) and the grouped path give the same logits."""
    model, _ = routed()
    model.plug(tiny_expert("a", seed=1, threshold=0.0))
    model.plug(tiny_expert("b", seed=2, threshold=0.0, layers=(1,)))
    x = ids(2, 10)
    gathered = model(x)
    limit = routed_module.GATHER_MAX_TOKENS
    routed_module.GATHER_MAX_TOKENS = 0
    try:
        grouped = model(x)
    finally:
        routed_module.GATHER_MAX_TOKENS = limit
    torch.testing.assert_close(gathered.logits, grouped.logits, atol=1e-5, rtol=1e-4)
    assert gathered.trace.row_counts() == grouped.trace.row_counts()


def test_top2_routing_in_model_matches_reference() -> None:
    model, plain = routed(top_k=2)
    experts = [tiny_expert("a", seed=1, threshold=-0.2), tiny_expert("b", seed=2, threshold=-0.2)]
    for expert in experts:
        model.plug(expert)
    x = ids(2, 6)
    with torch.no_grad():
        out = model(x)
    counts = out.trace.row_counts()[0]
    assert counts["a"] + counts["b"] + counts["base"] >= 12
    want, reference_counts = reference_forward(plain, experts, x, top_k=2)
    torch.testing.assert_close(out.logits, want, atol=1e-5, rtol=1e-4)
    assert out.trace.row_counts() == reference_counts


def test_a_plug_during_a_forward_does_not_reach_it() -> None:
    """A forward reads the plugged set once at its start; a swap applies from the next forward."""
    model, plain = routed()
    x = ids(1, 5)
    seen = []

    def plug_midway(module, inputs, output) -> None:
        if not seen:
            model.plug(tiny_expert("late", seed=1, threshold=-5.0))
        seen.append(len(model.plugged))

    handle = model.mlps[0].register_forward_hook(plug_midway)
    try:
        with torch.no_grad():
            out = model(x)
    finally:
        handle.remove()
    assert seen == [1], "the expert was plugged while layer 0 ran"
    assert out.trace.names == () and torch.equal(out.logits, plain(x).logits)
    with torch.no_grad():
        assert model(x).trace.row_counts() == [{"late": 10.0, "base": 0.0}]


@pytest.mark.slow
@torch.no_grad()
def test_fused_decode_routing_equals_the_reference_and_the_plain_ops() -> None:
    """fuse_decode_routing (routed_top1 under torch.compile, inductor, dynamic shapes: what a GPU runs) against
    the plain per-token loop (token mode) and against the plain ops (pins, allow-lists), in the gathered form
    (more slots than tokens) and the dense one (fewer); one row at a time and several."""
    model, plain = routed()
    experts = [tiny_expert(f"e{i}", seed=i, threshold=0.0, layers=(0, 1) if i % 2 else (1,)) for i in range(3)]
    for expert in experts:
        model.plug(expert)
    specs = [RoutingSpec("token"), RoutingSpec("pin", "e1"), RoutingSpec(allow=("e0", "e2"))]
    try:
        for batch, length in ((3, 1), (1, 1), (2, 9)):  # 3 and 1 tokens: gathered (8 slots); 18 tokens: dense
            x = ids(batch, length, seed=batch + length)
            model.fuse_decode_routing(True)
            fused = model(x)
            want, counts = reference_forward(plain, experts, x, top_k=1)
            torch.testing.assert_close(fused.logits, want, atol=1e-5, rtol=1e-4)
            assert fused.trace.row_counts() == counts
            mixed = model(x, routing=[specs[row % 3] for row in range(batch)])
            model.fuse_decode_routing(False)
            ops = model(x, routing=[specs[row % 3] for row in range(batch)])
            torch.testing.assert_close(mixed.logits, ops.logits, atol=1e-5, rtol=1e-4)
            assert mixed.trace.row_counts() == ops.trace.row_counts()
    finally:
        model.fuse_decode_routing(False)
    assert model.decode_route is routed_module.routed_top1
    assert routed_module.fused_routed_top1() is routed_module.fused_routed_top1(), "compiled once per process"
