"""GPU correctness of the fixed-slot decoder: captured steps equal eager steps, token for token and logit for logit.

    python bench/gpu_check.py --shape qwen2.5-0.5b --steps 64 --batch 16      # bf16, random weights, CUDA

Two StaticDecoders over the same routed model (8 experts routing every token, thresholds -1; rows in token, pin,
allow-list, off and sequence mode), the same schedule (2 x batch requests joining at staggered steps and leaving
after their own number of tokens, up to --steps): one steps eagerly, one replays CUDA graphs captured per (rows,
columns, route) bucket as they come. Lines:

    PASS/FAIL captured == eager (route off | on): greedy tokens that agree / all, max |logit difference| (must be
              every token and 0: the same kernels on the same buffers)
    PASS/FAIL eager step under torch.cuda.set_sync_debug_mode("error"): no host sync inside a step
    INFO      fused (torch.compile'd) vs plain decode routing: token agreement and max logit difference (bf16:
              close, not equal)
    INFO      the fixed-slot decoder vs RoutedModel + DynamicCache (the reference path), bf16 token agreement
    INFO      schedule throughput eager vs captured, prefills included
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.routing_overhead import make_experts  # noqa: E402
from bench.shapes import SHAPES, build  # noqa: E402
from moe import RoutedModel, RoutingSpec  # noqa: E402
from moe.decode.prefill import prefill  # noqa: E402
from moe.decode.static_decoder import StaticDecoder, decode_one_token  # noqa: E402

FAILED: list[str] = []


def report(ok: bool, line: str) -> None:
    if not ok:
        FAILED.append(line)
    print(f"{'PASS' if ok else 'FAIL'} {line}", flush=True)


def routings(count: int, route: bool) -> list[RoutingSpec]:
    if not route:
        return [RoutingSpec("off")] * count
    cycle = [
        RoutingSpec("token"),
        RoutingSpec("pin", "e1"),
        RoutingSpec("token", allow=("e0", "e2")),
        RoutingSpec("off"),
        RoutingSpec("sequence"),
        RoutingSpec("token"),
    ]
    return [cycle[i % len(cycle)] for i in range(count)]


def schedule(decoder: StaticDecoder, model: RoutedModel, prompts, steps, specs):
    """Requests join (prefilled together) when their arrival step comes and a slot is free, and leave after
    steps[i] tokens; greedy. Returns (tokens per request, the logits of every step [b, V] float32)."""
    waiting = list(range(len(prompts)))
    live: dict[int, int] = {}
    tokens: dict[int, list[int]] = {}
    step_logits: list[torch.Tensor] = []
    specs = list(specs)
    t = 0
    while waiting or live:
        arrived = [i for i in waiting if i // 2 <= t][: decoder.free]
        if arrived:
            pre = prefill(model, [prompts[i] for i in arrived], [specs[i] for i in arrived])
            for row, i in enumerate(arrived):
                waiting.remove(i)
                specs[i] = pre.specs[row]
                tokens[i] = [int(pre.logits[row].argmax())]
                live[decoder.join(pre, row)] = i
        for slot, i in list(live.items()):
            if len(tokens[i]) >= steps[i]:
                decoder.leave(slot)
                del live[slot]
        if live:
            slots = list(live)
            out = decode_one_token(
                decoder, slots, [tokens[live[s]][-1] for s in slots], [specs[live[s]] for s in slots]
            )
            step_logits.append(out.logits.float())
            for row, slot in enumerate(slots):
                tokens[live[slot]].append(int(out.logits[row].argmax()))
        t += 1
    return tokens, step_logits


def compare(a, b) -> tuple[int, int, float]:
    (tokens_a, logits_a), (tokens_b, logits_b) = a, b
    total = sum(len(t) for t in tokens_a.values())
    agree = sum(x == y for i in tokens_a for x, y in zip(tokens_a[i], tokens_b[i], strict=False))
    diff = max(
        ((x - y).abs().max().item() for x, y in zip(logits_a, logits_b, strict=False) if x.shape == y.shape),
        default=float("nan"),
    )
    return agree, total, diff


@torch.no_grad()
def reference_tokens(model: RoutedModel, prompt: list[int], steps: int, spec: RoutingSpec) -> list[int]:
    from transformers import DynamicCache

    cache = DynamicCache()
    out = model(torch.tensor([prompt], device=model.device), routing=[spec], past_key_values=cache, use_cache=True)
    tokens = [int(out.logits[0, -1].argmax())]
    for _ in range(steps - 1):
        token = torch.tensor([[tokens[-1]]], device=model.device)
        tokens.append(int(model(token, routing=[spec], past_key_values=cache, use_cache=True).logits[0, -1].argmax()))
    return tokens


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="qwen2.5-0.5b")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--reference-requests", type=int, default=6, help="requests checked against DynamicCache")
    parser.add_argument("--device", default="cuda", help="cpu: a dry run of this script (nothing is captured)")
    args = parser.parse_args()
    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        print("FAIL no CUDA device")
        sys.exit(1)
    where = torch.cuda.get_device_name() if cuda else "CPU dry run"
    print(f"INFO torch {torch.__version__}, {where}, shape {args.shape} {args.dtype}")
    model = RoutedModel(build(args.shape, args.device, args.dtype))
    for expert in make_experts(8, model.hidden_size, model.num_layers, 16):
        model.plug(expert)
    model.fuse_decode_routing(cuda)
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    g = torch.Generator().manual_seed(0)
    count = 2 * args.batch
    prompts = [
        torch.randint(1, 30000, (int(torch.randint(16, 128, (1,), generator=g)),), generator=g).tolist()
        for _ in range(count)
    ]
    steps = [args.steps if i % 3 == 0 else 8 + i for i in range(count)]
    max_len = 128 + args.steps + 2

    for route in (False, True):
        specs = routings(count, route)
        eager = StaticDecoder(model, args.batch, max_len)
        graphs = StaticDecoder(model, args.batch, max_len, capture=cuda)
        schedule(eager, model, prompts[:2], [4, 4], specs[:2])  # compile the fused routing before timing
        schedule(graphs, model, prompts[:2], [4, 4], specs[:2])
        sync()
        start = time.perf_counter()
        want = schedule(eager, model, prompts, steps, specs)
        sync()
        t_eager = time.perf_counter() - start
        start = time.perf_counter()
        got = schedule(graphs, model, prompts, steps, specs)
        sync()
        t_graphs = time.perf_counter() - start
        agree, total, diff = compare(want, got)
        report(
            agree == total and diff == 0,
            f"captured == eager (route {'on' if route else 'off'}): tokens {agree}/{total} agree, max logit diff "
            f"{diff:.3g}; {len(graphs._graphs)} graphs captured",
        )
        print(
            f"INFO schedule throughput (route {'on' if route else 'off'}, prefills included): "
            f"eager {total / t_eager:.0f} tok/s, captured {total / t_graphs:.0f} tok/s ({t_eager / t_graphs:.1f}x)",
            flush=True,
        )

        # no host sync inside one eager step (run once first: nothing left to compile or allocate)
        n = min(3, args.batch)
        pre = prefill(model, prompts[:n], specs[:n])
        slots = [eager.join(pre, row) for row in range(n)]
        decode_one_token(eager, slots, [1, 2, 3][:n], pre.specs)  # routing rows written
        b, s = eager.bucket()
        eager._warm_up(b, s, eager._routing, eager._step_set(), times=1)  # pos and mask put back after it
        sync()
        if cuda:
            torch.cuda.set_sync_debug_mode("error")
        try:
            eager._warm_up(b, s, eager._routing, eager._step_set(), times=1)
            report(True, f"eager step (route {'on' if route else 'off'}) under sync_debug_mode=error: no host sync")
        except RuntimeError as e:
            report(False, f"eager step (route {'on' if route else 'off'}) synchronizes: {e}")
        finally:
            if cuda:
                torch.cuda.set_sync_debug_mode(0)
        eager.reset()

        if route:
            model.fuse_decode_routing(False)
            plain = schedule(StaticDecoder(model, args.batch, max_len), model, prompts, steps, specs)
            model.fuse_decode_routing(cuda)
            agree, total, diff = compare(plain, want)
            print(
                f"INFO fused vs plain decode routing (eager): tokens {agree}/{total} agree, max logit diff {diff:.3g}"
            )
        n = args.reference_requests
        decided = prefill(model, prompts[:n], specs[:n]).specs
        ref = {i: reference_tokens(model, prompts[i], steps[i], decided[i]) for i in range(n)}
        agree = sum(x == y for i in ref for x, y in zip(ref[i], want[0][i], strict=False))
        total = sum(len(t) for t in ref.values())
        print(
            f"INFO fixed-slot decoder vs RoutedModel + DynamicCache (route {'on' if route else 'off'}, {args.dtype}): "
            f"{agree}/{total} greedy tokens agree over {n} requests (bf16: a near-tie may flip one, then it diverges)",
            flush=True,
        )
        del eager, graphs
        if cuda:
            torch.cuda.empty_cache()
    print("ALL PASS" if not FAILED else f"{len(FAILED)} FAILED")
    sys.exit(1 if FAILED else 0)


if __name__ == "__main__":
    main()
