"""POST /generate in-process: exactness, sampling, stop strings, streaming, routing, and its 4xx answers."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient

from moe import load_backbone
from moe.decode.sampling import SamplingParams
from moe.decode.sequence import CANCELLED, GenerationRequest
from server.engine import Engine

PROMPT = "The quick brown fox"


def _generate(client: TestClient, **body) -> dict:
    response = client.post("/generate", json={"prompt": PROMPT, "max_new_tokens": 12, **body})
    assert response.status_code == 200, response.text
    return response.json()


def _plug(client: TestClient, data: bytes) -> None:
    response = client.post("/experts", files={"file": ("x.safetensors", data)})
    assert response.status_code == 201, response.text


def test_greedy_without_experts_equals_hf_generate(client: TestClient, tiny_model_dir: Path) -> None:
    model, tokenizer = load_backbone(tiny_model_dir, device="cpu")
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    with torch.inference_mode():
        out = model.generate(ids, max_new_tokens=12, do_sample=False, min_new_tokens=12)
    expected = tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
    body = _generate(client, min_new_tokens=12)
    assert body["text"] == expected
    assert body["finish_reason"] == "length"
    assert body["usage"] == {"prompt_tokens": ids.shape[1], "completion_tokens": 12}
    assert body["experts"] == {"base": 1.0}
    assert body["routing_entropy"] == 0.0


def test_same_seed_same_text(client: TestClient) -> None:
    a = _generate(client, temperature=1.0, seed=123, max_new_tokens=16)
    b = _generate(client, temperature=1.0, seed=123, max_new_tokens=16)
    c = _generate(client, temperature=1.0, seed=124, max_new_tokens=16, top_k=50, top_p=0.9)
    assert a["text"] == b["text"]
    assert c["finish_reason"] in ("length", "stop")


def test_stop_string_cuts_the_text(client: TestClient) -> None:
    full = _generate(client, max_new_tokens=16, min_new_tokens=16)["text"]
    stop = full[5:7]
    body = _generate(client, max_new_tokens=16, min_new_tokens=16, stop=[stop])
    assert body["finish_reason"] == "stop"
    assert body["text"] == full[: full.index(stop)]


def test_stream_sends_one_event_per_token_then_usage(client: TestClient) -> None:
    whole = _generate(client, max_new_tokens=10, min_new_tokens=10)
    with client.stream(
        "POST", "/generate", json={"prompt": PROMPT, "max_new_tokens": 10, "min_new_tokens": 10, "stream": True}
    ) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [json.loads(line[6:]) for line in response.iter_lines() if line.startswith("data: ")]
    tokens, last = events[:-1], events[-1]
    assert len(tokens) == 10 and all(len(e["token_ids"]) == 1 for e in tokens)
    assert "".join(e["text"] for e in tokens) == whole["text"] == last["text"]
    assert last["usage"] == whole["usage"] and last["finish_reason"] == "length"
    assert last["experts"] == {"base": 1.0}


def test_routing_modes_report_their_shares(client: TestClient, expert_bytes) -> None:
    _plug(client, expert_bytes("always"))  # open gate: wins every token it may
    _plug(client, expert_bytes("never", open_gate=False, seed=1))
    token = _generate(client)["experts"]
    assert token["always"] == 1.0 and token["never"] == 0.0 and token["base"] == 0.0
    assert _generate(client, routing={"mode": "off"})["experts"] == {"always": 0.0, "never": 0.0, "base": 1.0}
    pinned = _generate(client, routing={"mode": "pin", "expert": "never"})
    assert pinned["experts"]["never"] == 1.0
    allowed = _generate(client, routing={"mode": "token", "allow": ["never"]})
    assert allowed["experts"]["base"] == 1.0
    sequence = _generate(client, routing={"mode": "sequence"})
    assert sequence["experts"]["always"] == 1.0
    assert _generate(client, routing={"mode": "sequence", "allow": ["never"]})["experts"]["base"] == 1.0
    # routing changes the output: the pinned expert's adapter is not zero
    assert pinned["text"] != _generate(client, routing={"mode": "off"})["text"]


def test_mixed_routing_in_one_batch_matches_each_alone(make_client, expert_bytes) -> None:
    client = make_client()
    _plug(client, expert_bytes("always"))
    routings = [{"mode": "off"}, {"mode": "pin", "expert": "always"}, {"mode": "sequence"}, {"mode": "token"}]
    alone = [_generate(client, routing=r, min_new_tokens=12)["text"] for r in routings]
    results: list[str | None] = [None] * len(routings)
    engine: Engine = client.app.state.engine
    gate = threading.Event()
    engine.call(gate.wait)  # hold the engine so all four join one batch

    def run(i: int) -> None:
        results[i] = _generate(client, routing=routings[i], min_new_tokens=12)["text"]

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(routings))]
    for t in threads:
        t.start()
    while engine.queue_depth < len(routings):
        threading.Event().wait(0.01)
    gate.set()
    for t in threads:
        t.join(60)
    assert results == alone


@pytest.mark.parametrize(
    ("body", "status", "needle", "param"),
    [
        ({"routing": {"mode": "pin", "expert": "ghost"}}, 404, "ghost", "routing.expert"),  # issue 24: names it
        ({"routing": {"mode": "pin"}}, 400, "needs an expert", None),
        ({"routing": {"mode": "token", "expert": "x"}}, 400, "takes no expert", None),
        ({"routing": {"mode": "banana"}}, 400, "routing.mode", "routing.mode"),
        ({"temperature": -1}, 400, "temperature", "temperature"),
        ({"top_p": 0}, 400, "top_p", "top_p"),
        ({"max_new_tokens": 0}, 400, "max_new_tokens", "max_new_tokens"),
    ],
)
def test_bad_requests(client: TestClient, body: dict, status: int, needle: str, param: str | None) -> None:
    """Every refusal is one error object: `detail` and OpenAI's `error` with the offending `param`."""
    response = client.post("/generate", json={"prompt": PROMPT, **body})
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert needle in response.json()["detail"] and error["message"] == response.json()["detail"]
    assert error["code"] == status and error["param"] == param


def test_prompt_over_context_limit_is_400_with_the_limit(make_client) -> None:
    client = make_client(context_limit=16)
    response = client.post("/generate", json={"prompt": PROMPT * 10})
    assert response.status_code == 400
    assert "context limit is 16" in response.json()["detail"]
    assert client.post("/generate", json={"prompt": ""}).status_code == 400


def test_full_queue_is_503_with_retry_after(make_client) -> None:
    # one client sends all three: its share must not be what refuses the third
    client = make_client(max_batch_size=1, max_queue=1, retry_after_s=3, max_sequences_per_client=3)
    engine: Engine = client.app.state.engine
    gate = threading.Event()
    engine.call(gate.wait)
    threads = [threading.Thread(target=_generate, args=(client,)) for _ in range(2)]
    for t in threads:
        t.start()
    while engine.queue_depth < 2:
        threading.Event().wait(0.01)
    response = client.post("/generate", json={"prompt": PROMPT})
    gate.set()
    for t in threads:
        t.join(60)
    assert response.status_code == 503
    assert response.headers["retry-after"] == "3"
    assert "queue" in response.json()["detail"]


def test_cancelled_request_frees_its_slot(client: TestClient) -> None:
    engine: Engine = client.app.state.engine
    tokenizer = client.app.state.tokenizer

    async def run() -> str:
        request = GenerationRequest(tokenizer.encode(PROMPT), 200, SamplingParams(min_new_tokens=200))
        handle = engine.submit(request)
        async for event in handle.events():
            handle.cancel()
            if event.finished is not None:
                return event.finished.reason
        raise AssertionError

    reason = client.portal.call(run)
    assert reason == CANCELLED
    deadline = time.monotonic() + 5
    while engine.running and time.monotonic() < deadline:
        time.sleep(0.01)
    assert engine.running == 0
