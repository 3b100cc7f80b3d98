"""Text into scored batches, their routed forward, per-token NLL and the MLP inputs the router sees.

Training, distillation, evaluation and the admission report all batch text the same way:

    encode      special prefix + prompt + target (+ EOS), truncated; `scored` marks the target tokens
    batches     right-padded TokenBatch of ids, mask and scored flags  [B, T]
    forward     one RoutedModel forward of a TokenBatch under per-row RoutingSpecs
    token_nll   summed next-token NLL of each row's scored tokens, and their count (the one NLL: every loss,
                held-out score and perplexity in plugmoe is computed with it; summed_nll and perplexity
                sum it over batches)
    capture_mlp_inputs
                per layer, the MLP inputs of real tokens: what a gate is trained on and what admission scores

Shapes: B = rows, T = tokens, V = vocabulary, L = layers, H = hidden, N = captured tokens.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F

from moe.adapters.slots import PluggedSet
from moe.model.routed import RoutedModel, RoutedOutput
from moe.routing.router import RoutingSpec, StepRouting


class PromptAndTarget(Protocol):
    """A text to score: `prompt` is context (not scored, "" for plain text), `target` is scored."""

    @property
    def prompt(self) -> str: ...

    @property
    def target(self) -> str: ...


@dataclass(frozen=True)
class Text:
    """A plain PromptAndTarget."""

    prompt: str
    target: str


def texts(strings: Sequence[str]) -> list[Text]:
    """Plain texts, every token scored."""
    return [Text("", s) for s in strings]


@dataclass
class TokenBatch:
    """Right-padded examples: ids, mask and scored are [B, T]; scored marks target tokens.

    prefix [B] is the number of special-prefix tokens at the start of each row (see encode).
    """

    ids: torch.Tensor
    mask: torch.Tensor
    scored: torch.Tensor
    prefix: torch.Tensor

    def to(self, device: torch.device | str) -> TokenBatch:
        return TokenBatch(self.ids.to(device), self.mask.to(device), self.scored.to(device), self.prefix.to(device))

    def __len__(self) -> int:
        return int(self.ids.shape[0])

    @property
    def targets(self) -> torch.Tensor:
        """[B, T-1] bool: positions whose next token is scored (the prediction of token t+1 at t)."""
        return self.scored[:, 1:] & self.mask[:, 1:].bool()


def special_prefix(tokenizer) -> list[int]:
    """The ids a tokenizer puts before any text (e.g. BOS): what it returns for the empty string."""
    return list(tokenizer("")["input_ids"])


def encode(tokenizer, item: PromptAndTarget, max_tokens: int, eos: bool = True) -> tuple[list[int], list[bool]]:
    """(ids, scored) for one item: ids = special prefix + prompt + target + EOS (when eos), truncated to
    max_tokens; scored[i] says whether token i is a target token (its prediction is trained/scored)."""
    prompt_ids = tokenizer(item.prompt)["input_ids"]  # [special prefix] + prompt
    target_ids = tokenizer(item.target, add_special_tokens=False)["input_ids"]
    if eos and tokenizer.eos_token_id is not None:
        target_ids = [*target_ids, tokenizer.eos_token_id]
    ids = prompt_ids + target_ids
    scored = [False] * len(prompt_ids) + [True] * len(target_ids)
    if not item.prompt and prompt_ids:
        scored[0] = False  # the special prefix token of a text record is context, not a prediction
    return ids[:max_tokens], scored[:max_tokens]


def collate(encoded: Sequence[tuple[list[int], list[bool]]], pad_id: int, prefix: int = 0) -> TokenBatch:
    width = max(len(ids) for ids, _ in encoded)
    ids = torch.full((len(encoded), width), pad_id, dtype=torch.long)
    mask = torch.zeros(len(encoded), width, dtype=torch.long)
    scored = torch.zeros(len(encoded), width, dtype=torch.bool)
    for row, (tokens, flags) in enumerate(encoded):
        ids[row, : len(tokens)] = torch.tensor(tokens, dtype=torch.long)
        mask[row, : len(tokens)] = 1
        scored[row, : len(flags)] = torch.tensor(flags, dtype=torch.bool)
    lengths = mask.sum(dim=1)
    return TokenBatch(ids, mask, scored, torch.minimum(lengths, torch.full_like(lengths, prefix)))


def batches(
    tokenizer, items: Sequence[PromptAndTarget], batch_size: int, max_tokens: int, eos: bool = True
) -> list[TokenBatch]:
    """Items in order, `batch_size` per batch (eos=False: prompts as the server sees them)."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    prefix = len(special_prefix(tokenizer))
    encoded = [encode(tokenizer, item, max_tokens, eos) for item in items]
    return [collate(encoded[i : i + batch_size], pad, prefix) for i in range(0, len(encoded), batch_size)]


def forward(
    model: RoutedModel,
    batch: TokenBatch,
    specs: Sequence[RoutingSpec],
    plugged: PluggedSet | None = None,
    observe: bool = False,
    capture: bool = False,
    capture_attention: bool = False,
) -> RoutedOutput:
    """One routed forward of a TokenBatch (observe: trace the routes without applying experts; capture: keep the
    MLP inputs, capture_attention: the attention inputs)."""
    plugged = plugged if plugged is not None else model.plugged
    routing = StepRouting.from_specs(list(specs), plugged, observe=[observe] * len(specs))
    return model(
        batch.ids,
        attention_mask=batch.mask,
        routing=routing,
        plugged=plugged,
        capture_mlp_inputs=capture,
        capture_attention_inputs=capture_attention,
    )


def token_nll(logits: torch.Tensor, batch: TokenBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed next-token NLL of each row's scored tokens and their count: logits [B, T, V] -> ([B], [B])."""
    targets = batch.targets  # [B, T-1]
    nll = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), batch.ids[:, 1:], reduction="none")  # [B, T-1]
    nll = nll * targets
    return nll.sum(dim=1), targets.sum(dim=1)


@torch.no_grad()
def summed_nll(batches: Iterable[TokenBatch], logits_of: Callable[[TokenBatch], torch.Tensor]) -> tuple[float, int]:
    """token_nll over every batch, summed: (NLL of all scored tokens, their count). `logits_of` runs the model
    on a batch (a routed forward, a plain HF or PEFT model) and returns its logits [B, T, V]."""
    total, count = 0.0, 0
    for batch in batches:
        nll, n = token_nll(logits_of(batch), batch)
        total, count = total + float(nll.sum()), count + int(n.sum())
    return total, count


def perplexity(nll: float, count: int) -> float:
    """exp of the mean NLL per scored token (1.0 with no token scored)."""
    return math.exp(nll / max(count, 1))


@torch.no_grad()
def capture_mlp_inputs(
    model: RoutedModel,
    tokenizer,
    items: Sequence[PromptAndTarget],
    spec: RoutingSpec,
    plugged: PluggedSet | None = None,
    max_tokens: int = 128,
    limit: int | None = None,
    batch_size: int = 32,
    domain: bool = False,
    device: torch.device | str = "cpu",
    site: str = "mlp",
) -> list[torch.Tensor]:
    """Per backbone layer, the MLP inputs of real tokens as they flow under `spec` -> L x [N, H] float32
    (site "attention": the attention blocks' inputs, what the gate of an expert that adapts attention reads;
    Expert.gate_site).

    The rule for the first tokens: the special prefix a tokenizer puts before every text (BOS) reaches the
    router on every request, so it is captured as any token is, except for a domain's own positives
    (domain=True): it carries no domain, and a gate trained to accept it would fire on every request.
    No EOS is appended: a sequence ends when EOS is sampled, so the router never sees one as input.
    Items are read in order; capture stops after `limit` tokens (None: all).
    """
    per_layer: list[list[torch.Tensor]] = [[] for _ in range(model.num_layers)]
    seen = 0
    for batch in batches(tokenizer, items, batch_size, max_tokens, eos=False):
        batch = batch.to(model.device)
        attention = site == "attention"
        out = forward(model, batch, [spec] * len(batch), plugged, capture=not attention, capture_attention=attention)
        real = batch.mask.bool()
        if domain:
            positions = torch.arange(real.shape[1], device=real.device)[None, :]
            real = real & (positions >= batch.prefix[:, None])
        for layer, x in enumerate(out.attention_inputs if attention else out.mlp_inputs):
            per_layer[layer].append(x[real].to(device, torch.float32))
        seen += int(real.sum())
        if limit is not None and seen >= limit:
            break
    hidden = model.hidden_size
    return [torch.cat(chunks)[:limit] if chunks else torch.empty(0, hidden, device=device) for chunks in per_layer]
