"""GuideLLM, unchanged, against the demo server: every request succeeds and its token counts are plugmoe's.

    python -m venv /tmp/gl && /tmp/gl/bin/pip install guidellm==0.8.1      # GuideLLM's own environment
    python bench/guidellm.py --guidellm /tmp/gl/bin/guidellm               # from the repo root

Starts `python -m server` (the demo model, a fresh experts folder in a temporary directory) on a free
loopback port, then runs GuideLLM's `openai_http` backend on /v1/completions and /v1/chat/completions with
its defaults (streaming, `stream_options.continuous_usage_stats`, `ignore_eos` for fixed output tokens):
concurrency 1 and 8, --requests per concurrency level, synthetic prompts of --prompt-tokens, exactly
--output-tokens each. Checks, per endpoint, and exits 1 when one fails:
    - GuideLLM: no request errored or left incomplete; every completed request has --output-tokens output
      tokens (GuideLLM reads them from plugmoe's streamed `usage`);
    - plugmoe (its /metrics, before and after): every request it answered was a 200, and it generated
      --output-tokens per request (time-to-first-token count + inter-token count), so GuideLLM's counts are
      plugmoe's.
Prints a table of throughput and latency per endpoint and concurrency.

A bench, not a CI test: GuideLLM installs in seconds over plugmoe's [dev] environment, but it brings its
own web stack (sanic, faker, culsans; it upgrades click), and this run takes about 1.5 min per endpoint on
a 2-core machine. CI replays the request bodies GuideLLM sends instead
(tests/server/test_openai_params.py::test_what_clients_send_by_default_is_honoured).
"""

from __future__ import annotations

import argparse
import json
import re
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ENDPOINTS = ("/v1/completions", "/v1/chat/completions")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as response:
        return response.read().decode()


def _server_counts(base: str, endpoint: str) -> dict[str, float]:
    """plugmoe's own counters: answers to `endpoint` by status, and tokens generated."""
    counts: dict[str, float] = {"generated": 0.0}
    for line in _get(f"{base}/metrics").splitlines():
        match = re.match(r'plugmoe_requests_total\{endpoint="([^"]+)",status="(\d+)"\} (\S+)', line)
        if match and match.group(1) == endpoint:
            counts[f"status_{match.group(2)}"] = float(match.group(3))
        elif re.match(r"plugmoe_(time_to_first_token|inter_token_latency)_seconds_count ", line):
            counts["generated"] += float(line.split()[-1])
    return counts


def _run_guidellm(args: argparse.Namespace, base: str, endpoint: str, out: Path) -> None:
    command = [
        args.guidellm,
        "run",
        "--backend",
        f"kind=openai_http,target={base},model=plugmoe-demo,request_format={endpoint}",
        "--profile",
        json.dumps({"kind": "concurrent", "streams": args.streams}),
        "--constraint",
        f"kind=max_requests,count={args.requests}",
        "--tokenizer",
        f"kind=huggingface_auto,model={REPO / 'demo' / 'model'}",
        "--data",
        f"kind=synthetic_text,prompt_tokens={args.prompt_tokens},output_tokens={args.output_tokens}",
        "--disable-progress",
        "--output",
        f"kind=json,path={out}",
    ]
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _check(args: argparse.Namespace, endpoint: str, report: dict, before: dict, after: dict) -> list[str]:
    """The failures (empty: every check holds) and the table's rows, printed."""
    failures = []
    answered = sum(v - before.get(k, 0.0) for k, v in after.items() if k.startswith("status_"))
    refused = answered - (after.get("status_200", 0.0) - before.get("status_200", 0.0))
    generated = after["generated"] - before["generated"]
    if refused:
        failures.append(f"{endpoint}: plugmoe answered {refused:.0f} of {answered:.0f} requests with a non-200")
    if generated != answered * args.output_tokens:
        failures.append(f"{endpoint}: plugmoe generated {generated:.0f} tokens for {answered:.0f} requests")
    for benchmark in report["benchmarks"]:
        streams = benchmark["config"]["strategy"]["streams"]
        requests = benchmark["requests"]
        done, errored, incomplete = (len(requests[k]) for k in ("successful", "errored", "incomplete"))
        counts = sorted({r["output_tokens"] for r in requests["successful"]})
        if errored or incomplete or not done:
            failures.append(f"{endpoint} @{streams}: {done} succeeded, {errored} errored, {incomplete} incomplete")
        if counts != [args.output_tokens]:
            failures.append(f"{endpoint} @{streams}: output token counts {counts}, not [{args.output_tokens}]")
        metrics, duration = benchmark["metrics"], benchmark["duration"]
        tokens = sum(r["output_tokens"] for r in requests["successful"])
        print(
            f"| {endpoint} | {streams} | {done}/{benchmark['scheduler_state']['created_requests']} | {errored} "
            f"| {tokens / duration:.0f} | {done / duration:.2f} "
            f"| {metrics['time_to_first_token_ms']['successful']['median']:.0f} "
            f"| {metrics['inter_token_latency_ms']['successful']['median']:.1f} |"
        )
    print(
        f"|   plugmoe: {answered:.0f} answered, {refused:.0f} non-200, {generated:.0f} tokens generated | | | | | | | |"
    )
    return failures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--guidellm", default="guidellm", help="the guidellm executable (its own environment)")
    parser.add_argument("--requests", type=int, default=32, help="requests per concurrency level")
    parser.add_argument("--streams", type=int, nargs="+", default=[1, 8], help="concurrency levels")
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--output-tokens", type=int, default=64)
    args = parser.parse_args()

    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryDirectory(prefix="plugmoe-guidellm-") as tmp:
        server = subprocess.Popen(
            [sys.executable, "-m", "server", "--port", str(port), "--experts-dir", f"{tmp}/experts"],
            cwd=REPO,
            stdout=subprocess.DEVNULL,
            stderr=open(f"{tmp}/server.log", "w"),  # noqa: SIM115  (closed with the directory)
        )
        try:
            deadline = time.monotonic() + 180
            while True:
                try:
                    _get(f"{base}/health")
                    break
                except OSError:
                    if server.poll() is not None or time.monotonic() > deadline:
                        print(Path(f"{tmp}/server.log").read_text()[-3000:], file=sys.stderr)
                        return 1
                    time.sleep(1)
            print("| endpoint | concurrency | succeeded/sent | errored | output tok/s | req/s | TTFT ms | ITL ms |")
            print("|---|---|---|---|---|---|---|---|")  # TTFT and ITL: medians
            failures: list[str] = []
            for endpoint in ENDPOINTS:
                out = Path(tmp) / f"{endpoint.strip('/').replace('/', '_')}.json"
                before = _server_counts(base, endpoint)
                started = time.perf_counter()
                _run_guidellm(args, base, endpoint, out)
                after = _server_counts(base, endpoint)
                failures += _check(args, endpoint, json.loads(out.read_text()), before, after)
                print(f"|   GuideLLM took {time.perf_counter() - started:.0f} s | | | | | | | |")
        finally:
            server.terminate()
            server.wait(timeout=30)
    for failure in failures:
        print("FAILED:", failure, file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
