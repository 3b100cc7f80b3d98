"""Token logprobs as each API writes them (the engine hands over moe.decode.sampling.TokenLogprobs).

    completions  {"tokens": [text], "token_logprobs": [lp | null], "top_logprobs": [null | {text: lp}],
                  "text_offset": [int]}        top dict: the chosen token and the k most likely (vLLM's shape)
    chat         {"content": [{"token", "logprob", "bytes", "top_logprobs": [{"token", "logprob", "bytes"}]}]}
    /generate    [{"token_id", "token", "logprob", "top_logprobs": [{"token_id", "token", "logprob"}]}]
    prompt       [null, {token id: {"logprob", "rank", "decoded_token"}}, ...]   vLLM's prompt_logprobs

A token's text is its own decoding; `bytes` are its raw bytes (a byte-level BPE token may hold part of a
UTF-8 character, which decodes to U+FFFD alone). -inf (a token the model cannot produce) is written as
-9999.0, as OpenAI and vLLM do: JSON has no infinity.
"""

from __future__ import annotations

import math
from functools import lru_cache
from typing import Any

from moe.decode.sampling import TokenLogprobs

FLOOR = -9999.0


def _finite(logprob: float) -> float:
    return FLOOR if math.isnan(logprob) or logprob < FLOOR else logprob


def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet, reversed: the printable character standing for each byte -> the byte."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, chars, strict=True)}


BYTE_DECODER = _byte_decoder()


class TokenText:
    """Each token id's text and bytes, decoded once."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        decoder = getattr(getattr(tokenizer, "backend_tokenizer", None), "decoder", None)
        self.byte_level = "ByteLevel" in repr(decoder)  # token strings spell bytes in GPT-2's alphabet
        self.text = lru_cache(maxsize=1 << 16)(self._text)
        self.bytes = lru_cache(maxsize=1 << 16)(self._bytes)

    def _text(self, token: int) -> str:
        return self.tokenizer.decode([token])

    def _bytes(self, token: int) -> list[int]:
        piece = self.tokenizer.convert_ids_to_tokens(token)
        if isinstance(piece, str):
            if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):  # sentencepiece byte
                return [int(piece[3:5], 16)]
            if self.byte_level and piece and all(c in BYTE_DECODER for c in piece):
                return [BYTE_DECODER[c] for c in piece]
        return list(self.text(token).encode("utf-8"))


def completion_logprobs(
    ids: list[int], entries: list[TokenLogprobs | None], texts: TokenText, offset: int = 0
) -> dict[str, list]:
    """ids[j] with entries[j] (None: no logprob, the first prompt token) -> completions' logprobs object;
    text_offset counts from `offset` (the characters of the choice's text before these tokens)."""
    tokens: list[str] = []
    token_logprobs: list[float | None] = []
    top_logprobs: list[dict[str, float] | None] = []
    text_offset: list[int] = []
    for token, entry in zip(ids, entries, strict=True):
        text = texts.text(token)
        tokens.append(text)
        text_offset.append(offset)
        offset += len(text)
        if entry is None:
            token_logprobs.append(None)
            top_logprobs.append(None)
            continue
        token_logprobs.append(_finite(entry.logprob))
        top = {text: _finite(entry.logprob)}
        for alternative, logprob in entry.top:
            top.setdefault(texts.text(alternative), _finite(logprob))
        top_logprobs.append(top)
    return {
        "tokens": tokens,
        "token_logprobs": token_logprobs,
        "top_logprobs": top_logprobs,
        "text_offset": text_offset,
    }


def chat_logprobs(entries: list[TokenLogprobs | None], texts: TokenText) -> dict[str, list]:
    content = []
    for entry in entries:
        if entry is None:
            continue
        content.append(
            {
                "token": texts.text(entry.token),
                "logprob": _finite(entry.logprob),
                "bytes": texts.bytes(entry.token),
                "top_logprobs": [
                    {"token": texts.text(t), "logprob": _finite(lp), "bytes": texts.bytes(t)} for t, lp in entry.top
                ],
            }
        )
    return {"content": content}


def generate_logprobs(entries: list[TokenLogprobs | None], texts: TokenText) -> list[dict[str, Any]]:
    out = []
    for entry in entries:
        if entry is None:
            continue
        out.append(
            {
                "token_id": entry.token,
                "token": texts.text(entry.token),
                "logprob": _finite(entry.logprob),
                "top_logprobs": [
                    {"token_id": t, "token": texts.text(t), "logprob": _finite(lp)} for t, lp in entry.top
                ],
            }
        )
    return out


def prompt_logprobs(entries: list[TokenLogprobs | None], k: int, texts: TokenText) -> list[dict[str, Any] | None]:
    """vLLM's `prompt_logprobs`: per prompt token None (the first) or {token id: {logprob, rank,
    decoded_token}} holding the prompt's token and the k most likely (rank: 1 = the most likely)."""
    out: list[dict[str, Any] | None] = []
    for entry in entries:
        if entry is None:
            out.append(None)
            continue
        tokens = {str(entry.token): {"logprob": _finite(entry.logprob), "rank": entry.rank}}
        for rank, (alternative, logprob) in enumerate(entry.top[:k], start=1):
            tokens.setdefault(str(alternative), {"logprob": _finite(logprob), "rank": rank})
        out.append({t: {**v, "decoded_token": texts.text(int(t))} for t, v in tokens.items()})
    return out


def trimmed(entries: list[TokenLogprobs | None], k: int) -> list[TokenLogprobs | None]:
    """The entries with at most k alternatives each (the engine computed as many as the largest request)."""
    return [None if e is None else TokenLogprobs(e.token, e.logprob, e.top[:k], e.rank) for e in entries]
