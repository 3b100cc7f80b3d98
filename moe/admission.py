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


def _top_choice(plugged: PluggedSet, layer: int, x_unit: torch.Tensor, top_k: int) -> torch.Tensor:
    """Slot-0 expert index per token [N] (-1 = base) under `plugged`, token mode, everything allowed."""
    n, count = x_unit.shape[0], len(plugged)
    scores = gate_scores(x_unit, plugged.keys[layer], plugged.offsets[layer])
    allowed = torch.ones(n, count, dtype=torch.bool, device=x_unit.device)
    forced = torch.full((n,), -1, dtype=torch.long, device=x_unit.device)
    return choose_experts(scores, plugged.thresholds[layer], allowed, forced, plugged.covers[layer], top_k)[:, 0]


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
    with_candidate = current.plugging(candidate, replace=True)
    slot = with_candidate.index(candidate.name)

    passes, decisions = 0, 0
    if calibration is None:
        calibration = calibration_inputs(model, tokenizer, calibration_texts, max_tokens)
    for layer, x_unit in enumerate(calibration):
        if not with_candidate.covers[layer, slot] or x_unit.shape[0] == 0:
            continue
        key = with_candidate.keys[layer, slot : slot + 1]
        score = gate_scores(x_unit, key, with_candidate.offsets[layer, slot : slot + 1])[:, 0]
        passes += int((score > with_candidate.thresholds[layer, slot]).sum())
        decisions += x_unit.shape[0]

    steal_rates: dict[str, float] = {}
    for other in current.experts:
        if other.name == candidate.name or not other.examples:
            continue
        before_idx = current.index(other.name)
        owned, stolen = 0, 0
        for layer, x_unit in enumerate(_unit_inputs(model, tokenizer, list(other.examples), max_tokens)):
            mine = _top_choice(current, layer, x_unit, model.router.top_k) == before_idx
            after = _top_choice(with_candidate, layer, x_unit, model.router.top_k)
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
    serving dtype. Nothing is plugged; the plugged set is not touched."""
    candidate = expert.to(model.device, model.dtype)
    with_candidate = model.plugged.plugging(candidate, replace=True)
    ids = tokenizer(text)["input_ids"][:max_tokens]  # [special prefix] + text
    batch = collate([(ids, [True] * len(ids))], pad_id=0).to(model.device)
    out = forward(model, batch, [RoutingSpec("pin", candidate.name)], with_candidate)
    return bool(torch.isfinite(out.logits).all())
