"""Detokenising one sequence as it grows, and its stop strings.

    stream = TextStream(tokenizer, stop=("\\n\\n",), eos_ids=(0,))
    piece, stopped = stream.add(token)     # the text that became final with this token
    text = stream.text                      # everything final so far (the stop string itself excluded)

Text is decoded incrementally (as vLLM does): each token decodes a short window of ids, the few ids before the
newest settled ones (so a tokenizer that joins tokens with spaces or cleans them up sees its context) and the
ids since, and the text the window adds past its settled part is appended; a window that ends in an incomplete
character (byte-level BPE can only be cut between whole characters) is not settled and grows with the next
token. The text is then held back while it ends in an incomplete character or in something that may grow into
a stop string; a stop string cuts the text where it starts (or, with include_stop_str_in_output, where it ends).
Only the text that is not final yet is searched for stop strings (what was held back and the new piece: at most
the longest stop string plus the new characters), never the whole text again. So a token's cost (`work`: ids
decoded plus characters searched) does not grow with the text already emitted; the server bounds the stop
strings themselves (count, length, total).

TextOptions are a request's detokenisation settings (vLLM's names and defaults). Ids become text through
`ids_to_text`: the tokenizer's own `decode` with those settings, or, for a Hugging Face fast tokenizer whose `decode`
is the stock one, the Rust backend's `decode` that it wraps (the same string, without the wrapper's per-call Python:
a decode step detokenises two short windows per row).

pieces=False (nobody reads the text before the end, and there are no stop strings): `add` only records
the id and the text is decoded once, by `flush`; the final text is the same.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast


@dataclass(frozen=True)
class TextOptions:
    skip_special_tokens: bool = True  # special tokens' text (EOS, template markers) left out of the text
    spaces_between_special_tokens: bool = True  # passed to the tokenizer's decode (slow tokenizers use it)
    include_stop_str_in_output: bool = False  # the text keeps the stop string (or the ending EOS's text)


def ids_to_text(tokenizer: Any, options: TextOptions) -> Callable[[list[int]], str]:
    """ids -> tokenizer.decode(ids, skip_special_tokens=..., spaces_between_special_tokens=...), as one callable.

    A Hugging Face fast tokenizer whose `decode` and `_decode` are transformers' own and that cleans up no spaces
    runs nothing but its backend's `decode(ids, skip_special_tokens)` (spaces_between_special_tokens is a slow
    tokenizer's setting; the fast `_decode` ignores it): that call is returned, the same string without the wrapper's
    conversions and keyword handling (~0.5 us a call instead of ~2.3 us on the demo tokenizer). Any other tokenizer
    (a slow one, a subclass that overrides decoding, clean_up_tokenization_spaces set) goes through its `decode`."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    stock = (
        isinstance(tokenizer, PreTrainedTokenizerFast)
        and type(tokenizer).decode is PreTrainedTokenizerBase.decode
        and type(tokenizer)._decode is PreTrainedTokenizerFast._decode
        and not getattr(tokenizer, "clean_up_tokenization_spaces", False)
        and callable(getattr(backend, "decode", None))
    )
    if stock:
        return partial(backend.decode, skip_special_tokens=options.skip_special_tokens)
    return partial(
        tokenizer.decode,
        skip_special_tokens=options.skip_special_tokens,
        spaces_between_special_tokens=options.spaces_between_special_tokens,
    )


class TextStream:
    def __init__(
        self,
        tokenizer: Any,
        stop: tuple[str, ...] = (),
        eos_ids: tuple[int, ...] = (),
        options: TextOptions = TextOptions(),
        pieces: bool = True,
    ) -> None:
        self.tokenizer = tokenizer
        self.stop = tuple(s for s in stop if s)  # an empty stop string stops nothing
        self.eos_ids = eos_ids
        self.options = options
        self._ids_to_text = ids_to_text(tokenizer, options)
        self.ids: list[int] = []
        self.emitted = 0  # characters of text already handed out
        self._text = ""
        self._lazy = not pieces and not self.stop  # decode once, at the end
        # incremental decoding: ids[:_read] are settled as _settled (the text they decode to, for good); the
        # window decoded each token is ids[_prefix:], whose settled head ids[_prefix:_read] decodes to _head
        self._prefix = 0
        self._read = 0
        self._settled = ""
        self._head = ""
        self.work = 0  # ids decoded + characters searched for stop strings, so far: what the stream has cost
        self.final: str | None = None  # the whole text, once `flush` has ended the stream

    @property
    def text(self) -> str:
        """The text handed out so far."""
        return self._text[: self.emitted]

    def add(self, token: int) -> tuple[str, bool]:
        """Record one generated token -> (newly final text, whether a stop string or EOS ended the text)."""
        if token in self.eos_ids:
            if self.options.include_stop_str_in_output:
                self.ids.append(token)
                if not self._lazy:
                    self._text = self._decode_new()
            return self.flush(), True
        self.ids.append(token)
        if self._lazy:
            return "", False
        text = self._text = self._decode_new()
        cut = self._find_stop(text)
        if cut is not None:
            self._text = text[:cut]
            return self.flush(), True
        # an incomplete UTF-8 character waits for the rest; the text before it may still grow into a stop string
        complete = len(text) - 1 if text.endswith("\ufffd") else len(text)
        ready = complete - self._held_back(text, complete)
        if ready <= self.emitted:
            return "", False
        piece = text[self.emitted : ready]
        self.emitted = ready
        return piece, False

    def flush(self) -> str:
        """Hand out whatever was held back (the sequence ends here)."""
        if self._lazy:
            self._text = self._decode()
        piece = self._text[self.emitted :]
        self.emitted = len(self._text)
        self.final = self._text
        return piece

    def _decode(self, ids: list[int] | None = None) -> str:
        ids = self.ids if ids is None else ids
        self.work += len(ids)
        return self._ids_to_text(ids)

    def _decode_new(self) -> str:
        """The whole text so far, decoding only the window ids[_prefix:] (see the module docstring)."""
        window = self._decode(self.ids[self._prefix :])
        if not window.startswith(self._head):  # the tokenizer rewrote the settled head: decode it all, once
            window, self._prefix, self._head, self._settled = self._decode(), 0, "", ""
        text = self._settled + window[len(self._head) :]
        if not text.endswith("\ufffd"):  # whole characters: settle, and the next window starts nearer the end
            self._prefix, self._read = self._read, len(self.ids)
            self._settled = text
            self._head = self._decode(self.ids[self._prefix : self._read])
        return text

    def _find_stop(self, text: str) -> int | None:
        """Where the text ends because of the earliest stop string in its not-yet-final part (its start, or
        its end with include_stop_str_in_output), or None."""
        best: tuple[int, int] | None = None  # (start, end) of the earliest stop string
        for stop in self.stop:
            start = max(0, self.emitted - len(stop) + 1)
            self.work += len(text) - start
            index = text.find(stop, start)
            if index >= 0 and (best is None or index < best[0]):
                best = (index, index + len(stop))
        if best is None:
            return None
        return best[1] if self.options.include_stop_str_in_output else best[0]

    def _held_back(self, text: str, end: int) -> int:
        """Length of the longest suffix of text[:end] that is a proper prefix of a stop string: only the last
        len(stop) - 1 characters are looked at, and only where the stop string's first character is."""
        held = 0
        for stop in self.stop:
            low = max(0, end - len(stop) + 1)
            self.work += end - low
            i = text.find(stop[0], low, end)  # the earliest candidate is the longest suffix
            while i >= 0 and end - i > held:
                self.work += end - i
                if stop.startswith(text[i:end]):
                    held = end - i
                    break
                i = text.find(stop[0], i + 1, end)
        return held
