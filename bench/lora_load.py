"""Load latency of a PEFT LoRA through vLLM's runtime API: POST /v1/load_lora_adapter until usable by name.

A rank-16 PEFT LoRA on every attention and MLP projection of the demo model (q/k/v/o and gate/up/down: PEFT's
all-linear adapter, as most published adapters are; random init, nonzero lora_B: no training; latency does not
depend on the values) is saved in a temporary directory, which the server is allowed to read (--source-roots).
The app runs in-process (TestClient: no sockets, the same routes, store and swap), with admission as the server
defaults (a gateless adapter skips its report). Each round:

    load      POST /v1/load_lora_adapter -> 200 (read through the allow-list, converted, validated, probed,
              stored, swapped in; pin-only: no gate)
    first     the first /v1/completions with model=<adapter>, 1 token (usable by name)
    unload    POST /v1/unload_lora_adapter

    python bench/lora_load.py                 # 5 rounds, rank 16
    python bench/lora_load.py --rounds 10 --rank 64

Prints the median and the worst of each phase, and load + first (the figure the issue's target, < 1 s on
CPU, is about).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def make_adapter(model_dir: Path, directory: Path, rank: int) -> tuple[Path, list[str]]:
    """The PEFT adapter directory and its target modules (every projection a LoRA expert may adapt on the demo
    model's family: the MLP's, then the attention's, by their paths from the decoder layer)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from moe.model.backbone import FAMILIES

    base = AutoModelForCausalLM.from_pretrained(model_dir)
    targets = list(FAMILIES[base.config.model_type].targets)
    torch.manual_seed(0)
    config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=targets, init_lora_weights=False)
    get_peft_model(base, config).save_pretrained(directory)
    return directory, targets


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    args = parser.parse_args()

    import torch
    from fastapi.testclient import TestClient

    from server.main import create_app
    from server.settings import DEMO_MODEL_DIR, Settings

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        adapter, targets = make_adapter(DEMO_MODEL_DIR, Path(tmp) / "roots" / "bench-lora", args.rank)
        size = sum(f.stat().st_size for f in adapter.iterdir())
        settings = Settings(
            model=str(DEMO_MODEL_DIR),
            experts_dir=Path(tmp) / "store",
            seed_experts=Path(tmp) / "no-seed",
            source_roots=str(Path(tmp) / "roots"),
            device="cpu",
            poll_interval_s=0,
        )
        timings: dict[str, list[float]] = {"load": [], "first": [], "load + first": [], "unload": []}
        with TestClient(create_app(settings), client=("127.0.0.1", 50000)) as client:
            body = {"model": "bench-lora", "prompt": "The otter", "max_tokens": 1, "temperature": 0}
            load = {"lora_name": "bench-lora", "lora_path": str(adapter)}
            served = None
            for _ in range(args.rounds):
                start = time.perf_counter()
                loaded = client.post("/v1/load_lora_adapter", json=load)
                after_load = time.perf_counter()
                used = client.post("/v1/completions", json=body)
                after_first = time.perf_counter()
                assert loaded.status_code == 200 and used.status_code == 200, (loaded.text, used.text)
                served = served or client.get("/experts/bench-lora").json()
                unloaded = client.post("/v1/unload_lora_adapter", json={"lora_name": "bench-lora"})
                assert unloaded.status_code == 200, unloaded.text
                timings["load"].append(after_load - start)
                timings["first"].append(after_first - after_load)
                timings["load + first"].append(after_first - start)
                timings["unload"].append(time.perf_counter() - after_first)
    print(
        f"rank-{args.rank} PEFT LoRA on the demo model's attention and MLP ({', '.join(targets)}); "
        f"{args.rounds} rounds, {args.threads} threads, CPU"
    )
    print(f"adapter directory: {size} bytes")
    assert served is not None
    kind, rank, routes, size_bytes = (served[k] for k in ("kind", "rank", "routes", "size_bytes"))
    print(f"served as: kind {kind}, rank {rank}, routes {routes} (pin-only when false), {size_bytes} bytes")
    for phase, values in timings.items():
        print(f"{phase:>13}: median {statistics.median(values) * 1000:7.1f} ms   worst {max(values) * 1000:7.1f} ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
