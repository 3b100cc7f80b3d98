"""LoRA experts in the routed model: the maths, exact base rows, grouped and gathered dispatch against the plain
per-token loop (LoRA and bottleneck experts mixed in one batch), and what plugging checks."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from moe import RoutedModel, RoutingSpec
from moe.adapters import lora as lora_module
from moe.adapters.lora import LoraStacks, lora_delta, plan_lora
from moe.adapters.reference import reference_forward
from moe.decode.generation import generate
from moe.errors import IncompatibleExpertError
from moe.model import routed as routed_module
from moe.model.backbone import FAMILIES, decoder_layers, mlp_attribute
from moe.routing.router import RouterConfig
from tests.tiny import FAMILIES as TINY_FAMILIES
from tests.tiny import tiny_backbone, tiny_expert, tiny_lora_expert, tiny_tokenizer


def ids(batch: int = 3, length: int = 9, seed: int = 1) -> torch.Tensor:
    return torch.randint(1, 300, (batch, length), generator=torch.Generator().manual_seed(seed))


def merged_backbone(family: str, expert, **kwargs) -> torch.nn.Module:
    """The plain backbone with the LoRA merged into its projection weights (W + s B A) on the layers it covers:
    what the expert pinned on every token must compute."""
    plain = tiny_backbone(family, seed=0, **kwargs)
    conv1d = FAMILIES[family].conv1d
    with torch.no_grad():
        for i, layer in enumerate(expert.layers):
            block = getattr(decoder_layers(plain)[layer], mlp_attribute(plain))
            for p, pair in expert.adapter.pairs.items():
                delta = pair.B[i] @ pair.A[i] * pair.scaling[i]  # [out, in]
                getattr(block, p).weight += delta.T if conv1d else delta
    return plain


@torch.no_grad()
def test_lora_delta_is_the_merged_weight() -> None:
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(5, 8, generator=g), torch.randn(6, 8, generator=g)
    a, b = torch.randn(3, 8, generator=g), torch.randn(6, 3, generator=g)
    want = F.linear(x, w + 1.5 * b @ a)
    torch.testing.assert_close(F.linear(x, w) + lora_delta(x, a.t(), b.t(), 1.5), want)  # A^T, B^T
    torch.testing.assert_close(lora_delta(x, a.t(), b.t(), 1.5, base=F.linear(x, w)), want, msg="added into base")


@pytest.mark.parametrize("family", TINY_FAMILIES)
@pytest.mark.parametrize("length", [9, 40])  # 27 tokens: gathered; 120 tokens: grouped
@torch.no_grad()
def test_pinned_lora_equals_the_merged_backbone(family: str, length: int) -> None:
    model = RoutedModel(tiny_backbone(family, seed=0))
    expert = tiny_lora_expert(
        "a", model.projection_shapes, seed=1, rank={p: 2 + i for i, p in enumerate(model.projection_shapes)}
    )
    model.plug(expert)
    x = ids(3, length)
    want = merged_backbone(family, expert)(x).logits
    assert not torch.allclose(want, tiny_backbone(family, seed=0)(x).logits, atol=1e-3), "vacuous: no change"
    torch.testing.assert_close(model(x, routing=[RoutingSpec("pin", "a")] * 3).logits, want, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("family", TINY_FAMILIES)
@pytest.mark.parametrize("length", [9, 40])
@torch.no_grad()
def test_base_rows_stay_bit_exact_beside_lora_rows(family: str, length: int) -> None:
    model = RoutedModel(tiny_backbone(family, seed=0))
    plain = tiny_backbone(family, seed=0)
    x = ids(3, length, seed=7)
    want = plain(x).logits
    assert torch.equal(model(x).logits, want), "nothing plugged"
    model.plug(tiny_lora_expert("a", model.projection_shapes, seed=1))
    assert torch.equal(model(x).logits, want), "plugged with its gate closed: every token on base"
    out = model(x, routing=[RoutingSpec("pin", "a"), RoutingSpec("off"), RoutingSpec("pin", "a")]).logits
    assert torch.equal(out[1], want[1]), "an off row next to pinned rows"
    assert not torch.allclose(out[0], want[0], atol=1e-3)


@pytest.mark.parametrize("family", TINY_FAMILIES)
@pytest.mark.parametrize("top_k", [1, 2])
@pytest.mark.parametrize("path", ["gathered", "grouped"])
@torch.no_grad()
def test_mixed_bottleneck_and_lora_batch_equals_the_per_token_loop(
    family: str, top_k: int, path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    if path == "grouped":  # every step through the grouped plan, as prefill and training run
        monkeypatch.setattr(routed_module, "GATHER_MAX_TOKENS", 0)
    model = RoutedModel(tiny_backbone(family, seed=0), RouterConfig(top_k=top_k))
    shapes = model.projection_shapes
    targets = list(shapes)
    experts = [
        tiny_expert("ba", seed=3, threshold=0.0),
        tiny_lora_expert("la", shapes, seed=1, threshold=0.0, rank=3),
        tiny_expert("bb", seed=4, threshold=0.05, layers=(1,), rank=2),
        tiny_lora_expert("lb", shapes, seed=2, threshold=-0.02, layers=(1,), rank=2, targets=targets[-1:]),
        tiny_lora_expert("lc", shapes, seed=5, threshold=0.03, rank={p: 1 + i for i, p in enumerate(shapes)}),
    ]
    for expert in experts:
        model.plug(expert)
    x = ids(3, 9, seed=9)
    pins = {1: model.plugged.index("lb")}  # row 1 pinned to a LoRA that covers layer 1 only
    routing = [RoutingSpec(), RoutingSpec("pin", "lb"), RoutingSpec()]
    assert model.plugged.slots == tuple(range(len(experts))), "slots in plug order: the reference's columns"
    # the reference reads the experts' own tensors (the model's set holds bottleneck experts as weightless handles)
    reference = model.plugged.replacing_all(tuple(experts))
    want, counts = reference_forward(tiny_backbone(family, seed=0), reference, x, top_k, pins)
    out = model(x, routing=routing)
    torch.testing.assert_close(out.logits, want, atol=1e-5, rtol=1e-4)
    assert out.trace.row_counts() == counts
    used = {name for row in counts for name, count in row.items() if count}
    assert used == {"ba", "la", "bb", "lb", "lc", "base"}, f"the case needs every route: {counts}"


@pytest.mark.parametrize("family", TINY_FAMILIES)
@torch.no_grad()
def test_pinned_lora_greedy_generation_equals_the_merged_backbone(family: str) -> None:
    """Prefill and cached decode steps (the gathered path) with the LoRA pinned."""
    tokenizer = tiny_tokenizer()
    model = RoutedModel(tiny_backbone(family, seed=0, vocab=len(tokenizer)))
    expert = tiny_lora_expert("a", model.projection_shapes, seed=1, scale=0.8)
    model.plug(expert)
    merged = merged_backbone(family, expert, vocab=len(tokenizer))
    prompt = "The quick brown fox"
    got = generate(model, tokenizer, [prompt], RoutingSpec("pin", "a"), max_new_tokens=12)[0].token_ids
    ids_ = torch.tensor([tokenizer(prompt)["input_ids"]])
    want = []
    for _ in range(12):  # greedy on the merged backbone, no cache
        token = int(merged(ids_).logits[0, -1].argmax())
        if token == tokenizer.eos_token_id:
            break
        want.append(token)
        ids_ = torch.cat([ids_, torch.tensor([[token]])], dim=1)
    assert got == want
    base = generate(model, tokenizer, [prompt], RoutingSpec("off"), max_new_tokens=12)[0].token_ids
    assert base != want, "vacuous: the LoRA does not change the greedy continuation"


@torch.no_grad()
def test_grouped_cost_follows_routed_rows_not_the_number_plugged(monkeypatch: pytest.MonkeyPatch) -> None:
    """Eight LoRA experts plugged, two win tokens: only those two run, each on its own rows only."""
    monkeypatch.setattr(routed_module, "GATHER_MAX_TOKENS", 0)
    model = RoutedModel(tiny_backbone("llama", seed=0))
    for e in range(8):
        model.plug(tiny_lora_expert(f"l{e}", model.projection_shapes, seed=e))
    calls: list[tuple[int, int]] = []  # (rows, rank) of every LoRA delta computed
    real = lora_module.lora_delta

    def counted(x, a, b, s, base=None):
        calls.append((x.shape[0], a.shape[1]))  # a: A^T [in, r]
        return real(x, a, b, s, base)

    monkeypatch.setattr(lora_module, "lora_delta", counted)
    x = ids(3, 7)
    model(x, routing=[RoutingSpec("pin", "l2"), RoutingSpec("off"), RoutingSpec("pin", "l5")])
    projections, layers = len(model.projection_shapes), model.num_layers
    assert calls == [(7, 4)] * (2 * projections * layers), "two experts x projections x layers, 7 rows each"


def test_plan_groups_rows_by_lora_expert_and_leaves_bottleneck_choices() -> None:
    model = RoutedModel(tiny_backbone("llama", seed=0))
    model.plug(tiny_expert("b", seed=1))
    model.plug(tiny_lora_expert("l", model.projection_shapes, seed=2))
    stacks = model.plugged.layouts["lora"]
    choice = torch.tensor([[1, 0], [0, -1], [-1, -1], [1, -1]])
    plan, rest = plan_lora(stacks, 0, choice, gather=False)
    assert rest.tolist() == [[-1, 0], [0, -1], [-1, -1], [-1, -1]]
    (group,) = plan.groups
    assert group.expert == 1 and group.rows.tolist() == [0, 3]
    assert group.weight[:, 0].tolist() == [0.5, 1.0], "1/k' counts every kind chosen"
    plan, rest = plan_lora(stacks, 0, choice[:, :1], gather=True)
    assert plan.index.tolist() == [1, -1, -1, 1] and rest[:, 0].tolist() == [-1, 0, -1, -1]
    plan, rest = plan_lora(stacks, 0, torch.tensor([[1], [1], [1]]), gather=False)  # a pinned batch
    (group,) = plan.groups
    assert group.expert == 1 and group.rows is None and group.weight is None, "every row: no index op"
    assert rest[:, 0].tolist() == [-1, -1, -1]


def test_a_set_of_lora_experts_only_plans_without_masking_other_kinds() -> None:
    model = RoutedModel(tiny_backbone("llama", seed=0))
    model.plug(tiny_lora_expert("l", model.projection_shapes, seed=2))
    model.plug(tiny_lora_expert("m", model.projection_shapes, seed=3))
    stacks = model.plugged.layouts["lora"]
    assert stacks.only_lora
    choice = torch.tensor([[1], [-1], [0], [1]])
    plan, rest = plan_lora(stacks, 0, choice, gather=False)
    assert [(g.expert, g.rows.tolist()) for g in plan.groups] == [(0, [2]), (1, [0, 3])]
    assert rest[:, 0].tolist() == [-1] * 4
    plan, _ = plan_lora(stacks, 0, choice, gather=True)
    assert plan.index.tolist() == [1, -1, 0, 1]
    model.plug(tiny_expert("b", seed=1))
    assert not model.plugged.layouts["lora"].only_lora, "a bottleneck expert plugged beside them"
    model.unplug("b")
    assert model.plugged.layouts["lora"].only_lora


def test_stacks_pad_ranks_with_zeros_and_reference_the_experts() -> None:
    model = RoutedModel(tiny_backbone("llama", seed=0))
    shapes = model.projection_shapes
    a = tiny_lora_expert("a", shapes, seed=1, rank=2, layers=(1,))
    b = tiny_lora_expert("b", shapes, seed=2, rank=5, targets=["down_proj"])
    plugged = model.plugged.plugging(tiny_expert("x", seed=3)).plugging(a.to("cpu", torch.float32)).plugging(b)
    stacks = plugged.layouts["lora"]
    assert stacks.is_lora.tolist() == [False, True, True] and stacks.on_layer == (True, True)
    assert (
        plugged.layouts["bottleneck"].adapters[1][1] is None
        and plugged.layouts["bottleneck"].adapters[1][0] is not None
    ), "bottleneck dispatch skips LoRAs"
    # kept transposed: A^T [E, in, R], B^T [E, R, out]
    assert stacks.a[1]["down_proj"].shape == (3, 64, 5) and stacks.b[1]["down_proj"].shape == (3, 5, 32)
    assert stacks.a[1]["gate_proj"].shape == (3, 32, 2), "the largest rank among the experts that target it"
    assert torch.equal(stacks.a[1]["down_proj"][1, :, :2].t(), plugged.get("a").adapter.pairs["down_proj"].A[0])
    assert not stacks.a[1]["down_proj"][1, :, 2:].any() and not stacks.a[0]["down_proj"][1].any()
    assert stacks.s[1]["gate_proj"].tolist() == [0.0, 2.0, 0.0]
    assert stacks.pairs[0][1] is None and set(stacks.pairs[0][2]) == {"down_proj"}
    assert stacks.pairs[0][2]["down_proj"][0].data_ptr() == plugged.get("b").adapter.pairs["down_proj"].A[0].data_ptr()
    assert LoraStacks.build([None, None], 2, torch.device("cpu"), torch.float32) is None


def test_plug_refuses_lora_that_does_not_fit_the_projections() -> None:
    model = RoutedModel(tiny_backbone("llama", seed=0))
    before = model.plugged
    wrong = dict(model.projection_shapes, down_proj=(48, 32))
    with pytest.raises(
        IncompatibleExpertError, match="down_proj maps 48 -> 32, the backbone's down_proj maps 64 -> 32"
    ):
        model.plug(tiny_lora_expert("a", wrong, seed=1))
    with pytest.raises(IncompatibleExpertError, match=r"adapts \['c_fc'\]"):
        model.plug(tiny_lora_expert("b", {"c_fc": (32, 64)}, seed=1))
    assert model.plugged is before


def test_bottleneck_attributes_are_refused_on_a_lora_expert() -> None:
    expert = tiny_lora_expert("a", {"c_fc": (32, 128), "c_proj": (128, 32)})
    assert expert.kind == "lora" and expert.rank == 4 and expert.hidden_size == 32
    with pytest.raises(AttributeError, match="lora expert"):
        _ = expert.down
