"""Choosing the next token of each row of a batch, each row with its own sampling settings.

Semantics of `sample` (what the batched code computes):

    for i in range(B):
        if step[i] < params[i].min_new_tokens: logits[i, eos] = -inf
        if params[i].temperature < GREEDY_BELOW: token[i] = argmax(logits[i])
        else:
            p = softmax(logits[i] / temperature)
            keep the top_k most likely tokens (0: all), then the smallest set whose mass reaches top_p
            token[i] = multinomial(p restricted and renormalised, generator=generators[i])

A row's generator is seeded from its request's seed, so the same seed gives the same tokens.

Temperatures below GREEDY_BELOW (1e-2) are greedy: dividing logits by a tinier temperature overflows them
to infinity (vLLM treats near-zero temperatures the same way), and the distribution is one-hot long before.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import torch

from moe.errors import SamplingParamsError

GREEDY_BELOW = 1e-2  # temperatures below this sample greedily
MIN_TOP_P = 1e-6  # a smaller nucleus underflows in float32; use top_k=1 for the single most likely token
MAX_SEED = 2**63 - 1  # torch.Generator seeds are 64-bit; JSON clients handle signed 64-bit integers


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    top_k: int = 0  # 0: no limit
    seed: int | None = None
    min_new_tokens: int = 0

    def __post_init__(self) -> None:
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise SamplingParamsError(f"temperature must be a finite number >= 0, got {self.temperature}")
        if not (math.isfinite(self.top_p) and MIN_TOP_P <= self.top_p <= 1.0):
            raise SamplingParamsError(f"top_p must be in [{MIN_TOP_P}, 1], got {self.top_p}")
        if self.top_k < 0:
            raise SamplingParamsError(f"top_k must be >= 0, got {self.top_k}")
        if self.seed is not None and not 0 <= self.seed <= MAX_SEED:
            raise SamplingParamsError(f"seed must be in [0, {MAX_SEED}], got {self.seed}")
        if self.min_new_tokens < 0:
            raise SamplingParamsError(f"min_new_tokens must be >= 0, got {self.min_new_tokens}")

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW

    def generator(self, device: torch.device | str = "cpu") -> torch.Generator | None:
        """The row's own random stream (None for greedy rows: they draw nothing)."""
        if self.greedy:
            return None
        generator = torch.Generator(device=device)
        generator.manual_seed(self.seed if self.seed is not None else random.getrandbits(63))
        return generator


def sample(
    logits: torch.Tensor | list[torch.Tensor],
    params: list[SamplingParams],
    generators: list[torch.Generator | None],
    steps: list[int],
    eos_ids: tuple[int, ...] = (),
) -> list[int]:
    """logits [B, V] (the last position of each row, or a list of B rows [V]); steps[i] = tokens row i
    generated so far -> B token ids."""
    if isinstance(logits, list):
        logits = torch.stack(logits)
    batch = logits.shape[0]
    logits = logits.float()
    blocked = [i for i in range(batch) if steps[i] < params[i].min_new_tokens]
    if blocked and eos_ids:
        logits = logits.clone()
        rows = torch.tensor(blocked, device=logits.device)
        logits[rows[:, None], torch.tensor(eos_ids, device=logits.device)[None, :]] = float("-inf")
    tokens = logits.argmax(dim=-1)  # [B]; kept for greedy rows
    sampled = [i for i in range(batch) if not params[i].greedy]
    if not sampled:
        return tokens.tolist()
    rows = torch.tensor(sampled, device=logits.device)
    temperature = torch.tensor([params[i].temperature for i in sampled], device=logits.device)
    probs = torch.softmax(logits[rows] / temperature[:, None], dim=-1)  # [S, V]
    probs = _restrict(probs, [params[i].top_k for i in sampled], [params[i].top_p for i in sampled])
    out = tokens.tolist()
    for j, i in enumerate(sampled):
        out[i] = int(torch.multinomial(probs[j], 1, generator=generators[i]).item())
    return out


def _restrict(probs: torch.Tensor, top_k: list[int], top_p: list[float]) -> torch.Tensor:
    """probs [S, V] -> renormalised probs keeping each row's top_k tokens and then its top_p nucleus."""
    if all(k == 0 for k in top_k) and all(p >= 1.0 for p in top_p):
        return probs
    vocab = probs.shape[1]
    sorted_probs, order = probs.sort(dim=-1, descending=True)  # [S, V]
    rank = torch.arange(vocab, device=probs.device)[None, :]
    k = torch.tensor([kk if kk > 0 else vocab for kk in top_k], device=probs.device)[:, None]
    keep = rank < k
    # nucleus: keep a token when the mass of the tokens before it is below top_p (the first is always kept)
    before = sorted_probs.cumsum(dim=-1) - sorted_probs
    keep &= before < torch.tensor(top_p, device=probs.device)[:, None]
    sorted_probs = sorted_probs * keep
    restricted = torch.zeros_like(probs).scatter_(1, order, sorted_probs)
    return restricted / restricted.sum(dim=-1, keepdim=True)
