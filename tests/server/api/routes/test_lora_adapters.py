"""vLLM's runtime LoRA adapter API against plugmoe, with the official `openai` client and plain HTTP: load a
PEFT directory -> /v1/models lists it (parent, root) -> model=<adapter> equals the same expert pinned -> unload
-> 404; vLLM's statuses and error types; admin rights; the source allow-list; --lora-modules at start."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import openai
import pytest
import torch
from fastapi.testclient import TestClient
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from server import cli
from server.settings import Settings, parse_lora_module

PROMPT = "The quick brown fox"


def peft_dir(model_dir: Path, directory: Path, seed: int = 1, rank: int = 4, **config) -> Path:
    """A PEFT LoRA on the test model's MLP, random nonzero lora_B (no training), saved as PEFT saves it."""
    torch.manual_seed(seed)
    options = {"r": rank, "lora_alpha": 2 * rank, "init_lora_weights": False}
    options["target_modules"] = ["up_proj", "down_proj"]
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir), LoraConfig(**{**options, **config}))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.mul_(20.0)  # an effect plain in a few greedy tokens of a tiny random model
    model.save_pretrained(directory)
    return directory


@pytest.fixture
def roots(tmp_path: Path) -> Path:
    (tmp_path / "roots").mkdir()
    return tmp_path / "roots"


@pytest.fixture
def adapter(tiny_model_dir: Path, roots: Path) -> Path:
    return peft_dir(tiny_model_dir, roots / "sql")


@pytest.fixture
def lora_client(make_client: Callable[..., TestClient], roots: Path) -> TestClient:
    return make_client(source_roots=str(roots))


def _oai(client: TestClient) -> openai.OpenAI:
    return openai.OpenAI(base_url="http://testserver/v1", api_key="unused", http_client=client, max_retries=0)


def _load(client: TestClient, **body) -> object:
    return client.post("/v1/load_lora_adapter", json=body)


def _complete(oai: openai.OpenAI, model: str, **extra) -> str:
    response = oai.completions.create(model=model, prompt=PROMPT, max_tokens=8, temperature=0, extra_body=extra)
    return response.choices[0].text


def test_load_list_use_unload_as_a_vllm_user_does(lora_client: TestClient, adapter: Path) -> None:
    response = _load(lora_client, lora_name="sql", lora_path=str(adapter))
    assert response.status_code == 200, response.text
    assert response.text == "Success: LoRA adapter 'sql' added successfully."

    oai = _oai(lora_client)
    cards = {m.id: m for m in oai.models.list().data}
    base = next(iter(cards))
    assert cards["sql"].parent == base and cards["sql"].root == str(adapter)
    assert cards[base].parent is None

    by_name = _complete(oai, "sql")
    assert by_name == _complete(oai, base, routing={"mode": "pin", "expert": "sql"})
    assert by_name != _complete(oai, base, routing={"mode": "off"}), "vacuous: the adapter changes nothing"
    routed = lora_client.post("/generate", json={"prompt": PROMPT, "max_new_tokens": 8}).json()
    assert routed["experts"].get("sql", 0.0) == 0.0, "pin-only: it never wins a token in token mode"
    (info,) = [e for e in lora_client.get("/experts").json() if e["name"] == "sql"]
    assert info["routes"] is False and info["kind"] == "lora" and info["provenance"]["source"] == "peft"
    assert info["provenance"]["warnings"] == [], "the adapter's base model is the served model"
    assert lora_client.get("/experts/sql").json()["routes"] is False

    texts = ["SELECT name FROM users WHERE id = 3;", "SELECT count(*) FROM orders;"]
    response = lora_client.put("/experts/sql/domain-sample", json={"texts": texts})
    assert response.status_code == 200, response.text
    assert response.json()["domain_sample_texts"] == 2 and response.json()["routes"] is False, "still pin-only"
    assert _complete(oai, "sql") == by_name, "the same weights"
    assert lora_client.put("/experts/sql/domain-sample", json={"texts": []}).status_code == 400
    assert lora_client.put("/experts/ghost/domain-sample", json={"texts": texts}).status_code == 404

    response = lora_client.post("/v1/unload_lora_adapter", json={"lora_name": "sql"})
    assert response.status_code == 200 and response.text == "Success: LoRA adapter 'sql' removed successfully."
    assert "sql" not in {m.id for m in oai.models.list().data}
    with pytest.raises(openai.NotFoundError):
        _complete(oai, "sql")


def test_an_attention_lora_is_served_by_name(lora_client: TestClient, tiny_model_dir: Path, roots: Path) -> None:
    attention = peft_dir(tiny_model_dir, roots / "attn", target_modules=["q_proj", "v_proj", "o_proj", "down_proj"])
    assert _load(lora_client, lora_name="attn", lora_path=str(attention)).status_code == 200
    oai = _oai(lora_client)
    base = next(m.id for m in oai.models.list().data)
    by_name = _complete(oai, "attn")
    assert by_name == _complete(oai, base, routing={"mode": "pin", "expert": "attn"})
    assert by_name != _complete(oai, base, routing={"mode": "off"}), "vacuous: the adapter changes nothing"
    assert _complete(oai, base) == _complete(oai, base, routing={"mode": "off"}), "pin-only: it wins no token"


def test_a_gateless_plug_skips_admission_but_not_the_probe(
    make_client: Callable[..., TestClient], roots: Path, adapter: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    client = make_client(source_roots=str(roots), admission="refuse")
    served = client.app.state.experts
    probed: list[str] = []

    def no_report(*args: object) -> None:
        raise AssertionError("the admission report ran for a pin-only expert")

    def probe(model: object, tokenizer: object, expert) -> bool:
        probed.append(expert.name)
        return expert.name != "bad"  # as if "bad" made the logits NaN

    served.policy.review = no_report
    monkeypatch.setattr("server.served_experts.probe_is_finite", probe)
    assert _load(client, lora_name="sql", lora_path=str(adapter)).status_code == 200
    response = _load(client, lora_name="bad", lora_path=str(adapter))
    assert response.status_code == 400 and "NaN or infinite" in response.json()["error"]["message"]
    assert probed == ["sql", "bad"] and [e["name"] for e in client.get("/experts").json()] == ["sql"]


def test_vllms_error_statuses_and_types(
    lora_client: TestClient, adapter: Path, roots: Path, tiny_model_dir: Path, tmp_path: Path
) -> None:
    def error(response) -> tuple[int, str, str]:
        body = response.json()["error"]
        return response.status_code, body["type"], body["message"]

    assert error(_load(lora_client, lora_name="sql"))[:2] == (400, "InvalidUserInput")
    assert _load(lora_client, lora_name="sql", lora_path=str(adapter)).status_code == 200
    status, kind, message = error(_load(lora_client, lora_name="sql", lora_path=str(adapter)))
    assert (status, kind) == (400, "InvalidUserInput") and "has already been loaded" in message
    assert _load(lora_client, lora_name="sql", lora_path=str(adapter), load_inplace=True).status_code == 200

    status, kind, message = error(_load(lora_client, lora_name="nope", lora_path=str(roots / "missing")))
    assert (status, kind) == (404, "NotFoundError") and message.startswith("No adapter found")
    outside = peft_dir(tiny_model_dir, tmp_path / "outside")
    status, kind, message = error(_load(lora_client, lora_name="out", lora_path=str(outside)))
    assert (status, kind) == (400, "BadRequestError") and "--source-roots" in message
    (roots / "link").symlink_to(outside)  # a symlink under a root to a directory outside it
    assert error(_load(lora_client, lora_name="out", lora_path=str(roots / "link")))[:2] == (400, "BadRequestError")

    head = peft_dir(tiny_model_dir, roots / "head", target_modules=["lm_head", "down_proj"])
    status, kind, message = error(_load(lora_client, lora_name="head", lora_path=str(head)))
    assert (status, kind) == (400, "BadRequestError") and "plugmoe does not serve: lm_head" in message
    dora = peft_dir(tiny_model_dir, roots / "dora", use_dora=True)
    assert "DoRA" in error(_load(lora_client, lora_name="dora", lora_path=str(dora)))[2]
    assert error(_load(lora_client, lora_name="Bad Name", lora_path=str(adapter)))[:2] == (400, "InvalidUserInput")
    # vLLM takes any string; a plugmoe name is also a route and a metrics label: lowercase, so "SQL" cannot be
    # a second adapter beside "sql" that /v1/models and `model` would tell apart by case alone
    status, kind, message = error(_load(lora_client, lora_name="SQL", lora_path=str(adapter)))
    assert (status, kind) == (400, "InvalidUserInput") and message.startswith("lora_name: expert name 'SQL'")
    assert "lowercase letters" in message

    assert error(lora_client.post("/v1/unload_lora_adapter", json={}))[:2] == (400, "InvalidUserInput")
    status, kind, message = error(lora_client.post("/v1/unload_lora_adapter", json={"lora_name": "ghost"}))
    assert (status, kind, message) == (404, "NotFoundError", "The lora adapter 'ghost' cannot be found.")
    assert [e["name"] for e in lora_client.get("/experts").json()] == ["sql"], "refusals changed nothing"


def test_only_an_admin_may_load_or_unload(make_client: Callable[..., TestClient], roots: Path, adapter: Path) -> None:
    remote = make_client(client=("10.1.2.3", 40000), source_roots=str(roots))
    assert _load(remote, lora_name="sql", lora_path=str(adapter)).status_code == 403
    guarded = make_client(source_roots=str(roots), admin_token="s3cret")
    assert _load(guarded, lora_name="sql", lora_path=str(adapter)).status_code == 401
    wrong = {"Authorization": "Bearer nope"}
    body = {"lora_name": "sql", "lora_path": str(adapter)}
    assert guarded.post("/v1/load_lora_adapter", json=body, headers=wrong).status_code == 403
    admin = {"Authorization": "Bearer s3cret"}
    assert guarded.post("/v1/load_lora_adapter", json=body, headers=admin).status_code == 200
    assert guarded.post("/v1/unload_lora_adapter", json={"lora_name": "sql"}).status_code == 401
    assert guarded.post("/v1/unload_lora_adapter", json={"lora_name": "sql"}, headers=admin).status_code == 200


def test_lora_modules_seed_adapters_at_start(
    make_client: Callable[..., TestClient], tiny_model_dir: Path, tmp_path: Path
) -> None:
    # the operator's paths: not limited to --source-roots (none is set here)
    sql = peft_dir(tiny_model_dir, tmp_path / "sql")
    other = peft_dir(tiny_model_dir, tmp_path / "other", seed=2)
    modules = ["sql=" + str(sql), json.dumps({"name": "other", "path": str(other), "base_model_name": "x"})]
    client = make_client(lora_modules=modules)
    cards = {m["id"]: m for m in client.get("/v1/models").json()["data"]}
    assert cards["sql"]["root"] == str(sql) and cards["other"]["root"] == str(other)
    assert _complete(_oai(client), "sql") != _complete(_oai(client), "other")

    with pytest.raises(RuntimeError, match="--lora-modules bad="):
        make_client(lora_modules=[f"bad={tmp_path / 'missing'}"], experts_dir=tmp_path / "other-store")


def test_lora_modules_flag_takes_vllms_forms() -> None:
    args = cli.build_parser().parse_args(["serve", "--lora-modules", "a=/p/a", '{"name": "b", "path": "/p/b"}'])
    settings = Settings(**{k: v for k, v in vars(args).items() if k in Settings.model_fields})
    assert settings.lora_module_list() == [("a", "/p/a"), ("b", "/p/b")]
    with pytest.raises(ValueError, match="must be name=path"):
        parse_lora_module("just-a-name")
    with pytest.raises(ValueError, match="must be name=path"):
        Settings(lora_modules=["a"])


def test_experts_say_whether_they_route(client: TestClient, expert_bytes) -> None:
    """Any expert file with a closed gate is pin-only, however it was plugged; an open gate routes."""
    for name, open_gate in (("shut", False), ("open", True)):
        response = client.post("/experts", files={"file": ("x.safetensors", expert_bytes(name, open_gate=open_gate))})
        assert response.status_code == 201 and response.json()["routes"] is open_gate, response.text
    assert {e["name"]: e["routes"] for e in client.get("/experts").json()} == {"shut": False, "open": True}
