"""Progress bars that suit where they are written.

On a terminal a bar redraws in place; in a log file (stderr redirected, a CI job, a container) every redraw
is one more line, and a training run wrote 80 KB of them for one expert. Off a terminal, a bar here
redraws at most once per LOG_INTERVAL_S.
"""

from __future__ import annotations

import sys
from typing import Any

from tqdm.auto import tqdm

LOG_INTERVAL_S = 30.0


def progress_bar(iterable: Any = None, **kwargs: Any) -> tqdm:
    """tqdm(iterable, **kwargs), redrawn at most every LOG_INTERVAL_S when stderr is not a terminal."""
    if not sys.stderr.isatty():
        kwargs.setdefault("mininterval", LOG_INTERVAL_S)
    return tqdm(iterable, **kwargs)
