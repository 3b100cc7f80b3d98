"""The engine: one thread owns the model and runs the scheduler (moe.decode.scheduler) in a loop; around it, the
call queue, the HTTP side's submissions and the metrics.

    loop:
        run queued calls (set_experts, anything that touches the plugged set): between steps, never during one
        hand the requests submitted since the last step to the scheduler's waiting queue
        scheduler.step(): admit, prefill, join, decode one token for every running sequence, sample, stream,
            finish (every rule of a sequence's life is there)

Requests are submitted from the event loop (`submit_all`: its checks, the queue bound, the client's share of
sequences in flight, whose tag it sets on each request for the scheduler's round-robin) and read back through
an asyncio queue per request (server.requests.RequestHandle, the scheduler's SequenceOutput), so the HTTP layer
never blocks on the model. Metrics are read from the scheduler's report of each phase of a step (_EngineObserver).

compile_backend ("inductor"; the server's --compile-decode): the decode step is torch.compile'd once per routing
mode where no CUDA graph is captured (a CPU), its rows and KV columns dynamic sizes and the KV columns allocated for
the whole context up front, so nothing recompiles as rows grow or the batch changes size (graphs split at one row
and below the slot capacity); greedy tokens are the eager step's. Opt-in: it cut the engine's CPU per step to
~0.8x (demo model) and ~0.9x (GPT-2-124M shape) on one thread (bench/step_profile.py), but each graph compiles on
first use (demo ~20 s, 124M ~55 s with a cold inductor cache); a set routed by the context router compiles too (its
gates in the slots' gate columns). So the engine thread compiles them when it starts, before its loop
(StaticDecoder.warm_up_compiled: each routing mode's graph for the set as published, at 1 row, 2 and the first bucket
at or above the slot capacity), and `warming` is true until it is done: /ready answers 503 "warming" meanwhile, so no
request stalls on a first compile. A later plug compiles nothing while the set keeps its shapes and the way token mode
chooses (PluggedSet.context_form); one that changes them (the slots grow, a router with floors after one without)
compiles on first use.

`drain` (SIGTERM) lets running requests finish for a grace period and then ends them with an error; `stop`
always returns, and every request it took gets its finish event.

The engine thread should be the only live thread that has run torch's parallel ops: libgomp (torch's intra-op
pool) slows every pool once the process holds more pool threads than CPUs (see in_passing_thread). Torch work
that must run elsewhere (loading) runs in a thread that ends. The spin-wait itself is libgomp's: GOMP_SPINCOUNT
and OMP_WAIT_POLICY, read when the process starts (spinning wins on cores of its own, loses on shared ones).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import ctypes
import dataclasses
import logging
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any, TypeVar

from moe import BASE_ROUTE, Expert, PluggedSet, RoutedModel
from moe.decode.scheduler import Scheduler, SchedulerObserver, StepReport
from moe.decode.sequence import ERROR, GenerationFailedError, GenerationRequest, Sequence
from moe.decode.static_decoder import StaticDecoder, capture_refusal, context_length
from moe.decode.structured_output import GrammarCompiler
from server.metrics import Metrics
from server.requests import (
    ClientBusyError,
    ContextLimitError,
    EngineStoppedError,
    QueueFullError,
    RequestHandle,
    one_wakeup_per_loop,
)

logger = logging.getLogger(__name__)
ENGINE_THREAD = "plugmoe-engine"  # its name in Python and (Linux) in the OS: top -H, /proc, bench/peer.py


def name_os_thread(name: str) -> None:
    """Give the calling thread `name` in the OS too (Linux: prctl PR_SET_NAME, 15 bytes at most), so per-thread
    tools (top -H, /proc/<pid>/task/*/comm, bench/peer.py's cores by thread) tell it from torch's pool workers,
    which all carry the process's name. Elsewhere: nothing."""
    if sys.platform == "linux":
        ctypes.CDLL(None).prctl(15, name.encode()[:15], 0, 0, 0)  # 15: PR_SET_NAME


T = TypeVar("T")
_SHUTTING_DOWN = "the server is shutting down"


async def in_passing_thread(fn: Callable[..., T], *args: Any, name: str = "plugmoe-load") -> T:
    """Run fn(*args) in a thread of its own that ends when fn returns: torch work that must stay off the event
    loop and off the engine thread (loading the model, plugging the seed set).

    Why not asyncio.to_thread: torch's intra-op pool is OpenMP (libgomp), which keeps a pool of worker threads
    per thread that ever ran a parallel op, for as long as that thread lives. Once the process holds more such
    threads than it has CPUs, libgomp cuts its spin-wait from ~300,000 to 100 spins, for every pool: the
    engine's workers then sleep between ops and each op pays a wake-up. On 2 cores that left the engine
    thread 1.0-1.3 cores and 55-75% of the tokens/s it gets alone. A thread that ends frees its pool."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def body() -> None:
        try:
            result = fn(*args)
        except BaseException as e:  # handed to the awaiting caller
            loop.call_soon_threadsafe(_settle, future, None, e)
        else:
            loop.call_soon_threadsafe(_settle, future, result, None)

    threading.Thread(target=body, name=name, daemon=True).start()
    return await future


def _settle(future: asyncio.Future, result: Any, error: BaseException | None) -> None:
    if future.cancelled():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


class Engine:
    def __init__(
        self,
        model: RoutedModel,
        tokenizer: Any,
        *,
        max_batch_size: int = 16,
        max_queue: int = 64,
        max_prefill_tokens: int = 512,
        fair_share_ratio: int | None = None,
        context_limit: int | None = None,
        metrics: Metrics | None = None,
        cuda_graphs: bool = True,
        compile_backend: str | None = None,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.max_batch_size = max_batch_size
        self.max_queue = max_queue
        self.metrics = metrics
        refusal = capture_refusal(model) if cuda_graphs else "turned off"
        if cuda_graphs and refusal and model.device.type == "cuda":
            logger.warning("decode steps run eagerly: %s", refusal)
        capture = refusal is None
        if compile_backend and capture:
            logger.info("decode steps are captured as CUDA graphs; compile_backend %r is not used", compile_backend)
        decoder = StaticDecoder(
            model,
            max_batch_size,
            context_limit or context_length(model),
            capture=capture,
            compile_backend=None if capture else compile_backend,
        )
        self.scheduler = Scheduler(
            model,
            tokenizer,
            decoder,
            max_prefill_tokens=max_prefill_tokens,
            share_ratio=fair_share_ratio,
            observer=_EngineObserver(self),
        )
        self.context_limit = decoder.max_len  # less where sliding-window attention caps it
        self.vocab_size = self.scheduler.vocab_size  # tokens the model scores: the largest sensible top_k
        self._routed_totals: dict[str, float] = {}  # (token, layer) decisions per expert since it was plugged
        self._submitted: deque[Sequence] = deque()  # from the event loop; moved to the scheduler between steps
        self._handles: dict[str, list[RequestHandle]] = {}  # client tag -> its sequences in flight (submit_all)
        self._calls: deque[tuple[Callable[[], Any], concurrent.futures.Future]] = deque()
        self._wake = threading.Condition()
        self._stopping = False
        self._drain_deadline: float | None = None  # set by drain(): running requests end by then
        self._thread: threading.Thread | None = None
        self._warm = threading.Event()  # set once the decode steps are compiled (at once without compile_backend)

    # --- lifecycle ------------------------------------------------------------------------------------

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def warming(self) -> bool:
        """The engine thread is compiling its decode steps (compile_backend) and runs no step yet: not ready."""
        return self.alive and not self._warm.is_set()

    def start(self) -> None:
        self._stopping = False
        self._drain_deadline = None
        self._thread = threading.Thread(target=self._start_loop, name=ENGINE_THREAD, daemon=True)
        self._thread.start()

    def _start_loop(self) -> None:
        """The engine thread: compile the decode steps first (on this thread, whose OpenMP pool then runs them;
        see in_passing_thread), then the loop. Requests submitted meanwhile wait in the queue; however the thread
        ends (stopping, or a compile or anything no step should raise failed), every request still here gets its
        answer and every queued call its error."""
        name_os_thread(ENGINE_THREAD)
        try:
            if self._warm.is_set() or self._compile_steps():
                self._loop()
        finally:
            self._end()

    def _compile_steps(self) -> bool:
        """Whether the decode steps compiled. A failure is logged here and ends the engine thread (/ready says
        stopped, submissions get 503)."""
        decoder = self.scheduler.decoder
        started = time.perf_counter()
        try:
            steps = decoder.warm_up_compiled()
        except Exception:
            logger.exception("compiling the decode steps (compile_backend %r) failed", decoder.compile_backend)
            return False
        if steps:
            logger.info(
                "decode steps compiled before readiness in %.1f s (%s: routing mode x rows)",
                time.perf_counter() - started,
                ", ".join(f"{mode} x {rows}" for mode, rows in steps),
            )
        self._warm.set()
        return True

    def drain(self, grace_s: float) -> None:
        """Shutting down: refuse new requests (503), fail waiting ones, and give running ones `grace_s` to
        finish before they end with an error. Safe to call from any thread, more than once."""
        with self._wake:
            deadline = time.perf_counter() + grace_s
            if self._drain_deadline is None or deadline < self._drain_deadline:
                self._drain_deadline = deadline
            self._wake.notify_all()
        logger.info("draining: %d running requests have %.1f s to finish", self.running, grace_s)

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the loop; every request still queued or running gets its finish event. Always returns."""
        with self._wake:
            self._stopping = True
            self._wake.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                logger.error("the engine did not stop within %.1f s (a step is stuck); leaving it", timeout)
        self._refuse_waiting()

    # --- the HTTP side --------------------------------------------------------------------------------

    def submit(self, request: GenerationRequest) -> RequestHandle:
        """Queue a request (from the event loop). Raises QueueFullError, ContextLimitError, UnknownExpertError."""
        return self.submit_all([request])[0]

    def submit_all(
        self, requests: list[GenerationRequest], client: str = "", client_cap: int | None = None
    ) -> list[RequestHandle]:
        """Queue several sequences of one HTTP request (n choices, several prompts): all of them or none.

        client: who asks (an opaque tag: the server's API key or address), set on every request; the scheduler
        admits round-robin over clients. client_cap: sequences this client may have in flight (waiting or
        running) with these; past it ClientBusyError (429), and nothing is queued."""
        if client:
            requests = [dataclasses.replace(request, client=client) for request in requests]
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
        handles = [RequestHandle(request, loop) for request in requests]  # queued below, or dropped if refused
        with self._wake:
            in_flight = self._in_flight(client)
            if client_cap is not None and in_flight + len(requests) > client_cap:
                raise ClientBusyError(
                    f"this client has {in_flight} sequences in flight (waiting or running) and asks for "
                    f"{len(requests)} more; one client may have at most {client_cap} "
                    "(--max-sequences-per-client): retry when some have finished"
                )
            waiting, running = self.queue_depth, self.running
            if waiting + running + len(requests) > self.max_batch_size + self.max_queue:
                raise QueueFullError(
                    f"{waiting} requests are waiting and {running} running; "
                    f"the queue holds {self.max_queue} beyond a batch of {self.max_batch_size}"
                )
            self._handles.setdefault(client, []).extend(handles)
            self._submitted.extend(Sequence(handle.request, handle) for handle in handles)
            self._set_gauges()
            self._wake.notify_all()
        return handles

    def _in_flight(self, client: str) -> int:
        """Sequences of this client not finished yet; forgets every client's finished ones (a handle is done
        once its finish event is pushed, on the engine thread)."""
        for tag in list(self._handles):
            live = [handle for handle in self._handles[tag] if not handle.done]
            if live:
                self._handles[tag] = live
            else:
                del self._handles[tag]
        return len(self._handles.get(client, ()))

    @property
    def grammars(self) -> GrammarCompiler:
        """Structured output's compiler (routes check a grammar with it before submitting)."""
        return self.scheduler.grammars

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

    async def set_experts(self, experts: tuple[Expert, ...]) -> PluggedSet:
        """Swap the whole plugged set between two steps (an expert-set version at once). Experts that leave
        end the requests pinned to them with `expert_unplugged`; a new or replaced expert's routed-token
        count starts at 0."""

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
        return len(self._submitted) + len(self.scheduler.waiting)

    @property
    def running(self) -> int:
        return len(self.scheduler.running)

    # --- the loop -------------------------------------------------------------------------------------

    def _loop(self) -> None:
        logger.info(
            "engine started: batch %d, queue %d, context %d", self.max_batch_size, self.max_queue, self.context_limit
        )
        scheduler = self.scheduler
        while True:
            with self._wake:
                while not (self._stopping or self._calls or self._submitted or scheduler.busy):
                    self._wake.wait()
                if self._stopping:
                    break
            try:
                if self._calls:  # as the submissions below: a step with nothing queued pays no call
                    self._run_calls()
                if self._submitted:
                    with self._wake:  # under the lock: submit_all's queue bound counts each request once
                        scheduler.add(self._submitted)
                        self._submitted.clear()
                if self._drain_deadline is not None:
                    self._drain()
                scheduler.step()  # a sequence's faults stay in it; this catches the rest
            except Exception as e:  # a failed step must not kill the engine: fail the batch, go on
                logger.exception("engine step failed")
                error = GenerationFailedError(f"generation failed: {type(e).__name__}: {e}")
                scheduler.finish_running(ERROR, str(error), error)

    def _end(self) -> None:
        """The engine thread ends: every request still here gets its answer, every queued call its error."""
        self.scheduler.finish_running(ERROR, _SHUTTING_DOWN, EngineStoppedError(_SHUTTING_DOWN))
        self._refuse_waiting()
        with self._wake:
            calls = list(self._calls)
            self._calls.clear()
        for _, future in calls:
            if not future.done():
                future.set_exception(EngineStoppedError("the engine stopped"))
        self._set_gauges()
        logger.info("engine stopped")

    def _refuse_waiting(self) -> None:
        """Finish every request not yet started with an error (shutting down)."""
        with self._wake:
            self.scheduler.add(self._submitted)
            self._submitted.clear()
        self.scheduler.finish_waiting(ERROR, _SHUTTING_DOWN, EngineStoppedError(_SHUTTING_DOWN))

    def _drain(self) -> None:
        """While draining: waiting requests are refused; running ones end at the deadline."""
        self._refuse_waiting()
        if self.running and self._drain_deadline is not None and time.perf_counter() >= self._drain_deadline:
            self.scheduler.finish_running(ERROR, _SHUTTING_DOWN, EngineStoppedError(_SHUTTING_DOWN))

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

    def _set_gauges(self) -> None:
        """The queue and batch gauges as they are now (submit_all, each phase's report, the loop's end)."""
        if self.metrics:
            self.metrics.queue_depth.set(self.queue_depth)
            self.metrics.running_sequences.set(self.running)


class _EngineObserver(SchedulerObserver):
    """The scheduler's reports -> the engine's routed-token totals and the Prometheus metrics, the queue and batch
    gauges included (one call per phase of a step, before that phase's tokens reach their clients: a client that
    has its finish reads gauges that count it out). Every change to the waiting queue or the batch comes with a
    report (a token, a preemption or a finish), so the gauges follow each phase. Per step, not per token where a
    sum does: the generated-token counter moves once per phase, and the routed-token series are looked up once per
    plugged set (a label lookup takes the metric's lock; a step touches every route on every layer)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._series: dict[tuple[str, int], Any] = {}  # (route, layer) -> its routed_tokens child
        self._series_version = -1  # the plugged set's version the children were looked up under

    def _routed_series(self, route: str, layer: int) -> Any:
        """routed_tokens' child of (route, layer), looked up again after every plug or unplug (an unplugged
        expert's series is removed from the metric: a child kept past that would count into nothing)."""
        metrics = self.engine.metrics
        assert metrics is not None
        version = self.engine.model.slots.version
        if version != self._series_version:
            self._series.clear()
            self._series_version = version
        child = self._series.get((route, layer))
        if child is None:
            child = self._series[(route, layer)] = metrics.routed_tokens.labels(expert=route, layer=str(layer))
        return child

    def pushing(self) -> contextlib.AbstractContextManager[None]:
        """A phase's events wake each event loop once (server.requests.one_wakeup_per_loop)."""
        return one_wakeup_per_loop()

    def stepped(self, report: StepReport) -> None:
        totals, metrics = self.engine._routed_totals, self.engine.metrics
        for layer_counts in report.routed:
            for layer, counts in enumerate(layer_counts):
                for route, count in counts.items():
                    if count:
                        if route != BASE_ROUTE:
                            totals[route] = totals.get(route, 0.0) + count
                        if metrics:
                            self._routed_series(route, layer).inc(count)
        if not metrics:
            return
        self.engine._set_gauges()
        for seq in report.prefilled:
            metrics.prompt_tokens.inc(len(seq.request.prompt_ids))
        if report.decoded:
            metrics.batch_size.observe(report.decoded)
        if report.tokens:
            metrics.generated_tokens.inc(len(report.tokens))
        now = time.perf_counter()
        first, later = metrics.time_to_first_token, metrics.inter_token_latency
        for seq in report.tokens:
            handle: Any = seq.output  # the RequestHandle submit_all gave it
            if len(seq.token_ids) == 1:
                first.observe(now - handle.submitted)
            else:
                later.observe(now - handle.last_token_at)
            handle.last_token_at = now
        plugged = self.engine.model.plugged if report.finished else None
        for seq in report.finished:
            done = seq.finished
            if done is not None and done.shares:
                for route, share in done.shares.items():
                    # never revive an unplugged expert's series
                    if route == BASE_ROUTE or route in plugged.slot_by_name:
                        metrics.request_expert_share.labels(expert=route).observe(share)
                metrics.routing_entropy.observe(done.routing_entropy)
