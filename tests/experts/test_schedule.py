"""The learning-rate schedule: linear warmup to the peak, a cosine down to the floor at the last step."""

from __future__ import annotations

import math

import pytest

from experts.config import TrainConfig
from experts.schedule import warmup_cosine
from experts.train import lr_at


def test_warmup_then_cosine_to_the_floor() -> None:
    peak, warmup, steps = 2e-3, 20, 300
    rates = [warmup_cosine(step, peak, warmup, steps, floor=0.1) for step in range(steps + 5)]
    assert rates[:warmup] == pytest.approx([peak * (s + 1) / warmup for s in range(warmup)])
    assert rates[warmup] == pytest.approx(peak)
    middle = warmup + (steps - warmup) // 2
    assert rates[middle] == pytest.approx(peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5))))
    assert rates[steps] == pytest.approx(0.1 * peak) and rates[-1] == rates[steps], "the floor past the end"
    assert all(a >= b for a, b in zip(rates[warmup:], rates[warmup + 1 :], strict=False)), "never rises after warmup"


def test_stage_one_runs_the_shared_schedule() -> None:
    config = TrainConfig(name="x", steps=50, warmup_steps=5, lr=1e-3)
    assert [lr_at(s, config) for s in range(60)] == [warmup_cosine(s, 1e-3, 5, 50, floor=0.1) for s in range(60)]
