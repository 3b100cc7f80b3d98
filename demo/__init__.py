"""Built-in demo backbone for plugmoe: a tiny Llama trained from scratch on a synthetic corpus.

The folder ships everything needed to run plugmoe offline:

* ``model/``   – the frozen backbone (safetensors + byte-level BPE tokenizer), see ``model/TRAINING.md``.
* ``data/``    – the synthetic corpus (``general``, ``math``, ``code``) written by :mod:`demo.corpus`.
* ``experts/`` – demo experts trained on top of the backbone (filled by the experts tooling).

Rebuild with ``python -m demo.corpus --out demo/data --seed 0`` followed by
``python -m demo.train_backbone --data demo/data --out demo/model --seed 0``.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path

DEMO_DIR: Path = Path(__file__).resolve().parent
MODEL_DIR: Path = DEMO_DIR / "model"
EXPERTS_DIR: Path = DEMO_DIR / "experts"
DATA_DIR: Path = DEMO_DIR / "data"

Splits = tuple[list[dict], list[dict]]  # (train, heldout) records of one synthetic domain


def write_splits(out_dir: Path, domain: str, splits: Splits) -> dict[str, Path]:
    """A domain's splits as `<domain>_train.jsonl` and `<domain>_heldout.jsonl` under out_dir."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written = {}
    for name, records in zip(("train", "heldout"), splits, strict=True):
        path = out_dir / f"{domain}_{name}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
        written[name] = path
    return written


def domain_main(domain: str, doc: str, build: Callable[[int, int, int], Splits], argv: list[str] | None) -> None:
    """The command line of a synthetic domain's generator (`python -m demo.<domain> --out DIR --seed 0`)."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help=f"directory for {domain}_{{train,heldout}}.jsonl")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train", type=int, default=3000)
    parser.add_argument("--heldout", type=int, default=300)
    args = parser.parse_args(argv)
    for path in write_splits(args.out, domain, build(args.seed, args.train, args.heldout)).values():
        print(path)


__all__ = ["DATA_DIR", "DEMO_DIR", "EXPERTS_DIR", "MODEL_DIR", "domain_main", "write_splits"]
