"""An expert: an adapter on the MLP of some layers, and its gate on each of those layers.

The adapter is of one kind (moe.adapters.kind: the table of kinds), each kind one module:
- bottleneck (moe.adapters.bottleneck): runs in parallel with the frozen MLP block of a layer;
- lora (moe.adapters.lora): LoRA pairs on the block's own projections, e.g. an imported PEFT adapter.
An Expert holds its adapter and never asks which kind it is.

Each expert also carries, per layer it covers, its router gate: a key vector, an offset (its
balancing bias) and a threshold. See moe.routing.router for how they are scored.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from moe.adapters.bottleneck import BottleneckAdapter
from moe.errors import InvalidExpertNameError

if TYPE_CHECKING:
    from moe.adapters.kind import Adapter

NAME_PATTERN = re.compile(r"[a-z0-9][a-z0-9_-]{0,63}")  # the whole name: fullmatch
BASE_ROUTE = "base"  # reserved: the route that runs the backbone's MLP alone


def check_name(name: str) -> str:
    if not isinstance(name, str):
        raise InvalidExpertNameError(f"an expert name must be a string, got {type(name).__name__}")
    if name == BASE_ROUTE:
        raise InvalidExpertNameError(
            f"the name {BASE_ROUTE!r} is reserved for the base route (the backbone alone); choose another"
        )
    if not NAME_PATTERN.fullmatch(name):
        raise InvalidExpertNameError(
            f"expert name {name!r} is invalid: use 1-64 characters of lowercase letters, digits, '_' or '-', "
            "starting with a letter or digit"
        )
    return name


@dataclass
class Expert:
    """One expert: its adapter (a kind-specific object) and its gate; tensors indexed by position in `layers`,
    not by layer number.

    Shapes (Lx = len(layers), H = hidden size):
        adapter  its kind's adapter (moe.adapters.kind.Adapter), e.g. moe.adapters.bottleneck.BottleneckAdapter
                 (down [Lx, H, r], up [Lx, r, H]) or moe.adapters.lora.LoraAdapter (LoRA pairs on the MLP's
                 projections)
        keys [Lx, H], offsets [Lx], thresholds [Lx]
    `down`, `up` read and set the adapter's own `down`, `up` (the bottleneck kind's; training and tests use
    them): AttributeError for an adapter without them.
    """

    name: str
    layers: tuple[int, ...]
    adapter: Adapter
    keys: torch.Tensor
    offsets: torch.Tensor
    thresholds: torch.Tensor
    description: str = ""
    examples: tuple[str, ...] = ()
    metadata: dict = field(default_factory=dict)  # provenance, evals, fingerprint: carried, not used here

    def __post_init__(self) -> None:
        check_name(self.name)
        self.layers = tuple(int(i) for i in self.layers)
        n, hidden = self.keys.shape
        # internal invariants: files are validated with specific errors before an Expert is built
        assert n == len(self.layers) == self.adapter.num_layers, (n, self.layers)
        assert self.offsets.shape == (n,) == self.thresholds.shape
        self.adapter.check(n, hidden)

    @property
    def kind(self) -> str:
        return self.adapter.kind

    @property
    def rank(self) -> int:
        """The bottleneck's rank; a LoRA expert's largest rank over its projections."""
        return self.adapter.rank

    @property
    def gate_site(self) -> str:
        """Where its gate reads the hidden state: "attention" (the attention block's input: an adapter that
        changes attention is decided before it, moe.model.routed.RoutedAttention) or "mlp" (the MLP input)."""
        return "attention" if self.adapter.routes_before_attention else "mlp"

    @property
    def hidden_size(self) -> int:
        return int(self.keys.shape[1])

    @property
    def down(self) -> torch.Tensor:
        return self._adapter_tensor("down")

    @down.setter
    def down(self, value: torch.Tensor) -> None:
        self._adapter_tensor("down")
        self.adapter.down = value

    @property
    def up(self) -> torch.Tensor:
        return self._adapter_tensor("up")

    @up.setter
    def up(self, value: torch.Tensor) -> None:
        self._adapter_tensor("up")
        self.adapter.up = value

    def _adapter_tensor(self, name: str) -> torch.Tensor:
        try:
            return getattr(self.adapter, name)
        except AttributeError:
            raise AttributeError(f"expert {self.name!r} is a {self.kind} expert: it has no {name}") from None

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    def tensors(self) -> dict[str, torch.Tensor]:
        """Every tensor, by its name in the expert file: the adapter's, then the gate's."""
        return {
            **self.adapter.tensors(),
            "keys": self.keys,
            "offsets": self.offsets,
            "thresholds": self.thresholds,
        }

    def to(self, device: torch.device | str, dtype: torch.dtype) -> Expert:
        """A copy on device in dtype (thresholds, offsets and LoRA scalings stay float32: they are compared or
        are scalars, not weights)."""
        return Expert(
            name=self.name,
            layers=self.layers,
            adapter=self.adapter.to(device, dtype),
            keys=self.keys.detach().to(device, dtype),
            offsets=self.offsets.detach().to(device, torch.float32),
            thresholds=self.thresholds.detach().to(device, torch.float32),
            description=self.description,
            examples=self.examples,
            metadata=dict(self.metadata),
        )

    def weightless(self) -> Expert:
        """Its name, layers, shapes and metadata, with its tensors on the meta device (no memory)."""
        return Expert(
            name=self.name,
            layers=self.layers,
            adapter=self.adapter.weightless(),
            keys=_meta(self.keys),
            offsets=_meta(self.offsets),
            thresholds=_meta(self.thresholds),
            description=self.description,
            examples=self.examples,
            metadata=dict(self.metadata),
        )

    @staticmethod
    def closed_gate(layers: int, hidden_size: int, generator: torch.Generator | None = None) -> dict:
        """Gate tensors that let nothing through (threshold 2 > any cosine): random unit keys, zero offsets."""
        keys = torch.randn(layers, hidden_size, generator=generator)
        return {
            "keys": keys / keys.norm(dim=-1, keepdim=True),
            "offsets": torch.zeros(layers),
            "thresholds": torch.full((layers,), 2.0),
        }

    @classmethod
    def fresh(
        cls,
        name: str,
        hidden_size: int,
        layers: tuple[int, ...] | list[int],
        rank: int = 16,
        generator: torch.Generator | None = None,
        init_scale: float | None = None,
    ) -> Expert:
        """A new untrained expert: `down` random, `up` zero (changes nothing), gate closed (threshold 2 > any
        cosine), so it wins no token until its gate is trained or it is pinned."""
        n = len(layers)
        adapter = BottleneckAdapter.fresh(n, hidden_size, rank, generator, init_scale)  # draws first: seeds stay
        return cls(name=name, layers=tuple(layers), adapter=adapter, **cls.closed_gate(n, hidden_size, generator))


def _meta(t: torch.Tensor) -> torch.Tensor:
    return torch.empty(t.shape, dtype=t.dtype, device="meta")
