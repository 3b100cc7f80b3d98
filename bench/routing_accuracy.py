"""Routing accuracy of routing mechanisms, measured offline on captured MLP inputs.

Which route does each mechanism give the held-out texts of each domain, with a set of experts plugged? The
mechanisms are fitted only on what a server holds at plug time: each plugged expert's `domain_sample` (stored
in its file) and the base calibration text (moe/admission/calibration.txt); they are evaluated on held-out
data (`--data NAME=FILE`, the domain NAME's target is the expert of that name; `--base`'s, and that of a domain
no plugged expert serves, is the base route).

    python bench/routing_accuracy.py --model demo/model --experts demo/experts \
        --expert /tmp/percent/percent.safetensors --limit 200 --threads 1 \
        --data general=demo/data/general_heldout.jsonl math=demo/data/math_heldout.jsonl \
               code=demo/data/code_heldout.jsonl percent=/tmp/percent/percent_heldout.jsonl

Per mechanism and domain it prints

    seq     share of prompts whose sequence decision is the target (a QA record's prompt "Question: ...\\nAnswer:",
            a text's whole text: what `plugmoe eval` and sequence mode decide from)
    tok     share of (token, layer) decisions over the whole text (prompt and answer) that go to the target
    and, for the base domain, the false positives: 1 - seq and 1 - tok

Mechanisms (sequence decisions / token decisions):

    cosine (today)   per token and layer: cos(x, key) + offset > threshold, best eligible expert wins, else
                     base; a sequence goes to the prompt's most-chosen expert if it took >= 25% of its decisions
                     (moe.routing.router.choose_experts, decide_sequence: the served rule, run on these inputs)
    cosine routed    today's token decisions as the routed forward traces them (experts applied, so later layers
                     see the inputs token mode really produces; every other row uses the backbone's inputs)
    cosine joint     today's keys, every expert's thresholds refitted together per layer (coordinate ascent on
                     the mean recall over all samples, false positives on held-out calibration <= --cap)
    prototypes       nearest class prototype (mean context feature of each expert's sample, and of calibration
                     text for base), by cosine; an expert wins over base by a margin capped on calibration
    context          moe.routing.context.fit_context_router: logistic regression over (base, experts) on the
                     running context (unit mean of the unit MLP inputs after the prefix), probability floors
                     capped on calibration. Sequence: one classifier on all layers' context at the prompt's last
                     token. Token: per layer, a classifier on that layer's context, token included (what one
                     forward pass has when the layer runs: prefill and decode alike)
    context/step     token only: one decision per step for every layer, the sequence classifier on the context
                     before the token (decode-friendly, but prefill would need an observed pass first)
    token+context    token only: per layer, logistic regression on [unit(x), running context] of that layer

Every mechanism but `cosine routed` reads the backbone's MLP inputs (RoutingSpec("off")): what sequence mode
observes before it decides and what the gates are trained on. A second token table reads the inputs of right
routing (each domain's expert pinned), the flow a token router that is right meets at later layers; a third
table decides sequences from the prompt's first k tokens only (--prompt-tokens). Experts are fitted on their
samples' inputs on both flows (--fit-flows both, as stage 2 trains keys); --sample-texts fits on fewer texts.
Calibration text is split (--calibration-holdout of its lines) into a fitting part and a part for caps, as
train-expert does. Costs per decode step of each rule's routing maths are timed at the end (--time; the ops a
decode step would run, eager, not wired into the decoder).

Writes the tables (and, with --json, every figure) and nothing else; runs on CPU in a few minutes at --threads 1.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import random
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from experts.cli import load_experts_dir  # noqa: E402
from experts.data import Example, load_examples  # noqa: E402
from moe import RoutedModel, load_backbone  # noqa: E402
from moe.adapters.expert import BASE_ROUTE, Expert  # noqa: E402
from moe.adapters.file import ExpertFile  # noqa: E402
from moe.admission.samples import domain_sample  # noqa: E402
from moe.model.text_batches import batches, forward, special_prefix, token_nll  # noqa: E402
from moe.routing.context import (  # noqa: E402
    ContextClassifier,
    cap_floor,
    context_features,
    context_means,
    context_step,
    fit_classifier,
    fit_context_router,
    fit_floors,
)
from moe.routing.router import RoutingSpec, choose_experts, decide_sequence, gate_scores, route_top1  # noqa: E402

logger = logging.getLogger("routing_accuracy")
DEFAULT_CALIBRATION = REPO / "moe" / "admission" / "calibration.txt"


# --- capture --------------------------------------------------------------------------------------------


@dataclass
class Captured:
    """Texts' MLP inputs on the backbone: per text x [T, L, H] float32; `prompt` tokens are what sequence
    mode decides from; the first `skip` tokens are the tokenizer's special prefix."""

    inputs: list[torch.Tensor]
    prompt: list[int]
    skip: int


@torch.no_grad()
def capture(
    model: RoutedModel,
    tokenizer,
    items: Sequence[Example],
    max_tokens: int,
    batch_size: int,
    spec: RoutingSpec | None = None,
) -> Captured:
    """Every item's MLP inputs under `spec` (None: off, the backbone alone)."""
    spec = spec or RoutingSpec("off")
    inputs, prompt = [], []
    skip = len(special_prefix(tokenizer))
    for batch in batches(tokenizer, items, batch_size, max_tokens, eos=False):
        out = forward(model, batch, [spec] * len(batch), capture=True)
        stacked = torch.stack(out.mlp_inputs, dim=2).float()  # [B, T, L, H]
        for row in range(len(batch)):
            length = int(batch.mask[row].sum())
            inputs.append(stacked[row, :length].clone())
            unscored = int((~batch.scored[row, :length]).sum())  # QA: prefix + prompt; text: the prefix
            prompt.append(unscored if unscored > skip else length)  # a text's prompt is the whole text
    return Captured(inputs, prompt, skip)


@torch.no_grad()
def routed_token_counts(
    model: RoutedModel, tokenizer, items: Sequence[Example], max_tokens: int, batch_size: int
) -> dict[str, float]:
    """Today's token-mode decisions as the routed forward traces them, summed over the items."""
    total: dict[str, float] = {}
    for batch in batches(tokenizer, items, batch_size, max_tokens, eos=False):
        out = forward(model, batch, [RoutingSpec()] * len(batch))
        for counts in out.trace.row_counts():
            for route, n in counts.items():
                total[route] = total.get(route, 0.0) + n
    return total


# --- mechanisms -----------------------------------------------------------------------------------------
# Each mechanism maps one captured text (x [T, L, H], prompt length, skip) to a sequence decision (a class
# index, 0 = base, e = expert e) and/or its token decisions [T, L] (class indices).

Classes = tuple[str, ...]


@dataclass
class CosineGates:
    """The served gates: per layer keys [E, H] (unit), offsets [E], thresholds [E] (inf where not covered)."""

    keys: torch.Tensor  # [L, E, H]
    offsets: torch.Tensor  # [L, E]
    thresholds: torch.Tensor  # [L, E]
    min_share: float = 0.25

    @classmethod
    def of(cls, experts: Sequence[Expert], layers: int, hidden: int) -> CosineGates:
        keys = torch.zeros(layers, len(experts), hidden)
        offsets = torch.zeros(layers, len(experts))
        thresholds = torch.full((layers, len(experts)), math.inf)
        for e, expert in enumerate(experts):
            for i, layer in enumerate(expert.layers):
                keys[layer, e] = F.normalize(expert.keys[i].float(), dim=-1)
                offsets[layer, e] = float(expert.offsets[i])
                thresholds[layer, e] = float(expert.thresholds[i])
        return cls(keys, offsets, thresholds)

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        """x [T, L, H] -> [T, L, E]."""
        unit = F.normalize(x, dim=-1)
        return torch.stack([gate_scores(unit[:, i], self.keys[i], self.offsets[i]) for i in range(x.shape[1])], 1)

    def tokens(self, x: torch.Tensor, thresholds: torch.Tensor | None = None) -> torch.Tensor:
        """[T, L] class indices (0 base, e + 1 expert e), by the served choose_experts."""
        thresholds = self.thresholds if thresholds is None else thresholds
        scores = self.scores(x)
        covers = torch.ones(scores.shape[-1], dtype=torch.bool)
        cols = [choose_experts(scores[:, i], thresholds[i], None, None, covers, 1)[:, 0] for i in range(x.shape[1])]
        return torch.stack(cols, dim=1) + 1  # -1 (base) -> 0

    def sequence(self, tokens: torch.Tensor, prompt: int, classes: Classes) -> int:
        """decide_sequence on the prompt's (token, layer) decision counts."""
        counts = torch.bincount(tokens[:prompt].flatten(), minlength=len(classes)).tolist()
        route = decide_sequence(dict(zip(classes, map(float, counts), strict=True)), classes[1:], self.min_share)
        return classes.index(route)


def joint_thresholds(
    gates: CosineGates, fit: list[tuple[torch.Tensor, int]], calibration: list[torch.Tensor], cap: float, grid: int
) -> torch.Tensor:
    """Every expert's threshold refitted together, per layer: coordinate ascent over a grid of thresholds on the
    mean over classes of the share of each class's tokens routed to it (base: calibration positions kept on
    base), subject to at most `cap` of the held-out calibration positions going to any expert.

    fit: (x [T, L, H], class) for every fitting text, base included; calibration: held-out base texts."""
    thresholds = gates.thresholds.clone()
    experts = thresholds.shape[1]
    for layer in range(thresholds.shape[0]):
        scores = torch.cat([gates.scores(x)[:, layer] for x, _ in fit])  # [N, E]
        labels = torch.cat([torch.full((len(x),), c) for x, c in fit])
        held = torch.cat([gates.scores(x)[:, layer] for x in calibration])  # [M, E]

        def objective(
            t: torch.Tensor, scores: torch.Tensor = scores, labels: torch.Tensor = labels, held: torch.Tensor = held
        ) -> float:
            best, choice = torch.where(scores > t, scores, -math.inf).max(dim=1)
            route = torch.where(best > -math.inf, choice + 1, 0)
            recall = [float((route[labels == c] == c).float().mean()) for c in range(experts + 1)]
            held_best = torch.where(held > t, held, -math.inf).max(dim=1).values
            if float((held_best > -math.inf).float().mean()) > cap:
                return -1.0
            return sum(recall) / len(recall)

        candidates = [torch.quantile(scores[:, e], torch.linspace(0.0, 1.0, grid)) for e in range(experts)]
        current = thresholds[layer].clone()
        for _ in range(3):
            for e in range(experts):
                best_value, best_t = objective(current), float(current[e])
                for t in candidates[e].tolist():
                    trial = current.clone()
                    trial[e] = t
                    value = objective(trial)
                    if value > best_value:
                        best_value, best_t = value, t
                current[e] = best_t
        thresholds[layer] = current
    return thresholds


@dataclass
class Prototypes:
    """Nearest class prototype by cosine; an expert wins only if it beats base by its margin."""

    prototypes: torch.Tensor  # [C, D] unit
    margins: torch.Tensor  # [C], margins[0] unused

    def decide(self, features: torch.Tensor) -> torch.Tensor:
        """features [N, D] -> [N] class indices."""
        sims = F.normalize(features, dim=-1) @ self.prototypes.T  # [N, C]
        best, choice = sims.max(dim=-1)
        return torch.where(best - sims[:, 0] > self.margins[choice], choice, 0)


def fit_prototypes(features: torch.Tensor, labels: torch.Tensor, calibration: torch.Tensor, cap: float) -> Prototypes:
    classes = int(labels.max()) + 1
    prototypes = F.normalize(torch.stack([features[labels == c].mean(0) for c in range(classes)]), dim=-1)
    sims = F.normalize(calibration, dim=-1) @ prototypes.T
    best, choice = sims.max(dim=-1)
    margins = torch.zeros(classes)
    for c in range(1, classes):
        margins[c] = cap_floor((best - sims[:, 0])[choice == c], len(calibration), cap)
    return Prototypes(prototypes, margins)


def pin(name: str) -> RoutingSpec:
    return RoutingSpec("pin", name)


def previous_step(decisions: torch.Tensor, skip: int) -> torch.Tensor:
    """Per-position decisions [T] taken on the context through t -> the route of token t, decided before it
    (from the context through t - 1); tokens up to the first one after the prefix have none: base."""
    out = torch.zeros_like(decisions)
    out[skip + 1 :] = decisions[skip:-1]
    return out


# --- evaluation -----------------------------------------------------------------------------------------


@dataclass
class Shares:
    seq: list[int]  # per text, the sequence decision (class index); empty: the mechanism has none
    tok: torch.Tensor | None  # [K] counts of (token, layer) decisions per class; None: none


def share_of(shares: Shares, target: int) -> tuple[float | None, float | None]:
    seq = sum(d == target for d in shares.seq) / len(shares.seq) if shares.seq else None
    tok = float(shares.tok[target] / shares.tok.sum()) if shares.tok is not None else None
    return seq, tok


@torch.no_grad()
def sequence_nll(
    model: RoutedModel,
    tokenizer,
    items: Sequence[Example],
    specs: Sequence[RoutingSpec],
    max_tokens: int,
    batch_size: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per item, the summed NLL of its scored tokens [S] and their count [S] under its spec (as `plugmoe eval`
    scores them: EOS appended)."""
    nlls, counts = [], []
    for start, batch in zip(
        range(0, len(items), batch_size), batches(tokenizer, items, batch_size, max_tokens), strict=True
    ):
        out = forward(model, batch, list(specs[start : start + batch_size]))
        nll, count = token_nll(out.logits, batch)
        nlls.append(nll)
        counts.append(count)
    return torch.cat(nlls), torch.cat(counts)


def evaluate(
    mechanisms: dict[str, tuple[Callable | None, Callable | None]], held: dict[str, Captured], classes: Classes
) -> dict[str, dict[str, Shares]]:
    """mechanisms: name -> (sequence(x, prompt, skip) -> int or None, tokens(x, skip) -> [T, L] or None)."""
    results: dict[str, dict[str, Shares]] = {}
    for name, (sequence, tokens) in mechanisms.items():
        results[name] = {}
        for domain, captured in held.items():
            seq, tok = [], torch.zeros(len(classes)) if tokens else None
            for x, prompt in zip(captured.inputs, captured.prompt, strict=True):
                if sequence:
                    seq.append(sequence(x, prompt, captured.skip))
                if tokens:
                    tok += torch.bincount(tokens(x, captured.skip).flatten(), minlength=len(classes)).float()
            results[name][domain] = Shares(seq, tok)
    return results


def table(
    results: dict[str, dict[str, Shares]], targets: dict[str, int], classes: Classes, base: str, kind: str
) -> tuple[str, dict]:
    """Markdown table of one kind ('seq' or 'tok'): rows mechanisms, columns domains (+ confusions)."""
    domains = list(targets)
    head = [f"{d} ({'fp' if d == base else 'to target'})" for d in domains]
    lines = [f"| {kind} routing | " + " | ".join(head) + " |", "|---" * (len(head) + 1) + "|"]
    figures: dict = {}
    for name, per_domain in results.items():
        cells = []
        for domain in domains:
            seq, tok = share_of(per_domain[domain], targets[domain])
            value = seq if kind == "seq" else tok
            if value is None:
                cells.append("-")
                continue
            if domain == base:
                value = 1.0 - value
            figures.setdefault(name, {})[domain] = value
            cells.append(f"{100 * value:.2f}%" if domain == base else f"{100 * value:.1f}%")
        if any(c != "-" for c in cells):
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines), figures


def confusion(shares: Shares, classes: Classes, kind: str) -> str:
    counts = torch.bincount(torch.tensor(shares.seq), minlength=len(classes)).float() if kind == "seq" else shares.tok
    return ", ".join(f"{c} {100 * float(n / counts.sum()):.1f}%" for c, n in zip(classes, counts, strict=True))


# --- cost per decode step --------------------------------------------------------------------------------


def time_ops(experts: int, layers: int, hidden: int, rows: int, repeats: int) -> dict[str, float]:
    """Microseconds per decode step (all layers, `rows` rows) of each rule's routing maths, eager torch on CPU:
    today's route_top1 per layer; the context rule's context_step per layer (its state update included); the
    step rule's one classifier over all layers' sums per step plus the per-layer sum updates. "floors 0": the
    context rule when no floor binds (every expert's is zero, as fitted on the demo), a plain argmax."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(rows, hidden, generator=g)
    keys = F.normalize(torch.randn(experts, hidden, generator=g), dim=-1)
    offsets, thresholds = torch.zeros(experts), torch.full((experts,), 0.2)
    covers = torch.ones(experts, dtype=torch.bool)
    classes = experts + 1
    w_layer = torch.randn(classes, hidden, generator=g)
    w_mix = torch.randn(classes, 2 * hidden, generator=g)
    w_step = torch.randn(classes, layers * hidden, generator=g)
    bias, floors = torch.zeros(classes), torch.zeros(classes)
    sums = torch.zeros(rows, layers, hidden)

    def cosine() -> None:
        for _ in range(layers):
            route_top1(x, keys, offsets, thresholds, covers, None, None)

    def context() -> None:
        for layer in range(layers):
            context_step(sums[:, layer], x, w_layer, bias, floors)

    def context_unfloored() -> None:
        for layer in range(layers):
            context_step(sums[:, layer], x, w_layer, bias, None)

    def step() -> None:
        features = F.normalize(sums, dim=-1).flatten(1) / math.sqrt(layers)
        best, choice = (features @ w_step.T + bias).softmax(-1).max(-1)
        torch.where(best > floors[choice], choice, 0)
        for layer in range(layers):
            sums[:, layer] += F.normalize(x, dim=-1)

    def token_context() -> None:
        for layer in range(layers):
            unit = F.normalize(x, dim=-1)
            sums[:, layer] += unit
            z = torch.cat([unit, F.normalize(sums[:, layer], dim=-1)], dim=-1)
            best, choice = (z @ w_mix.T + bias).softmax(-1).max(-1)
            torch.where(best > floors[choice], choice, 0)

    rules = {
        "cosine (today)": cosine,
        "context": context,
        "context, floors 0": context_unfloored,
        "context/step": step,
        "token+context": token_context,
    }
    times: dict[str, list[float]] = {name: [] for name in rules}
    for _ in range(20):
        for fn in rules.values():
            fn()
    for _ in range(7):  # round-robin, so that a busy moment of a shared CPU hits every rule alike
        for name, fn in rules.items():
            start = time.perf_counter()
            for _ in range(repeats):
                fn()
            times[name].append((time.perf_counter() - start) / repeats * 1e6)
    return {name: sorted(t)[len(t) // 2] for name, t in times.items()}


# --- main -----------------------------------------------------------------------------------------------


def texts_as_examples(strings: Sequence[str]) -> list[Example]:
    return [Example("", s) for s in strings]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(REPO / "demo" / "model"))
    parser.add_argument("--experts", default=str(REPO / "demo" / "experts"), help="directory of plugged experts")
    parser.add_argument("--expert", action="append", default=[], help="one more expert file to plug (repeatable)")
    parser.add_argument("--data", nargs="+", required=True, help="NAME=FILE held-out records per domain")
    parser.add_argument("--base", default="general", help="the domain whose target is the base route")
    parser.add_argument("--calibration", default=str(DEFAULT_CALIBRATION), help="base text, one per line")
    parser.add_argument("--calibration-holdout", type=float, default=0.3, help="share of its lines kept for caps")
    parser.add_argument("--cap", type=float, default=1e-3, help="false-positive cap on held-out calibration")
    parser.add_argument("--limit", type=int, default=200, help="held-out records per domain")
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--weight-decay", type=float, default=1e-3, help="logistic regression's L2 penalty")
    parser.add_argument("--grid", type=int, default=41, help="thresholds tried per expert by the joint refit")
    parser.add_argument(
        "--fit-flows",
        choices=("off", "both"),
        default="both",
        help="fit on the samples' backbone inputs only, or also on their inputs with their expert pinned",
    )
    parser.add_argument(
        "--sample-texts", type=int, default=None, help="fit on at most this many of each domain sample's texts"
    )
    parser.add_argument(
        "--prompt-tokens", type=int, nargs="+", default=[2, 4, 8, 16], help="short-prompt table: prompt lengths"
    )
    parser.add_argument("--skip-joint", action="store_true", help="leave the joint threshold refit out")
    parser.add_argument("--time", action="store_true", help="also time each rule's routing maths per decode step")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", type=Path, default=None, help="write every figure here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    started = time.perf_counter()

    backbone, tokenizer = load_backbone(args.model, device="cpu")
    model = RoutedModel(backbone)
    experts = load_experts_dir(args.experts, model.fingerprint)
    experts += [ExpertFile.load(path, model.fingerprint) for path in args.expert]
    for expert in experts:
        model.plug(expert)
    classes: Classes = (BASE_ROUTE, *(e.name for e in experts))
    layers, hidden = model.num_layers, model.hidden_size
    logger.info("plugged %s on %d layers x %d hidden", classes[1:], layers, hidden)

    # fitting data: each expert's domain sample (class e) and part of the calibration text (class base)
    lines = [line for line in Path(args.calibration).read_text(encoding="utf-8").splitlines() if line.strip()]
    order = list(range(len(lines)))
    random.Random(f"{args.seed}/calibration-holdout").shuffle(order)
    cut = int(round(len(lines) * args.calibration_holdout))
    calib_fit = [lines[i] for i in sorted(order[cut:])]
    calib_held = [lines[i] for i in sorted(order[:cut])]
    fit_sets = {BASE_ROUTE: capture(model, tokenizer, texts_as_examples(calib_fit), args.max_tokens, args.batch_size)}
    for expert in experts:
        sample, source = domain_sample(expert)
        sample = sample[: args.sample_texts]
        logger.info("%s: %d texts from its %s", expert.name, len(sample), source)
        fit_sets[expert.name] = capture(model, tokenizer, texts_as_examples(sample), args.max_tokens, args.batch_size)
        if args.fit_flows == "both":  # also as the sample flows when routed to its expert (as stage 2 does)
            pinned = capture(
                model, tokenizer, texts_as_examples(sample), args.max_tokens, args.batch_size, pin(expert.name)
            )
            fit_sets[expert.name].inputs += pinned.inputs
    held_calib = capture(model, tokenizer, texts_as_examples(calib_held), args.max_tokens, args.batch_size)
    skip = held_calib.skip

    # held-out evaluation data
    held: dict[str, Captured] = {}
    right_flow: dict[str, Captured] = {}  # as the texts flow when routed right: their expert pinned (or off)
    examples: dict[str, list[Example]] = {}
    targets: dict[str, int] = {}
    for item in args.data:
        name, _, path = item.partition("=")
        examples[name] = load_examples(path)[: args.limit]
        held[name] = capture(model, tokenizer, examples[name], args.max_tokens, args.batch_size)
        targets[name] = classes.index(name) if name in classes else 0  # no expert of its own: base
        right_flow[name] = (
            capture(model, tokenizer, examples[name], args.max_tokens, args.batch_size, pin(name))
            if targets[name]
            else held[name]
        )
    logger.info("captured in %.1f s", time.perf_counter() - started)

    # fit every mechanism
    gates = CosineGates.of(experts, layers, hidden)
    fit_texts = [(x, c) for c, name in enumerate(classes) for x in fit_sets[name].inputs]

    def positions(make: Callable[[torch.Tensor], torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Every fitting position's features (after the prefix) and class."""
        feats = [make(x)[skip:] for x, _ in fit_texts]
        labels = [torch.full((len(f),), c) for f, (_, c) in zip(feats, fit_texts, strict=True)]
        return torch.cat(feats), torch.cat(labels)

    def held_positions(make: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        return torch.cat([make(x)[skip:] for x in held_calib.inputs])

    fit_started = time.perf_counter()
    feats, labels = positions(lambda x: context_features(x, skip))
    held_feats = held_positions(lambda x: context_features(x, skip))
    router_started = time.perf_counter()
    router = fit_context_router(
        {name: fit_sets[name].inputs for name in classes[1:]},
        fit_sets[BASE_ROUTE].inputs,
        held_calib.inputs,
        skip,
        args.cap,
        args.weight_decay,
    )
    context = router.sequence
    router_seconds = time.perf_counter() - router_started
    logger.info("context router fitted in %.1f s", router_seconds)
    prototypes = fit_prototypes(feats, labels, held_feats, args.cap)
    mixed: list[ContextClassifier] = []
    for layer in range(layers):

        def layer_mix(x: torch.Tensor, layer: int = layer) -> torch.Tensor:
            return torch.cat([F.normalize(x[:, layer], dim=-1), context_means(x, skip)[:, layer]], dim=-1)

        f, y = positions(layer_mix)
        mixed.append(fit_floors(fit_classifier(f, y, classes, args.weight_decay), held_positions(layer_mix), args.cap))
    joint = None
    if not args.skip_joint:
        joint = joint_thresholds(gates, fit_texts, held_calib.inputs, args.cap, args.grid)
        logger.info("joint thresholds per layer: %s", joint.tolist())
    fit_seconds = time.perf_counter() - fit_started
    logger.info("fitted in %.1f s", fit_seconds)

    def cosine_seq(x: torch.Tensor, prompt: int, _skip: int, t: torch.Tensor | None = None) -> int:
        return gates.sequence(gates.tokens(x[:prompt], t), prompt, classes)

    def context_seq(x: torch.Tensor, prompt: int, skip: int) -> int:
        return classes.index(router.sequence_route(x[:prompt], skip))

    def prototype_seq(x: torch.Tensor, prompt: int, skip: int) -> int:
        return int(prototypes.decide(context_features(x[:prompt], skip)[-1:])[0])

    def step_tokens(x: torch.Tensor, skip: int) -> torch.Tensor:
        step = previous_step(context.decide(context_features(x, skip)), skip)  # [T]
        return step[:, None].expand(-1, x.shape[1])

    def prototype_tokens(x: torch.Tensor, skip: int) -> torch.Tensor:
        step = previous_step(prototypes.decide(context_features(x, skip)), skip)
        return step[:, None].expand(-1, x.shape[1])

    def mix_tokens(x: torch.Tensor, skip: int) -> torch.Tensor:
        means = context_means(x, skip)
        cols = [
            gate.decide(torch.cat([F.normalize(x[:, layer], dim=-1), means[:, layer]], dim=-1))
            for layer, gate in enumerate(mixed)
        ]
        out = torch.stack(cols, dim=1)
        out[:skip] = 0
        return out

    mechanisms: dict[str, tuple[Callable | None, Callable | None]] = {
        "cosine (today)": (cosine_seq, lambda x, _skip: gates.tokens(x)),
    }
    if joint is not None:
        mechanisms["cosine joint"] = (
            lambda x, prompt, s: cosine_seq(x, prompt, s, joint),
            lambda x, _skip: gates.tokens(x, joint),
        )
    mechanisms |= {
        "prototypes": (prototype_seq, prototype_tokens),
        "context": (context_seq, lambda x, skip: router.token_routes(x, skip)),
        "context/step": (None, step_tokens),
        "token+context": (None, mix_tokens),
    }
    results = evaluate(mechanisms, held, classes)
    # today's token decisions on the routed flow, as `plugmoe eval` counts them
    routed: dict[str, Shares] = {}
    for name, items in examples.items():
        counts = routed_token_counts(model, tokenizer, items, args.max_tokens, args.batch_size)
        routed[name] = Shares([], torch.tensor([counts.get(c, 0.0) for c in classes]))
    results = {"cosine (today)": results["cosine (today)"], "cosine routed": routed} | {
        k: v for k, v in results.items() if k != "cosine (today)"
    }

    right = evaluate({k: (None, v[1]) for k, v in mechanisms.items() if v[1] is not None}, right_flow, classes)
    seq_table, seq_figures = table(results, targets, classes, args.base, "seq")
    right_table, right_figures = table(right, targets, classes, args.base, "tok")
    tok_table, tok_figures = table(results, targets, classes, args.base, "tok")
    print(f"plugged: {', '.join(classes[1:])}; {args.limit} held-out records per domain; cap {args.cap}\n")
    print(seq_table + "\n")
    print(tok_table + "\n")
    print("the same decisions on the inputs of right routing (each domain's expert pinned; base domains: off):")
    print(right_table + "\n")
    print("where each domain's prompts / decisions go:")
    for name, per_domain in results.items():
        for domain in held:
            shares = per_domain[domain]
            parts = []
            if shares.seq:
                parts.append("seq " + confusion(shares, classes, "seq"))
            if shares.tok is not None:
                parts.append("tok " + confusion(shares, classes, "tok"))
            print(f"  {name:15s} {domain:8s} " + "; ".join(parts))
    timings = {}
    # sequence mode's perplexity with each mechanism's decisions: a decided row runs as its route pinned, so
    # this is what sequence mode would score with that rule (and its gap to the per-sequence best route)
    seq_ppl: dict[str, dict[str, dict[str, float]]] = {}
    print("\nsequence-mode perplexity with each mechanism's decisions (oracle gap: vs the best route per sequence):")
    print("| mechanism | " + " | ".join(held) + " |")
    print("|---" * (len(held) + 1) + "|")
    deciders = {name: fns[0] for name, fns in mechanisms.items() if fns[0] is not None}
    rows: dict[str, list[str]] = {name: [] for name in deciders}
    for domain, items in examples.items():
        routes = {c: pin(c) if c != BASE_ROUTE else RoutingSpec("off") for c in classes}
        per_route = {c: sequence_nll(model, tokenizer, items, [spec] * len(items), args.max_tokens, args.batch_size)
                     for c, spec in routes.items()}  # fmt: skip
        count = per_route[BASE_ROUTE][1]
        nll_by_route = torch.stack([per_route[c][0] for c in classes])  # [C, S]
        oracle = math.exp(float(nll_by_route.min(dim=0).values.sum() / count.sum()))
        for name, decide in deciders.items():
            decided = [
                decide(x, p, held[domain].skip) for x, p in zip(held[domain].inputs, held[domain].prompt, strict=True)
            ]
            nll = nll_by_route.gather(0, torch.tensor(decided)[None])[0]  # each sequence's NLL on its decided route
            ppl = math.exp(float(nll.sum() / count.sum()))
            seq_ppl.setdefault(name, {})[domain] = {"ppl": ppl, "oracle": oracle, "gap": ppl / oracle - 1}
            rows[name].append(f"{ppl:.4g} ({100 * (ppl / oracle - 1):+.2f}%)")
    for name, cells in rows.items():
        print(f"| {name} | " + " | ".join(cells) + " |")

    # short prompts: the sequence decision from only the first k tokens after the prefix
    short: dict[str, dict[str, dict[int, float]]] = {}
    print("\nsequence decisions from the prompt's first k tokens after the prefix (share to target; base: fp):")
    print("| mechanism | domain | " + " | ".join(f"k={k}" for k in args.prompt_tokens) + " |")
    print("|---" * (len(args.prompt_tokens) + 2) + "|")
    for name, decide in (("cosine (today)", cosine_seq), ("context", context_seq)):
        for domain, captured in held.items():
            cells = []
            for k in args.prompt_tokens:
                hits = [
                    decide(x, min(prompt, skip + k), skip) == targets[domain]
                    for x, prompt in zip(captured.inputs, captured.prompt, strict=True)
                ]
                share = sum(hits) / len(hits)
                share = 1.0 - share if domain == args.base else share
                short.setdefault(name, {}).setdefault(domain, {})[k] = share
                cells.append(f"{100 * share:.1f}%")
            print(f"| {name} | {domain} | " + " | ".join(cells) + " |")
    if args.time:
        for rows in (1, 16):
            timings[rows] = time_ops(len(experts), layers, hidden, rows, repeats=200)
        print("\nrouting maths per decode step, all layers, eager CPU (us):")
        for rows, per_rule in timings.items():
            print(f"  batch {rows:2d}: " + ", ".join(f"{k} {v:.0f}" for k, v in per_rule.items()))
    print(
        f"\nfit: every mechanism {fit_seconds:.1f} s, the context router {router_seconds:.1f} s "
        f"(from captured inputs); total {time.perf_counter() - started:.1f} s"
    )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(
            json.dumps(
                {
                    "args": {k: str(v) for k, v in vars(args).items()},
                    "classes": classes,
                    "seq": seq_figures,
                    "tok": tok_figures,
                    "tok_right_flow": right_figures,
                    "seq_short_prompts": short,
                    "seq_ppl": seq_ppl,
                    "fit_seconds": fit_seconds,
                    "context_router_fit_seconds": router_seconds,
                    "timings_us": timings,
                    "context_floors": context.floors.tolist(),
                    "joint_thresholds": joint.tolist() if joint is not None else None,
                },
                indent=2,
            )
            + "\n"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
