"""Behaviour in admission on a tiny random model: every plugged expert's probe decoded greedily with and without
the candidate; a candidate that changes another expert's answers past max_accuracy_drop is refused, one that
leaves them alone is admitted, and the candidate's own gain is reported.

The case is built deliberately: the plugged expert's probe references are the set's own greedy answers (so it
scores 100% before the plug), checked by a regex on the answer's first characters. A candidate whose gate is open
on every token with a large adapter rewrites those answers; one whose gate is closed cannot."""

from __future__ import annotations

import json
import struct

import pytest

from moe import Expert, RoutedModel
from moe.adapters.file import PROBE_MAX_ITEMS, ExpertFile
from moe.admission.behaviour import BehaviourProbe, probe_hits
from moe.admission.report import AdmissionLimits, admit
from moe.decode.generation import generate
from moe.errors import InvalidMetadataError, MetadataTooLargeError
from moe.routing.router import RoutingSpec
from tests.tiny import tiny_backbone, tiny_expert, tiny_tokenizer

PROMPTS = ("The quick brown fox", "Question: Tom has 3 apples", "In the morning the", "def add(a, b):")
FIRST_CHARS = r"(?s)^(.{1,12})"  # the answer's first 12 characters
CALIBRATION = ["Mia walks to the market.", "The weather was cold."]
ONLY_ANSWERS = AdmissionLimits(None, None, None, None, max_accuracy_drop=10.0)  # no perplexity limit or cap


def _answers(model: RoutedModel, tokenizer, plugged) -> tuple[str, ...]:
    outs = generate(model, tokenizer, list(PROMPTS), RoutingSpec(), 8, plugged=plugged)
    answers = tuple(o.text[:12].strip() for o in outs)
    assert all(answers), "the tiny model answers every prompt with some text"
    return answers


def _probe(answers: tuple[str, ...]) -> dict:
    return BehaviourProbe(PROMPTS, answers, checker="regex", pattern=FIRST_CHARS, max_new_tokens=8).to_dict()


@pytest.fixture
def setup() -> tuple[RoutedModel, object]:
    tokenizer = tiny_tokenizer()
    model = RoutedModel(tiny_backbone("llama", vocab=len(tokenizer)))
    owner = tiny_expert("owner", seed=1, threshold=-2.0, examples=PROMPTS)
    # the owner's probe: what the set with it answers (100% before any candidate, by construction)
    owner.metadata["probe"] = _probe(_answers(model, tokenizer, model.plugged.plugging(owner)))
    model.plug(owner)
    return model, tokenizer


def _rewriter() -> Expert:
    """Open on every token, with an adapter large enough to change the greedy answers; a high offset wins every
    token from the owner too."""
    return tiny_expert("rewriter", seed=7, up_scale=8.0, threshold=-2.0, offset=1.0, examples=PROMPTS)


@pytest.mark.parametrize("mode", ["refuse", "repair"])
def test_a_candidate_that_changes_another_experts_answers_is_refused(setup, mode: str) -> None:
    model, tokenizer = setup
    limits = AdmissionLimits(None, None, None, None, max_accuracy_drop=10.0, mode=mode)
    report = admit(model, tokenizer, _rewriter(), CALIBRATION, limits).report
    owner = [c for c in report.behaviour if c.expert == "owner"]
    assert [c.mode for c in owner] == ["token", "sequence"]
    token = owner[0]
    assert token.accuracy_before == 1.0 and token.accuracy_after <= 0.75 and token.change_points <= -25.0
    assert token.limit_points == 10.0 and token.breaks_limit
    assert not report.admitted
    assert any("lower expert 'owner''s probe accuracy in token mode" in p for p in report.problems)
    assert model.plugged.names == ("owner",), "admission plugs nothing"


def test_a_candidate_that_leaves_the_answers_alone_is_admitted(setup) -> None:
    model, tokenizer = setup
    closed = tiny_expert("closed", seed=7, up_scale=8.0, threshold=2.0, examples=PROMPTS)  # never wins a token
    report = admit(model, tokenizer, closed, CALIBRATION, ONLY_ANSWERS).report
    token = next(c for c in report.behaviour if c.expert == "owner" and c.mode == "token")
    assert (token.accuracy_before, token.accuracy_after, token.change_points) == (1.0, 1.0, 0.0)
    assert report.admitted and report.problems == []


def test_the_limit_is_in_points_and_off_turns_it_off(setup) -> None:
    model, tokenizer = setup
    measured = admit(model, tokenizer, _rewriter(), CALIBRATION, ONLY_ANSWERS).report
    drop = -min(c.change_points for c in measured.behaviour if c.expert == "owner")
    loose = AdmissionLimits(None, None, None, None, max_accuracy_drop=drop)  # exactly the drop: within
    assert admit(model, tokenizer, _rewriter(), CALIBRATION, loose).report.admitted
    off = AdmissionLimits.from_flags("refuse", max_accuracy_drop=-1)
    assert off.max_accuracy_drop is None
    unlimited = admit(model, tokenizer, _rewriter(), CALIBRATION, AdmissionLimits(None, None, None, None, None))
    assert unlimited.report.admitted and unlimited.report.behaviour, "measured and reported, not limited"


def test_the_candidates_own_probe_reports_its_gain(setup) -> None:
    model, tokenizer = setup
    candidate = _rewriter()
    with_it = model.plugged.plugging(candidate)
    candidate.metadata["probe"] = _probe(_answers(model, tokenizer, with_it))  # what it answers once plugged
    report = admit(model, tokenizer, candidate, CALIBRATION, AdmissionLimits(None, None, None, None, None)).report
    own = next(c for c in report.behaviour if c.expert == "rewriter" and c.mode == "token")
    assert own.own and own.limit_points is None and not own.breaks_limit
    assert own.accuracy_after == 1.0 and own.change_points > 0.0


def test_probe_hits_counts_right_answers(setup) -> None:
    model, tokenizer = setup
    probe = BehaviourProbe.of(model.plugged.get("owner"))
    assert probe is not None
    assert probe_hits(model, tokenizer, probe, model.plugged, "token") == len(PROMPTS)
    wrong = BehaviourProbe(PROMPTS, ("no such answer",) * len(PROMPTS), "regex", FIRST_CHARS, 8)
    assert probe_hits(model, tokenizer, wrong, model.plugged, "token") == 0


# --- the checker and the file field ---------------------------------------------------------------------------


def test_final_answer_checker_reads_the_gsm8k_marker() -> None:
    probe = BehaviourProbe(("Q",), ("12",))
    assert probe.correct("3 + 9 = 12\n#### 12", "12")
    assert probe.correct("#### 1,200.0 and more", "1200")
    assert probe.correct("#### 12", "Mia has 3 + 9 = 12.\n#### 12"), "a reference written as a solution"
    assert not probe.correct("#### 13", "12")
    assert not probe.correct("12", "12"), "no marker, no answer"


def test_regex_checker_compares_the_first_group() -> None:
    probe = BehaviourProbe(("Q",), ("7",), checker="regex", pattern=r"answer is (\d+)")
    assert probe.correct("so the answer is 7.", "7")
    assert not probe.correct("so the answer is 8.", "7")
    assert not probe.correct("I do not know", "7")


def test_a_probe_survives_the_file_round_trip(tmp_path) -> None:
    expert = tiny_expert("carrier", seed=3)
    expert.metadata["probe"] = _probe(("a", "b", "c", "d"))
    model = RoutedModel(tiny_backbone("llama"))
    path = ExpertFile.save(expert, tmp_path / "carrier.safetensors", model.fingerprint)
    loaded = ExpertFile.load(path, model.fingerprint)
    assert loaded.metadata["probe"] == expert.metadata["probe"]
    assert BehaviourProbe.of(loaded) == BehaviourProbe(PROMPTS, ("a", "b", "c", "d"), "regex", FIRST_CHARS, 8)
    plain = ExpertFile.load(ExpertFile.save(tiny_expert("plain"), tmp_path / "p.safetensors", model.fingerprint))
    assert plain.metadata["probe"] is None and BehaviourProbe.of(plain) is None


@pytest.mark.parametrize(
    ("probe", "error", "says"),
    [
        ({"items": []}, InvalidMetadataError, "non-empty 'items'"),
        ({"checker": "fuzzy", "items": [{"prompt": "p", "answer": "a"}]}, InvalidMetadataError, "checker 'fuzzy'"),
        ({"checker": "regex", "items": [{"prompt": "p", "answer": "a"}]}, InvalidMetadataError, "needs a 'pattern'"),
        (
            {"checker": "regex", "pattern": "(", "items": [{"prompt": "p", "answer": "a"}]},
            InvalidMetadataError,
            "valid",
        ),
        ({"max_new_tokens": 0, "items": [{"prompt": "p", "answer": "a"}]}, InvalidMetadataError, "max_new_tokens"),
        ({"items": [{"prompt": "p", "answer": ""}]}, InvalidMetadataError, "both non-empty"),
        ({"items": [{"prompt": "p", "answer": "a"}] * (PROBE_MAX_ITEMS + 1)}, MetadataTooLargeError, "at most 64"),
    ],
)
def test_a_malformed_probe_is_refused_on_save_and_load(tmp_path, probe: dict, error: type, says: str) -> None:
    expert = tiny_expert("bad", seed=3)
    expert.metadata["probe"] = probe
    model = RoutedModel(tiny_backbone("llama"))
    with pytest.raises(error, match=says):
        ExpertFile.save(expert, tmp_path / "bad.safetensors", model.fingerprint)
    # written by hand past the writer's check: the reader refuses it the same way
    expert.metadata["probe"] = None
    data = ExpertFile.to_bytes(expert, model.fingerprint)
    size = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8 : 8 + size])
    header["__metadata__"]["probe"] = json.dumps(probe)
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with pytest.raises(error, match=says):
        ExpertFile.load(len(raw).to_bytes(8, "little") + raw + data[8 + size :])
