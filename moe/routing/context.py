"""Routing from the sequence's context: a route chosen from the pooled MLP inputs of the tokens so far.

A cosine gate scores one token's MLP input against one key, so on two neighbouring domains (demo math and
percentage problems share most of their words) it cannot tell them apart on most tokens: the domain is a
property of the sequence. This module holds the maths of a router that sees the sequence, as Arrow /
PHATGOOSE-style prototypes and per-query routers do, with nothing wired into decode:

    context     per position t and layer l, the unit-normalised running mean of the unit MLP inputs of the
                tokens after the special prefix up to t:  m[t, l] = unit(sum_{s<=t} unit(x[s, l]))
                (the prefix token, BOS, carries no domain and is left out)                   [T, L, H]
    features    the layers' contexts side by side, divided by sqrt(L) so a feature has norm 1  [T, L*H]
    classifier  multinomial logistic regression over the classes (base, expert_1, ..., expert_E), fitted on
                every plugged expert's domain sample (class e) and base calibration text (class base), at
                every position of every text (a prompt of any length is a prefix of such a text)
    floors      per expert, the lowest probability with which it may win: raised until at most `cap` of the
                base calibration's held-out positions go to it (the same cap rule the cosine gates use)
    decide      the most probable class when it is an expert whose probability clears its floor, else base

A sequence-mode request is decided once, from the features at its prompt's last token (all layers, as an
observed prefill captures them). Token mode has one classifier per layer on that layer's context mean, the
token itself included, so a single forward pass (prefill or decode) has all it needs when the layer runs:
the state is one running sum [L, H] per row (no count: a sum has its mean's direction), and each layer adds
the token's unit input and multiplies by a [C, H] matrix, as today's gates multiply by [E, H] keys
(`context_step` is that decode op).

Plugging or unplugging an expert refits the router over the new set (demo set of three: 19-29 s from captured
inputs on one busy CPU thread, bench/routing_accuracy.py; subsample positions to go faster):
a fitted classifier is a value (`ContextClassifier`), so a plugged set can keep the one it was fitted with and
an unplug restores the previous one exactly.

Shapes: T = positions, L = layers, H = hidden, D = L*H features, N = samples, C = classes (base first).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from moe.adapters.expert import BASE_ROUTE, Expert


def domain_texts(expert: Expert) -> tuple[list[str], str]:
    """The texts an expert's domain is known by, and what they are: its stored `domain_sample`, or (for a file
    without one) its example prompts. What the context router is fitted on and admission measures."""
    sample = list(expert.metadata.get("domain_sample") or [])
    if sample:
        return sample, "domain_sample"
    return list(expert.examples), "examples"


def sample_digest(expert: Expert) -> str:
    """A digest of the expert's domain texts: a router fitted on them serves an expert of this name and digest."""
    return hashlib.sha256(json.dumps(domain_texts(expert)[0]).encode()).hexdigest()[:16]


def context_means(x: torch.Tensor, skip: int = 0) -> torch.Tensor:
    """x [T, L, H] one text's MLP inputs -> [T, L, H] unit running means of its unit inputs.

    Positions before `skip` (the special prefix) are left out of every mean and get zeros themselves (no
    context yet). Equals, for each t >= skip and layer l:  unit(sum(unit(x[s, l]) for s in range(skip, t + 1))).
    """
    unit = F.normalize(x.float(), dim=-1)
    sums = torch.zeros_like(unit)
    sums[skip:] = unit[skip:].cumsum(dim=0)
    return F.normalize(sums, dim=-1)  # zero rows stay zero


def context_features(x: torch.Tensor, skip: int = 0) -> torch.Tensor:
    """x [T, L, H] -> [T, L*H]: each position's context means, layers side by side, norm 1 (0 before skip)."""
    means = context_means(x, skip)
    return means.flatten(1) / math.sqrt(means.shape[1])


@dataclass(frozen=True)
class ContextClassifier:
    """A fitted router over `classes` (base first): standardised features, a linear layer, probability floors.

    center, scale [D]; weight [C, D]; bias [C]; floors [C] (floors[0], base's, is unused: base needs none).
    """

    classes: tuple[str, ...]
    center: torch.Tensor
    scale: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor
    floors: torch.Tensor

    def __post_init__(self) -> None:
        assert self.classes and self.classes[0] == BASE_ROUTE, self.classes
        assert self.weight.shape == (len(self.classes), self.center.shape[0]), self.weight.shape

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        """features [N, D] -> [N, C]."""
        return ((features - self.center) / self.scale) @ self.weight.T + self.bias

    def probabilities(self, features: torch.Tensor) -> torch.Tensor:
        return self.logits(features).softmax(dim=-1)

    def decide(self, features: torch.Tensor, allowed: torch.Tensor | None = None) -> torch.Tensor:
        """features [N, D] -> [N] class index: the most probable class if it clears its floor, else 0 (base).
        allowed [C] bool (base always): the classes a row may take; the others' logits are -inf."""
        logits = self.logits(features)
        if allowed is not None:
            logits = logits.masked_fill(~allowed, float("-inf"))
        best, choice = logits.softmax(dim=-1).max(dim=-1)
        return torch.where(best > self.floors[choice], choice, 0)

    def routes(self, features: torch.Tensor, allowed: torch.Tensor | None = None) -> list[str]:
        """features [N, D] -> the route of each row, a class name ('base' or an expert's)."""
        return [self.classes[i] for i in self.decide(features, allowed).tolist()]

    def with_floors(self, floors: torch.Tensor) -> ContextClassifier:
        return ContextClassifier(self.classes, self.center, self.scale, self.weight, self.bias, floors)

    @property
    def floored(self) -> bool:
        """Whether some expert's floor is above zero (else a decision is a plain argmax)."""
        return bool((self.floors[1:] > 0).any())

    def input_space(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(weight [C, D], bias [C]) acting on raw features, the standardisation folded in: what a decode step
        multiplies by (logits = features @ weight.T + bias equals self.logits(features))."""
        weight = self.weight / self.scale
        return weight, self.bias - weight @ self.center


def fit_classifier(
    features: torch.Tensor,
    labels: torch.Tensor,
    classes: Sequence[str],
    weight_decay: float = 1e-3,
    steps: int = 100,
) -> ContextClassifier:
    """Multinomial logistic regression: features [N, D], labels [N] in 0..C-1 (0 = base) -> a classifier with
    zero floors. Classes are weighted equally whatever their sample sizes (a domain sample holds 64 texts, the
    calibration text hundreds); full-batch L-BFGS, deterministic for the same inputs."""
    classes = tuple(classes)
    if not classes or classes[0] != BASE_ROUTE:
        raise ValueError(f"classes must start with {BASE_ROUTE!r}, got {classes}")
    counts = torch.bincount(labels, minlength=len(classes)).float()
    if (counts == 0).any():
        empty = [c for c, n in zip(classes, counts.tolist(), strict=True) if n == 0]
        raise ValueError(f"no samples for classes {empty}: every class needs a sample to fit on")
    features = features.float()
    center = features.mean(dim=0)
    scale = features.std(dim=0).clamp(min=1e-6)
    z = (features - center) / scale
    class_weight = counts.sum() / (len(classes) * counts)  # [C]
    weight = torch.zeros(len(classes), z.shape[1], requires_grad=True)
    bias = torch.zeros(len(classes), requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], lr=1.0, max_iter=steps, line_search_fn="strong_wolfe")

    def loss_fn() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(z @ weight.T + bias, labels, weight=class_weight) + weight_decay * weight.square().sum()
        loss.backward()
        return loss

    optimizer.step(loss_fn)
    return ContextClassifier(classes, center, scale, weight.detach(), bias.detach(), torch.zeros(len(classes)))


@dataclass(frozen=True)
class ContextRouter:
    """The routes of one plugged set: a sequence classifier on context_features (every layer, at a prompt's
    last token) and, per layer, a token classifier on that layer's context mean (with the token itself), which
    needs nothing that a single forward pass has not computed by then (prefill and decode alike)."""

    sequence: ContextClassifier
    layers: tuple[ContextClassifier, ...]  # empty: a router for sequence mode only
    skip: int = 0  # tokens of the special prefix (BOS) every fitted text began with: left out of the context
    fitted_on: tuple[tuple[str, str], ...] = ()  # per expert class, (name, sample_digest): the set it serves

    @property
    def classes(self) -> tuple[str, ...]:
        return self.sequence.classes

    def sequence_route(self, x: torch.Tensor, skip: int | None = None, allow: Sequence[str] | None = None) -> str:
        """x [T, L, H] a prompt's MLP inputs (as an observed prefill captures them) -> its route's name
        (skip: the prefix to leave out, default the router's own; allow: the experts it may go to, None: any)."""
        skip = self.skip if skip is None else skip
        if x.shape[0] <= skip:
            return BASE_ROUTE  # no token after the prefix: nothing to tell a domain by
        allowed = None
        if allow is not None:
            allowed = torch.tensor([c == BASE_ROUTE or c in allow for c in self.classes])
        return self.sequence.routes(context_features(x, skip)[-1:], allowed)[0]

    def with_token_floors(self, name: str, floors: dict[int, float]) -> ContextRouter:
        """This router with expert `name`'s floor set to floors[layer] in those layers' token classifiers (every
        other floor, and the sequence classifier, as they are): admission's repair raises a candidate's floors."""
        c = self.classes.index(name)
        layers = list(self.layers)
        for layer, floor in floors.items():
            raised = layers[layer].floors.clone()
            raised[c] = floor
            layers[layer] = layers[layer].with_floors(raised)
        return dataclasses.replace(self, layers=tuple(layers))

    def token_floors(self, name: str, layers: Sequence[int]) -> list[float]:
        """Expert `name`'s floor in each of these layers' token classifiers."""
        c = self.classes.index(name)
        return [float(self.layers[layer].floors[c]) for layer in layers]

    def token_routes(self, x: torch.Tensor, skip: int = 0) -> torch.Tensor:
        """x [T, L, H] -> [T, L] class indices (0 = base) of every (token, layer) decision; prefix: base."""
        means = context_means(x, skip)  # [T, L, H]
        routes = torch.stack([gate.decide(means[:, layer]) for layer, gate in enumerate(self.layers)], dim=1)
        routes[:skip] = 0
        return routes


def _float32(x: torch.Tensor) -> torch.Tensor:
    """x as float32: itself when it is (x.float() is an op even then)."""
    return x if x.dtype == torch.float32 else x.float()


def _unit(x: torch.Tensor) -> torch.Tensor:
    """F.normalize(x, dim=-1) bit for bit (a zero row stays zero), one op fewer: the norm broadcasts, not expanded."""
    return x / torch.linalg.vector_norm(x, dim=-1, keepdim=True).clamp_min(1e-12)


@dataclass(frozen=True)
class ContextGates:
    """A router's per-layer token classifiers laid out over a plugged set's slot columns, for the routed forward:
    column 0 is base, column 1 + c is slot c (a free slot, or one no class names: bias -inf, never chosen).

    weight [L, 1 + C, H] and bias [L, 1 + C] act on the unit running context (the standardisation folded in,
    ContextClassifier.input_space); floors [L, 1 + C]; floored: some floor is above zero (else a plain argmax);
    covers [L, C] bool: the slots whose expert covers each layer (the set's; None: every slot), where a column's
    win may stand (a win by a slot that skips the layer goes to base).
    passing [L, 1 + C]  the floor a winning column's probability must pass: its floor where the slot covers the
                        layer, +inf where it does not and for base (a win there is base)
    open [L, 1 + C]     bool, where a win stands without floors: the slot covers the layer (base: False)
        (both worked out from floors and covers when not given; given, e.g. by ContextGateColumns, they are used as
        they are: the gates then read whatever is written there)
    layers: per layer, what a step reads, taken once here so that a step indexes no stacked tensor and builds no
    mask (each is an op; a decode step runs this once per layer): (weight.T [H, 1 + C], bias [1 + C], passing [1 + C],
    open [1 + C]), views of the tensors above.
    """

    weight: torch.Tensor
    bias: torch.Tensor
    floors: torch.Tensor
    floored: bool
    skip: int
    covers: torch.Tensor | None = None
    passing: torch.Tensor | None = None
    open: torch.Tensor | None = None
    layers: tuple[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], ...] = dataclasses.field(
        init=False, repr=False, compare=False
    )

    def __post_init__(self) -> None:
        layers, columns = self.weight.shape[:2]
        if self.open is None:
            covers = self.covers
            if covers is None:
                covers = torch.ones(layers, columns - 1, dtype=torch.bool, device=self.weight.device)
            object.__setattr__(self, "open", F.pad(covers, (1, 0), value=False))  # [L, 1 + C]: base never "covers"
        if self.passing is None:
            object.__setattr__(self, "passing", self.floors.masked_fill(~self.open, float("inf")))
        per_layer = tuple(
            (w.T, b, p, o) for w, b, p, o in zip(self.weight, self.bias, self.passing, self.open, strict=True)
        )
        object.__setattr__(self, "layers", per_layer)

    @classmethod
    def of(
        cls,
        router: ContextRouter,
        slots: Sequence[int],
        capacity: int,
        device: torch.device,
        covers: torch.Tensor | None = None,
    ) -> ContextGates:
        """slots[i]: the slot of class i + 1 (the set's experts in plug order, the router's classes after base);
        covers [L, C] bool: the set's (None: every slot covers every layer)."""
        assert router.layers and len(slots) == len(router.classes) - 1, (len(slots), router.classes)
        columns = torch.tensor([0, *(1 + s for s in slots)])
        hidden = router.layers[0].center.shape[0]
        weight = torch.zeros(len(router.layers), 1 + capacity, hidden)
        bias = torch.full((len(router.layers), 1 + capacity), float("-inf"))
        floors = torch.zeros(len(router.layers), 1 + capacity)
        for layer, classifier in enumerate(router.layers):
            w, b = classifier.input_space()
            weight[layer, columns], bias[layer, columns], floors[layer, columns] = w, b, classifier.floors
        floored = any(c.floored for c in router.layers)
        covers = None if covers is None else covers.to(device)
        return cls(weight.to(device), bias.to(device), floors.to(device), floored, router.skip, covers)

    def step(
        self,
        context: torch.Tensor,
        layer: int,
        x: torch.Tensor,
        counted: torch.Tensor,
        allowed: torch.Tensor | None,
        forced: torch.Tensor | None,
        covers: torch.Tensor | None,
        weights: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """One layer of a forward: context [B, L, H] the rows' running sums (moved on in place to each row's last
        position), x [B, T, H] the layer's MLP inputs, counted [B, T] (False: prefix or padding, adds nothing and
        takes base), weights: counted as float32 [B, T] (a forward converts it once for all its layers; None:
        converted here) -> choice [B * T] (a slot, -1 = base), as `choose` gives it on each token's running sum:

            sums[b, t] = context[b, layer] + sum(unit(x[b, s]) for s <= t if counted[b, s])
        """
        unit = _unit(_float32(x))  # [B, T, H]
        if weights is None:
            weights = counted.float()
        if x.shape[1] == 1:  # a decode step: the sum moves in place, no cumulative sum or copy back
            sums = context[:, layer]  # [B, H], a view of the rows' state
            sums.addcmul_(unit[:, 0], weights)  # weights [B, 1] broadcast over H (0/1: exact, as the mask below)
            return self.choose(sums, layer, allowed, forced, covers, counted[:, 0])
        sums = context[:, layer, None, :] + (unit * weights[..., None]).cumsum(dim=1)  # [B, T, H]
        context[:, layer] = sums[:, -1]
        return self.choose(sums.reshape(-1, x.shape[-1]), layer, allowed, forced, covers, counted.reshape(-1))

    def choose(
        self,
        sums: torch.Tensor,
        layer: int,
        allowed: torch.Tensor | None,
        forced: torch.Tensor | None,
        covers: torch.Tensor | None,
        counted: torch.Tensor,
    ) -> torch.Tensor:
        """sums [N, H] each token's running context on this layer (its own unit input included) -> choice [N]
        (a slot, -1 = base). allowed [N, C] bool (None: all), forced [N] (-1: none; None: no pins), covers [C]
        (the layer's, what a pin may use; None only without pins), counted [N] bool (False: a prefix or padding
        position, base). Semantics, per token:

            p      = softmax(unit(sums) @ weight[layer].T + bias[layer]) over base and the allowed slots
            choice = argmax(p) - 1 if max(p) > floors[layer, argmax(p)] and that slot covers the layer, else base
            a pinned token takes its pin where it covers the layer (as route_top1 does)

        A win is checked against the gates' covers (the set's, folded into `passing` and `open`); a caller that
        narrows a layer's covers (the slots decided before attention) closes those columns in `allowed`.
        """
        weight_t, bias, passing, open_ = self.layers[layer]
        logits = torch.addmm(bias, _unit(sums), weight_t)  # [N, 1 + C]
        if allowed is not None:
            logits[:, 1:] = logits[:, 1:].masked_fill(~allowed, float("-inf"))
        if self.floored:
            best, column = logits.softmax(dim=-1).max(dim=-1)
            stands = best > passing[column]  # [N] bool: never for base (+inf)
        else:
            column = logits.argmax(dim=-1)  # every probability is > 0: floors of zero never bind
            stands = open_[column]
        choice = column.mul_(stands.logical_and_(counted)).sub_(1)  # [N]: the winning slot where it stands, else -1
        if forced is not None:
            assert covers is not None
            pin = torch.where(covers[forced.clamp(min=0)], forced, -1)
            choice = torch.where(forced >= 0, pin, choice)
        return choice

    def step_read(
        self, sums: torch.Tensor, layer: int, x: torch.Tensor, counted: list[bool], weights: torch.Tensor | None
    ) -> list[int]:
        """`step` for an eager decode step on the host's device (CPU), decided on the host: sums [B, H] the layer's
        running sums (context[:, layer], a view, moved on in place), x [B, H] (one token per row), counted: which rows
        count, as read once by the forward; weights [B, 1] their float32 form, None when every row counts. No
        allow-lists and no pins (a batch in token mode) -> choice [B] as a list (a slot, -1 = base): bit for bit
        `step(context, layer, x[:, None], counted, None, None, None, weights).tolist()`, in fewer ops:

            sums[b] += unit(x[b]) if counted[b]     one addcdiv_ (x / norm, added) when every row counts
            column   = argmax(logits) (or the floored pick, as `choose`), read
            choice   = column - 1 where it stands and the row counts, else -1, decided on the host from the read
                       column (and best probability) and the layer's `open` (`passing`) row, read with it

        The addcdiv form is exact: addcdiv computes self + 1 * x / d, the same rounded quotient unit() computes,
        added once, where addcmul added unit * 1.0 (exact). Rows that do not count (free rows of a bucket) take the
        addcmul form, which adds exact zeros for them."""
        x = _float32(x)
        if weights is None:
            sums.addcdiv_(x, torch.linalg.vector_norm(x, dim=-1, keepdim=True).clamp_min_(1e-12))
        else:
            sums.addcmul_(_unit(x), weights)
        weight_t, bias, passing, open_ = self.layers[layer]
        logits = torch.addmm(bias, _unit(sums), weight_t)  # [B, 1 + C]
        if self.floored:
            best, column = logits.softmax(dim=-1).max(dim=-1)
            floors, columns = passing.tolist(), column.tolist()
            stands = [p > floors[c] for p, c in zip(best.tolist(), columns, strict=True)]
        else:
            opens, columns = open_.tolist(), logits.argmax(dim=-1).tolist()
            stands = [opens[c] for c in columns]
        return [c - 1 if s and n else -1 for c, s, n in zip(columns, stands, counted, strict=True)]


class ContextGateColumns:
    """A plugged set's context gates in slot-column storage, written in place when a set is published: what a decode
    step that keeps its tensors (a compiled or captured step) reads, as it reads the slots' cosine gates.

        weight [L, 1 + C, H], bias [L, 1 + C], floors [L, 1 + C], passing [L, 1 + C] float32, open [L, 1 + C] bool

    (C = the slots' capacity; column 0 is base: ContextGates' layout, values copied from the published set's gates,
    so a step over these decides bit for bit as one over those.) The shapes change only when the slots grow
    (`resize`, a new storage generation); a publish writes every column (a few hundred KB on GPT-2-124M's shape),
    never reallocates. `gates(floored, skip)` is a ContextGates over these tensors (its layers are views of them):
    floored and skip are host facts of the published router, the only things a step's code depends on.
    """

    def __init__(self, num_layers: int, hidden: int, capacity: int, device: torch.device) -> None:
        self.num_layers, self.hidden, self.device = num_layers, hidden, device
        self._allocate(capacity)

    def _allocate(self, capacity: int) -> None:
        shape = (self.num_layers, 1 + capacity)
        self.weight = torch.zeros(*shape, self.hidden, device=self.device)
        self.bias = torch.full(shape, float("-inf"), device=self.device)  # no class: never chosen
        self.floors = torch.zeros(shape, device=self.device)
        self.passing = torch.full(shape, float("inf"), device=self.device)
        self.open = torch.zeros(shape, dtype=torch.bool, device=self.device)
        self._gates: dict[tuple[bool, int], ContextGates] = {}

    @property
    def capacity(self) -> int:
        return self.weight.shape[1] - 1

    def resize(self, capacity: int) -> None:
        """Reallocate at a new capacity (the slots grew). Nothing is kept: the next publish writes every column."""
        self._allocate(capacity)

    def write(self, gates: ContextGates) -> None:
        """Copy a published set's gates (laid out over the same capacity) into the columns, in place."""
        assert gates.weight.shape == self.weight.shape, (gates.weight.shape, self.weight.shape)
        with torch.no_grad():
            for mine, theirs in zip(
                (self.weight, self.bias, self.floors, self.passing, self.open),
                (gates.weight, gates.bias, gates.floors, gates.passing, gates.open),
                strict=True,
            ):
                mine.copy_(theirs)

    def gates(self, floored: bool, skip: int) -> ContextGates:
        """ContextGates reading these columns (one object per (floored, skip), kept until a resize)."""
        key = (floored, skip)
        if key not in self._gates:
            self._gates[key] = ContextGates(
                self.weight, self.bias, self.floors, floored, skip, passing=self.passing, open=self.open
            )
        return self._gates[key]

    def nbytes(self) -> int:
        tensors = (self.weight, self.bias, self.floors, self.passing, self.open)
        return sum(t.numel() * t.element_size() for t in tensors)


def context_step(
    sums: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, floors: torch.Tensor | None
) -> torch.Tensor:
    """One layer of one decode step for B rows, in place on the rows' running sums -> class index [B] (0 = base).

    sums [B, H] the layer's sum of the rows' unit inputs so far (the per-row state: zeros after the prefix);
    x [B, H] this token's MLP inputs; weight [C, H], bias [C] a layer classifier's input_space(); floors [C], or
    None when the classifier's are all zero (ContextClassifier.floored is False: known at fit time), which
    leaves a plain argmax. Equals ContextRouter.token_routes at the token's position, one token at a time:

        sums += unit(x)
        p     = softmax(unit(sums) @ weight.T + bias)
        route = argmax(p) if max(p) > floors[argmax(p)] else base
    """
    sums += F.normalize(x.float(), dim=-1)
    logits = torch.addmm(bias, F.normalize(sums, dim=-1), weight.T)  # [B, C]
    if floors is None:
        return logits.argmax(dim=-1)  # every probability is > 0: the floors of zero never bind
    best, choice = logits.softmax(dim=-1).max(dim=-1)
    return torch.where(best > floors[choice], choice, 0)


def fit_context_router(
    experts: dict[str, Sequence[torch.Tensor]],
    base: Sequence[torch.Tensor],
    base_heldout: Sequence[torch.Tensor],
    skip: int = 0,
    cap: float = 1e-3,
    weight_decay: float = 1e-3,
    token: bool = True,
    fitted_on: tuple[tuple[str, str], ...] = (),
) -> ContextRouter:
    """Fit the router of a plugged set from texts' MLP inputs, each x [T, L, H]: `experts` maps each expert's
    name to its domain sample's texts, `base` is calibration text; `base_heldout` (other calibration texts)
    sets the floors so that at most `cap` of its positions go to any expert, for the sequence classifier and
    each layer's. Classes are ('base', *experts in the mapping's order). Every position after the prefix
    is a training point labelled with its text's class (a prompt of any length is such a prefix). token=False
    fits the sequence classifier only (no per-layer ones: a router for sequence mode)."""
    classes = (BASE_ROUTE, *experts)
    texts = [(x, 0) for x in base] + [(x, c) for c, name in enumerate(experts, 1) for x in experts[name]]
    labels = torch.cat([torch.full((max(len(x) - skip, 0),), c) for x, c in texts])
    means = [context_means(x, skip)[skip:] for x, _ in texts]  # each [T - skip, L, H]
    held = [context_means(x, skip)[skip:] for x in base_heldout]

    def fitted(pick) -> ContextClassifier:
        classifier = fit_classifier(torch.cat([pick(m) for m in means]), labels, classes, weight_decay)
        return fit_floors(classifier, torch.cat([pick(m) for m in held]), cap)

    sequence = fitted(lambda m: m.flatten(1) / math.sqrt(m.shape[1]))  # = context_features after the prefix
    layers = range(means[0].shape[1]) if token else range(0)
    per_layer = tuple(fitted(lambda m, layer=layer: m[:, layer]) for layer in layers)
    return ContextRouter(sequence, per_layer, skip, fitted_on)


def cap_floor(winning: torch.Tensor, total: int, cap: float) -> float:
    """The lowest floor at which at most floor(cap * total) of the `winning` probabilities pass (p > floor).

    winning [M]: the probabilities of the calibration positions where this expert is the most probable class.
    """
    allowed = int(cap * total)
    if len(winning) <= allowed:
        return 0.0
    return float(winning.sort(descending=True).values[allowed])


def fit_floors(classifier: ContextClassifier, calibration: torch.Tensor, cap: float) -> ContextClassifier:
    """Floors for every expert so that at most `cap` of the base calibration positions [N, D] go to each
    (fit them on positions the classifier was not fitted on: its own training positions look safer)."""
    best, choice = classifier.probabilities(calibration).max(dim=-1)
    floors = torch.zeros(len(classifier.classes))
    for c in range(1, len(classifier.classes)):
        floors[c] = cap_floor(best[choice == c], len(calibration), cap)
    return classifier.with_floors(floors)


__all__ = [
    "ContextClassifier",
    "ContextGateColumns",
    "ContextGates",
    "ContextRouter",
    "cap_floor",
    "context_step",
    "context_features",
    "context_means",
    "domain_texts",
    "fit_classifier",
    "fit_context_router",
    "fit_floors",
    "sample_digest",
]
