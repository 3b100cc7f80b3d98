"""Evaluation of plugged experts, and the routed-model runs that training and distillation share.

Every run here goes through `RoutedModel.forward`, `DecodeBatch` and `moe.sampling.sample`, the code the
server runs; nothing re-implements routing. Sequence mode follows the server's engine: the prompt is
prefilled with its rows observed (scored and traced, experts not applied), `decide_sequence` picks one
route from the prompt's decisions, and rows that chose an expert are prefilled again with it.

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
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from experts.data import Example, Extractor, encode, gsm8k_answer
from moe.expert import BASE_ROUTE
from moe.generation import DecodeBatch
from moe.plugged import PluggedSet
from moe.routed import RoutedModel
from moe.router import RoutingSpec, StepRouting, decide_sequence
from moe.sampling import SamplingParams, sample

logger = logging.getLogger(__name__)


@dataclass
class TokenBatch:
    """Right-padded examples: ids, mask and scored are [B, T]; scored marks target tokens."""

    ids: torch.Tensor
    mask: torch.Tensor
    scored: torch.Tensor

    def to(self, device: torch.device) -> TokenBatch:
        return TokenBatch(self.ids.to(device), self.mask.to(device), self.scored.to(device))

    @property
    def targets(self) -> torch.Tensor:
        """[B, T-1] bool: positions whose next token is scored (the prediction of token t+1 at t)."""
        return self.scored[:, 1:] & self.mask[:, 1:].bool()


def collate(encoded: Sequence[tuple[list[int], list[bool]]], pad_id: int) -> TokenBatch:
    width = max(len(ids) for ids, _ in encoded)
    ids = torch.full((len(encoded), width), pad_id, dtype=torch.long)
    mask = torch.zeros(len(encoded), width, dtype=torch.long)
    scored = torch.zeros(len(encoded), width, dtype=torch.bool)
    for row, (tokens, flags) in enumerate(encoded):
        ids[row, : len(tokens)] = torch.tensor(tokens, dtype=torch.long)
        mask[row, : len(tokens)] = 1
        scored[row, : len(flags)] = torch.tensor(flags, dtype=torch.bool)
    return TokenBatch(ids, mask, scored)


def batches(
    tokenizer, examples: Sequence[Example], batch_size: int, max_tokens: int, eos: bool = True
) -> list[TokenBatch]:
    """Examples in order, `batch_size` per batch (eos=False: prompts as the server sees them)."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    encoded = [encode(tokenizer, e, max_tokens, eos) for e in examples]
    return [collate(encoded[i : i + batch_size], pad) for i in range(0, len(encoded), batch_size)]


def token_nll(logits: torch.Tensor, batch: TokenBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed next-token NLL of each row's scored tokens and their count: logits [B, T, V] -> ([B], [B])."""
    targets = batch.targets  # [B, T-1]
    nll = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), batch.ids[:, 1:], reduction="none")  # [B, T-1]
    nll = nll * targets
    return nll.sum(dim=1), targets.sum(dim=1)


def forward(
    model: RoutedModel,
    batch: TokenBatch,
    specs: list[RoutingSpec],
    plugged: PluggedSet | None = None,
    observe: bool = False,
    capture: bool = False,
):
    """One routed forward of a TokenBatch (observe: trace the routes without applying experts)."""
    plugged = plugged if plugged is not None else model.plugged
    routing = StepRouting.from_specs(specs, plugged, batch.mask.bool(), observe=[observe] * len(specs))
    return model(batch.ids, attention_mask=batch.mask, routing=routing, plugged=plugged, capture_mlp_inputs=capture)


def decide(counts: list[dict[str, float]], plugged: PluggedSet, min_share: float) -> list[str]:
    """Sequence-mode decisions from per-row observed (token, layer) counts."""
    names = plugged.names
    return [decide_sequence(c, names, min_share) for c in counts]


@torch.no_grad()
def sequence_decisions(
    model: RoutedModel,
    tokenizer,
    texts: Sequence[str],
    plugged: PluggedSet | None = None,
    batch_size: int = 32,
    max_tokens: int = 256,
    allow: tuple[str, ...] | None = None,
) -> list[str]:
    """The route `sequence` mode picks for each text used as a prompt (an expert name or 'base')."""
    plugged = plugged if plugged is not None else model.plugged
    out: list[str] = []
    examples = [Example("", t) for t in texts]
    for batch in batches(tokenizer, examples, batch_size, max_tokens, eos=False):
        batch = batch.to(model.device)
        trace = forward(model, batch, [RoutingSpec("sequence", allow=allow)] * len(batch.ids), plugged, observe=True)
        out.extend(decide(trace.trace.row_counts(), plugged, model.router.sequence_min_share))
    return out


def route_shares(counts: dict[str, float]) -> dict[str, float]:
    total = sum(counts.values())
    return {k: v / total for k, v in counts.items()} if total > 0 else {}


def entropy_bits(shares: dict[str, float]) -> float:
    return max(0.0, -sum(p * math.log2(p) for p in shares.values() if p > 0))


# --- generation ---------------------------------------------------------------------------------------


@dataclass
class Generation:
    text: str
    route: str | None  # sequence mode: the decision; None otherwise
    counts: dict[str, float]  # (token, layer) decisions over prompt and generated tokens


@torch.no_grad()
def generate(
    model: RoutedModel,
    tokenizer,
    prompts: Sequence[str],
    spec: RoutingSpec,
    max_new_tokens: int,
    sampling: Sequence[SamplingParams] | None = None,
    plugged: PluggedSet | None = None,
    batch_size: int = 32,
    progress=None,
) -> list[Generation]:
    """Complete each prompt under one routing spec, as the server would (greedy unless `sampling` says).

    Rows stop at EOS or after max_new_tokens; finished rows leave the batch.
    """
    plugged = plugged if plugged is not None else model.plugged
    sampling = list(sampling) if sampling is not None else [SamplingParams()] * len(prompts)
    eos = (tokenizer.eos_token_id,) if tokenizer.eos_token_id is not None else ()
    results: list[Generation] = []
    for start in range(0, len(prompts), batch_size):
        chunk = list(prompts[start : start + batch_size])
        params = sampling[start : start + batch_size]
        results.extend(_generate_chunk(model, tokenizer, chunk, spec, max_new_tokens, params, plugged, eos))
        if progress is not None:
            progress.update(len(chunk))
    return results


def _generate_chunk(
    model: RoutedModel,
    tokenizer,
    prompts: list[str],
    spec: RoutingSpec,
    max_new_tokens: int,
    params: list[SamplingParams],
    plugged: PluggedSet,
    eos: tuple[int, ...],
) -> list[Generation]:
    ids = [tokenizer(p)["input_ids"] for p in prompts]
    specs = [spec] * len(prompts)
    routes: list[str | None] = [None] * len(prompts)
    if spec.mode == "sequence" and spec.expert is None:
        _, observed = DecodeBatch.prefill(model, ids, specs, plugged, observe=[True] * len(ids))
        routes = decide(observed.row_counts, plugged, model.router.sequence_min_share)
        specs = [RoutingSpec("sequence", expert=r, allow=spec.allow) for r in routes]
    batch, out = DecodeBatch.prefill(model, ids, specs, plugged)
    counts = [dict(c) for c in out.row_counts]
    generators = [p.generator(model.device) for p in params]
    generated: list[list[int]] = [[] for _ in prompts]
    alive = list(range(len(prompts)))
    logits = out.logits
    for step in range(max_new_tokens):
        tokens = sample(logits, [params[i] for i in alive], [generators[i] for i in alive], [step] * len(alive), eos)
        keep = []
        for row, (i, token) in enumerate(zip(alive, tokens, strict=True)):
            if token in eos:
                continue
            generated[i].append(token)
            keep.append(row)
        if step == max_new_tokens - 1 or not keep:
            break
        batch.keep(keep)
        alive = [alive[row] for row in keep]
        step_out = batch.step(model, [generated[i][-1] for i in alive], [specs[i] for i in alive], plugged)
        for i, row_counts in zip(alive, step_out.row_counts, strict=True):
            for k, v in row_counts.items():
                counts[i][k] = counts[i].get(k, 0.0) + v
        logits = step_out.logits
    texts = tokenizer.batch_decode(generated, skip_special_tokens=True)
    return [Generation(t, r, c) for t, r, c in zip(texts, routes, counts, strict=True)]


# --- evaluation -----------------------------------------------------------------------------------------


@dataclass
class EvalConfig:
    base: str = "general"  # the base domain: its target route is base
    limit: int = 200  # sequences per domain for perplexity and routing
    behaviour_limit: int = 100  # QA records per domain for accuracy
    max_tokens: int = 256
    max_new_tokens: int = 96
    batch_size: int = 16
    greedy_prompt_words: int = 8  # base domain: prompt = the first words of a text
    greedy_new_tokens: int = 32


@dataclass
class DomainResult:
    domain: str
    target: str | None
    sequences: int
    tokens: int
    ppl: dict[str, float]  # off, token, sequence, oracle, and per pinned route "pin:<name>"
    accuracy: dict[str, float] = field(default_factory=dict)  # off, token, sequence, oracle, pin:<name>
    behaviour_examples: int = 0
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


def _ppl(nll: float, count: int) -> float:
    return math.exp(nll / max(count, 1))


@torch.no_grad()
def sequence_nll(
    model: RoutedModel,
    tokenizer,
    examples: Sequence[Example],
    specs: Sequence[RoutingSpec],
    plugged: PluggedSet,
    config: EvalConfig,
) -> tuple[torch.Tensor, torch.Tensor, list[dict[str, float]]]:
    """Per example: summed NLL of its scored tokens [S], their count [S], and its (token, layer) routes."""
    nlls, counts, routes = [], [], []
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
    return torch.cat(nlls), torch.cat(counts), routes


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
    nll, count, _ = sequence_nll(model, tokenizer, examples, [RoutingSpec("off")] * n, plugged, config)
    route_nll[BASE_ROUTE] = nll
    for name in names:
        route_nll[name], _, _ = sequence_nll(
            model, tokenizer, examples, [RoutingSpec("pin", name)] * n, plugged, config
        )
    tokens = int(count.sum())
    ppl = {"off": _ppl(float(route_nll[BASE_ROUTE].sum()), tokens)}
    for name in names:
        ppl[f"pin:{name}"] = _ppl(float(route_nll[name].sum()), tokens)
    ppl["oracle"] = _ppl(float(torch.stack(list(route_nll.values())).min(dim=0).values.sum()), tokens)
    # token routing
    nll, _, token_counts = sequence_nll(model, tokenizer, examples, [RoutingSpec()] * n, plugged, config)
    ppl["token"] = _ppl(float(nll.sum()), tokens)
    totals: dict[str, float] = {}
    for row in token_counts:
        for route, c in row.items():
            totals[route] = totals.get(route, 0.0) + c
    if fired is not None:
        for route, c in totals.items():
            fired[route] = fired.get(route, 0.0) + c
    entropy = sum(entropy_bits(route_shares(row)) for row in token_counts) / max(n, 1)
    # sequence routing: decided from the prompt (QA: the question's prompt; text: the whole text)
    decisions = sequence_decisions(
        model, tokenizer, [e.prompt or e.target for e in examples], plugged, config.batch_size, config.max_tokens
    )
    specs = [RoutingSpec("sequence", expert=d) for d in decisions]
    nll, _, _ = sequence_nll(model, tokenizer, examples, specs, plugged, config)
    ppl["sequence"] = _ppl(float(nll.sum()), tokens)
    token_routes = route_shares(totals)
    sequence_routes = {r: decisions.count(r) / max(n, 1) for r in sorted(set(decisions))}
    result = DomainResult(
        domain=domain,
        target=target,
        sequences=n,
        tokens=tokens,
        ppl=ppl,
        sequence_to_target=sequence_routes.get(target, 0.0) if target else None,
        token_to_target=token_routes.get(target, 0.0) if target else None,
        sequence_routes=sequence_routes,
        token_routes=token_routes,
        entropy_bits=entropy,
    )
    qa = [e for e in examples if e.is_qa and e.gold is not None][: config.behaviour_limit]
    if qa:
        result.accuracy, result.behaviour_examples = behaviour(model, tokenizer, qa, config, extractor), len(qa)
    if domain == config.base:
        result.greedy_unchanged = greedy_unchanged(model, tokenizer, examples, config)
    return result


def behaviour(
    model: RoutedModel, tokenizer, qa: Sequence[Example], config: EvalConfig, extractor: Extractor
) -> dict[str, float]:
    """Greedy accuracy per routing: off, token, sequence, each expert pinned, and the per-problem oracle."""
    routes = {"off": RoutingSpec("off"), "token": RoutingSpec(), "sequence": RoutingSpec("sequence")}
    routes.update({f"pin:{name}": RoutingSpec("pin", name) for name in model.plugged.names})
    prompts = [e.prompt for e in qa]
    hits: dict[str, list[bool]] = {}
    for label, spec in tqdm(routes.items(), desc="behaviour", unit="route", leave=False):
        outs = generate(model, tokenizer, prompts, spec, config.max_new_tokens, batch_size=32)
        hits[label] = [extractor(o.text) == e.gold for o, e in zip(outs, qa, strict=True)]
    single = [hits["off"]] + [hits[k] for k in hits if k.startswith("pin:")]
    hits["oracle"] = [any(col) for col in zip(*single, strict=True)]
    return {label: sum(h) / len(h) for label, h in hits.items()}


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
) -> dict:
    """Every domain, then the cross-domain summary; a JSON-ready dict."""
    fired: dict[str, float] = {}
    results = [evaluate_domain(model, tokenizer, d, ex, config, extractor, fired) for d, ex in domains.items()]
    never = [name for name in model.plugged.names if fired.get(name, 0.0) == 0.0]
    return {
        "experts": list(model.plugged.names),
        "config": asdict(config),
        "domains": [{**asdict(r), "ppl_change": r.ppl_change, "oracle_gap": r.oracle_gap} for r in results],
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
