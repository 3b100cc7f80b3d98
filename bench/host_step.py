"""The scheduler's host work per decode step, with the model made negligible: what moe.decode costs around the
forward (sampling, detokenising, stop and length checks, events, the decoder's inputs and its one trace read).

A tiny random llama (hidden 32, 2 layers) with the demo tokenizer's vocabulary runs `--rows` streaming rows (each row
has an output, as the server's requests, so every token makes an Event) of `--prompt-tokens`-token demo prompts and
`--new-tokens` greedy tokens with min_new_tokens set (bench/step_profile.py's requests), routing off, one torch
thread, in the main thread. Each run times the calling thread's CPU (time.thread_time: a core lost to other work
does not count) per decode step, in all and in the decoder's forward (StaticDecoder._run), and per phase; the run
with the least CPU of `--repeats` is printed, so a shared machine's interference is filtered out.

    python bench/host_step.py
    PYTHONPATH=/tmp/base python /tmp/base/bench/host_step.py     # an older checkout (this file copied there)

The generated text's digest is printed: two trees that must decode alike print the same one.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402

from bench.peer import demo_prompts  # noqa: E402
from moe import RoutedModel, RouterConfig, RoutingSpec  # noqa: E402
from moe.decode.sampling import SamplingParams  # noqa: E402
from moe.decode.scheduler import Scheduler  # noqa: E402
from moe.decode.sequence import Event, GenerationRequest, Sequence  # noqa: E402
from moe.decode.static_decoder import StaticDecoder  # noqa: E402
from tests.tiny import tiny_backbone  # noqa: E402


class Collected:
    """A row's output: its events kept (the server's RequestHandle hands them to the event loop)."""

    cancelled = False

    def __init__(self) -> None:
        self.events: list[Event] = []

    def push(self, event: Event) -> None:
        self.events.append(event)


def run(model: RoutedModel, tokenizer: Any, prompts: list[list[int]], new_tokens: int) -> dict[str, Any]:
    """One generation of every prompt; the admission and first decode step untimed."""
    decoder = StaticDecoder(model, len(prompts), max(len(p) for p in prompts) + new_tokens + 1)
    scheduler = Scheduler(model, tokenizer, decoder)
    sampling = SamplingParams(min_new_tokens=new_tokens)
    seqs = [
        Sequence(GenerationRequest(p, new_tokens, sampling, routing=RoutingSpec("off")), Collected()) for p in prompts
    ]
    scheduler.add(seqs)
    scheduler.step()
    seconds: dict[str, float] = {}

    def timed(owner: Any, name: str, phase: str) -> None:
        inner: Callable = getattr(owner, name)

        def wrapper(*args: Any, **kwargs: Any) -> Any:
            start = time.thread_time()
            try:
                return inner(*args, **kwargs)
            finally:
                seconds[phase] = seconds.get(phase, 0.0) + time.thread_time() - start

        setattr(owner, name, wrapper)

    timed(decoder, "_run", "forward")
    timed(scheduler, "_sample", "sampling")
    # per batch; a checkout from before it, per row (each call's clock reads then count in this phase)
    timed(scheduler, "_advance_all" if hasattr(scheduler, "_advance_all") else "_advance", "advance")
    timed(scheduler, "_flush", "flush")
    steps, start = 0, time.thread_time()
    while scheduler.busy:
        scheduler.step()
        steps += 1
    total = time.thread_time() - start
    text = "\n".join("".join(e.text for e in seq.output.events) for seq in seqs)  # type: ignore[union-attr]
    return {
        "step": total / steps * 1e3,
        "phases": {name: value / steps * 1e3 for name, value in seconds.items()},
        "digest": hashlib.sha256(text.encode()).hexdigest()[:12],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(REPO / "demo" / "model"), help="its tokenizer and prompts")
    parser.add_argument("--rows", type=int, default=16)
    parser.add_argument("--prompt-tokens", type=int, default=33)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    torch.set_num_threads(1)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = RoutedModel(tiny_backbone("llama", vocab=len(tokenizer)), RouterConfig())
    texts = demo_prompts(Path(args.model), args.rows, args.prompt_tokens)
    prompts = [tokenizer(t)["input_ids"][: args.prompt_tokens] for t in texts]
    with torch.inference_mode():
        runs = [run(model, tokenizer, prompts, args.new_tokens) for _ in range(args.repeats)]
    best = min(runs, key=lambda r: r["step"])
    host = best["step"] - best["phases"]["forward"]
    phases = "  ".join(f"{name} {ms:.3f}" for name, ms in best["phases"].items() if name != "forward")
    print(
        f"host CPU per decode step of {args.rows} rows: {host:.3f} ms (step {best['step']:.3f}, tiny forward "
        f"{best['phases']['forward']:.3f}; least of {args.repeats} runs); of it: {phases}; text {best['digest']}"
    )


if __name__ == "__main__":
    main()
