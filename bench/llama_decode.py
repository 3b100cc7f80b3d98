"""The written-out Llama decode step (moe/model/llama_decode.py) against transformers' forward, in one process: the
demo model with its experts (context router), `--rows` rows, StaticDecoder steps (the forward and the step's host
work around it) with the written-out forward on and off in turn, for routing off and token routing.

    python bench/llama_decode.py                      # 16 rows, 5 rounds of 20 steps each way
    python bench/llama_decode.py --rows 1 --rounds 8
    python bench/llama_decode.py --shape qwen2.5-0.5b --rounds 3 --steps 8   # random weights, routing off only

`--shape` (bench/shapes.py: a Llama-family shape) runs random weights of that shape with no experts, so only routing
off; the prompts are the demo's token ids.

Each round runs `--steps` steps one way, then the other (the order alternates); the rows keep growing, so each way
sees the same spread of KV columns. Printed: ms per step (median over rounds), written out / transformers, and whether
the logits of the last step were equal bit for bit (the same rows, decoded both ways from the same state).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.peer import demo_prompts  # noqa: E402
from bench.shapes import SHAPES, build  # noqa: E402
from bench.step_profile import load_model  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(REPO / "demo" / "model"))
    parser.add_argument("--experts", default=str(REPO / "demo" / "experts"))
    parser.add_argument("--rows", type=int, default=16)
    parser.add_argument("--prompt-tokens", type=int, default=30)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--shape", choices=[s for s in SHAPES if not s.startswith("gpt2")], help="random weights")
    args = parser.parse_args()
    args.router = "context"

    import torch

    from moe import RoutedModel, RoutingSpec
    from moe.decode.prefill import prefill
    from moe.decode.static_decoder import StaticDecoder

    model, tokenizer = load_model(args)  # in a thread that ends, as the server loads (the tokenizer: any shape's)
    modes = ("off", "token")
    if args.shape:  # that shape's random weights, no experts
        model, modes = RoutedModel(build(args.shape)), ("off",)
    name = args.shape or "demo model"
    if not model._llama_decode:
        raise SystemExit(f"{name} is not a Llama-family backbone: every step runs transformers' forward")
    torch.set_num_threads(args.threads)  # the pool size is per thread: this one runs the steps
    texts = demo_prompts(Path(args.model), args.rows, args.prompt_tokens)
    prompts = [tokenizer(text)["input_ids"][: args.prompt_tokens] for text in texts]
    longest = args.prompt_tokens + 2 * args.rounds * (args.steps + 2) + 8
    print(f"{name}, {args.rows} rows, {args.rounds} rounds of {args.steps} steps each way, {args.threads} threads")
    print("| routing | written out ms/step | transformers ms/step | ratio | last logits equal |")
    print("|---|---|---|---|---|")
    for mode in modes:
        spec = RoutingSpec("off") if mode == "off" else RoutingSpec()
        decoder = StaticDecoder(model, max_batch=args.rows, max_len=longest)
        pre = prefill(model, prompts, [spec] * args.rows)
        slots = [decoder.join(pre, row) for row in range(args.rows)]
        tokens = [prompt[-1] for prompt in prompts]
        ms: dict[bool, list[float]] = {True: [], False: []}
        with torch.no_grad():
            for index in range(args.rounds):
                for written in (True, False) if index % 2 == 0 else (False, True):
                    model._llama_decode = written
                    for _ in range(2):  # untimed: a column bucket the other way grew into
                        decoder.step(slots, tokens, pre.specs)
                    start = time.perf_counter()
                    for _ in range(args.steps):
                        decoder.step(slots, tokens, pre.specs)
                    ms[written].append((time.perf_counter() - start) / args.steps * 1e3)
            # the same state decoded both ways: a step, undone (pos and mask put back), then the other way
            # (token mode: the rows' context sums too; the KV column the step wrote is written again)
            saved = [buffer.clone() for buffer in (decoder.pos, decoder.bias, decoder.context)]
            saved_lengths = list(decoder.lengths)
            logits = {}
            for written in (True, False):
                model._llama_decode = written
                logits[written] = decoder.step(slots, tokens, pre.specs).logits
                for buffer, before in zip((decoder.pos, decoder.bias, decoder.context), saved, strict=True):
                    buffer.copy_(before)
                decoder.lengths[:] = saved_lengths
        model._llama_decode = True
        on, off = statistics.median(ms[True]), statistics.median(ms[False])
        equal = bool(torch.equal(logits[True], logits[False]))
        print(f"| {mode} | {on:.2f} | {off:.2f} | {on / off:.2f} | {equal} |", flush=True)


if __name__ == "__main__":
    main()
