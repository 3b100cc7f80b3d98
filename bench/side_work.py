"""What other work on the same cores costs a model step run by torch's intra-op pool: HF `generate` (one static batch,
the main thread) alone, and beside Python work in bursts the size of a streaming server's event loop, run in a thread
of the same process (it takes the GIL between the model's ops) or in a process of its own (no GIL shared: what an
engine process apart from the HTTP process would be).

    python bench/side_work.py                                  # the demo model, 16 rows, 64 new tokens, 2 threads
    python bench/side_work.py --threads 1                      # the model on one thread, a core left to the rest
    python bench/side_work.py --work-ms 0.3 --period-ms 5.5    # a lighter side load

The side work is pure Python: `--work-ms` of it every `--period-ms` (defaults: 0.9 ms every 5.5 ms, ~0.16 cores,
what plugmoe's event loop does per decode step on the demo model at 16 streaming clients: 16 tokens at ~57 us each,
bench/peer.py). Cases run in turn within a round, `--rounds` rounds; each case's tokens/s is the median of `--runs`
generate calls, a ratio to "alone" is taken per round and its median printed, with the side work's own cores (its CPU
time / wall time, from the thread's or process's clock).

What it measured on the 2-core CI machine: with 2 torch threads, each core-second of side work cost the model about a
wall-second, in a thread or in a process alike (the pool's workers spin at a barrier while one of them waits for a
core), so moving the HTTP layer out of the engine's process buys nothing there; with one torch thread the side work
in a process of its own costs little, but the model runs at ~0.8 of its 2-thread speed alone.
"""

from __future__ import annotations

import argparse
import multiprocessing
import queue
import statistics
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

CASES = ("alone", "side work in a thread", "side work in a process")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(REPO / "demo" / "model"))
    parser.add_argument("--rows", type=int, default=16)
    parser.add_argument("--prompt-tokens", type=int, default=33)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2, help="torch threads of the model")
    parser.add_argument("--work-ms", type=float, default=0.9, help="side work per burst")
    parser.add_argument("--period-ms", type=float, default=5.5, help="one burst every this many ms")
    parser.add_argument("--runs", type=int, default=3, help="generate calls per case and round (median)")
    parser.add_argument("--rounds", type=int, default=4)
    args = parser.parse_args()

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from bench.peer import demo_prompts

    torch.set_num_threads(args.threads)
    model = AutoModelForCausalLM.from_pretrained(args.model).eval()
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    prompts = demo_prompts(Path(args.model), args.rows, args.prompt_tokens)
    ids = torch.tensor([tokenizer.encode(p, add_special_tokens=False) for p in prompts])  # [rows, prompt tokens]

    def tokens_per_second() -> float:
        start = time.perf_counter()
        with torch.inference_mode():
            model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=args.new_tokens,
                min_new_tokens=args.new_tokens,
                do_sample=False,
                pad_token_id=0,
            )
        return args.rows * args.new_tokens / (time.perf_counter() - start)

    tokens_per_second()  # warm-up
    context = multiprocessing.get_context("fork")  # the child needs none of torch: it never touches it
    print(
        f"{args.model}: {args.rows} rows, {args.prompt_tokens} + {args.new_tokens} tokens, {args.threads} "
        f"torch threads; side work {args.work_ms} ms every {args.period_ms} ms",
        flush=True,
    )
    results: dict[str, list[float]] = {case: [] for case in CASES}
    side_cores: dict[str, list[float]] = {case: [] for case in CASES[1:]}
    for index in range(args.rounds):
        print(f"round {index + 1}", flush=True)
        for case in CASES:
            worker, out = None, None
            if case != "alone":
                running = context.Value("b", 1)  # the side work stops at its next burst once it reads 0
                if case == "side work in a thread":
                    out = queue.Queue()
                    worker = threading.Thread(target=_side_work, args=(running, args.work_ms, args.period_ms, out))
                else:
                    out = context.Queue()
                    worker = context.Process(target=_side_work, args=(running, args.work_ms, args.period_ms, out))
                worker.start()
                time.sleep(0.05)
            value = statistics.median(tokens_per_second() for _ in range(args.runs))
            results[case].append(value)
            if worker is not None and out is not None:
                running.value = 0
                cpu, wall = out.get()
                worker.join()
                side_cores[case].append(cpu / wall)
            print(f"  {case}: {value:.0f} tok/s", flush=True)
    print("\n| case | tok/s (median) | / alone (per round, median) | side work's cores |")
    print("|---|---|---|---|")
    for case in CASES:
        ratios = [ours / alone for ours, alone in zip(results[case], results["alone"], strict=True)]
        cores = f"{statistics.median(side_cores[case]):.2f}" if case in side_cores else "-"
        per_round = ", ".join(f"{r:.2f}" for r in ratios)
        median = statistics.median(results[case])
        print(f"| {case} | {median:.0f} | {statistics.median(ratios):.2f} ({per_round}) | {cores} |")


def _side_work(running, work_ms: float, period_ms: float, out) -> None:
    """Pure Python in bursts, work_ms of it every period_ms, while running.value; then puts (CPU seconds, wall
    seconds) of this thread into out."""
    start_cpu, start = time.thread_time(), time.perf_counter()
    while running.value:
        burst = time.perf_counter()
        total = 0
        while time.perf_counter() - burst < work_ms / 1e3:
            for i in range(50):
                total += i
        time.sleep(max(0.0, (period_ms - work_ms) / 1e3))
    out.put((time.thread_time() - start_cpu, time.perf_counter() - start))


if __name__ == "__main__":
    main()
