"""What the HTTP parser costs a streamed token: the server's guarded protocol (server.connection_guard) under
--http-parser httptools and h11, with no model in the way.

Each parser serves a bare ASGI app (a server process of its own) that answers every POST with `--chunks` SSE chunks
the size of a /v1/completions token chunk, one ASGI send each, as plugmoe streams them; `--clients` aiohttp clients
(another process: this one) read them. The figure is the server process's CPU per chunk (schedstat, nanoseconds),
which on plugmoe's server is event-loop time the engine thread waits for (it needs the GIL the loop holds). The
parsers run in turn, the order rotated each round, and the median over rounds is printed.

    python bench/http_parser.py                    # 16 clients x 64 chunks, 8 rounds
    python bench/http_parser.py --rounds 20 --clients 32
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.server_process import free_port  # noqa: E402

PARSERS = ("httptools", "h11")
# a text_completion chunk as plugmoe writes one per token (server/api/routes/openai.py)
CHUNK = (
    "data: "
    + json.dumps(
        {
            "id": "cmpl-0123456789abcdef01234567",
            "object": "text_completion",
            "created": 1780000000,
            "model": "plugmoe-demo",
            "choices": [{"index": 0, "finish_reason": None, "logprobs": None, "text": " token"}],
        }
    )
    + "\n\n"
).encode()


def serve(parser: str, port: int, chunks: int) -> None:
    """The server process: the guarded protocol of `parser` in front of a bare streaming app."""
    import uvicorn

    from server.connection_guard import guarded_config
    from server.settings import Settings

    async def app(scope, receive, send) -> None:
        if scope["type"] != "http":
            return
        while (await receive()).get("more_body"):
            pass
        headers = [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        for _ in range(chunks):
            await send({"type": "http.response.body", "body": CHUNK, "more_body": True})
            await asyncio.sleep(0)  # as a streamed token: one send per wake-up of its request's task
        await send({"type": "http.response.body", "body": b"data: [DONE]\n\n"})

    settings = Settings(http_parser=parser)
    config = uvicorn.Config(
        app, host="127.0.0.1", port=port, log_level="warning", lifespan="off", **guarded_config(settings)
    )
    uvicorn.Server(config).run()


def process_cpu_ns(pid: int) -> int:
    """CPU time of every thread of the process, in nanoseconds."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            total += int((task / "schedstat").read_text().split()[0])
        except (FileNotFoundError, ProcessLookupError):
            continue
    return total


async def drive(port: int, clients: int, requests: int) -> int:
    """`clients` concurrent clients, each sending `requests` requests one after another -> chunks read."""
    import aiohttp

    connector = aiohttp.TCPConnector(limit=clients)
    async with aiohttp.ClientSession(f"http://127.0.0.1:{port}", connector=connector) as session:

        async def client() -> int:
            read = 0
            for _ in range(requests):
                async with session.post("/v1/completions", json={"prompt": "x"}) as response:
                    async for line in response.content:
                        read += line.startswith(b"data: {")
            return read

        return sum(await asyncio.gather(*[client() for _ in range(clients)]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--chunks", type=int, default=64, help="chunks per response (tokens)")
    parser.add_argument("--requests-per-client", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--serve", choices=PARSERS, help=argparse.SUPPRESS)  # the server process's mode
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(args.serve, args.port, args.chunks)
        return
    servers: dict[str, tuple[subprocess.Popen, int]] = {}
    try:
        for name in PARSERS:
            port = free_port()
            command = [sys.executable, __file__, "--serve", name, "--port", str(port), "--chunks", str(args.chunks)]
            servers[name] = (subprocess.Popen(command, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}), port)
        for name, (process, port) in servers.items():  # up, and warm
            deadline = time.monotonic() + 60
            while True:
                try:
                    asyncio.run(drive(port, 2, 1))
                    break
                except OSError:
                    if process.poll() is not None or time.monotonic() > deadline:
                        raise SystemExit(f"the {name} server did not start") from None
                    time.sleep(0.2)
        per_chunk: dict[str, list[float]] = {name: [] for name in PARSERS}
        for index in range(args.rounds):
            order = PARSERS[index % 2 :] + PARSERS[: index % 2]
            for name in order:
                process, port = servers[name]
                before, started = process_cpu_ns(process.pid), time.perf_counter()
                chunks = asyncio.run(drive(port, args.clients, args.requests_per_client))
                wall = time.perf_counter() - started
                expected = args.clients * args.requests_per_client * args.chunks
                if chunks != expected:
                    raise SystemExit(f"{name}: read {chunks} chunks, expected {expected}")
                per_chunk[name].append((process_cpu_ns(process.pid) - before) / 1e3 / chunks)
                print(
                    f"round {index + 1} {name:9s}: {per_chunk[name][-1]:5.1f} us of server CPU per chunk, "
                    f"{chunks / wall:6.0f} chunks/s",
                    flush=True,
                )
        print(
            f"\n{args.clients} clients x {args.requests_per_client} requests x {args.chunks} chunks, "
            f"{args.rounds} rounds"
        )
        print("| parser | server CPU per chunk, us (median) | per round |")
        print("|---|---|---|")
        for name in PARSERS:
            shown = ", ".join(f"{x:.1f}" for x in per_chunk[name])
            print(f"| {name} | {statistics.median(per_chunk[name]):.1f} | {shown} |")
        ratios = [a / b for a, b in zip(per_chunk["httptools"], per_chunk["h11"], strict=True)]
        print(f"httptools / h11 per chunk: median {statistics.median(ratios):.2f} over {len(ratios)} rounds")
    finally:
        for process, _ in servers.values():
            process.terminate()
        for process, _ in servers.values():
            process.wait(30)


if __name__ == "__main__":
    main()
