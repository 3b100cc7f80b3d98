"""Load benchmark: streaming clients against a plugmoe server, token routing against routing off, HF `generate` on
the same prompts as one static batch, and the inter-token latency while experts are plugged and unplugged.

    python bench/serve_load.py --model-dir demo/model --clients 1,16          # the demo model and its experts, CPU
    python bench/serve_load.py --shape gpt2-124m                               # a random GPT-2-124M, 8 experts
    python bench/serve_load.py --shape qwen2.5-0.5b --device cuda --dtype bfloat16 --clients 1,16,64 \\
        --max-batch-size 64 --closed-experts 247                              # GPU, 255 plugged (+1 in plugs)
    python bench/serve_load.py --tiny                                          # a quick run

Every request generates exactly --new-tokens tokens (min_new_tokens = max_new_tokens, greedy), so the numbers
compare equal work. tokens/s = generated tokens / wall time of the whole level. Each level runs with `token`
routing and with routing `off` (same server, same experts plugged), alternating `--rounds` times after an untimed
full-length warm-up of each; the median run of each mode is shown, and routed / off is the cost of routing. With
a random shape, --experts experts route every token (thresholds -1, the worst case) and --closed-experts more are
plugged that never win (a server holding many experts). --plug-during: after the
levels, one more run at the largest level (token routing, not in the routed / off table) while an extra expert
is plugged and unplugged over HTTP every --plug-every seconds; ITL p99 of the token gaps that overlap a plug or
unplug is reported against that run's p50 of all gaps. The HF baseline runs first, before the server starts.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.server_process import free_port, start_ready  # noqa: E402


def build_model(directory: Path, shape: str | None, dtype: str) -> Path:
    """A random model (a named shape, or a tiny Llama) with the tiny test tokenizer (ids past its vocabulary
    decode to ''), saved like a checkpoint."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    from bench.shapes import build
    from tests.tiny import tiny_tokenizer

    tokenizer = tiny_tokenizer()
    if shape is None:
        config = LlamaConfig(
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=128,
            vocab_size=len(tokenizer),
            max_position_embeddings=1024,
            bos_token_id=0,
            eos_token_id=0,
            pad_token_id=0,
        )
        model = AutoModelForCausalLM.from_config(config)
    else:
        model = build(shape, "cpu", dtype)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def write_experts(model_dir: Path, directory: Path, routed: int, closed: int, rank: int, dtype: str) -> None:
    """Expert files for the model in model_dir: `routed` that win every token, `closed` that never win."""
    import torch

    from bench.shapes import DTYPES
    from moe import Expert, ExpertFile
    from moe.model.backbone import fingerprint, load_backbone

    model, _ = load_backbone(model_dir, device="cpu", dtype="float32")
    backbone = fingerprint(model)
    hidden, layers = backbone.hidden_size, backbone.num_layers
    del model
    directory.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(1)
    base = Expert.fresh("r0", hidden, list(range(layers)), rank=rank, generator=g)
    base.up = torch.randn(base.up.shape, generator=g) * 0.01
    for i in range(routed + closed):
        keys = torch.randn(base.keys.shape, generator=g)
        threshold = -1.0 if i < routed else 2.0
        expert = dataclasses.replace(
            base,
            name=f"r{i}" if i < routed else f"c{i}",
            keys=keys / keys.norm(dim=-1, keepdim=True),
            thresholds=torch.full_like(base.thresholds, threshold),
        )
        expert = expert.to("cpu", DTYPES[dtype])
        (directory / f"{expert.name}.safetensors").write_bytes(ExpertFile.to_bytes(expert, backbone))


def make_prompts(model_dir: Path, count: int, tokens: int, source: Path | None = None) -> list[str]:
    """`count` prompts of `tokens` tokens cut from one text: by default a mix of prose, math and code (tests.tiny),
    else the records of a JSONL file ({"text"} or {"question"}), e.g. demo/data/general_heldout.jsonl."""
    from transformers import AutoTokenizer

    from tests.tiny import _TEXT

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if source is None:
        text = " ".join(_TEXT * 20)
    else:
        records = [json.loads(line) for line in source.read_text().splitlines() if line.strip()]
        text = " ".join(r.get("text") or r["question"] for r in records)
    ids = tokenizer.encode(text)
    prompts = []
    for i in range(count):
        start = (i * 7) % (len(ids) - tokens)
        prompts.append(tokenizer.decode(ids[start : start + tokens]))
    return prompts


async def one_request(client: httpx.AsyncClient, prompt: str, new_tokens: int, routing: str) -> dict:
    body = {
        "prompt": prompt,
        "max_new_tokens": new_tokens,
        "min_new_tokens": new_tokens,
        "stream": True,
        "routing": {"mode": routing},
    }
    start = time.perf_counter()
    arrivals: list[float] = []
    last: dict = {}
    async with client.stream("POST", "/generate", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: "):
                continue
            event = json.loads(line[6:])
            if "finish_reason" in event:
                last = event
            else:
                arrivals.append(time.perf_counter())
    if last.get("finish_reason") not in ("length", "stop"):
        raise RuntimeError(f"request ended with {last}")
    return {"tokens": last["usage"]["completion_tokens"], "ttft": arrivals[0] - start, "arrivals": arrivals}


async def plug_cycles(url: str, expert_file: Path, every: float, stop: asyncio.Event, windows: list) -> None:
    """Plug and unplug one expert over HTTP until `stop`; record each call's (start, end)."""
    data = expert_file.read_bytes()
    async with httpx.AsyncClient(base_url=url, timeout=600) as client:
        while not stop.is_set():
            await asyncio.sleep(every)
            start = time.perf_counter()
            files = {"file": ("extra.safetensors", data, "application/octet-stream")}
            (await client.post("/experts", files=files, data={"name": "extra"})).raise_for_status()
            middle = time.perf_counter()
            (await client.delete("/experts/extra")).raise_for_status()
            windows.append((start, middle, "plug"))
            windows.append((middle, time.perf_counter(), "unplug"))


async def load_level(
    url: str,
    prompts: list[str],
    clients: int,
    requests_per_client: int,
    new_tokens: int,
    routing: str,
    plug_file: Path | None = None,
    plug_every: float = 0.5,
) -> dict:
    async def client_loop(client: httpx.AsyncClient, index: int) -> list[dict]:
        results = []
        for r in range(requests_per_client):
            prompt = prompts[(index + r * clients) % len(prompts)]
            results.append(await one_request(client, prompt, new_tokens, routing))
        return results

    limits = httpx.Limits(max_connections=clients + 4)
    windows: list[tuple[float, float, str]] = []
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
        await one_request(client, prompts[0], 2, routing)  # warm up
        stop = asyncio.Event()
        plugger = asyncio.ensure_future(plug_cycles(url, plug_file, plug_every, stop, windows)) if plug_file else None
        start = time.perf_counter()
        per_client = await asyncio.gather(*[client_loop(client, i) for i in range(clients)])
        wall = time.perf_counter() - start
        if plugger is not None:
            stop.set()
            await plugger
    results = [r for rs in per_client for r in rs]
    gaps = [(a, b) for r in results for a, b in zip(r["arrivals"], r["arrivals"][1:], strict=False)]
    itls = sorted(b - a for a, b in gaps)
    during = sorted(b - a for a, b in gaps if any(a < end and b > begin for begin, end, _ in windows))
    tokens = sum(r["tokens"] for r in results)
    return {
        "clients": clients,
        "routing": routing,
        "requests": len(results),
        "tokens": tokens,
        "wall": wall,
        "tok_s": tokens / wall,
        "ttft_p50": _pct(sorted(r["ttft"] for r in results), 50),
        "ttft_p99": _pct(sorted(r["ttft"] for r in results), 99),
        "itl_p50": _pct(itls, 50),
        "itl_p99": _pct(itls, 99),
        "plugs": [end - begin for begin, end, kind in windows if kind == "plug"],
        "unplugs": [end - begin for begin, end, kind in windows if kind == "unplug"],
        "itl_during_plug_p99": _pct(during, 99),
        "gaps_during_plug": len(during),
    }


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[min(98, max(0, int(q) - 1))]


def hf_static_batch(
    model_dir: Path, prompts: list[str], new_tokens: int, repeats: int, device: str, dtype: str
) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from bench.shapes import DTYPES

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=DTYPES[dtype]).to(device).eval()
    batch = tokenizer(prompts, return_tensors="pt", padding=True).to(device)
    best = float("inf")
    with torch.inference_mode():
        model.generate(**batch, max_new_tokens=2, do_sample=False, pad_token_id=0)
        for _ in range(repeats):
            if device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            model.generate(
                **batch, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0
            )
            if device == "cuda":
                torch.cuda.synchronize()
            best = min(best, time.perf_counter() - start)
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    tokens = new_tokens * len(prompts)
    return {"tokens": tokens, "wall": best, "tok_s": tokens / best}


def during_plugs(row: dict, plugged: int) -> str:
    if not row["plugs"]:
        return f"during plugs ({row['clients']} clients): no plug cycle completed within the run"
    plug, unplug = statistics.median(row["plugs"]) * 1e3, statistics.median(row["unplugs"]) * 1e3
    during = row["itl_during_plug_p99"]
    return (
        f"during {len(row['plugs'])} plug + unplug cycles over HTTP ({row['clients']} clients, routing "
        f"{row['routing']}, {plugged} plugged + the one plugged and unplugged): {row['tok_s']:.1f} tok/s; plug "
        f"request median {plug:.1f} ms, unplug {unplug:.1f} ms; ITL p99 of the {row['gaps_during_plug']} token gaps "
        f"overlapping one: {during * 1e3:.1f} ms = {during / row['itl_p50']:.2f}x the ITL p50 "
        f"({row['itl_p50'] * 1e3:.1f} ms)"
    )


def start_server(
    model_dir: Path, experts: Path, seed: Path | None, args: argparse.Namespace, log: Path
) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PLUGMOE_MAX_FALSE_POSITIVE_RATE": "-1", "PLUGMOE_MAX_STEAL_RATE": "-1"}
    command = [
        sys.executable,
        "-m",
        "server",
        "--model",
        str(model_dir),
        "--port",
        str(port),
        "--device",
        args.device,
        "--dtype",
        args.dtype,
        "--experts-dir",
        str(experts),
        "--max-batch-size",
        str(args.max_batch_size),
        "--max-new-tokens",
        str(args.new_tokens),
        "--max-queue",
        "1024",
        "--log-level",
        "warning",
        *(["--seed-experts", str(seed)] if seed else []),
        *(["--num-threads", str(args.threads)] if args.threads else []),
        *([] if args.cuda_graphs else ["--no-cuda-graphs"]),
    ]
    return start_ready(command, env, port, log, 900)


def main() -> None:
    from bench.shapes import SHAPES

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", type=Path, help="a model directory (default: a random --shape)")
    parser.add_argument("--shape", choices=sorted(SHAPES), default="gpt2-124m")
    parser.add_argument("--tiny", action="store_true", help="a tiny random Llama, for a quick run")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    parser.add_argument(
        "--experts",
        type=int,
        help="experts that win every token (default: 8 with a random model; with --model-dir, "
        "none: the server's own seed experts, e.g. the demo's)",
    )
    parser.add_argument("--closed-experts", type=int, default=0, help="plugged experts that never win a token")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument(
        "--prompts-from", type=Path, help='JSONL ({"text"} or {"question"}) to cut prompts from (default: mixed text)'
    )
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--clients", default="1,16")
    parser.add_argument("--routing", default="token,off", help="routing modes to run at each level")
    parser.add_argument("--requests-per-client", type=int, default=2)
    parser.add_argument(
        "--rounds", type=int, default=1, help="runs of each level per mode, alternating; the median run is shown"
    )
    parser.add_argument("--max-batch-size", type=int, default=16)
    parser.add_argument("--hf-repeats", type=int, default=2)
    parser.add_argument("--no-hf", action="store_true", help="skip the HF static-batch baseline")
    parser.add_argument("--threads", type=int, help="torch threads for the server and the HF baseline")
    parser.add_argument("--cuda-graphs", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--plug-during", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--plug-every", type=float, default=0.5, help="seconds between plug cycles")
    parser.add_argument("--log", type=Path, help="the server's log file (default: a temporary one)")
    args = parser.parse_args()

    if args.experts is None:
        args.experts = 0 if args.model_dir else 8
    levels = [int(c) for c in args.clients.split(",")]
    modes = args.routing.split(",")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model_dir = args.model_dir
        seed = None
        if model_dir is None:
            model_dir = build_model(tmp / "model", None if args.tiny else args.shape, args.dtype)
        if args.model_dir is None or args.experts or args.closed_experts:
            seed = tmp / "seed"
            write_experts(model_dir, seed, args.experts, args.closed_experts, args.rank, args.dtype)
        extra = tmp / "extra"
        write_experts(model_dir, extra, 1, 0, args.rank, args.dtype)
        prompts = make_prompts(model_dir, max(levels), args.prompt_tokens, args.prompts_from)
        static = None
        if not args.no_hf:  # first, in this process, so its GPU memory is given back before the server starts
            static = hf_static_batch(
                model_dir, prompts[: max(levels)], args.new_tokens, args.hf_repeats, args.device, args.dtype
            )
            print(f"  HF generate, static batch of {max(levels)}: {static['tok_s']:.1f} tok/s", flush=True)
        log = args.log or tmp / "server.log"
        process, url = start_server(model_dir, tmp / "experts", seed, args, log)
        rows = []
        plug_row = None
        try:
            plugged = httpx.get(f"{url}/experts", timeout=60).json()
            for clients in levels:
                for mode in modes:  # untimed, full length: every bucket this level reaches (rows and KV columns)
                    # is allocated and captured first, so the mode measured first pays no warm-up the other skips
                    asyncio.run(load_level(url, prompts, clients, 1, args.new_tokens, mode))
                runs: dict[str, list[dict]] = {mode: [] for mode in modes}
                for _ in range(args.rounds):  # modes alternate, so drifts of a shared machine hit both alike
                    for mode in modes:
                        row = asyncio.run(
                            load_level(url, prompts, clients, args.requests_per_client, args.new_tokens, mode)
                        )
                        runs[mode].append(row)
                        print(
                            f"  {clients} clients, routing {mode}: {row['tok_s']:.1f} tok/s, ITL p50/p99 "
                            f"{row['itl_p50'] * 1e3:.1f}/{row['itl_p99'] * 1e3:.1f} ms",
                            flush=True,
                        )
                rows.extend(sorted(runs[mode], key=lambda r: r["tok_s"])[(args.rounds - 1) // 2] for mode in modes)
            if args.plug_during:  # a run of its own, so plugs do not weigh on the routed / off figures
                plug_row = asyncio.run(
                    load_level(
                        url,
                        prompts,
                        max(levels),
                        args.requests_per_client,
                        args.new_tokens,
                        modes[0],
                        extra / "r0.safetensors",
                        args.plug_every,
                    )
                )
                print(during_plugs(plug_row, len(plugged)), flush=True)
        finally:
            process.terminate()
            process.wait(60)

    print(f"\nload average at the end: {os.getloadavg()}; torch threads: {args.threads or 'default'}")
    print(
        f"model: {args.model_dir or ('tiny' if args.tiny else args.shape)} on {args.device} {args.dtype}; "
        f"{len(plugged)} experts plugged ({args.experts} routing every token, {args.closed_experts} never); "
        f"{args.prompt_tokens}-token prompts, {args.new_tokens} new tokens, greedy; {args.requests_per_client} "
        f"requests per client; max batch {args.max_batch_size}; CUDA graphs {args.cuda_graphs}\n"
    )
    by = {(r["clients"], r["routing"]): r for r in rows}
    print("| clients | routing | tokens/s | routed / off | x static batch | TTFT p50 / p99 (s) | ITL p50 / p99 (ms) |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        off = by.get((row["clients"], "off"))
        versus_off = f"{row['tok_s'] / off['tok_s']:.2f}" if off and row["routing"] != "off" else "-"
        versus_static = f"{row['tok_s'] / static['tok_s']:.2f}" if static else "-"
        print(
            f"| {row['clients']} | {row['routing']} | {row['tok_s']:.1f} | {versus_off} | {versus_static} | "
            f"{row['ttft_p50']:.3f} / {row['ttft_p99']:.3f} | {row['itl_p50'] * 1e3:.1f} / {row['itl_p99'] * 1e3:.1f} |"
        )
    if static:
        print(f"| HF generate, static batch of {max(levels)} | - | {static['tok_s']:.1f} | - | 1.00 | - | - |")
    if plug_row is not None:
        print("\n" + during_plugs(plug_row, len(plugged)))


if __name__ == "__main__":
    main()
