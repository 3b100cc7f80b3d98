"""What one sampling step costs, by feature, against plain greedy/temperature sampling of the same batch.

    python bench/sampling_overhead.py                  # batch 16; the demo vocabulary and a 152k one
    python bench/sampling_overhead.py --vocab 2189     # one vocabulary only

Per configuration: moe.decode.sampling.sample_step on random logits [B, V] (every row with the feature), plus for
`grammar` the llguidance mask fill of B JSON-schema rows on the demo tokenizer (what the engine adds per step).
Configurations run round-robin, best of --repeats, in one run; ratios are against `plain` of the same run.
"""

from __future__ import annotations

import argparse
import time

import torch
from transformers import AutoTokenizer

from moe.decode.sampling import AllowedTokens, SamplingParams, sample_step
from moe.decode.structured_output import GrammarCompiler, GrammarSpec
from server.settings import DEMO_MODEL_DIR

SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 12}, "age": {"type": "integer", "minimum": 0}},
    "required": ["name", "age"],
}


def configurations(batch: int, vocab: int, history: int, top_p: float) -> dict[str, dict]:
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, vocab, (history,), generator=g).tolist() for _ in range(batch)]
    outputs = [torch.randint(0, vocab, (history,), generator=g).tolist() for _ in range(batch)]
    sampled = {"temperature": 0.8, "top_p": top_p}
    return {
        "plain": {"params": SamplingParams(**sampled)},
        "penalties": {
            "params": SamplingParams(**sampled, presence_penalty=0.5, frequency_penalty=0.5, repetition_penalty=1.2),
            "prompts": prompts,
            "outputs": outputs,
        },
        "logit_bias (10 ids)": {"params": SamplingParams(**sampled, logit_bias=tuple((i, 1.0) for i in range(10)))},
        "logprobs (top 5)": {"params": SamplingParams(**sampled, logprobs=5)},
        "grammar mask": {"params": SamplingParams(**sampled), "allowed": True},
    }


def step_seconds(logits: torch.Tensor, config: dict, steps: int, allowed: AllowedTokens | None) -> float:
    batch = logits.shape[0]
    params = [config["params"]] * batch
    gens = [p.generator() for p in params]
    start = time.perf_counter()
    for _ in range(steps):
        sample_step(
            logits,
            params,
            gens,
            [1] * batch,
            (0,),
            config.get("prompts"),
            config.get("outputs"),
            allowed if config.get("allowed") else None,
        )
    return (time.perf_counter() - start) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--vocab", type=int, nargs="+", default=[2189, 151936])
    parser.add_argument("--history", type=int, default=256, help="prompt and generated tokens per row")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--top-p", type=float, default=1.0, help="every configuration's top_p (< 1 sorts the vocab)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(
        f"batch {args.batch}, temperature 0.8, top_p {args.top_p}, history {args.history} tokens per row, "
        f"threads {torch.get_num_threads()}\n"
    )
    print("| vocab | configuration | ms / step | x plain |")
    print("|---|---|---|---|")
    for vocab in args.vocab:
        logits = torch.randn(args.batch, vocab, generator=torch.Generator().manual_seed(1))
        bitmask = torch.randint(-(2**31), 2**31 - 1, (args.batch, (vocab + 31) // 32), dtype=torch.int32)
        allowed = AllowedTokens(list(range(args.batch)), bitmask)
        configs = configurations(args.batch, vocab, args.history, args.top_p)
        best: dict[str, float] = {}
        for _ in range(args.repeats):
            for name, config in configs.items():
                seconds = step_seconds(logits, config, args.steps, allowed)
                best[name] = min(best.get(name, float("inf")), seconds)
        for name, seconds in best.items():
            print(f"| {vocab} | {name} | {seconds * 1e3:.2f} | {seconds / best['plain']:.2f} |")

    tokenizer = AutoTokenizer.from_pretrained(DEMO_MODEL_DIR)
    compiler = GrammarCompiler(tokenizer, len(tokenizer), (tokenizer.eos_token_id,))
    matchers = [compiler.matcher(GrammarSpec.json_schema(SCHEMA)) for _ in range(args.batch)]
    for m, text in zip(matchers, ['{"name": "Al', '{"name": "Bo", "age": 4', '{"na'] * args.batch, strict=False):
        m.consume_tokens(tokenizer.encode(text, add_special_tokens=False))
    best_fill = float("inf")
    for _ in range(args.repeats):
        start = time.perf_counter()
        for _ in range(args.steps):
            compiler.allowed_tokens(matchers)
        best_fill = min(best_fill, (time.perf_counter() - start) / args.steps)
    print(f"\nllguidance mask fill, {args.batch} JSON-schema rows, demo vocabulary: {best_fill * 1e3:.2f} ms / step")


if __name__ == "__main__":
    main()
