"""plugmoe against the server a CPU user would pick instead, side by side in one run: plugmoe with routing off and
with token routing, `transformers serve --continuous-batching` (Hugging Face's OpenAI-compatible server; skipped
with a message when it is not installed), and HF `generate` as one static batch in this process's main thread.

    python bench/peer.py --shape demo                 # the demo model, its experts, mixed prompts (math, code, prose)
    python bench/peer.py --shape gpt2-124m            # random GPT-2-124M weights, 8 experts routing every token
    python bench/peer.py --shape demo --baseline /tmp/plugmoe-before   # plus routing off from another checkout
    python bench/peer.py --shape demo --compile-decode inductor        # plugmoe's decode steps torch.compile'd
    python bench/peer.py --shape demo --non-streaming --no-peer        # plus routing off not streamed
    python bench/peer.py --shape demo --h11 --no-peer                  # plus routing off over the h11 parser

Every client sends one streaming `/v1/completions` request at a time (greedy, `--new-tokens` exactly: plugmoe with
`min_tokens`, transformers serve with EOS off through `"generation_config": "{\\"eos_token_id\\": -1}"`), prompts
of `--prompt-tokens` tokens; HF `generate` runs the same prompts as static batches of `--clients` rows. The
configurations run one after another, their order rotated each round, after an untimed warm-up of each; a ratio
is taken within each round and the median over rounds is printed (a shared machine drifts between rounds: the
load average is printed with each round). tokens/s = generated tokens / wall time of the run. CPU: the cores
each server process (its children included) used during the run, from /proc; HF's are this process's. Client
cores: this process's CPU while it ran a server's clients (the clients share the machine's cores with the server;
HF's static batch has none). The clients are aiohttp's (HTTP parsed in C, as in `vllm bench serve`); `--client httpx`
runs the pure-Python client of earlier releases, which took about twice the cores (demo model, 16 clients: 0.17-0.20
against 0.08-0.10), cores the server then did not get.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.serve_load import _pct, write_experts  # noqa: E402
from bench.server_process import free_port, start_ready  # noqa: E402

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
DEMO_SOURCES = ("math_heldout.jsonl", "code_heldout.jsonl", "general_heldout.jsonl")


@dataclasses.dataclass
class Server:
    """A server process this bench started, and how to ask it for a completion."""

    name: str
    process: subprocess.Popen
    url: str
    model: str
    extra: dict  # body fields that make it generate exactly --new-tokens tokens with the configuration's routing
    stream: bool = True  # False: one JSON answer per request (no TTFT or ITL: what streaming costs, by difference)


@dataclasses.dataclass
class Run:
    config: str
    tokens: int
    wall: float
    ttfts: list[float]
    itls: list[float]
    cores: float
    texts: list[str]
    client_cores: float | None = None  # the clients' CPU (this process) during a server's run; None for HF's
    thread_cores: dict[str, float] | None = None  # a plugmoe server's cores by thread role (thread_seconds)

    @property
    def tok_s(self) -> float:
        return self.tokens / self.wall


# --- what to serve --------------------------------------------------------------------------------------------


def shape_with_demo_vocabulary(directory: Path, shape: str) -> Path:
    """Random weights of a named shape (bench/shapes.py) with the demo model's vocabulary and tokenizer, saved like
    a checkpoint: every id the model can pick decodes to text, so each streamed token is seen arriving."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from bench.shapes import SHAPES

    tokenizer = AutoTokenizer.from_pretrained(REPO / "demo" / "model")
    config = SHAPES[shape]()
    config.vocab_size = len(tokenizer)
    config.pad_token_id = config.eos_token_id = config.bos_token_id = tokenizer.bos_token_id or 0
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    print(f"{shape} shape, random weights, demo vocabulary ({len(tokenizer)}): {model.num_parameters() / 1e6:.1f}M")
    return directory


def demo_prompts(model_dir: Path, count: int, tokens: int) -> list[str]:
    """`count` prompts of `tokens` tokens, taken in turn from the demo's held-out math, code and prose."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    streams = []
    for name in DEMO_SOURCES:
        records = [json.loads(line) for line in (REPO / "demo" / "data" / name).read_text().splitlines() if line]
        streams.append(
            tokenizer.encode(" ".join(r.get("text") or r["question"] for r in records), add_special_tokens=False)
        )
    return [_cut(tokenizer, streams[i % len(streams)], (i // len(streams)) * 61, tokens) for i in range(count)]


def mixed_prompts(model_dir: Path, count: int, tokens: int) -> list[str]:
    """`count` prompts of `tokens` tokens cut from a mix of prose, math and code (tests.tiny's text)."""
    from transformers import AutoTokenizer

    from tests.tiny import _TEXT

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    ids = tokenizer.encode(" ".join(_TEXT * 20), add_special_tokens=False)
    return [_cut(tokenizer, ids, i * 7, tokens) for i in range(count)]


def _cut(tokenizer, ids: list[int], start: int, tokens: int) -> str:
    """A text that encodes to exactly `tokens` tokens (a BOS the tokenizer adds included: what the servers see),
    cut from `ids` at or after `start` (a decode and re-encode can merge tokens at the edges: the first start that
    round-trips is taken)."""
    body = tokens - len(tokenizer.encode(""))
    for offset in range(start, len(ids) - body):
        text = tokenizer.decode(ids[offset : offset + body], skip_special_tokens=True)
        if len(tokenizer.encode(text)) == tokens:
            return text
    raise ValueError(f"no {tokens}-token prompt round-trips in this text")


# --- servers --------------------------------------------------------------------------------------------------


def start(name: str, command: list[str], cwd: Path, env: dict, health: str, log: Path, timeout_s: float) -> tuple:
    """Start `command` on a free port (`{port}` in it is replaced) and wait until `health` answers 200."""
    port = free_port()
    command = [part.replace("{port}", str(port)) for part in command]
    return start_ready(command, env, port, log, timeout_s, health=health, cwd=cwd, name=name)


def start_plugmoe(
    checkout: Path, model_dir: Path, seed: Path, tmp: Path, args: argparse.Namespace, tag: str, *flags: str
):
    env = {
        **os.environ,
        "PYTHONPATH": str(checkout),
        "HF_HUB_OFFLINE": "1",
        "PLUGMOE_MAX_FALSE_POSITIVE_RATE": "-1",
        "PLUGMOE_MAX_STEAL_RATE": "-1",
    }
    command = [
        sys.executable,
        "-m",
        "server",
        "--model",
        str(model_dir),
        "--port",
        "{port}",
        "--experts-dir",
        str(tmp / f"store-{tag}"),
        "--seed-experts",
        str(seed),
        "--num-threads",
        str(args.threads),
        "--max-batch-size",
        str(args.clients),
        "--max-new-tokens",
        str(args.new_tokens),
        "--max-queue",
        "1024",
        "--log-level",
        "warning",
        # this checkout's flag (a baseline checkout may not have it)
        *(["--compile-decode", args.compile_decode] if args.compile_decode != "off" and checkout == REPO else []),
        *flags,
    ]
    process, url = start(f"plugmoe ({tag})", command, checkout, env, "/ready", tmp / f"plugmoe-{tag}.log", 900)
    try:
        model = httpx.get(f"{url}/v1/models", timeout=30).json()["data"][0]["id"]
        experts = [e["name"] for e in httpx.get(f"{url}/experts", timeout=30).json()]
    except Exception:
        process.terminate()
        raise
    print(f"plugmoe ({tag}) at {url}: model {model!r}, experts {experts}", flush=True)
    return process, url, model


def start_peer(model_dir: Path, tmp: Path, args: argparse.Namespace) -> Server | None:
    executable = shutil.which("transformers")
    if executable is None:
        print("transformers serve: skipped (no `transformers` command; pip install 'transformers[serving]')")
        return None
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(args.threads)}
    command = [
        executable,
        "serve",
        str(model_dir),
        "--continuous-batching",
        "--cb-num-blocks",
        str(args.cb_num_blocks),
        "--device",
        "cpu",
        "--port",
        "{port}",
        "--log-level",
        "warning",
    ]
    try:
        process, url = start("transformers serve", command, REPO, env, "/health", tmp / "peer.log", 900)
    except RuntimeError as e:
        print(f"transformers serve: skipped ({e})")
        return None
    generation_config = json.dumps({"eos_token_id": -1, "do_sample": False})
    print(f"transformers serve --continuous-batching at {url}", flush=True)
    return Server("transformers serve", process, url, str(model_dir), {"generation_config": generation_config})


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process and its descendants still alive, from /proc."""
    total, pending = 0.0, [pid]
    while pending:
        current = pending.pop()
        try:
            fields = Path(f"/proc/{current}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime, stime
            for task in Path(f"/proc/{current}/task").iterdir():
                children = (task / "children").read_text().split()
                pending.extend(int(child) for child in children)
        except (FileNotFoundError, ProcessLookupError):
            continue
    return total


THREAD_ROLES = ("engine", "event loop", "torch pool", "other")


def thread_seconds(pid: int) -> dict[str, float]:
    """CPU time of one process's threads by role, from /proc (schedstat: nanoseconds): plugmoe's engine thread (named
    plugmoe-engine in the OS: server.engine.name_os_thread; a checkout older than that counts it with the pool),
    the main thread (uvicorn's event loop), torch's intra-op pool workers (the engine's, which spin between ops:
    the threads it started, which inherit its name, and those with the process's name) and the rest."""
    roles = dict.fromkeys(THREAD_ROLES, 0.0)
    try:
        tasks = sorted(Path(f"/proc/{pid}/task").iterdir(), key=lambda task: int(task.name))
    except FileNotFoundError:
        return roles
    engine_seen = False
    for task in tasks:
        try:
            stat = (task / "stat").read_text()
            ran_ns = int((task / "schedstat").read_text().split()[0])  # CPU time in ns (stat counts 10 ms ticks)
        except (FileNotFoundError, ProcessLookupError):
            continue
        name = stat[stat.index("(") + 1 : stat.rindex(")")]
        seconds = ran_ns / 1e9
        if name.startswith("plugmoe-engine") and not engine_seen:  # the first; its pool workers come after it
            role, engine_seen = "engine", True
        elif task.name == str(pid):
            role = "event loop"
        elif name.startswith(("python", "pt_", "plugmoe-engine")):
            role = "torch pool"
        else:
            role = "other"
        roles[role] += seconds
    return roles


# --- one run of a configuration -------------------------------------------------------------------------------


async def one_request(lines_of, server: Server, prompt: str, new_tokens: int) -> dict:
    """One streaming completion; lines_of(body): the response's lines (an async iterator, the client's own)."""
    body = {
        "model": server.model,
        "prompt": prompt,
        "max_tokens": new_tokens,
        "temperature": 0,
        "stream": server.stream,
        **({"stream_options": {"include_usage": True}} if server.stream else {}),
        **server.extra,
    }
    start = time.perf_counter()
    arrivals: list[float] = []
    text: list[str] = []
    usage = None
    if not server.stream:
        answer = json.loads("".join([line async for line in lines_of(body)]))
        tokens = answer["usage"]["completion_tokens"]
        if tokens != new_tokens:
            raise RuntimeError(f"{server.name} generated {tokens} tokens, not {new_tokens}: {answer['usage']}")
        return {"tokens": tokens, "ttft": None, "arrivals": [], "text": answer["choices"][0]["text"]}
    async for line in lines_of(body):
        if not line.startswith("data: ") or line == "data: [DONE]":
            continue
        chunk = json.loads(line[6:])
        if chunk.get("usage"):
            usage = chunk["usage"]
        for choice in chunk.get("choices") or ():  # a token's chunk, its text possibly held back (partial UTF-8)
            if choice.get("finish_reason") and not choice.get("text"):
                continue  # the closing chunk, no token in it
            arrivals.append(time.perf_counter())
            text.append(choice.get("text") or "")
    tokens = usage["completion_tokens"] if usage else len(arrivals)
    if tokens != new_tokens:
        raise RuntimeError(f"{server.name} generated {tokens} tokens, not {new_tokens}: {usage}")
    return {"tokens": tokens, "ttft": arrivals[0] - start, "arrivals": arrivals, "text": "".join(text)}


@contextlib.asynccontextmanager
async def client_lines(kind: str, server: Server, connections: int):
    """A client for `connections` concurrent streams -> lines_of(body): POST /v1/completions, its lines.
    aiohttp (what vLLM's `vllm bench serve` uses) parses HTTP in C; httpx (pure Python, h11) costs the shared cores
    ~3x more per streamed token, which the server then does not get."""
    if kind == "aiohttp":
        import aiohttp

        connector = aiohttp.TCPConnector(limit=connections)
        timeout = aiohttp.ClientTimeout(900)
        async with aiohttp.ClientSession(server.url, connector=connector, timeout=timeout) as session:

            async def lines_of(body: dict):
                async with session.post("/v1/completions", json=body) as response:
                    if response.status != 200:
                        raise RuntimeError(f"{server.name}: HTTP {response.status}: {(await response.read())[:500]!r}")
                    async for raw in response.content:
                        yield raw.decode().rstrip("\r\n")

            yield lines_of
        return
    limits = httpx.Limits(max_connections=connections)
    async with httpx.AsyncClient(base_url=server.url, timeout=900, limits=limits) as client:

        async def lines_of(body: dict):
            async with client.stream("POST", "/v1/completions", json=body) as response:
                if response.status_code != 200:
                    said = (await response.aread())[:500]
                    raise RuntimeError(f"{server.name}: HTTP {response.status_code}: {said!r}")
                async for line in response.aiter_lines():
                    yield line

        yield lines_of


async def serve_run(server: Server, prompts: list[str], args: argparse.Namespace) -> dict:
    async def client_loop(lines_of, index: int) -> list[dict]:
        return [
            await one_request(lines_of, server, prompts[index], args.new_tokens)
            for _ in range(args.requests_per_client)
        ]

    async with client_lines(args.client, server, len(prompts) + 4) as lines_of:
        pid = server.process.pid
        cpu_before, client_before, threads_before = cpu_seconds(pid), time.process_time(), thread_seconds(pid)
        start = time.perf_counter()
        per_client = await asyncio.gather(*[client_loop(lines_of, i) for i in range(len(prompts))])
        wall = time.perf_counter() - start
        cpu, client_cpu = cpu_seconds(pid) - cpu_before, time.process_time() - client_before
        threads = thread_seconds(pid)
    return {
        "per_client": per_client,
        "wall": wall,
        "cores": cpu / wall,
        "client_cores": client_cpu / wall,
        "thread_cores": {role: (threads[role] - threads_before[role]) / wall for role in THREAD_ROLES},
    }


def run_server(config: str, server: Server, prompts: list[str], args: argparse.Namespace) -> Run:
    result = asyncio.run(serve_run(server, prompts, args))
    rows = [r for rs in result["per_client"] for r in rs]
    itls = [b - a for r in rows for a, b in zip(r["arrivals"], r["arrivals"][1:], strict=False)]
    texts = [rs[0]["text"] for rs in result["per_client"]]
    ttfts = [r["ttft"] for r in rows if r["ttft"] is not None]
    tokens = sum(r["tokens"] for r in rows)
    thread_cores = result["thread_cores"] if server.name.startswith("plugmoe") else None
    return Run(
        config, tokens, result["wall"], ttfts, itls, result["cores"], texts, result["client_cores"], thread_cores
    )


class StaticBatch:
    """HF `generate` on all prompts as one left-padded batch, in this process's main thread."""

    def __init__(self, model_dir: Path, prompts: list[str], threads: int) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        torch.set_num_threads(threads)
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.tokenizer.padding_side = "left"
        self.model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
        self.batch = self.tokenizer(prompts, return_tensors="pt", padding=True)

    def run(self, args: argparse.Namespace) -> Run:
        import torch

        cpu_before, start = time.process_time(), time.perf_counter()
        with torch.inference_mode():
            for _ in range(args.requests_per_client):
                out = self.model.generate(
                    **self.batch,
                    max_new_tokens=args.new_tokens,
                    min_new_tokens=args.new_tokens,
                    do_sample=False,
                    pad_token_id=self.tokenizer.pad_token_id or 0,
                )
        wall = time.perf_counter() - start
        cores = (time.process_time() - cpu_before) / wall
        new = out[:, self.batch["input_ids"].shape[1] :]
        texts = self.tokenizer.batch_decode(new)
        tokens = new.numel() * args.requests_per_client
        return Run("HF static batch", tokens, wall, [], [], cores, texts)


# --- the report -----------------------------------------------------------------------------------------------

RATIOS = [  # (label, numerator, denominator): the targets
    ("plugmoe token / transformers serve", "plugmoe token", "transformers serve", 1.2),
    ("plugmoe off / transformers serve", "plugmoe off", "transformers serve", None),
    ("plugmoe token / plugmoe off", "plugmoe token", "plugmoe off", 0.9),
    ("plugmoe off / HF static batch (main thread)", "plugmoe off", "HF static batch", 0.9),
    ("plugmoe token / HF static batch (main thread)", "plugmoe token", "HF static batch", None),
    ("plugmoe off / plugmoe off (baseline checkout)", "plugmoe off", "plugmoe off (baseline)", None),
    ("plugmoe off, not streamed / plugmoe off", "plugmoe off, not streamed", "plugmoe off", None),
    ("plugmoe off (httptools) / plugmoe off, h11", "plugmoe off", "plugmoe off, h11", None),
]


def report(rounds: list[dict[str, Run]], args: argparse.Namespace) -> None:
    configs = list(rounds[0])
    print(f"\n{args.shape}, {args.clients} clients, {args.prompt_tokens}-token prompts, {args.new_tokens} new tokens,")
    print(f"{args.requests_per_client} requests per client per run, {args.threads} threads, {len(rounds)} rounds")
    print("| configuration | tok/s | cores | client cores | TTFT p50 / p99 ms | ITL p50 / p99 ms |")
    print("|---|---|---|---|---|---|")
    for config in configs:
        runs = [r[config] for r in rounds]
        ttfts = sorted(t for run in runs for t in run.ttfts)
        itls = sorted(t for run in runs for t in run.itls)
        latency = (
            f"{_pct(ttfts, 50) * 1e3:.0f} / {_pct(ttfts, 99) * 1e3:.0f} | {_pct(itls, 50) * 1e3:.1f} / "
            f"{_pct(itls, 99) * 1e3:.1f}"
            if ttfts
            else "- | -"
        )
        tok_s = statistics.median(run.tok_s for run in runs)
        cores = statistics.median(run.cores for run in runs)
        client = [run.client_cores for run in runs if run.client_cores is not None]
        client_cores = f"{statistics.median(client):.2f}" if client else "-"
        print(f"| {config} | {tok_s:.0f} | {cores:.2f} | {client_cores} | {latency} |")
    threaded = [config for config in configs if rounds[0][config].thread_cores is not None]
    if threaded:
        # the event loop's CPU per streamed token: what the HTTP layer costs the engine, which waits for the GIL
        print(f"\n| plugmoe server's cores by thread (median) | {' | '.join(THREAD_ROLES)} | event loop us/token |")
        print(f"|---|{'---|' * (len(THREAD_ROLES) + 1)}")
        for config in threaded:
            cells = [statistics.median(r[config].thread_cores[role] for r in rounds) for role in THREAD_ROLES]
            loop_us = statistics.median(r[config].thread_cores["event loop"] / r[config].tok_s * 1e6 for r in rounds)
            print(f"| {config} | {' | '.join(f'{c:.2f}' for c in cells)} | {loop_us:.0f} |")
    print("\n| ratio (per round, median) | value | rounds | target |")
    print("|---|---|---|---|")
    for label, top, bottom, target in RATIOS:
        if top not in configs or bottom not in configs:
            continue
        per_round = [r[top].tok_s / r[bottom].tok_s for r in rounds]
        shown = ", ".join(f"{x:.2f}" for x in per_round)
        print(f"| {label} | {statistics.median(per_round):.2f} | {shown} | {f'>= {target}' if target else ''} |")
    if "plugmoe off" in configs and "transformers serve" in configs:
        ours = statistics.median(statistics.median(r["plugmoe off"].ttfts) for r in rounds)
        theirs = statistics.median(statistics.median(r["transformers serve"].ttfts) for r in rounds)
        print(f"| TTFT p50 plugmoe off / transformers serve | {ours * 1e3:.0f} / {theirs * 1e3:.0f} ms | | <= 1 |")
    last = rounds[-1]
    if "plugmoe off" in configs:
        for other in ("HF static batch", "transformers serve"):
            if other in configs:
                pairs = list(zip(last["plugmoe off"].texts, last[other].texts, strict=True))
                print(f"greedy text, plugmoe off == {other}: {sum(a == b for a, b in pairs)}/{len(pairs)} prompts")
                for ours, theirs in pairs:
                    if ours != theirs:  # the first difference, to tell numerics from text handling
                        at = next(i for i, (x, y) in enumerate(zip(ours + "\0", theirs + "\0", strict=False)) if x != y)
                        print(f"  first difference at character {at}: {ours[at:][:40]!r} / {theirs[at:][:40]!r}")
                        break


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=["demo", "gpt2-124m"], default="demo")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--prompt-tokens", type=int, default=33)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--requests-per-client", type=int, default=2, help="requests each client sends per run")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2, help="torch threads of every configuration")
    parser.add_argument("--experts", type=int, default=8, help="gpt2-124m: experts that win every token")
    parser.add_argument("--cb-num-blocks", type=int, default=32, help="transformers serve's KV cache blocks")
    parser.add_argument(
        "--client",
        choices=["aiohttp", "httpx"],
        default="aiohttp",
        help="the clients' HTTP library (both stream the same requests; httpx: the client of earlier releases)",
    )
    parser.add_argument(
        "--non-streaming",
        action="store_true",
        help="plus plugmoe off answered as one JSON each: its tok/s against streamed is what streaming costs",
    )
    parser.add_argument(
        "--h11",
        action="store_true",
        help="plus plugmoe off from a second server run with --http-parser h11 (the pure-Python HTTP parser)",
    )
    parser.add_argument("--no-peer", action="store_true", help="skip transformers serve")
    parser.add_argument("--no-hf", action="store_true", help="skip HF static batch")
    parser.add_argument("--baseline", type=Path, help="another plugmoe checkout: its routing off as one more column")
    parser.add_argument(
        "--compile-decode",
        choices=["off", "inductor"],
        default="off",
        help="plugmoe servers' --compile-decode (inductor: two warm-up runs, the second for buckets the first missed)",
    )
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so `finally` stops the servers this bench started

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if args.shape == "demo":
            model_dir, seed = REPO / "demo" / "model", REPO / "demo" / "experts"
            prompts = demo_prompts(model_dir, args.clients, args.prompt_tokens)
        else:
            model_dir = shape_with_demo_vocabulary(tmp / "model", args.shape)
            seed = tmp / "seed"
            write_experts(model_dir, seed, args.experts, 0, 16, "float32")
            prompts = mixed_prompts(model_dir, args.clients, args.prompt_tokens)
        servers: dict[str, Server] = {}
        processes: list[subprocess.Popen] = []
        try:
            process, url, model = start_plugmoe(REPO, model_dir, seed, tmp, args, "this checkout")
            processes.append(process)
            exact = {"min_tokens": args.new_tokens}
            servers["plugmoe off"] = Server("plugmoe", process, url, model, {**exact, "routing": {"mode": "off"}})
            servers["plugmoe token"] = Server("plugmoe", process, url, model, {**exact, "routing": {"mode": "token"}})
            if args.non_streaming:
                whole = Server("plugmoe", process, url, model, {**exact, "routing": {"mode": "off"}}, stream=False)
                servers["plugmoe off, not streamed"] = whole
            if args.h11:
                process, url, model = start_plugmoe(REPO, model_dir, seed, tmp, args, "h11", "--http-parser", "h11")
                processes.append(process)
                extra = {**exact, "routing": {"mode": "off"}}
                servers["plugmoe off, h11"] = Server("plugmoe (h11)", process, url, model, extra)
            if args.baseline:
                process, url, model = start_plugmoe(args.baseline, model_dir, seed, tmp, args, "baseline")
                processes.append(process)
                extra = {**exact, "routing": {"mode": "off"}}
                servers["plugmoe off (baseline)"] = Server("plugmoe (baseline)", process, url, model, extra)
            peer = None if args.no_peer else start_peer(model_dir, tmp, args)
            if peer is not None:
                processes.append(peer.process)
                servers["transformers serve"] = peer
            static = None if args.no_hf else StaticBatch(model_dir, prompts, args.threads)
            configs = [*servers, *([] if static is None else ["HF static batch"])]

            def run(config: str) -> Run:
                if config == "HF static batch":
                    return static.run(args)
                return run_server(config, servers[config], prompts, args)

            warm_ups = 2 if args.compile_decode != "off" else 1  # compile: a row bucket the first run missed
            for _ in range(warm_ups):
                for config in configs:  # untimed, full length: every shape each one reaches is allocated first
                    run(config)
            rounds: list[dict[str, Run]] = []
            for index in range(args.rounds):
                order = configs[index % len(configs) :] + configs[: index % len(configs)]
                print(f"round {index + 1}: load average {os.getloadavg()[0]:.2f}", flush=True)
                results = {}
                for config in order:
                    results[config] = run(config)
                    row = results[config]
                    print(f"  {config}: {row.tok_s:.0f} tok/s, {row.cores:.2f} cores", flush=True)
                rounds.append({config: results[config] for config in configs})
            report(rounds, args)
        finally:
            for process in processes:
                process.terminate()
            for process in processes:
                try:
                    process.wait(30)
                except subprocess.TimeoutExpired:
                    process.kill()


if __name__ == "__main__":
    main()
