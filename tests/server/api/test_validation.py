"""server.api.validation (with the schemas' pydantic checks in front of it): every value the model cannot
honour is a 400 naming its field before it reaches the engine.

A seed past int64 once raised inside the engine's admission; sampling values that passed validation broke the
prefill of every request in the same batch; NaN, a lone surrogate or a malformed chat part were 500s.
"""

from __future__ import annotations

import json

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
