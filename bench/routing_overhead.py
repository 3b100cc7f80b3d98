"""Decode throughput of the routed model against the bare backbone and PEFT's mixed-batch LoRA, eager and captured;
plug latency at 8 and 256 plugged; memory per plugged expert.

    python bench/routing_overhead.py                                   # CPU, GPT-2-124M shape, batch 1 and 16
    python bench/routing_overhead.py --device cuda --dtype bfloat16 --shape qwen2.5-0.5b --batches 1 16 64
    python bench/routing_overhead.py --kind lora                       # LoRA experts (rank 16, every MLP projection)

Every configuration decodes greedily `--new` tokens after a `--prompt`-token prompt (random weights of a real
shape, bench/shapes.py) and reads each step's tokens on the host, as a server must. Columns, decode tok/s:

    HF bare         the plain transformers model with a DynamicCache, eager: what a transformers user runs
    PEFT mixed      PEFT LoRA, 8 adapters of rank 16 on the MLP's down projection, one per row (`adapter_names`),
                    DynamicCache, eager: what a transformers user would pick for per-request adapters
    routed before   RoutedModel with a DynamicCache, eager: plugmoe's decode path before the fixed-slot decoder
    bare, routed    static_decoder.StaticDecoder with routing off / 8 experts routing every token (thresholds -1:
                    every token pays for an adapter, the worst case), eager; on CUDA also captured (CUDA graphs,
                    decode routing torch.compile'd: --fuse)
    routed context  the same decoder, eager, token mode routed by a context router (moe.routing.context: a
                    running context sum per row and layer, one [1 + C, H] product per layer; random classifiers,
                    floors of zero, as a fitted router without a binding floor): it always runs eagerly

Ratios compare columns of the same run: routed / bare run the same way (both eager, both captured). Configurations
run round-robin, `--repeats` times; each cell is the median over repeats and [min-max] is printed beside it.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from transformers import DynamicCache

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.shapes import SHAPES, build, mlp_down_projection  # noqa: E402
from moe import Expert, LoraAdapter, LoraPair, RoutedModel, RoutingSpec  # noqa: E402
from moe.adapters.expert import BASE_ROUTE  # noqa: E402
from moe.adapters.file import ExpertFile  # noqa: E402
from moe.adapters.slots import PluggedSet  # noqa: E402
from moe.decode.prefill import prefill  # noqa: E402
from moe.decode.static_decoder import StaticDecoder, decode_one_token  # noqa: E402
from moe.model.kv_cache import cache_kwarg  # noqa: E402
from moe.routing.context import ContextClassifier, ContextRouter  # noqa: E402


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def make_experts(
    count: int,
    hidden: int,
    layers: int,
    rank: int,
    routed: bool = True,
    kind: str = "bottleneck",
    shapes: dict | None = None,
) -> list[Expert]:
    """`count` experts on every layer; routed: every token passes every gate (threshold -1 < any cosine).
    kind "lora": LoRA experts on every projection in `shapes` ({name: (in, out)}, RoutedModel.projection_shapes)."""
    g = torch.Generator().manual_seed(1)
    first = Expert.fresh("e0", hidden, list(range(layers)), rank=rank, generator=g)
    if kind == "lora":
        first.adapter = LoraAdapter(
            {
                p: LoraPair(
                    torch.randn(layers, rank, d_in, generator=g) * d_in**-0.5,
                    torch.randn(layers, d_out, rank, generator=g) * 0.01,
                    torch.full((layers,), 2.0),
                )
                for p, (d_in, d_out) in (shapes or {}).items()
            }
        )
    else:
        first.up = torch.randn(first.up.shape, generator=g) * 0.01
    first.thresholds = torch.full_like(first.thresholds, -1.0 if routed else 2.0)
    out = [first]
    for i in range(1, count):  # other keys, so tokens spread over the experts; the same adapter weights
        keys = torch.randn(first.keys.shape, generator=g)
        out.append(dataclasses.replace(first, name=f"e{i}", keys=keys / keys.norm(dim=-1, keepdim=True)))
    return out


@torch.no_grad()
def hf_decode(model, ids: torch.Tensor, new: int, **kwargs) -> float:
    """Decode seconds of `new` greedy steps with a DynamicCache (prefill not timed)."""
    cache = DynamicCache()
    kw = {cache_kwarg(model): cache}
    token = (
        model(input_ids=ids, use_cache=True, logits_to_keep=1, **kw, **kwargs).logits[:, -1].argmax(-1, keepdim=True)
    )
    synchronize(ids.device)
    start = time.perf_counter()
    for _ in range(new):
        token = model(input_ids=token, use_cache=True, **kw, **kwargs).logits[:, -1].argmax(-1, keepdim=True)
        token.tolist()
    synchronize(ids.device)
    return time.perf_counter() - start


@torch.no_grad()
def routed_before(model: RoutedModel, ids: torch.Tensor, new: int) -> float:
    """RoutedModel + DynamicCache, every row token-routed, the trace read each step (the old decode path)."""
    specs = [RoutingSpec()] * ids.shape[0]
    cache = DynamicCache()
    out = model(ids, routing=specs, past_key_values=cache, use_cache=True, logits_to_keep=1)
    token = out.logits[:, -1].argmax(-1, keepdim=True)
    synchronize(ids.device)
    start = time.perf_counter()
    for _ in range(new):
        out = model(token, routing=specs, past_key_values=cache, use_cache=True)
        token = out.logits[:, -1].argmax(-1, keepdim=True)
        token.tolist()
        out.trace.row_counts()
    synchronize(ids.device)
    return time.perf_counter() - start


@torch.no_grad()
def random_context_router(names: Sequence[str], layers: int, hidden: int) -> ContextRouter:
    """A context router over (base, *names) with random classifiers and floors of zero (what a decode step costs
    does not depend on the fitted values)."""
    g = torch.Generator().manual_seed(3)
    classes = (BASE_ROUTE, *names)

    def classifier(features: int) -> ContextClassifier:
        weight = torch.randn(len(classes), features, generator=g) * 0.1
        return ContextClassifier(
            classes,
            torch.zeros(features),
            torch.ones(features),
            weight,
            torch.zeros(len(classes)),
            torch.zeros(len(classes)),
        )

    return ContextRouter(classifier(layers * hidden), tuple(classifier(hidden) for _ in range(layers)))


def static_decode(
    decoder: StaticDecoder,
    model: RoutedModel,
    ids: torch.Tensor,
    new: int,
    spec: RoutingSpec,
    plugged: PluggedSet | None = None,
) -> float:
    """Prefill every row into a slot (not timed), then `new` decoder steps (sampling's host read included)."""
    specs = [spec] * ids.shape[0]
    pre = prefill(model, ids.tolist(), specs, plugged)
    slots = [decoder.join(pre, row) for row in range(ids.shape[0])]
    tokens = pre.logits.argmax(-1).tolist()
    synchronize(ids.device)
    start = time.perf_counter()
    for _ in range(new):
        tokens = decode_one_token(decoder, slots, tokens, specs).logits.argmax(-1).tolist()
    synchronize(ids.device)
    elapsed = time.perf_counter() - start
    decoder.reset()
    return elapsed


def peft_mixed(hf, shape: str, adapters: int, rank: int) -> Callable[[torch.Tensor, int], float]:
    """PEFT LoRA on the MLP's down projection, `adapters` adapters, a different one per row (mixed batch)."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=[mlp_down_projection(shape)], lora_dropout=0.0)
    with warnings.catch_warnings():  # PEFT's own use of names transformers deprecated, and GPT-2's Conv1D note
        warnings.simplefilter("ignore")
        model = get_peft_model(hf, config, adapter_name="a0")
        for i in range(1, adapters):
            model.add_adapter(f"a{i}", config)
    model.eval()

    def run(ids: torch.Tensor, new: int) -> float:
        names = [f"a{row % adapters}" for row in range(ids.shape[0])]
        with warnings.catch_warnings():  # PEFT's mixed-batch path passes the cache under the deprecated name
            warnings.simplefilter("ignore", FutureWarning)
            return hf_decode(model, ids, new, adapter_names=names)

    return run


def plug_latency(model: RoutedModel, counts: list[int], rank: int, trials: int, kind: str) -> list[str]:
    """Median ms of RoutedModel.plug and .unplug of one expert of `kind` with `count` others plugged (capacity
    reserved, so no plug reallocates), and of a plug that doubles the capacity (once per doubling)."""
    device = model.device
    layers, hidden = model.num_layers, model.hidden_size
    template = make_experts(1, hidden, layers, rank, routed=False, kind=kind, shapes=model.projection_shapes)[0]
    for name in list(model.plugged.names):
        model.unplug(name)
    model.slots.reserve(max(counts) + 1, rank if kind == "bottleneck" else 0)
    lines = []
    for count in counts:
        for i in range(len(model.plugged), count):
            model.plug(dataclasses.replace(template, name=f"p{i}"))
        plug, unplug = [], []
        for _ in range(trials):
            probe = dataclasses.replace(template, name="probe")
            synchronize(device)
            start = time.perf_counter()
            model.plug(probe)
            synchronize(device)
            middle = time.perf_counter()
            model.unplug("probe")
            synchronize(device)
            plug.append(middle - start)
            unplug.append(time.perf_counter() - middle)
        lines.append(
            f"| plug / unplug one expert, {count} plugged | {statistics.median(plug) * 1e3:.2f} ms "
            f"[{min(plug) * 1e3:.2f}-{max(plug) * 1e3:.2f}] | {statistics.median(unplug) * 1e3:.2f} ms |"
        )
    while model.slots.capacity > len(model.plugged):  # fill up, then the next plug doubles
        model.plug(dataclasses.replace(template, name=f"p{len(model.plugged)}"))
    synchronize(device)
    start = time.perf_counter()
    model.plug(dataclasses.replace(template, name="grow"))
    synchronize(device)
    lines.append(
        f"| a plug that doubles capacity {model.slots.capacity // 2} -> {model.slots.capacity} | "
        f"{(time.perf_counter() - start) * 1e3:.1f} ms | - |"
    )
    return lines


def memory_per_expert(model: RoutedModel, rank: int, kind: str) -> str:
    """Bytes the storage spends per slot (weights + gates) against an expert file's size."""
    layers, hidden = model.num_layers, model.hidden_size
    expert = make_experts(1, hidden, layers, rank, kind=kind, shapes=model.projection_shapes)[0]
    expert = expert.to("cpu", model.dtype)
    file_bytes = len(ExpertFile.to_bytes(expert, model.fingerprint))
    slots = model.slots
    per_slot = slots.nbytes() / slots.capacity
    in_file = expert.nbytes
    return (
        f"memory per plugged {kind} expert (rank {rank}, {layers} layers, {str(model.dtype).removeprefix('torch.')}): "
        f"{per_slot / 1e6:.3f} MB in its slot (weights + gates, every slot filled with one like it), "
        f"file {file_bytes / 1e6:.3f} MB ({in_file / 1e6:.3f} MB of tensors): {per_slot / file_bytes:.2f}x the "
        "file; the plugged set keeps no other copy (its experts are weightless handles)"
    )


def configurations(
    hf,
    peft_run: Callable | None,
    routed: RoutedModel,
    decoders: dict[str, StaticDecoder],
    ids: torch.Tensor,
    new: int,
    fuse: bool,
) -> dict[str, Callable[[], float]]:
    """Each column's run: () -> decode seconds."""
    runs: dict[str, Callable[[], float]] = {"HF bare": lambda: hf_decode(hf, ids, new)}
    if peft_run is not None:
        runs["PEFT mixed"] = lambda: peft_run(ids, new)

    def before() -> float:
        routed.fuse_decode_routing(False)  # the old path ran the plain ops
        try:
            return routed_before(routed, ids, new)
        finally:
            routed.fuse_decode_routing(fuse)

    runs["routed before"] = before
    for kind, decoder in decoders.items():
        if kind == "context":
            runs["routed context"] = lambda d=decoder: static_decode(d, routed, ids, new, RoutingSpec(), d.plugged)
            continue
        runs[f"bare {kind}"] = lambda d=decoder: static_decode(d, routed, ids, new, RoutingSpec("off"))
        runs[f"routed {kind}"] = lambda d=decoder: static_decode(d, routed, ids, new, RoutingSpec())
    return runs


def table_row(batch: int, columns: list[str], times: dict[str, list[float]]) -> str:
    med = {name: statistics.median(v) for name, v in times.items()}

    def cell(name: str) -> str:
        return f"{med[name]:.1f} [{min(times[name]):.0f}-{max(times[name]):.0f}]" if name in med else "-"

    def ratio(a: str, b: str) -> str:
        return f"{med[a] / med[b]:.3f}" if a in med and b in med else "-"

    return (
        f"| {batch} | "
        + " | ".join(cell(c) for c in columns)
        + f" | {ratio('routed eager', 'bare eager')} | {ratio('routed captured', 'bare captured')} | "
        f"{ratio('PEFT mixed', 'HF bare')} | {ratio('routed eager', 'HF bare')} | "
        f"{ratio('routed context', 'bare eager')} |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="gpt2-124m")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    parser.add_argument("--batches", type=int, nargs="*", default=[1, 16], help="none: plug latency and memory only")
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument(
        "--kind",
        choices=["bottleneck", "lora"],
        default="bottleneck",
        help="the routed experts' kind (lora: rank --rank on every MLP projection; decodes eagerly, never captured)",
    )
    parser.add_argument("--prompt", type=int, default=32)
    parser.add_argument("--new", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument(
        "--fuse", choices=["auto", "on", "off"], default="auto", help="compile decode routing (auto: CUDA)"
    )
    parser.add_argument("--no-peft", action="store_true")
    parser.add_argument("--plug-counts", type=int, nargs="*", default=[8, 256])
    parser.add_argument("--plug-trials", type=int, default=20)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cuda = device.type == "cuda"

    routed = RoutedModel(build(args.shape, args.device, args.dtype))
    pool = make_experts(
        args.experts, routed.hidden_size, routed.num_layers, args.rank, kind=args.kind, shapes=routed.projection_shapes
    )
    for expert in pool:
        routed.plug(expert)
    fuse = args.fuse == "on" or (args.fuse == "auto" and cuda)
    hf = build(args.shape, args.device, args.dtype) if args.batches else None  # the same weights (seed), bare
    peft_run = None
    if args.batches and not args.no_peft:
        try:
            peft_run = peft_mixed(build(args.shape, args.device, args.dtype), args.shape, 8, args.rank)
        except ImportError:
            print("PEFT is not installed: its column is skipped")
    where = torch.cuda.get_device_name() if cuda else f"{torch.get_num_threads()} threads"
    print(
        f"shape {args.shape} on {device} ({where}), {args.dtype}; {args.experts} experts of rank {args.rank} routing "
        f"every token; prompt {args.prompt}, "
        f"{args.new} new tokens; median of {args.repeats} [min-max]; decode routing fused: {fuse}; torch "
        f"{torch.__version__}\n"
    )
    columns = ["HF bare", "PEFT mixed", "routed before", "bare eager", "routed eager", "routed context"]
    if cuda:
        columns += ["bare captured", "routed captured"]
    if args.batches:
        print(
            "| batch | "
            + " | ".join(columns)
            + " | routed/bare eager | routed/bare captured | PEFT/HF bare | routed eager/HF bare | context/bare eager |"
        )
        print("|---" * (len(columns) + 6) + "|")
    # token mode by a context router: the same experts, a set that carries one (a fixed set: the model's stays as is)
    router = random_context_router(routed.plugged.names, routed.num_layers, routed.hidden_size)
    with_router = dataclasses.replace(routed.plugged, context=router)
    for batch in args.batches:
        ids = torch.randint(1, 30000, (batch, args.prompt), generator=torch.Generator().manual_seed(2)).to(device)
        routed.fuse_decode_routing(fuse)
        decoders = {
            "eager": StaticDecoder(routed, batch, args.prompt + args.new + 2),
            "context": StaticDecoder(routed, batch, args.prompt + args.new + 2, plugged=with_router),
        }
        if cuda:
            decoders["captured"] = StaticDecoder(routed, batch, args.prompt + args.new + 2, capture=True)
        runs = configurations(hf, peft_run, routed, decoders, ids, args.new, fuse)
        for run in runs.values():  # warm-up: captures, compiles, allocator
            run()
        times: dict[str, list[float]] = {name: [] for name in runs}
        for _ in range(args.repeats):  # round-robin, so drifting load hits every configuration alike
            for name, run in runs.items():
                times[name].append(batch * args.new / run())
        print(table_row(batch, columns, times), flush=True)
        med = {name: statistics.median(v) for name, v in times.items()}
        if "routed before" in med and "routed captured" in med:
            gain = med["routed captured"] / med["routed before"]
            print(f"  batch {batch}: routed captured / routed before = {gain:.1f}x")
        del decoders
        if cuda:
            torch.cuda.empty_cache()
    print()
    print(memory_per_expert(routed, args.rank, args.kind))
    if args.plug_counts:
        print("\n| plug latency (RoutedModel.plug / unplug, device synchronised) | plug median [min-max] | unplug |")
        print("|---|---|---|")
        for line in plug_latency(routed, args.plug_counts, args.rank, args.plug_trials, args.kind):
            print(line)


if __name__ == "__main__":
    main()
