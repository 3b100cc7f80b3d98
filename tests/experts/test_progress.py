"""experts.progress: off a terminal, a bar redraws rarely instead of once per step."""

from __future__ import annotations

import io
import sys
import time

import pytest
from tqdm.auto import tqdm

from experts.progress import LOG_INTERVAL_S, progress_bar


def _redraws(make, steps: int = 200) -> int:
    stream = io.StringIO()
    bar = make(range(steps), file=stream, desc="train")
    for step in bar:
        time.sleep(0.004)  # ~1 s in all: tqdm's own 0.1 s interval redraws about 10 times
        bar.set_postfix(loss=f"{1 / (step + 1):.3f}", refresh=False)  # as experts.train does
    bar.close()
    return stream.getvalue().count("\r")


def test_off_a_terminal_a_bar_redraws_at_most_every_interval(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    assert progress_bar(file=io.StringIO()).mininterval == LOG_INTERVAL_S
    ours, plain = _redraws(progress_bar), _redraws(tqdm)
    assert ours <= 4 and plain >= 6, (ours, plain)  # first draws and the last, against one per 0.1 s


def test_on_a_terminal_a_bar_keeps_tqdms_interval(monkeypatch: pytest.MonkeyPatch) -> None:
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    monkeypatch.setattr(sys, "stderr", Terminal())
    assert progress_bar(file=io.StringIO()).mininterval == 0.1
