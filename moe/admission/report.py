"""Admission: what plugging a candidate expert would do to every domain already served, measured before the
plug commits, and the repair of the candidate's thresholds when it would take too much.

Measured in token mode (the default routing mode) with the plugged set as it is (P) and with the candidate
added (P + c), on the base calibration text and on each plugged expert's domain sample (moe.admission.samples):

    false_positive_rate   the largest share, over the layers the candidate covers, of the calibration text's
                          decisions the candidate wins (those tokens leave the base route)
    steal_rates[name]     the same on expert `name`'s sample: the share of that domain's decisions the
                          candidate takes, from the expert or from the base route
    domains               per sample: perplexity with P and with P + c and the relative change; the
                          candidate's own sample is listed too (what it gains; its take there is its recall)

`admit` applies AdmissionLimits: takes per layer under the caps (max_false_positive_rate on the calibration
text, max_steal_rate on each expert's sample) and perplexity changes under max_base_ppl_increase (calibration)
and max_domain_ppl_increase (each expert's sample). A candidate within them passes untouched. Otherwise, in
"repair" mode, only the candidate's thresholds are raised until its takes are under the caps (fitted at
`fit_fraction` of each cap: a quantile fitted on 64 texts passes more on other texts), the quality is measured
again, and the report carries the thresholds before and after and what the repair cost the candidate's own
recall; in "refuse" mode, or when the repaired candidate still breaks a limit, the answer names each domain it
would harm and by how much. Nothing here plugs anything or touches the plugged set.

Under the context router (a `router_fitter` whose fit has token classifiers: `plugmoe serve --router context`)
every pass runs under the router that will serve (PluggedSet.with_router): P under its published router, P + c
under the refit. The candidate's takes are then its token classifiers' decisions, and the repair raises its
floors (its minimum probability to win, per covered layer) by the same cap rule on the probabilities with which
it wins, leaving its thresholds as uploaded; the fitter keeps the repaired router, so the plug serves with it.
The report then also carries its own recall and its sequence-mode oracle gap on its own sample
(`context_routing`), with notes when the plug would be safe but useless.

Behaviour (moe.admission.behaviour): every plugged expert whose file carries a behavioural probe (prompts with
reference answers) has it decoded greedily with P and with P + c (as it would be plugged: repaired, under the router
that would serve), in token and sequence mode; a drop past max_accuracy_drop points refuses the plug (the repair
fits takes and perplexity, not answers), and the candidate's own probe reports its gain (AdmissionReport.behaviour).

And a probe (`probe_is_finite`): the candidate pinned on a short text must leave the logits finite.
Weights within the file format's bounds can still combine into an overflow; that is caught here, before
plugging, rather than as NaN logits in a client's request.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal, TypeVar

import torch

from moe.adapters.expert import Expert
from moe.adapters.slots import PluggedSet
from moe.admission.behaviour import ProbeCheck, probe_checks, probe_problems
from moe.admission.router_fit import ContextRouterFitter
from moe.admission.samples import (
    BASE_SAMPLE,
    MAX_TOKENS,
    SamplePass,
    context_sample_pass,
    domain_sample,
    raised_thresholds,
    sample_pass,
    with_thresholds,
)
from moe.model.routed import RoutedModel
from moe.model.text_batches import batches, collate, forward, perplexity, texts, token_nll
from moe.routing.context import ContextRouter
from moe.routing.router import RoutingSpec

logger = logging.getLogger(__name__)
T = TypeVar("T")  # what one repair round ran: the candidate with its thresholds, or the router with its floors

LOW_RECALL = 0.5  # below this share of its own sample routed to it (sequence mode), a report notes the plug is useless
LARGE_ORACLE_GAP = 0.05  # above this sequence-mode oracle gap on its own sample, a report notes what routing loses

DEFAULT_CALIBRATION = Path(__file__).with_name("calibration.txt")  # general English prose, shipped
CALIBRATION_PASSAGES = 200  # calibration passages an admission reads (the first lines of the file)
AdmissionMode = Literal["repair", "refuse"]


def _limit(default: float, help: str) -> Any:  # noqa: A002
    """A limit field; its help (what it bounds) is the one text every flag that sets it derives from."""
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class AdmissionLimits:
    """What a plug must leave intact; a limit set to None is not checked (and not repaired for). The defaults
    and the help of the four limits are the server's and the tooling's (`plugmoe serve`, `plugmoe admit`,
    `plugmoe train-expert --with-experts`): their flags derive from these fields."""

    max_false_positive_rate: float | None = _limit(
        1e-4,
        "admission cap: per layer, the share of the calibration text's token-mode decisions a candidate may take",
    )
    max_steal_rate: float | None = _limit(
        2e-3,
        "admission cap: per layer, the share of a plugged expert's domain-sample decisions a candidate may take "
        "(from the expert or from base)",
    )
    max_base_ppl_increase: float | None = _limit(
        2e-4, "admission limit: relative token-mode perplexity increase on the calibration text"
    )
    max_domain_ppl_increase: float | None = _limit(
        5e-3, "admission limit: relative token-mode perplexity increase on each plugged expert's domain sample"
    )
    max_accuracy_drop: float | None = _limit(
        5.0,
        "admission limit: points of greedy accuracy a plugged expert's behavioural probe (moe.admission.behaviour) "
        "may lose, in token or sequence mode",
    )
    mode: AdmissionMode = "repair"
    fit_fraction: float = 0.5  # the repair fits each cap at this fraction of it
    max_rounds: int = 4  # repair rounds (fit, re-check with the candidate plugged, raise again)

    def __post_init__(self) -> None:
        if self.mode not in ("repair", "refuse"):
            raise ValueError(f"admission mode {self.mode!r} is not 'repair' or 'refuse'")
        if not 0.0 < self.fit_fraction <= 1.0 or self.max_rounds < 1:
            raise ValueError(f"fit_fraction {self.fit_fraction} must be in (0, 1] and max_rounds >= 1")

    @classmethod
    def from_flags(cls, mode: AdmissionMode, **limits: float | None) -> AdmissionLimits:
        """Limits as the flags give them (names of LIMIT_NAMES), where None or a negative value turns a limit
        off."""
        return cls(**{name: None if value is None or value < 0 else value for name, value in limits.items()}, mode=mode)

    @property
    def checks_anything(self) -> bool:
        return any(getattr(self, name) is not None for name in LIMIT_NAMES)

    def cap(self, sample: str) -> float | None:
        return self.max_false_positive_rate if sample == BASE_SAMPLE else self.max_steal_rate

    def ppl_limit(self, sample: str) -> float | None:
        return self.max_base_ppl_increase if sample == BASE_SAMPLE else self.max_domain_ppl_increase


LIMIT_NAMES = (
    "max_false_positive_rate",
    "max_steal_rate",
    "max_base_ppl_increase",
    "max_domain_ppl_increase",
    "max_accuracy_drop",
)
LIMIT_HELP = {f.name: f.metadata["help"] for f in fields(AdmissionLimits) if f.name in LIMIT_NAMES}


@dataclass
class DomainCheck:
    """One sample, with P and with P + candidate (take_rates: per candidate layer, its share of decisions)."""

    domain: str  # "base" (the calibration text) or an expert's name
    sample: str  # "calibration", "domain_sample", "examples", or "own domain_sample" (the candidate's)
    texts: int
    tokens: int
    decisions: int
    ppl_before: float
    ppl_after: float
    ppl_change: float
    take_rates: list[float]
    ppl_limit: float | None = None
    cap: float | None = None


@dataclass
class Repair:
    """What the repair changed, per layer the candidate covers: only the candidate's cosine thresholds (the gates
    route), or only its floors in the set's context router (a router_fitter's: its thresholds stay as uploaded)."""

    layers: list[int]
    thresholds_before: list[float]
    thresholds_after: list[float]
    own_recall_before: list[float] | None  # its take on its own sample per layer (None: no sample)
    own_recall_after: list[float] | None
    rounds: int
    unrepaired: list[DomainCheck]  # the checks with the thresholds (floors) as uploaded (fitted)
    raised: Literal["thresholds", "floors"] = "thresholds"
    floors_before: list[float] | None = None  # its minimum probability to win, per layer's token classifier
    floors_after: list[float] | None = None


PROBE_TEXT = "The quick brown fox jumps over the lazy dog. Question: 3 + 4 = 7. def f(x): return x"


@dataclass
class AdmissionReport:
    expert: str
    mode: str
    admitted: bool
    false_positive_rate: float
    base_decisions: int
    steal_rates: dict[str, float] = field(default_factory=dict)
    domains: list[DomainCheck] = field(default_factory=list)
    repair: Repair | None = None
    problems: list[str] = field(default_factory=list)
    limits: dict = field(default_factory=dict)
    seconds: float = 0.0
    # how the set's refit context router (moe.admission.router_fit) treats the candidate's domain and general text:
    # ContextRouterFitter.measure's figures; None when no router is fitted (the gates route)
    context_routing: dict | None = None
    notes: list[str] = field(default_factory=list)  # what a plug that passes should still know (e.g. low recall)
    # each probe carried by a plugged expert (and the candidate's own: its gain) with P and P + c, per routing mode
    behaviour: list[ProbeCheck] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Admission:
    """The verdict: the expert to plug (repaired or as given) and the report."""

    expert: Expert
    report: AdmissionReport

    @property
    def admitted(self) -> bool:
        return self.report.admitted


def load_calibration_texts(path: str | Path | None = None, limit: int = CALIBRATION_PASSAGES) -> list[str]:
    """One passage per non-empty line of the calibration file (default: the general text shipped here)."""
    lines = Path(path or DEFAULT_CALIBRATION).read_text(encoding="utf-8").splitlines()
    return [line for line in (raw.strip() for raw in lines) if line][:limit]


def expert_digest(expert: Expert) -> str:
    """A content hash of an expert (name, layers, every tensor): two plugged sets with the same digests route
    and score every text the same."""
    h = hashlib.sha256(f"{expert.name}/{expert.layers}".encode())
    for name, tensor in sorted(expert.tensors().items()):
        h.update(name.encode())
        h.update(tensor.detach().to("cpu").contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


class BaselineCache:
    """Token-mode (NLL, tokens) of each sample under a plugged set, kept for the last few sets.

    Keyed by the set's content (expert digests, order-free), the calibration texts and max_tokens, so each plug
    runs only the passes with the candidate; after an admission, its passes with the candidate are the
    baseline of the set that the plug creates.
    """

    def __init__(self, size: int = 4) -> None:
        self.size = size
        self._entries: OrderedDict[tuple, dict[str, tuple[float, int]]] = OrderedDict()
        self._digests: dict[int, tuple[Expert, str]] = {}

    def _digest(self, expert: Expert) -> str:
        held = self._digests.get(id(expert))
        if held is None or held[0] is not expert:
            held = (expert, expert_digest(expert))
            self._digests[id(expert)] = held
            if len(self._digests) > 64:
                self._digests.pop(next(iter(self._digests)))
        return held[1]

    def key(self, experts: Sequence[Expert], calibration: Sequence[str], max_tokens: int) -> tuple:
        cal = hashlib.sha256("\n".join(calibration).encode()).hexdigest()
        return (tuple(sorted(self._digest(e) for e in experts)), cal, max_tokens)

    def get(self, key: tuple) -> dict[str, tuple[float, int]]:
        entry = self._entries.get(key)
        if entry is not None:
            self._entries.move_to_end(key)
        return dict(entry or {})

    def put(self, key: tuple, values: dict[str, tuple[float, int]]) -> None:
        self._entries[key] = {**self._entries.get(key, {}), **values}
        self._entries.move_to_end(key)
        while len(self._entries) > self.size:
            self._entries.popitem(last=False)


@dataclass
class _Samples:
    texts: dict[str, list[str]]  # sample name -> texts (the candidate's own under its name)
    kinds: dict[str, str]


def _samples(others: PluggedSet, candidate: Expert, calibration: Sequence[str]) -> _Samples:
    out, kinds = {BASE_SAMPLE: list(calibration)}, {BASE_SAMPLE: "calibration"}
    for other in others.experts:
        sample, kind = domain_sample(other)
        if sample:
            out[other.name], kinds[other.name] = sample, kind
    own, kind = domain_sample(candidate)
    if own and kind == "domain_sample":
        out[candidate.name], kinds[candidate.name] = own, "own domain_sample"
    return _Samples(out, kinds)


def _checks(
    samples: _Samples,
    before: dict[str, tuple[float, int]],
    after: dict[str, SamplePass],
    limits: AdmissionLimits,
    candidate: str,
) -> list[DomainCheck]:
    checks = []
    for name, result in after.items():
        nll, tokens = before[name]
        ppl_before = perplexity(nll, tokens)
        own = name == candidate
        checks.append(
            DomainCheck(
                domain=name,
                sample=samples.kinds[name],
                texts=len(samples.texts[name]),
                tokens=result.tokens,
                decisions=result.decisions,
                ppl_before=ppl_before,
                ppl_after=result.ppl,
                ppl_change=result.ppl / ppl_before - 1.0,
                take_rates=result.take_rates(),
                ppl_limit=None if own else limits.ppl_limit(name),
                cap=None if own else limits.cap(name),
            )
        )
    return checks


def _problems(checks: Sequence[DomainCheck], repaired: bool) -> list[str]:
    """Each limit a check breaks, in words: which domain, by how much, against what."""
    out = []
    for c in checks:
        where = "the general calibration text" if c.domain == BASE_SAMPLE else f"expert {c.domain!r}'s {c.sample}"
        if c.ppl_limit is not None and c.ppl_change > c.ppl_limit:
            out.append(
                f"it would raise token-mode perplexity on {where} by {c.ppl_change:+.3%} "
                f"({c.ppl_before:.4f} -> {c.ppl_after:.4f}; limit {c.ppl_limit:+.3%})"
            )
        if c.cap is not None and c.take_rates and max(c.take_rates) > c.cap:
            what = "false-positive rate" if c.domain == BASE_SAMPLE else "steal rate"
            out.append(
                f"its {what} on {where} is {max(c.take_rates):.4%} of a layer's decisions (limit {c.cap:.4%})"
                + (" even with its thresholds raised" if repaired else "")
            )
    return out


def _passes(
    model: RoutedModel,
    tokenizer,
    samples: dict[str, list[str]],
    plugged: PluggedSet,
    scoring: PluggedSet,
    candidate: str,
    max_tokens: int,
) -> dict[str, SamplePass]:
    if plugged.gates is not None:  # the context router routes token mode: the candidate's takes are its decisions
        assert candidate in plugged
        return {
            name: context_sample_pass(model, tokenizer, strings, plugged, candidate, max_tokens)
            for name, strings in samples.items()
        }
    return {
        name: sample_pass(model, tokenizer, strings, plugged, scoring, candidate, max_tokens)
        for name, strings in samples.items()
    }


def _routing_tag(router: ContextRouter | None) -> tuple:
    """What a baseline is measured under besides the set: nothing for the gates (keys unchanged), else the
    router's set and its token floors (a repaired router is another router)."""
    if router is None or not router.layers:
        return ()
    return (("context", router.fitted_on, tuple(tuple(c.floors.tolist()) for c in router.layers)),)


def _router_without(
    current: PluggedSet, others: PluggedSet, fitter: ContextRouterFitter, replacing: bool
) -> ContextRouter | None:
    """The router the set without the candidate serves with: the one published with it (a repaired router is
    what the fitter kept), else the fitter's for exactly those experts (None for an empty set)."""
    if not replacing and current.context is not None and current.context.classes[1:] == others.names:
        return current.context
    return fitter.fit(others.experts) if others.experts else None


@torch.no_grad()
def admit(
    model: RoutedModel,
    tokenizer,
    candidate: Expert,
    calibration: Sequence[str],
    limits: AdmissionLimits | None = None,
    cache: BaselineCache | None = None,
    max_tokens: int = MAX_TOKENS,
    plugged: PluggedSet | None = None,
    router_fitter: ContextRouterFitter | None = None,
) -> Admission:
    """Measure the candidate beside the plugged set (default: the model's; the one of the same name is left
    out: a replace), repair it if allowed and needed, and decide. The set is read once and never changed.

    router_fitter: the context router will serve (plugmoe serve --router context). When it fits one with token
    classifiers for the set with the candidate, every pass runs under the router that serves that set (without
    the candidate: its published router or the fitter's; with it: the refit), a repair raises the candidate's
    floors in the refit router instead of its thresholds, and the router an admitted plug will serve with (the
    repaired one) is what the fitter keeps for that set (`offer` hands it out). The report also carries the
    candidate's recall and false positives under it and its sequence-mode oracle gap on its own sample
    (AdmissionReport.context_routing), with notes when it would serve little of its domain."""
    started = time.perf_counter()
    limits = limits or AdmissionLimits()
    cache = cache if cache is not None else BaselineCache()
    current = plugged if plugged is not None else model.plugged
    # a set built from the experts themselves (a live set holds weightless handles of its slots): the cache
    # digests their tensors, and the passes plug the candidate beside them
    replacing = candidate.name in current
    if replacing:
        others = current.unplugging(candidate.name)
    else:
        others = current.replacing_all(tuple(current.read(n) for n in current.names))
    candidate = candidate.to(model.device, model.dtype)
    samples = _samples(others, candidate, calibration)
    name = candidate.name

    # the set with the candidate in the order it will serve in (a replace keeps the slot's place): its router is
    # fitted for exactly that order, the one the fitter is asked for after the plug
    if replacing and router_fitter is not None:
        with_c = current.replacing_all(tuple(candidate if n == name else current.read(n) for n in current.names))
    else:
        with_c = others.plugging(candidate)
    # the routers that will serve the set without and with the candidate (None: the gates route)
    router_with = router_fitter.fit(with_c.experts) if router_fitter is not None else None
    routed_by_context = router_with is not None and bool(router_with.layers)
    router_without = None
    if routed_by_context:
        assert router_fitter is not None
        router_without = _router_without(current, others, router_fitter, replacing)
        others = others.with_router(router_without)

    # baseline: each sample under P (cached per set); the candidate's own sample is never cached (its own)
    key = cache.key(others.experts, calibration, max_tokens) + _routing_tag(router_without)
    baseline = cache.get(key)
    missing = {s: t for s, t in samples.texts.items() if s not in baseline or s == name}
    for sample, strings in missing.items():
        result = sample_pass(model, tokenizer, strings, others, None, None, max_tokens)
        baseline[sample] = (result.nll, result.tokens)
    cache.put(key, {s: v for s, v in baseline.items() if s != name})

    if routed_by_context:
        with_c = with_c.with_router(router_with)
    after = _passes(model, tokenizer, samples.texts, with_c, with_c, name, max_tokens)
    checks = _checks(samples, baseline, after, limits, name)
    problems = _problems(checks, repaired=False)
    repair = None
    final = candidate
    router_final = router_with
    if problems and limits.mode == "repair":
        if routed_by_context:
            assert router_with is not None
            router_final, after, checks, repair = _repair_floors(
                model, tokenizer, with_c, router_with, name, samples, baseline, checks, after, limits, max_tokens
            )
            final = with_thresholds(candidate, repair.thresholds_after)  # a copy (its own metadata), as uploaded
        else:
            final, after, checks, repair = _repair(
                model, tokenizer, candidate, others, samples, baseline, checks, limits, max_tokens
            )
        problems = _problems(checks, repaired=True)
        final.metadata["evals"] = {
            **(final.metadata.get("evals") or {}),
            "admission_repair": {
                "beside": list(others.names),
                "layers": repair.layers,
                "raised": repair.raised,
                "thresholds_before": repair.thresholds_before,
                "thresholds_after": repair.thresholds_after,
                "floors_before": repair.floors_before,
                "floors_after": repair.floors_after,
                "own_recall_before": repair.own_recall_before,
                "own_recall_after": repair.own_recall_after,
            },
        }
    behaviour = _behaviour(model, tokenizer, others, with_c, final, router_final, limits, cache, key)
    problems += probe_problems(behaviour)
    if not problems:  # the set this plug creates: its baseline is what was just measured with the candidate
        created = cache.key(
            tuple(final if e.name == name else e for e in with_c.experts), calibration, max_tokens
        ) + _routing_tag(router_final if routed_by_context else None)
        cache.put(created, {s: (r.nll, r.tokens) for s, r in after.items()})
        if routed_by_context and router_final is not router_with:
            assert router_fitter is not None and router_final is not None
            # the plug's set serves with the repaired floors (the set of `final`, which carries its repair)
            router_fitter.keep(router_final, [final if e.name == name else e for e in with_c.experts])
    base = next(c for c in checks if c.domain == BASE_SAMPLE)
    context_routing, notes = None, []
    if router_fitter is not None:
        router = router_final if routed_by_context else router_fitter.fit(with_c.experts)
        if router is not None:
            context_routing = router_fitter.measure(router, final)
            context_routing["routed_by"] = "context router" if routed_by_context else "gates (no token classifiers)"
            # sequence mode's decisions are reported, not limited (the limits are token mode's)
            context_routing["sequence_steal_rates"] = router_fitter.sequence_steals(router, final, others.experts)
            own, _ = domain_sample(final)
            if routed_by_context and own:
                context_routing["sequence_oracle"] = _sequence_oracle(
                    model, tokenizer, own, with_c.with_router(router), name, max_tokens
                )
            notes = _usefulness_notes(name, context_routing)
    report = AdmissionReport(
        expert=name,
        mode=limits.mode,
        admitted=not problems,
        false_positive_rate=max(base.take_rates, default=0.0),
        base_decisions=base.decisions,
        steal_rates={c.domain: max(c.take_rates, default=0.0) for c in checks if c.domain not in (BASE_SAMPLE, name)},
        domains=checks,
        repair=repair,
        problems=problems,
        limits=asdict(limits),
        seconds=round(time.perf_counter() - started, 2),
        context_routing=context_routing,
        notes=notes,
        behaviour=behaviour,
    )
    logger.info("admission of %s: %s in %.1f s", name, problems or "admitted", report.seconds)
    return Admission(final, report)


def _behaviour(
    model: RoutedModel,
    tokenizer,
    others: PluggedSet,
    with_c: PluggedSet,
    final: Expert,
    router: ContextRouter | None,
    limits: AdmissionLimits,
    cache: BaselineCache,
    key: tuple,
) -> list[ProbeCheck]:
    """The probes (moe.admission.behaviour) with the set as it is and with the candidate as it would be plugged
    (repaired, under the router that would serve); the set's answers are cached with its perplexities."""
    after = with_c.replacing_all(tuple(final if e.name == final.name else e for e in with_c.experts))
    if router is not None and router.layers:
        after = after.with_router(router)
    baseline = cache.get(key)
    checks = probe_checks(model, tokenizer, others, after, final, limits.max_accuracy_drop, baseline=baseline)
    cache.put(
        key, {k: v for k, v in baseline.items() if k.startswith("probe:") and not k.startswith(f"probe:{final.name}:")}
    )
    return checks


def _usefulness_notes(name: str, routing: dict) -> list[str]:
    """What a plug that is safe may still not deliver: little of its own domain routed to it, or a large oracle
    gap (its domain's perplexity as routed far above it pinned)."""
    notes = []
    if routing["sequence_recall"] < LOW_RECALL:
        notes.append(
            f"the context router would send only {routing['sequence_recall']:.0%} of {name!r}'s own "
            "domain sample to it in sequence mode: plugged, it would serve little of its domain. Give it a "
            "domain sample that tells its domain apart from the plugged experts'"
        )
    oracle = routing.get("sequence_oracle")
    if oracle is not None and oracle["oracle_gap"] > LARGE_ORACLE_GAP:
        notes.append(
            f"in sequence mode its own domain sample's perplexity as routed is {oracle['oracle_gap']:+.1%} above "
            f"it pinned ({oracle['ppl_routed']:.4f} vs {oracle['ppl_pinned']:.4f}): routing loses most of what it "
            "brings (an upper bound on held-out text: the router was fitted on this sample)"
        )
    return notes


@torch.no_grad()
def _sequence_oracle(
    model: RoutedModel, tokenizer, strings: Sequence[str], plugged: PluggedSet, candidate: str, max_tokens: int
) -> dict[str, float | int | str]:
    """The candidate's sequence-mode oracle gap on its own domain sample under the set's router: each text is
    decided as sequence mode decides a prompt (the router's sequence classifier on the backbone's MLP inputs of
    the whole text, moe.decode.prefill) and scored pinned to the decision (base: the backbone), against all of
    them pinned to the candidate. oracle_gap = ppl_routed / ppl_pinned - 1 (0: routing loses nothing)."""
    router = plugged.context
    assert router is not None
    routed = pinned = (0.0, 0)
    hits = count = 0
    for batch in batches(tokenizer, texts(list(strings)), 16, max_tokens, eos=False):
        batch = batch.to(model.device)
        observed = forward(model, batch, [RoutingSpec("off")] * len(batch), plugged, capture=True)
        stacked = torch.stack(observed.mlp_inputs, dim=2)  # [B, T, L, H]
        real = batch.mask.bool()
        decided = [router.sequence_route(stacked[row][real[row]].float().cpu()) for row in range(len(batch))]
        hits += sum(d == candidate for d in decided)
        count += len(decided)
        pins = [RoutingSpec("pin", candidate)] * len(batch)
        nll, tokens = token_nll(forward(model, batch, pins, plugged).logits, batch)
        pinned = (pinned[0] + float(nll.sum()), pinned[1] + int(tokens.sum()))
        specs = [RoutingSpec("off") if d not in plugged else RoutingSpec("pin", d) for d in decided]
        if specs != pins:  # (a batch decided for the candidate throughout is the pinned forward itself)
            nll, tokens = token_nll(forward(model, batch, specs, plugged).logits, batch)
        routed = (routed[0] + float(nll.sum()), routed[1] + int(tokens.sum()))
    ppl_routed, ppl_pinned = perplexity(*routed), perplexity(*pinned)
    return {
        "texts": count,
        "routed_to_it": hits / max(count, 1),
        "ppl_routed": ppl_routed,
        "ppl_pinned": ppl_pinned,
        "oracle_gap": ppl_routed / ppl_pinned - 1.0,
        "measured_on": "its own domain sample, each whole text decided as a prompt (fitted on it: an upper bound)",
    }


def _raise_until_within(
    values: list[float],
    run: Callable[[list[float]], tuple[T, dict[str, SamplePass]]],
    samples: _Samples,
    baseline: dict[str, tuple[float, int]],
    limits: AdmissionLimits,
    name: str,
    shares: dict[str, float],
) -> tuple[list[float], T, dict[str, SamplePass], list[DomainCheck], int]:
    """The repair's loop, for thresholds or floors alike: run the candidate with `values` (run -> what it ran,
    its passes), stop when its checks pass, nothing more can be raised, or max_rounds; else raise the values to
    the shares (a sample whose perplexity still breaks its limit gets half its share) and run again.
    Returns (values, what the last run ran, its passes, its checks, rounds)."""
    rounds = 0
    while True:
        rounds += 1
        ran, after = run(values)
        checks = _checks(samples, baseline, after, limits, name)
        if not _problems(checks, repaired=True) or rounds >= limits.max_rounds:
            return values, ran, after, checks, rounds
        for c in checks:
            if c.domain in shares and c.ppl_limit is not None and c.ppl_change > c.ppl_limit:
                shares[c.domain] /= 2
        raised = raised_thresholds(values, after, shares, 1.0)
        if raised == values:
            return values, ran, after, checks, rounds
        values = raised


def _repair_floors(
    model: RoutedModel,
    tokenizer,
    with_c: PluggedSet,
    router: ContextRouter,
    name: str,
    samples: _Samples,
    baseline: dict[str, tuple[float, int]],
    unrepaired: list[DomainCheck],
    unrepaired_passes: dict[str, SamplePass],
    limits: AdmissionLimits,
    max_tokens: int,
) -> tuple[ContextRouter, dict[str, SamplePass], list[DomainCheck], Repair]:
    """Raise the candidate's floors in the set's refit router (its minimum probability to win, per token
    classifier of a layer it covers) until its checks pass, or nothing more can be raised, or max_rounds. Per
    sample the fit lets through fit_fraction * cap of its decisions (moe.admission.samples.cap_threshold on the
    probabilities with which it wins them, as the gates' repair fits thresholds on winning scores), first on the
    flow as fitted, then on the flow with the raised floors (earlier layers' decisions change later layers'
    inputs); a sample whose perplexity still breaks its limit gets half that share at the next round. A floor
    only takes decisions from the candidate, which go to base: no other expert's decisions change."""
    layers = list(with_c.get(name).layers)
    shares = {s: limits.fit_fraction * c for s in samples.texts if s != name and (c := limits.cap(s)) is not None}
    floors_before = router.token_floors(name, layers)
    floors = raised_thresholds(floors_before, unrepaired_passes, shares, 1.0)

    # per sample its latest pass. Floors only rise, so on a sample where the candidate won no decision it wins
    # none again, and no other decision depends on its floor: that pass stands as it is, bit for bit
    latest = {s: unrepaired_passes[s] for s in samples.texts}

    def run(values: list[float]) -> tuple[ContextRouter, dict[str, SamplePass]]:
        repaired = router.with_token_floors(name, dict(zip(layers, values, strict=True)))
        moved = {s: strings for s, strings in samples.texts.items() if any(latest[s].taken)}
        latest.update(_passes(model, tokenizer, moved, with_c.with_router(repaired), None, name, max_tokens))
        return repaired, dict(latest)

    floors, repaired, after, checks, rounds = _raise_until_within(floors, run, samples, baseline, limits, name, shares)
    own_before = next((c.take_rates for c in unrepaired if c.domain == name), None)
    own_after = next((c.take_rates for c in checks if c.domain == name), None)
    thresholds = [float(t) for t in with_c.get(name).thresholds]
    repair = Repair(
        layers, thresholds, thresholds, own_before, own_after, rounds, unrepaired, "floors", floors_before, floors
    )
    logger.info(
        "repaired %s's floors in %d rounds: %s -> %s, own recall %s -> %s",
        name,
        rounds,
        [round(f, 4) for f in floors_before],
        [round(f, 4) for f in floors],
        own_before and [round(r, 3) for r in own_before],
        own_after and [round(r, 3) for r in own_after],
    )
    return repaired, after, checks, repair


def _repair(
    model: RoutedModel,
    tokenizer,
    candidate: Expert,
    others: PluggedSet,
    samples: _Samples,
    baseline: dict[str, tuple[float, int]],
    unrepaired: list[DomainCheck],
    limits: AdmissionLimits,
    max_tokens: int,
) -> tuple[Expert, dict[str, SamplePass], list[DomainCheck], Repair]:
    """Raise the candidate's thresholds until its checks pass or nothing more can be raised (see the module
    docstring). Per sample the fit allows fit_fraction * cap of its decisions; a sample whose perplexity still
    breaks its limit gets half that share at the next round."""
    name = candidate.name
    shares = {s: limits.fit_fraction * c for s in samples.texts if s != name and (c := limits.cap(s)) is not None}
    capped = {s: samples.texts[s] for s in shares}
    scoring = others.plugging(candidate)  # the winning scores do not depend on the candidate's own thresholds
    without = _passes(model, tokenizer, capped, others, scoring, name, max_tokens)
    thresholds_before = [float(t) for t in candidate.thresholds]
    thresholds = raised_thresholds(thresholds_before, without, shares, 1.0)

    def run(values: list[float]) -> tuple[Expert, dict[str, SamplePass]]:
        final = with_thresholds(candidate, values)
        with_c = others.plugging(final)
        return final, _passes(model, tokenizer, samples.texts, with_c, with_c, name, max_tokens)

    thresholds, final, after, checks, rounds = _raise_until_within(
        thresholds, run, samples, baseline, limits, name, shares
    )
    own_before = next((c.take_rates for c in unrepaired if c.domain == name), None)
    own_after = next((c.take_rates for c in checks if c.domain == name), None)
    repair = Repair(list(candidate.layers), thresholds_before, thresholds, own_before, own_after, rounds, unrepaired)
    logger.info(
        "repaired %s beside %s in %d rounds: thresholds %s -> %s, own recall %s -> %s",
        name,
        list(others.names),
        rounds,
        [round(t, 4) for t in thresholds_before],
        [round(t, 4) for t in thresholds],
        own_before and [round(r, 3) for r in own_before],
        own_after and [round(r, 3) for r in own_after],
    )
    return final, after, checks, repair


@torch.no_grad()
def probe_is_finite(
    model: RoutedModel, tokenizer, expert: Expert, text: str = PROBE_TEXT, max_tokens: int = 16
) -> bool:
    """Whether the logits stay finite with `expert` pinned on the first max_tokens tokens of `text`, in the
    serving dtype. Nothing is plugged; the plugged set is not touched. The candidate is probed in a set of its own
    (a pinned row reads no other expert), so the probe costs the same whatever the number plugged."""
    candidate = expert.to(model.device, model.dtype)
    with_candidate = PluggedSet.build((candidate,), model.num_layers, model.hidden_size, model.device, model.dtype)
    ids = tokenizer(text)["input_ids"][:max_tokens]  # [special prefix] + text
    batch = collate([(ids, [True] * len(ids))], pad_id=0).to(model.device)
    out = forward(model, batch, [RoutingSpec("pin", candidate.name)], with_candidate)
    return bool(torch.isfinite(out.logits).all())
