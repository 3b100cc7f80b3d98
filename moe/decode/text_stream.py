"""Detokenising one sequence as it grows, and its stop strings.

    stream = TextStream(tokenizer, stop=("\\n\\n",), eos_ids=(0,))
    piece, stopped = stream.add(token)     # the text that became final with this token
    text = stream.text                      # everything final so far (the stop string itself excluded)

Text is decoded from all generated ids each time (byte-level BPE can only be cut between whole
characters), then held back while it ends in an incomplete character or in something that may grow into
a stop string; a stop string cuts the text where it starts (or, with include_stop_str_in_output, where it ends).
Only the text that is not final yet is searched for stop strings (what was held back and the new piece: at most
the longest stop string plus the new characters), never the whole text again.

TextOptions are a request's detokenisation settings (vLLM's names and defaults).

pieces=False (nobody reads the text before the end, and there are no stop strings): `add` only records
the id and the text is decoded once, by `flush`; the final text is the same.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class TextOptions:
    skip_special_tokens: bool = True  # special tokens' text (EOS, template markers) left out of the text
    spaces_between_special_tokens: bool = True  # passed to the tokenizer's decode (slow tokenizers use it)
    include_stop_str_in_output: bool = False  # the text keeps the stop string (or the ending EOS's text)


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
        self.stop = stop
        self.eos_ids = eos_ids
        self.options = options
        self.ids: list[int] = []
        self.emitted = 0  # characters of text already handed out
        self._text = ""
        self._lazy = not pieces and not stop  # decode once, at the end

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
                    self._text = self._decode()
            return self.flush(), True
        self.ids.append(token)
        if self._lazy:
            return "", False
        text = self._text = self._decode()
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
        return piece

    def _decode(self) -> str:
        return self.tokenizer.decode(
            self.ids,
            skip_special_tokens=self.options.skip_special_tokens,
            spaces_between_special_tokens=self.options.spaces_between_special_tokens,
        )

    def _find_stop(self, text: str) -> int | None:
        """Where the text ends because of the earliest stop string in its not-yet-final part (its start, or
        its end with include_stop_str_in_output), or None."""
        best: tuple[int, int] | None = None  # (start, end) of the earliest stop string
        for stop in self.stop:
            index = text.find(stop, max(0, self.emitted - len(stop) + 1))
            if index >= 0 and (best is None or index < best[0]):
                best = (index, index + len(stop))
        if best is None:
            return None
        return best[1] if self.options.include_stop_str_in_output else best[0]

    def _held_back(self, text: str, end: int) -> int:
        """Length of the longest suffix of text[:end] that is a proper prefix of a stop string."""
        held = 0
        for stop in self.stop:
            for n in range(min(len(stop) - 1, end), held, -1):
                if stop.startswith(text[end - n : end]):
                    held = n
                    break
        return held
