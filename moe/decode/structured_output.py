"""Structured output: a row's tokens constrained to a JSON schema, to any JSON object, or to a regex.

    compiler = GrammarCompiler(tokenizer, vocab_size, stop_ids)    # once per served model
    spec = GrammarSpec.json_schema(schema)                          # or .json_object(), .regex(pattern)
    compiler.check(spec)                      # GrammarError (what is wrong, and which param) before queueing
    matchers = [compiler.matcher(spec), None, ...]                  # one per constrained row, None: free
    allowed = compiler.allowed_tokens(matchers)     # AllowedTokens -> moe.decode.sampling masks those rows' logits
    consume(matchers[i], token, stop_ids)           # after sampling: row i's grammar moves past its token

The grammar engine is llguidance (vLLM's `guidance` backend): it compiles lazily (no wait for large
schemas), reports bad schemas as values, handles maxLength, escapes, integer bounds and `pattern`
correctly, and has no dependency (xgrammar needs triton, about 1 GB; outlines-core cannot load a local
vocabulary). Masks are computed in Rust for all constrained rows at once (LLExecutor, threads, the GIL
released) into one [R, ceil(V / 32)] int32 bitmask; moe.decode.sampling unpacks it in torch over those rows.

Semantics of masking (what `allowed_tokens` + `moe.decode.sampling` compute):

    for i in range(B):
        if matchers[i] is None: continue
        for v in range(V): if v is not a token the grammar accepts next: logits[i, v] = -inf
        (once the grammar is complete, only the stop tokens are accepted: the row ends as any row does)

JSON is generated compactly (no free whitespace: a small model offered free whitespace emits it forever;
separators as json.dumps writes them), keys in the schema's order, and objects closed (no properties
beyond those listed) unless the schema says otherwise, as OpenAI's strict mode and vLLM do.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Collection
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Literal

import llguidance
import llguidance.hf
import llguidance.torch

from moe.decode.sampling import AllowedTokens
from moe.errors import GrammarError

JSON_OPTIONS: dict[str, Any] = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


@dataclass(frozen=True)
class GrammarSpec:
    """What a request constrains its output to; hashable, so compiled grammars are cached by it.

    param: the request field it came from, named in errors (response_format, guided_regex, ...)."""

    kind: Literal["json_object", "json_schema", "regex"]
    source: str = ""  # the schema as JSON text (key order kept), or the regex
    param: str = "response_format"

    @classmethod
    def json_schema(cls, schema: dict[str, Any], param: str = "response_format") -> GrammarSpec:
        if not isinstance(schema, dict):
            raise GrammarError(f"a JSON schema must be an object, got {type(schema).__name__}", param)
        return cls("json_schema", json.dumps(close_objects(schema)), param)

    @classmethod
    def json_object(cls, param: str = "response_format") -> GrammarSpec:
        return cls("json_object", "", param)

    @classmethod
    def regex(cls, pattern: str, param: str = "guided_regex") -> GrammarSpec:
        return cls("regex", pattern, param)


def close_objects(node: Any) -> Any:
    """The schema with `additionalProperties: false` on every object schema that lists properties and says
    nothing about others (vLLM's process_for_additional_properties; OpenAI's strict mode requires it)."""
    if isinstance(node, list):
        return [close_objects(item) for item in node]
    if not isinstance(node, dict):
        return node
    out = {key: close_objects(value) for key, value in node.items()}
    if ("properties" in out or "patternProperties" in out) and "additionalProperties" not in out:
        out["additionalProperties"] = False
    return out


class GrammarCompiler:
    """The tokenizer's vocabulary, converted once; grammars validated and cached per spec.

    vocab_size is the model's logits width (it may exceed the tokenizer's vocabulary: those ids are never
    allowed); stop_ids are the tokens that end a sequence once its grammar is complete."""

    def __init__(self, tokenizer: Any, vocab_size: int, stop_ids: tuple[int, ...]) -> None:
        self.vocab_size = vocab_size
        self._tokenizer = llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab_size, eos_token=list(stop_ids))
        self._grammar = lru_cache(maxsize=256)(self._build)
        self._executor = llguidance.LLExecutor()
        self._lock = threading.Lock()  # the cache is filled from the HTTP side and read by the engine

    def _build(self, spec: GrammarSpec) -> str:
        try:
            if spec.kind == "json_object":
                grammar = llguidance.LLMatcher.grammar_from_json_schema({"type": "object"}, defaults=JSON_OPTIONS)
            elif spec.kind == "json_schema":
                grammar = llguidance.LLMatcher.grammar_from_json_schema(spec.source, defaults=JSON_OPTIONS)
            else:
                grammar = llguidance.LLMatcher.grammar_from_regex(spec.source)
        except (ValueError, TypeError) as e:  # llguidance: not a JSON object, or not a string
            raise GrammarError(f"cannot compile the {_describe(spec)}: {e}", spec.param) from e
        is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar, self._tokenizer)
        if is_error:
            raise GrammarError(f"cannot compile the {_describe(spec)}: {messages[0]}", spec.param)
        return grammar

    def check(self, spec: GrammarSpec) -> None:
        """Raise GrammarError when the spec cannot be served (call it before queueing the request)."""
        self.matcher(spec)

    def matcher(self, spec: GrammarSpec) -> llguidance.LLMatcher:
        """A fresh matcher for one sequence."""
        with self._lock:
            grammar = self._grammar(spec)
        matcher = llguidance.LLMatcher(self._tokenizer, grammar, log_level=0)
        if matcher.is_error():
            raise GrammarError(f"cannot compile the {_describe(spec)}: {matcher.get_error()}", spec.param)
        return matcher

    def allowed_tokens(self, matchers: list[llguidance.LLMatcher | None]) -> AllowedTokens | None:
        """The next-token bitmask of every constrained row (None when no row is constrained)."""
        rows = [i for i, m in enumerate(matchers) if m is not None]
        if not rows:
            return None
        bitmask = llguidance.torch.allocate_token_bitmask(len(rows), self.vocab_size)  # [R, ceil(V / 32)]
        llguidance.torch.fill_next_token_bitmask_par(
            self._executor, [(matchers[i], r) for r, i in enumerate(rows)], bitmask
        )
        return AllowedTokens(rows, bitmask)


def consume(matcher: llguidance.LLMatcher, token: int, stop_ids: Collection[int]) -> None:
    """Move one row's grammar past its sampled token (a stop token ends the row instead)."""
    if token in stop_ids:
        return
    if not matcher.consume_token(token):
        raise RuntimeError(f"the grammar rejected token {token}: {matcher.get_error()}")


def _describe(spec: GrammarSpec) -> str:
    return {"json_object": "json_object format", "json_schema": "JSON schema", "regex": "regex"}[spec.kind]
