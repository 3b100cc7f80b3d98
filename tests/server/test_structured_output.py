"""Structured output through the official `openai` client against the demo model served for real:
response_format json_schema (20 seeded samples parse and validate), json_object, guided_regex, and 400s
naming the param for formats that cannot be compiled."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator

import jsonschema
import openai
import pytest
from transformers import AutoTokenizer

from server.settings import DEMO_MODEL_DIR
from tests.server.conftest import LiveServer

# The demo model never closes an unbounded string or integer by itself: bound them (as a real schema should).
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "pattern": "^[A-Za-z ]{1,12}$"},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "likes": {"type": "array", "items": {"enum": ["math", "code", "otters"]}, "minItems": 1, "maxItems": 3},
        "member": {"type": "boolean"},
    },
    "required": ["name", "age", "likes", "member"],
}
ANSWER = r"(yes|no), [0-9]{1,3} (apples|pears)"


@pytest.fixture(scope="module")
def demo_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    server = LiveServer(DEMO_MODEL_DIR, tmp_path_factory.mktemp("demo") / "experts", PLUGMOE_MAX_N="20")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def client(demo_server: LiveServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{demo_server.url}/v1", api_key="unused", max_retries=0)


def test_json_schema_20_seeded_samples_parse_and_validate(client: openai.OpenAI) -> None:
    out = client.chat.completions.create(
        model="plugmoe-demo",
        messages=[{"role": "user", "content": "Describe a person."}],
        response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}},
        n=20,
        seed=0,
        temperature=1.0,
        max_tokens=96,
    )
    assert len(out.choices) == 20
    texts = [choice.message.content for choice in out.choices]
    for choice, text in zip(out.choices, texts, strict=True):
        assert choice.finish_reason == "stop", text
        jsonschema.validate(json.loads(text), PERSON)
        assert list(json.loads(text)) == list(PERSON["properties"])  # keys in the schema's order
    assert len(set(texts)) > 10  # seeded samples, not one answer repeated


def test_json_schema_streamed(client: openai.OpenAI) -> None:
    chunks = client.chat.completions.create(
        model="plugmoe-demo",
        messages=[{"role": "user", "content": "Describe a person."}],
        response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}},
        seed=3,
        max_tokens=96,
        stream=True,
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    jsonschema.validate(json.loads(text), PERSON)


def test_json_object_output_is_an_object(client: openai.OpenAI) -> None:
    """Left alone, the demo model never closes the key string it opens (every choice ends on max_tokens); a
    logit_bias towards `"` and `}` lets it close, and then every choice is a JSON object."""
    tokenizer = AutoTokenizer.from_pretrained(DEMO_MODEL_DIR)
    bias = {str(tokenizer.convert_tokens_to_ids(t)): 12 for t in ('"', "}")}
    for extra, closes in (({}, False), ({"logit_bias": bias}, True)):
        out = client.completions.create(
            model="plugmoe-demo",
            prompt="A JSON record: ",
            n=8,
            seed=0,
            max_tokens=48,
            extra_body={"response_format": {"type": "json_object"}, **extra},
        )
        for choice in out.choices:
            assert choice.text.startswith('{"'), choice.text
            if closes:
                assert choice.finish_reason == "stop" and isinstance(json.loads(choice.text), dict), choice.text


def test_guided_regex(client: openai.OpenAI) -> None:
    out = client.completions.create(
        model="plugmoe-demo",
        prompt="Question: do you like fruit?\nAnswer:",
        n=8,
        seed=0,
        max_tokens=32,
        extra_body={"guided_regex": ANSWER},
    )
    for choice in out.choices:
        assert choice.finish_reason == "stop" and re.fullmatch(ANSWER, choice.text), choice.text


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        (
            {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "objekt"}}}},
            "response_format.json_schema.schema",
        ),
        ({"response_format": {"type": "json_schema"}}, "response_format.json_schema"),
        ({"guided_regex": "(unclosed"}, "guided_regex"),
        ({"guided_regex": "a+", "response_format": {"type": "json_object"}}, "guided_regex"),
    ],
)
def test_formats_that_cannot_compile_are_400_naming_the_param(client: openai.OpenAI, extra: dict, param: str) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(
            model="plugmoe-demo", messages=[{"role": "user", "content": "hi"}], max_tokens=8, extra_body=extra
        )
    assert info.value.param == param
