"""moe.model.backbone.load_backbone: the start-up log names the device and dtype actually used."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from moe import load_backbone


def test_load_logs_the_resolved_device_and_dtype(tiny_model_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="moe.model.backbone")
    model, _ = load_backbone(tiny_model_dir, device="auto", dtype="bfloat16")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    assert next(model.parameters()).dtype == torch.bfloat16
    line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("loaded backbone"))
    assert line.endswith(f"on {device} (auto) in bfloat16"), line
    assert " on auto " not in line
