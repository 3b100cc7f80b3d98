"""Composition: what a candidate expert does to the domains already served, in token mode, and the repair of
its thresholds so that it leaves them as they were.

Each domain is measured on a small text sample: the base calibration text, and every plugged expert's own
`domain_sample` (carried in its file, see moe.adapters.file; an expert without one is measured on its example prompts).

A pass runs one sample in token mode under a plugged set (batched forwards, nothing plugged or changed) and
records, besides the summed NLL of the sample's tokens, for each layer the candidate covers and from the MLP
inputs x [N, H] of the sample's real tokens:

    taken     decisions the candidate wins (when the set holds it)
    winning   [N] the candidate's score where it would win the token if its threshold let it: its score
              beats the k-th best score among the other experts eligible there; -inf elsewhere. At threshold
              t the candidate wins exactly the decisions whose winning score is > t (on this flow).

Scores are independent (no softmax), so moving the candidate's thresholds changes no other expert's score;
raising one only gives tokens back to whoever had them (another expert or the base route).

The repair raises, per covered layer, the candidate's threshold to the lowest value at which at most
`fraction * cap` of a sample's winning scores pass, for every sample and its cap. It is fitted first on the
flow without the candidate (what it meets once it takes little), then re-checked on the flow with the repaired
candidate plugged (its own decisions at earlier layers change later layers' inputs) and raised again where a
take is still over its cap; thresholds only go up.

Shapes: N = real tokens of a sample, E = experts in a set, H = hidden, Lc = layers the candidate covers.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from moe.adapters.expert import Expert
from moe.adapters.slots import PluggedSet
from moe.model.routed import RoutedModel
from moe.model.text_batches import batches, forward, perplexity, texts, token_nll
from moe.routing.context import domain_texts
from moe.routing.router import RoutingSpec, choose_experts, gate_scores

BASE_SAMPLE = "base"  # the base calibration text's sample name (the base route's name: no expert can take it)
MAX_TOKENS = 128  # tokens per text an admission pass scores (longer ones are cut)


def domain_sample(expert: Expert) -> tuple[list[str], str]:
    """The texts an expert's domain is measured on, and what they are: its stored `domain_sample`, or (for a
    file without one) its example prompts (moe.routing.context.domain_texts: the router is fitted on the same)."""
    return domain_texts(expert)


@dataclass
class SamplePass:
    """One sample's token-mode pass under a plugged set; per-layer lists follow the candidate's layers."""

    nll: float  # summed NLL of the scored tokens
    tokens: int  # scored tokens
    decisions: int  # real tokens: routing decisions per layer
    taken: list[int] = field(default_factory=list)  # decisions the candidate won (0 when it is not in the set)
    winning: list[torch.Tensor] = field(default_factory=list)  # [N] float32 on CPU, see the module docstring

    @property
    def ppl(self) -> float:
        return perplexity(self.nll, self.tokens)

    def take_rates(self) -> list[float]:
        return [t / self.decisions if self.decisions else 0.0 for t in self.taken]


def winning_scores(scores: torch.Tensor, thresholds: torch.Tensor, slot: int, top_k: int) -> torch.Tensor:
    """scores [N, E] with the candidate at `slot`, thresholds [E] -> [N]: the candidate's score where it beats
    the top_k-th eligible other expert (so it would be chosen if eligible), -inf elsewhere."""
    others = scores.masked_fill(scores <= thresholds, float("-inf"))  # ineligible others cannot block it
    others[:, slot] = float("-inf")
    k = min(top_k, scores.shape[1])
    kth_other = others.topk(k, dim=1).values[:, -1]  # [N]; -inf when fewer than k others are eligible
    mine = scores[:, slot]
    return torch.where(mine > kth_other, mine, torch.full_like(mine, float("-inf")))


@torch.no_grad()
def sample_pass(
    model: RoutedModel,
    tokenizer,
    strings: Sequence[str],
    plugged: PluggedSet,
    scoring: PluggedSet | None = None,
    candidate: str | None = None,
    max_tokens: int = MAX_TOKENS,
    batch_size: int = 16,
) -> SamplePass:
    """Run `strings` in token mode under `plugged`; score the candidate named `candidate` in `scoring` (a set
    that holds it: `plugged` itself, or the set with it when `plugged` is the set without it)."""
    result = SamplePass(0.0, 0, 0)
    layers: tuple[int, ...] = ()
    slot = -1
    if candidate is not None and scoring is not None:
        slot = scoring.index(candidate)
        layers = scoring.get(candidate).layers  # by name: a slot is a column, not a position
        result.taken = [0] * len(layers)
    applied = candidate is not None and candidate in plugged
    # one decision per token per layer, taken at two sites (moe.model.routed): experts that adapt attention are
    # decided at the attention input (scoring.before_attention[l]), the rest at the MLP input among the tokens no
    # early expert took. The candidate is scored where the router decides it, against that site's columns.
    early_site = candidate is not None and scoring is not None and scoring.get(candidate).gate_site == "attention"
    splits = [
        scoring.before_attention[layer] if scoring is not None and scoring.before_attention else None
        for layer in layers
    ]
    winning: list[list[torch.Tensor]] = [[] for _ in layers]
    for batch in batches(tokenizer, texts(list(strings)), batch_size, max_tokens, eos=False):
        batch = batch.to(model.device)
        out = forward(
            model,
            batch,
            [RoutingSpec()] * len(batch),
            plugged,
            capture=bool(layers),
            capture_attention=any(split is not None for split in splits),
        )
        nll, count = token_nll(out.logits, batch)
        result.nll += float(nll.sum())
        result.tokens += int(count.sum())
        real = batch.mask.bool()
        result.decisions += int(real.sum())
        for i, layer in enumerate(layers):
            assert scoring is not None
            split = splits[i]
            thresholds, covers = scoring.thresholds[layer], scoring.covers[layer]
            taken_early: torch.Tensor | None = None  # [N]: tokens an early expert took (out of the MLP decision)
            if split is not None:
                a_unit = F.normalize(out.attention_inputs[layer][real], dim=-1)  # [N, H]
                a_scores = gate_scores(a_unit, scoring.keys[layer], scoring.offsets[layer])  # [N, E]
                early = choose_experts(a_scores, split.thresholds, None, None, split.covers, model.router.top_k)
                taken_early = (early >= 0).any(dim=1)
            if early_site:
                assert split is not None, "an attention-site candidate has an early split on every layer it covers"
                scores, thresholds, covers = a_scores, split.thresholds, split.covers
            else:
                x_unit = F.normalize(out.mlp_inputs[layer][real], dim=-1)  # [N, H], as the router normalises it
                scores = gate_scores(x_unit, scoring.keys[layer], scoring.offsets[layer])  # [N, E]
                if split is not None:
                    thresholds, covers = split.late_thresholds, split.late_covers
            wins = winning_scores(scores, thresholds, slot, model.router.top_k)
            if applied:
                choice = choose_experts(scores, thresholds, None, None, covers, model.router.top_k)  # [N, k]
                mine = (choice == slot).any(dim=1)
                if taken_early is not None and not early_site:
                    mine &= ~taken_early
                result.taken[i] += int(mine.sum())
            if taken_early is not None and not early_site:
                wins = wins.masked_fill(taken_early, float("-inf"))  # an early route keeps the token
            winning[i].append(wins.cpu())
    result.winning = [torch.cat(w) if w else torch.empty(0) for w in winning]
    return result


@torch.no_grad()
def context_sample_pass(
    model: RoutedModel,
    tokenizer,
    strings: Sequence[str],
    plugged: PluggedSet,
    candidate: str,
    max_tokens: int = MAX_TOKENS,
    batch_size: int = 16,
) -> SamplePass:
    """Run `strings` in token mode under `plugged`, a set that holds the candidate and whose context router routes
    token mode (plugged.gates: moe.routing.context). Per layer the candidate covers, from each text's MLP inputs
    as they flowed: `taken`, the decisions its token classifier gives the candidate; `winning` [N], the candidate's
    probability where it is the most probable class (it wins exactly where that is above its floor), -inf
    elsewhere and on the special prefix. What the floor repair fits on, as the gates' repair fits thresholds on
    winning scores."""
    router = plugged.context
    assert router is not None and router.layers and plugged.gates is not None, "the set has no context gates"
    c = router.classes.index(candidate)
    layers = plugged.get(candidate).layers
    result = SamplePass(0.0, 0, 0, taken=[0] * len(layers))
    winning: list[list[torch.Tensor]] = [[] for _ in layers]
    for batch in batches(tokenizer, texts(list(strings)), batch_size, max_tokens, eos=False):
        batch = batch.to(model.device)
        out = forward(model, batch, [RoutingSpec()] * len(batch), plugged, capture=True)
        nll, count = token_nll(out.logits, batch)
        result.nll += float(nll.sum())
        result.tokens += int(count.sum())
        real = batch.mask.bool()
        result.decisions += int(real.sum())
        # the whole batch's context means at once (right-padded: a row's padding comes after its tokens, so
        # it joins no real position's mean); per row, equal to context_means(its real inputs, router.skip)
        counted = real.clone()
        counted[:, : router.skip] = False  # the prefix joins no context: always base
        unit = F.normalize(torch.stack(out.mlp_inputs, dim=2).float(), dim=-1) * counted[..., None, None]
        means = F.normalize(unit.cumsum(dim=1), dim=-1)[real].cpu()  # [N, L, H], the real tokens row by row
        counted = counted[real].cpu()  # [N]
        for i, layer in enumerate(layers):
            classifier = router.layers[layer]
            best, choice = classifier.probabilities(means[:, layer]).max(dim=-1)  # [N]
            win = torch.where((choice == c) & counted, best, torch.full_like(best, float("-inf")))
            winning[i].append(win)
            result.taken[i] += int((win > classifier.floors[c]).sum())
    result.winning = [torch.cat(w) if w else torch.empty(0) for w in winning]
    return result


def cap_threshold(scores: torch.Tensor, share: float) -> float:
    """The lowest threshold at which at most floor(share * N) of these N scores pass (are > it); -inf when no
    score needs blocking. Scores that are not finite count in N and never pass: a decision the candidate does not
    win (winning_scores' -inf). The one rule for a threshold under a cap: admission's repair and train-expert's
    stage 2 (its thresholds on calibration text) both fit with it."""
    allowed = int(math.floor(share * len(scores)))
    finite = scores[torch.isfinite(scores)]
    if allowed >= len(finite):
        return float("-inf")
    return float(finite.sort(descending=True).values[allowed])


def raised_thresholds(
    thresholds: Sequence[float], passes: dict[str, SamplePass], caps: dict[str, float], fraction: float
) -> list[float]:
    """Per candidate layer, the threshold raised (never lowered) so that every sample's winning scores pass at
    most `fraction * cap` of its decisions."""
    out = list(thresholds)
    for name, result in passes.items():
        if name not in caps:
            continue
        for i, winning in enumerate(result.winning):
            needed = cap_threshold(winning, fraction * caps[name])
            if needed > out[i]:
                out[i] = needed
    return out


def with_thresholds(expert: Expert, thresholds: Sequence[float]) -> Expert:
    """The same expert (tensors shared) with new per-layer thresholds."""
    return Expert(
        name=expert.name,
        layers=expert.layers,
        adapter=expert.adapter,  # either kind: bottleneck or LoRA
        keys=expert.keys,
        offsets=expert.offsets,
        thresholds=torch.tensor(list(thresholds), dtype=torch.float32, device=expert.thresholds.device),
        description=expert.description,
        examples=expert.examples,
        metadata=dict(expert.metadata),
    )
