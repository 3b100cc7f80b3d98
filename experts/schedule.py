"""The learning-rate schedule of plugmoe's training loops: linear warmup to the peak, then a cosine down to a
floor. Stage 1 of `train-expert` (experts.train.lr_at), the whole-backbone bound (demo.ceiling) and the demo
backbone's pretraining (demo.train_backbone) take it from here; demo.train_lora keeps the variant its adapters
were trained with (see there)."""

from __future__ import annotations

import math


def warmup_cosine(step: int, peak: float, warmup_steps: int, steps: int, floor: float = 0.1) -> float:
    """The learning rate at 0-based `step` of a run of `steps`: peak * (step + 1) / warmup_steps over the first
    warmup_steps, then a cosine from peak down to floor * peak at the last step (floor * peak past it)."""
    if step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, steps - warmup_steps)
    cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return peak * (floor + (1 - floor) * cosine)
