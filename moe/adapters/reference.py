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

from moe.adapters.bottleneck import BOTTLENECK, BottleneckAdapter, LayerAdapter, adapter_delta
from moe.adapters.lora import LORA, LoraAdapter
from moe.adapters.slots import PluggedSet
from moe.model.backbone import FAMILIES, decoder_layers

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
