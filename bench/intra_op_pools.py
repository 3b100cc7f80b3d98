"""Why a model run in a Python thread got ~1.2 of 2 cores: HF `generate` (one static batch) in the main thread, in
another thread, and in another thread while a third thread that once ran a parallel op is still alive.

    python bench/intra_op_pools.py                        # the demo model, 16 rows, 64 new tokens, 2 threads
    GOMP_SPINCOUNT=10000 python bench/intra_op_pools.py   # libgomp's spin-wait set by hand (read at start)

Each case runs in a fresh process (libgomp's state is per process), in turn, `--rounds` times; tokens/s and the
process's cores (CPU time / wall time) are printed per run, with the load average (a shared machine drifts).

What it shows: torch's intra-op pool is OpenMP (libgomp). libgomp keeps a pool of worker threads for every thread
that ran a parallel region, as long as that thread lives, and once the process holds more of these threads than
it has CPUs, it cuts every pool's spin-wait to 100 spins (from ~300,000): workers then sleep between ops, and
every op pays a wake-up. So "main thread" against "other thread" is not the difference; "other thread, another
pool alive" is the slow case, whichever thread runs the model. A server that loads its model with
asyncio.to_thread (whose executor thread lives on) and decodes on an engine thread is that case.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CASES = ("main thread", "other thread", "other thread, another pool alive")


def run_case(case: str, args: argparse.Namespace) -> str:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(args.threads)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    tokenizer.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(args.model).eval()
    text = "The quick brown fox jumps over the lazy dog while the cat counts to ten. " * 4
    batch = tokenizer([text[i : i + 120] for i in range(args.rows)], return_tensors="pt", padding=True)

    def generate(tokens: int) -> None:
        with torch.inference_mode():
            model.generate(**batch, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False, pad_token_id=0)

    def measure() -> str:
        generate(4)
        cpu, start = time.process_time(), time.perf_counter()
        generate(args.new_tokens)
        wall = time.perf_counter() - start
        cores = (time.process_time() - cpu) / wall
        return f"{args.rows * args.new_tokens / wall:7.0f} tok/s {cores:.2f} cores"

    def in_thread(fn) -> str:
        out: list[str] = []
        worker = threading.Thread(target=lambda: out.append(fn()))
        worker.start()
        worker.join()
        return out[0]

    if case == "main thread":
        return measure()
    if case == "other thread":
        return in_thread(measure)
    started, release = threading.Event(), threading.Event()

    def keeper() -> None:  # runs one parallel op, then stays alive (as an executor thread does)
        x = torch.randn(1024, 1024)
        (x @ x).sum()
        started.set()
        release.wait()

    threading.Thread(target=keeper, daemon=True).start()
    started.wait()
    return in_thread(measure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(REPO / "demo" / "model"))
    parser.add_argument("--rows", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--case", choices=CASES, help=argparse.SUPPRESS)  # one case, in this process
    args = parser.parse_args()
    if args.case:
        print(run_case(args.case, args), flush=True)
        return
    passed = sys.argv[1:]
    print(f"GOMP_SPINCOUNT={os.environ.get('GOMP_SPINCOUNT', 'unset')}, {args.threads} threads, {os.cpu_count()} CPUs")
    for round_index in range(args.rounds):
        print(f"round {round_index + 1}: load average {os.getloadavg()[0]:.2f}")
        for case in CASES:
            out = subprocess.run(
                [sys.executable, __file__, *passed, "--case", case], capture_output=True, text=True, check=True
            ).stdout.strip()
            print(f"  {case:34s} {out.splitlines()[-1]}", flush=True)


if __name__ == "__main__":
    main()
