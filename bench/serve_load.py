"""Load benchmark: 1, 4 and 16 concurrent streaming clients against a running plugmoe server, and HF
`generate` on the same prompts as one static batch. Prints a markdown table.

    python bench/serve_load.py                       # GPT-2-124M shape (random weights), starts its own server
    python bench/serve_load.py --hidden 64 --layers 2 --heads 4 --vocab 384 --new-tokens 16   # a quick run
    python bench/serve_load.py --url http://127.0.0.1:8000 --model-dir DIR   # an already running server

Every request generates exactly --new-tokens tokens (min_new_tokens = max_new_tokens, greedy), so the
numbers compare equal work. tokens/s = generated tokens / wall time of the whole level.
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
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def build_model(directory: Path, family: str, hidden: int, layers: int, heads: int, vocab: int) -> Path:
    """A random model of the given shape with the tiny test tokenizer (ids past its vocabulary decode to '')."""
    from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig

    from tests.tiny import tiny_tokenizer

    tokenizer = tiny_tokenizer()
    common = {"vocab_size": max(vocab, len(tokenizer)), "bos_token_id": 0, "eos_token_id": 0, "pad_token_id": 0}
    if family == "gpt2":
        config = GPT2Config(n_embd=hidden, n_layer=layers, n_head=heads, n_positions=1024, **common)
    else:
        config = LlamaConfig(
            hidden_size=hidden,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=heads,
            intermediate_size=int(hidden * 8 / 3),
            max_position_embeddings=1024,
            **common,
        )
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def make_prompts(model_dir: Path, count: int, tokens: int) -> list[str]:
    from transformers import AutoTokenizer

    from tests.tiny import _TEXT

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    text = " ".join(_TEXT * 20)
    ids = tokenizer.encode(text)
    prompts = []
    for i in range(count):
        start = (i * 7) % (len(ids) - tokens)
        prompts.append(tokenizer.decode(ids[start : start + tokens]))
    return prompts


async def one_request(client: httpx.AsyncClient, prompt: str, new_tokens: int) -> dict:
    body = {"prompt": prompt, "max_new_tokens": new_tokens, "min_new_tokens": new_tokens, "stream": True}
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
    return {
        "tokens": last["usage"]["completion_tokens"],
        "ttft": arrivals[0] - start if arrivals else float("nan"),
        "itl": [b - a for a, b in zip(arrivals, arrivals[1:], strict=False)],
    }


async def load_level(url: str, prompts: list[str], clients: int, requests_per_client: int, new_tokens: int) -> dict:
    async def client_loop(client: httpx.AsyncClient, index: int) -> list[dict]:
        results = []
        for r in range(requests_per_client):
            results.append(await one_request(client, prompts[(index + r * clients) % len(prompts)], new_tokens))
        return results

    limits = httpx.Limits(max_connections=clients + 4)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
        await one_request(client, prompts[0], 2)  # warm up
        start = time.perf_counter()
        per_client = await asyncio.gather(*[client_loop(client, i) for i in range(clients)])
        wall = time.perf_counter() - start
    results = [r for rs in per_client for r in rs]
    ttfts = sorted(r["ttft"] for r in results)
    itls = sorted(x for r in results for x in r["itl"])
    return {
        "clients": clients,
        "requests": len(results),
        "tokens": sum(r["tokens"] for r in results),
        "wall": wall,
        "tok_s": sum(r["tokens"] for r in results) / wall,
        "ttft_p50": _pct(ttfts, 50),
        "ttft_p99": _pct(ttfts, 99),
        "itl_p50": _pct(itls, 50),
        "itl_p99": _pct(itls, 99),
    }


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[min(98, max(0, int(q) - 1))]


def hf_static_batch(model_dir: Path, prompts: list[str], new_tokens: int, repeats: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    batch = tokenizer(prompts, return_tensors="pt", padding=True)
    best = float("inf")
    with torch.inference_mode():
        model.generate(**batch, max_new_tokens=2, do_sample=False, pad_token_id=0)
        for _ in range(repeats):
            start = time.perf_counter()
            model.generate(
                **batch, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0
            )
            best = min(best, time.perf_counter() - start)
    tokens = new_tokens * len(prompts)
    return {"tokens": tokens, "wall": best, "tok_s": tokens / best}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model_dir: Path, max_batch: int, new_tokens: int, threads: int | None) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PLUGMOE_MAX_FALSE_POSITIVE_RATE": "-1", "PLUGMOE_MAX_STEAL_RATE": "-1"}
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "server",
            "--model",
            str(model_dir),
            "--port",
            str(port),
            "--device",
            "cpu",
            "--experts-dir",
            str(model_dir / "experts"),
            "--max-batch-size",
            str(max_batch),
            "--max-new-tokens",
            str(new_tokens),
            "--log-level",
            "warning",
            *(["--num-threads", str(threads)] if threads else []),
        ],
        cwd=REPO,
        env=env,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}")
        try:
            if httpx.get(f"{url}/ready", timeout=2).status_code == 200:
                return process, url
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    process.terminate()
    raise RuntimeError("server did not get ready")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", help="a running server (default: start one on a fresh random model)")
    parser.add_argument("--model-dir", type=Path, help="the model the server runs (for the HF baseline)")
    parser.add_argument("--family", choices=["gpt2", "llama"], default="gpt2")
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--vocab", type=int, default=50257)
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--clients", default="1,4,16")
    parser.add_argument("--requests-per-client", type=int, default=2)
    parser.add_argument("--max-batch-size", type=int, default=16)
    parser.add_argument("--hf-repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, help="torch threads for the server and the HF baseline")
    args = parser.parse_args()

    levels = [int(c) for c in args.clients.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = args.model_dir
        if model_dir is None:
            model_dir = build_model(Path(tmp) / "model", args.family, args.hidden, args.layers, args.heads, args.vocab)
        prompts = make_prompts(model_dir, max(levels), args.prompt_tokens)
        process = None
        url = args.url
        if url is None:
            process, url = start_server(model_dir, args.max_batch_size, args.new_tokens, args.threads)
        try:
            rows = [asyncio.run(load_level(url, prompts, c, args.requests_per_client, args.new_tokens)) for c in levels]
        finally:
            if process is not None:
                process.terminate()
                process.wait(30)
        if args.threads:
            import torch

            torch.set_num_threads(args.threads)
        static = hf_static_batch(model_dir, prompts[: max(levels)], args.new_tokens, args.hf_repeats)

    one = rows[0]["tok_s"]
    print(f"\nload average at the end: {os.getloadavg()}; torch threads: {args.threads or 'default'}")
    print(
        f"model: {args.family} hidden {args.hidden}, {args.layers} layers, vocab {args.vocab}; "
        f"{args.prompt_tokens}-token prompts, {args.new_tokens} new tokens, greedy; "
        f"{args.requests_per_client} requests per client\n"
    )
    print("| setup | requests | tokens/s | x 1 client | x static batch | TTFT p50 / p99 (s) | ITL p50 / p99 (ms) |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        print(
            f"| plugmoe, {row['clients']} streaming clients | {row['requests']} | {row['tok_s']:.1f} | "
            f"{row['tok_s'] / one:.2f} | {row['tok_s'] / static['tok_s']:.2f} | "
            f"{row['ttft_p50']:.3f} / {row['ttft_p99']:.3f} | "
            f"{row['itl_p50'] * 1e3:.1f} / {row['itl_p99'] * 1e3:.1f} |"
        )
    print(
        f"| HF generate, static batch of {max(levels)} | {max(levels)} | {static['tok_s']:.1f} | "
        f"{static['tok_s'] / one:.2f} | 1.00 | - | - |"
    )


if __name__ == "__main__":
    main()
