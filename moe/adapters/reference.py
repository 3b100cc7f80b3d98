"""The plain per-token loops the batched paths must equal: test oracles, never run by serving.

Each kind gives, for one token on one layer, what its expert adds (`ORACLES[kind]`): weight deltas merged into the
block's own parameters (a kind run inside the block: LoRA), or a delta added to the block's output (a kind run
after it: bottleneck). `reference_mlp` runs a token through the block with every chosen expert, whatever the
kinds, each at weight 1/k'; `reference_forward` is a whole routed forward spelled out on the plain backbone
(gate scores, thresholds, top-k, pins, then reference_mlp per layer); `reference_dispatch` is the bottleneck
kind's grouped dispatch, spelled out.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call
from transformers import DynamicCache

from moe.adapters.bottleneck import BOTTLENECK, BottleneckAdapter, LayerAdapter, adapter_delta
from moe.adapters.lora import LORA, LoraAdapter, is_attention_target
from moe.adapters.slots import PluggedSet
from moe.model.backbone import FAMILIES, decoder_layers
from moe.model.kv_cache import cache_kwarg

# One token's contribution: (adapter, i = position of the layer in the expert's layers, x [1, H]) ->
# ({projection: weight delta [out, in]} merged into the block, delta [H] added to its output, or None)
TokenOracle = Callable[[object, int, torch.Tensor], tuple[dict[str, torch.Tensor], torch.Tensor | None]]


def _bottleneck_token(
    adapter: BottleneckAdapter, i: int, x: torch.Tensor
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    return {}, adapter_delta(x, adapter.down[i], adapter.up[i])[0]


def _lora_token(adapter: LoraAdapter, i: int, x: torch.Tensor) -> tuple[dict[str, torch.Tensor], None]:
    return {p: pair.B[i] @ pair.A[i] * float(pair.scaling[i]) for p, pair in adapter.pairs.items()}, None


# a kind's oracle, by the kind's name (moe.adapters.kind.KINDS): tests check that every kind has one
ORACLES: dict[str, TokenOracle] = {
    BOTTLENECK.name: _bottleneck_token,
    LORA.name: _lora_token,
}


def reference_mlp(
    block: nn.Module,
    x: torch.Tensor,
    choice: torch.Tensor,
    plugged: PluggedSet,
    layer: int,
    conv1d: bool = False,
) -> torch.Tensor:
    """What a routed MLP block computes, one token at a time, from the experts' own tensors.

    block: an MLP block of the backbone (plain, or with its kinds' wrappers and no plan set); x [N, H] its
    inputs; choice [N, k] expert indices into `plugged` (-1 empty). Per token: merge its chosen experts' weight
    deltas into the block's parameters (each at 1/k'), run the block with those weights, add its chosen experts'
    output deltas (each at 1/k').
    """
    names = dict(block.named_parameters())
    outs = []
    for n in range(x.shape[0]):
        chosen = [int(e) for e in choice[n].tolist() if e >= 0]
        weights: dict[str, torch.Tensor] = {}
        added = torch.zeros_like(x[n])
        for e in chosen:
            expert = plugged.experts[e]
            i = expert.layers.index(layer)
            merged, delta = ORACLES[expert.kind](expert.adapter, i, x[n : n + 1])
            for p, w in merged.items():
                key = f"{p}.weight" if f"{p}.weight" in names else f"{p}.base_layer.weight"
                w = w / len(chosen)  # [out, in]
                weights[key] = weights.get(key, names[key]) + (w.T if conv1d else w).to(x.dtype)
            if delta is not None:
                added = added + delta / len(chosen)
        y = functional_call(block, weights, (x[n : n + 1],)) if weights else block(x[n : n + 1])
        outs.append(y[0] + added)
    return torch.stack(outs)


def reference_dispatch(
    x: torch.Tensor,
    base: torch.Tensor,
    choice: torch.Tensor,
    adapters: Sequence[LayerAdapter | None],
) -> torch.Tensor:
    """The plain per-token loop that moe.adapters.bottleneck.grouped_dispatch must equal."""
    out = base.clone()
    for n in range(x.shape[0]):
        chosen = [int(e) for e in choice[n].tolist() if e >= 0]
        for e in chosen:
            adapter = adapters[e]
            assert adapter is not None
            out[n] += adapter_delta(x[n : n + 1], adapter.down, adapter.up)[0] / len(chosen)
    return out


def reference_forward(
    plain: nn.Module, plugged: PluggedSet, x: torch.Tensor, top_k: int, pins: dict[int, int]
) -> tuple[torch.Tensor, list[dict[str, float]]]:
    """The routed forward spelled out on the unwrapped backbone: per token, each expert scores
    cos(x, key) + offset and passes above its threshold, the top-k passing win (a pinned row: its expert
    alone, where it covers the layer), and the MLP block's output is reference_mlp's. Returns (logits,
    per-row decision counts)."""
    family = FAMILIES[plain.config.model_type]
    names = [*plugged.names, "base"]
    counts = [dict.fromkeys(names, 0.0) for _ in range(x.shape[0])]
    blocks = [copy.deepcopy(getattr(layer, family.mlp)) for layer in decoder_layers(plain)]

    def hook(layer: int, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
        h = inputs[0]
        choice = torch.full((h.shape[0] * h.shape[1], top_k), -1, dtype=torch.long)
        for b in range(h.shape[0]):
            for t in range(h.shape[1]):
                row = b * h.shape[1] + t
                if b in pins:
                    e = pins[b]
                    chosen = [e] if layer in plugged.experts[e].layers else []
                else:
                    scored = []
                    for e, expert in enumerate(plugged.experts):
                        if layer in expert.layers:
                            i = expert.layers.index(layer)
                            score = F.cosine_similarity(h[b, t], expert.keys[i], dim=0) + expert.offsets[i]
                            if score > expert.thresholds[i]:
                                scored.append((float(score), e))
                    chosen = [e for _, e in sorted(scored, reverse=True)[:top_k]]
                choice[row, : len(chosen)] = torch.tensor(chosen, dtype=torch.long)
                for e in chosen:
                    counts[b][names[e]] += 1
                if not chosen:
                    counts[b]["base"] += 1
        out = reference_mlp(blocks[layer], h.reshape(-1, h.shape[-1]), choice, plugged, layer, family.conv1d)
        return out.view_as(output)

    handles = [
        getattr(block, family.mlp).register_forward_hook(lambda m, i, o, layer=layer: hook(layer, i, o))
        for layer, block in enumerate(decoder_layers(plain))
    ]
    try:
        return plain(x).logits, counts
    finally:
        for handle in handles:
            handle.remove()


@torch.no_grad()
def reference_decode(
    plain: nn.Module, plugged: PluggedSet, ids: torch.Tensor, pin: int | None = None
) -> tuple[torch.Tensor, list[list[int]]]:
    """A routed forward of one row spelled out token by token on the unwrapped backbone, top-1, with merged
    weights: the oracle for experts that adapt attention (moe.model.routed.RoutedAttention).

    ids [T]. Token t alone goes through the backbone with its KV cache; in each layer, before attention, the experts
    whose weight deltas reach an attention projection (a dotted target, `self_attn.q_proj`) score the attention
    block's input (cos(x, key) + offset > threshold, the best wins; a pin takes its expert where it covers the
    layer); the winner's deltas are merged into the layer's weights (attention and MLP) for this token. A token none
    of them took is decided at the MLP input among the other experts, whose deltas are merged into the MLP (or
    added to its output). So each token's K/V enter the cache as its own route made them. Weights are restored
    after each layer; `plain` is left as it was. Returns (logits [T, V], the choice per token per layer: an index
    into plugged.experts, -1 base).
    """
    family = FAMILIES[plain.config.model_type]
    layers = decoder_layers(plain)
    probe = torch.zeros(1, plugged.keys.shape[-1], dtype=plugged.keys.dtype)
    early = [any(is_attention_target(p) for p in ORACLES[e.kind](e.adapter, 0, probe)[0]) for e in plugged.experts]
    state: dict[str, object] = {}

    def decide(layer: int, h: torch.Tensor, want_early: bool) -> int:
        covering = [e for e, x in enumerate(plugged.experts) if layer in x.layers and early[e] == want_early]
        if pin is not None:
            return pin if pin in covering else -1
        best, chosen = float("-inf"), -1
        for e in covering:
            expert = plugged.experts[e]
            i = expert.layers.index(layer)
            score = float(F.cosine_similarity(h, expert.keys[i], dim=0) + expert.offsets[i])
            if score > float(expert.thresholds[i]) and score > best:
                best, chosen = score, e
        return chosen

    def merge(layer: int, e: int, x: torch.Tensor, only_mlp: bool) -> torch.Tensor | None:
        expert = plugged.experts[e]
        merged, delta = ORACLES[expert.kind](expert.adapter, expert.layers.index(layer), x)
        for p, w in merged.items():
            if only_mlp and is_attention_target(p):
                continue
            weight = layers[layer].get_submodule(p if is_attention_target(p) else f"{family.mlp}.{p}").weight
            state.setdefault("saved", []).append((weight, weight.detach().clone()))
            weight.add_((w.T if family.conv1d else w).to(weight.dtype))
        return delta

    def before_attention(layer: int, args: tuple, kwargs: dict) -> None:
        h = (args[0] if args else kwargs["hidden_states"])[0, -1]
        chosen = decide(layer, h, want_early=True)
        state["choice"] = chosen
        if chosen >= 0:
            state["delta"] = merge(layer, chosen, h[None], only_mlp=False)

    def before_mlp(layer: int, args: tuple) -> None:
        if state["choice"] < 0:
            x = args[0][0, -1]
            chosen = decide(layer, x, want_early=False)
            state["choice"] = chosen
            if chosen >= 0:
                state["delta"] = merge(layer, chosen, x[None], only_mlp=True)
        state.setdefault("choices", []).append(state["choice"])

    def after_mlp(output: torch.Tensor) -> torch.Tensor:
        delta = state.pop("delta", None)
        for weight, saved in state.pop("saved", []):
            weight.copy_(saved)
        return output if delta is None else output + delta.to(output.dtype)

    handles = []
    for layer, block in enumerate(layers):
        handles.append(
            getattr(block, family.attention).register_forward_pre_hook(
                lambda m, a, k, layer=layer: before_attention(layer, a, k), with_kwargs=True
            )
        )
        mlp = getattr(block, family.mlp)
        handles.append(mlp.register_forward_pre_hook(lambda m, a, layer=layer: before_mlp(layer, a)))
        handles.append(mlp.register_forward_hook(lambda m, a, o: after_mlp(o)))
    logits, choices = [], []
    cache = DynamicCache(config=plain.config)
    try:
        for t in range(ids.shape[0]):
            state.clear()
            out = plain(ids[None, t : t + 1], use_cache=True, **{cache_kwarg(plain): cache})
            logits.append(out.logits[0, -1])
            choices.append(list(state.get("choices", [])))
    finally:
        for handle in handles:
            handle.remove()
    return torch.stack(logits), choices
