"""Training an expert: the adapter (stage 1), its gate (stage 2), thresholds and offsets.

    stage 1  adapter   backbone frozen, the expert pinned on every token: AdamW on `down`/`up` only; loss on
                       every token of text records, on the answer tokens of question/answer records. Every
                       `eval_every` steps the held-out split is scored (greedy accuracy for QA, loss for
                       text) and the best step is kept, not the last.
    stage 2  gate      adapter frozen. Per layer, the MLP inputs the router scores are captured, each as it
                       flows when routed right: domain tokens with the expert pinned (token mode) and on the
                       backbone alone (what sequence mode observes: a QA record's prompt, a text), negative
                       tokens on the backbone alone. A key per layer is trained as a logistic classifier
                       sigmoid(tau * (cos(x, key) - b)) (PHATGOOSE: ~100 steps), from the difference of
                       class means.
             threshold per layer, the score that at most `fp_cap` of the base-domain calibration tokens exceed
                       ("cap"), or their highest score plus a margin ("max", stricter), on each of two parts
                       of the calibration text: the part the key trained against and a held-out part
                       (`threshold_holdout` of the texts, up to `threshold_max_tokens` tokens) it never saw,
                       so that the cap holds on new text. Other domains' negatives (and the plugged experts'
                       domain samples) train the key but do not set the threshold: the cap is about base text.
             offsets   the loss-free rule (moe.routing.balance) over mixed batches routed in token mode, target load =
                       the domain's share of the batch's tokens; clamped so the negatives' false-positive
                       rate stays within the cap.

Everything runs through RoutedModel.forward: gradients reach the adapter through the pinned dispatch path.
Shapes: L = backbone layers, Lx = layers the expert covers, H = hidden, r = rank, N = tokens.
"""

from __future__ import annotations

import functools
import logging
import math
import random
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F

from experts.config import TrainConfig
from experts.data import Example, Extractor, gsm8k_answer, shuffled_picks
from experts.evaluate import sequence_decisions
from experts.progress import progress_bar
from experts.schedule import warmup_cosine
from moe.adapters.expert import BASE_ROUTE, Expert
from moe.adapters.file import bound_domain_sample
from moe.adapters.slots import PluggedSet
from moe.admission.report import AdmissionLimits, admit
from moe.admission.samples import cap_threshold
from moe.decode.generation import generate
from moe.model.routed import RoutedModel
from moe.model.text_batches import TokenBatch, batches, capture_mlp_inputs, forward, summed_nll, token_nll
from moe.routing.balance import clamp_offsets, loss_free_update
from moe.routing.router import RoutingSpec

logger = logging.getLogger(__name__)


class TrainingError(RuntimeError):
    """Training cannot go on as configured (no data, no gradient, non-finite weights)."""


@dataclass
class StageOneResult:
    best_step: int
    best_metric: dict[str, float]
    history: list[dict[str, float]] = field(default_factory=list)
    seconds: float = 0.0


@dataclass
class GateResult:
    """Per covered layer: recall on domain tokens, false-positive rate on negatives (after offsets)."""

    recall: list[float]
    false_positive: list[float]  # on the calibration part the key trained against
    offset_ceiling: list[float]
    seconds: float = 0.0
    heldout_false_positive: list[float] = field(default_factory=list)  # on the part it never saw


# --- stage 1: the adapter -------------------------------------------------------------------------------


def trainable_expert(config: TrainConfig, hidden: int, num_layers: int, device: torch.device) -> Expert:
    """A fresh expert (up = 0: changes nothing yet) whose down/up are leaves that require grad."""
    layers = config.layers if config.layers is not None else tuple(range(num_layers))
    generator = torch.Generator().manual_seed(config.seed)
    expert = Expert.fresh(config.name, hidden, layers, config.rank, generator=generator)
    expert.down = expert.down.to(device).requires_grad_(True)
    expert.up = expert.up.to(device).requires_grad_(True)
    expert.keys, expert.offsets, expert.thresholds = (
        t.to(device) for t in (expert.keys, expert.offsets, expert.thresholds)
    )
    return expert


def reference_set(model: RoutedModel, experts: Sequence[Expert], version: int = 0) -> PluggedSet:
    """A plugged set that holds references to these experts' tensors (no copy, gradients flow)."""
    return PluggedSet.build(
        tuple(experts), model.num_layers, model.hidden_size, model.device, model.dtype, version, model.target_shapes
    )


def heldout_loss(model: RoutedModel, plugged: PluggedSet, spec: RoutingSpec, held: list[TokenBatch]) -> float:
    """Mean NLL per scored token over held-out batches."""
    total, count = summed_nll(held, lambda batch: forward(model, batch, [spec] * len(batch), plugged).logits)
    return total / max(count, 1)


def behaviour_accuracy(
    model: RoutedModel,
    tokenizer,
    plugged: PluggedSet,
    spec: RoutingSpec,
    examples: Sequence[Example],
    max_new_tokens: int,
    extractor: Extractor,
) -> float:
    """Share of QA examples whose greedy completion's extracted answer equals the gold one."""
    outs = generate(model, tokenizer, [e.prompt for e in examples], spec, max_new_tokens, plugged=plugged)
    hits = [e.gold is not None and extractor(o.text) == e.gold for o, e in zip(outs, examples, strict=True)]
    return sum(hits) / max(len(hits), 1)


def lr_at(step: int, config: TrainConfig) -> float:
    """Stage 1's learning rate at 0-based `step`: linear warmup to config.lr, then cosine down to 10% of it."""
    return warmup_cosine(step, config.lr, config.warmup_steps, config.steps, floor=0.1)


def train_adapter(
    model: RoutedModel,
    tokenizer,
    expert: Expert,
    train: Sequence[Example],
    heldout: Sequence[Example],
    config: TrainConfig,
    extractor: Extractor = gsm8k_answer,
) -> StageOneResult:
    """Stage 1, in place on expert.down/up (left at the best step's values)."""
    if not train:
        raise TrainingError("no training examples")
    started = time.perf_counter()
    device = model.device
    spec = RoutingSpec("pin", config.name)
    rng = random.Random(f"{config.seed}/batches")
    held = [b.to(device) for b in batches(tokenizer, list(heldout[: config.eval_examples]), 32, config.max_tokens)]
    qa = [e for e in heldout[: config.eval_examples] if e.is_qa and e.gold is not None]
    optimizer = torch.optim.AdamW([expert.down, expert.up], lr=config.lr, weight_decay=config.weight_decay)

    def evaluate(step: int) -> dict[str, float]:
        plugged = reference_set(model, (expert,))
        metric = {"step": step, "heldout_loss": heldout_loss(model, plugged, spec, held)}
        if qa:
            metric["heldout_accuracy"] = behaviour_accuracy(
                model, tokenizer, plugged, spec, qa, config.max_new_tokens, extractor
            )
        return metric

    def better(a: dict[str, float], b: dict[str, float]) -> bool:
        """Behaviour first (QA), held-out loss for text and to break ties. Accuracies within one binomial
        standard error of each other are a tie: on a few dozen problems one lucky answer is noise."""
        if "heldout_accuracy" in a:
            p = (a["heldout_accuracy"] + b["heldout_accuracy"]) / 2
            noise = math.sqrt(max(p * (1 - p), 1 / len(qa)) / len(qa))
            if abs(a["heldout_accuracy"] - b["heldout_accuracy"]) > noise:
                return a["heldout_accuracy"] > b["heldout_accuracy"]
        return a["heldout_loss"] < b["heldout_loss"]

    best = evaluate(0)
    history = [best]
    logger.info("stage 1 step 0 (backbone alone): %s", _fmt(best))
    best_weights = (expert.down.detach().clone(), expert.up.detach().clone())
    picks = shuffled_picks(len(train), config.batch_size, rng)
    bar = progress_bar(range(1, config.steps + 1), desc=f"stage 1 {config.name}", unit="step", leave=False)
    for step, picked in zip(bar, picks, strict=False):
        (batch,) = batches(tokenizer, [train[i] for i in picked], config.batch_size, config.max_tokens)
        batch = batch.to(device)
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step - 1, config)
        plugged = reference_set(model, (expert,))  # rebuilt each step: views of the leaves, never stale
        out = forward(model, batch, [spec] * len(batch), plugged)
        nll, count = token_nll(out.logits, batch)
        loss = nll.sum() / count.sum().clamp(min=1)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if expert.up.grad is None or expert.down.grad is None:
            raise TrainingError("no gradient reached the adapter: is the expert pinned in a plugged set?")
        torch.nn.utils.clip_grad_norm_([expert.down, expert.up], config.grad_clip)
        optimizer.step()
        bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)  # redrawn at the bar's own interval
        if step % config.eval_every == 0 or step == config.steps:
            metric = evaluate(step)
            history.append(metric)
            logger.info("stage 1 step %d: %s", step, _fmt(metric))
            if better(metric, best):
                best = metric
                best_weights = (expert.down.detach().clone(), expert.up.detach().clone())
    bar.close()
    with torch.no_grad():
        expert.down.copy_(best_weights[0])
        expert.up.copy_(best_weights[1])
    if not (torch.isfinite(expert.down).all() and torch.isfinite(expert.up).all()):
        raise TrainingError("NaNs or infinities in the trained adapter; lower --lr")
    logger.info("stage 1 kept step %d of %d: %s", best["step"], config.steps, _fmt(best))
    return StageOneResult(int(best["step"]), best, history, time.perf_counter() - started)


def _fmt(metric: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in metric.items())


# --- stage 2: the gate ----------------------------------------------------------------------------------


def train_key(positives: torch.Tensor, negatives: torch.Tensor, config: TrainConfig) -> torch.Tensor:
    """A unit key [H] for one layer from positive [P, H] and negative [N, H] MLP inputs.

    logit = tau * (cos(x, key) - b), trained with class-balanced BCE for gate_steps Adam steps (full batch),
    starting from the normalised difference of the classes' mean unit inputs.
    """
    pos, neg = F.normalize(positives, dim=-1), F.normalize(negatives, dim=-1)
    key = F.normalize(pos.mean(0) - neg.mean(0), dim=0).clone().requires_grad_(True)
    bias = torch.zeros((), requires_grad=True)
    optimizer = torch.optim.Adam([key, bias], lr=config.gate_lr)
    x = torch.cat([pos, neg])
    y = torch.cat([torch.ones(len(pos)), torch.zeros(len(neg))])
    weight = torch.cat([torch.full((len(pos),), 0.5 / len(pos)), torch.full((len(neg),), 0.5 / len(neg))])
    for _ in range(config.gate_steps):
        logits = config.gate_temperature * (x @ F.normalize(key, dim=0) - bias)
        loss = (F.binary_cross_entropy_with_logits(logits, y, reduction="none") * weight).sum()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return F.normalize(key.detach(), dim=0)


def offset_ceiling(negative_scores: torch.Tensor, threshold: float, cap: float) -> float:
    """The highest offset with which at most floor(cap * N) negative scores still pass: score + offset >
    threshold must stay rare, so offset <= threshold - cap_threshold(scores, cap). (With cap 0 no negative
    passes: the stricter "max" rule uses that.)"""
    return threshold - cap_threshold(negative_scores, cap)


def split_calibration(calibration: Sequence[Example], share: float, seed: int) -> tuple[list, list]:
    """(key part, threshold part): a seeded split of the calibration texts; `share` of them are kept out of key
    training, so the thresholds are fitted on text the key never saw (a quantile of the key's own negatives is
    biased low: the key was trained to push exactly those down)."""
    order = list(range(len(calibration)))
    random.Random(f"{seed}/threshold-holdout").shuffle(order)
    cut = int(round(len(order) * share)) if len(order) > 1 else 0
    held = set(order[:cut])
    return [e for i, e in enumerate(calibration) if i not in held], [e for i, e in enumerate(calibration) if i in held]


@torch.no_grad()
def calibration_scores(
    model: RoutedModel,
    tokenizer,
    texts: Sequence[Example],
    expert: Expert,
    keys: Sequence[torch.Tensor],
    max_tokens: int,
    limit: int,
    chunk: int = 64,
) -> list[torch.Tensor]:
    """Per covered layer, the key's cosine scores [N] on the backbone's MLP inputs of `texts` (up to `limit`
    tokens), captured a chunk of texts at a time so that only the scores are kept, not the inputs."""
    scores: list[list[torch.Tensor]] = [[] for _ in expert.layers]
    seen = 0
    for start in range(0, len(texts), chunk):
        captured = capture_mlp_inputs(
            model,
            tokenizer,
            texts[start : start + chunk],
            RoutingSpec("off"),
            None,
            max_tokens,
            limit - seen,
            site=expert.gate_site,
        )
        for i, layer in enumerate(expert.layers):
            scores[i].append(F.normalize(captured[layer], dim=-1) @ keys[i])
        seen += len(captured[0])
        if seen >= limit:
            break
    return [torch.cat(s) if s else torch.empty(0) for s in scores]


def train_gate(
    model: RoutedModel,
    tokenizer,
    expert: Expert,
    domain: Sequence[Example],
    calibration: Sequence[Example],
    config: TrainConfig,
    negatives: Sequence[Example] = (),
    others: Sequence[Expert] = (),
    other_examples: Sequence[Example] = (),
) -> GateResult:
    """Stage 2 in place on expert.keys / thresholds / offsets (adapter frozen).

    calibration: base-domain text; the key learns to reject part of it and the thresholds cap the false
    positives on both parts (config.threshold_holdout of the texts are kept out of key training).
    negatives, other_examples: other domains' text (and the plugged experts' domain samples), which the key
    also learns to reject.
    """
    started = time.perf_counter()
    plugged = reference_set(model, (expert,))
    limit = config.gate_max_tokens
    # domain tokens as they reach the gate when routed right: with the expert applied (token mode), and on
    # the backbone alone for what sequence mode observes before deciding (a QA record's prompt, a text)
    # the gate reads its site's input (Expert.gate_site: the attention block's for an expert that changes it)
    capture = functools.partial(capture_mlp_inputs, site=expert.gate_site)
    pinned = capture(
        model, tokenizer, domain, RoutingSpec("pin", expert.name), plugged, config.max_tokens, limit, domain=True
    )
    observed = [Example("", e.prompt or e.target) for e in domain]
    plain = capture(model, tokenizer, observed, RoutingSpec("off"), plugged, config.max_tokens, limit, domain=True)
    pos = [torch.cat([a, b]) for a, b in zip(pinned, plain, strict=True)]
    off = RoutingSpec("off")
    key_calibration, threshold_calibration = split_calibration(calibration, config.threshold_holdout, config.seed)
    base_neg = capture(model, tokenizer, key_calibration, off, plugged, config.max_tokens, 2 * limit)
    neg = base_neg
    if negatives or other_examples:  # other domains are negatives for the key too (not for the threshold)
        others_text = [*negatives, *other_examples]
        extra = capture(model, tokenizer, others_text, off, plugged, config.max_tokens, limit)
        neg = [torch.cat([b[:limit], x]) for b, x in zip(base_neg, extra, strict=True)]
    logger.info("stage 2: %d domain and %d negative tokens per layer", len(pos[0]), len(neg[0]))
    keys = [
        train_key(pos[layer], neg[layer], config)
        for layer in progress_bar(expert.layers, desc=f"stage 2 {expert.name} keys", unit="layer", leave=False)
    ]
    held_scores = calibration_scores(
        model, tokenizer, threshold_calibration, expert, keys, config.max_tokens, config.threshold_max_tokens
    )
    thresholds, ceilings = [], []
    for i, layer in enumerate(expert.layers):
        parts = [p for p in (F.normalize(base_neg[layer], dim=-1) @ keys[i], held_scores[i]) if len(p)]
        if config.threshold_rule == "max":
            threshold = max(float(p.max()) for p in parts) + config.threshold_margin
        else:
            threshold = max(cap_threshold(p, config.fp_cap) for p in parts)
        thresholds.append(threshold)
        # the "max" rule promises that no calibration token passes, so balancing may not open the gate further;
        # the cap holds on each part (the key's negatives, the held-out calibration) on its own
        cap = 0.0 if config.threshold_rule == "max" else config.fp_cap
        ceilings.append(min(offset_ceiling(p, threshold, cap) for p in parts))
    device = expert.keys.device
    expert.keys = torch.stack(keys).to(device)
    expert.thresholds = torch.tensor(thresholds, dtype=torch.float32, device=device)
    expert.offsets = torch.zeros(len(expert.layers), dtype=torch.float32, device=device)
    ceiling = torch.tensor(ceilings, dtype=torch.float32, device=device)
    balance_offsets(
        model, tokenizer, expert, domain, [*calibration, *negatives], config, ceiling, others, other_examples
    )
    recall, false_positive, heldout_false_positive = [], [], []
    for i, layer in enumerate(expert.layers):
        key, offset, threshold = expert.keys[i].cpu().float(), float(expert.offsets[i]), float(expert.thresholds[i])
        recall.append(float((F.normalize(pos[layer].cpu(), dim=-1) @ key + offset > threshold).float().mean()))
        false_positive.append(
            float((F.normalize(base_neg[layer].cpu(), dim=-1) @ key + offset > threshold).float().mean())
        )
        held = held_scores[i]
        heldout_false_positive.append(float((held + offset > threshold).float().mean()) if len(held) else 0.0)
    logger.info(
        "stage 2 recall per layer %s, false positives %s (held-out calibration %s, %d tokens)",
        [round(r, 3) for r in recall],
        [round(f, 5) for f in false_positive],
        [round(f, 5) for f in heldout_false_positive],
        len(held_scores[0]) if held_scores else 0,
    )
    return GateResult(recall, false_positive, ceilings, time.perf_counter() - started, heldout_false_positive)


@torch.no_grad()
def balance_offsets(
    model: RoutedModel,
    tokenizer,
    expert: Expert,
    domain: Sequence[Example],
    negatives: Sequence[Example],
    config: TrainConfig,
    ceiling: torch.Tensor,
    others: Sequence[Expert] = (),
    other_examples: Sequence[Example] = (),
) -> None:
    """The loss-free rule on expert.offsets over mixed batches routed in token mode (the server's path).

    Each batch mixes domain, negative and other experts' examples; the target load is the domain's share
    of the batch's real tokens, the observed load this expert's share of the (token, layer) decisions on
    each layer it covers. Offsets are clamped to `ceiling` [Lx] after every update.
    """
    if config.balance_steps <= 0:
        return
    rng = random.Random(f"{config.seed}/balance")
    pools = [("domain", list(domain)), ("negative", list(negatives)), ("other", list(other_examples))]
    pools = [(kind, pool) for kind, pool in pools if pool]
    per_kind = max(1, config.balance_batch // len(pools))
    layer_index = {layer: i for i, layer in enumerate(expert.layers)}
    bar = progress_bar(range(config.balance_steps), desc=f"stage 2 {expert.name} offsets", unit="batch", leave=False)
    for _ in bar:
        picked: list[Example] = []
        is_domain: list[bool] = []
        for kind, pool in pools:
            chosen = rng.sample(pool, min(per_kind, len(pool)))
            picked.extend(chosen)
            is_domain.extend([kind == "domain"] * len(chosen))
        (batch,) = batches(tokenizer, picked, len(picked), config.max_tokens)
        batch = batch.to(model.device)
        plugged = reference_set(model, (*others, expert))
        out = forward(model, batch, [RoutingSpec()] * len(picked), plugged)
        tokens = batch.mask.sum(dim=1).float()  # [B]
        target = float(tokens[torch.tensor(is_domain, device=tokens.device)].sum() / tokens.sum())
        observed = torch.zeros(len(expert.layers), device=expert.offsets.device)
        for layer, counts in enumerate(out.trace.layer_counts()):
            if layer in layer_index:
                observed[layer_index[layer]] = counts.get(expert.name, 0.0) / max(sum(counts.values()), 1.0)
        updated = loss_free_update(expert.offsets, observed, torch.full_like(observed, target), config.balance_rate)
        expert.offsets = clamp_offsets(updated, ceiling)
    logger.info(
        "offsets after %d balancing batches: %s", config.balance_steps, [round(float(o), 4) for o in expert.offsets]
    )


# --- the whole pipeline ---------------------------------------------------------------------------------


def train_expert(
    model: RoutedModel,
    tokenizer,
    config: TrainConfig,
    train: Sequence[Example],
    heldout: Sequence[Example],
    calibration: Sequence[Example],
    calibration_heldout: Sequence[Example] = (),
    extractor: Extractor = gsm8k_answer,
    negatives: Sequence[Example] = (),
    others: Sequence[Expert] = (),
    other_examples: Sequence[Example] = (),
    description: str = "",
    examples: Sequence[str] = (),
    provenance: dict | None = None,
    sample: Sequence[Example] = (),
    repair_calibration: Sequence[str] = (),
    adapter: Expert | None = None,
) -> Expert:
    """Stage 1, stage 2, the repair beside `others` and a routing check; returns the trained expert (on CPU,
    float32, no grad).

    calibration (and its held-out part, for the routing check) is base-domain text: the false-positive cap
    applies to it. negatives are other domains' texts the gate must also reject. The file's domain sample is
    drawn from `sample` (default: heldout). With `others`, the thresholds are repaired beside them on
    `repair_calibration` (default: the calibration texts) as the server's admission does (moe.admission.report).
    With `adapter` (an expert of the same layers and rank), stage 1 is skipped and its adapter kept: only
    the gate is trained (re-fitting an expert's gate beside new experts).
    """
    torch.manual_seed(config.seed)
    started = time.perf_counter()
    expert = trainable_expert(config, model.hidden_size, model.num_layers, model.device)
    if adapter is None:
        stage1 = train_adapter(model, tokenizer, expert, train, heldout, config, extractor)
    else:  # stage 1 skipped: the adapter comes from another file, only the gate is trained
        if adapter.kind != "bottleneck":
            raise TrainingError(
                f"--adapter-from {adapter.name!r} is a {adapter.kind} expert; refit a LoRA expert's gate with "
                "`plugmoe import-lora` from its PEFT adapter directory"
            )
        if (adapter.layers, adapter.rank) != (expert.layers, expert.rank):
            raise TrainingError(
                f"the adapter covers layers {list(adapter.layers)} at rank {adapter.rank}; the config asks for "
                f"layers {list(expert.layers)} at rank {expert.rank}"
            )
        expert.down, expert.up = (t.detach().to(model.device, model.dtype) for t in (adapter.down, adapter.up))
        stage1 = StageOneResult(
            -1,
            {"adapter_from": adapter.name},
            list((adapter.metadata.get("evals") or {}).get("stage1", {}).get("history", [])),
        )
    expert.down, expert.up = expert.down.detach(), expert.up.detach()
    others = tuple(o.to(model.device, model.dtype) for o in others)
    gate = train_gate(model, tokenizer, expert, train, calibration, config, negatives, others, other_examples)
    own_sample = domain_sample_texts(sample or heldout, config.sample_size, config.seed)
    expert.metadata = {"domain_sample": own_sample}
    admission = None
    if others:
        admission = repair_beside(model, tokenizer, expert, others, repair_calibration or texts_of(calibration), config)
    routing = routing_check(model, tokenizer, expert, heldout, calibration_heldout or calibration, others)
    logger.info("routing check: %s", _fmt(routing))
    expert.description = description
    expert.examples = example_prompts(examples, heldout)
    expert.metadata = {
        "domain_sample": own_sample,
        "provenance": {**(provenance or {}), "config": _jsonable(asdict(config))},
        "evals": {
            "stage1": {
                "best_step": stage1.best_step,
                "best": stage1.best_metric,
                "history": stage1.history,
                "seconds": round(stage1.seconds, 1),
            },
            "gate": gate_evals(gate, config),
            "admission": admission,
            "routing": routing,
            "seconds": round(time.perf_counter() - started, 1),
        },
    }
    return expert.to("cpu", torch.float32)


def gate_evals(gate: GateResult, config: TrainConfig) -> dict:
    """Stage 2's figures as the expert file's evals record them (train-expert and import-lora alike)."""
    return {
        "threshold_rule": config.threshold_rule,
        "fp_cap": config.fp_cap,
        "recall_per_layer": gate.recall,
        "false_positive_per_layer": gate.false_positive,
        "offset_ceiling": gate.offset_ceiling,
        "heldout_false_positive_per_layer": gate.heldout_false_positive,
        "threshold_holdout": config.threshold_holdout,
        "seconds": round(gate.seconds, 1),
    }


def texts_of(examples: Sequence[Example]) -> list[str]:
    """Examples as whole texts (a QA record: its prompt followed by its answer)."""
    return [(e.prompt or "") + e.target for e in examples]


def example_prompts(given: Sequence[str], heldout: Sequence[Example]) -> tuple[str, ...]:
    """The example prompts an expert file carries: the given ones, else the first 3 held-out prompts (a text
    record's text), 200 characters at most."""
    return tuple(given) or tuple((e.prompt or e.target)[:200] for e in heldout[:3])


def domain_sample_texts(examples: Sequence[Example], size: int, seed: int) -> list[str]:
    """A seeded sample of the domain as whole texts, within the expert file's bounds (moe.adapters.file)."""
    order = list(range(len(examples)))
    random.Random(f"{seed}/domain-sample").shuffle(order)
    return bound_domain_sample(texts_of([examples[i] for i in order]), max_texts=size)


def repair_beside(
    model: RoutedModel,
    tokenizer,
    expert: Expert,
    others: Sequence[Expert],
    calibration: Sequence[str],
    config: TrainConfig,
) -> dict:
    """The server's admission with repair, run now beside `others`: raises expert.thresholds (in place) so the
    file comes out within the caps beside the experts it will meet. Returns the report as a dict."""
    limits = AdmissionLimits(
        max_false_positive_rate=config.max_false_positive_rate, max_steal_rate=config.max_steal_rate
    )
    result = admit(
        model,
        tokenizer,
        expert,
        calibration,
        limits,
        max_tokens=config.max_tokens,
        plugged=reference_set(model, others),
    )
    expert.thresholds = result.expert.thresholds.to(expert.thresholds.device)
    report = result.report
    if report.repair is not None:
        logger.info(
            "repaired beside %s: thresholds %s -> %s, own recall per layer %s -> %s",
            [o.name for o in others],
            [round(t, 4) for t in report.repair.thresholds_before],
            [round(t, 4) for t in report.repair.thresholds_after],
            report.repair.own_recall_before,
            report.repair.own_recall_after,
        )
    for check in report.domains:
        logger.info(
            "beside %s: %s token-mode perplexity %+.3f%%, takes %s",
            [o.name for o in others],
            check.domain,
            100 * check.ppl_change,
            [round(r, 5) for r in check.take_rates],
        )
    if report.problems:
        logger.warning("the server's admission would refuse this expert beside them: %s", report.problems)
    return report.to_dict()


def routing_check(
    model: RoutedModel,
    tokenizer,
    expert: Expert,
    domain: Sequence[Example],
    negatives: Sequence[Example],
    others: Sequence[Expert] = (),
    limit: int = 200,
) -> dict[str, float]:
    """Sequence-mode decisions on held-out prompts: share of domain prompts sent to the expert and of
    negative texts sent to base (QA records: their prompt; text records: the whole text)."""
    plugged = reference_set(model, (*others, expert))
    domain_texts = [e.prompt or e.target for e in domain[:limit]]
    negative_texts = [e.prompt or e.target for e in negatives[:limit]]
    to_expert = sequence_decisions(model, tokenizer, domain_texts, plugged)
    to_base = sequence_decisions(model, tokenizer, negative_texts, plugged)
    return {
        "domain_to_expert": sum(r == expert.name for r in to_expert) / max(len(to_expert), 1),
        "negatives_to_base": sum(r == BASE_ROUTE for r in to_base) / max(len(to_base), 1),
    }


def _jsonable(value):
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return value
