"""Detokenising one sequence as it grows, and its stop strings.

    stream = TextStream(tokenizer, stop=("\\n\\n",), eos_ids=(0,))
    piece, stopped = stream.add(token)     # the text that became final with this token
    text = stream.text                      # everything final so far (the stop string itself excluded)

Text is decoded from all generated ids each time (byte-level BPE can only be cut between whole
characters), then held back while it ends in an incomplete character or in something that may grow into
a stop string; a stop string cuts the text where it starts. Only the text that is not final yet is searched
for stop strings (what was held back and the new piece: at most the longest stop string plus the new
characters), never the whole text again.

pieces=False (nobody reads the text before the end, and there are no stop strings): `add` only records
the id and the text is decoded once, by `flush`; the final text is the same.
"""

from __future__ import annotations

from typing import Any


class TextStream:
    def __init__(
        self, tokenizer: Any, stop: tuple[str, ...] = (), eos_ids: tuple[int, ...] = (), pieces: bool = True
    ) -> None:
        self.tokenizer = tokenizer
        self.stop = stop
        self.eos_ids = eos_ids
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
            return self.flush(), True
        self.ids.append(token)
        if self._lazy:
            return "", False
        text = self._text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
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
            self._text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        piece = self._text[self.emitted :]
        self.emitted = len(self._text)
        return piece

    def _find_stop(self, text: str) -> int | None:
        """Index where the earliest stop string starts in the not-yet-final part of the text, or None."""
        best: int | None = None
        for stop in self.stop:
            index = text.find(stop, max(0, self.emitted - len(stop) + 1))
            if index >= 0 and (best is None or index < best):
                best = index
        return best

    def _held_back(self, text: str, end: int) -> int:
        """Length of the longest suffix of text[:end] that is a proper prefix of a stop string."""
        held = 0
        for stop in self.stop:
            for n in range(min(len(stop) - 1, end), held, -1):
                if stop.startswith(text[end - n : end]):
                    held = n
                    break
        return held
