"""The plain per-token loops the batched paths must equal: test oracles, never run by serving.

Each kind gives, for one token on one layer, what its expert adds (`ORACLES[kind]`): weight deltas merged into the
block's own parameters (a kind run inside the block: LoRA), or a delta added to the block's output (a kind run
after it: bottleneck). `reference_mlp` runs a token through the block with every chosen expert, whatever the
kinds, each at weight 1/k'; `reference_dispatch` is the bottleneck kind's grouped dispatch, spelled out.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn
from torch.func import functional_call

from moe.adapters.bottleneck import BOTTLENECK, BottleneckAdapter, LayerAdapter, adapter_delta
from moe.adapters.lora import LORA, LoraAdapter
from moe.adapters.slots import PluggedSet

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
