"""Finding 1 of the hardening review: no request can harm another.

A seed past int64 used to raise inside the engine's admission, outside its error handling: running streams
ended with `error`, innocent requests admitted with it never got an answer, and SIGTERM no longer stopped the
server. Sampling values that passed validation broke the prefill of every request in the same batch; NaN, a
lone surrogate or a malformed chat part were 500s. Now every value is bounded before it reaches the engine,
and the engine isolates what still fails: the failing row alone ends with an error (a 500, or the stream's
last event), its neighbours go on, and the loop and shutdown never stop working. (Finding 7's "failures are
HTTP 200" is here too.)
"""

from __future__ import annotations

import json
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

import moe.decode.scheduler
from moe.decode.sampling import SamplingParams
from moe.decode.sequence import ERROR, LENGTH, Finished, GenerationFailedError, GenerationRequest
from server.engine import Engine
from server.requests import EngineStoppedError
from tests.server.conftest import LiveServer
from tests.tiny import VOCAB

PROMPT = "The quick brown fox"
ENDPOINTS = {
    "/generate": {"prompt": PROMPT, "max_new_tokens": 4},
    "/v1/completions": {"prompt": PROMPT, "max_tokens": 4},
    "/v1/chat/completions": {"messages": [{"role": "user", "content": PROMPT}], "max_tokens": 4},
}


@pytest.mark.parametrize("endpoint", list(ENDPOINTS))
@pytest.mark.parametrize(
    ("change", "param"),
    [
        ({"seed": 2**64}, "seed"),  # the review's request: past int64
        ({"seed": 2**63}, "seed"),
        ({"seed": -1}, "seed"),
        ({"seed": False}, "seed"),  # was coerced to 0
        ({"seed": 1.5}, "seed"),
        ({"stream": 0}, "stream"),  # was coerced to false
        ({"stream": "true"}, "stream"),
        ({"temperature": 2.5}, "temperature"),
        ({"temperature": True}, "temperature"),
        ({"top_p": 1e-300}, "top_p"),  # underflowed to 0 in float32 and broke the batch's sampling
        ({"top_p": 1e-7}, "top_p"),
        ({"top_k": 2**70}, "top_k"),  # overflowed int64 in the batch's sampling
        ({"top_k": VOCAB + 1}, "top_k"),
    ],
)
def test_values_the_model_cannot_honour_are_400_naming_the_param(
    client: TestClient, endpoint: str, change: dict, param: str
) -> None:
    response = client.post(endpoint, json={**ENDPOINTS[endpoint], **change})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and error["code"] == 400 and error["message"] == response.json()["detail"]
    if param == "top_k" and change["top_k"] == VOCAB + 1:
        assert f"vocabulary of {VOCAB} tokens" in error["message"]


@pytest.mark.parametrize("endpoint", ["/v1/completions", "/v1/chat/completions"])
@pytest.mark.parametrize(
    ("change", "param"),
    [
        ({"repetition_penalty": 5e-324}, "repetition_penalty"),  # schemathesis: overflowed logits to inf, a 500
        ({"repetition_penalty": 0}, "repetition_penalty"),
        (
            {"response_format": {"type": "text", "json_schema": {"name": "", "schema": {}, "strict": 0}}},
            "response_format.json_schema.strict",
        ),  # schemathesis: 0 was taken as false
        ({"stream_options": {"include_usage": 1}}, "stream_options.include_usage"),
    ],
)
def test_openai_extensions_and_nested_fields_are_strict(
    client: TestClient, endpoint: str, change: dict, param: str
) -> None:
    response = client.post(endpoint, json={**ENDPOINTS[endpoint], **change})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param


@pytest.mark.parametrize("endpoint", list(ENDPOINTS))
@pytest.mark.parametrize(("field", "literal"), [("temperature", "NaN"), ("temperature", "Infinity"), ("top_p", "NaN")])
def test_nan_and_infinity_are_400(client: TestClient, endpoint: str, field: str, literal: str) -> None:
    body = json.dumps(ENDPOINTS[endpoint])[:-1] + f', "{field}": {literal}}}'  # Python's json reads these literals
    response = client.post(endpoint, content=body.encode(), headers={"content-type": "application/json"})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == field and "finite" in response.json()["detail"]


@pytest.mark.parametrize(
    ("endpoint", "body", "param"),
    [
        ("/generate", '{"prompt": "fox \\ud800"}', "prompt"),
        ("/v1/completions", '{"prompt": ["\\udfff fox"]}', "prompt[0]"),
        ("/v1/chat/completions", '{"messages": [{"role": "user", "content": "a \\ud83d b"}]}', "messages[0].content"),
        ("/generate", '{"prompt": "fox", "stop": ["\\ud800"]}', "stop[0]"),
    ],
)
def test_lone_surrogates_are_400(client: TestClient, endpoint: str, body: str, param: str) -> None:
    response = client.post(endpoint, content=body.encode(), headers={"content-type": "application/json"})
    assert response.status_code == 400, response.text
    assert "surrogate" in response.json()["detail"] and response.json()["error"]["param"] == param


@pytest.mark.parametrize(
    ("content", "param"),
    [
        ([{"type": "text", "text": 5}], "messages[0].content[0]"),
        ([{"type": "text", "text": None}], "messages[0].content[0]"),
        ([{"type": "text"}], "messages[0].content[0]"),
        ([{"type": "image_url", "image_url": {"url": "http://x/y.png"}}], "messages[0].content[0]"),
        (5, "messages[0].content"),
    ],
)
def test_chat_parts_must_be_text_parts(client: TestClient, content: object, param: str) -> None:
    response = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": content}]})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param


def test_bounds_that_are_honoured(client: TestClient) -> None:
    """The largest seed is served, and temperatures below 0.01 are greedy (dividing by them overflowed)."""
    greedy = client.post("/generate", json={"prompt": PROMPT, "max_new_tokens": 8, "min_new_tokens": 8}).json()
    for temperature in (1e-300, 0.005):
        body = {"prompt": PROMPT, "max_new_tokens": 8, "min_new_tokens": 8, "temperature": temperature}
        response = client.post("/generate", json={**body, "seed": 2**63 - 1})
        assert response.status_code == 200, response.text
        assert response.json()["text"] == greedy["text"]
    sampled = client.post("/generate", json={"prompt": PROMPT, "temperature": 1.0, "seed": 2**63 - 1, "top_k": VOCAB})
    assert sampled.status_code == 200, sampled.text


# --- the engine isolates what still fails ------------------------------------------------------------------


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
    real = moe.decode.scheduler.sample_step

    def sample_step(logits, params, *args, **kwargs):
        if any(p.seed == 666 for p in params):
            raise RuntimeError("poisoned row")
        return real(logits, params, *args, **kwargs)

    monkeypatch.setattr(moe.decode.scheduler, "sample_step", sample_step)


@pytest.mark.parametrize("endpoint", list(ENDPOINTS))
def test_a_failed_generation_is_a_500_with_the_error_object(
    client: TestClient, poisoned_sampling: None, endpoint: str
) -> None:
    response = client.post(endpoint, json={**ENDPOINTS[endpoint], "seed": 666, "temperature": 1.0})
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
        json={**ENDPOINTS["/v1/completions"], "seed": 666, "stream": True, "temperature": 1.0},
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
    real = moe.decode.scheduler.decode_one_token
    calls = {"n": 0}

    def decode_one_token(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("the device fell over")
        return real(*args, **kwargs)

    monkeypatch.setattr(moe.decode.scheduler, "decode_one_token", decode_one_token)
    response = client.post("/generate", json={"prompt": PROMPT, "max_new_tokens": 8, "min_new_tokens": 8})
    assert response.status_code == 500 and "the device fell over" in response.json()["detail"]
    assert engine.alive
    assert client.post("/generate", json={"prompt": PROMPT, "max_new_tokens": 4}).status_code == 200
