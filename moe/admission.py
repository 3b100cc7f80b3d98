"""The admission report: what a candidate expert's gates would do, measured before it is plugged.

- false_positive_rate: on base-domain calibration text, the share of (token, layer) decisions on the
  layers the candidate covers where its gate passes (score > threshold). Those tokens would leave the
  base route, so old skills would change.
- steal_rates[name]: for each plugged expert, of the (token, layer) decisions its own example prompts
  send to it today, the share the candidate would win once plugged.

And a probe (`probe_is_finite`): the candidate pinned on a short text must leave the logits finite.
Weights within the file format's bounds can still combine into an overflow; that is caught here, before
plugging, rather than as NaN logits in a client's request.

Both are measured on the backbone's own MLP inputs (mode `off`, as sequence mode's prompt scoring is),
with the router's own scoring code; nothing is plugged and the plugged set is not touched. The calibration
text's inputs depend on the frozen backbone alone, so a caller that reviews many candidates computes them
once (`calibration_inputs`) and passes them in: a report is then gate scoring plus the forwards of the
plugged experts' few examples.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from moe.batching import capture_mlp_inputs, collate, forward, texts
from moe.expert import Expert
from moe.plugged import PluggedSet
from moe.routed import RoutedModel
from moe.router import RoutingSpec, choose_experts, gate_scores

DEFAULT_CALIBRATION = Path(__file__).with_name("calibration.txt")  # general English prose, shipped
PROBE_TEXT = "The quick brown fox jumps over the lazy dog. Question: 3 + 4 = 7. def f(x): return x"


@dataclass
class AdmissionReport:
    expert: str
    false_positive_rate: float
    base_decisions: int
    steal_rates: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def load_calibration_texts(path: str | Path | None = None, limit: int = 200) -> list[str]:
    """One passage per non-empty line of the calibration file (default: the general text shipped here)."""
    lines = Path(path or DEFAULT_CALIBRATION).read_text(encoding="utf-8").splitlines()
    return [line for line in (raw.strip() for raw in lines) if line][:limit]


def _unit_inputs(model: RoutedModel, tokenizer, strings: list[str], max_tokens: int) -> list[torch.Tensor]:
    """Per layer, the unit-norm MLP inputs of every real token of `strings` on the backbone: [N, H] each."""
    captured = capture_mlp_inputs(
        model, tokenizer, texts(strings), RoutingSpec("off"), max_tokens=max_tokens, device=model.device
    )
    return [F.normalize(x, dim=-1).to(model.dtype) for x in captured]


def calibration_inputs(model: RoutedModel, tokenizer, calibration_texts: list[str], max_tokens: int = 128):
    """Per layer, the unit-norm backbone MLP inputs of the calibration text: L x [N, H] in the model's dtype."""
    return _unit_inputs(model, tokenizer, calibration_texts, max_tokens)


def _top_choice(
    keys: torch.Tensor,
    offsets: torch.Tensor,
    thresholds: torch.Tensor,
    covers: torch.Tensor,
    x_unit: torch.Tensor,
    top_k: int,
) -> torch.Tensor:
    """One layer's gate columns (keys [C, H], offsets/thresholds/covers [C]) -> the slot-0 column per token [N]
    (-1 = base), token mode, everything allowed."""
    n, count = x_unit.shape[0], keys.shape[0]
    scores = gate_scores(x_unit, keys, offsets)
    allowed = torch.ones(n, count, dtype=torch.bool, device=x_unit.device)
    forced = torch.full((n,), -1, dtype=torch.long, device=x_unit.device)
    return choose_experts(scores, thresholds, allowed, forced, covers, top_k)[:, 0]


def _columns_with(current: PluggedSet, candidate: Expert) -> tuple[torch.Tensor, ...]:
    """The current gate columns plus the candidate's as column C (keys [L, C+1, H], offsets, thresholds,
    covers [L, C+1]); an expert of the same name is switched off, as a replacing plug would. Nothing plugged."""
    num_layers, capacity, hidden = current.keys.shape
    device = current.keys.device
    keys = torch.cat([current.keys, current.keys.new_zeros(num_layers, 1, hidden)], dim=1)
    offsets = torch.cat([current.offsets, current.offsets.new_zeros(num_layers, 1)], dim=1)
    thresholds = torch.cat([current.thresholds, torch.full((num_layers, 1), float("inf"), device=device)], dim=1)
    covers = torch.cat([current.covers, torch.zeros(num_layers, 1, dtype=torch.bool, device=device)], dim=1)
    if candidate.name in current:
        thresholds[:, current.index(candidate.name)] = float("inf")
        covers[:, current.index(candidate.name)] = False
    layers = list(candidate.layers)
    keys[layers, capacity] = F.normalize(candidate.keys.float(), dim=-1).to(keys.dtype)
    offsets[layers, capacity] = candidate.offsets.float()
    thresholds[layers, capacity] = candidate.thresholds.float()
    covers[layers, capacity] = True
    return keys, offsets, thresholds, covers


@torch.no_grad()
def admission_report(
    model: RoutedModel,
    tokenizer,
    expert: Expert,
    calibration_texts: list[str],
    max_tokens: int = 128,
    calibration: list[torch.Tensor] | None = None,
) -> AdmissionReport:
    """`calibration`: calibration_inputs(model, tokenizer, calibration_texts, max_tokens), if already computed."""
    candidate = expert.to(model.device, model.dtype)
    current = model.plugged
    keys, offsets, thresholds, covers = _columns_with(current, candidate)
    slot = current.capacity  # the candidate's column

    passes, decisions = 0, 0
    if calibration is None:
        calibration = calibration_inputs(model, tokenizer, calibration_texts, max_tokens)
    for layer, x_unit in enumerate(calibration):
        if not covers[layer, slot] or x_unit.shape[0] == 0:
            continue
        score = gate_scores(x_unit, keys[layer, slot : slot + 1], offsets[layer, slot : slot + 1])[:, 0]
        passes += int((score > thresholds[layer, slot]).sum())
        decisions += x_unit.shape[0]

    steal_rates: dict[str, float] = {}
    for other in current.experts:
        if other.name == candidate.name or not other.examples:
            continue
        before_idx = current.index(other.name)
        owned, stolen = 0, 0
        for layer, x_unit in enumerate(_unit_inputs(model, tokenizer, list(other.examples), max_tokens)):
            gates_now = (current.keys[layer], current.offsets[layer], current.thresholds[layer], current.covers[layer])
            mine = _top_choice(*gates_now, x_unit, model.router.top_k) == before_idx
            after = _top_choice(
                keys[layer], offsets[layer], thresholds[layer], covers[layer], x_unit, model.router.top_k
            )
            owned += int(mine.sum())
            stolen += int((mine & (after == slot)).sum())
        steal_rates[other.name] = stolen / owned if owned else 0.0
    return AdmissionReport(
        expert=candidate.name,
        false_positive_rate=passes / decisions if decisions else 0.0,
        base_decisions=decisions,
        steal_rates=steal_rates,
    )


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
