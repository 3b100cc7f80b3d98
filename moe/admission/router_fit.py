"""The integration step after a plug: fit the context router of the plugged set (moe.routing.context).

    fitter = ContextRouterFitter(model, tokenizer)
    fitter.offer(experts)      fit the router for exactly these experts (in plug order) and hand it to the model's
                               slots (ExpertSlots.offer_router), which publish it with the set of those experts:
                               call it before the plug or swap (off the engine thread), or after (it then
                               republishes the current set with it)

What it is fitted on: the MLP inputs of each expert's domain texts (its `domain_sample`, or its example prompts:
moe.routing.context.domain_texts) as they flow on the backbone (RoutingSpec("off"): what sequence mode observes)
and with the expert pinned (what token mode meets at later layers when it routes them right), and of the base
calibration text on the backbone (moe/admission/calibration.txt), split into a part to fit on and a held-out
part that sets the probability floors (at most `cap` of its positions to any expert). The inputs do not depend
on the set, so they are captured once: the calibration text's on the first fit, an expert's when it is first
seen (cached by name and sample digest). A plug then costs one expert's capture and a refit over the set; the
fit is deterministic (admission's repair may replace a set's router by one with the candidate's floors raised:
`keep`), and the slots keep the previous sets' routers, so an unplug publishes the router it had
before, the same object. A repaired expert carries its raised floors in its file (evals.admission_repair,
written by admission): every refit of a set that holds it keeps at least those floors (`carried_floors`), so a
later plug, or a restarted server, serves it with its repair; fitting stays a pure function of the set's files.

No router is fitted (None: routing falls back to the cosine gates, and sequence mode to their counts,
moe.decode.prefill) for an empty set or when an expert has fewer than MIN_TEXTS domain texts (a file with no
domain sample and a few example prompts, as tests' tiny experts are). token=True (default) also fits the per-layer token
classifiers, which token mode then routes by (PluggedSet.gates); token=False, sequence mode only.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from moe.adapters.expert import Expert
from moe.adapters.slots import ROUTERS_KEPT, PluggedSet
from moe.model.routed import RoutedModel
from moe.model.text_batches import batches, forward, special_prefix, texts
from moe.routing.context import ContextRouter, domain_texts, fit_context_router, sample_digest
from moe.routing.router import RoutingSpec

logger = logging.getLogger(__name__)

DEFAULT_CALIBRATION = Path(__file__).with_name("calibration.txt")
CALIBRATION_HOLDOUT = 0.3  # share of the calibration lines kept out of the fit, to set the floors on
SAMPLE_TEXTS = 64  # domain texts per expert a fit reads (a domain sample holds at most this many)
# the fewest domain texts an expert needs for a router to be fitted: a classifier fitted on one or two example
# prompts learns those prompts, not a domain, and sends the rest of the domain to base (worse than the gates)
MIN_TEXTS = 8
FIT_MAX_TOKENS = 128  # tokens per text captured


@torch.no_grad()
def capture_texts(
    model: RoutedModel,
    tokenizer,
    strings: Sequence[str],
    max_tokens: int = FIT_MAX_TOKENS,
    batch_size: int = 16,
    spec: RoutingSpec | None = None,
    plugged: PluggedSet | None = None,
) -> list[torch.Tensor]:
    """Each text's MLP inputs under `spec` (default off: the backbone alone): per text x [T, L, H] float32 on
    CPU (its real tokens, the special prefix included)."""
    inputs = []
    spec = spec or RoutingSpec("off")
    for batch in batches(tokenizer, texts(list(strings)), batch_size, max_tokens, eos=False):
        batch = batch.to(model.device)
        out = forward(model, batch, [spec] * len(batch), plugged, capture=True)
        stacked = torch.stack(out.mlp_inputs, dim=2)  # [B, T, L, H], padded
        for row in range(len(batch)):
            inputs.append(stacked[row][batch.mask[row].bool()].float().cpu())  # [T_i, L, H], real tokens
    return inputs


def carried_floors(expert: Expert) -> dict[int, float]:
    """The floors an admission's repair raised for this expert, per layer (its file's evals.admission_repair,
    moe.admission.report): every later refit of a set holding it keeps at least these, so a plug after a
    repaired plug keeps the repair. Empty when the repair raised thresholds (the gates) or there was none."""
    repair = (expert.metadata.get("evals") or {}).get("admission_repair") or {}
    layers, floors = repair.get("layers"), repair.get("floors_after")
    if repair.get("raised") != "floors" or not layers or not floors:
        return {}
    return {int(layer): float(floor) for layer, floor in zip(layers, floors, strict=True)}


def _set_key(experts: Sequence[Expert]) -> tuple:
    """What a fitted router depends on: each expert's name, domain sample and carried floors, in order."""
    return tuple((e.name, sample_digest(e), tuple(carried_floors(e).items())) for e in experts)


class ContextRouterFitter:
    """Fits plugged sets' context routers for one model and tokenizer (see the module docstring)."""

    def __init__(
        self,
        model: RoutedModel,
        tokenizer,
        calibration: Sequence[str] | None = None,
        holdout: float = CALIBRATION_HOLDOUT,
        cap: float = 1e-3,
        token: bool = True,
        max_tokens: int = FIT_MAX_TOKENS,
        seed: int = 0,
    ) -> None:
        self.model, self.tokenizer = model, tokenizer
        if calibration is None:
            calibration = [
                line for line in DEFAULT_CALIBRATION.read_text(encoding="utf-8").splitlines() if line.strip()
            ]
        order = list(range(len(calibration)))
        random.Random(f"{seed}/calibration-holdout").shuffle(order)
        cut = int(round(len(calibration) * holdout))
        self._calibration_fit = [calibration[i] for i in sorted(order[cut:])]
        self._calibration_held = [calibration[i] for i in sorted(order[:cut])]
        if not self._calibration_fit or not self._calibration_held:
            raise ValueError(
                f"the calibration text has {len(calibration)} passages: too few to split at holdout {holdout}"
            )
        self.cap, self.token, self.max_tokens = cap, token, max_tokens
        self.skip = len(special_prefix(tokenizer))
        self._base: tuple[list[torch.Tensor], list[torch.Tensor]] | None = None
        self._inputs: dict[tuple[str, str], list[torch.Tensor]] = {}  # (name, sample digest) -> per text [T, L, H]
        self._routers: dict[tuple, ContextRouter] = {}  # by _set_key of the set fitted for, newest last

    def _capture(self, strings: Sequence[str]) -> list[torch.Tensor]:
        return capture_texts(self.model, self.tokenizer, strings, self.max_tokens)

    def inputs(self, expert: Expert) -> list[torch.Tensor]:
        """The expert's domain texts' MLP inputs (captured once per name and sample)."""
        key = (expert.name, sample_digest(expert))
        if key not in self._inputs:
            strings = domain_texts(expert)[0][:SAMPLE_TEXTS]
            inputs = self._capture(strings)
            pinned = self._set_with(expert)
            if pinned is not None:  # also as its texts flow when routed to it: what token mode meets at later layers
                spec = RoutingSpec("pin", expert.name)
                inputs += capture_texts(self.model, self.tokenizer, strings, self.max_tokens, spec=spec, plugged=pinned)
            self._inputs[key] = inputs
        return self._inputs[key]

    def _set_with(self, expert: Expert) -> PluggedSet | None:
        """A set holding the expert's weights, to pin it in: its own (a loaded expert), or the model's (a plugged
        handle of the same texts); None when neither holds them (then only the backbone flow is fitted on)."""
        model = self.model
        if expert.keys.device.type != "meta":
            own = expert.to(model.device, model.dtype)
            return PluggedSet.build(
                (own,),
                model.num_layers,
                model.hidden_size,
                model.device,
                model.dtype,
                projections=model.target_shapes,  # MLP and attention: an expert may adapt either
            )
        plugged = model.plugged
        if expert.name in plugged and sample_digest(plugged.get(expert.name)) == sample_digest(expert):
            return plugged
        logger.info("%s: fitted on the backbone flow only (no weights at hand to pin it)", expert.name)
        return None

    def fit(self, experts: Sequence[Expert]) -> ContextRouter | None:
        """The router of a set of exactly these experts, in this order (None: empty, or an expert has fewer than
        MIN_TEXTS domain texts)."""
        missing = [e.name for e in experts if len(domain_texts(e)[0]) < MIN_TEXTS]
        if not experts or missing:
            if missing:
                logger.info(
                    "no context router (the gates route): %s have fewer than %d domain texts", missing, MIN_TEXTS
                )
            return None
        fitted_on = tuple((e.name, sample_digest(e)) for e in experts)
        key = _set_key(experts)
        if key in self._routers:  # e.g. admission fitted it, then the swap asks again
            return self._routers[key]
        started = time.perf_counter()
        if self._base is None:
            self._base = (self._capture(self._calibration_fit), self._capture(self._calibration_held))
        samples = {e.name: self.inputs(e) for e in experts}
        router = fit_context_router(
            samples, self._base[0], self._base[1], self.skip, self.cap, token=self.token, fitted_on=fitted_on
        )
        if router.layers:  # an earlier admission's repair stays: its floors are the least the refit keeps
            for expert in experts:
                carried = carried_floors(expert)
                if carried:
                    now = router.token_floors(expert.name, list(carried))
                    raised = {layer: max(f, n) for (layer, f), n in zip(carried.items(), now, strict=True)}
                    router = router.with_token_floors(expert.name, raised)
        logger.info("context router for %s fitted in %.1f s", [e.name for e in experts], time.perf_counter() - started)
        self._remember(key, router)
        return router

    def _remember(self, key: tuple, router: ContextRouter) -> None:
        self._routers.pop(key, None)
        self._routers[key] = router
        while len(self._routers) > ROUTERS_KEPT:
            self._routers.pop(next(iter(self._routers)))

    def keep(self, router: ContextRouter, experts: Sequence[Expert]) -> None:
        """Keep `router` as the one of the set of these experts (its `fitted_on`; the repaired candidate among
        them, carrying its repair), in place of the fit: what admission's repair leaves (the candidate's floors
        raised), so that `offer` for that set hands out this one, the same object."""
        assert router.fitted_on == tuple((e.name, sample_digest(e)) for e in experts), router.fitted_on
        self._remember(_set_key(experts), router)

    def measure(self, router: ContextRouter, expert: Expert) -> dict[str, float | int | str]:
        """How the router treats an expert's domain (admission reports it, so a plug that is safe but useless says
        so) and the held-out calibration text:

            sequence_recall               share of its domain texts whose sequence decision is the expert
            token_recall                  share of its texts' (token, layer) decisions after the prefix that go
                                          to it, as they flow when routed to it (pinned; else on the backbone)
            sequence_false_positive_rate  share of held-out calibration texts decided for the expert
            token_false_positive_rate     the largest share, over layers, of their positions routed to it

        Its recall is measured on the texts the router was fitted on: an upper bound on held-out text."""
        c = router.classes.index(expert.name)
        inputs = self.inputs(expert)
        texts = len(domain_texts(expert)[0][:SAMPLE_TEXTS])
        observed, flowing = inputs[:texts], inputs[texts:] or inputs[:texts]
        sequence = [router.sequence_route(x) == expert.name for x in observed]
        token_hits = token_total = 0
        for x in flowing:
            routes = router.token_routes(x, router.skip)[router.skip :] if router.layers else None
            if routes is not None:
                token_hits += int((routes == c).sum())
                token_total += routes.numel()
        assert self._base is not None  # fitted before
        held = self._base[1]
        false_sequence = sum(router.sequence_route(x) == expert.name for x in held) / max(len(held), 1)
        false_token = 0.0
        if router.layers:
            per_layer = torch.cat([router.token_routes(x, router.skip)[router.skip :] for x in held])  # [N, L]
            false_token = float((per_layer == c).float().mean(dim=0).max())
        return {
            "texts": texts,
            "sequence_recall": sum(sequence) / max(len(sequence), 1),
            "token_recall": token_hits / token_total if token_total else 0.0,
            "sequence_false_positive_rate": false_sequence,
            "token_false_positive_rate": false_token,
            "measured_on": "its own domain sample (the router was fitted on it: an upper bound)",
        }

    def sequence_steals(self, router: ContextRouter, expert: Expert, others: Sequence[Expert]) -> dict[str, float]:
        """Per other expert of the router's set, the share of its domain texts (as sequence mode observes them)
        whose sequence decision is `expert`: what the candidate would take from its neighbours' prompts."""
        out = {}
        for other in others:
            if other.name not in router.classes:
                continue
            texts = len(domain_texts(other)[0][:SAMPLE_TEXTS])
            observed = self.inputs(other)[:texts]
            out[other.name] = sum(router.sequence_route(x) == expert.name for x in observed) / max(texts, 1)
        return out

    def offer(self, experts: Sequence[Expert]) -> ContextRouter | None:
        """Fit the router for these experts and hand it to the model's slots (published with that set)."""
        router = self.fit(experts)
        if router is not None:
            self.model.offer_router(router)
        return router


__all__ = ["ContextRouterFitter", "capture_texts", "carried_floors"]
