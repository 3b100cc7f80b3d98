"""server.prompts: the chat template's options (a generation prompt, continuing the last message, extra
template variables) and the fallback for tokenizers without a template; prompts capped in characters before
any tokenizing (413), and tokenizing off the event loop (a 50 MB prompt once froze /health for 60 s)."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from transformers import AutoTokenizer

from server.errors import BadRequestError
from server.prompts import PromptEncoder

MESSAGES = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]


@pytest.fixture
def tokenizer(tiny_model_dir: Path):
    return AutoTokenizer.from_pretrained(tiny_model_dir)


def _chat(tokenizer, **options) -> str:
    encoder = PromptEncoder(tokenizer, max_chars=10_000)
    try:
        return tokenizer.decode(asyncio.run(encoder.chat(MESSAGES, **options)))
    finally:
        encoder.close()


def test_chat_template_kwargs_are_template_variables(tokenizer) -> None:
    tokenizer.chat_template = "{{ greeting }}{% for m in messages %}{{ m['content'] }}|{% endfor %}"
    assert _chat(tokenizer, template_kwargs={"greeting": "Ahoy "}) == "Ahoy hi|hello|"
    assert _chat(tokenizer) == "hi|hello|"


def test_template_variables_of_the_wrong_type_are_a_400(tokenizer) -> None:
    tokenizer.chat_template = "{% for x in greeting %}{{ x }}{% endfor %}{{ messages[0]['content'] }}"
    assert _chat(tokenizer, template_kwargs={"greeting": ["a", "b"]}) == "abhi"
    with pytest.raises(BadRequestError) as info:
        _chat(tokenizer, template_kwargs={"greeting": 5})
    assert info.value.param == "chat_template_kwargs"


def test_generation_prompt_and_continue_final_message(tokenizer) -> None:
    assert _chat(tokenizer).endswith("assistant: hello\nassistant: ")
    assert _chat(tokenizer, add_generation_prompt=False).endswith("assistant: hello\n")
    assert _chat(tokenizer, add_generation_prompt=False, continue_final_message=True).endswith("assistant: hello")


def test_the_fallback_without_a_template_honours_the_same_options(tokenizer) -> None:
    tokenizer.chat_template = None
    assert _chat(tokenizer) == "user: hi\nassistant: hello\nassistant:"
    assert _chat(tokenizer, add_generation_prompt=False) == "user: hi\nassistant: hello\n"
    assert _chat(tokenizer, add_generation_prompt=False, continue_final_message=True) == "user: hi\nassistant: hello"


def _error(response, status: int) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert body["error"]["code"] == status and body["detail"] == body["error"]["message"]
    return body["error"]


@pytest.mark.parametrize(
    ("endpoint", "body", "param"),
    [
        ("/generate", {"prompt": "x" * 1001}, "prompt"),
        ("/v1/completions", {"prompt": "x" * 1001}, "prompt"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x" * 600}] * 2}, "messages"),
    ],
)
def test_a_prompt_over_max_prompt_chars_is_413_before_tokenizing(
    make_client, monkeypatch: pytest.MonkeyPatch, endpoint: str, body: dict, param: str
) -> None:
    client = make_client(max_prompt_chars=1000)
    tokenizer = client.app.state.tokenizer
    monkeypatch.setattr(tokenizer, "encode", lambda *a, **k: pytest.fail("tokenized a prompt over the limit"))
    error = _error(client.post(endpoint, json=body), 413)
    assert error["param"] == param and "--max-prompt-chars" in error["message"]


def test_tokenizing_runs_off_the_event_loop(client: TestClient, monkeypatch: pytest.MonkeyPatch) -> None:
    """While a prompt is being tokenized (here: held), the server answers /health."""
    tokenizer = client.app.state.tokenizer
    real_encode = tokenizer.encode
    entered, release = threading.Event(), threading.Event()

    def slow_encode(*args, **kwargs):
        entered.set()
        release.wait(30)
        return real_encode(*args, **kwargs)

    monkeypatch.setattr(tokenizer, "encode", slow_encode)
    answers: list[int] = []
    generating = threading.Thread(
        target=lambda: answers.append(client.post("/generate", json={"prompt": "hi", "max_new_tokens": 2}).status_code)
    )
    generating.start()
    assert entered.wait(30)
    started = time.monotonic()
    assert client.get("/health").status_code == 200  # the event loop is free
    assert time.monotonic() - started < 5
    release.set()
    generating.join(30)
    assert answers == [200]
