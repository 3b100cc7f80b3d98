"""An expert: a bottleneck adapter beside the MLP of some layers, and its gate on each of those layers.

The adapter runs in parallel with the frozen MLP block of a layer:

    mlp_out(x) = mlp(x) + up(gelu(down(x)))          down: hidden -> rank, up: rank -> hidden

`up` starts at zero (as litgpt's LoRA does), so a fresh expert changes nothing until trained. The
same code serves every family, since it only needs the MLP block's input and output.

Each expert also carries, per layer it covers, its router gate: a key vector, an offset (its
balancing bias) and a threshold. See moe.router for how they are scored.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from moe.errors import InvalidExpertNameError

NAME_PATTERN = re.compile(r"[a-z0-9][a-z0-9_-]{0,63}")  # the whole name: fullmatch
BASE_ROUTE = "base"  # reserved: the route that runs the backbone's MLP alone
ADAPTER_KIND = "bottleneck"


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


def adapter_delta(x: torch.Tensor, down: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """The adapter's contribution for tokens x: [N, H], down: [H, r], up: [r, H] -> [N, H]."""
    return F.gelu(x @ down) @ up


@dataclass
class Expert:
    """Weights and gates of one expert; tensors indexed by position in `layers`, not by layer number.

    Shapes (Lx = len(layers), H = hidden size, r = rank):
        down [Lx, H, r], up [Lx, r, H], keys [Lx, H], offsets [Lx], thresholds [Lx]
    """

    name: str
    layers: tuple[int, ...]
    down: torch.Tensor
    up: torch.Tensor
    keys: torch.Tensor
    offsets: torch.Tensor
    thresholds: torch.Tensor
    description: str = ""
    examples: tuple[str, ...] = ()
    metadata: dict = field(default_factory=dict)  # provenance, evals, fingerprint: carried, not used here

    def __post_init__(self) -> None:
        check_name(self.name)
        self.layers = tuple(int(i) for i in self.layers)
        n, hidden, rank = self.down.shape
        # internal invariants: files are validated with specific errors before an Expert is built
        assert n == len(self.layers), (n, self.layers)
        assert self.up.shape == (n, rank, hidden), self.up.shape
        assert self.keys.shape == (n, hidden) and self.offsets.shape == (n,) == self.thresholds.shape

    @property
    def rank(self) -> int:
        return int(self.down.shape[2])

    @property
    def hidden_size(self) -> int:
        return int(self.down.shape[1])

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    def tensors(self) -> dict[str, torch.Tensor]:
        return {
            "down": self.down,
            "up": self.up,
            "keys": self.keys,
            "offsets": self.offsets,
            "thresholds": self.thresholds,
        }

    def to(self, device: torch.device | str, dtype: torch.dtype) -> Expert:
        """A copy on device in dtype (thresholds and offsets stay float32: they are compared, not multiplied)."""
        moved = {
            k: v.detach().to(device=device, dtype=torch.float32 if k in ("offsets", "thresholds") else dtype)
            for k, v in self.tensors().items()
        }
        return Expert(
            name=self.name,
            layers=self.layers,
            description=self.description,
            examples=self.examples,
            metadata=dict(self.metadata),
            **moved,
        )

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
        scale = init_scale if init_scale is not None else hidden_size**-0.5
        down = torch.randn(n, hidden_size, rank, generator=generator) * scale
        keys = torch.randn(n, hidden_size, generator=generator)
        return cls(
            name=name,
            layers=tuple(layers),
            down=down,
            up=torch.zeros(n, rank, hidden_size),
            keys=keys / keys.norm(dim=-1, keepdim=True),
            offsets=torch.zeros(n),
            thresholds=torch.full((n,), 2.0),
        )
