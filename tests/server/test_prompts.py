"""server.prompts: the chat template's options (a generation prompt, continuing the last message, extra
template variables) and the fallback for tokenizers without a template."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from transformers import AutoTokenizer

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


def test_generation_prompt_and_continue_final_message(tokenizer) -> None:
    assert _chat(tokenizer).endswith("assistant: hello\nassistant: ")
    assert _chat(tokenizer, add_generation_prompt=False).endswith("assistant: hello\n")
    assert _chat(tokenizer, add_generation_prompt=False, continue_final_message=True).endswith("assistant: hello")


def test_the_fallback_without_a_template_honours_the_same_options(tokenizer) -> None:
    tokenizer.chat_template = None
    assert _chat(tokenizer) == "user: hi\nassistant: hello\nassistant:"
    assert _chat(tokenizer, add_generation_prompt=False) == "user: hi\nassistant: hello\n"
    assert _chat(tokenizer, add_generation_prompt=False, continue_final_message=True) == "user: hi\nassistant: hello"
