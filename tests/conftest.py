"""Fixtures every test package shares: the tiny model saved like a checkpoint, its fingerprint, expert files.

Tiny backbones, the tokenizer and experts themselves are built by tests/tiny.py (imported, not fixtures).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# what a server writes at run time (its default expert store) goes here, never into the home directory
os.environ["XDG_DATA_HOME"] = tempfile.mkdtemp(prefix="plugmoe-test-data-")
torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Llama with a real tokenizer, saved like a hub checkpoint."""
    from tests.tiny import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("tiny-llama"), "llama")


@pytest.fixture(scope="session")
def backbone_fingerprint(tiny_model_dir: Path):
    """The fingerprint an expert file needs to be plugged into the model in tiny_model_dir."""
    from moe import fingerprint, load_backbone

    model, _ = load_backbone(tiny_model_dir, device="cpu")
    return fingerprint(model)


@pytest.fixture
def expert_bytes(backbone_fingerprint) -> Callable[..., bytes]:
    """expert_bytes(name, open_gate=True, **tiny_expert options) -> an expert file for tiny_model_dir's model.

    open_gate: eligible for every token (it wins everything in token mode); otherwise the gate is closed. The
    file carries a description and an example prompt, as a trained expert's does.
    """
    from moe import ExpertFile
    from tests.tiny import tiny_expert

    def make(name: str, open_gate: bool = True, **options) -> bytes:
        options = {
            "up_scale": 0.3,
            "description": f"the {name} expert",
            "examples": (f"an example for {name}",),
            **options,
        }
        expert = tiny_expert(name, threshold=-2.0 if open_gate else None, **options)
        return ExpertFile.to_bytes(expert, backbone_fingerprint)

    return make
