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


@pytest.fixture(scope="session")
def s3_endpoint() -> object:
    """A real S3 API on loopback (moto's server mode), with credentials in the environment as AWS clients
    read them. Yields the endpoint URL; each test makes its own bucket (s3_bucket)."""
    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
    saved = {k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")}
    os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1")
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture
def s3_store_url(s3_endpoint: str, request: pytest.FixtureRequest) -> tuple[str, dict]:
    """(url, storage options) of an empty store in a fresh bucket on the loopback S3 server."""
    import re
    import uuid

    import boto3

    bucket = re.sub(r"[^a-z0-9-]", "-", request.node.name.lower())[:40].strip("-") + "-" + uuid.uuid4().hex[:8]
    boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1").create_bucket(Bucket=bucket)
    return f"s3://{bucket}/experts", {"endpoint_url": s3_endpoint, "key": "testing", "secret": "testing"}
