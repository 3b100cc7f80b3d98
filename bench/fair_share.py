"""The scheduler's fair share of a step's rows, in process (no HTTP, no event loop): one light client's request
alone and beside a heavy client's request of --heavy-rows rows (each with the worst stop strings the server's caps
allow, temperature 1), with the fair share off (every row in every step: share_ratio=0) and on (the default,
moe.decode.scheduler.SHARE_RATIO_CPU on a CPU); and the heavy client alone, cap off and on (a client alone
is never capped: its tokens/s must not change). Conditions are interleaved --rounds times; medians are printed.

    python bench/fair_share.py                      # the demo model, one thread
    python bench/fair_share.py --threads 2 --rounds 9
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

from bench.fairness import worst_stop_strings  # noqa: E402
from moe import RoutedModel  # noqa: E402
from moe.decode.sampling import SamplingParams  # noqa: E402
from moe.decode.scheduler import Scheduler  # noqa: E402
from moe.decode.sequence import GenerationRequest, Sequence  # noqa: E402
from moe.decode.static_decoder import StaticDecoder  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", type=Path, default=REPO / "demo" / "model")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--max-batch-size", type=int, default=16)
    parser.add_argument("--heavy-rows", type=int, default=8)
    parser.add_argument("--heavy-tokens", type=int, default=128)
    parser.add_argument("--light-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument(
        "--share-ratios", type=int, nargs="*", default=[], help="share ratios to compare beside the default (e.g. 1 4)"
    )
    args = parser.parse_args()

    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(args.threads)
    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    model = RoutedModel(AutoModelForCausalLM.from_pretrained(args.model_dir))
    stops = tuple(worst_stop_strings({"strings": 16, "chars": 256, "total": 1024}))
    light_ids, heavy_ids = tokenizer.encode("The quick brown fox"), tokenizer.encode("Once upon a time")

    def light() -> Sequence:
        sampling = SamplingParams(min_new_tokens=args.light_tokens)
        return Sequence(GenerationRequest(light_ids, args.light_tokens, sampling, client="light"))

    def heavy() -> list[Sequence]:
        sampling = SamplingParams(temperature=1.0, min_new_tokens=args.heavy_tokens)
        request = GenerationRequest(heavy_ids, args.heavy_tokens, sampling, stop=stops, client="heavy")
        return [Sequence(request) for _ in range(args.heavy_rows)]

    def scheduler(share_ratio: int | None) -> Scheduler:
        decoder = StaticDecoder(model, args.max_batch_size, 512)
        return Scheduler(model, tokenizer, decoder, max_prefill_tokens=512, share_ratio=share_ratio)

    def light_rate(share_ratio: int | None, beside: bool) -> float:
        """The light request's tokens / its wall time (admission to finish), alone or beside the heavy rows
        (running already, a quarter of their tokens in)."""
        sched = scheduler(share_ratio)
        if beside:
            sched.add(heavy())
            for _ in range(args.heavy_tokens // 4):
                sched.step()
        seq = light()
        sched.add([seq])
        start = time.perf_counter()
        while seq.finished is None:
            sched.step()
        return args.light_tokens / (time.perf_counter() - start)

    def heavy_alone_rate(share_ratio: int | None) -> float:
        sched = scheduler(share_ratio)
        seqs = heavy()
        sched.add(seqs)
        start = time.perf_counter()
        while sched.busy:
            sched.step()
        return sum(len(s.token_ids) for s in seqs) / (time.perf_counter() - start)

    light_rate(None, True)  # warm-up
    results: dict[str, list[float]] = {}
    conditions = {
        "light solo": lambda: light_rate(None, False),
        "light beside heavy, cap off": lambda: light_rate(0, True),
        "light beside heavy, cap on": lambda: light_rate(None, True),
        **{f"light beside heavy, ratio {n}": (lambda n=n: light_rate(n, True)) for n in args.share_ratios},
        "heavy alone, cap off": lambda: heavy_alone_rate(0),
        "heavy alone, cap on": lambda: heavy_alone_rate(None),
    }
    for round_ in range(args.rounds):
        for name, measure in conditions.items():
            results.setdefault(name, []).append(measure())
        print(f"round {round_ + 1}: " + ", ".join(f"{k} {v[-1]:.1f}" for k, v in results.items()), flush=True)
    median = {name: statistics.median(values) for name, values in results.items()}
    solo = median["light solo"]
    print(f"heavy request: {args.heavy_rows} rows, {len(stops)} stop strings of {len(stops[0])} characters")
    for name in [name for name in median if name.startswith("light beside")]:
        print(f"{name}: median {median[name]:.1f} tok/s = {median[name] / solo:.2f} of solo ({solo:.1f})")
    off, on = median["heavy alone, cap off"], median["heavy alone, cap on"]
    print(f"heavy client alone: cap off {off:.1f} tok/s, cap on {on:.1f} tok/s: {on / off:.2f}")


if __name__ == "__main__":
    main()
