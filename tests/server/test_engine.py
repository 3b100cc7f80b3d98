"""The engine driven directly with a tiny model, no HTTP: events, continuous batching, cancelling, plugging and
unplugging between steps (set_experts) while requests run, the queue and the context limit, and failures. The
scheduler's own rules (admission budget, prompt logprobs, EOS, stop strings, rows that fail alone) are tested
without a thread in tests/moe/decode/test_scheduler.py.

Engine.submit is called from an event loop (as the HTTP layer calls it), so each test runs one with asyncio.run.
To act "between two steps" deterministically a test holds the engine thread with a queued call (Engine.call
runs it between steps) and queues the action behind it."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from fastapi.testclient import TestClient
from torch._dynamo.utils import counters

from moe import Expert, PluggedSet, RoutedModel, RoutingSpec, UnknownExpertError
from moe.decode import scheduler as scheduler_module
from moe.decode.generation import generate
from moe.decode.sampling import SamplingParams
from moe.decode.sequence import (
    CANCELLED,
    ERROR,
    EXPERT_UNPLUGGED,
    LENGTH,
    Event,
    Finished,
    GenerationFailedError,
    GenerationRequest,
)
from server.engine import Engine
from server.metrics import Metrics
from server.requests import ContextLimitError, EngineStoppedError, QueueFullError
from tests.server.conftest import LiveServer
from tests.tiny import VOCAB, tiny_backbone, tiny_expert, tiny_tokenizer

PROMPT = "The quick brown fox"
OTHER = "def add(a, b):"


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture
def make_engine(tokenizer) -> Iterator[Callable[..., Engine]]:
    """make_engine(model=None, **Engine options) -> a started engine on `model` (None: a fresh tiny model); stopped
    after the test."""
    engines: list[Engine] = []

    def make(model: RoutedModel | None = None, **options: Any) -> Engine:
        engine = Engine(model or RoutedModel(tiny_backbone("llama", vocab=len(tokenizer))), tokenizer, **options)
        engine.start()
        engines.append(engine)
        return engine

    yield make
    for engine in engines:
        engine.stop()


def request(tokenizer, prompt: str = PROMPT, tokens: int = 8, routing: RoutingSpec | None = None) -> GenerationRequest:
    """Greedy, exactly `tokens` new tokens (EOS blocked until then)."""
    return GenerationRequest(
        tokenizer.encode(prompt), tokens, SamplingParams(min_new_tokens=tokens), routing=routing or RoutingSpec()
    )


def alone(engine: Engine, prompt: str, tokens: int, spec: RoutingSpec | None = None) -> list[int]:
    """The tokens moe.decode.generation.generate gives for one prompt by itself (call while the engine is idle)."""
    params = [SamplingParams(min_new_tokens=tokens)]
    return generate(engine.model, engine.tokenizer, [prompt], spec or RoutingSpec(), tokens, params)[0].token_ids


async def finish(events: Any) -> tuple[list[Event], Finished]:
    """Read a request's events to the end: (every event, its Finished)."""
    seen = [event async for event in events]
    assert seen[-1].finished is not None and all(e.finished is None for e in seen[:-1])
    return seen, seen[-1].finished


def token_ids(events: list[Event]) -> list[int]:
    return [token for event in events for token in event.token_ids]


async def between_steps(engine: Engine, action: Awaitable[Any]) -> tuple[int, Any]:
    """Hold the engine thread between two steps, queue `action` (plug / unplug below: Engine.set_experts) behind
    the hold, release. Returns (sequences running when the action ran, its result): no step runs between the hold
    and the action."""
    gate, running = threading.Event(), []
    engine.call(lambda: (running.append(engine.running), gate.wait()))
    task = asyncio.ensure_future(action)
    await asyncio.sleep(0)  # the task runs up to its wait for the engine: its call is queued behind the hold
    gate.set()
    result = await task
    return running[0], result


def plug(engine: Engine, expert: Expert) -> Awaitable[PluggedSet]:
    """engine.set_experts with `expert` added (or replacing the plugged one of its name)."""
    kept = tuple(e for e in engine.model.plugged.experts if e.name != expert.name)
    return engine.set_experts((*kept, expert))


def unplug(engine: Engine, name: str) -> Awaitable[PluggedSet]:
    """engine.set_experts without the expert called `name`."""
    return engine.set_experts(tuple(e for e in engine.model.plugged.experts if e.name != name))


def hold(engine: Engine) -> threading.Event:
    """Stop the engine thread between two steps until the returned event is set."""
    gate = threading.Event()
    engine.call(gate.wait)
    return gate


# --- a request's events -------------------------------------------------------------------------------------


def test_submit_streams_one_event_per_token_then_finished(make_engine, tokenizer) -> None:
    engine = make_engine()
    want = alone(engine, PROMPT, 8)

    async def main() -> tuple[list[Event], Finished]:
        return await finish(engine.submit(request(tokenizer, tokens=8)).events())

    events, done = asyncio.run(main())
    tokens = [e for e in events if e.token_ids]
    assert all(len(e.token_ids) == 1 for e in tokens) and len(tokens) == 8
    assert token_ids(events) == want
    assert "".join(e.text for e in events) == done.text == tokenizer.decode(want, skip_special_tokens=True)
    assert (done.reason, done.prompt_tokens, done.completion_tokens) == (LENGTH, len(tokenizer.encode(PROMPT)), 8)
    assert done.shares == {"base": 1.0} and done.routing_entropy == 0.0 and done.message is None
    assert asyncio.run(engine.run(lambda: (engine.running, engine.queue_depth))) == (0, 0), "by the next step"


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="per-thread names from /proc (Linux)")
def test_the_engine_thread_carries_its_name_in_the_os(make_engine) -> None:
    """Per-thread tools (top -H, /proc, bench/peer.py) tell the engine thread from torch's pool workers."""
    engine = make_engine()
    tid = asyncio.run(engine.run(threading.get_native_id))
    assert Path(f"/proc/self/task/{tid}/comm").read_text().strip() == "plugmoe-engine"
    assert Path(f"/proc/self/task/{threading.get_native_id()}/comm").read_text().strip() != "plugmoe-engine"


def _compiled_engine_equals_eager(make_engine, tokenizer, backend: str) -> None:
    """An engine whose decode steps are torch.compile'd gives each request the tokens it gets alone, eagerly: two
    requests at once, token routing with an expert that wins every token, routing off beside it. It compiles every
    routing mode's step when it starts (warming until then), and a plug that leaves the step's shapes alone (a slot
    free, the storage's rank as it is: a seed expert of that rank was plugged before the start, as a server plugs its
    stored set) and the requests compile nothing more."""
    torch._dynamo.reset()
    counters.clear()
    model = RoutedModel(tiny_backbone("llama", vocab=len(tokenizer)))
    model.plug(tiny_expert("seed", seed=5))  # closed gate (threshold None): never wins a token
    engine = make_engine(model=model, compile_backend=backend, max_batch_size=2)
    deadline = time.monotonic() + 600
    while engine.warming and time.monotonic() < deadline:
        time.sleep(0.05)
    assert engine.alive and not engine.warming
    compiled = {mode for mode, _ in engine.scheduler.decoder._compiled}
    assert compiled == {"off", "token", "rows"}, "each routing mode's step, at start"
    graphs = counters["stats"]["unique_graphs"]
    assert graphs == 6, "three modes at one row and at two (the rows a dynamic size from there)"

    async def main() -> list[list[int]]:
        await plug(engine, tiny_expert("open", threshold=-2.0))
        handles = [
            engine.submit(request(tokenizer, PROMPT, 6, RoutingSpec("token"))),
            engine.submit(request(tokenizer, OTHER, 6, RoutingSpec("off"))),
        ]
        return [token_ids((await finish(handle.events()))[0]) for handle in handles]

    got = asyncio.run(main())
    engine.stop()
    want = [alone(engine, PROMPT, 6, RoutingSpec("token")), alone(engine, OTHER, 6, RoutingSpec("off"))]
    assert got == want
    assert counters["stats"]["unique_graphs"] == graphs, "the plug and the steps compiled nothing more"


def test_a_compiled_engine_decodes_what_the_eager_one_does(make_engine, tokenizer) -> None:
    """aot_eager: dynamo's trace and AOT's functionalisation, no generated code (fast); inductor below."""
    _compiled_engine_equals_eager(make_engine, tokenizer, "aot_eager")


@pytest.mark.slow
@pytest.mark.skipif(
    shutil.which(os.environ.get("CXX", "g++")) is None, reason="inductor's CPU backend needs a C++ compiler (g++)"
)
def test_an_inductor_compiled_engine_decodes_what_the_eager_one_does(make_engine, tokenizer) -> None:
    """--compile-decode inductor: the generated code's greedy tokens are the eager step's."""
    _compiled_engine_equals_eager(make_engine, tokenizer, "inductor")


def test_a_request_joins_a_running_batch(make_engine, tokenizer) -> None:
    metrics = Metrics()
    engine = make_engine(metrics=metrics)
    want_a, want_b = alone(engine, PROMPT, 200), alone(engine, OTHER, 6)

    async def main() -> tuple[int, list[Event], Finished, list[Event], Finished]:
        a = engine.submit(request(tokenizer, PROMPT, 200))
        events_a = a.events()
        first = await anext(events_a)  # a is prefilled and decoding
        gate, running = threading.Event(), []
        engine.call(lambda: (running.append(engine.running), gate.wait()))
        while not running:  # the engine is held between two steps
            await asyncio.sleep(0.005)
        b = engine.submit(request(tokenizer, OTHER, 6))  # admitted when the hold ends, beside a
        gate.set()
        events_b, done_b = await finish(b.events())
        a.cancel()  # a has shown what it needs to: it decoded beside b
        rest_a, done_a = await finish(events_a)
        return running[0], [first, *rest_a], done_a, events_b, done_b

    running, events_a, done_a, events_b, done_b = asyncio.run(main())
    assert running == 1, "b arrived while a was decoding"
    assert (done_b.reason, token_ids(events_b)) == (LENGTH, want_b), "joining changes nothing for b ..."
    got_a = token_ids(events_a)
    assert done_a.reason == CANCELLED and 6 < len(got_a) < 200 and got_a == want_a[: len(got_a)], "... nor for a"
    together = metrics.registry.get_sample_value("plugmoe_batch_size_bucket", {"le": "1.0"})
    assert together < metrics.registry.get_sample_value("plugmoe_batch_size_count"), "some steps ran both rows"


def test_cancelled_request_frees_its_slot(make_engine, tokenizer) -> None:
    engine = make_engine()

    async def run() -> str:
        handle = engine.submit(request(tokenizer, tokens=200))
        async for event in handle.events():
            handle.cancel()
            if event.finished is not None:
                return event.finished.reason
        raise AssertionError

    reason = asyncio.run(run())
    assert reason == CANCELLED
    assert asyncio.run(engine.run(lambda: engine.running)) == 0, "the slot is free by the next step"


def test_a_request_cancelled_while_waiting_never_runs(make_engine, tokenizer) -> None:
    engine = make_engine()

    async def main() -> Finished:
        gate = hold(engine)
        handle = engine.submit(request(tokenizer))
        handle.cancel()
        gate.set()
        return (await finish(handle.events()))[1]

    done = asyncio.run(main())
    assert (done.reason, done.completion_tokens, done.text) == (CANCELLED, 0, "")


def test_the_gauges_count_a_phase_before_its_events_reach_the_client(make_engine, tokenizer) -> None:
    """The queue and batch gauges move with each phase's report, before its events are pushed: at its first token a
    request is running and no longer queued, and by its finish it is out of the batch (a client that has its answer
    never reads a gauge that still counts it)."""
    metrics = Metrics()
    engine = make_engine(metrics=metrics)

    def gauges() -> tuple[float | None, float | None]:
        get = metrics.registry.get_sample_value
        return get("plugmoe_queue_depth"), get("plugmoe_running_sequences")

    async def main() -> list[tuple[bool, tuple[float | None, float | None]]]:
        gate = hold(engine)  # no step runs before push is wrapped
        handle = engine.submit(request(tokenizer, tokens=3))
        seen: list[tuple[bool, tuple[float | None, float | None]]] = []
        push = handle.push

        def recording_push(event: Event) -> None:  # on the engine thread: the gauges as the client would read them
            seen.append((event.finished is not None, gauges()))
            push(event)

        handle.push = recording_push  # type: ignore[method-assign]
        gate.set()
        await finish(handle.events())
        return seen

    seen = asyncio.run(main())
    # the last token comes in the phase that finishes the request: its report (out of the batch) goes first
    assert seen == [(False, (0.0, 1.0))] * 2 + [(False, (0.0, 0.0)), (True, (0.0, 0.0))]


# --- plugging and unplugging between steps ------------------------------------------------------------------


def test_plug_and_unplug_between_steps_while_a_request_runs(make_engine, tokenizer) -> None:
    engine = make_engine()
    open_expert = tiny_expert("open", threshold=-2.0)

    async def main() -> tuple[int, int, float, float, Finished]:
        handle = engine.submit(request(tokenizer, tokens=60))
        events = handle.events()
        await anext(events)  # prefilled with nothing plugged: its prompt went to base
        running_at_plug, plugged = await between_steps(engine, plug(engine, open_expert))
        assert plugged.names == ("open",) and engine.model.plugged.names == ("open",)
        routed = 0.0
        for _ in range(40):  # tokens streamed before the plug may still be queued: wait for a routed step
            await anext(events)
            routed = await engine.run(lambda: engine.tokens_routed("open"))
            if routed > 0:
                break
        running_at_unplug, unplugged = await between_steps(engine, unplug(engine, "open"))
        assert unplugged.names == () and engine.model.plugged.names == ()
        _, done = await finish(events)
        return running_at_plug, running_at_unplug, routed, engine.tokens_routed("open"), done

    running_at_plug, running_at_unplug, routed, routed_after, done = asyncio.run(main())
    assert (running_at_plug, running_at_unplug) == (1, 1), "both swaps ran while the request was in the batch"
    assert done.reason == LENGTH and done.completion_tokens == 60, "a token-mode request goes on without the expert"
    assert done.shares["open"] > 0 and done.shares["base"] > 0, "base before the plug and after the unplug"
    assert routed > 0 and routed_after == 0, "an expert's count starts at its plug and ends at its unplug"


def test_replace_swaps_in_place_for_a_pinned_request(make_engine, tokenizer) -> None:
    engine = make_engine()

    async def main() -> Finished:
        await plug(engine, tiny_expert("pinned", threshold=-2.0))
        handle = engine.submit(request(tokenizer, tokens=30, routing=RoutingSpec("pin", "pinned")))
        events = handle.events()
        await anext(events)
        await between_steps(engine, plug(engine, tiny_expert("pinned", seed=5, threshold=-2.0)))
        return (await finish(events))[1]

    done = asyncio.run(main())
    assert (done.reason, done.completion_tokens, done.shares) == (LENGTH, 30, {"pinned": 1.0, "base": 0.0})


@pytest.mark.parametrize(
    "routing", [RoutingSpec("pin", "gone"), RoutingSpec("sequence")], ids=["pinned", "sequence-chosen"]
)
def test_unplugging_a_running_requests_expert_finishes_it(make_engine, tokenizer, routing: RoutingSpec) -> None:
    engine = make_engine()

    async def main() -> tuple[int, list[Event], Finished]:
        await plug(engine, tiny_expert("gone", threshold=-2.0))  # the sequence-mode prompt picks it
        handle = engine.submit(request(tokenizer, tokens=200, routing=routing))
        events = handle.events()
        first = await anext(events)
        running, _ = await between_steps(engine, unplug(engine, "gone"))
        rest, done = await finish(events)
        return running, [first, *rest], done

    running, events, done = asyncio.run(main())
    assert running == 1
    assert done.reason == EXPERT_UNPLUGGED and "expert 'gone' was unplugged" in done.message
    assert 0 < done.completion_tokens < 200 and done.completion_tokens == len(token_ids(events))
    assert done.text == "".join(e.text for e in events), "what was generated is still delivered"


def test_a_waiting_request_whose_expert_is_unplugged_finishes_before_running(make_engine, tokenizer) -> None:
    engine = make_engine()

    async def main() -> Finished:
        await plug(engine, tiny_expert("gone", threshold=-2.0))
        gate = hold(engine)
        handle = engine.submit(request(tokenizer, routing=RoutingSpec("pin", "gone")))  # accepted: still plugged
        unplugging = asyncio.ensure_future(unplug(engine, "gone"))  # queued behind the hold: runs before admission
        await asyncio.sleep(0)
        gate.set()
        await unplugging
        return (await finish(handle.events()))[1]

    done = asyncio.run(main())
    assert (done.reason, done.completion_tokens) == (EXPERT_UNPLUGGED, 0) and "'gone'" in done.message


def test_an_allow_list_loses_an_unplugged_expert_and_goes_on(make_engine, tokenizer) -> None:
    engine = make_engine()

    async def main() -> Finished:
        await plug(engine, tiny_expert("stays"))
        await plug(engine, tiny_expert("goes", seed=1, threshold=-2.0))
        handle = engine.submit(request(tokenizer, tokens=40, routing=RoutingSpec(allow=("stays", "goes"))))
        events = handle.events()
        await anext(events)
        await between_steps(engine, unplug(engine, "goes"))
        return (await finish(events))[1]

    done = asyncio.run(main())
    assert done.reason == LENGTH and done.completion_tokens == 40
    assert done.shares["goes"] > 0 and done.shares["base"] > 0 and done.shares["stays"] == 0


def test_sequence_mode_shares_list_every_route(make_engine, tokenizer) -> None:
    engine = make_engine()

    async def main() -> list[Finished]:
        await plug(engine, tiny_expert("open", threshold=-2.0))
        await plug(engine, tiny_expert("shut", seed=1))
        specs = [RoutingSpec("sequence"), RoutingSpec("sequence", allow=("shut",))]
        handles = [engine.submit(request(tokenizer, tokens=n, routing=s)) for s in specs for n in (1, 5)]
        return [(await finish(h.events()))[1] for h in handles]

    chose_open_1, chose_open_5, chose_base_1, chose_base_5 = asyncio.run(main())
    for done in (chose_open_1, chose_open_5):
        assert done.shares == {"open": 1.0, "shut": 0.0, "base": 0.0}
    for done in (chose_base_1, chose_base_5):  # one token or five: the same keys
        assert done.shares == {"open": 0.0, "shut": 0.0, "base": 1.0}


# --- refusals -----------------------------------------------------------------------------------------------


def test_a_full_queue_refuses_with_the_numbers(make_engine, tokenizer) -> None:
    engine = make_engine(max_batch_size=1, max_queue=1)

    async def main() -> list[Finished]:
        gate = hold(engine)
        handles = [engine.submit(request(tokenizer)) for _ in range(2)]
        with pytest.raises(QueueFullError, match="2 requests are waiting and 0 running; the queue holds 1 beyond a"):
            engine.submit(request(tokenizer))
        assert engine.queue_depth == 2
        gate.set()
        return [(await finish(h.events()))[1] for h in handles]

    assert [d.reason for d in asyncio.run(main())] == [LENGTH, LENGTH], "the queued requests are still served"


def test_context_limit(make_engine, tokenizer) -> None:
    engine = make_engine(context_limit=8)
    five = tokenizer.encode("The quick brown fox jumps")[:5]
    assert len(five) == 5

    async def main() -> Finished:
        with pytest.raises(ContextLimitError, match="the prompt has 8 tokens; the context limit is 8"):
            engine.submit(GenerationRequest(five + five[:3], 4))
        with pytest.raises(ContextLimitError, match="empty"):
            engine.submit(GenerationRequest([], 4))
        handle = engine.submit(GenerationRequest(five, 100, SamplingParams(min_new_tokens=100)))
        return (await finish(handle.events()))[1]

    done = asyncio.run(main())
    assert (done.reason, done.completion_tokens) == (LENGTH, 3), "prompt and generated tokens fill the context"


def test_unknown_experts_are_refused_at_submit(make_engine, tokenizer) -> None:
    engine = make_engine()

    async def main() -> None:
        with pytest.raises(UnknownExpertError, match="'ghost'"):
            engine.submit(request(tokenizer, routing=RoutingSpec("pin", "ghost")))
        with pytest.raises(UnknownExpertError, match="'ghost'"):
            engine.submit(request(tokenizer, routing=RoutingSpec(allow=("ghost",))))

    asyncio.run(main())
    assert engine.queue_depth == 0


# --- failures and shutdown ----------------------------------------------------------------------------------


def test_a_failed_step_fails_its_batch_and_the_engine_goes_on(
    make_engine, tokenizer, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = make_engine()
    real = scheduler_module.decode_one_token
    calls = []

    def fails_once(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("boom")
        return real(*args, **kwargs)

    monkeypatch.setattr(scheduler_module, "decode_one_token", fails_once)

    async def main() -> tuple[Finished, Finished]:
        failed = (await finish(engine.submit(request(tokenizer)).events()))[1]
        served = (await finish(engine.submit(request(tokenizer)).events()))[1]
        return failed, served

    failed, served = asyncio.run(main())
    assert failed.reason == ERROR and failed.message == "generation failed: RuntimeError: boom"
    assert served.reason == LENGTH and served.completion_tokens == 8 and engine.alive


def test_stop_finishes_running_and_waiting_requests_and_refuses_new_ones(make_engine, tokenizer) -> None:
    engine = make_engine(max_batch_size=1)

    async def main() -> tuple[Finished, Finished]:
        running = engine.submit(request(tokenizer, tokens=200))
        events = running.events()
        await anext(events)
        waiting = engine.submit(request(tokenizer))  # the batch holds one: this one waits
        await asyncio.to_thread(engine.stop)
        return (await finish(events))[1], (await finish(waiting.events()))[1]

    was_running, was_waiting = asyncio.run(main())
    for done in (was_running, was_waiting):
        assert done.reason == ERROR and done.message == "the server is shutting down"
    assert not engine.alive

    async def after() -> None:
        with pytest.raises(EngineStoppedError):
            engine.submit(request(tokenizer))

    asyncio.run(after())
    with pytest.raises(EngineStoppedError):
        engine.call(lambda: None).result(timeout=1)


# --- submitting several at once -----------------------------------------------------------------------------


def test_submit_all_is_all_or_nothing(make_engine, tokenizer) -> None:
    engine = make_engine(max_batch_size=1, max_queue=2)

    async def main() -> int:
        gate = hold(engine)
        try:
            with pytest.raises(QueueFullError):
                engine.submit_all([request(tokenizer)] * 4)
            return engine.queue_depth
        finally:
            gate.set()

    assert asyncio.run(main()) == 0


# --- through the app: the engine isolates what fails --------------------------------------------------------
# (moved from the hardening review's tests: the failing row alone ends with an error, a 500 or the stream's
# last event; its neighbours go on, and the loop and shutdown never stop working)

APP_ENDPOINTS = {
    "/generate": {"prompt": PROMPT, "max_new_tokens": 4},
    "/v1/completions": {"prompt": PROMPT, "max_tokens": 4},
    "/v1/chat/completions": {"messages": [{"role": "user", "content": PROMPT}], "max_tokens": 4},
}


def _poisoned(params: SamplingParams, **fields) -> SamplingParams:
    """Sampling params with values validation would refuse (the engine must survive them all the same)."""
    for name, value in fields.items():
        object.__setattr__(params, name, value)
    return params


def _submit_and_wait(client: TestClient, request: GenerationRequest) -> Finished:
    engine: Engine = client.app.state.engine

    async def run() -> Finished:
        return await engine.submit(request).result()

    return client.portal.call(run)


def _stream(client: TestClient, body: dict) -> tuple[str, dict]:
    with client.stream("POST", "/generate", json={**body, "stream": True}) as response:
        assert response.status_code == 200
        events = [json.loads(line[6:]) for line in response.iter_lines() if line.startswith("data: ")]
    return "".join(e["text"] for e in events[:-1]), events[-1]


def _hold(engine: Engine) -> threading.Event:
    gate = threading.Event()
    engine.call(gate.wait)  # the engine waits here, so everything submitted meanwhile joins one batch
    return gate


def test_poisoned_requests_fail_alone_beside_streaming_neighbours(client: TestClient) -> None:
    engine: Engine = client.app.state.engine
    tokenizer = client.app.state.tokenizer
    neighbours = [{"prompt": p, "max_new_tokens": 16, "min_new_tokens": 16} for p in ("The quick", "Mia walks", "def")]
    alone = [_stream(client, body) for body in neighbours]
    prompt_ids = tokenizer.encode(PROMPT)
    poisons = [
        # the review's seed past int64 (raised in admission, outside its error handling)
        GenerationRequest(prompt_ids, 8, _poisoned(SamplingParams(temperature=1.0), seed=2**64)),
        # top_k past int64 (broke the sampling of every row in the batch)
        GenerationRequest(prompt_ids, 8, _poisoned(SamplingParams(temperature=1.0, seed=1), top_k=2**70)),
        # a token id the model does not have (breaks the prefill of the whole batch)
        GenerationRequest([*prompt_ids, VOCAB * 10], 8),
    ]
    gate = _hold(engine)
    results: dict[str, object] = {}

    def run(key: str, fn: Callable[[], object]) -> None:
        results[key] = fn()

    threads = [
        threading.Thread(target=run, args=(f"n{i}", lambda b=b: _stream(client, b))) for i, b in enumerate(neighbours)
    ]
    threads += [
        threading.Thread(target=run, args=(f"p{i}", lambda r=r: _submit_and_wait(client, r)))
        for i, r in enumerate(poisons)
    ]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 30
    while engine.queue_depth < len(threads) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert engine.queue_depth == len(threads), "all requests wait for one batch"
    gate.set()
    for thread in threads:
        thread.join(60)

    for i, (text, last) in enumerate(alone):
        got_text, got_last = results[f"n{i}"]
        assert got_last["finish_reason"] == LENGTH and got_last["usage"]["completion_tokens"] == 16
        assert (got_text, got_last["text"]) == (text, last["text"]), "a neighbour's stream is exactly as alone"
    for i in range(len(poisons)):
        finished = results[f"p{i}"]
        assert isinstance(finished, Finished) and finished.reason == ERROR, finished
        assert isinstance(finished.error, GenerationFailedError)
    assert engine.alive and client.post("/generate", json={"prompt": PROMPT, "max_new_tokens": 2}).status_code == 200


@pytest.fixture
def poisoned_sampling(monkeypatch: pytest.MonkeyPatch) -> None:
    """Sampling raises for any row whose seed is 666 (a stand-in for whatever may still break one row)."""
    real = scheduler_module.sample_step

    def sample_step(logits, params, *args, **kwargs):
        if any(p.seed == 666 for p in params):
            raise RuntimeError("poisoned row")
        return real(logits, params, *args, **kwargs)

    monkeypatch.setattr(scheduler_module, "sample_step", sample_step)


@pytest.mark.parametrize("endpoint", list(APP_ENDPOINTS))
def test_a_failed_generation_is_a_500_with_the_error_object(
    client: TestClient, poisoned_sampling: None, endpoint: str
) -> None:
    response = client.post(endpoint, json={**APP_ENDPOINTS[endpoint], "seed": 666, "temperature": 1.0})
    assert response.status_code == 500, response.text
    error = response.json()["error"]
    assert error["type"] == "GenerationFailedError" and "poisoned row" in error["message"] and error["code"] == 500


def test_a_failed_stream_ends_with_an_error_event_and_its_neighbours_go_on(
    client: TestClient, poisoned_sampling: None
) -> None:
    engine: Engine = client.app.state.engine
    healthy = {"prompt": PROMPT, "max_new_tokens": 12, "min_new_tokens": 12, "temperature": 1.0, "seed": 5}
    expected = _stream(client, healthy)
    gate = _hold(engine)
    results: dict[str, tuple[str, dict]] = {}
    bodies = {"healthy": healthy, "poisoned": {**healthy, "seed": 666}}
    threads = [threading.Thread(target=lambda k=k: results.__setitem__(k, _stream(client, bodies[k]))) for k in bodies]
    for thread in threads:
        thread.start()
    while engine.queue_depth < 2:
        time.sleep(0.01)
    gate.set()
    for thread in threads:
        thread.join(60)
    assert results["healthy"] == expected
    _, last = results["poisoned"]
    assert last["finish_reason"] == "error" and last["error"]["type"] == "GenerationFailedError"
    assert last["error"]["code"] == 500 and "poisoned row" in last["error"]["message"]

    with client.stream(
        "POST",
        "/v1/completions",
        json={**APP_ENDPOINTS["/v1/completions"], "seed": 666, "stream": True, "temperature": 1.0},
    ) as response:
        chunks = [line[6:] for line in response.iter_lines() if line.startswith("data: ")]
    final = json.loads(chunks[-2])
    assert chunks[-1] == "[DONE]" and final["choices"][0]["finish_reason"] == "error"
    assert final["error"]["code"] == 500


def test_requests_while_shutting_down_are_503(client: TestClient) -> None:
    engine: Engine = client.app.state.engine
    gate = _hold(engine)
    answer: dict[str, httpx.Response] = {}
    waiting = threading.Thread(target=lambda: answer.setdefault("r", client.post("/generate", json={"prompt": PROMPT})))
    waiting.start()
    while engine.queue_depth < 1:
        time.sleep(0.01)
    engine.drain(0.0)
    gate.set()
    waiting.join(30)
    assert answer["r"].status_code == 503 and answer["r"].json()["error"]["type"] == "EngineStoppedError"
    refused = client.post("/generate", json={"prompt": PROMPT})
    assert refused.status_code == 503 and "shutting down" in refused.json()["detail"]
    assert refused.headers["retry-after"]


def test_stop_always_returns_and_answers_everything(client: TestClient) -> None:
    engine: Engine = client.app.state.engine
    tokenizer = client.app.state.tokenizer
    gate = _hold(engine)
    finished: list[Finished] = []
    waiting = threading.Thread(
        target=lambda: finished.append(_submit_and_wait(client, GenerationRequest(tokenizer.encode(PROMPT), 4)))
    )
    waiting.start()
    while engine.queue_depth < 1:
        time.sleep(0.01)
    started = time.monotonic()
    engine.stop(timeout=0.5)  # the engine is stuck in `gate.wait`: stop gives up on it and returns
    assert time.monotonic() - started < 5
    waiting.join(10)
    assert finished and finished[0].reason == ERROR and isinstance(finished[0].error, EngineStoppedError)
    gate.set()


def test_sigterm_with_streams_running_exits_within_seconds(tiny_model_dir: Path, tmp_path: Path) -> None:
    server = LiveServer(tiny_model_dir, tmp_path / "experts", PLUGMOE_GRACEFUL_SHUTDOWN_S="1")
    body = {"prompt": PROMPT, "max_new_tokens": 240, "min_new_tokens": 240, "stream": True}  # fits the 256 context
    finals: list[dict | None] = []
    streaming = threading.Barrier(5)

    def stream() -> None:
        last = None
        with httpx.stream("POST", f"{server.url}/generate", json=body, timeout=60) as response:
            for i, line in enumerate(response.iter_lines()):
                if i == 0:
                    streaming.wait(30)
                if line.startswith("data: "):
                    last = json.loads(line[6:])
        finals.append(last)

    threads = [threading.Thread(target=stream) for _ in range(4)]
    try:
        for thread in threads:
            thread.start()
        streaming.wait(60)  # every stream has its first token
        started = time.monotonic()
        server.process.send_signal(signal.SIGTERM)
        code = server.process.wait(20)
        took = time.monotonic() - started
    finally:
        if server.process.poll() is None:
            server.process.kill()
        server.log.close()
    for thread in threads:
        thread.join(10)
    # uvicorn shuts down gracefully, then re-raises the signal it caught, so the exit status is SIGTERM's
    assert code in (0, -signal.SIGTERM) and took < 10, (code, took)
    assert len(finals) == 4
    for last in finals:  # each stream ended with its last event: finished, or told why it was cut
        assert last is not None and "finish_reason" in last, last
        if last["finish_reason"] == "error":
            assert last["error"]["code"] == 503 and "shutting down" in last["error"]["message"]
        else:
            assert last["finish_reason"] == LENGTH


def test_engine_loop_survives_a_failing_step_and_its_requests_are_answered(
    client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Whatever raises in a decode step fails the running rows with an error; the loop goes on."""
    engine: Engine = client.app.state.engine
    real = scheduler_module.decode_one_token
    calls = {"n": 0}

    def decode_one_token(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("the device fell over")
        return real(*args, **kwargs)

    monkeypatch.setattr(scheduler_module, "decode_one_token", decode_one_token)
    response = client.post("/generate", json={"prompt": PROMPT, "max_new_tokens": 8, "min_new_tokens": 8})
    assert response.status_code == 500 and "the device fell over" in response.json()["detail"]
    assert engine.alive
    assert client.post("/generate", json={"prompt": PROMPT, "max_new_tokens": 4}).status_code == 200


# --- per-client share (issue 24 item 2) ---------------------------------------------------------------------


def test_a_client_over_its_share_gets_429_and_others_are_still_served(make_engine, tokenizer) -> None:
    """A client at its cap of sequences in flight (waiting + running) is refused (ClientBusyError: 429 with
    Retry-After) without queueing anything; another client submitting meanwhile is served; once the first
    client's sequences finish, its share is free again."""
    from server.requests import ClientBusyError

    engine = make_engine(max_batch_size=2, max_queue=8)

    async def main() -> tuple[list[Finished], list[Finished]]:
        gate = hold(engine)
        mine = engine.submit_all([request(tokenizer) for _ in range(3)], client="key:a", client_cap=4)
        with pytest.raises(ClientBusyError, match="has 3 sequences in flight .* at most 4"):
            engine.submit_all([request(tokenizer) for _ in range(2)], client="key:a", client_cap=4)
        assert engine.queue_depth == 3, "the refused request queued nothing"
        theirs = engine.submit_all([request(tokenizer) for _ in range(4)], client="key:b", client_cap=4)
        gate.set()
        done = [(await finish(h.events()))[1] for h in mine], [(await finish(h.events()))[1] for h in theirs]
        again = engine.submit_all([request(tokenizer) for _ in range(4)], client="key:a", client_cap=4)
        await asyncio.gather(*(finish(h.events()) for h in again))
        return done

    mine, theirs = asyncio.run(main())
    assert [d.reason for d in mine + theirs] == [LENGTH] * 7


# --- torch work off the engine thread (issue 22) ---------------------------------------------------------------


def _threads() -> set[str]:
    """The ids of this process's live threads. Compared as sets, since threads other tests started may end
    while this one runs (a count then drops below the one taken before)."""
    return set(os.listdir("/proc/self/task"))


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="counts threads through /proc")
def test_in_passing_thread_returns_and_leaves_no_intra_op_pool_behind() -> None:
    """Loading runs in a thread that ends, so the OpenMP pool its parallel ops started goes with it (libgomp
    keeps one per thread that ran a parallel op; with more pool threads than CPUs it stops spin-waiting in every
    pool, the engine's included). With asyncio.to_thread the same work leaves its executor thread and pool."""
    import torch

    from server.engine import in_passing_thread

    if torch.get_num_threads() < 2:
        pytest.skip("torch runs one intra-op thread here: no pool is started")

    def parallel_work() -> float:
        x = torch.randn(2048, 2048)
        return float((x @ x).sum() + torch.exp(x).sum())  # large enough to run on the intra-op pool

    async def main() -> None:
        before = _threads()
        assert isinstance(await in_passing_thread(parallel_work), float)
        deadline = time.monotonic() + 5
        while _threads() - before and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert not _threads() - before, "the loading thread and its pool ended"
        with pytest.raises(ZeroDivisionError):
            await in_passing_thread(lambda: 1 / 0)

    asyncio.run(main())


def test_a_failed_warm_up_answers_the_requests_queued_meanwhile(
    make_engine, tokenizer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The engine thread compiles before its loop; if that compile fails, the thread ends, and a request submitted
    while it compiled gets its error answer (never left waiting), as at any other end of the thread."""
    from moe.decode.static_decoder import StaticDecoder

    submitted = threading.Event()

    def warm_up_compiled(self, *args, **kwargs):
        assert submitted.wait(30)
        raise RuntimeError("no compiler")

    monkeypatch.setattr(StaticDecoder, "warm_up_compiled", warm_up_compiled)
    engine = make_engine(compile_backend="aot_eager")
    assert engine.warming

    async def main() -> Finished:
        handle = engine.submit(request(tokenizer, PROMPT, 4))
        submitted.set()
        return (await asyncio.wait_for(finish(handle.events()), 30))[1]

    done = asyncio.run(main())
    assert done.reason == ERROR and isinstance(done.error, EngineStoppedError)
    deadline = time.monotonic() + 10  # the answer goes out as the thread ends
    while engine.alive and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not engine.alive and not engine.warming
