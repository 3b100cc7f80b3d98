"""/v1/completions and /v1/chat/completions in-process: what a client sees when its generation fails partway.

issue 24 item 5: a `guided_regex` whose grammar engine gives up after the first token ((a{1000}){1000}: too many
lexer expressions) answered 200 with empty text and finish_reason "stop"; the error was only in the log. The
scheduler now finishes that row with an error: a non-streamed request gets the error object, a stream an error
event, and neither carries the grammar engine's whole state.
"""

from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient

EXPLODING = "(a{1000}){1000}"
BODIES = {
    "/v1/completions": {"prompt": "aaa", "max_tokens": 8, "guided_regex": EXPLODING},
    "/v1/chat/completions": {
        "messages": [{"role": "user", "content": "aaa"}],
        "max_tokens": 8,
        "guided_regex": EXPLODING,
    },
}


@pytest.mark.parametrize("endpoint", list(BODIES))
def test_a_grammar_failing_mid_generation_is_the_error_object(client: TestClient, endpoint: str) -> None:
    response = client.post(endpoint, json=BODIES[endpoint])
    assert response.status_code == 500, response.text  # not 200 with empty text and finish_reason "stop"
    error = response.json()["error"]
    assert error["type"] == "GenerationFailedError" and error["code"] == 500
    assert error["message"].startswith("structured output failed: ") and "too many" in error["message"]
    assert "<grammar>" not in error["message"] and "\n" not in error["message"], "one line, not the engine's state"


@pytest.mark.parametrize("endpoint", list(BODIES))
def test_a_grammar_failing_mid_stream_ends_with_an_error_event(client: TestClient, endpoint: str) -> None:
    response = client.post(endpoint, json={**BODIES[endpoint], "stream": True})
    assert response.status_code == 200  # the stream had started
    events = [line[len("data: ") :] for line in response.text.splitlines() if line.startswith("data: ")]
    chunks = [json.loads(e) for e in events if e != "[DONE]"]
    errors = [c["error"] for c in chunks if "error" in c]
    assert len(errors) == 1 and errors[0]["type"] == "GenerationFailedError", chunks
    assert errors[0]["message"].startswith("structured output failed: ") and "<grammar>" not in errors[0]["message"]
    finishes = [ch["finish_reason"] for c in chunks for ch in c.get("choices", []) if ch.get("finish_reason")]
    assert "stop" not in finishes, "a failed grammar is not a normal stop"


def test_other_requests_are_served_beside_a_failing_grammar(client: TestClient) -> None:
    assert client.post("/v1/completions", json=BODIES["/v1/completions"]).status_code == 500
    fine = client.post("/v1/completions", json={"prompt": "aaa", "max_tokens": 4})
    assert fine.status_code == 200 and fine.json()["choices"][0]["finish_reason"] == "length"
