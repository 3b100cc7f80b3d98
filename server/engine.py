"""The engine: one thread owns the model and schedules continuous batching. It schedules; it does not route.

    loop:
        run queued calls (plug, unplug, anything that touches the plugged set): between steps, never during one
        admit waiting requests up to max_batch_size, their prompts up to max_prefill_tokens (the rest wait a
            step): moe.decode.generation.prefill them together (sequence mode is decided there; requests that asked for
            prompt logprobs are prefilled apart, with every position's logits), sample their first tokens, and
            join each to a free slot of the decoder
        one moe.decode.generation.decode_one_token for every running sequence, each with its own routing and sampling
            (a moe.decode.generation.StaticDecoder step: fixed slots; on CUDA a captured graph per bucket; then
            penalties, logit bias, structured output masks: moe.decode.sampling and moe.decode.structured_output)
        emit each new token's text (server.text_stream) to its request's queue; free the slots of finished and
            cancelled rows

Requests are submitted from the event loop and read back through an asyncio queue per request, so the
HTTP layer never blocks on the model. The request and event types live in server.requests.

One request cannot harm another: a prefill that raises is retried row by row, so a bad row fails alone; a
row whose sampling raises is finished with an error while its neighbours go on; whatever a step raises, the
loop goes on, and every request it took gets its finish event. `drain` (SIGTERM) lets running requests
finish for a grace period and then ends them with an error; `stop` always returns.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch

from moe import BASE_ROUTE, Expert, GrammarError, PluggedSet, RoutedModel, RoutingSpec, route_shares, routing_entropy
from moe.decode.generation import (
    StaticDecoder,
    capture_refusal,
    context_length,
    decode_one_token,
    eos_token_ids,
    prefill,
)
from moe.decode.sampling import Sampled, TokenLogprobs, prompt_logprobs, sample_step
from moe.decode.structured_output import GrammarCompiler, advance
from moe.model.trace import add_counts
from server.metrics import Metrics
from server.requests import (
    CANCELLED,
    ERROR,
    EXPERT_UNPLUGGED,
    LENGTH,
    STOP,
    ContextLimitError,
    EngineStoppedError,
    Event,
    Finished,
    GenerationFailedError,
    GenerationRequest,
    QueueFullError,
    RequestHandle,
)
from server.text_stream import TextStream

logger = logging.getLogger(__name__)
T = TypeVar("T")
_SHUTTING_DOWN = "the server is shutting down"

# Logits one prefill may hold for prompt logprobs ([rows, longest prompt, V] elements; 256 MiB in float32):
# requests that ask for them are prefilled in groups under this, one row at least.
PROMPT_LOGITS_BUDGET = 1 << 26


@dataclass
class _Sequence:
    """A running request, as the engine tracks it."""

    handle: RequestHandle
    spec: RoutingSpec
    generator: Any
    text: TextStream
    counts: dict[str, float] = field(default_factory=dict)
    generated: list[int] = field(default_factory=list)
    slot: int = -1  # the decoder slot it decodes in (-1 before it joins)
    done: bool = False
    last_token_at: float = 0.0
    matcher: Any = None  # the row's grammar (structured output), None when unconstrained
    stop_ids: frozenset[int] = frozenset()  # EOS and the request's stop_token_ids
    logprobs: list[TokenLogprobs | None] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprobs | None] | None = None

    @property
    def request(self) -> GenerationRequest:
        return self.handle.request


class Engine:
    def __init__(
        self,
        model: RoutedModel,
        tokenizer: Any,
        *,
        max_batch_size: int = 16,
        max_queue: int = 64,
        max_prefill_tokens: int = 512,
        context_limit: int | None = None,
        metrics: Metrics | None = None,
        cuda_graphs: bool = True,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.max_batch_size = max_batch_size
        self.max_queue = max_queue
        self.max_prefill_tokens = max_prefill_tokens
        self.context_limit = context_limit or context_length(model)
        self.metrics = metrics
        self.eos_ids = eos_token_ids(model, tokenizer)
        self.vocab_size = logits_width(model)  # tokens the model scores: the largest sensible top_k
        self._grammars: GrammarCompiler | None = None
        self._grammars_lock = threading.Lock()
        self._routed_totals: dict[str, float] = {}  # (token, layer) decisions per expert since it was plugged
        self._waiting: deque[RequestHandle] = deque()
        self._calls: deque[tuple[Callable[[], Any], concurrent.futures.Future]] = deque()
        self._running: list[_Sequence] = []
        refusal = capture_refusal(model) if cuda_graphs else "turned off"
        if cuda_graphs and refusal and model.device.type == "cuda":
            logger.warning("decode steps run eagerly: %s", refusal)
        self._decoder = StaticDecoder(model, max_batch_size, self.context_limit, capture=refusal is None)
        self.context_limit = self._decoder.max_len  # less where sliding-window attention caps it
        self._wake = threading.Condition()
        self._stopping = False
        self._drain_deadline: float | None = None  # set by drain(): running requests end by then
        self._thread: threading.Thread | None = None

    # --- lifecycle ------------------------------------------------------------------------------------

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> None:
        self._stopping = False
        self._drain_deadline = None
        self._thread = threading.Thread(target=self._loop, name="plugmoe-engine", daemon=True)
        self._thread.start()

    def drain(self, grace_s: float) -> None:
        """Shutting down: refuse new requests (503), fail waiting ones, and give running ones `grace_s` to
        finish before they end with an error. Safe to call from any thread, more than once."""
        with self._wake:
            deadline = time.perf_counter() + grace_s
            if self._drain_deadline is None or deadline < self._drain_deadline:
                self._drain_deadline = deadline
            self._wake.notify_all()
        logger.info("draining: %d running requests have %.1f s to finish", len(self._running), grace_s)

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the loop; every request still queued or running gets its finish event. Always returns."""
        with self._wake:
            self._stopping = True
            self._wake.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                logger.error("the engine did not stop within %.1f s (a step is stuck); leaving it", timeout)
        with self._wake:
            waiting = list(self._waiting)
            self._waiting.clear()
        for handle in waiting:
            self._finish_handle(handle, ERROR, "", 0, {}, _SHUTTING_DOWN, EngineStoppedError(_SHUTTING_DOWN))

    # --- the HTTP side --------------------------------------------------------------------------------

    def submit(self, request: GenerationRequest) -> RequestHandle:
        """Queue a request (from the event loop). Raises QueueFullError, ContextLimitError, UnknownExpertError."""
        return self.submit_all([request])[0]

    def submit_all(self, requests: list[GenerationRequest]) -> list[RequestHandle]:
        """Queue several sequences of one HTTP request (n choices, several prompts): all of them or none."""
        if not self.alive:
            raise EngineStoppedError("the engine is not running")
        if self._drain_deadline is not None:
            raise EngineStoppedError(_SHUTTING_DOWN)
        for request in requests:
            if not request.prompt_ids:
                raise ContextLimitError("the prompt is empty; send at least one token")
            if len(request.prompt_ids) >= self.context_limit:
                raise ContextLimitError(
                    f"the prompt has {len(request.prompt_ids)} tokens; the context limit is {self.context_limit} "
                    "tokens including at least one generated token"
                )
            request.routing.check_against(self.model.plugged)
        loop = asyncio.get_running_loop()
        with self._wake:
            if len(self._waiting) + len(self._running) + len(requests) > self.max_batch_size + self.max_queue:
                raise QueueFullError(
                    f"{len(self._waiting)} requests are waiting and {len(self._running)} running; "
                    f"the queue holds {self.max_queue} beyond a batch of {self.max_batch_size}"
                )
            handles = [RequestHandle(request, loop) for request in requests]
            self._waiting.extend(handles)
            self._set_gauges()
            self._wake.notify_all()
        return handles

    @property
    def grammars(self) -> GrammarCompiler:
        """Structured output's compiler, built on first use (it converts the vocabulary once)."""
        with self._grammars_lock:
            if self._grammars is None:
                self._grammars = GrammarCompiler(self.tokenizer, self.vocab_size, self.eos_ids)
            return self._grammars

    def call(self, fn: Callable[[], T]) -> concurrent.futures.Future[T]:
        """Run fn on the engine thread between two steps (anything that swaps the plugged set)."""
        future: concurrent.futures.Future[T] = concurrent.futures.Future()
        if not self.alive:
            future.set_exception(EngineStoppedError("the engine is not running"))
            return future
        with self._wake:
            self._calls.append((fn, future))
            self._wake.notify_all()
        return future

    async def run(self, fn: Callable[[], T]) -> T:
        return await asyncio.wrap_future(self.call(fn))

    async def plug(self, expert: Expert, replace: bool = False) -> Expert:
        """Swap `expert` in between two steps; the running batch decodes with it from the next step."""

        def swap() -> Expert:
            self.model.plug(expert, replace=replace)
            self._routed_totals.pop(expert.name, None)
            return self.model.plugged.get(expert.name)

        return await self.run(swap) if self.alive else swap()

    async def unplug(self, name: str) -> Expert:
        """Swap the expert out between two steps; requests pinned to it finish with `expert_unplugged`."""

        def swap() -> Expert:
            expert = self.model.unplug(name)
            self._routed_totals.pop(name, None)
            return expert

        return await self.run(swap) if self.alive else swap()

    async def set_experts(self, experts: tuple[Expert, ...]) -> PluggedSet:
        """Swap the whole plugged set between two steps (an expert-set version at once). Experts that leave
        end the requests pinned to them with `expert_unplugged`, as an unplug does; a new or replaced
        expert's routed-token count starts at 0."""

        def swap() -> PluggedSet:
            before = {e.name: e for e in self.model.plugged.experts}
            plugged = self.model.set_experts(experts)
            kept = {e.name for e in plugged.experts if before.get(e.name) is e}
            for name in set(before) | set(plugged.names):
                if name not in kept:
                    self._routed_totals.pop(name, None)
            return plugged

        return await self.run(swap) if self.alive else swap()

    def tokens_routed(self, name: str) -> float:
        """(token, layer) decisions an expert has won since it was plugged."""
        return self._routed_totals.get(name, 0.0)

    @property
    def queue_depth(self) -> int:
        return len(self._waiting)

    @property
    def running(self) -> int:
        return len(self._running)

    # --- the loop -------------------------------------------------------------------------------------

    def _loop(self) -> None:
        logger.info(
            "engine started: batch %d, queue %d, context %d", self.max_batch_size, self.max_queue, self.context_limit
        )
        try:
            while True:
                with self._wake:
                    while not (self._stopping or self._calls or self._waiting or self._running):
                        self._wake.wait()
                    if self._stopping:
                        break
                try:
                    self._run_calls()
                    if self._drain_deadline is not None:
                        self._drain()
                    self._admit()
                    if self._running:
                        self._decode()
                except Exception as e:  # a failed step must not kill the engine: fail the batch, go on
                    logger.exception("engine step failed")
                    error = GenerationFailedError(f"generation failed: {type(e).__name__}: {e}")
                    for seq in self._running:
                        self._finish(seq, ERROR, str(error), error)
                    self._drop_all()
                self._set_gauges()
        finally:  # stopping, or something no step should raise: every request still here gets its answer
            for seq in self._running:
                self._finish(seq, ERROR, _SHUTTING_DOWN, EngineStoppedError(_SHUTTING_DOWN))
            self._drop_all()
            with self._wake:
                waiting = list(self._waiting)
                self._waiting.clear()
                calls = list(self._calls)
                self._calls.clear()
            for handle in waiting:
                self._finish_handle(handle, ERROR, "", 0, {}, _SHUTTING_DOWN, EngineStoppedError(_SHUTTING_DOWN))
            for _, future in calls:
                if not future.done():
                    future.set_exception(EngineStoppedError("the engine stopped"))
            self._set_gauges()
            logger.info("engine stopped")

    def _drain(self) -> None:
        """While draining: waiting requests are refused; running ones end at the deadline."""
        with self._wake:
            waiting = list(self._waiting)
            self._waiting.clear()
        for handle in waiting:
            self._finish_handle(handle, ERROR, "", 0, {}, _SHUTTING_DOWN, EngineStoppedError(_SHUTTING_DOWN))
        if self._running and self._drain_deadline is not None and time.perf_counter() >= self._drain_deadline:
            for seq in self._running:
                self._finish(seq, ERROR, _SHUTTING_DOWN, EngineStoppedError(_SHUTTING_DOWN))
            self._drop_all()

    def _run_calls(self) -> None:
        while self._calls:
            with self._wake:
                fn, future = self._calls.popleft()
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(fn())
            except BaseException as e:  # handed to the caller, who maps it to a response
                future.set_exception(e)

    def _admit(self) -> None:
        """Start waiting requests, first come first served, while the batch has room and their prompts fit
        max_prefill_tokens (the first always starts): the prefill between two decode steps stays bounded, so
        the running rows' next token is not held behind a burst of new prompts."""
        handles: list[RequestHandle] = []
        budget = self.max_prefill_tokens
        with self._wake:
            while self._waiting and len(self._running) + len(handles) < self.max_batch_size:
                tokens = len(self._waiting[0].request.prompt_ids)
                if handles and tokens > budget:
                    break
                budget -= tokens
                handles.append(self._waiting.popleft())
        if not handles:
            return
        try:
            plugged = self.model.plugged
            now = time.perf_counter()
            seqs: list[_Sequence] = []
            for handle in handles:
                if handle.cancelled:
                    self._finish_handle(handle, CANCELLED, "", 0, {}, "the client went away")
                    continue
                spec, message = _current_spec(handle.request.routing, plugged)
                if spec is None:
                    self._finish_handle(handle, EXPERT_UNPLUGGED, "", 0, {}, message)
                    continue
                seq = self._sequence(handle, spec, now)
                if seq is not None:
                    seqs.append(seq)
            scored = [s for s in seqs if s.request.prompt_logprobs is not None]
            for group in _prompt_logit_groups(scored, self.vocab_size):
                self._start(group, plugged, prompt_logits=True)
            plain = [s for s in seqs if s.request.prompt_logprobs is None]
            if plain:
                self._start(plain, plugged)
        finally:  # whatever happened above, no request taken from the queue is left without an answer
            for handle in handles:
                if not handle.done and not any(seq.handle is handle for seq in self._running):
                    error = GenerationFailedError("the request could not start (see the server log)")
                    self._finish_handle(handle, ERROR, "", 0, {}, str(error), error)

    def _sequence(self, handle: RequestHandle, spec: RoutingSpec, now: float) -> _Sequence | None:
        """The engine's record of a request about to start (None: it could not start, and was finished)."""
        request = handle.request
        try:
            generator = request.sampling.generator(self.model.device)
            stop_ids = frozenset(self.eos_ids) | frozenset(request.sampling.stop_token_ids)
            stream = TextStream(self.tokenizer, request.stop, tuple(sorted(stop_ids)), request.text)
            seq = _Sequence(handle, spec, generator, stream, last_token_at=now, stop_ids=stop_ids)
            if request.grammar is not None:  # checked before queueing; a failure here fails this request only
                seq.matcher = self.grammars.matcher(request.grammar)
        except GrammarError as e:
            self._finish_handle(handle, ERROR, "", 0, {}, f"structured output failed: {e}")
            return None
        except Exception as e:  # this request cannot start; the others can
            logger.exception("cannot start a request")
            error = GenerationFailedError(f"the request could not start: {type(e).__name__}: {e}")
            self._finish_handle(handle, ERROR, "", 0, {}, str(error), error)
            return None
        return seq

    def _start(self, seqs: list[_Sequence], plugged: PluggedSet, prompt_logits: bool = False) -> None:
        """Prefill new sequences together, sample their first tokens, and join them to the running batch.

        prompt_logits: score every prompt token too (their requests asked for prompt logprobs). A prefill that
        raises is retried row by row, so a row that cannot be prefilled fails alone."""
        prompts = [s.request.prompt_ids for s in seqs]
        try:
            pre = prefill(self.model, prompts, [s.spec for s in seqs], plugged, prompt_logits=prompt_logits)
        except Exception as e:
            if len(seqs) > 1:
                logger.warning("prefill of %d requests failed (%s); retrying them one by one", len(seqs), e)
                for seq in seqs:
                    self._start([seq], plugged, prompt_logits)
                return
            logger.exception("prefill failed")
            error = GenerationFailedError(f"prefill failed: {type(e).__name__}: {e}")
            self._finish(seqs[0], ERROR, str(error), error)
            return
        self._count_layers(pre.layer_counts)
        for seq, spec, row_counts in zip(seqs, pre.specs, pre.row_counts, strict=True):
            seq.spec = spec
            add_counts(seq.counts, row_counts)
            if self.metrics:
                self.metrics.prompt_tokens.inc(len(seq.request.prompt_ids))
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
        keep = [
            row
            for row, seq, token, row_logprobs in zip(live, rows, tokens, logprobs, strict=True)
            if token is not None and not self._advance(seq, token, row_logprobs)
        ]
        for row in keep:
            seqs[row].slot = self._decoder.join(pre, row)
            self._running.append(seqs[row])

    def _sample(self, seqs: list[_Sequence], logits: torch.Tensor) -> tuple[list[int | None], list[Any]]:
        """Each row's next token (and logprobs) under its own sampling settings and grammar; grammars advance
        past it. A row whose sampling raises is finished with an error (token None) while the others are
        sampled alone, exactly as they would have been together."""
        try:
            sampled = self._sample_rows(seqs, logits)
            return list(sampled.tokens), list(sampled.logprobs)
        except Exception:
            logger.warning("sampling a batch of %d failed; sampling its rows one by one", len(seqs), exc_info=True)
        tokens: list[int | None] = []
        logprobs: list[Any] = []
        for row, seq in enumerate(seqs):
            try:
                one = self._sample_rows([seq], logits[row : row + 1])
                tokens.append(one.tokens[0])
                logprobs.append(one.logprobs[0])
            except Exception as e:
                logger.exception("sampling failed")
                error = GenerationFailedError(f"sampling failed: {type(e).__name__}: {e}")
                self._finish(seq, ERROR, str(error), error)
                tokens.append(None)
                logprobs.append(None)
        return tokens, logprobs

    def _sample_rows(self, seqs: list[_Sequence], logits: torch.Tensor) -> Sampled:
        matchers = [s.matcher for s in seqs]
        constrained = any(m is not None for m in matchers)
        allowed = self.grammars.allowed_tokens(matchers) if constrained else None
        sampled = sample_step(
            logits,
            [s.request.sampling for s in seqs],
            [s.generator for s in seqs],
            [len(s.generated) for s in seqs],
            self.eos_ids,
            prompts=[s.request.prompt_ids for s in seqs],
            outputs=[s.generated for s in seqs],
            allowed=allowed,
        )
        if constrained:
            advance(matchers, sampled.tokens, [s.stop_ids for s in seqs])
        return sampled

    def _decode(self) -> None:
        plugged = self.model.plugged
        keep: list[int] = []
        for row, seq in enumerate(self._running):
            if seq.handle.cancelled:
                self._finish(seq, CANCELLED, "the client went away")
                continue
            spec, message = _current_spec(seq.spec, plugged)
            if spec is None:
                self._finish(seq, EXPERT_UNPLUGGED, message)
                continue
            seq.spec = spec
            keep.append(row)
        self._drop(keep)
        if not self._running:
            return
        seqs = self._running
        out = decode_one_token(
            self._decoder, [s.slot for s in seqs], [s.generated[-1] for s in seqs], [s.spec for s in seqs]
        )
        self._count_layers(out.layer_counts)
        if self.metrics:
            self.metrics.batch_size.observe(len(seqs))
        tokens, logprobs = self._sample(seqs, out.logits)
        keep = []
        for row, (seq, token, row_logprobs, row_counts) in enumerate(
            zip(seqs, tokens, logprobs, out.row_counts, strict=True)
        ):
            add_counts(seq.counts, row_counts)
            if token is not None and not self._advance(seq, token, row_logprobs):
                keep.append(row)
        self._drop(keep)

    def _drop(self, keep: list[int]) -> None:
        """Keep these rows of the running batch (in order); free the decoder slots of the others."""
        if len(keep) != len(self._running):
            kept = set(keep)
            for row, seq in enumerate(self._running):
                if row not in kept:
                    self._decoder.leave(seq.slot)
            self._running = [self._running[row] for row in keep]

    def _drop_all(self) -> None:
        self._running = []
        self._decoder.reset()

    # --- per-token bookkeeping ------------------------------------------------------------------------

    def _advance(self, seq: _Sequence, token: int, logprobs: TokenLogprobs | None = None) -> bool:
        """Record a sampled token, stream its text, and finish the sequence if it is done. True: finished."""
        now = time.perf_counter()
        request = seq.request
        if self.metrics:
            self.metrics.generated_tokens.inc()
            if not seq.generated:
                self.metrics.time_to_first_token.observe(now - seq.handle.submitted)
            else:
                self.metrics.inter_token_latency.observe(now - seq.last_token_at)
        seq.last_token_at = now
        seq.generated.append(token)
        if request.sampling.logprobs is not None:
            seq.logprobs.append(logprobs)
        piece, stopped = seq.text.add(token)
        reason = STOP if stopped else None
        if reason is None and (
            len(seq.generated) >= request.max_new_tokens
            or len(request.prompt_ids) + len(seq.generated) >= self.context_limit
        ):
            reason, piece = LENGTH, piece + seq.text.flush()
        seq.handle.push(Event(piece, [token], logprobs=[logprobs] if request.sampling.logprobs is not None else []))
        if reason is None:
            return False
        self._finish(seq, reason, None)
        return True

    def _finish(self, seq: _Sequence, reason: str, message: str | None, error: Exception | None = None) -> None:
        if seq.done:
            return
        seq.done = True
        rest = seq.text.flush()
        if rest:
            seq.handle.push(Event(rest))
        self._finish_handle(
            seq.handle,
            reason,
            seq.text.text,
            len(seq.generated),
            seq.counts,
            message,
            error,
            token_ids=list(seq.generated),
            logprobs=list(seq.logprobs),
            prompt_logprobs=seq.prompt_logprobs,
        )

    def _finish_handle(
        self,
        handle: RequestHandle,
        reason: str,
        text: str,
        completion_tokens: int,
        counts: dict[str, float],
        message: str | None,
        error: Exception | None = None,
        token_ids: list[int] | None = None,
        logprobs: list[TokenLogprobs | None] | None = None,
        prompt_logprobs: list[TokenLogprobs | None] | None = None,
    ) -> None:
        if handle.done:
            return
        shares = route_shares(counts)
        entropy = routing_entropy(shares)
        if self.metrics and shares:
            plugged = self.model.plugged
            for route, share in shares.items():
                if route == BASE_ROUTE or route in plugged:  # never revive an unplugged expert's series
                    self.metrics.request_expert_share.labels(expert=route).observe(share)
            self.metrics.routing_entropy.observe(entropy)
        finished = Finished(
            reason,
            text,
            len(handle.request.prompt_ids),
            completion_tokens,
            shares,
            entropy,
            message,
            error,
            token_ids=token_ids or [],
            logprobs=logprobs or [],
            prompt_logprobs=prompt_logprobs,
        )
        handle.push(Event(finished=finished))

    def _count_layers(self, layer_counts: list[dict[str, float]]) -> None:
        for layer, counts in enumerate(layer_counts):
            for route, count in counts.items():
                if count:
                    if route != BASE_ROUTE:
                        self._routed_totals[route] = self._routed_totals.get(route, 0.0) + count
                    if self.metrics:
                        self.metrics.routed_tokens.labels(expert=route, layer=str(layer)).inc(count)

    def _set_gauges(self) -> None:
        if self.metrics:
            self.metrics.queue_depth.set(len(self._waiting))
            self.metrics.running_sequences.set(len(self._running))


def logits_width(model: RoutedModel) -> int:
    """V: the width of the model's logits (it may exceed the tokenizer's vocabulary)."""
    head = model.backbone.get_output_embeddings()
    if head is not None and getattr(head, "weight", None) is not None:
        return int(head.weight.shape[0])
    return int(model.backbone.config.vocab_size)


def _prompt_logit_groups(seqs: list[_Sequence], vocab: int) -> list[list[_Sequence]]:
    """Consecutive groups whose [rows, longest prompt, V] logits stay under PROMPT_LOGITS_BUDGET."""
    groups: list[list[_Sequence]] = []
    current: list[_Sequence] = []
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


def _current_spec(spec: RoutingSpec, plugged: PluggedSet) -> tuple[RoutingSpec | None, str | None]:
    """The spec to run this step, or (None, why) when its pinned expert is gone.

    A pinned (or sequence-chosen) expert that was unplugged ends the request; names in an allow-list that
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
