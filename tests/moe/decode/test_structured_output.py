"""moe.decode.structured_output: grammars compile (or fail with a GrammarError naming the param), the batched bitmask
equals each matcher's own mask, and constrained decoding of a tiny random model yields text that matches."""

from __future__ import annotations

import json
import re

import pytest
import torch

from moe.decode.sampling import SamplingParams, sample_step, token_mask
from moe.decode.structured_output import GrammarCompiler, GrammarSpec, close_objects, consume
from moe.errors import GrammarError
from tests.tiny import tiny_backbone, tiny_tokenizer

SCHEMA = {
    "type": "object",
    "properties": {
        "color": {"enum": ["red", "green", "blue"]},
        "count": {"type": "integer", "minimum": 0, "maximum": 99},
        "ok": {"type": "boolean"},
    },
    "required": ["color", "count", "ok"],
}


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def compiler(tokenizer) -> GrammarCompiler:
    return GrammarCompiler(tokenizer, len(tokenizer) + 5, (tokenizer.eos_token_id,))  # logits wider than vocab


def test_close_objects_adds_additional_properties_false_where_unsaid() -> None:
    schema = {"type": "object", "properties": {"a": {"type": "object", "properties": {}}, "b": {"type": "string"}}}
    closed = close_objects(schema)
    assert closed["additionalProperties"] is False and closed["properties"]["a"]["additionalProperties"] is False
    assert "additionalProperties" not in closed["properties"]["b"]
    kept = close_objects({"type": "object", "properties": {}, "additionalProperties": True})
    assert kept["additionalProperties"] is True


@pytest.mark.parametrize(
    "spec",
    [
        GrammarSpec("json_schema", json.dumps({"type": "objekt"})),
        GrammarSpec("json_schema", json.dumps({"type": "string", "pattern": "(unclosed"})),
        GrammarSpec.regex("(a|"),
    ],
)
def test_bad_grammars_raise_grammar_error_naming_the_param(compiler: GrammarCompiler, spec: GrammarSpec) -> None:
    with pytest.raises(GrammarError) as info:
        compiler.check(spec)
    assert info.value.param == spec.param


def test_batched_bitmask_equals_each_matchers_own_mask(compiler: GrammarCompiler, tokenizer) -> None:
    matchers = [compiler.matcher(GrammarSpec.json_schema(SCHEMA)), None, compiler.matcher(GrammarSpec.regex("ab+c"))]
    allowed = compiler.allowed_tokens(matchers)
    assert allowed.rows == [0, 2]
    mask = token_mask(allowed.bitmask, compiler.vocab_size)
    for r, i in enumerate(allowed.rows):
        alone = compiler.allowed_tokens([matchers[i]])
        assert torch.equal(token_mask(alone.bitmask, compiler.vocab_size)[0], mask[r])
    assert not mask[:, len(tokenizer) :].any()  # ids past the tokenizer's vocabulary are never allowed
    first = {tokenizer.decode([t]) for t in mask[1].nonzero().flatten().tolist()}
    assert first and all("ab+c".startswith(piece) or re.fullmatch("ab+c", piece) for piece in first)
    assert compiler.allowed_tokens([None, None]) is None


@pytest.mark.parametrize(
    ("spec", "check"),
    [
        (GrammarSpec.json_schema(SCHEMA), lambda text: set(json.loads(text)) == {"color", "count", "ok"}),
        (GrammarSpec.regex(r"(yes|no), [0-9]{1,2} (apples|pears)"), None),
    ],
)
def test_constrained_decoding_of_a_random_model_matches(compiler: GrammarCompiler, tokenizer, spec, check) -> None:
    model = tiny_backbone(vocab=compiler.vocab_size)
    eos = (tokenizer.eos_token_id,)
    params = [SamplingParams(temperature=1.0, seed=s) for s in range(4)]
    gens = [p.generator() for p in params]
    matchers = [compiler.matcher(spec) for _ in params]
    ids = [tokenizer.encode("Q:") for _ in params]
    done = [False] * len(params)
    with torch.no_grad():
        for _ in range(60):
            logits = model(torch.tensor(ids)).logits[:, -1]
            live = [i for i in range(len(params)) if not done[i]]
            out = sample_step(
                logits[live],
                [params[i] for i in live],
                [gens[i] for i in live],
                [0] * len(live),
                eos,
                allowed=compiler.allowed_tokens([matchers[i] for i in live]),
            )
            for i, token in zip(live, out.tokens, strict=True):
                consume(matchers[i], token, eos)
                done[i] = token in eos
            for i in range(len(params)):
                ids[i].append(out.tokens[live.index(i)] if i in live else eos[0])
            if all(done):
                break
    assert all(done)
    for row in ids:
        text = tokenizer.decode(row[2:], skip_special_tokens=True)
        if check is None:
            assert re.fullmatch(r"(yes|no), [0-9]{1,2} (apples|pears)", text), text
        else:
            assert check(text), text
