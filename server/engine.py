"""The engine: one thread owns the model and schedules continuous batching. It schedules; it does not route.

    loop:
        run queued calls (plug, unplug, anything that touches the plugged set): between steps, never during one
        admit waiting requests up to max_batch_size: moe.generation.prefill them together (sequence mode is
            decided there), sample their first tokens, and join them to the running batch
        one moe.generation.decode_one_token for every running sequence, each with its own routing and sampling
        emit each new token's text (server.text_stream) to its request's queue; drop finished and cancelled rows

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

from moe import BASE_ROUTE, Expert, PluggedSet, RoutedModel, RoutingSpec, route_shares, routing_entropy
from moe.generation import DecodeBatch, context_length, decode_one_token, eos_token_ids, prefill
from moe.sampling import sample
from moe.trace import add_counts
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


@dataclass
class _Sequence:
    """A running request, as the engine tracks it."""

    handle: RequestHandle
    spec: RoutingSpec
    generator: Any
    text: TextStream
    counts: dict[str, float] = field(default_factory=dict)
    generated: list[int] = field(default_factory=list)
    done: bool = False
    last_token_at: float = 0.0

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
        context_limit: int | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.max_batch_size = max_batch_size
        self.max_queue = max_queue
        self.context_limit = context_limit or context_length(model)
        self.metrics = metrics
        self.eos_ids = eos_token_ids(model, tokenizer)
        self._routed_totals: dict[str, float] = {}  # (token, layer) decisions per expert since it was plugged
        self._waiting: deque[RequestHandle] = deque()
        self._calls: deque[tuple[Callable[[], Any], concurrent.futures.Future]] = deque()
        self._running: list[_Sequence] = []
        self._batch = DecodeBatch()
        self._wake = threading.Condition()
        self._stopping = False
        self._drain_deadline: float | None = None  # set by drain(): running requests end by then
        self._thread: threading.Thread | None = None

    # --- lifecycle ------------------------------------------------------------------------------------

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def vocab_size(self) -> int:
        """Tokens the model scores (the logits' width): the largest sensible top_k."""
        return int(self.model.fingerprint.vocab_size)

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
        if not self.alive:
            raise EngineStoppedError("the engine is not running")
        if self._drain_deadline is not None:
            raise EngineStoppedError(_SHUTTING_DOWN)
        if not request.prompt_ids:
            raise ContextLimitError("the prompt is empty; send at least one token")
        if len(request.prompt_ids) >= self.context_limit:
            raise ContextLimitError(
                f"the prompt has {len(request.prompt_ids)} tokens; the context limit is {self.context_limit} "
                "tokens including at least one generated token"
            )
        request.routing.check_against(self.model.plugged)
        with self._wake:
            if len(self._waiting) + len(self._running) >= self.max_batch_size + self.max_queue:
                raise QueueFullError(
                    f"{len(self._waiting)} requests are waiting and {len(self._running)} running; "
                    f"the queue holds {self.max_queue} beyond a batch of {self.max_batch_size}"
                )
            handle = RequestHandle(request, asyncio.get_running_loop())
            self._waiting.append(handle)
            self._set_gauges()
            self._wake.notify_all()
        return handle

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
                    self._running, self._batch = [], DecodeBatch()
                self._set_gauges()
        finally:  # stopping, or something no step should raise: every request still here gets its answer
            for seq in self._running:
                self._finish(seq, ERROR, _SHUTTING_DOWN, EngineStoppedError(_SHUTTING_DOWN))
            self._running, self._batch = [], DecodeBatch()
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
            self._running, self._batch = [], DecodeBatch()

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
        handles: list[RequestHandle] = []
        with self._wake:
            while self._waiting and len(self._running) + len(handles) < self.max_batch_size:
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
                try:
                    generator = handle.request.sampling.generator(self.model.device)
                    stream = TextStream(self.tokenizer, handle.request.stop, self.eos_ids)
                except Exception as e:  # this request cannot start; the others can
                    logger.exception("cannot start a request")
                    error = GenerationFailedError(f"the request could not start: {type(e).__name__}: {e}")
                    self._finish_handle(handle, ERROR, "", 0, {}, str(error), error)
                    continue
                seqs.append(_Sequence(handle, spec, generator, stream, last_token_at=now))
            if seqs:
                self._start(seqs, plugged)
        finally:  # whatever happened above, no request taken from the queue is left without an answer
            for handle in handles:
                if not handle.done and not any(seq.handle is handle for seq in self._running):
                    error = GenerationFailedError("the request could not start (see the server log)")
                    self._finish_handle(handle, ERROR, "", 0, {}, str(error), error)

    def _start(self, seqs: list[_Sequence], plugged: PluggedSet) -> None:
        """Prefill new sequences together, sample their first tokens, and join them to the running batch.

        A prefill that raises is retried row by row, so a row that cannot be prefilled fails alone."""
        try:
            pre = prefill(self.model, [s.request.prompt_ids for s in seqs], [s.spec for s in seqs], plugged)
        except Exception as e:
            if len(seqs) > 1:
                logger.warning("prefill of %d requests failed (%s); retrying them one by one", len(seqs), e)
                for seq in seqs:
                    self._start([seq], plugged)
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
        tokens = self._sample(pre.logits, seqs)
        keep = [
            row
            for row, (seq, token) in enumerate(zip(seqs, tokens, strict=True))
            if token is not None and not self._advance(seq, token)
        ]
        pre.batch.keep(keep)
        self._batch.extend(pre.batch)
        self._running.extend(seqs[row] for row in keep)

    def _sample(self, logits: torch.Tensor, seqs: list[_Sequence]) -> list[int | None]:
        """Each row's next token; a row whose sampling raises is finished with an error (None here) while
        the others are sampled alone, exactly as they would have been together."""
        params = [s.request.sampling for s in seqs]
        generators = [s.generator for s in seqs]
        steps = [len(s.generated) for s in seqs]
        try:
            return list(sample(logits, params, generators, steps, self.eos_ids))
        except Exception:
            logger.warning("sampling a batch of %d failed; sampling its rows one by one", len(seqs), exc_info=True)
        tokens: list[int | None] = []
        for row, seq in enumerate(seqs):
            try:
                tokens.append(
                    sample(
                        logits[row : row + 1],
                        params[row : row + 1],
                        generators[row : row + 1],
                        steps[row : row + 1],
                        self.eos_ids,
                    )[0]
                )
            except Exception as e:
                logger.exception("sampling failed")
                error = GenerationFailedError(f"sampling failed: {type(e).__name__}: {e}")
                self._finish(seq, ERROR, str(error), error)
                tokens.append(None)
        return tokens

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
            self.model, self._batch, [s.generated[-1] for s in seqs], [s.spec for s in seqs], plugged
        )
        self._count_layers(out.layer_counts)
        if self.metrics:
            self.metrics.batch_size.observe(len(seqs))
        tokens = self._sample(out.logits, seqs)
        keep = []
        for row, (seq, token, row_counts) in enumerate(zip(seqs, tokens, out.row_counts, strict=True)):
            add_counts(seq.counts, row_counts)
            if token is not None and not self._advance(seq, token):
                keep.append(row)
        self._drop(keep)

    def _drop(self, keep: list[int]) -> None:
        if len(keep) != len(self._running):
            self._batch.keep(keep)
            self._running = [self._running[row] for row in keep]

    # --- per-token bookkeeping ------------------------------------------------------------------------

    def _advance(self, seq: _Sequence, token: int) -> bool:
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
        piece, stopped = seq.text.add(token)
        reason = STOP if stopped else None
        if reason is None and (
            len(seq.generated) >= request.max_new_tokens
            or len(request.prompt_ids) + len(seq.generated) >= self.context_limit
        ):
            reason, piece = LENGTH, piece + seq.text.flush()
        seq.handle.push(Event(piece, [token]))
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
        self._finish_handle(seq.handle, reason, seq.text.text, len(seq.generated), seq.counts, message, error)

    def _finish_handle(
        self,
        handle: RequestHandle,
        reason: str,
        text: str,
        completion_tokens: int,
        counts: dict[str, float],
        message: str | None,
        error: Exception | None = None,
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
            reason, text, len(handle.request.prompt_ids), completion_tokens, shares, entropy, message, error
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
