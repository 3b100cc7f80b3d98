"""The scheduler: the one owner of a sequence's life, from the waiting queue to its finish. Every caller runs
through it: the server's engine (a thread that calls `step` in a loop) and offline generation
(moe.decode.generation.generate, which steps until every prompt is done).

    scheduler = Scheduler(model, tokenizer, StaticDecoder(model, max_batch, max_len))
    scheduler.add([Sequence(request, output)])
    while scheduler.busy:
        scheduler.step()

One step:

    while more than one client (the requests' `client` tags) has sequences waiting or running: give each client
        its allowance of the step's rows (share_ratio times the lightest client's rows, split max-min fairly),
        and preempt a client's running rows over it (slots freed, tokens kept: they wait at the head of the queue)
    admit waiting sequences up to the decoder's slots and the clients' allowances, round-robin over clients (one
        client's burst does not hold the slots that free up), their prompts up to max_prefill_tokens (the first
        always starts; the rest wait a step): moe.decode.prefill.prefill them together (sequence mode is decided
        there; sequences that asked for prompt logprobs are prefilled apart, every position's logits, in groups
        under PROMPT_LOGITS_BUDGET), sample their first tokens, and join each to a free decoder slot; a
        preempted sequence resumes the same way, its prompt and tokens so far prefilled again
    finish cancelled sequences and those whose pinned expert was unplugged; drop unplugged names from
        allow-lists
    one moe.decode.static_decoder.decode_one_token for every running sequence, each with its own routing
    sample every row (moe.decode.sampling.sample_step: penalties, logit bias, structured output masks from
        moe.decode.structured_output), move each grammar past its token
    per token: record it, detokenise it (moe.decode.text_stream), push its Event; finish on EOS or a
        stop_token_id or a stop string (STOP), max_new_tokens or the context (LENGTH); free the slots of
        finished rows

The EOS rule (moe.decode.sequence): token_ids keep the token that ended the sequence; its text never does.

One sequence cannot harm another: a prefill that raises is retried row by row, so a bad row fails alone; a
row whose sampling raises is finished with an error while its neighbours are sampled alone, as they would
have been together; a row whose grammar rejects its token is finished alone (the other rows keep the tokens
they sampled, their grammars moved once); whatever else a step raises fails the running batch with an
error, and the next step goes on. Every sequence taken from the queue gets its finish.

Fair share: on a CPU a step's cost grows with its rows, so one client's many rows (n choices, several prompts)
would slow every other client's tokens. While several clients have work, a step runs at most share_ratio
times the rows of the client that wants fewest (one row per client at least), split max-min fairly: a light
client keeps its row in every step at about its solo cost, a heavy one gets the rest and always at least
one row (it finishes), clients that want alike share the batch as before, and a client alone fills it.
Preemption is by recomputation (vLLM's default): nothing to copy now, paid once by the preempted rows when
they resume.

The scheduler knows nothing of threads, event loops or metrics: what the server counts it reads from a
SchedulerObserver, one StepReport per phase (the admission with its prefills, then the decode step): routed
tokens per layer, prefilled prompts, preemptions, the batch size, each token, each finish. The report goes
first, then the phase's events in the order they were made (inside the observer's `pushing()`, which lets the
server hand them to its event loop with one wake-up), so the observer's counts are in place before a client sees
a token, and a request's walk crosses into the observer and into its output once per phase.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch

from moe.adapters.expert import BASE_ROUTE
from moe.adapters.slots import PluggedSet
from moe.decode.prefill import prefill
from moe.decode.sampling import Sampled, TokenLogprobs, prompt_logprobs, sample_step
from moe.decode.sequence import (
    CANCELLED,
    ERROR,
    EXPERT_UNPLUGGED,
    LENGTH,
    STOP,
    Event,
    Finished,
    GenerationFailedError,
    Sequence,
    SequenceOutput,
)
from moe.decode.static_decoder import StaticDecoder, decode_one_token
from moe.decode.structured_output import GrammarCompiler, consume
from moe.decode.text_stream import TextStream
from moe.errors import GrammarError
from moe.model.routed import RoutedModel
from moe.model.trace import add_counts, route_shares, routing_entropy
from moe.routing.router import RoutingSpec

logger = logging.getLogger(__name__)

# Logits one prefill may hold for prompt logprobs ([rows, longest prompt, V] elements; 256 MiB in float32):
# sequences that ask for them are prefilled in groups under this, one row at least.
PROMPT_LOGITS_BUDGET = 1 << 26

# On a CPU, while more than one client has sequences waiting or running, a decode step runs at most this many
# rows per row of the client that wants fewest (the default of Scheduler's share_ratio). A CPU step costs more
# with every row it runs (the demo model, one thread: 2 rows ~1.1x the step of one row, 4 rows ~1.3x, 16 rows
# ~2x, 16 ~1.25x the step of 8), so a client beside another's request of 8 choices would pay for those rows at
# every token (0.47 of its solo tokens/s); at 2 rows per light row it keeps ~0.8 (bench/fair_share.py), and
# two clients that want 8 rows each still share a step of 16. On a GPU a step of 16 rows costs about what one
# row's costs: no cap there.
SHARE_RATIO_CPU = 2


def eos_token_ids(model: RoutedModel, tokenizer: Any) -> tuple[int, ...]:
    """Every id that ends a sequence: the generation config's, the model config's and the tokenizer's."""
    ids: set[int] = set()
    for source in (getattr(model.backbone, "generation_config", None), model.backbone.config, tokenizer):
        value = getattr(source, "eos_token_id", None)
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, list | tuple):
            ids.update(int(v) for v in value)
    return tuple(sorted(ids))


def logits_width(model: RoutedModel) -> int:
    """V: the width of the model's logits (it may exceed the tokenizer's vocabulary)."""
    head = model.backbone.get_output_embeddings()
    if head is not None and getattr(head, "weight", None) is not None:
        return int(head.weight.shape[0])
    return int(model.backbone.config.vocab_size)


@dataclass
class StepReport:
    """What one phase of a step did (the admission, or the decode step, or finishes outside a step), handed to the
    observer at once when the phase ends, before the phase's events are pushed (metrics before events)."""

    routed: list[list[dict[str, float]]] = field(default_factory=list)  # per forward, per layer {route: decisions}
    prefilled: list[Sequence] = field(default_factory=list)  # prompts prefilled (a preempted one resuming: not)
    preempted: list[Sequence] = field(default_factory=list)  # left the batch for other clients' rows
    decoded: int = 0  # rows the decode step ran (0: none ran)
    tokens: list[Sequence] = field(default_factory=list)  # each sampled one token (its token_ids[-1])
    finished: list[Sequence] = field(default_factory=list)  # each with its `finished` set

    def __bool__(self) -> bool:
        return bool(self.routed or self.prefilled or self.preempted or self.decoded or self.tokens or self.finished)


class SchedulerObserver:
    """What the scheduler reports, one StepReport per phase (`stepped`); this one hands each report to the methods
    below, one call per item, which ignore it all (the server's engine overrides `stepped` and counts it)."""

    def stepped(self, report: StepReport) -> None:
        """One phase's report; called before its events are pushed."""
        for layer_counts in report.routed:
            self.routed(layer_counts)
        for seq in report.prefilled:
            self.prefilled(seq)
        for seq in report.preempted:
            self.preempted(seq)
        if report.decoded:
            self.decoded(report.decoded)
        for seq in report.tokens:
            self.token(seq)
        for seq in report.finished:
            self.finished(seq)

    def pushing(self) -> contextlib.AbstractContextManager[None]:
        """Held around the pushes of one phase's events (the server's engine hands them to its event loop with
        one wake-up); by default nothing."""
        return contextlib.nullcontext()

    def prefilled(self, seq: Sequence) -> None:
        """seq's prompt was prefilled."""

    def routed(self, layer_counts: list[dict[str, float]]) -> None:
        """One forward's applied decisions, per layer {route: (token, layer) decisions}."""

    def decoded(self, rows: int) -> None:
        """One decode step ran this many rows."""

    def preempted(self, seq: Sequence) -> None:
        """seq left the batch to make room for other clients' rows (it waits, and resumes where it was)."""

    def token(self, seq: Sequence) -> None:
        """seq sampled a token (seq.token_ids[-1]); called before its Event is pushed."""

    def finished(self, seq: Sequence) -> None:
        """seq finished (seq.finished); called before its last Event is pushed."""


class Scheduler:
    """Waiting and running sequences over one StaticDecoder (its slots are the batch, its max_len the context).

    max_prefill_tokens: prompt tokens one step may prefill (None: as many as there are free slots).
    share_ratio: while sequences of more than one client wait or run, a step runs at most this many rows per
        row of the client that wants fewest (the fair share, see _allowances); None: by device (SHARE_RATIO_CPU
        on a CPU, no cap elsewhere); 0: no cap (every running row in every step).
    The decoder's plugged set is the one routed over: the model's live slots (what the server plugs between
    steps) or a fixed set. Not thread-safe: one thread calls add, step and finish_*.
    """

    def __init__(
        self,
        model: RoutedModel,
        tokenizer: Any,
        decoder: StaticDecoder,
        *,
        max_prefill_tokens: int | None = None,
        observer: SchedulerObserver | None = None,
        share_ratio: int | None = None,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.decoder = decoder
        self.max_batch_size = decoder.max_batch
        self.context_limit = decoder.max_len
        self.max_prefill_tokens = max_prefill_tokens
        if share_ratio is None:
            share_ratio = SHARE_RATIO_CPU if model.device.type == "cpu" else 0
        self.share_ratio = share_ratio
        self.observer = observer or SchedulerObserver()
        self.device = model.device
        self._report = StepReport()  # this phase's, handed over with its events by _flush
        self._events: list[tuple[SequenceOutput, Event]] = []
        self.eos_ids = eos_token_ids(model, tokenizer)
        self.vocab_size = logits_width(model)  # tokens the model scores: the largest sensible top_k
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self._admissions = 0  # sequences admitted so far: the clock of _last_admitted
        self._last_admitted: dict[str, int] = {}  # client tag -> when it last had a sequence admitted
        self._grammars: GrammarCompiler | None = None
        self._grammars_lock = threading.Lock()  # the compiler is built from whichever side asks first
        # the plugged set every running row's spec was last checked against (current_spec) in a decode step: a row
        # joins after its own check against the step's set, so while the set is this one no row needs it again
        self._specs_checked: PluggedSet | None = None

    @property
    def busy(self) -> bool:
        return bool(self.waiting or self.running)

    @property
    def grammars(self) -> GrammarCompiler:
        """Structured output's compiler, built on first use (it converts the vocabulary once)."""
        with self._grammars_lock:
            if self._grammars is None:
                self._grammars = GrammarCompiler(self.tokenizer, self.vocab_size, self.eos_ids)
            return self._grammars

    def add(self, seqs: Iterable[Sequence]) -> None:
        """Queue sequences (admitted round-robin over their requests' client tags, first come first served
        within one client)."""
        self.waiting.extend(seqs)

    def step(self) -> None:
        """Admit what fits, then decode one token for every running sequence. Never raises for a sequence's
        fault: whatever a step raises fails the running batch with an error, and the scheduler goes on."""
        try:
            plugged = self.decoder.plugged  # the set this step runs with (plugs happen between steps)
            allowances = self._allowances()
            if allowances is not None:
                self._preempt(allowances)
            self._admit(plugged, allowances)
            if self.running:  # _decode pushes the new sequences' first tokens before its step
                self._decode(plugged)
        except Exception as e:
            logger.exception("scheduler step failed")
            error = GenerationFailedError(f"generation failed: {type(e).__name__}: {e}")
            self.finish_running(ERROR, str(error), error)
        finally:
            self._flush()

    def finish_waiting(self, reason: str, message: str | None, error: Exception | None = None) -> None:
        while self.waiting:
            self._finish(self.waiting.popleft(), reason, message, error)
        self._flush()

    def finish_running(self, reason: str, message: str | None, error: Exception | None = None) -> None:
        for seq in self.running:
            self._finish(seq, reason, message, error)
        self.running = []
        self.decoder.reset()
        self._flush()

    # --- admission ----------------------------------------------------------------------------------------------

    def _allowances(self) -> dict[str, int] | None:
        """Each client's rows in this step while more than one client has sequences waiting or running (None:
        one client or none, which may fill the batch, or no cap). The step's rows, share_ratio times the rows
        of the client that wants fewest and one per client at least, within the batch, are split max-min fairly
        (water-filling): the clients that want least get all they want, the others an equal share of what is
        left, so every client has a row in every step (while the batch has one for each) and no client's rows
        set the cost of everyone's step."""
        if self.share_ratio <= 0:
            return None
        demand: dict[str, int] = {}
        running: dict[str, int] = {}
        for seq in self.running:
            client = seq.request.client
            demand[client] = demand.get(client, 0) + 1
            running[client] = running.get(client, 0) + 1
        for seq in self.waiting:
            demand[seq.request.client] = demand.get(seq.request.client, 0) + 1
        if len(demand) < 2:
            return None
        rows = min(self.max_batch_size, max(self.share_ratio * min(demand.values()), len(demand)))
        # least demand first; on a tie the client running fewer rows first (what is left over goes to the later
        # ones, so rows that run already keep running)
        order = sorted(demand, key=lambda client: (demand[client], running.get(client, 0)))
        allowances: dict[str, int] = {}
        for position, client in enumerate(order):
            allowances[client] = min(demand[client], rows // (len(order) - position))
            rows -= allowances[client]
        return allowances

    def _preempt(self, allowances: dict[str, int]) -> None:
        """A client's running rows over its allowance leave the batch, the latest joined first: their slots are
        freed (keys and values dropped), their tokens, text, generator and grammar kept. They wait at the head of
        the queue and resume where they were (_start prefills prompt + tokens so far)."""
        over: dict[str, int] = {client: -allowances[client] for client in allowances}
        for seq in self.running:
            over[seq.request.client] += 1
        if all(excess <= 0 for excess in over.values()):
            return
        keep: list[int] = []
        preempted: list[Sequence] = []  # latest joined first
        for row in reversed(range(len(self.running))):
            seq = self.running[row]
            if over[seq.request.client] > 0:
                over[seq.request.client] -= 1
                preempted.append(seq)
            else:
                keep.append(row)
        self._drop(keep[::-1])
        for seq in preempted:  # the earliest joined ends at the head of the queue
            seq.slot = -1
            seq.preemptions += 1
            self.waiting.appendleft(seq)
        self._report.preempted += preempted

    def _admit(self, plugged: PluggedSet, allowances: dict[str, int] | None = None) -> None:
        """Start waiting sequences, round-robin over clients (the client admitted least recently goes next,
        its oldest sequence first), while the decoder has free slots, each client stays within its allowance
        (several clients: _allowances) and their prompts fit max_prefill_tokens (the first always starts): one
        client's burst cannot hold the slots that free up while another client waits, and the prefill between
        two decode steps stays bounded, so the running rows' next token is not held behind a burst of new
        prompts. A preempted sequence resumes here (its prompt is its prompt and its tokens so far)."""
        admitted: list[Sequence] = []
        budget = self.max_prefill_tokens
        rows: dict[str, int] = {}  # client -> its rows running or admitted (with allowances)
        if allowances is not None:
            for seq in self.running:
                rows[seq.request.client] = rows.get(seq.request.client, 0) + 1
        while self.waiting and len(self.running) + len(admitted) < self.max_batch_size:
            full = {c for c, n in rows.items() if n >= allowances[c]} if allowances is not None else set()
            index = self._next_waiting(full)
            if index is None:
                break
            if budget is not None:
                waiting = self.waiting[index]
                tokens = len(waiting.request.prompt_ids) + len(waiting.token_ids)
                if admitted and tokens > budget:
                    break
                budget -= tokens
            seq = self.waiting[index]
            del self.waiting[index]
            self._admissions += 1
            self._last_admitted[seq.request.client] = self._admissions
            rows[seq.request.client] = rows.get(seq.request.client, 0) + 1
            admitted.append(seq)
        if len(self._last_admitted) > 4 * self.max_batch_size:  # forget clients with nothing here
            present = {s.request.client for s in (*self.waiting, *self.running, *admitted)}
            self._last_admitted = {c: t for c, t in self._last_admitted.items() if c in present}
        if not admitted:
            return
        try:
            resumed = [seq for seq in admitted if seq.token_ids and self._may_go_on(seq, plugged)]
            if resumed:
                self._start(resumed, plugged, resume=True)
            seqs = [seq for seq in admitted if not seq.token_ids and self._arm(seq, plugged)]
            scored = [s for s in seqs if s.request.prompt_logprobs is not None]
            for group in prompt_logit_groups(scored, self.vocab_size):
                self._start(group, plugged, prompt_logits=True)
            plain = [s for s in seqs if s.request.prompt_logprobs is None]
            if plain:
                self._start(plain, plugged)
        finally:  # whatever happened above, no sequence taken from the queue is left without an answer
            for seq in admitted:
                if seq.finished is None and seq.slot < 0:
                    error = GenerationFailedError("the request could not start (see the server log)")
                    self._finish(seq, ERROR, str(error), error)

    def _next_waiting(self, full: Iterable[str] = ()) -> int | None:
        """The index in `waiting` of the sequence to admit next: the oldest of the client admitted least
        recently (a client never admitted first; ties by queue order), none of the `full` clients (None: every
        waiting sequence is theirs). O(waiting), which the queue bounds."""
        best, best_last = None, None
        seen: set[str] = set(full)
        for index, seq in enumerate(self.waiting):
            client = seq.request.client
            if client in seen:
                continue
            seen.add(client)
            last = self._last_admitted.get(client, 0)
            if best_last is None or last < best_last:
                best, best_last = index, last
        return best

    def _may_go_on(self, seq: Sequence, plugged: PluggedSet, routing: RoutingSpec | None = None) -> bool:
        """Whether a sequence goes on under this plugged set, its routing (`routing`, else its current spec)
        updated; False: it was cancelled (its output's `cancelled` flag) or its pinned expert unplugged, and was
        finished."""
        if self._cancelled(seq):
            return False
        spec, message = current_spec(seq.spec if routing is None else routing, plugged)
        if spec is None:
            self._finish(seq, EXPERT_UNPLUGGED, message)
            return False
        seq.spec = spec
        return True

    def _cancelled(self, seq: Sequence) -> bool:
        """Whether the sequence's reader is gone (its output's `cancelled` flag); then it was finished."""
        if seq.output is not None and seq.output.cancelled:
            self._finish(seq, CANCELLED, "the client went away")
            return True
        return False

    def _arm(self, seq: Sequence, plugged: PluggedSet) -> bool:
        """Give a sequence about to start its routing, generator, text stream and grammar. False: it cannot
        start (cancelled, its expert gone, a bad setting), and was finished."""
        request = seq.request
        if not self._may_go_on(seq, plugged, request.routing):
            return False
        try:
            if request.sampling.seed is not None:  # its own stream; an unseeded row draws from torch's default one
                seq.generator = request.sampling.generator(self.device)
            seq.stop_ids = frozenset(self.eos_ids) | frozenset(request.sampling.stop_token_ids)
            seq.text = TextStream(
                self.tokenizer, request.stop, tuple(sorted(seq.stop_ids)), request.text, pieces=seq.output is not None
            )
            if request.grammar is not None:  # checked before queueing; a failure here fails this sequence only
                seq.matcher = self.grammars.matcher(request.grammar)
        except GrammarError as e:
            self._finish(seq, ERROR, f"structured output failed: {e}")
            return False
        except Exception as e:  # this sequence cannot start; the others can
            logger.exception("cannot start a request")
            error = GenerationFailedError(f"the request could not start: {type(e).__name__}: {e}")
            self._finish(seq, ERROR, str(error), error)
            return False
        return True

    def _start(
        self, seqs: list[Sequence], plugged: PluggedSet, prompt_logits: bool = False, resume: bool = False
    ) -> None:
        """Prefill new sequences together, sample their first tokens, and join them to the running batch.

        prompt_logits: score every prompt token too (their requests asked for prompt logprobs). resume: the
        sequences were preempted; their prompt and tokens so far are prefilled again (a recomputation: its
        routing decisions were counted when first made and are not counted again) and their next token is
        sampled. A prefill that raises is retried row by row, so a row that cannot be prefilled fails alone."""
        prompts = [s.request.prompt_ids + s.token_ids if resume else s.request.prompt_ids for s in seqs]
        try:
            pre = prefill(self.model, prompts, [s.spec for s in seqs], plugged, prompt_logits=prompt_logits)
        except Exception as e:
            if len(seqs) > 1:
                logger.warning("prefill of %d requests failed (%s); retrying them one by one", len(seqs), e)
                for seq in seqs:
                    self._start([seq], plugged, prompt_logits, resume)
                return
            logger.exception("prefill failed")
            error = GenerationFailedError(f"prefill failed: {type(e).__name__}: {e}")
            self._finish(seqs[0], ERROR, str(error), error)
            return
        if not resume:
            self._report.routed.append(pre.layer_counts)
            self._report.prefilled += seqs
        for seq, spec, row_counts in zip(seqs, pre.specs, pre.row_counts, strict=True):
            seq.spec = spec
            if not resume:  # a fresh sequence's counts start as its prompt's (a sequence is prefilled fresh once)
                seq.counts = dict(row_counts)
        if pre.prompt_logits is not None:
            for seq, logits, ids in zip(seqs, pre.prompt_logits, prompts, strict=True):
                seq.prompt_logprobs = prompt_logprobs(logits, ids, seq.request.prompt_logprobs or 0)
        live = [row for row, seq in enumerate(seqs) if seq.request.max_new_tokens > 0]
        for seq in seqs:
            if seq.request.max_new_tokens == 0:  # scoring only (echo with max_tokens 0)
                self._finish(seq, LENGTH, None)
        if not live:
            return
        rows = [seqs[row] for row in live]
        logits = pre.logits if len(live) == len(seqs) else pre.logits[live]
        tokens, logprobs = self._sample(rows, logits)
        for kept in self._advance_all(rows, tokens, logprobs):
            row = live[kept]
            seqs[row].slot = self.decoder.join(pre, row)
            self.running.append(seqs[row])

    # --- a decode step ------------------------------------------------------------------------------------------

    def _decode(self, plugged: PluggedSet) -> None:
        """The admission's events go out first (new rows' first tokens); then the rows still listening whose
        experts are still plugged decode one token each."""
        self._flush()
        if plugged is self._specs_checked:  # every running row's spec holds under it: only cancellations to see
            keep = [row for row, seq in enumerate(self.running) if not self._cancelled(seq)]
        else:
            keep = [row for row, seq in enumerate(self.running) if self._may_go_on(seq, plugged)]
            self._specs_checked = plugged
        self._drop(keep)
        if not self.running:
            return
        seqs = self.running
        out = decode_one_token(
            self.decoder, [s.slot for s in seqs], [s.token_ids[-1] for s in seqs], [s.spec for s in seqs], plugged
        )
        self._report.routed.append(out.layer_counts)
        self._report.decoded = len(seqs)
        for seq, row_counts in zip(seqs, out.row_counts, strict=True):
            add_counts(seq.counts, row_counts)
        tokens, logprobs = self._sample(seqs, out.logits)
        self._drop(self._advance_all(seqs, tokens, logprobs))

    def _drop(self, keep: list[int]) -> None:
        """Keep these rows of the running batch (in order); free the decoder slots of the others."""
        if len(keep) != len(self.running):
            kept = set(keep)
            for row, seq in enumerate(self.running):
                if row not in kept:
                    self.decoder.leave(seq.slot)
            self.running = [self.running[row] for row in keep]

    def _sample(self, seqs: list[Sequence], logits: torch.Tensor) -> tuple[list[Any], list[Any]]:
        """Each row's next token (and logprobs) under its own sampling settings and grammar; grammars then move
        past their tokens, row by row. A row whose sampling raises is finished with an error (token None)
        while the others are sampled alone, exactly as they would have been together; a row whose grammar
        rejects its token is finished with an error, and the others keep theirs."""
        matchers = [s.matcher for s in seqs]
        constrained = any(m is not None for m in matchers)
        tokens: list[Any]  # int, or None for a row that failed
        try:
            sampled = self._sample_rows(seqs, logits, matchers if constrained else None)
            tokens, logprobs = sampled.tokens, sampled.logprobs  # fresh lists, ours to edit
        except Exception:
            logger.warning("sampling a batch of %d failed; sampling its rows one by one", len(seqs), exc_info=True)
            tokens, logprobs = [], []
            for row, seq in enumerate(seqs):
                try:
                    one = self._sample_rows([seq], logits[row : row + 1], [seq.matcher] if seq.matcher else None)
                    tokens.append(one.tokens[0])
                    logprobs.append(one.logprobs[0])
                except Exception as e:
                    logger.exception("sampling failed")
                    self._fail(seq, f"sampling failed: {type(e).__name__}: {e}")
                    tokens.append(None)
                    logprobs.append(None)
        if constrained:
            for row, (matcher, token) in enumerate(zip(matchers, tokens, strict=True)):
                if matcher is None or token is None:
                    continue
                try:
                    consume(matcher, token, seqs[row].stop_ids)
                except Exception as e:
                    logger.exception("structured output failed")
                    # the first line: a grammar engine's error goes on with its state and the whole grammar (the log
                    # has them), which the client sent and does not need back
                    reason = (str(e).splitlines() or [""])[0]
                    self._fail(seqs[row], f"structured output failed: {type(e).__name__}: {reason}")
                    tokens[row] = None
        return tokens, logprobs

    def _sample_rows(self, seqs: list[Sequence], logits: torch.Tensor, matchers: list[Any] | None) -> Sampled:
        """sample_step over these rows; matchers: their grammars (None: no row is constrained)."""
        return sample_step(
            logits,
            [s.request.sampling for s in seqs],
            [s.generator for s in seqs],
            [len(s.token_ids) for s in seqs],
            self.eos_ids,
            prompts=[s.request.prompt_ids for s in seqs],
            outputs=[s.token_ids for s in seqs],
            allowed=self.grammars.allowed_tokens(matchers) if matchers is not None else None,
        )

    # --- per token and at the end -------------------------------------------------------------------------------

    def _advance_all(
        self, seqs: list[Sequence], tokens: list[int | None], logprobs: list[TokenLogprobs | None]
    ) -> list[int]:
        """Each row's sampled token (None: the row failed and was finished): record it, stream its text, and finish
        the sequence if it is done -> the rows that go on. One loop over the batch, per row:

            token_ids += [token]; logprobs += [its logprobs] when asked
            piece, stopped = text.add(token)                     # detokenise, stop strings, EOS / stop_token_ids
            STOP if stopped; else LENGTH (and the held-back text) once token_ids reach max_new_tokens or the
                prompt and tokens reach the context
            report the token; push Event(piece, [token]); finish when it ended
        """
        keep: list[int] = []
        reported, events, context_limit = self._report.tokens, self._events, self.context_limit
        for row, (seq, token, row_logprobs) in enumerate(zip(seqs, tokens, logprobs, strict=True)):
            if token is None:
                continue
            request, ids = seq.request, seq.token_ids
            ids.append(token)
            wants_logprobs = request.sampling.logprobs is not None
            if wants_logprobs:
                seq.logprobs.append(row_logprobs)
            text = seq.text
            piece, stopped = text.add(token)
            if stopped:
                reason: str | None = STOP
            elif len(ids) >= min(request.max_new_tokens, context_limit - len(request.prompt_ids)):
                reason, piece = LENGTH, piece + text.flush()
            else:
                reason = None
            reported.append(seq)
            if seq.output is not None:
                events.append((seq.output, Event(piece, [token], logprobs=[row_logprobs] if wants_logprobs else [])))
            if reason is None:
                keep.append(row)
            else:
                self._finish(seq, reason, None)
        return keep

    def _fail(self, seq: Sequence, message: str) -> None:
        error = GenerationFailedError(message)
        self._finish(seq, ERROR, str(error), error)

    def finish(self, seq: Sequence, reason: str, message: str | None, error: Exception | None = None) -> None:
        """End a sequence (once), from outside a step: its held-back text, then its Finished, reported and pushed
        now. Its slot is freed by the caller."""
        self._finish(seq, reason, message, error)
        self._flush()

    def _flush(self) -> None:
        """The phase's report to the observer, then its events to their outputs, in the order they were made
        (for the walk of a request: one call into the observer and one run of pushes per phase)."""
        report, events = self._report, self._events
        if not report and not events:
            return
        self._report, self._events = StepReport(), []
        try:
            self.observer.stepped(report)
        finally:  # a failing observer must not cost a client its events
            with self.observer.pushing():
                for output, event in events:
                    output.push(event)

    def _finish(self, seq: Sequence, reason: str, message: str | None, error: Exception | None = None) -> None:
        """End a sequence (once): its held-back text, then its Finished, queued for this phase's _flush."""
        if seq.finished is not None:
            return
        text = ""
        if seq.text is not None:
            if seq.text.final is None:  # its last token (a stop string, EOS, the length) did not end the text
                rest = seq.text.flush()
                if rest and seq.output is not None:
                    self._events.append((seq.output, Event(rest)))
            text = seq.text.final or ""
        shares = route_shares(seq.counts)
        seq.finished = Finished(
            reason,
            text,
            len(seq.request.prompt_ids),
            len(seq.token_ids),
            shares,
            routing_entropy(shares),
            message,
            error,
            token_ids=list(seq.token_ids),
            logprobs=list(seq.logprobs),
            prompt_logprobs=seq.prompt_logprobs,
        )
        self._report.finished.append(seq)
        if seq.output is not None:
            self._events.append((seq.output, Event(finished=seq.finished)))


def prompt_logit_groups(seqs: list[Sequence], vocab: int) -> list[list[Sequence]]:
    """Consecutive groups whose [rows, longest prompt, V] logits stay under PROMPT_LOGITS_BUDGET."""
    groups: list[list[Sequence]] = []
    current: list[Sequence] = []
    longest = 0
    for seq in seqs:
        length = len(seq.request.prompt_ids)
        if current and (len(current) + 1) * max(longest, length) * vocab > PROMPT_LOGITS_BUDGET:
            groups.append(current)
            current, longest = [], 0
        current.append(seq)
        longest = max(longest, length)
    if current:
        groups.append(current)
    return groups


def current_spec(spec: RoutingSpec, plugged: PluggedSet) -> tuple[RoutingSpec | None, str | None]:
    """The spec to run this step, or (None, why) when its pinned expert is gone.

    A pinned (or sequence-chosen) expert that was unplugged ends the sequence; names in an allow-list that
    were unplugged are dropped from it, so the sequence goes on with the experts it may still use.
    """
    if spec.expert and spec.expert != BASE_ROUTE and spec.expert not in plugged:
        return None, (
            f"expert {spec.expert!r} was unplugged while this request was running; "
            f"plugged now: {list(plugged.names) or 'none'}"
        )
    if spec.allow is not None and any(name not in plugged for name in spec.allow):
        spec = RoutingSpec(spec.mode, spec.expert, tuple(n for n in spec.allow if n in plugged))
    return spec, None
