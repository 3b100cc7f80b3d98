"""Built-in demo backbone for plugmoe: a tiny Llama trained from scratch on a synthetic corpus.

The folder ships everything needed to run plugmoe offline:

* ``model/``   – the frozen backbone (safetensors + byte-level BPE tokenizer), see ``model/TRAINING.md``.
* ``data/``    – the synthetic corpus (``general``, ``math``, ``code``) written by :mod:`demo.corpus`.
* ``experts/`` – demo experts trained on top of the backbone (filled by the experts tooling).

Rebuild with ``python -m demo.corpus --out demo/data --seed 0`` followed by
``python -m demo.train_backbone --data demo/data --out demo/model --seed 0``.
"""

from __future__ import annotations

from pathlib import Path

DEMO_DIR: Path = Path(__file__).resolve().parent
MODEL_DIR: Path = DEMO_DIR / "model"
EXPERTS_DIR: Path = DEMO_DIR / "experts"
DATA_DIR: Path = DEMO_DIR / "data"

__all__ = ["DATA_DIR", "DEMO_DIR", "EXPERTS_DIR", "MODEL_DIR"]
