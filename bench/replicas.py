"""Scale-out benchmark: tokens/s of one server vs 1 and 2 Ray Serve replicas of the demo model, and how long
a plug takes to reach every replica (p50/p99 over --plugs plugs). Prints a markdown table and JSON.

    python bench/replicas.py                      # needs the cluster extra: pip install -e ".[cluster]"
    python bench/replicas.py --seconds 5 --rounds 1 --plugs 3   # a quick run

Load: --clients closed-loop clients, each sending non-streaming /generate requests of exactly --new-tokens
tokens (greedy, min = max), for --seconds; tokens/s = generated tokens / wall time. All three configurations
stay up at once and their load windows alternate (--rounds each), so background load hits each alike.
The CPU budget is the same in every row: one process with torch on every core, one replica reserving every
core, or one replica per core (each with one torch thread). On a machine with as many cores as replicas,
two replicas add no compute: what they show is the cost of Ray Serve's proxy and how the load splits.

Convergence: with 2 replicas following the store every --poll-s seconds, each plug goes through the proxy
(admission off: the benchmark plugs copies of one expert) at a random moment of the poll cycle, then is
unplugged the same way; a watcher reads the store and every replica's
/ready (on its own port) every 10 ms. Convergence = from the moment the new manifest is in the store to the
moment the last replica reports serving it; `answer` = the plug request's latency (it returns once every
replica serves the version).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

PROMPTS = [
    "Question: Tom has 5 apples and buys 3 more. How many apples does Tom have now?\nAnswer:",
    "The otter is",
    "def total_prices(prices):\n",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def load(base: str, seconds: float, clients: int, new_tokens: int) -> dict:
    """Closed-loop clients for `seconds`; tokens/s over the whole window, and which replica answered."""
    tokens, requests, errors = [0], [0], [0]
    replicas: dict[str, int] = {}
    lock = threading.Lock()
    deadline = time.monotonic() + seconds

    def client(i: int) -> None:
        with httpx.Client(base_url=base, timeout=300) as http:
            n = 0
            while time.monotonic() < deadline:
                n += 1
                body = {"prompt": PROMPTS[(i + n) % 3], "max_new_tokens": new_tokens, "min_new_tokens": new_tokens}
                response = http.post("/generate", json=body)
                with lock:
                    if response.status_code == 200:
                        tokens[0] += response.json()["usage"]["completion_tokens"]
                        requests[0] += 1
                        replica = response.headers.get("x-plugmoe-replica", "-")
                        replicas[replica] = replicas.get(replica, 0) + 1
                    else:
                        errors[0] += 1

    started = time.monotonic()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.monotonic() - started
    return {
        "tok_s": round(tokens[0] / elapsed, 1),
        "requests": requests[0],
        "errors": errors[0],
        "seconds": round(elapsed, 1),
        "split": sorted(replicas.values(), reverse=True),
    }


def seed_store(root: Path) -> None:
    from server.expert_store import ExpertStore, Manifest, ManifestEntry
    from server.settings import DEMO_EXPERTS_DIR

    store = ExpertStore(root).open()
    entries = []
    for name in ("math", "code"):
        stored = store.put_blob((DEMO_EXPERTS_DIR / f"{name}.safetensors").read_bytes())
        entries.append(ManifestEntry(name, stored.sha256, stored.size))
    store.commit(Manifest(0), tuple(entries))


def start_single_process(store: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {**os.environ, "PLUGMOE_MAX_FALSE_POSITIVE_RATE": "-1", "PLUGMOE_MAX_STEAL_RATE": "-1"}
    command = [sys.executable, "-m", "server", "--port", str(port), "--device", "cpu", "--experts-dir", str(store)]
    command += ["--num-threads", str(os.cpu_count()), "--log-level", "warning"]
    process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            if httpx.get(f"{base}/ready", timeout=2).status_code == 200:
                return process, base
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline or process.poll() is not None:
            process.terminate()
            raise RuntimeError("the single-process server did not start")
        time.sleep(0.2)


def convergence(base: str, store_root: Path, app_name: str, plugs: int, poll_s: float) -> dict:
    """`plugs` plugs (and unplugs) through the proxy, each timed from the store's new manifest to the last
    replica serving it."""
    from server.cluster import replica_states
    from server.expert_store import ExpertStore
    from server.settings import DEMO_EXPERTS_DIR

    store = ExpertStore(store_root)
    urls = [r["url"] for r in asyncio.run(replica_states(app_name))]
    data = (DEMO_EXPERTS_DIR / "code.safetensors").read_bytes()
    results: dict[str, list[float]] = {"plug": [], "unplug": [], "plug_answer": [], "unplug_answer": []}

    def watch(version: int, out: dict) -> None:
        """When the manifest `version` appears in the store and when each replica first serves it."""
        seen: dict[str, float] = {}
        deadline = time.monotonic() + 60
        with httpx.Client(timeout=5) as http:
            while time.monotonic() < deadline and len(seen) < len(urls):
                if "store" not in out and store.read_manifest(version) is not None:
                    out["store"] = time.monotonic()
                for url in urls:
                    if url not in seen and http.get(f"{url}/ready").json().get("version", 0) >= version:
                        seen[url] = time.monotonic()
                time.sleep(0.01)
        out["replicas"] = seen

    def timed(method: str, kind: str, **kwargs) -> None:
        version = store.current().version + 1
        out: dict = {}
        watcher = threading.Thread(target=watch, args=(version, out))
        watcher.start()
        started = time.monotonic()
        response = httpx.request(method, timeout=120, **kwargs)
        answered = time.monotonic() - started
        watcher.join()
        if response.status_code not in (200, 201) or len(out.get("replicas", {})) < len(urls):
            raise RuntimeError(f"{kind} {version}: {response.status_code} {response.text[:300]} {out}")
        results[kind].append(max(out["replicas"].values()) - out["store"])
        results[f"{kind}_answer"].append(answered)

    spread = random.Random(0)
    for i in range(plugs):
        name = f"bench{i}"
        # plugs at random moments of the replicas' poll cycle: back-to-back plugs would all land just
        # after the poll that ended the previous one and measure one phase only
        time.sleep(spread.uniform(0, poll_s))
        files = {"file": ("code.safetensors", data)}
        timed("POST", "plug", url=f"{base}/experts", files=files, data={"name": name})
        time.sleep(spread.uniform(0, poll_s))
        timed("DELETE", "unplug", url=f"{base}/experts/{name}")
    return {kind: percentiles(values) for kind, values in results.items()}


def percentiles(values: list[float]) -> dict:
    ordered = sorted(values)
    return {
        "n": len(ordered),
        "p50": round(statistics.median(ordered), 3),
        "p99": round(ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))], 3),
        "max": round(ordered[-1], 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=20.0, help="one load window")
    parser.add_argument("--rounds", type=int, default=3, help="load windows per configuration, alternating")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--plugs", type=int, default=20)
    parser.add_argument("--poll-s", type=float, default=1.0)
    args = parser.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    cores = os.cpu_count() or 1
    work = Path(tempfile.mkdtemp(prefix="plugmoe-bench-replicas-"))
    for name in ("single", "one", "two"):
        seed_store(work / name)
    process, single = start_single_process(work / "single")
    try:
        import ray
        from ray import serve

        from server.cluster import build_application
        from server.settings import ClusterSettings, Settings

        # every configuration stays up (idle ones cost no CPU) and the load windows alternate between them,
        # so background load on the machine hits each alike; the CPUs are logical: twice the cores
        ray.init(num_cpus=2 * cores, include_dashboard=False, log_to_driver=False)
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        proxy = f"http://127.0.0.1:{port}"
        bases = {f"1 process (uvicorn), {cores} torch threads": single}
        deploy_s: dict[str, float] = {}
        for replicas, name in ((1, "one"), (2, "two")):
            settings = Settings(
                device="cpu",
                expert_store=str(work / name),
                poll_interval_s=args.poll_s,
                max_false_positive_rate=-1,
                max_steal_rate=-1,
                log_level="warning",
            )
            cpus = cores / replicas
            cluster = ClusterSettings(num_replicas=replicas, num_cpus=cpus, app_name=name, plug_wait_s=30)
            started = time.monotonic()
            serve.run(build_application(settings, cluster), name=name, route_prefix=f"/{name}")
            label = f"Ray Serve, {replicas} replica(s) x {cpus:g} CPU, {max(1, int(cpus))} torch thread(s) each"
            bases[label] = f"{proxy}/{name}"
            deploy_s[label] = round(time.monotonic() - started, 1)
        for base in bases.values():
            load(base, 3, args.clients, args.new_tokens)  # warm-up
        windows: dict[str, list[dict]] = {label: [] for label in bases}
        for round_ in range(args.rounds):
            for label, base in bases.items():
                windows[label].append(load(base, args.seconds, args.clients, args.new_tokens))
                print(f"round {round_ + 1}: {label}: {windows[label][-1]}", flush=True)
        converged = convergence(f"{proxy}/two", work / "two", "two", args.plugs, args.poll_s)
        serve.shutdown()
        ray.shutdown()
    finally:
        process.terminate()
        process.wait(30)
        shutil.rmtree(work, ignore_errors=True)
    rows = {
        label: {
            "tok_s": round(statistics.median(w["tok_s"] for w in runs), 1),
            "windows": [w["tok_s"] for w in runs],
            "requests": sum(w["requests"] for w in runs),
            "errors": sum(w["errors"] for w in runs),
            "split": [sum(x) for x in zip(*(w["split"] for w in runs), strict=False)],
            "deploy_s": deploy_s.get(label, ""),
        }
        for label, runs in windows.items()
    }

    print(f"\n{cores} CPU cores; {args.clients} clients, {args.new_tokens} new tokens a request")
    print(f"{args.rounds} alternating windows of {args.seconds:g} s each; tokens/s: median (each window)\n")
    print("| configuration | tokens/s | requests | errors | requests per replica | deploy s |")
    print("|---|---|---|---|---|---|")
    for name, row in rows.items():
        split = "/".join(str(n) for n in row["split"])
        tok_s = f"{row['tok_s']} ({', '.join(str(w) for w in row['windows'])})"
        cells = [name, tok_s, row["requests"], row["errors"], split, row["deploy_s"]]
        print("| " + " | ".join(str(c) for c in cells) + " |")
    print(f"\nplug convergence, 2 replicas, poll {args.poll_s:g} s (seconds):\n")
    print("| | n | p50 | p99 | max |")
    print("|---|---|---|---|---|")
    labels = {
        "plug": "plug: store -> every replica",
        "unplug": "unplug: store -> every replica",
        "plug_answer": "plug request (201 = every replica)",
        "unplug_answer": "unplug request",
    }
    for kind, label in labels.items():
        c = converged[kind]
        print(f"| {label} | {c['n']} | {c['p50']} | {c['p99']} | {c['max']} |")
    print("\n" + json.dumps({"load": rows, "convergence": converged}))


if __name__ == "__main__":
    main()
