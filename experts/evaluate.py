"""Evaluation of plugged experts: perplexity, behaviour and routing per domain, and the summary tables.

Every run here goes through the model package's batching (`moe.model.text_batches`) and its one generation path
(`moe.decode.generation`), the code the server runs; nothing re-implements routing. Sequence mode's decisions come
from `moe.decode.prefill.decide_routes`, the protocol the server's prefill follows.

`plugmoe eval`, per domain (a NAME=FILE pair; the expert of the same name is its target, `--base` names the
base domain, whose target is the base route):

    perplexity      on the scored tokens (all of a text, the answer of a QA record): backbone alone (off),
                    token routing, sequence routing (decided from the prompt: a QA record's question, a
                    text's whole text), and the oracle (per sequence the best single route pinned)
    accuracy        QA records: greedy completion, final answer extracted (GSM8K `#### N` by default), for
                    off / token / sequence routing and the oracle (solved by any single pinned route)
    routing         share of sequences that sequence mode sends to the target, share of (token, layer)
                    decisions token mode gives it, mean per-sequence routing entropy (bits)
    degradation     base domain: perplexity change and share of greedy continuations that stay identical
    never fired     plugged experts that won no (token, layer) decision on any domain in token mode

Shapes: B = rows in a batch, T = tokens, V = vocabulary.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F

from experts.config import EvalConfig
from experts.data import Example, Extractor, gsm8k_answer
from experts.progress import progress_bar
from moe.adapters.expert import BASE_ROUTE
from moe.adapters.slots import PluggedSet
from moe.admission.router_fit import ContextRouterFitter
from moe.decode.generation import generate
from moe.decode.prefill import decide_routes
from moe.model.routed import RoutedModel
from moe.model.text_batches import batches, forward, perplexity, token_nll
from moe.model.trace import add_counts, route_shares, routing_entropy
from moe.routing.router import RoutingSpec

logger = logging.getLogger(__name__)


@torch.no_grad()
def sequence_decisions(
    model: RoutedModel,
    tokenizer,
    prompts: Sequence[str],
    plugged: PluggedSet | None = None,
    batch_size: int = 32,
    max_tokens: int = 256,
    allow: tuple[str, ...] | None = None,
) -> list[str]:
    """The route `sequence` mode picks for each text used as a prompt (an expert name or 'base')."""
    spec = RoutingSpec("sequence", allow=allow)
    routes: list[str] = []
    for start in range(0, len(prompts), batch_size):
        ids = [tokenizer(p)["input_ids"][:max_tokens] for p in prompts[start : start + batch_size]]
        routes.extend(decide_routes(model, ids, [spec] * len(ids), plugged))
    return routes


# --- evaluation -----------------------------------------------------------------------------------------


@dataclass
class DomainResult:
    domain: str
    target: str | None
    sequences: int
    tokens: int
    ppl: dict[str, float]  # off, token, sequence, oracle, and per pinned route "pin:<name>"
    # off, token, sequence, oracle on the scored tokens but a text record's first (see `first_token_nll`)
    ppl_in_context: dict[str, float] = field(default_factory=dict)
    blind_tokens: int = 0  # scored tokens predicted from the special prefix alone (one per text record)
    accuracy: dict[str, float] = field(default_factory=dict)  # off, token, sequence, oracle, pin:<name>
    behaviour_examples: int = 0
    # per QA record in order, "1" solved / "0" not, per label of `accuracy`: paired comparisons between routings
    behaviour_hits: dict[str, str] = field(default_factory=dict)
    sequence_to_target: float | None = None
    token_to_target: float | None = None
    sequence_routes: dict[str, float] = field(default_factory=dict)  # decision -> share of sequences
    token_routes: dict[str, float] = field(default_factory=dict)  # route -> share of (token, layer) decisions
    entropy_bits: float = 0.0
    greedy_unchanged: dict[str, float] = field(default_factory=dict)  # base domain only

    @property
    def ppl_change(self) -> dict[str, float]:
        """Relative perplexity change against the backbone alone, per routed mode (negative: better)."""
        return {m: self.ppl[m] / self.ppl["off"] - 1.0 for m in ("token", "sequence") if m in self.ppl}

    @property
    def oracle_gap(self) -> dict[str, float]:
        """Routed perplexity over the per-sequence oracle's, minus 1 (0: the router is the oracle)."""
        return {m: self.ppl[m] / self.ppl["oracle"] - 1.0 for m in ("token", "sequence") if m in self.ppl}

    @property
    def ppl_change_in_context(self) -> dict[str, float]:
        """ppl_change on the tokens whose prediction has read some of the text (every scored token but a text
        record's first): what a causal router can deliver, in token mode and sequence mode alike."""
        ppl = self.ppl_in_context
        return {m: ppl[m] / ppl["off"] - 1.0 for m in ("token", "sequence") if m in ppl}


def first_token_nll(logits: torch.Tensor, batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row [B]: the NLL of its scored token predicted from the special prefix alone, and 1 if it has one.

    That is a plain text record's first token (a QA record's first scored token follows its question). No
    token of the text has been read there, so token mode (any causal router) cannot know the domain and routes
    it to base; eval's sequence mode decides from the whole text first and so has read the token it predicts.
    logits [B, T, V]; the prediction of token prefix[b] is made at position prefix[b] - 1.
    """
    rows = torch.arange(len(batch), device=logits.device)
    at = (batch.prefix - 1).clamp(min=0)  # [B]
    has = (batch.prefix > 0) & batch.targets[rows, at]  # [B] bool
    nll = F.cross_entropy(logits[rows, at].float(), batch.ids[rows, at + 1], reduction="none")  # [B]
    return nll * has, has.to(nll.dtype)


@torch.no_grad()
def sequence_nll(
    model: RoutedModel,
    tokenizer,
    examples: Sequence[Example],
    specs: Sequence[RoutingSpec],
    plugged: PluggedSet,
    config: EvalConfig,
) -> tuple[torch.Tensor, torch.Tensor, list[dict[str, float]], torch.Tensor, torch.Tensor]:
    """Per example: summed NLL of its scored tokens [S], their count [S], its (token, layer) routes, and the NLL
    of its scored token predicted from the special prefix alone [S] with 1 where it has one [S] (first_token_nll)."""
    nlls, counts, routes, blind, blind_count = [], [], [], [], []
    size = config.batch_size
    for start, batch in zip(
        range(0, len(examples), size), batches(tokenizer, examples, size, config.max_tokens), strict=True
    ):
        batch = batch.to(model.device)
        out = forward(model, batch, list(specs[start : start + size]), plugged)
        nll, count = token_nll(out.logits, batch)
        nlls.append(nll.cpu())
        counts.append(count.cpu())
        routes.extend(out.trace.row_counts())
        first, has = first_token_nll(out.logits, batch)
        blind.append(first.cpu())
        blind_count.append(has.cpu())
    return torch.cat(nlls), torch.cat(counts), routes, torch.cat(blind), torch.cat(blind_count)


def evaluate_domain(
    model: RoutedModel,
    tokenizer,
    domain: str,
    examples: Sequence[Example],
    config: EvalConfig,
    extractor: Extractor = gsm8k_answer,
    fired: dict[str, float] | None = None,
) -> DomainResult:
    plugged = model.plugged
    names = plugged.names
    target = domain if domain in names else (BASE_ROUTE if domain == config.base else None)
    examples = list(examples[: config.limit])
    n = len(examples)
    logger.info("eval %s: %d sequences, target route %s", domain, n, target)
    # per-route perplexity: the backbone alone and each expert pinned, for the oracle
    route_nll: dict[str, torch.Tensor] = {}
    blind_nll: dict[str, torch.Tensor] = {}  # per route, the NLL of each example's blind first token (0: none)
    route_nll[BASE_ROUTE], count, _, blind_nll[BASE_ROUTE], blind = sequence_nll(
        model, tokenizer, examples, [RoutingSpec("off")] * n, plugged, config
    )
    for name in names:
        route_nll[name], _, _, blind_nll[name], _ = sequence_nll(
            model, tokenizer, examples, [RoutingSpec("pin", name)] * n, plugged, config
        )
    tokens, blind_tokens = int(count.sum()), int(blind.sum())
    ppl = {"off": perplexity(float(route_nll[BASE_ROUTE].sum()), tokens)}
    for name in names:
        ppl[f"pin:{name}"] = perplexity(float(route_nll[name].sum()), tokens)
    ppl["oracle"] = perplexity(float(torch.stack(list(route_nll.values())).min(dim=0).values.sum()), tokens)
    seen = {r: route_nll[r] - blind_nll[r] for r in route_nll}  # per example, the NLL after its blind token

    def in_context(nll: torch.Tensor) -> float:
        return perplexity(float(nll.sum()), tokens - blind_tokens)

    ppl_in_context = {
        "off": in_context(seen[BASE_ROUTE]),
        "oracle": in_context(torch.stack(list(seen.values())).min(dim=0).values),
    }
    # token routing
    nll, _, token_counts, first, _ = sequence_nll(model, tokenizer, examples, [RoutingSpec()] * n, plugged, config)
    ppl["token"] = perplexity(float(nll.sum()), tokens)
    ppl_in_context["token"] = in_context(nll - first)
    totals: dict[str, float] = {}
    for row in token_counts:
        add_counts(totals, row)
    if fired is not None:
        add_counts(fired, totals)
    entropy = sum(routing_entropy(route_shares(row)) for row in token_counts) / max(n, 1)
    # sequence routing: decided from the prompt (QA: the question's prompt; text: the whole text)
    decisions = sequence_decisions(
        model, tokenizer, [e.prompt or e.target for e in examples], plugged, config.batch_size, config.max_tokens
    )
    specs = [RoutingSpec("sequence", expert=d) for d in decisions]
    nll, _, _, first, _ = sequence_nll(model, tokenizer, examples, specs, plugged, config)
    ppl["sequence"] = perplexity(float(nll.sum()), tokens)
    ppl_in_context["sequence"] = in_context(nll - first)
    token_routes = route_shares(totals)
    sequence_routes = {r: decisions.count(r) / max(n, 1) for r in sorted(set(decisions))}
    result = DomainResult(
        domain=domain,
        target=target,
        sequences=n,
        tokens=tokens,
        ppl=ppl,
        ppl_in_context=ppl_in_context,
        blind_tokens=blind_tokens,
        sequence_to_target=sequence_routes.get(target, 0.0) if target else None,
        token_to_target=token_routes.get(target, 0.0) if target else None,
        sequence_routes=sequence_routes,
        token_routes=token_routes,
        entropy_bits=entropy,
    )
    qa = [e for e in examples if e.is_qa and e.gold is not None][: config.behaviour_limit]
    if qa:
        hits = behaviour_hits(model, tokenizer, qa, config, extractor)
        result.accuracy = {label: h.count("1") / len(h) for label, h in hits.items()}
        result.behaviour_examples, result.behaviour_hits = len(qa), hits
    if domain == config.base:
        result.greedy_unchanged = greedy_unchanged(model, tokenizer, examples, config)
    return result


def behaviour_hits(
    model: RoutedModel, tokenizer, qa: Sequence[Example], config: EvalConfig, extractor: Extractor
) -> dict[str, str]:
    """Greedy answers per routing: off, token, sequence, each expert pinned, and the per-problem oracle; per
    record "1" when the extracted answer equals the gold one."""
    routes = {"off": RoutingSpec("off"), "token": RoutingSpec(), "sequence": RoutingSpec("sequence")}
    routes.update({f"pin:{name}": RoutingSpec("pin", name) for name in model.plugged.names})
    prompts = [e.prompt for e in qa]
    hits: dict[str, list[bool]] = {}
    for label, spec in progress_bar(routes.items(), desc="behaviour", unit="route", leave=False):
        outs = generate(model, tokenizer, prompts, spec, config.max_new_tokens, batch_size=32)
        hits[label] = [extractor(o.text) == e.gold for o, e in zip(outs, qa, strict=True)]
    single = [hits["off"]] + [hits[k] for k in hits if k.startswith("pin:")]
    hits["oracle"] = [any(col) for col in zip(*single, strict=True)]
    return {label: "".join("1" if hit else "0" for hit in h) for label, h in hits.items()}


def greedy_unchanged(
    model: RoutedModel, tokenizer, examples: Sequence[Example], config: EvalConfig
) -> dict[str, float]:
    """Share of base-domain continuations (greedy, from each text's first words) identical to the backbone's."""
    prompts = [" ".join((e.prompt or e.target).split()[: config.greedy_prompt_words]) for e in examples]
    plain = generate(model, tokenizer, prompts, RoutingSpec("off"), config.greedy_new_tokens)
    out = {}
    for label, spec in (("token", RoutingSpec()), ("sequence", RoutingSpec("sequence"))):
        routed = generate(model, tokenizer, prompts, spec, config.greedy_new_tokens)
        out[label] = sum(a.text == b.text for a, b in zip(plain, routed, strict=True)) / max(len(prompts), 1)
    return out


def evaluate(
    model: RoutedModel,
    tokenizer,
    domains: dict[str, Sequence[Example]],
    config: EvalConfig,
    extractor: Extractor = gsm8k_answer,
    fit_router: bool = False,
) -> dict:
    """Every domain, then the cross-domain summary; a JSON-ready dict. fit_router: first fit the plugged set's
    context router as a server does after a plug (moe.admission.router_fit), so sequence mode decides with it;
    without it, or for experts without domain texts, sequence mode decides from the gates' counts."""
    if fit_router and len(model.plugged):
        ContextRouterFitter(model, tokenizer).offer(model.plugged.experts)
    fired: dict[str, float] = {}
    results = [evaluate_domain(model, tokenizer, d, ex, config, extractor, fired) for d, ex in domains.items()]
    never = [name for name in model.plugged.names if fired.get(name, 0.0) == 0.0]
    return {
        "experts": list(model.plugged.names),
        "sequence_router": "context" if model.plugged.context is not None else "gate counts",
        "config": asdict(config),
        "domains": [
            {
                **asdict(r),
                "ppl_change": r.ppl_change,
                "oracle_gap": r.oracle_gap,
                "ppl_change_in_context": r.ppl_change_in_context,
            }
            for r in results
        ],
        "never_fired": never,
        "mean_entropy_bits": sum(r.entropy_bits for r in results) / max(len(results), 1),
    }


def _pct(x: float | None, signed: bool = False) -> str:
    if x is None:
        return "-"
    return f"{x * 100:+.3f}%" if signed else f"{x * 100:.1f}%"


def render_table(report: dict) -> str:
    """The report as markdown: one row per domain, then the summary lines."""
    head = (
        "| domain | target | seqs | ppl off | ppl token | ppl seq | Δppl token | Δppl seq | oracle gap seq "
        "| seq→target | tok→target | entropy (bits) | acc off | acc token | acc seq | acc oracle |"
    )
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for d in report["domains"]:
        acc = d["accuracy"]
        lines.append(
            f"| {d['domain']} | {d['target'] or '-'} | {d['sequences']} | {d['ppl']['off']:.3f} "
            f"| {d['ppl']['token']:.3f} | {d['ppl']['sequence']:.3f} | {_pct(d['ppl_change']['token'], True)} "
            f"| {_pct(d['ppl_change']['sequence'], True)} | {_pct(d['oracle_gap']['sequence'], True)} "
            f"| {_pct(d['sequence_to_target'])} | {_pct(d['token_to_target'])} | {d['entropy_bits']:.3f} | "
            + " | ".join(_pct(acc.get(k)) if acc else "-" for k in ("off", "token", "sequence", "oracle"))
            + " |"
        )
    notes = []
    for d in report["domains"]:
        if d["greedy_unchanged"]:
            g = d["greedy_unchanged"]
            change = d["ppl_change"]
            notes.append(
                f"- base domain `{d['domain']}`: perplexity change token {_pct(change['token'], True)}, "
                f"sequence {_pct(d['ppl_change']['sequence'], True)}; greedy continuations unchanged: "
                f"token {_pct(g['token'])}, sequence {_pct(g['sequence'])}"
            )
        if d.get("blind_tokens"):
            seen = d["ppl_change_in_context"]
            notes.append(
                f"- `{d['domain']}`: {d['blind_tokens']} of its {d['tokens']} scored tokens (a text record's first) "
                "are predicted from the special prefix alone, where no causal router can know the domain (eval's "
                f"sequence mode decided from the whole text); on the others Δppl token {_pct(seen['token'], True)}, "
                f"sequence {_pct(seen['sequence'], True)}"
            )
        pins = {k[4:]: v for k, v in d["accuracy"].items() if k.startswith("pin:")}
        if pins:
            notes.append(
                f"- `{d['domain']}` accuracy with each expert pinned: "
                + ", ".join(f"{k} {_pct(v)}" for k, v in pins.items())
            )
    notes.append(
        f"- experts that never fired: {', '.join(report['never_fired']) or 'none'}; "
        f"mean routing entropy {report['mean_entropy_bits']:.3f} bits"
    )
    return "\n".join(lines + [""] + notes)
