"""moe.decode.scheduler driven directly with a tiny model, no thread and no HTTP: the one owner of a sequence's
life. Its events, the EOS rule for both callers (the server's events and offline `generate`), stop strings on
the offline path, admission under max_prefill_tokens, prompt logprobs beside plain and constrained rows,
cancelling, an unplugged pinned expert, and a row whose grammar or sampling raises finishing alone."""

from __future__ import annotations

import re
from typing import Any

import pytest
import torch

from moe import RoutedModel, RoutingSpec
from moe.decode import scheduler as scheduler_module
from moe.decode.generation import generate
from moe.decode.sampling import SamplingParams
from moe.decode.scheduler import PROMPT_LOGITS_BUDGET, Scheduler, eos_token_ids, prompt_logit_groups
from moe.decode.sequence import (
    CANCELLED,
    ERROR,
    EXPERT_UNPLUGGED,
    LENGTH,
    STOP,
    Event,
    Finished,
    GenerationFailedError,
    GenerationRequest,
    Sequence,
)
from moe.decode.static_decoder import StaticDecoder
from moe.decode.structured_output import GrammarSpec
from tests.tiny import tiny_backbone, tiny_expert, tiny_tokenizer

PROMPTS = ["The quick brown fox", "def add(a, b):", "Mia walks to the market.", "0123456789 + -"]
IDS = [5, 60, 7, 41, 200, 13, 99]


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture
def model(tokenizer) -> RoutedModel:
    return RoutedModel(tiny_backbone("llama", seed=0, vocab=len(tokenizer)))


class Collected:
    """A SequenceOutput that keeps its events (the server's is an asyncio queue)."""

    def __init__(self) -> None:
        self.events: list[Event] = []
        self.cancelled = False

    def push(self, event: Event) -> None:
        self.events.append(event)


def scheduler(model: RoutedModel, tokenizer: Any, max_batch: int = 4, **options: Any) -> Scheduler:
    return Scheduler(model, tokenizer, StaticDecoder(model, max_batch, 128), **options)


def run(sched: Scheduler, requests: list[GenerationRequest]) -> list[Sequence]:
    """Every request at once, each with a Collected output, stepped until all are done."""
    seqs = [Sequence(request, Collected()) for request in requests]
    sched.add(seqs)
    while sched.busy:
        sched.step()
    return seqs


def exactly(tokens: int, ids: list[int], **options: Any) -> GenerationRequest:
    """Greedy, exactly `tokens` new tokens (EOS blocked until then)."""
    return GenerationRequest(ids, tokens, SamplingParams(min_new_tokens=tokens), **options)


# --- a sequence's events and the EOS rule -------------------------------------------------------------------


def test_events_are_one_per_token_then_the_finish(model, tokenizer) -> None:
    sched = scheduler(model, tokenizer)
    (seq,) = run(sched, [exactly(8, tokenizer.encode(PROMPTS[0]))])
    events: list[Event] = seq.output.events
    done = events[-1].finished
    assert done is seq.finished and all(e.finished is None for e in events[:-1])
    tokens = [t for e in events for t in e.token_ids]
    assert [len(e.token_ids) for e in events if e.token_ids] == [1] * 8 and tokens == done.token_ids
    assert "".join(e.text for e in events) == done.text == tokenizer.decode(tokens, skip_special_tokens=True)
    assert (done.reason, done.prompt_tokens, done.completion_tokens) == (LENGTH, len(tokenizer.encode(PROMPTS[0])), 8)
    assert not sched.busy and sched.decoder.live == [], "its slot is free"


def test_one_eos_rule_for_the_server_and_for_generate(model, tokenizer) -> None:
    """token_ids keep the EOS (or stop token) that ended the sequence, for the scheduler's events and for generate
    alike; completion_tokens counts it; the text never has it."""
    free = generate(model, tokenizer, PROMPTS, RoutingSpec("off"), 12)
    assert all(g.finish_reason == LENGTH for g in free), "the case needs no early EOS"
    ending = free[0].token_ids[4]  # made an EOS id below: row 0 ends on it
    stop_token = free[1].token_ids[2]  # row 1 asks for it as a stop_token_id
    assert ending not in free[0].token_ids[:4] and stop_token not in free[1].token_ids[:2]
    model.backbone.generation_config.eos_token_id = [0, ending]
    assert eos_token_ids(model, tokenizer) == tuple(sorted({0, ending}))
    params = [SamplingParams(), SamplingParams(stop_token_ids=(stop_token,))]

    offline = generate(model, tokenizer, PROMPTS[:2], RoutingSpec("off"), 12, params)
    served = run(
        scheduler(model, tokenizer),
        [GenerationRequest(tokenizer.encode(p), 12, s) for p, s in zip(PROMPTS[:2], params, strict=True)],
    )
    for g, seq, want, cut in zip(offline, served, free[:2], (4, 2), strict=True):
        done = seq.finished
        assert g.token_ids == done.token_ids == want.token_ids[: cut + 1], "the ending token is kept"
        assert g.finish_reason == done.reason == STOP and done.completion_tokens == cut + 1
        assert g.text == done.text == tokenizer.decode(want.token_ids[:cut], skip_special_tokens=True)
        assert [t for e in seq.output.events for t in e.token_ids] == done.token_ids, "and streamed"


def test_stop_strings_on_the_offline_path(model, tokenizer) -> None:
    """generate cuts at a stop string as the server does: before it, reason stop, the same tokens."""
    (free,) = generate(model, tokenizer, [PROMPTS[0]], RoutingSpec("off"), 20)
    stop = free.text[6:9]
    assert len(stop) == 3 and free.text.find(stop) == 6, free.text
    (cut,) = generate(model, tokenizer, [PROMPTS[0]], RoutingSpec("off"), 20, stop=(stop,))
    (served,) = run(scheduler(model, tokenizer), [GenerationRequest(tokenizer.encode(PROMPTS[0]), 20, stop=(stop,))])
    assert cut.text == served.finished.text == free.text[:6]
    assert cut.finish_reason == served.finished.reason == STOP
    assert cut.token_ids == served.finished.token_ids == free.token_ids[: len(cut.token_ids)]
    assert stop in tokenizer.decode(cut.token_ids) and stop not in tokenizer.decode(cut.token_ids[:-1])


# --- admission ----------------------------------------------------------------------------------------------


def test_prefill_between_two_steps_stays_under_max_prefill_tokens(
    model, tokenizer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A burst of prompts starts over several steps, first come first served, each step's prefill within the
    budget (one prompt alone may exceed it); every sequence gets the tokens it gets alone."""
    prompts = [PROMPTS[0], PROMPTS[1], PROMPTS[0] + " jumps", PROMPTS[1] + " return a", PROMPTS[2]]
    lengths = [len(tokenizer.encode(p)) for p in prompts]
    budget = lengths[0] + lengths[1]
    want = [run(scheduler(model, tokenizer), [exactly(6, tokenizer.encode(p))])[0].finished for p in prompts]
    prefilled: list[list[int]] = []
    real = scheduler_module.prefill

    def recording(model: Any, prompt_ids: list[list[int]], *args: Any, **kwargs: Any) -> Any:
        prefilled.append([len(ids) for ids in prompt_ids])
        return real(model, prompt_ids, *args, **kwargs)

    monkeypatch.setattr(scheduler_module, "prefill", recording)
    seqs = run(
        scheduler(model, tokenizer, max_batch=8, max_prefill_tokens=budget),
        [exactly(6, tokenizer.encode(p)) for p in prompts],
    )
    assert [s.finished.token_ids for s in seqs] == [w.token_ids for w in want]
    assert [n for call in prefilled for n in call] == lengths, "first come, first served"
    assert len(prefilled) > 1 and all(sum(call) <= budget or len(call) == 1 for call in prefilled)
    assert prefilled[0] == lengths[:2], "the budget is used, not only one prompt per step"


def test_prompt_logit_groups_stay_under_the_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    assert PROMPT_LOGITS_BUDGET == 1 << 26
    monkeypatch.setattr(scheduler_module, "PROMPT_LOGITS_BUDGET", 1000)
    seqs = [Sequence(GenerationRequest([1] * n, 0)) for n in [3, 4, 2, 30, 5, 5]]
    groups = prompt_logit_groups(seqs, vocab=50)
    assert [[len(s.request.prompt_ids) for s in g] for g in groups] == [[3, 4, 2], [30], [5, 5]]
    for group in groups:  # [rows, longest, V] under the budget, or a single row
        assert len(group) == 1 or len(group) * max(len(s.request.prompt_ids) for s in group) * 50 <= 1000


def test_scoring_plain_and_constrained_rows_in_one_admission(model, tokenizer) -> None:
    """A row that scores its prompt (prompt logprobs, 0 new tokens) is prefilled apart with every position's
    logits, beside a plain row with logprobs and a grammar-constrained row: each gets what it gets alone."""
    scored = GenerationRequest(IDS, 0, SamplingParams(logprobs=2), prompt_logprobs=2)
    plain = GenerationRequest(IDS[:4], 5, SamplingParams(min_new_tokens=5, logprobs=0))
    regex = GenerationRequest(IDS[:3], 20, grammar=GrammarSpec.regex("(yes|no)!"))
    score, text, constrained = (s.finished for s in run(scheduler(model, tokenizer), [scored, plain, regex]))
    alone = [run(scheduler(model, tokenizer), [r])[0].finished for r in (scored, plain, regex)]

    assert score.reason == LENGTH and score.completion_tokens == 0 and score.token_ids == []
    with torch.inference_mode():
        reference = torch.log_softmax(model.backbone(torch.tensor([IDS])).logits[0].float(), dim=-1)
    assert score.prompt_logprobs[0] is None
    for j in range(1, len(IDS)):
        entry = score.prompt_logprobs[j]
        assert entry.token == IDS[j] and entry.logprob == pytest.approx(float(reference[j - 1, IDS[j]]), abs=1e-4)
        assert [t for t, _ in entry.top] == reference[j - 1].topk(2).indices.tolist()
    assert text.token_ids == alone[1].token_ids and len(text.logprobs) == 5
    assert [e.logprob for e in text.logprobs] == pytest.approx([e.logprob for e in alone[1].logprobs], abs=1e-5)
    assert constrained.reason == STOP and re.fullmatch("(yes|no)!", constrained.text), constrained.text
    assert constrained.text == alone[2].text


# --- cancelling and unplugging ------------------------------------------------------------------------------


def test_cancelled_and_unplugged_sequences_finish_at_the_next_step(model, tokenizer) -> None:
    model.plug(tiny_expert("gone", threshold=-2.0))
    sched = scheduler(model, tokenizer)
    ids = tokenizer.encode(PROMPTS[0])
    requests = [exactly(40, ids), exactly(40, ids, routing=RoutingSpec("pin", "gone")), exactly(40, ids)]
    seqs = [Sequence(r, Collected()) for r in requests]
    sched.add(seqs)
    sched.step()  # admitted, and one decode step
    assert len(sched.running) == 3 and all(len(s.token_ids) == 2 for s in seqs)
    seqs[0].output.cancelled = True
    model.unplug("gone")
    sched.step()
    assert [s.finished.reason if s.finished else None for s in seqs] == [CANCELLED, EXPERT_UNPLUGGED, None]
    assert "expert 'gone' was unplugged" in seqs[1].finished.message
    assert sched.running == [seqs[2]] and sched.decoder.live == [seqs[2].slot], "their slots are free"
    assert seqs[1].finished.token_ids == seqs[1].token_ids and len(seqs[1].token_ids) == 2
    while sched.busy:
        sched.step()
    assert seqs[2].finished.reason == LENGTH and seqs[2].finished.completion_tokens == 40


def test_a_row_cancelled_or_unplugged_after_steps_under_one_set_finishes_at_the_next_step(model, tokenizer) -> None:
    """Steps under an unchanged plugged set check only cancellations (each row's spec was checked against the set
    once); a cancellation there, and a later unplug, still end their rows at the next step."""
    model.plug(tiny_expert("kept", threshold=-2.0))
    sched = scheduler(model, tokenizer)
    ids = tokenizer.encode(PROMPTS[0])
    pinned = RoutingSpec("pin", "kept")
    seqs = [Sequence(exactly(40, ids, routing=r), Collected()) for r in (RoutingSpec(), pinned, pinned)]
    sched.add(seqs)
    for _ in range(4):
        sched.step()
    assert all(len(s.token_ids) == 5 for s in seqs)
    seqs[0].output.cancelled = True
    sched.step()
    assert [s.finished.reason if s.finished else None for s in seqs] == [CANCELLED, None, None]
    assert len(seqs[1].token_ids) == 6
    sched.step()
    model.unplug("kept")
    sched.step()
    assert [s.finished.reason if s.finished else None for s in seqs] == [CANCELLED, EXPERT_UNPLUGGED, EXPERT_UNPLUGGED]
    assert not sched.running and len(seqs[1].token_ids) == 7


# --- a row that fails, fails alone --------------------------------------------------------------------------


def test_a_grammar_raising_mid_step_finishes_its_row_and_moves_no_other_grammar_twice(
    model, tokenizer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Rows 0 and 1 constrained, row 2 free; row 1's grammar raises in a decode step after row 0's grammar moved.
    Row 1 ends with an error; rows 0 and 2 end exactly as alone (before, the batch was sampled again row by row
    and row 0's grammar moved twice)."""
    grammar = GrammarSpec.regex("(yes|no|maybe)!!")
    requests = [
        GenerationRequest(IDS[:3], 20, grammar=grammar),
        GenerationRequest(IDS[:4], 20, grammar=grammar),
        exactly(6, IDS[:5]),
    ]
    alone = [run(scheduler(model, tokenizer), [r])[0].finished for r in (requests[0], requests[2])]
    sched = scheduler(model, tokenizer)
    seqs = [Sequence(r, Collected()) for r in requests]
    sched.add(seqs)
    sched.step()  # admitted and one decode step: two tokens each, grammars moved twice
    poisoned, sampled = seqs[1].matcher, len(seqs[0].token_ids)
    moves: dict[int, int] = {}
    real = scheduler_module.consume

    def consume(matcher: Any, token: int, stop_ids: Any) -> None:
        moves[id(matcher)] = moves.get(id(matcher), 0) + 1
        if matcher is poisoned:
            raise RuntimeError("the grammar fell over")
        real(matcher, token, stop_ids)

    monkeypatch.setattr(scheduler_module, "consume", consume)
    while sched.busy:
        sched.step()
    row0, row1, row2 = (s.finished for s in seqs)
    assert row1.reason == ERROR and isinstance(row1.error, GenerationFailedError)
    assert "structured output failed" in row1.message and "the grammar fell over" in row1.message
    assert (row0.reason, row0.text, row0.token_ids) == (STOP, alone[0].text, alone[0].token_ids)
    assert re.fullmatch("(yes|no|maybe)!!", row0.text)
    assert moves[id(seqs[0].matcher)] == len(row0.token_ids) - sampled, "row 0's grammar moved once per token"
    assert (row2.reason, row2.token_ids) == (LENGTH, alone[1].token_ids)


def test_a_row_whose_sampling_raises_finishes_alone(model, tokenizer, monkeypatch: pytest.MonkeyPatch) -> None:
    """Sampling raises for any batch holding seed 666: that row ends with an error, the others are sampled alone
    and end exactly as alone."""
    real = scheduler_module.sample_step

    def sample_step(logits: Any, params: list[SamplingParams], *args: Any, **kwargs: Any) -> Any:
        if any(p.seed == 666 for p in params):
            raise RuntimeError("poisoned row")
        return real(logits, params, *args, **kwargs)

    healthy = GenerationRequest(IDS[:4], 8, SamplingParams(temperature=1.0, seed=5, min_new_tokens=8))
    want = run(scheduler(model, tokenizer), [healthy])[0].finished
    monkeypatch.setattr(scheduler_module, "sample_step", sample_step)
    poisoned = GenerationRequest(IDS[:4], 8, SamplingParams(temperature=1.0, seed=666))
    good, bad = (s.finished for s in run(scheduler(model, tokenizer), [healthy, poisoned]))
    assert bad.reason == ERROR and bad.message == "sampling failed: RuntimeError: poisoned row"
    assert (good.reason, good.token_ids) == (LENGTH, want.token_ids)
    with pytest.raises(GenerationFailedError, match="poisoned row"):
        generate(model, tokenizer, [PROMPTS[0]], RoutingSpec("off"), 4, [SamplingParams(temperature=1.0, seed=666)])


def test_a_seeded_row_draws_from_its_own_generator_and_an_unseeded_one_from_torchs(model, tokenizer) -> None:
    """Only a seeded row gets a generator of its own (its tokens repeat with its seed, whatever torch's default
    generator did meanwhile); an unseeded sampled row and a greedy row get none: the unseeded one draws from
    torch's default generator, so seeding that repeats it too."""
    seeded = GenerationRequest(IDS[:4], 8, SamplingParams(temperature=1.0, seed=5, min_new_tokens=8))
    unseeded = GenerationRequest(IDS[:4], 8, SamplingParams(temperature=1.0, min_new_tokens=8))
    greedy = exactly(8, IDS[:4])

    def tokens(seed: int) -> tuple[list[Sequence], list[list[int]]]:
        torch.manual_seed(seed)
        seqs = run(scheduler(model, tokenizer), [seeded, unseeded, greedy])
        return seqs, [s.finished.token_ids for s in seqs]

    seqs, first = tokens(0)
    assert isinstance(seqs[0].generator, torch.Generator) and seqs[1].generator is None and seqs[2].generator is None
    _, again = tokens(0)
    _, other = tokens(1)
    assert again == first, "the same seeds, the same tokens"
    assert other[0] == first[0] and other[2] == first[2], "the seeded and the greedy row ignore torch's seed"
    assert any(tokens(seed)[1][1] != first[1] for seed in (1, 2, 3)), "the unseeded row follows torch's generator"


def test_finished_is_set_once_for_a_sequence_never_started(model, tokenizer) -> None:
    sched = scheduler(model, tokenizer)
    seq = Sequence(exactly(4, [5, 6]), Collected())
    sched.add([seq])
    sched.finish_waiting(ERROR, "shutting down", RuntimeError("bye"))
    sched.finish(seq, CANCELLED, "again")
    assert isinstance(seq.finished, Finished) and (seq.finished.reason, seq.finished.text) == (ERROR, "")
    assert [e.finished for e in seq.output.events] == [seq.finished] and not sched.busy


# --- fair admission (issue 24 item 2) -----------------------------------------------------------------------


def test_admission_is_round_robin_over_clients(model, tokenizer) -> None:
    """One client's burst queued first does not hold the slots that free up: each admission takes the client
    admitted least recently (its oldest sequence), so the second client's sequences start beside the burst."""
    admitted: list[str] = []

    class Recording(scheduler_module.SchedulerObserver):
        def prefilled(self, seq: Sequence) -> None:
            admitted.append(seq.request.client)

    ids = tokenizer.encode(PROMPTS[0])
    burst = [exactly(3, ids, client="a") for _ in range(4)]
    other = [exactly(3, ids, client="b") for _ in range(2)]
    seqs = run(scheduler(model, tokenizer, max_batch=2, observer=Recording()), [*burst, *other])
    assert admitted == ["a", "b", "a", "b", "a", "a"], "first come first served would be a, a, a, a, b, b"
    assert all(s.finished is not None and s.finished.completion_tokens == 3 for s in seqs)


# --- fair share of a step's rows (issue 24: no client's rows set every step's cost) -------------------------


def waiting_demand(sched: Scheduler, demand: dict[str, int]) -> None:
    sched.add(
        Sequence(exactly(2, [5, 6], client=client), Collected()) for client, n in demand.items() for _ in range(n)
    )


@pytest.mark.parametrize(
    ("share_ratio", "demand", "allowances"),
    [
        (2, {"light": 1, "heavy": 8}, {"light": 1, "heavy": 1}),
        (2, {"light": 1, "other": 4, "heavy": 8}, {"light": 1, "other": 1, "heavy": 1}),  # one row each at least
        (4, {"light": 1, "other": 4, "heavy": 8}, {"light": 1, "other": 1, "heavy": 2}),
        (2, {"light": 2, "other": 4, "heavy": 8}, {"light": 1, "other": 1, "heavy": 2}),  # 4 rows over 3
        (8, {"light": 1, "other": 4, "heavy": 8}, {"light": 1, "other": 3, "heavy": 4}),
        (2, {"a": 8, "b": 8}, {"a": 8, "b": 8}),  # clients that want alike share the batch as before
        (2, {"a": 6, "b": 12}, {"a": 6, "b": 6}),  # twice the 6 rows of the client that wants fewest
        (2, {"a": 8, "b": 8, "c": 8}, {"a": 5, "b": 5, "c": 6}),  # the batch bounds it too
        (2, {"alone": 12}, None),  # a client alone fills the batch
        (0, {"light": 1, "heavy": 8}, None),  # no cap
    ],
)
def test_allowances_split_the_steps_rows_max_min_fairly(
    model, tokenizer, share_ratio: int, demand: dict[str, int], allowances: dict[str, int] | None
) -> None:
    """A step runs share_ratio times the rows of the client that wants fewest (one per client at least, the
    batch at most), split max-min fairly: who wants less gets all of it, the rest share what is left."""
    sched = scheduler(model, tokenizer, max_batch=16, share_ratio=share_ratio)
    waiting_demand(sched, demand)
    assert sched._allowances() == allowances


def test_a_heavy_clients_rows_make_room_for_another_client_and_resume_where_they_were(model, tokenizer) -> None:
    """Step by step: the heavy client alone fills the batch; when a light client arrives, the heavy one's rows
    over its share leave the batch (the latest joined first, tokens kept) and the light row runs in every step
    beside one heavy row; once the light client is done, the heavy rows resume and every one finishes with the
    same tokens as without the light client."""
    ids = tokenizer.encode(PROMPTS[1])
    heavy = [exactly(12, ids, client="heavy") for _ in range(5)]
    alone = run(scheduler(model, tokenizer, max_batch=8, share_ratio=2), heavy)

    sched = scheduler(model, tokenizer, max_batch=8, share_ratio=2)
    heavy_seqs = [Sequence(request, Collected()) for request in heavy]
    sched.add(heavy_seqs)
    sched.step()
    sched.step()
    assert [s.request.client for s in sched.running] == ["heavy"] * 5
    light = Sequence(exactly(4, tokenizer.encode(PROMPTS[2]), client="light"), Collected())
    sched.add([light])
    rows: list[list[str]] = []
    while sched.busy:
        sched.step()
        rows.append(sorted(s.request.client for s in sched.running))
    # the light row's 4 tokens: its first from its prefill and 3 decode steps, each beside one heavy row (it
    # finishes in the third, and the heavy rows resume at the next step's admission)
    assert rows[:3] == [["heavy", "light"], ["heavy", "light"], ["heavy"]]
    assert rows[3] == ["heavy"] * 5, "the heavy rows resume once the light client is done"
    assert [s.preemptions for s in heavy_seqs] == [0, 1, 1, 1, 1]
    assert light.finished is not None and light.finished.completion_tokens == 4
    for seq, reference in zip(heavy_seqs, alone, strict=True):
        assert seq.finished is not None and seq.finished.reason == LENGTH
        assert seq.finished.token_ids == reference.finished.token_ids
        assert seq.finished.text == reference.finished.text
        assert "".join(e.text for e in seq.output.events) == reference.finished.text
        assert sum(1 for e in seq.output.events if e.token_ids) == 12, "one event per token, none repeated"


def test_a_preempted_sequence_is_prefilled_and_counted_once(model, tokenizer) -> None:
    """Resuming is a recomputation: the prompt is reported prefilled once, and a preempted sequence that was
    cancelled while it waited finishes as cancelled without running again."""
    prefilled: list[Sequence] = []
    preempted: list[Sequence] = []

    class Recording(scheduler_module.SchedulerObserver):
        def prefilled(self, seq: Sequence) -> None:
            prefilled.append(seq)

        def preempted(self, seq: Sequence) -> None:
            preempted.append(seq)

    ids = tokenizer.encode(PROMPTS[0])
    sched = scheduler(model, tokenizer, max_batch=4, share_ratio=2, observer=Recording())
    heavy = [Sequence(exactly(8, ids, client="heavy"), Collected()) for _ in range(3)]
    sched.add(heavy)
    sched.step()
    light = Sequence(exactly(3, ids, client="light"), Collected())
    sched.add([light])
    sched.step()
    assert preempted == [heavy[2], heavy[1]], "the latest joined first"
    assert all(s.slot < 0 and s.token_ids for s in preempted)
    heavy[2].output.cancelled = True
    while sched.busy:
        sched.step()
    assert len(prefilled) == 4 and {id(s) for s in prefilled} == {id(s) for s in [*heavy, light]}
    assert [s.finished.reason for s in heavy] == [LENGTH, LENGTH, CANCELLED]
    assert heavy[1].finished.completion_tokens == 8


# --- the observer: one report per phase, before that phase's events (issue 20's walk) -----------------------


def test_each_phase_reports_to_the_observer_once_before_its_events_are_pushed(model, tokenizer) -> None:
    """The admission (its prefill's first token) and each decode step hand the observer one StepReport, and only
    then push their events: metrics count a token before its client can see it."""
    log: list[tuple] = []

    class Logged(Collected):
        def push(self, event: Event) -> None:
            super().push(event)
            log.append(("event", len(event.token_ids), event.finished is not None))

    class Recording(scheduler_module.SchedulerObserver):
        def stepped(self, report: scheduler_module.StepReport) -> None:
            log.append(
                (
                    "report",
                    len(report.routed),
                    len(report.prefilled),
                    report.decoded,
                    len(report.tokens),
                    len(report.finished),
                )
            )

    sched = scheduler(model, tokenizer, observer=Recording())
    seq = Sequence(exactly(3, tokenizer.encode(PROMPTS[0])), Logged())
    sched.add([seq])
    while sched.busy:
        sched.step()
    assert log == [
        ("report", 1, 1, 0, 1, 0),  # the prefill: its routing, the prompt, the first token
        ("event", 1, False),
        ("report", 1, 0, 1, 1, 0),  # a decode step of one row
        ("event", 1, False),
        ("report", 1, 0, 1, 1, 1),  # the last token and the finish
        ("event", 1, False),
        ("event", 0, True),
    ]
    assert seq.finished is not None and seq.finished.completion_tokens == 3
