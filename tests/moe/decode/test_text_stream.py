"""TextStream with a real byte-level BPE tokenizer: stop strings across token boundaries, held-back prefixes,
incomplete UTF-8 characters, and EOS."""

from __future__ import annotations

import random
from functools import partial
from typing import Any

import pytest

from moe.decode.text_stream import TextOptions, TextStream, ids_to_text
from tests.tiny import tiny_tokenizer

EOS = 0


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


def stream_all(tokenizer, text: str, stop: tuple[str, ...]) -> tuple[list[str], bool, TextStream]:
    """Feed text's tokens one at a time until a stop; then flush, as the engine does at the end."""
    stream = TextStream(tokenizer, stop, (EOS,))
    pieces: list[str] = []
    for token in tokenizer.encode(text):
        piece, stopped = stream.add(token)
        pieces.append(piece)
        if stopped:
            return pieces, True, stream
    pieces.append(stream.flush())
    return pieces, False, stream


CASES = [
    ("no stop", "The quick brown fox jumps over the lazy dog.", ()),
    ("stop inside one token", "The quick brown fox jumps over the lazy dog.", ("ump",)),
    ("stop across three tokens", "The quick brown fox jumps over the lazy dog.", ("own f",)),
    ("stop at the very start", "The quick brown fox", ("The",)),
    ("stop at the very end", "The quick brown fox jumps over the lazy dog.", ("dog.",)),
    ("a prefix that never completes", "The quick brown fox jumps over the lazy dog.", ("lazy cat", "zebra")),
    ("the earliest of two stops", "The quick brown fox jumps over the lazy dog.", ("lazy", "quick")),
    ("overlapping stops", "abababc", ("babc", "abc")),
    ("a stop of one character", "a\n\nb", ("\n",)),
    ("multi-byte characters", "naïve café 😀 done", ()),
    ("a stop after multi-byte characters", "naïve café 😀 done", ("😀",)),
    ("a stop that is a multi-byte prefix", "naïve café 😀 done", ("é 😀 do",)),
]


@pytest.mark.parametrize(("case", "text", "stop"), CASES, ids=[c[0] for c in CASES])
def test_pieces_add_up_to_the_text_cut_at_the_first_stop(tokenizer, case: str, text: str, stop: tuple) -> None:
    assert tokenizer.decode(tokenizer.encode(text)) == text
    starts = [text.find(s) for s in stop if s in text]
    want = text[: min(starts)] if starts else text
    pieces, stopped, stream = stream_all(tokenizer, text, stop)
    assert "".join(pieces) == want == stream.text
    assert stopped == bool(starts)
    assert all("\ufffd" not in piece for piece in pieces), "never half a character"


def test_text_that_may_grow_into_a_stop_is_held_back(tokenizer) -> None:
    # 'The', ' qu', 'ick', ' b', 'row', 'n', ' f', ...: "brown" may still become "brown cow"
    pieces, stopped, _ = stream_all(tokenizer, "The quick brown fox", ("brown cow",))
    assert pieces[:7] == ["The", " qu", "ick", " ", "", "", "brown f"]
    assert not stopped


def test_an_incomplete_character_waits_for_its_last_byte(tokenizer) -> None:
    stream = TextStream(tokenizer)
    pieces = [stream.add(token)[0] for token in tokenizer.encode("caf😀é")]
    assert "".join(pieces) == "caf😀é" == stream.text
    assert pieces[-6:] == ["", "", "", "😀", "", "é"], "a 4-byte and a 2-byte character, each whole or nothing"


def test_eos_flushes_what_was_held_back_and_is_not_text(tokenizer) -> None:
    stream = TextStream(tokenizer, ("lazy cat",), (EOS,))
    pieces = [stream.add(token)[0] for token in tokenizer.encode("over the laz")]
    assert "".join(pieces) == "over the ", "'laz' may still become 'lazy cat'"
    assert stream.add(EOS) == ("laz", True)
    assert stream.text == "over the laz" and EOS not in stream.ids
    assert stream.flush() == "", "nothing is handed out twice"


def test_flush_at_the_length_limit_hands_out_the_rest(tokenizer) -> None:
    stream = TextStream(tokenizer, ("dog!",), (EOS,))
    text = "".join(stream.add(token)[0] for token in tokenizer.encode("the lazy do"))
    assert text == "the lazy " and stream.flush() == "do" and stream.text == "the lazy do"


def test_a_stop_string_is_cut_where_it_starts_even_inside_a_token(tokenizer) -> None:
    pieces, stopped, stream = stream_all(tokenizer, "The quick brown fox", ("own f",))
    assert stopped and stream.text == "The quick br" and "".join(pieces) == "The quick br"


# --- cost per token (issue 24 item 1) ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "stop",
    [
        (),
        ("zebra crossing", "lazy cat"),  # prefixes that show up and never complete
        ("o" * 200, "The quick brown fox jumps over the lazy cat"),  # long ones, "o" everywhere in the text
    ],
)
def test_a_tokens_cost_does_not_grow_with_the_text_already_emitted(tokenizer, stop: tuple[str, ...]) -> None:
    """The review: the hold-back check re-scanned the emitted text at every token (and every token decoded all
    ids again). Work per token (ids decoded + characters searched: TextStream.work) is the same at token 1500
    as at token 100, and the text is exactly the whole decode."""
    text = "The quick brown fox jumps over the lazy dog. naïve café 😀 done. " * 60
    ids = tokenizer.encode(text)
    assert len(ids) > 1500
    stream = TextStream(tokenizer, stop, (EOS,))
    costs, pieces = [], []
    for token in ids:
        before = stream.work
        piece, stopped = stream.add(token)
        assert not stopped
        pieces.append(piece)
        costs.append(stream.work - before)
    pieces.append(stream.flush())
    assert "".join(pieces) == text == stream.text
    early, late = max(costs[50:250]), max(costs[-200:])
    assert late <= early, f"a late token cost {late}, an early one at most {early}"
    bound = 3 * 8 + 3 * sum(len(s) for s in stop) + 16  # a few ids per window, each stop's tail, new characters
    assert max(costs) <= bound + max(len(s) for s in stop or ("",)) ** 2 // 2


@pytest.mark.parametrize("skip_special_tokens", [True, False])
def test_ids_to_text_is_the_tokenizers_decode(tokenizer, skip_special_tokens: bool) -> None:
    """The fast tokenizer's backend call (what a stream decodes with) gives tokenizer.decode's string for any ids:
    special tokens, cut UTF-8 characters, a lone space, nothing."""
    options = TextOptions(skip_special_tokens=skip_special_tokens)
    fast = ids_to_text(tokenizer, options)
    assert isinstance(fast, partial) and fast.func == tokenizer.backend_tokenizer.decode  # the backend path is taken
    ids = tokenizer.encode("naïve café 😀 done. The quick brown fox, jumps!  ") + [EOS]
    rng = random.Random(0)
    windows = [[], [EOS], [EOS, *ids[:3], EOS], ids] + [
        [rng.randrange(len(tokenizer)) for _ in range(rng.randrange(1, 6))] for _ in range(300)
    ]
    windows += [ids[i : i + n] for i in range(len(ids)) for n in (1, 2, 3)]
    for window in windows:
        expected = tokenizer.decode(window, skip_special_tokens=skip_special_tokens)
        assert fast(window) == expected, window


def test_a_tokenizer_that_cleans_up_spaces_or_decodes_its_own_way_keeps_its_decode(tokenizer) -> None:
    """Only the stock fast decode is bypassed: clean_up_tokenization_spaces or an overridden decode go through
    tokenizer.decode, and the stream's text is what that decode says."""
    cleaning = tiny_tokenizer()
    cleaning.clean_up_tokenization_spaces = True
    assert ids_to_text(cleaning, TextOptions()).func == cleaning.decode

    class Shouting(type(tokenizer)):
        def decode(self, token_ids: list[int], **kwargs: Any) -> str:
            return super().decode(token_ids, **kwargs).upper()

    shouting = tiny_tokenizer()
    shouting.__class__ = Shouting
    assert ids_to_text(shouting, TextOptions()).func == shouting.decode
    pieces, stopped, stream = stream_all(shouting, "The quick brown fox", ("BROWN",))
    assert stopped and "".join(pieces) == stream.text == "THE QUICK "
