"""How many of the project's files one request crosses, and how often it comes back to a file it already left.

A structure measure, not a speed one: the fewer returns, the more each concept lives in one file. The demo
model serves in-process (FastAPI's TestClient); one request is traced with a profile hook on every thread,
recording each Python function call (and each resumption of a generator or coroutine) made in `moe/`,
`server/` or `experts/`. Per thread, consecutive calls in the same file are one visit; a return is a visit to
a file the thread already visited. The routed forward counts as one call into moe/model/routed.py (moe/routed.py
in the layout before moe/ had rooms; its per-layer maths is one room's business; `--model-internals` records
inside it too). Start-up, the expert store's polling and a warm-up request stay out of the trace.

    python bench/request_walk.py                                  # POST /generate, 2 new tokens, token mode
    python bench/request_walk.py --new-tokens 8 --mode sequence --verbose
"""

from __future__ import annotations

import argparse
import dis
import functools
import sys
import tempfile
import threading
import time
import types
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

PACKAGES = ("moe", "server", "experts")


@functools.cache
def _entry_offset(code: types.CodeType) -> int:
    """Where a fresh frame of `code` stands at its "call" event: the offset of its RESUME (3.11+). Not 0: a
    function with a closure cell (MAKE_CELL) or a generator (RETURN_GENERATOR, POP_TOP) runs a few instructions
    before it, and a resumed generator or coroutine stands past it. 0 before 3.11 (no RESUME; a fresh frame is at
    -1)."""
    return next((i.offset for i in dis.get_instructions(code) if i.opname == "RESUME"), 0)


class CallTrace:
    """Calls into the project's files, per thread, in order."""

    calls: dict[int, list[tuple[str, str]]]

    recording = False
    entries_only = False  # --entries-only: leave out resumptions of generators and coroutines
    inside_forward = False  # with --model-internals off: calls made inside a routed forward are not recorded

    def __init__(self, model_internals: bool) -> None:
        self.calls = {}
        self._lock = threading.Lock()
        self._roots = tuple(str(REPO / p) + "/" for p in PACKAGES)
        # the routed forward's file: moe/model/routed.py, or moe/routed.py in the layout before moe/ had rooms (so
        # the same bench measures an older tree unmodified)
        routed = next((REPO / p for p in ("moe/model/routed.py", "moe/routed.py") if (REPO / p).exists()), None)
        self._forward = None if model_internals or routed is None else str(routed)
        self._depth: dict[int, int] = {}  # per thread: how deep inside RoutedModel.forward

    def hook(self, frame, event: str, arg) -> None:  # noqa: ARG002 (sys.setprofile's signature)
        if event not in ("call", "return") or not self.recording:
            return
        code = frame.f_code
        thread = threading.get_ident()
        is_forward = code.co_filename == self._forward and code.co_name == "forward" and "self" in frame.f_locals
        is_forward = is_forward and type(frame.f_locals["self"]).__name__ == "RoutedModel"
        depth = self._depth.get(thread, 0)
        if event == "return":
            if is_forward:
                self._depth[thread] = depth - 1
            return
        if is_forward:
            self._depth[thread] = depth + 1
        if depth > 0 or not code.co_filename.startswith(self._roots):
            return
        if self.entries_only and frame.f_lasti > _entry_offset(code):  # a generator or coroutine resumed
            return
        name = str(Path(code.co_filename).relative_to(REPO))
        with self._lock:
            self.calls.setdefault(thread, []).append((name, code.co_name))

    def install(self) -> None:
        """Hook every thread started from now on (the engine's, the app's portal) and this one; nothing is
        recorded until `recording` is set."""
        threading.setprofile(self.hook)
        sys.setprofile(self.hook)


def visits(calls: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """Consecutive calls in one file collapsed to one visit (file, first function)."""
    out: list[tuple[str, str]] = []
    for name, function in calls:
        if not out or out[-1][0] != name:
            out.append((name, function))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--new-tokens", type=int, default=2)
    parser.add_argument("--mode", default="token", choices=("token", "sequence", "pin", "off"))
    parser.add_argument("--verbose", action="store_true", help="print every visit")
    parser.add_argument(
        "--entries-only", action="store_true", help="count new calls only, not resumptions of coroutines (awaits)"
    )
    parser.add_argument(
        "--model-internals", action="store_true", help="also record the calls inside the routed forward (per layer)"
    )
    args = parser.parse_args()

    import torch
    from fastapi.testclient import TestClient

    from server.main import create_app
    from server.settings import Settings

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        settings = Settings(experts_dir=Path(tmp) / "experts", poll_interval_s=0, admission="off", device="cpu")
        routing = {"mode": args.mode, **({"expert": "math"} if args.mode == "pin" else {})}
        body = {"prompt": "Question: Tom has 5 apples.", "max_new_tokens": args.new_tokens, "routing": routing}
        trace = CallTrace(args.model_internals)
        trace.entries_only = args.entries_only
        trace.install()
        with TestClient(create_app(settings)) as client:
            # the engine thread finishes its step after the response is out (the rest of the pushes, then it waits
            # for work): give it that time after the warm-up and after the traced request, so every run records the
            # same walk, the warm-up's end left out (nothing else runs meanwhile)
            assert client.post("/generate", json=body).status_code == 200  # warm-up, untraced
            time.sleep(0.5)
            trace.recording = True
            response = client.post("/generate", json=body)
            time.sleep(0.5)
            trace.recording = False
            if response.status_code != 200:
                raise SystemExit(f"/generate answered {response.status_code}: {response.text}")
    files: set[str] = set()
    entries: Counter[str] = Counter()
    for calls in trace.calls.values():
        walk = visits(calls)
        files.update(name for name, _ in walk)
        entries.update(name for name, _ in walk)
        if args.verbose:
            print(f"-- thread {len(walk)} visits")
            for name, function in walk:
                print(f"   {name}:{function}")
    returns = sum(count - 1 for count in entries.values())
    print(
        f"POST /generate ({args.mode} mode, {args.new_tokens} new tokens): {len(files)} files, "
        f"{sum(entries.values())} visits, {returns} returns to a file already visited"
    )
    for name, count in entries.most_common():
        print(f"  {count:4d}  {name}")


if __name__ == "__main__":
    main()
