"""`plugmoe serve` with no flags: the built-in model and demo experts route as the README says."""

from __future__ import annotations

from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from demo import EXPERTS_DIR, MODEL_DIR
from server.main import create_app
from server.settings import Settings

pytestmark = pytest.mark.skipif(not (MODEL_DIR / "model.safetensors").exists(), reason="demo model not built")

MATH = "Question: Tom has 5 apples and buys 3 more. How many apples does Tom have now?\nAnswer:"


def _demo_files() -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(EXPERTS_DIR.iterdir())}


@pytest.fixture(scope="module")
def store_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("store")


@pytest.fixture(scope="module")
def client(store_dir: Path):
    settings = Settings(device="cpu", experts_dir=store_dir)  # the defaults, with the store in a temp dir
    assert Path(settings.model).resolve() == MODEL_DIR.resolve(), "the default model is the built-in one"
    with TestClient(create_app(settings), client=("127.0.0.1", 5000)) as test_client:
        yield test_client


def generate(client: TestClient, prompt: str, **extra) -> dict:
    response = client.post("/generate", json={"prompt": prompt, "max_new_tokens": 24, **extra})
    assert response.status_code == 200, response.text
    return response.json()


def test_default_serve_plugs_the_demo_experts(client: TestClient) -> None:
    """The store starts empty and is seeded from demo/experts, which stays as shipped."""
    assert sorted(e["name"] for e in client.get("/experts").json()) == ["code", "math"]
    assert Settings().resolved_seed_experts() == EXPERTS_DIR
    assert not Settings().resolved_experts_dir().resolve().is_relative_to(EXPERTS_DIR.parents[1])


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


def test_readme_examples_twice_give_the_same_answers(client: TestClient, store_dir: Path) -> None:
    """The README top to bottom, twice with a restart between: same answers, demo/ untouched."""
    shipped = _demo_files()
    source = str(Path(__file__).parents[2] / "demo/compare/math-raw.safetensors")

    def readme(test_client: TestClient) -> list:
        answers = [generate(test_client, MATH, max_new_tokens=40, routing={"mode": "token"})]
        answers.append(generate(test_client, "def total(xs):\n", routing={"mode": "pin", "expert": "code"}))
        plugged = test_client.post("/experts", json={"source": source, "name": "math-raw"})
        replaced = test_client.post("/experts", json={"source": source, "name": "math-raw", "replace": True})
        assert (plugged.status_code, replaced.status_code) == (201, 201), (plugged.text, replaced.text)
        answers.append(sorted(e["name"] for e in test_client.get("/experts").json()))
        assert test_client.delete("/experts/math-raw").status_code == 200
        answers.append(sorted(e["name"] for e in test_client.get("/experts").json()))
        collected = test_client.post("/experts/gc?keep_versions=2")
        assert collected.status_code == 200, collected.text
        answers.append(sorted(e["name"] for e in test_client.get("/experts").json()))  # the GC changes no set
        return answers

    first = readme(client)
    settings = Settings(device="cpu", experts_dir=store_dir)
    with TestClient(create_app(settings), client=("127.0.0.1", 5000)) as restarted:
        second = readme(restarted)
    assert first == second
    assert _demo_files() == shipped
