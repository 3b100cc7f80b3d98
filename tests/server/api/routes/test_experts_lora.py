"""POST /experts with LoRA expert files: plugged beside bottleneck experts, served pinned and routed, and
refused with a 422 that says why when the LoRA does not fit the served backbone."""

from __future__ import annotations

from pathlib import Path

from fastapi.testclient import TestClient

from moe import ExpertFile, RoutedModel, RoutingSpec, load_backbone
from moe.decode.generation import generate
from server.expert_store import ExpertStore
from tests.tiny import tiny_lora_expert

PROMPT = "The quick brown fox"
SHAPES = {"gate_proj": (32, 64), "up_proj": (32, 64), "down_proj": (64, 32)}  # tests.tiny's Llama


def _upload(client: TestClient, data: bytes) -> object:
    return client.post("/experts", files={"file": ("upload.safetensors", data)})


def _generate(client: TestClient, **body) -> dict:
    response = client.post("/generate", json={"prompt": PROMPT, "max_new_tokens": 10, "min_new_tokens": 10, **body})
    assert response.status_code == 200, response.text
    return response.json()


def test_a_lora_expert_plugs_and_serves_beside_a_bottleneck_expert(
    client: TestClient, expert_bytes, backbone_fingerprint, tiny_model_dir: Path
) -> None:
    expert = tiny_lora_expert("code", SHAPES, seed=3, scale=0.8, threshold=-2.0, examples=("def f(x):",))
    response = _upload(client, ExpertFile.to_bytes(expert, backbone_fingerprint))
    assert response.status_code == 201, response.text
    body = response.json()
    assert body["name"] == "code" and body["kind"] == "lora" and body["rank"] == 4 and body["layers"] == [0, 1]
    assert _upload(client, expert_bytes("math", open_gate=False)).status_code == 201
    assert [e["kind"] for e in client.get("/experts").json()] == ["lora", "bottleneck"]

    pinned = _generate(client, routing={"mode": "pin", "expert": "code"})
    assert pinned["experts"]["code"] == 1.0
    backbone, tokenizer = load_backbone(tiny_model_dir, device="cpu")
    model = RoutedModel(backbone)  # the same expert in-process: what the server must have generated
    model.plug(ExpertFile.load(ExpertFile.to_bytes(expert, backbone_fingerprint), backbone_fingerprint))
    (want,) = generate(model, tokenizer, [PROMPT], RoutingSpec("pin", "code"), max_new_tokens=10)
    assert pinned["text"] == want.text
    assert pinned["text"] != _generate(client, routing={"mode": "off"})["text"]
    routed = _generate(client)  # token mode: the LoRA's open gate wins every token
    assert routed["experts"]["code"] == 1.0 and routed["text"] == pinned["text"]

    assert client.delete("/experts/code").status_code == 200
    assert [e["name"] for e in client.get("/experts").json()] == ["math"]


def test_a_lora_for_another_mlp_width_is_422_and_changes_nothing(
    client: TestClient, backbone_fingerprint, tmp_path: Path
) -> None:
    wide = tiny_lora_expert("wide", {"gate_proj": (32, 96), "up_proj": (32, 96), "down_proj": (96, 32)})
    response = _upload(client, ExpertFile.to_bytes(wide, backbone_fingerprint))
    assert response.status_code == 422
    assert "gate_proj maps 32 -> 96, the backbone's gate_proj maps 32 -> 64" in response.json()["detail"]
    assert client.get("/experts").json() == []
    assert ExpertStore(tmp_path / "experts").current().version == 0, "refused before anything was stored"
