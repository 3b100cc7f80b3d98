"""The engine: one thread owns the model and runs continuous batching.

    loop:
        run queued calls (plug, unplug, admission reports): between steps, never during one
        admit waiting requests up to max_batch_size: prefill them together, sample their first token,
            and join them to the running batch (moe.generation.DecodeBatch.extend)
        one decode step for every running sequence, each with its own routing and sampling settings
        emit each new token to its request's asyncio queue; drop finished and cancelled rows

Requests are submitted from the event loop and read back through an asyncio queue per request, so
the HTTP layer never blocks on the model. Tensor work lives in moe.generation and moe.sampling.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import logging
import math
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from moe import BASE_ROUTE, PluggedSet, RoutedModel, RoutingSpec
from moe.generation import DecodeBatch, StepOutput
from moe.router import decide_sequence
from moe.sampling import SamplingParams, sample
from server.metrics import Metrics

logger = logging.getLogger(__name__)
T = TypeVar("T")

STOP, LENGTH, EXPERT_UNPLUGGED, CANCELLED, ERROR = "stop", "length", "expert_unplugged", "cancelled", "error"


class QueueFullError(RuntimeError):
    """Too many requests waiting; the client should retry later."""


class ContextLimitError(ValueError):
    """A prompt that does not fit the model's context."""


class EngineStoppedError(RuntimeError):
    """The engine is not running (starting up or shutting down)."""


@dataclass(frozen=True)
class GenerationRequest:
    prompt_ids: list[int]
    max_new_tokens: int
    sampling: SamplingParams = SamplingParams()
    stop: tuple[str, ...] = ()
    routing: RoutingSpec = RoutingSpec()


@dataclass
class Finished:
    """The end of a request: why, and its accounting."""

    reason: str
    text: str
    prompt_tokens: int
    completion_tokens: int
    shares: dict[str, float]
    routing_entropy: float
    message: str | None = None


@dataclass
class Event:
    """One streamed piece: new text (possibly empty), or the last event with `finished` set."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finished: Finished | None = None


class RequestHandle:
    """The HTTP side of one request: its event queue, and a way to cancel it."""

    def __init__(self, request_id: int, request: GenerationRequest, loop: asyncio.AbstractEventLoop) -> None:
        self.id = request_id
        self.request = request
        self.submitted = time.perf_counter()
        self._loop = loop
        self._queue: asyncio.Queue[Event] = asyncio.Queue()
        self._cancelled = threading.Event()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def cancel(self) -> None:
        """The client is gone: the engine frees the slot at its next step."""
        self._cancelled.set()

    def push(self, event: Event) -> None:
        """From the engine thread."""
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, event)
        except RuntimeError:  # the event loop is closed: nobody is listening any more
            self._cancelled.set()

    async def events(self) -> AsyncIterator[Event]:
        while True:
            event = await self._queue.get()
            yield event
            if event.finished is not None:
                return

    async def result(self) -> Finished:
        async for event in self.events():
            if event.finished is not None:
                return event.finished
        raise AssertionError("stream ended without a finish event")


@dataclass
class _Sequence:
    """A running request, as the engine tracks it."""

    handle: RequestHandle
    spec: RoutingSpec
    generator: Any
    counts: dict[str, float] = field(default_factory=dict)
    generated: list[int] = field(default_factory=list)
    emitted: int = 0  # characters of text already sent
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
        self.context_limit = context_limit or model_context_limit(model)
        self.metrics = metrics
        self.eos_ids = _eos_ids(model, tokenizer)
        self.routed_totals: dict[str, float] = {}  # (token, layer) decisions per expert since it was plugged
        self._waiting: deque[RequestHandle] = deque()
        self._calls: deque[tuple[Callable[[], Any], concurrent.futures.Future]] = deque()
        self._running: list[_Sequence] = []
        self._batch = DecodeBatch()
        self._wake = threading.Condition()
        self._ids = itertools.count(1)
        self._stopping = False
        self._thread: threading.Thread | None = None

    # --- lifecycle ------------------------------------------------------------------------------------

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> None:
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="plugmoe-engine", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        with self._wake:
            self._stopping = True
            self._wake.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
        for handle in list(self._waiting):
            self._finish_handle(handle, ERROR, "", 0, {}, "the server is shutting down")
        self._waiting.clear()

    # --- the HTTP side --------------------------------------------------------------------------------

    def submit(self, request: GenerationRequest) -> RequestHandle:
        """Queue a request (from the event loop). Raises QueueFullError, ContextLimitError, UnknownExpertError."""
        if not self.alive:
            raise EngineStoppedError("the engine is not running")
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
            handle = RequestHandle(next(self._ids), request, asyncio.get_running_loop())
            self._waiting.append(handle)
            self._set_gauges()
            self._wake.notify_all()
        return handle

    def call(self, fn: Callable[[], T]) -> concurrent.futures.Future[T]:
        """Run fn on the engine thread between two steps (plug, unplug, anything that runs the model)."""
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
        while True:
            with self._wake:
                while not (self._stopping or self._calls or self._waiting or self._running):
                    self._wake.wait()
                if self._stopping:
                    break
            try:
                self._run_calls()
                self._admit()
                if self._running:
                    self._decode()
            except Exception as e:  # a failed step must not kill the engine: fail the batch, go on
                logger.exception("engine step failed")
                for seq in self._running:
                    self._finish(seq, ERROR, f"generation failed: {type(e).__name__}: {e}")
                self._running, self._batch = [], DecodeBatch()
            self._set_gauges()
        for seq in self._running:
            self._finish(seq, ERROR, "the server is shutting down")
        self._running, self._batch = [], DecodeBatch()
        while self._calls:
            self._calls.popleft()[1].set_exception(EngineStoppedError("the engine stopped"))
        logger.info("engine stopped")

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
            seqs.append(
                _Sequence(handle, spec, handle.request.sampling.generator(self.model.device), last_token_at=now)
            )
        if not seqs:
            return
        try:
            self._start(seqs, plugged)
        except Exception as e:  # these requests fail; the running batch goes on
            logger.exception("prefill failed")
            for seq in seqs:
                if not seq.done and seq not in self._running:
                    self._finish(seq, ERROR, f"prefill failed: {type(e).__name__}: {e}")

    def _start(self, seqs: list[_Sequence], plugged: PluggedSet) -> None:
        """Prefill new sequences together, sample their first tokens, and join them to the running batch."""
        observe = [s.spec.mode == "sequence" and s.spec.expert is None for s in seqs]
        batch, out = DecodeBatch.prefill(
            self.model, [s.request.prompt_ids for s in seqs], [s.spec for s in seqs], plugged, observe
        )
        logits = [out.logits[i] for i in range(len(seqs))]
        counts = list(out.row_counts)
        self._count_layers(out)
        if any(observe):
            batch, seqs, logits, counts = self._decide_sequences(batch, seqs, logits, counts, observe, plugged)
        for seq, row_counts in zip(seqs, counts, strict=True):
            _add(seq.counts, row_counts)
            if self.metrics:
                self.metrics.prompt_tokens.inc(len(seq.request.prompt_ids))
        tokens = sample(
            logits, [s.request.sampling for s in seqs], [s.generator for s in seqs], [0] * len(seqs), self.eos_ids
        )
        keep = [row for row, (seq, token) in enumerate(zip(seqs, tokens, strict=True)) if not self._advance(seq, token)]
        batch.keep(keep)
        self._batch.extend(batch)
        self._running.extend(seqs[row] for row in keep)

    def _decide_sequences(
        self,
        batch: DecodeBatch,
        seqs: list[_Sequence],
        logits: list,
        counts: list[dict[str, float]],
        observe: list[bool],
        plugged: PluggedSet,
    ) -> tuple[DecodeBatch, list[_Sequence], list, list[dict[str, float]]]:
        """Sequence mode: the prompt's observed decisions pick one expert (or base) for the whole sequence.
        Rows that chose an expert are prefilled again with it; rows that chose base keep the exact cache."""
        names = plugged.names
        redo: list[int] = []
        for row, seq in enumerate(seqs):
            if not observe[row]:
                continue
            decision = decide_sequence(counts[row], names, self.model.router.sequence_min_share)
            seq.spec = RoutingSpec("sequence", expert=decision, allow=seq.spec.allow)
            if decision == BASE_ROUTE:
                # observed decisions were never applied: the prompt ran on the backbone alone
                counts[row] = {BASE_ROUTE: sum(counts[row].values())}
            else:
                redo.append(row)
        if not redo:
            return batch, seqs, logits, counts
        stay = [row for row in range(len(seqs)) if row not in redo]
        batch.keep(stay)
        again, out = DecodeBatch.prefill(
            self.model, [seqs[r].request.prompt_ids for r in redo], [seqs[r].spec for r in redo], plugged
        )
        self._count_layers(out)
        batch.extend(again)
        order = stay + redo
        redone = dict(zip(redo, range(len(redo)), strict=True))
        new_logits = [logits[r] if r not in redone else out.logits[redone[r]] for r in order]
        new_counts = [counts[r] if r not in redone else out.row_counts[redone[r]] for r in order]
        return batch, [seqs[r] for r in order], new_logits, new_counts

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
        out = self._batch.step(self.model, [s.generated[-1] for s in seqs], [s.spec for s in seqs], plugged)
        self._count_layers(out)
        if self.metrics:
            self.metrics.batch_size.observe(len(seqs))
        tokens = sample(
            out.logits,
            [s.request.sampling for s in seqs],
            [s.generator for s in seqs],
            [len(s.generated) for s in seqs],
            self.eos_ids,
        )
        keep = []
        for row, (seq, token, row_counts) in enumerate(zip(seqs, tokens, out.row_counts, strict=True)):
            _add(seq.counts, row_counts)
            if not self._advance(seq, token):
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
        reason: str | None = None
        if token in self.eos_ids:
            reason = STOP
            text = self._text(seq.generated[:-1])
        else:
            text = self._text(seq.generated)
        cut = _find_stop(text, request.stop, seq.emitted)
        if cut is not None:
            text, reason = text[:cut], STOP
        if reason is None and (
            len(seq.generated) >= request.max_new_tokens
            or len(request.prompt_ids) + len(seq.generated) >= self.context_limit
        ):
            reason = LENGTH
        if reason is None:
            # hold back an incomplete character and anything that may grow into a stop string
            ready = len(text) - _held_back(text, request.stop)
            if text.endswith("\ufffd"):
                ready = min(ready, len(text) - 1)
            seq.handle.push(Event(text[seq.emitted : ready] if ready > seq.emitted else "", [token]))
            seq.emitted = max(seq.emitted, ready)
            return False
        seq.handle.push(Event(text[seq.emitted :], [token]))
        seq.emitted = max(seq.emitted, len(text))
        self._finish(seq, reason, None, text)
        return True

    def _text(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def _finish(self, seq: _Sequence, reason: str, message: str | None, text: str | None = None) -> None:
        if seq.done:
            return
        seq.done = True
        if text is None:
            text = self._text([t for t in seq.generated if t not in self.eos_ids])
            if len(text) > seq.emitted and reason in (CANCELLED, EXPERT_UNPLUGGED, ERROR):
                seq.handle.push(Event(text[seq.emitted :]))
        self._finish_handle(seq.handle, reason, text, len(seq.generated), seq.counts, message)

    def _finish_handle(
        self,
        handle: RequestHandle,
        reason: str,
        text: str,
        completion_tokens: int,
        counts: dict[str, float],
        message: str | None,
    ) -> None:
        shares = route_shares(counts)
        entropy = routing_entropy(shares)
        if self.metrics and shares:
            plugged = self.model.plugged
            for route, share in shares.items():
                if route == BASE_ROUTE or route in plugged:  # never revive an unplugged expert's series
                    self.metrics.request_expert_share.labels(expert=route).observe(share)
            self.metrics.routing_entropy.observe(entropy)
        handle.push(
            Event(
                finished=Finished(
                    reason, text, len(handle.request.prompt_ids), completion_tokens, shares, entropy, message
                )
            )
        )

    def _count_layers(self, out: StepOutput) -> None:
        for layer, counts in enumerate(out.layer_counts):
            for route, count in counts.items():
                if count:
                    if route != BASE_ROUTE:
                        self.routed_totals[route] = self.routed_totals.get(route, 0.0) + count
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


def _add(total: dict[str, float], counts: dict[str, float]) -> None:
    for route, count in counts.items():
        total[route] = total.get(route, 0.0) + count


def route_shares(counts: dict[str, float]) -> dict[str, float]:
    """Each route's fraction of the (token, layer) decisions; base always present."""
    total = sum(counts.values())
    if total <= 0:
        return {BASE_ROUTE: 1.0} if counts else {}
    shares = {route: count / total for route, count in counts.items() if route != BASE_ROUTE}
    shares[BASE_ROUTE] = counts.get(BASE_ROUTE, 0.0) / total
    return shares


def routing_entropy(shares: dict[str, float]) -> float:
    """Entropy in bits of the route shares (0: one route took everything)."""
    return max(0.0, -sum(p * math.log2(p) for p in shares.values() if p > 0))


def _find_stop(text: str, stops: tuple[str, ...], emitted: int) -> int | None:
    """Index where the earliest stop string starts in the not-yet-final part of text, or None."""
    best: int | None = None
    for stop in stops:
        index = text.find(stop, max(0, emitted - len(stop) + 1))
        if index >= 0 and (best is None or index < best):
            best = index
    return best


def _held_back(text: str, stops: tuple[str, ...]) -> int:
    """Length of the longest suffix of text that is a proper prefix of a stop string."""
    held = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), held, -1):
            if stop.startswith(text[-n:]):
                held = n
                break
    return held


def _eos_ids(model: RoutedModel, tokenizer: Any) -> tuple[int, ...]:
    ids: set[int] = set()
    for source in (getattr(model.backbone, "generation_config", None), model.backbone.config, tokenizer):
        value = getattr(source, "eos_token_id", None)
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, list | tuple):
            ids.update(int(v) for v in value)
    return tuple(sorted(ids))


def model_context_limit(model: RoutedModel) -> int:
    config = model.backbone.config
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return 2048
