"""server.api.validation (with the schemas' pydantic checks in front of it): every value the model cannot
honour is a 400 naming its field before it reaches the engine.

A seed past int64 once raised inside the engine's admission; sampling values that passed validation broke the
prefill of every request in the same batch; NaN, a lone surrogate or a malformed chat part were 500s.
"""

from __future__ import annotations

import json
import threading

import pytest
from fastapi.testclient import TestClient

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


# --- issue 24: stop strings, sequences per request, the 404's param ------------------------------------------


@pytest.mark.parametrize("endpoint", list(ENDPOINTS))
@pytest.mark.parametrize(
    ("stop", "param", "says"),
    [
        (["x"] * 17, "stop", "stop holds 17 strings"),
        (["x"] * 10_000, "stop", "stop holds 10000 strings"),  # was pydantic's "Input should be a valid string"
        ("y" * 257, "stop", "stop is 257 characters long"),
        (["a", "z" * 300], "stop[1]", "stop[1] is 300 characters long"),
        (["w" * 200] * 6, "stop", "1200 characters together"),
    ],
)
def test_stop_strings_over_the_caps_are_400_stating_the_caps(
    client: TestClient, endpoint: str, stop: object, param: str, says: str
) -> None:
    response = client.post(endpoint, json={**ENDPOINTS[endpoint], "stop": stop})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and says in error["message"]
    for cap in ("16 stop strings (--max-stop-strings)", "256 characters each", "1024 together"):
        assert cap in error["message"]


def test_stop_strings_within_the_caps_are_served(client: TestClient) -> None:
    body = {**ENDPOINTS["/v1/completions"], "stop": ["q" * 64] * 16}
    assert client.post("/v1/completions", json=body).status_code == 200


def test_more_sequences_than_one_request_may_ask_for_is_400(make_client) -> None:
    """The review's request: 10 prompts x n=8 = 80 sequences (batch + queue). One request may ask for at most
    --max-sequences-per-request (default: half the batch), so others are never crowded out."""
    client = make_client(max_batch_size=16)
    body = {"prompt": ["x"] * 10, "n": 8, "max_tokens": 500}
    response = client.post("/v1/completions", json={**body, "max_tokens": 8})
    assert response.status_code == 400 and response.json()["error"]["param"] == "prompt"
    assert "80 sequences; one request may ask for at most 8 (--max-sequences-per-request" in response.text
    assert client.post("/v1/completions", json={"prompt": "x", "n": 8, "max_tokens": 2}).status_code == 200
    response = client.post("/v1/completions", json={"prompt": ["x"] * 2, "n": 4, "max_tokens": 2})
    assert response.status_code == 200 and len(response.json()["choices"]) == 8
    wider = make_client(max_batch_size=16, max_sequences_per_request=16)
    assert wider.post("/v1/completions", json={"prompt": ["x"] * 2, "n": 8, "max_tokens": 2}).status_code == 200


def test_a_client_over_its_share_in_flight_is_429_with_retry_after(make_client) -> None:
    """Per client (its address without --api-keys): sequences in flight past --max-sequences-per-client are a
    429 with Retry-After; here the cap is 1 and a request waiting behind a held engine holds it."""
    client = make_client(max_sequences_per_client=1)
    engine = client.app.state.engine
    gate = threading.Event()
    engine.call(gate.wait)  # the engine thread waits: the first request stays in flight
    first = threading.Thread(target=client.post, args=("/generate",), kwargs={"json": ENDPOINTS["/generate"]})
    first.start()
    while engine.queue_depth < 1:
        threading.Event().wait(0.01)
    response = client.post("/generate", json=ENDPOINTS["/generate"])
    gate.set()
    first.join(60)
    assert response.status_code == 429, response.text
    assert response.headers["Retry-After"] == "1" and "--max-sequences-per-client" in response.text
    assert client.post("/generate", json=ENDPOINTS["/generate"]).status_code == 200, "its share is free again"


@pytest.mark.parametrize(
    ("endpoint", "change", "param"),
    [
        ("/v1/completions", {"model": "no-such-expert"}, "model"),
        ("/v1/completions", {"routing": {"mode": "pin", "expert": "no-such-expert"}}, "routing.expert"),
        ("/v1/chat/completions", {"routing": {"mode": "pin", "expert": "no-such-expert"}}, "routing.expert"),
        ("/generate", {"routing": {"mode": "pin", "expert": "no-such-expert"}}, "routing.expert"),
    ],
)
def test_an_unknown_expert_is_404_naming_the_field(client: TestClient, endpoint: str, change: dict, param: str) -> None:
    response = client.post(endpoint, json={**ENDPOINTS[endpoint], **change})
    assert response.status_code == 404, response.text
    assert response.json()["error"]["param"] == param and "no-such-expert" in response.json()["error"]["message"]
