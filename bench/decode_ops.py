"""One decode forward, op by op: plugmoe's StaticDecoder step (as the engine runs it) against HF's own decode forward
(a DynamicCache, the same model, the same rows), each profiled with torch.profiler over `--steps` steps.

    python bench/decode_ops.py                      # routing off, 16 rows, 48-token prompts: op counts and self CPU
    python bench/decode_ops.py --modes off token --top 30

Per case: aten ops per forward, module calls per forward (nn.Module.__call__ counted by a global hook), wall and CPU
ms per forward unprofiled (the cases interleaved over `--rounds` rounds of `--steps` forwards, the minimum round kept:
on a shared machine read CPU ms, and the ratio token / off of the same run), and the table of op names (calls per
forward, self CPU us per forward), then where plugmoe's forward has more ops than HF's.
plugmoe's case times StaticDecoder._run (the model's decode forward, what step_profile.py calls `forward`);
HF's times `model(...)` as generate calls it: input ids [B, 1], a 2D attention mask over the cache and the new token,
position ids, cache_position. Self CPU under the profiler is inflated by its own hooks: read counts first.

The demo model is loaded with its experts plugged (the server's state), as bench/step_profile.py loads it.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

from bench.peer import demo_prompts  # noqa: E402


class ModuleCalls:
    """Counts nn.Module calls while active (a global forward pre-hook)."""

    def __init__(self) -> None:
        self.count = 0
        self._handle = None

    def _hook(self, module, args) -> None:
        self.count += 1

    def __enter__(self) -> ModuleCalls:
        self._handle = torch.nn.modules.module.register_module_forward_pre_hook(self._hook)
        return self

    def __exit__(self, *exc) -> None:
        self._handle.remove()


def timed(fns: dict[str, object], steps: int, rounds: int) -> dict[str, tuple[float, float]]:
    """Each case's fn() `steps` times per round, the cases interleaved round by round (a shared machine's load moves
    between rounds, not between cases): per case (wall ms, CPU ms) per forward, the minimum over rounds of each."""
    for fn in fns.values():
        for _ in range(3):
            fn()
    best = {name: (float("inf"), float("inf")) for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            wall, cpu = time.perf_counter(), time.process_time()
            for _ in range(steps):
                fn()
            wall, cpu = (time.perf_counter() - wall) / steps * 1e3, (time.process_time() - cpu) / steps * 1e3
            best[name] = (min(best[name][0], wall), min(best[name][1], cpu))
    return best


def profiled(fn, steps: int) -> dict:
    """fn() `steps` times under torch.profiler: per forward, {op: (calls, self cpu us)}, module calls."""
    fn()
    with ModuleCalls() as calls, profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            fn()
    ops = {}
    for event in prof.key_averages():
        if event.key.startswith("aten::") or event.key.startswith("plugmoe"):
            ops[event.key] = (event.count / steps, event.self_cpu_time_total / steps)
    return {"ops": ops, "modules": calls.count / steps}


def plugmoe_case(args: argparse.Namespace, tokenizer, texts: list[str], mode: str):
    """plugmoe's decode forward in `mode`, ready to call: () -> None (the same step every call)."""
    from experts.cli import load_experts_dir
    from moe import RoutedModel, RouterConfig, RoutingSpec, load_backbone
    from moe.decode.prefill import prefill
    from moe.decode.static_decoder import StaticDecoder

    backbone, _ = load_backbone(args.model)
    model = RoutedModel(backbone, RouterConfig())
    model.set_experts(tuple(load_experts_dir(args.experts, model.fingerprint)))
    if mode != "off" and len(model.plugged):
        from moe.admission.router_fit import ContextRouterFitter

        ContextRouterFitter(model, tokenizer).offer(model.plugged.experts)
    spec = RoutingSpec(mode="off") if mode == "off" else RoutingSpec()
    decoder = StaticDecoder(model, max_batch=args.rows, max_len=512, min_columns=args.columns)
    prompts = [tokenizer(t)["input_ids"][: args.prompt_tokens] for t in texts]
    pre = prefill(model, prompts, [spec] * len(prompts))
    slots = [decoder.join(pre, row) for row in range(len(prompts))]
    tokens = [p[-1] for p in prompts]
    decoder.step(slots, tokens, pre.specs)  # routing rows synced, the bucket's cache made
    b, s = decoder.bucket()
    plugged = decoder.plugged
    saved_pos, saved_bias = decoder.pos.clone(), decoder.bias.clone()

    def forward() -> None:
        with torch.no_grad():
            decoder._run(b, s, decoder._routing, plugged)
        decoder.pos.copy_(saved_pos)  # every forward the same step (the columns stay put)
        decoder.bias.copy_(saved_bias)

    return forward


def hf_case(args: argparse.Namespace, tokenizer, texts: list[str]):
    """HF's decode forward, ready to call: () -> None (the same step every call)."""
    from transformers import AutoModelForCausalLM, DynamicCache

    from moe.model.kv_cache import cache_kwarg

    model = AutoModelForCausalLM.from_pretrained(args.model).eval()
    kwarg = cache_kwarg(model)
    tokenizer.padding_side = "left"
    batch = tokenizer(texts, return_tensors="pt", padding=True, truncation=True, max_length=args.prompt_tokens)
    mask = batch["attention_mask"]
    with torch.no_grad():
        cache = DynamicCache()
        out = model(**batch, **{kwarg: cache}, use_cache=True, logits_to_keep=1)
    length = mask.shape[1]
    next_ids = out.logits[:, -1].argmax(-1, keepdim=True)
    step_mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
    position_ids = (step_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -1:]
    cache_position = torch.tensor([length])

    def forward() -> None:
        with torch.no_grad():
            model(
                input_ids=next_ids,
                attention_mask=step_mask,
                position_ids=position_ids,
                cache_position=cache_position,
                use_cache=True,
                logits_to_keep=1,
                **{kwarg: cache},
            )
        cache.crop(-1)  # every forward the same step: the new column dropped

    return forward


def print_table(results: dict[str, dict], top: int) -> None:
    names = list(results)
    print(
        "per forward: "
        + ", ".join(
            f"{n}: {sum(c for c, _ in r['ops'].values()):.0f} ops, "
            f"{r['modules']:.0f} module calls, {r['wall_ms']:.2f} ms wall, {r['cpu_ms']:.2f} ms CPU (unprofiled)"
            for n, r in results.items()
        )
    )
    if "off" in results and "token" in results:
        off, token = results["off"], results["token"]
        print(
            f"token / off per forward: {token['wall_ms'] / off['wall_ms']:.3f} wall, "
            f"{token['cpu_ms'] / off['cpu_ms']:.3f} CPU"
        )
    totals = Counter()
    for r in results.values():
        for op, (_, us) in r["ops"].items():
            totals[op] += us
    header = f"{'op':40s}" + "".join(f"{n + ' calls':>14s}{n + ' us':>12s}" for n in names)
    print(header)
    for op, _ in totals.most_common(top):
        row = f"{op:40s}"
        for n in names:
            calls, us = results[n]["ops"].get(op, (0, 0.0))
            row += f"{calls:14.1f}{us:12.1f}"
        print(row)
    if "hf" in results:
        for n in names:
            if n == "hf":
                continue
            more = {
                op: calls - results["hf"]["ops"].get(op, (0, 0))[0]
                for op, (calls, _) in results[n]["ops"].items()
                if calls > results["hf"]["ops"].get(op, (0, 0))[0]
            }
            listed = ", ".join(f"{op} +{d:.0f}" for op, d in sorted(more.items(), key=lambda kv: -kv[1])[:20])
            print(f"{n} has more than hf: {listed}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(REPO / "demo" / "model"))
    parser.add_argument("--experts", default=str(REPO / "demo" / "experts"))
    parser.add_argument("--rows", type=int, default=16)
    parser.add_argument("--prompt-tokens", type=int, default=48)
    parser.add_argument("--columns", type=int, default=64, help="plugmoe's KV column bucket")
    parser.add_argument("--steps", type=int, default=50, help="forwards per timing round, and profiled")
    parser.add_argument("--rounds", type=int, default=5, help="timing rounds, the cases interleaved: minimum kept")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--modes", nargs="+", choices=["off", "token"], default=["off"])
    parser.add_argument("--no-hf", action="store_true")
    parser.add_argument("--top", type=int, default=40)
    args = parser.parse_args()
    from transformers import AutoTokenizer

    torch.set_num_threads(args.threads)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    texts = demo_prompts(Path(args.model), args.rows, args.prompt_tokens)
    fns = {} if args.no_hf else {"hf": hf_case(args, tokenizer, texts)}
    for mode in args.modes:
        fns[mode] = plugmoe_case(args, tokenizer, texts, mode)
    times = timed(fns, args.steps, args.rounds)
    results = {}
    for name, fn in fns.items():
        results[name] = profiled(fn, args.steps)
        results[name]["wall_ms"], results[name]["cpu_ms"] = times[name]
    print_table(results, args.top)


if __name__ == "__main__":
    main()
