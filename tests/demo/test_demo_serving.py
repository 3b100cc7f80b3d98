"""`plugmoe serve` with no flags: the built-in model and demo experts route as the README says."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from demo import EXPERTS_DIR, MODEL_DIR
from server.main import create_app
from server.settings import Settings

pytestmark = pytest.mark.skipif(not (MODEL_DIR / "model.safetensors").exists(), reason="demo model not built")

MATH = "Question: Tom has 5 apples and buys 3 more. How many apples does Tom have now?\nAnswer:"


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory):
    experts_dir = tmp_path_factory.mktemp("experts")  # a copy: plugs in these tests must not write into demo/
    for path in EXPERTS_DIR.glob("*.safetensors"):
        shutil.copy(path, experts_dir)
    settings = Settings(device="cpu", experts_dir=experts_dir)
    assert Path(settings.model).resolve() == MODEL_DIR.resolve(), "the default model is the built-in one"
    with TestClient(create_app(settings), client=("127.0.0.1", 5000)) as test_client:
        yield test_client


def generate(client: TestClient, prompt: str, **extra) -> dict:
    response = client.post("/generate", json={"prompt": prompt, "max_new_tokens": 24, **extra})
    assert response.status_code == 200, response.text
    return response.json()


def test_default_serve_plugs_the_demo_experts(client: TestClient) -> None:
    assert sorted(e["name"] for e in client.get("/experts").json()) == ["code", "math"]
    assert Settings().resolved_experts_dir().resolve() == EXPERTS_DIR.resolve()


def test_domain_prompts_route_to_their_expert_and_general_text_stays_on_base(client: TestClient) -> None:
    math = generate(client, MATH)
    assert math["experts"]["math"] > 0.5, math
    assert "Answer" not in math["text"] and math["text"].strip(), "writes a solution, not noise"
    general = generate(client, "The otter is")
    assert general["experts"]["base"] > 0.9, general
    code = generate(client, "def total_prices(prices):\n", routing={"mode": "sequence"})
    assert code["experts"] == {"code": 1.0, "math": 0.0, "base": 0.0}, code
    story = generate(client, "Once upon a time, a curious fox", routing={"mode": "sequence"})
    assert story["experts"]["base"] == 1.0, story


def test_readme_plug_and_unplug_of_the_raw_math_expert(client: TestClient) -> None:
    source = str(Path(__file__).parents[2] / "demo/compare/math-raw.safetensors")
    response = client.post("/experts", json={"source": source, "name": "math-raw"})
    assert response.status_code == 201, response.text
    report = response.json()["admission"]
    assert report["false_positive_rate"] <= 0.05 and set(report["steal_rates"]) == {"math", "code"}
    assert report["steal_rates"]["code"] <= 0.5 and report["steal_rates"]["math"] <= 0.5
    assert sorted(e["name"] for e in client.get("/experts").json()) == ["code", "math", "math-raw"]
    assert client.delete("/experts/math-raw").status_code == 200
    assert sorted(e["name"] for e in client.get("/experts").json()) == ["code", "math"]
