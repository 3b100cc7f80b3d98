"""Behaviour in admission: each expert's probe (prompts with reference answers) decoded greedily with the plugged
set as it is (P) and with the candidate added (P + c).

Perplexity can fall while answers get worse (a math expert trained on raw text cut math perplexity and lowered
GSM8K accuracy), so perplexity limits alone let through a plug that breaks answers. An expert file may carry a
small probe (moe.adapters.file, `probe`): up to 64 prompts, each with its reference answer, and a checker:

    final-answer   the number after the output's first `####` (GSM8K's marker), commas and a trailing `.0`
                   dropped, equals the reference's (the reference may be the bare number or a whole solution)
    regex          the pattern's first group (the whole match when it has none), stripped, equals the reference

`probe_checks` runs every plugged expert's probe, and the candidate's own, in each routing mode (token: the
server's default, whose decisions admission limits; sequence: one decision per prompt), greedily, in the serving
path (moe.decode.generation, the scheduler the server runs). A probe of a plugged expert whose accuracy falls by
more than AdmissionLimits.max_accuracy_drop points is a problem, which refuses the plug (the repair raises
thresholds for takes and perplexity; it does not search for answers); the candidate's own probe reports its gain.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass

from moe.adapters.expert import Expert
from moe.adapters.file import checked_probe
from moe.adapters.slots import PluggedSet
from moe.decode.generation import generate
from moe.model.routed import RoutedModel
from moe.routing.router import RoutingSpec

logger = logging.getLogger(__name__)

PROBE_MODES = ("token", "sequence")  # the routing modes each probe is decoded in
FINAL_ANSWER = re.compile(r"####\s*(-?[\d,]*\.?\d+)")  # GSM8K's final-answer marker and its number


def normalise_number(text: str) -> str:
    """A number as answers are compared: no thousands commas or trailing dot, integral values without `.0`."""
    text = text.replace(",", "").rstrip(".")
    try:
        value = float(text)
    except ValueError:
        return text
    return str(int(value)) if value.is_integer() else str(value)


def final_answer(text: str) -> str | None:
    """The number after the first `####` (GSM8K's final-answer marker), normalised; None when absent."""
    match = FINAL_ANSWER.search(text)
    return normalise_number(match[1]) if match else None


@dataclass(frozen=True)
class BehaviourProbe:
    """A probe as its file stores it (moe.adapters.file.checked_probe validates it)."""

    prompts: tuple[str, ...]
    answers: tuple[str, ...]
    checker: str = "final-answer"
    pattern: str | None = None
    max_new_tokens: int = 64

    @classmethod
    def from_dict(cls, stored: object) -> BehaviourProbe:
        probe = checked_probe(stored)
        return cls(
            prompts=tuple(i["prompt"] for i in probe["items"]),
            answers=tuple(i["answer"] for i in probe["items"]),
            checker=probe["checker"],
            pattern=probe.get("pattern"),
            max_new_tokens=probe["max_new_tokens"],
        )

    @classmethod
    def of(cls, expert: Expert) -> BehaviourProbe | None:
        stored = expert.metadata.get("probe")
        return cls.from_dict(stored) if stored else None

    def to_dict(self) -> dict:
        items = [{"prompt": p, "answer": a} for p, a in zip(self.prompts, self.answers, strict=True)]
        out = {"checker": self.checker, "max_new_tokens": self.max_new_tokens, "items": items}
        return checked_probe(out | ({"pattern": self.pattern} if self.pattern is not None else {}))

    def extract(self, text: str) -> str | None:
        """The answer the checker reads from a text (an output, or a reference written as a solution)."""
        if self.checker == "regex":
            assert self.pattern is not None
            match = re.search(self.pattern, text)
            if match is None:
                return None
            return (match.group(1) if match.groups() else match.group(0)).strip()
        return final_answer(text)

    def reference(self, answer: str) -> str:
        """A reference as the checker compares it: a bare answer as given, a solution through extract."""
        if self.checker == "final-answer":
            found = self.extract(answer)
            return found if found is not None else normalise_number(answer.strip())
        return answer.strip()

    def correct(self, output: str, answer: str) -> bool:
        return self.extract(output) == self.reference(answer)


def probe_hits(
    model: RoutedModel, tokenizer, probe: BehaviourProbe, plugged: PluggedSet, mode: str, batch_size: int = 32
) -> int:
    """How many of the probe's prompts `plugged` answers right, greedily, in routing `mode` (token or sequence)."""
    spec = RoutingSpec() if mode == "token" else RoutingSpec(mode)
    outs = generate(
        model, tokenizer, list(probe.prompts), spec, probe.max_new_tokens, plugged=plugged, batch_size=batch_size
    )
    return sum(probe.correct(o.text, a) for o, a in zip(outs, probe.answers, strict=True))


@dataclass
class ProbeCheck:
    """One expert's probe in one routing mode, with P and with P + candidate (accuracy as a share, change in
    points: 100 * (after - before))."""

    expert: str
    mode: str
    prompts: int
    checker: str
    accuracy_before: float
    accuracy_after: float
    change_points: float
    limit_points: float | None  # None: the candidate's own probe (its gain, reported, not limited)
    own: bool = False

    @property
    def breaks_limit(self) -> bool:
        return self.limit_points is not None and -self.change_points > self.limit_points


def probe_checks(
    model: RoutedModel,
    tokenizer,
    without: PluggedSet,
    with_candidate: PluggedSet,
    candidate: Expert,
    max_drop_points: float | None,
    modes: Sequence[str] = PROBE_MODES,
    baseline: dict[str, tuple[float, int]] | None = None,
) -> list[ProbeCheck]:
    """Every probe (each expert of `without` that carries one, then the candidate's) in each mode, before and
    after. baseline: (hits, prompts) per "probe:<expert>:<mode>" under `without`, read and filled (a plugged
    set's answers do not change until the set does; the candidate's own is never kept)."""
    baseline = {} if baseline is None else baseline
    carriers = [(e.name, BehaviourProbe.of(e)) for e in without.experts]
    carriers.append((candidate.name, BehaviourProbe.of(candidate)))
    checks = []
    for name, probe in carriers:
        if probe is None:
            continue
        own = name == candidate.name
        for mode in modes:
            key = f"probe:{name}:{mode}"
            if own or key not in baseline:
                baseline[key] = (float(probe_hits(model, tokenizer, probe, without, mode)), len(probe.prompts))
            before = baseline[key][0] / len(probe.prompts)
            after = probe_hits(model, tokenizer, probe, with_candidate, mode) / len(probe.prompts)
            checks.append(
                ProbeCheck(
                    expert=name,
                    mode=mode,
                    prompts=len(probe.prompts),
                    checker=probe.checker,
                    accuracy_before=before,
                    accuracy_after=after,
                    change_points=100.0 * (after - before),
                    limit_points=None if own else max_drop_points,
                    own=own,
                )
            )
            logger.info("probe %s (%s mode): %.1f%% -> %.1f%%", name, mode, 100 * before, 100 * after)
    return checks


def probe_problems(checks: Sequence[ProbeCheck]) -> list[str]:
    """Each probe that falls past its limit, in words."""
    return [
        f"it would lower expert {c.expert!r}'s probe accuracy in {c.mode} mode by {-c.change_points:.1f} points "
        f"({c.accuracy_before:.1%} -> {c.accuracy_after:.1%} of {c.prompts} prompts; limit {c.limit_points:g} "
        "points); the repair raises thresholds for takes and perplexity, not for answers"
        for c in checks
        if c.breaks_limit
    ]
