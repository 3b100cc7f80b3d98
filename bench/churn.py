"""Churn benchmark: does plugging experts under load stall decoding or fail requests?

16 streaming clients generate continuously against a live `python -m server` on the built-in demo model,
first for --duration seconds with the expert set left alone, then for --duration seconds while an admin
client plugs demo/compare/math-raw.safetensors (admission ON: the report runs on every plug) and unplugs it
again, one plug + unplug every --interval seconds. It reports failed requests and the inter-token latency
(ITL: the gap between two streamed tokens of one request, as the client sees it) of both phases, and the
ITL of the tokens that arrived while a plug was in flight.

    python bench/churn.py                                 # starts its own server (demo model, admission on)
    python bench/churn.py --duration 20 --clients 4       # a quick run
    python bench/churn.py --url http://127.0.0.1:8000     # an already running server (it must allow the
                                                          # source: the demo model's default --source-roots)

Timings on a shared CPU machine are noisy: compare the two phases of one run, not runs with each other.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
SOURCE = REPO / "demo" / "compare" / "math-raw.safetensors"
PROMPTS = [
    "Question: Tom has 5 apples and buys 3 more. How many apples does Tom have now?\nAnswer:",
    "def total(xs):\n",
    "The otter is",
    "Once upon a time, a curious fox",
    "Question: Mia has 4 pens and buys 2 more. How many?\nAnswer:",
    "def add(a, b):\n",
    "In the morning the weather was",
    "The river ran past the old mill and",
]


@dataclass
class Phase:
    gaps: list[tuple[float, float]] = field(default_factory=list)  # (arrival time, gap since previous token)
    requests: int = 0
    failed: list[str] = field(default_factory=list)
    plugs: list[tuple[float, float]] = field(default_factory=list)  # (start, end) of each plug request
    plug_failures: list[str] = field(default_factory=list)


async def client_loop(client: httpx.AsyncClient, index: int, deadline: float, new_tokens: int, phase: Phase) -> None:
    turn = 0
    while time.perf_counter() < deadline:
        prompt = PROMPTS[(index + turn) % len(PROMPTS)]
        turn += 1
        body = {"prompt": prompt, "max_new_tokens": new_tokens, "min_new_tokens": new_tokens, "stream": True}
        last_at: float | None = None
        final: dict = {}
        try:
            async with client.stream("POST", "/generate", json=body) as response:
                if response.status_code != 200:
                    phase.failed.append(f"HTTP {response.status_code}: {(await response.aread())[:200]!r}")
                    continue
                async for line in response.aiter_lines():
                    if not line.startswith("data: "):
                        continue
                    event = json.loads(line[6:])
                    now = time.perf_counter()
                    if "finish_reason" in event:
                        final = event
                        break
                    if last_at is not None:
                        phase.gaps.append((now, now - last_at))
                    last_at = now
        except httpx.HTTPError as e:
            phase.failed.append(f"{type(e).__name__}: {e}")
            continue
        phase.requests += 1
        if final.get("finish_reason") not in ("length", "stop"):
            phase.failed.append(f"finish_reason {final.get('finish_reason')!r}: {final.get('message')}")


async def churn_loop(client: httpx.AsyncClient, deadline: float, interval: float, phase: Phase) -> None:
    while time.perf_counter() < deadline:
        started = time.perf_counter()
        response = await client.post("/experts", json={"source": str(SOURCE), "name": "churn", "replace": True})
        phase.plugs.append((started, time.perf_counter()))
        if response.status_code != 201:
            phase.plug_failures.append(f"plug: HTTP {response.status_code} {response.text[:200]}")
        else:
            response = await client.delete("/experts/churn")
            if response.status_code != 200:
                phase.plug_failures.append(f"unplug: HTTP {response.status_code} {response.text[:200]}")
        await asyncio.sleep(max(0.0, interval - (time.perf_counter() - started)))


async def run_phase(url: str, clients: int, duration: float, new_tokens: int, interval: float | None) -> Phase:
    phase = Phase()
    deadline = time.perf_counter() + duration
    limits = httpx.Limits(max_connections=clients + 4)
    async with httpx.AsyncClient(base_url=url, timeout=300, limits=limits) as client:
        tasks = [client_loop(client, i, deadline, new_tokens, phase) for i in range(clients)]
        if interval is not None:
            tasks.append(churn_loop(client, deadline, interval, phase))
        await asyncio.gather(*tasks)
    return phase


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def during_plugs(phase: Phase) -> list[float]:
    """Gaps of tokens that arrived while a plug request was in flight (or within the gap after it began)."""
    return [gap for at, gap in phase.gaps if any(start <= at and at - gap <= end for start, end in phase.plugs)]


def start_server(port: int, experts_dir: Path, threads: int | None) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-m", "server", "--port", str(port), "--experts-dir", str(experts_dir)]
    command += ["--device", "cpu", "--log-level", "warning"]
    if threads:
        command += ["--num-threads", str(threads)]
    process = subprocess.Popen(command, cwd=REPO, env=env)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/ready", timeout=1).status_code == 200:
                return process
        except httpx.HTTPError:
            pass
        if process.poll() is not None:
            raise SystemExit(f"the server exited with {process.returncode}")
        time.sleep(0.3)
    process.terminate()
    raise SystemExit("the server did not get ready")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", help="an already running server (default: start one on the demo model)")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--duration", type=float, default=60.0, help="seconds per phase")
    parser.add_argument("--interval", type=float, default=3.0, help="seconds between plugs")
    parser.add_argument("--new-tokens", type=int, default=64, help="tokens per request")
    parser.add_argument("--num-threads", type=int, default=None, help="the started server's --num-threads")
    args = parser.parse_args()

    process = None
    with tempfile.TemporaryDirectory(prefix="plugmoe-churn-") as tmp:
        url = args.url
        if url is None:
            port = free_port()
            process = start_server(port, Path(tmp) / "experts", args.num_threads)
            url = f"http://127.0.0.1:{port}"
        try:
            asyncio.run(run_phase(url, args.clients, 5.0, args.new_tokens, None))  # warm up
            calm = asyncio.run(run_phase(url, args.clients, args.duration, args.new_tokens, None))
            churn = asyncio.run(run_phase(url, args.clients, args.duration, args.new_tokens, args.interval))
        finally:
            if process is not None:
                process.terminate()
                process.wait(30)

    calm_gaps, churn_gaps, plug_gaps = [g for _, g in calm.gaps], [g for _, g in churn.gaps], during_plugs(churn)
    plug_seconds = [end - start for start, end in churn.plugs]
    rows = [
        ("no churn", calm.requests, len(calm.failed), calm_gaps),
        (f"plug+unplug every {args.interval:g} s", churn.requests, len(churn.failed), churn_gaps),
        ("  tokens during a plug", None, None, plug_gaps),
    ]
    print(f"{args.clients} streaming clients, {args.new_tokens} tokens per request, {args.duration:g} s per phase\n")
    print("| phase | requests | failed | ITL p50 ms | ITL p99 ms | ITL max ms |")
    print("|---|---|---|---|---|---|")
    for name, requests, failed, gaps in rows:
        print(
            f"| {name} | {'' if requests is None else requests} | {'' if failed is None else failed} | "
            f"{1000 * percentile(gaps, 0.5):.1f} | {1000 * percentile(gaps, 0.99):.1f} | "
            f"{1000 * max(gaps, default=float('nan')):.1f} |"
        )
    print(
        f"\nplugs: {len(churn.plugs)}, failed plugs/unplugs: {len(churn.plug_failures)}, plug request "
        f"p50 {statistics.median(plug_seconds) if plug_seconds else float('nan'):.2f} s"
    )
    ratio = percentile(churn_gaps, 0.99) / percentile(calm_gaps, 0.99)
    print(
        f"ITL p99 with churn / without: {ratio:.2f}x; during plugs vs no-churn p50: "
        f"{percentile(plug_gaps, 0.99) / percentile(calm_gaps, 0.5):.2f}x"
    )
    for failure in (calm.failed + churn.failed + churn.plug_failures)[:10]:
        print("failure:", failure)


if __name__ == "__main__":
    main()
