"""Prefill scheduling at 16 clients, in process (issue 22 item 3): TTFT and ITL under each prefill budget.

A closed loop as bench/serve_load.py runs it, without HTTP: --clients clients each send --requests requests of
--prompt-tokens prompt tokens and exactly --new-tokens new tokens (greedy), the next one when the previous has
finished, straight into one moe.decode.scheduler.Scheduler stepped in a loop. Each --max-prefill-tokens value
(prompt tokens prefilled between two decode steps) is run --rounds times, interleaved; medians are printed:
TTFT p50 / p90 (submission to first token), the second token's p50 / p90, ITL p50 / p99 and tokens/s.

    python bench/prefill_schedule.py                              # the demo model, one thread
    python bench/prefill_schedule.py --budgets 512 256 128 --rounds 5 --threads 2
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from moe import RoutedModel  # noqa: E402
from moe.decode.sampling import SamplingParams  # noqa: E402
from moe.decode.scheduler import Scheduler  # noqa: E402
from moe.decode.sequence import Event, GenerationRequest, Sequence  # noqa: E402
from moe.decode.static_decoder import StaticDecoder  # noqa: E402


class Client:
    """One client's loop: records each request's token times and sends its next request when one finishes."""

    cancelled = False

    def __init__(self, run: Run, index: int) -> None:
        self.run, self.index, self.left = run, index, run.requests
        self.sent, self.times = 0.0, []

    def send(self) -> None:
        self.left -= 1
        self.sent, self.times = time.perf_counter(), []
        prompt = self.run.prompts[(self.index * 3 + self.left) % len(self.run.prompts)]
        sampling = SamplingParams(min_new_tokens=self.run.new_tokens)
        self.run.scheduler.add([Sequence(GenerationRequest(prompt, self.run.new_tokens, sampling), self)])

    def push(self, event: Event) -> None:
        if event.token_ids:
            self.times.append(time.perf_counter())
        if event.finished is None:
            return
        times = self.times
        self.run.ttft.append(times[0] - self.sent)
        self.run.second.append(times[1] - self.sent)
        self.run.itl += [b - a for a, b in zip(times, times[1:], strict=False)]
        if self.left:
            self.send()


class Run:
    def __init__(self, scheduler: Scheduler, prompts: list[list[int]], requests: int, new_tokens: int) -> None:
        self.scheduler, self.prompts, self.requests, self.new_tokens = scheduler, prompts, requests, new_tokens
        self.ttft: list[float] = []
        self.second: list[float] = []
        self.itl: list[float] = []
        self.tokens_per_s = 0.0


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q / 100 * len(ordered)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", type=Path, default=REPO / "demo" / "model")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--requests", type=int, default=2, help="requests per client, one after the other")
    parser.add_argument("--prompt-tokens", type=int, default=33)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--max-batch-size", type=int, default=16)
    parser.add_argument("--budgets", type=int, nargs="+", default=[512, 256, 128], help="--max-prefill-tokens values")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(args.threads)
    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    model = RoutedModel(AutoModelForCausalLM.from_pretrained(args.model_dir))
    text = tokenizer.encode(" ".join((REPO / "README.md").read_text().split()))
    prompts = [text[i * 7 : i * 7 + args.prompt_tokens] for i in range(64)]

    def run(budget: int, clients: int, requests: int) -> Run:
        decoder = StaticDecoder(model, args.max_batch_size, 512)
        scheduler = Scheduler(model, tokenizer, decoder, max_prefill_tokens=budget)
        result = Run(scheduler, prompts, requests, args.new_tokens)
        start = time.perf_counter()
        for index in range(clients):
            Client(result, index).send()
        while result.scheduler.busy:
            result.scheduler.step()
        result.tokens_per_s = clients * requests * args.new_tokens / (time.perf_counter() - start)
        return result

    run(args.budgets[0], 4, 1)  # warm-up
    runs: dict[int, list[Run]] = {budget: [] for budget in args.budgets}
    for _ in range(args.rounds):
        for budget in args.budgets:
            runs[budget].append(run(budget, args.clients, args.requests))
    print(f"{args.clients} clients x {args.requests} requests, {args.prompt_tokens} + {args.new_tokens} tokens each")
    for budget, results in runs.items():

        def median(values: str, q: float, results: list[Run] = results) -> float:
            return statistics.median(percentile(getattr(r, values), q) for r in results) * 1e3

        print(
            f"max_prefill_tokens {budget}: TTFT p50 {median('ttft', 50):.0f} ms, p90 {median('ttft', 90):.0f} ms; "
            f"second token p50 {median('second', 50):.0f} ms, p90 {median('second', 90):.0f} ms; "
            f"ITL p50 {median('itl', 50):.1f} ms, p99 {median('itl', 99):.1f} ms; "
            f"{statistics.median(r.tokens_per_s for r in results):.0f} tok/s"
        )


if __name__ == "__main__":
    main()
