"""Decode throughput of the routed model against the bare backbone, by number of experts plugged.

    python bench/routing_overhead.py                 # GPT-2-124M shape, batch 1 and 16
    python bench/routing_overhead.py --small         # a tiny shape, for a quick check
    python bench/routing_overhead.py --kind lora     # LoRA experts (rank 16 on c_fc and c_proj) instead

Every expert's gate passes every token (threshold -1 < any cosine), so each token goes to its top
scoring expert among all plugged: tokens spread over the experts, and every routed token pays for an
adapter. Configurations are measured round-robin, best of --repeats, in one run; ratios are against
the bare backbone (plain transformers model, same weights) of the same run.
"""

from __future__ import annotations

import argparse
import time

import torch
from transformers import DynamicCache, GPT2Config, GPT2LMHeadModel

from moe import Expert, LoraAdapter, LoraPair, RoutedModel, RoutingSpec


def build(args: argparse.Namespace) -> tuple[GPT2LMHeadModel, RoutedModel]:
    config = GPT2Config(n_embd=args.hidden, n_layer=args.layers, n_head=args.heads, vocab_size=50257)
    torch.manual_seed(0)
    bare = GPT2LMHeadModel(config).eval()
    wrapped = GPT2LMHeadModel(config).eval()
    wrapped.load_state_dict(bare.state_dict())
    return bare, RoutedModel(wrapped)


def make_experts(
    count: int, hidden: int, layers: int, rank: int, kind: str = "bottleneck", shapes: dict | None = None
) -> list[Expert]:
    """`count` experts on every layer whose gates pass every token; LoRA experts adapt every projection in
    `shapes` ({name: (in, out)}, RoutedModel.projection_shapes)."""
    g = torch.Generator().manual_seed(1)
    experts = []
    for i in range(count):
        e = Expert.fresh(f"e{i}", hidden, list(range(layers)), rank=rank, generator=g)
        if kind == "lora":
            pairs = {
                p: LoraPair(
                    torch.randn(layers, rank, d_in, generator=g) * d_in**-0.5,
                    torch.randn(layers, d_out, rank, generator=g) * 0.01,
                    torch.full((layers,), 2.0),
                )
                for p, (d_in, d_out) in (shapes or {}).items()
            }
            e.adapter = LoraAdapter(pairs)
        else:
            e.up = torch.randn(e.up.shape, generator=g) * 0.01
        e.thresholds = torch.full_like(e.thresholds, -1.0)
        experts.append(e)
    return experts


@torch.no_grad()
def decode_tokens_per_s(model, batch: int, prompt: int, new: int, routed: bool) -> tuple[float, dict[str, float]]:
    """Greedy decode `new` tokens after a `prompt`-token prefill; tokens/s of the decode steps only."""
    ids = torch.randint(0, 50257, (batch, prompt), generator=torch.Generator().manual_seed(2))
    cache = DynamicCache()
    kwargs = {"routing": [RoutingSpec()] * batch} if routed else {}
    out = model(input_ids=ids, past_key_values=cache, use_cache=True, **kwargs)
    token = out.logits[:, -1].argmax(-1, keepdim=True)
    shares: dict[str, float] = {}
    start = time.perf_counter()
    for _ in range(new):
        out = model(input_ids=token, past_key_values=cache, use_cache=True, **kwargs)
        token = out.logits[:, -1].argmax(-1, keepdim=True)
        if routed:
            # the engine reads the trace once per step; so does the benchmark
            for row in out.trace.row_counts():
                for name, count in row.items():
                    shares[name] = shares.get(name, 0.0) + count
    elapsed = time.perf_counter() - start
    return batch * new / elapsed, shares


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--experts", type=int, nargs="+", default=[0, 1, 8, 32, 256])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--prompt", type=int, default=32)
    parser.add_argument("--new", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--kind", choices=["bottleneck", "lora"], default="bottleneck", help="the experts' kind")
    parser.add_argument("--small", action="store_true", help="hidden 64, 2 layers: a quick smoke run")
    args = parser.parse_args()
    if args.small:
        args.hidden, args.layers, args.heads, args.new, args.repeats = 64, 2, 4, 8, 1
    if args.threads:
        torch.set_num_threads(args.threads)

    bare, routed = build(args)
    pool = make_experts(max(args.experts), args.hidden, args.layers, args.rank, args.kind, routed.projection_shapes)
    print(
        f"GPT-2 shape: hidden {args.hidden}, {args.layers} layers; {args.kind} experts, rank {args.rank}; threads "
        f"{torch.get_num_threads()}; prompt {args.prompt}, {args.new} decode steps, best of {args.repeats}\n"
    )
    print("| batch | experts plugged | tokens/s | x bare backbone | x 8 plugged | routed share | experts used |")
    print("|---|---|---|---|---|---|---|")
    for batch in args.batches:
        best: dict[str, float] = {}
        spread: dict[int, dict[str, float]] = {}
        for _ in range(args.repeats):  # round-robin, so drifting machine load hits every configuration alike
            best["bare"] = max(best.get("bare", 0.0), decode_tokens_per_s(bare, batch, args.prompt, args.new, False)[0])
            for count in args.experts:
                for name in list(routed.plugged.names):
                    routed.unplug(name)
                for expert in pool[:count]:
                    routed.plug(expert)
                speed, shares = decode_tokens_per_s(routed, batch, args.prompt, args.new, True)
                best[str(count)] = max(best.get(str(count), 0.0), speed)
                spread[count] = shares
        for count in args.experts:
            speed = best[str(count)]
            shares = spread[count]
            total = sum(shares.values()) or 1.0
            routed_share = 1 - shares.get("base", 0.0) / total
            used = sum(1 for k, v in shares.items() if k != "base" and v > 0)
            vs8 = f"{speed / best['8']:.3f}" if "8" in best else "-"
            print(
                f"| {batch} | {count} | {speed:.1f} | {speed / best['bare']:.3f} | {vs8} | {routed_share:.2f} | "
                f"{used} |"
            )
        print(f"| {batch} | bare backbone | {best['bare']:.1f} | 1.000 | - | - | - |")


if __name__ == "__main__":
    main()
