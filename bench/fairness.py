"""Fairness benchmark (issue 24): does one client's largest allowed load crowd out or slow down the others?

    python bench/fairness.py                                   # the demo model, CPU
    python bench/fairness.py --device cuda --rounds 7          # on a GPU

One server, three API keys (each key is a client: server.auth.client_identity), its default shares
(--max-sequences-per-request and --max-sequences-per-client: half the batch).

1. refusals: the heavy client keeps the largest request the limits allow in flight (--max-n choices, every
   stop string the caps allow) and keeps trying to add more (its own 429s are counted apart), while --others
   other clients each send short requests in a loop; printed: the other clients' refused requests (target 0).
2. tok/s: one light client's streamed request (exactly --light-tokens tokens) alone, then beside the heavy
   client's worst request (n at its cap, every stop string the caps allow: --max-stop-strings strings of
   --max-stop-chars characters whose prefixes keep showing up in the text, so the hold-back check works at every
   token), interleaved --rounds times; tok/s = tokens / wall time of the request (queueing included); printed:
   the medians and the ratio (target >= 0.8).

The machine may be shared and noisy: the two conditions are interleaved and medians are taken.
"""

from __future__ import annotations

import argparse
import asyncio
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

KEYS = {"light": "light-key", "heavy": "heavy-key", "other": "other-key"}


def start_server(args: argparse.Namespace, log: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PLUGMOE_API_KEYS": ",".join(KEYS.values())}
    command = [
        sys.executable,
        "-m",
        "server",
        "--model",
        str(args.model_dir),
        "--port",
        str(port),
        "--device",
        args.device,
        "--experts-dir",
        str(Path(tempfile.mkdtemp(prefix="plugmoe-fairness-")) / "experts"),
        "--admission",
        "off",
        "--max-batch-size",
        str(args.max_batch_size),
        "--max-new-tokens",
        str(max(args.light_tokens, args.heavy_tokens)),
        "--log-level",
        "warning",
        *(["--num-threads", str(args.threads)] if args.threads else []),
    ]
    return start_ready(command, env, port, log, 600)


def worst_stop_strings(caps: dict[str, int]) -> list[str]:
    """As many stop strings as allowed, each as long as allowed, that never match but whose prefixes (a space,
    'e', 't', ...) keep showing up, so text is held back and searched at every token."""
    chars = min(caps["chars"], caps["total"] // caps["strings"])
    letters = " etaoinshrdlucmfwypvbgk"
    return [(letters[i % len(letters)] + "\x00" + "q" * chars)[:chars] for i in range(caps["strings"])]


def heavy_body(args: argparse.Namespace, caps: dict[str, int]) -> dict:
    return {
        "prompt": "Once upon a time",
        "n": args.max_n,
        "max_tokens": args.heavy_tokens,
        "min_tokens": args.heavy_tokens,
        "temperature": 1.0,
        "stop": worst_stop_strings(caps) if args.heavy_stop == "worst" else [],
    }


async def light_request(client: httpx.AsyncClient, url: str, tokens: int, key: str) -> tuple[int, float]:
    """One streamed request of exactly `tokens` tokens -> (status, tokens per second of its wall time)."""
    body = {"prompt": "The quick brown fox", "max_tokens": tokens, "min_tokens": tokens, "stream": True}
    start = time.perf_counter()
    async with client.stream(
        "POST", f"{url}/v1/completions", json=body, headers={"Authorization": f"Bearer {key}"}
    ) as response:
        async for _ in response.aiter_lines():
            pass
    return response.status_code, tokens / (time.perf_counter() - start)


async def heavy_loop(client: httpx.AsyncClient, url: str, body: dict, stop: asyncio.Event, counts: dict) -> None:
    """Keep the heavy client's worst request in flight (and one more attempt, its own 429s) until `stop`."""
    headers = {"Authorization": f"Bearer {KEYS['heavy']}"}

    async def one() -> None:
        while not stop.is_set():
            response = await client.post(f"{url}/v1/completions", json=body, headers=headers, timeout=None)
            counts[response.status_code] = counts.get(response.status_code, 0) + 1
            if response.status_code == 429:
                await asyncio.sleep(0.2)

    await asyncio.gather(one(), one())


async def wait_for_heavy(client: httpx.AsyncClient, url: str) -> None:
    """Until the heavy request is running (the queue gauge shows its sequences)."""
    headers = {"Authorization": f"Bearer {KEYS['heavy']}"}
    for _ in range(200):
        metrics = (await client.get(f"{url}/metrics", headers=headers)).text
        running = [line for line in metrics.splitlines() if line.startswith("plugmoe_running_sequences ")]
        if running and float(running[0].split()[1]) > 0:
            return
        await asyncio.sleep(0.05)


async def main_async(args: argparse.Namespace, url: str) -> None:
    caps = {"strings": args.max_stop_strings, "chars": args.max_stop_chars, "total": args.max_stop_total_chars}
    body = heavy_body(args, caps)
    async with httpx.AsyncClient(timeout=600) as client:
        await light_request(client, url, args.light_tokens, KEYS["light"])  # warm-up
        solo: list[float] = []
        beside: list[float] = []
        others_refused = others_served = 0
        heavy_counts: dict[int, int] = {}
        for round_ in range(args.rounds):
            status, rate = await light_request(client, url, args.light_tokens, KEYS["light"])
            assert status == 200, status
            solo.append(rate)
            stop = asyncio.Event()
            heavy = asyncio.create_task(heavy_loop(client, url, body, stop, heavy_counts))
            await wait_for_heavy(client, url)
            results = await asyncio.gather(
                light_request(client, url, args.light_tokens, KEYS["light"]),
                *(light_request(client, url, 8, KEYS["other"]) for _ in range(args.others)),
            )
            status, rate = results[0]
            beside.append(rate)
            for status, _ in results:
                others_served += status == 200
                others_refused += status != 200
            stop.set()
            await heavy
            print(f"round {round_ + 1}: solo {solo[-1]:.1f} tok/s, beside the heavy one {rate:.1f} tok/s", flush=True)
    stops = body["stop"]
    print(f"heavy request: n={body['n']}, {len(stops)} stop strings of {len(stops[0]) if stops else 0} characters")
    print(f"heavy client's answers by status: {dict(sorted(heavy_counts.items()))}")
    total = others_refused + others_served
    print(f"other clients (light and others) refused: {others_refused} of {total} requests (target 0)")
    ratio = statistics.median(beside) / statistics.median(solo)
    print(
        f"light client tok/s: solo median {statistics.median(solo):.1f}, beside the heavy client median "
        f"{statistics.median(beside):.1f}: {ratio:.2f} of solo (target >= 0.80)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", type=Path, default=REPO / "demo" / "model")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--max-batch-size", type=int, default=16)
    parser.add_argument("--max-n", type=int, default=8, help="the server's --max-n (and the heavy request's n)")
    parser.add_argument("--max-stop-strings", type=int, default=16, help="the server's cap (default)")
    parser.add_argument("--max-stop-chars", type=int, default=256, help="the server's cap (default)")
    parser.add_argument("--max-stop-total-chars", type=int, default=1024, help="the server's cap (default)")
    parser.add_argument(
        "--heavy-stop", choices=("worst", "none"), default="worst", help="none: the n load alone (what batching costs)"
    )
    parser.add_argument("--light-tokens", type=int, default=32)
    parser.add_argument("--heavy-tokens", type=int, default=256)
    parser.add_argument("--others", type=int, default=4, help="other clients' short requests per round")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    log = Path(tempfile.mkdtemp(prefix="plugmoe-fairness-")) / "server.log"
    process, url = start_server(args, log)
    try:
        asyncio.run(main_async(args, url))
    finally:
        process.terminate()
        process.wait(30)


if __name__ == "__main__":
    main()
