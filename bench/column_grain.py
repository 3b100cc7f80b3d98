"""How many KV columns a decode step attends: the decoder alone (moe.decode.static_decoder.StaticDecoder, no engine, no
HTTP) running `--rows` rows of demo prompts for `--new-tokens` greedy steps, with a step attending its longest row's
columns rounded up to `--grains` (COLUMN_GRAIN; the default 8), against the power-of-two allocation bucket the step
attended before (`bucket`: 64, then 128 columns for 33-token prompts and 64 new tokens).

    python bench/column_grain.py                       # routing off, eager, grains 8 and 16 against the bucket
    python bench/column_grain.py --mode token --rounds 12
    python bench/column_grain.py --compile inductor    # the compiled step (its columns a dynamic size)

The cases run in one process, interleaved round by round (a shared machine drifts between rounds); per case, wall and
CPU ms per step (minimum and median over rounds), then each grain's per-round ratio to the bucket (median: < 1, the
finer grain is faster), and how many of each grain's greedy tokens equal the bucket's (fewer masked columns
change nothing but the order of float sums in attention).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from bench.peer import demo_prompts  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(REPO / "demo" / "model"))
    parser.add_argument("--experts", default=str(REPO / "demo" / "experts"))
    parser.add_argument("--mode", choices=["off", "token"], default="off")
    parser.add_argument("--rows", type=int, default=16)
    parser.add_argument("--prompt-tokens", type=int, default=33)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--grains", type=int, nargs="+", default=[8, 16])
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--compile", default=None, help="a torch.compile backend for the step (inductor)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from transformers import AutoTokenizer

    from experts.cli import load_experts_dir
    from moe import RoutedModel, RouterConfig, RoutingSpec, load_backbone
    from moe.decode import static_decoder
    from moe.decode.prefill import prefill
    from moe.decode.static_decoder import StaticDecoder, decode_one_token

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    texts = demo_prompts(Path(args.model), args.rows, args.prompt_tokens)
    prompts = [tokenizer(t)["input_ids"][: args.prompt_tokens] for t in texts]
    backbone, _ = load_backbone(args.model)
    model = RoutedModel(backbone, RouterConfig())
    model.set_experts(tuple(load_experts_dir(args.experts, model.fingerprint)))
    if args.mode == "token" and len(model.plugged):  # as the server routes the demo experts (its default router)
        from moe.admission.router_fit import ContextRouterFitter

        ContextRouterFitter(model, tokenizer).offer(model.plugged.experts)
    specs = [RoutingSpec(mode=args.mode)] * len(prompts)
    pre = prefill(model, prompts, specs)
    # one decoder per case (a compiled step is kept per decoder); the bucket case: a grain past every bucket
    grains = {f"grain {g}": g for g in args.grains} | {"bucket": 1 << 30}
    decoders = {
        name: StaticDecoder(model, max_batch=args.rows, max_len=512, min_columns=64, compile_backend=args.compile)
        for name in grains
    }

    def run(name: str) -> tuple[float, float, list[list[int]]]:
        static_decoder.COLUMN_GRAIN = grains[name]
        decoder = decoders[name]
        decoder.reset()
        slots = [decoder.join(pre, row) for row in range(len(prompts))]
        tokens = pre.logits.argmax(dim=-1).tolist()
        out_tokens = []
        wall, cpu = time.perf_counter(), time.process_time()
        for _ in range(args.new_tokens):
            out = decode_one_token(decoder, slots, tokens, specs)
            tokens = out.logits.argmax(dim=-1).tolist()
            out_tokens.append(tokens)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        return wall / args.new_tokens * 1e3, cpu / args.new_tokens * 1e3, out_tokens

    reference = {name: run(name)[2] for name in grains}  # untimed: allocates, and compiles with --compile
    timed: dict[str, list[tuple[float, float]]] = {name: [] for name in grains}
    for _ in range(args.rounds):
        for name in grains:
            wall, cpu, _ = run(name)
            timed[name].append((wall, cpu))
    print(
        f"{args.rows} rows, {args.prompt_tokens}-token prompts, {args.new_tokens} steps, routing {args.mode}, "
        f"{'compiled ' + args.compile if args.compile else 'eager'}, {args.threads} threads, {args.rounds} rounds"
    )
    for name, runs in timed.items():
        walls, cpus = [w for w, _ in runs], [c for _, c in runs]
        print(
            f"  {name:9s} wall ms/step min {min(walls):.2f} median {statistics.median(walls):.2f}, "
            f"CPU ms/step min {min(cpus):.2f} median {statistics.median(cpus):.2f}"
        )
    for name in grains:
        if name == "bucket":
            continue
        pairs = [
            (a, b)
            for step_a, step_b in zip(reference[name], reference["bucket"], strict=True)
            for a, b in zip(step_a, step_b, strict=True)
        ]
        print(f"{name}: greedy tokens equal to the bucket's {sum(a == b for a, b in pairs)}/{len(pairs)}")
        ratios = [a[0] / b[0] for a, b in zip(timed[name], timed["bucket"], strict=True)]
        shown = ", ".join(f"{r:.3f}" for r in ratios)
        print(f"{name} / bucket, wall per round: median {statistics.median(ratios):.3f} ({shown})")


if __name__ == "__main__":
    main()
