"""Admission on plug: the report comes back in the 201 body; a candidate that cannot meet the limits is a 422 that
names the domain it would harm and by how much; in repair mode a greedy candidate is plugged with raised
thresholds, and the stored file is the repaired one.

The first tests stand in for moe.admission.report's maths (fixed verdicts) to check the server's side: limits from the
settings, disabling, the refusal message, nothing plugged. The last ones run the real maths on the tiny model."""

from __future__ import annotations

import pytest
import torch

from moe import ExpertFile
from moe.admission.report import Admission, AdmissionReport
from server import admission_policy
from tests.tiny import tiny_expert

SAMPLE = ["Mia walks to the market.", "The quick brown fox jumps over the lazy dog near the river bank."]


@pytest.fixture
def admission(monkeypatch: pytest.MonkeyPatch) -> dict:
    """Stand in for moe.admission.report.admit; set state['report'] to choose its verdict."""
    state: dict = {"report": AdmissionReport("x", "repair", True, 0.0, 10), "calls": 0}

    def admit(model, tokenizer, expert, calibration, limits, cache, router_fitter=None):
        state["calls"] += 1
        state["calibration"], state["limits"] = calibration, limits
        return Admission(expert, state["report"])

    monkeypatch.setattr(admission_policy, "admit", admit)
    monkeypatch.setattr(admission_policy, "load_calibration_texts", lambda path=None: [f"calibration from {path}"])
    return state


def _upload(client, data: bytes, **form):
    return client.post("/experts", files={"file": ("e.safetensors", data)}, data=form)


def test_report_is_returned_on_plug(make_client, expert_bytes, admission, tmp_path) -> None:
    client = make_client(admission="refuse", max_steal_rate=0.01, calibration_file=tmp_path / "cal.txt")
    admission["report"] = AdmissionReport("good", "refuse", True, 0.0, 10, {"other": 0.001})
    response = _upload(client, expert_bytes("good"))
    assert response.status_code == 201, response.text
    body = response.json()["admission"]
    assert body["steal_rates"] == {"other": 0.001} and body["admitted"] is True and body["repair"] is None
    assert admission["calibration"] == [f"calibration from {tmp_path / 'cal.txt'}"]
    limits = admission["limits"]
    assert (limits.mode, limits.max_steal_rate, limits.max_false_positive_rate) == ("refuse", 0.01, 1e-4)


def test_a_refusal_is_422_with_the_problems_and_nothing_is_plugged(make_client, expert_bytes, admission) -> None:
    client = make_client(admission="repair")
    problem = "it would raise token-mode perplexity on expert 'math''s domain_sample by +59.4% (limit +0.5%)"
    admission["report"] = AdmissionReport("greedy", "repair", False, 0.0, 10, problems=[problem])
    response = _upload(client, expert_bytes("greedy"))
    assert response.status_code == 422
    assert problem in response.json()["detail"] and "--max-domain-ppl-increase" in response.json()["detail"]
    assert response.json()["admission"]["problems"] == [problem], "the 422 body carries the report"
    assert client.get("/experts").json() == []
    metrics = client.get("/metrics").text
    assert 'plugmoe_plug_operations_total{action="plug",result="rejected"} 1.0' in metrics


def test_admission_can_be_turned_off(make_client, expert_bytes, admission) -> None:
    off = make_client(admission="off")
    response = _upload(off, expert_bytes("anything"))
    assert response.status_code == 201 and response.json()["admission"] is None
    limits_off = {
        "max_false_positive_rate": -1,
        "max_steal_rate": None,
        "max_base_ppl_increase": -1,
        "max_domain_ppl_increase": -1,
        "max_accuracy_drop": -1,
    }
    response = _upload(make_client(admission="refuse", **limits_off), expert_bytes("another"))
    assert response.status_code == 201 and response.json()["admission"] is None
    assert admission["calls"] == 0


# --- the real maths on the tiny model ------------------------------------------------------------------------


def test_refuse_mode_refuses_an_open_gate_and_admits_a_closed_one(make_client, expert_bytes) -> None:
    client = make_client(admission="refuse")
    refused = _upload(client, expert_bytes("opengate", open_gate=True))
    assert refused.status_code == 422
    detail = refused.json()["detail"]
    assert "its false-positive rate on the general calibration text is 100.0000% of a layer's decisions" in detail
    base = refused.json()["admission"]["domains"][0]
    assert base["domain"] == "base" and base["take_rates"] == [1.0, 1.0] and base["ppl_change"] != 0.0
    admitted = _upload(client, expert_bytes("closedgate", open_gate=False))
    assert admitted.status_code == 201, admitted.text
    # a closed gate takes no decision: the expert is pin-only, and there is nothing for a report to measure
    assert admitted.json()["admission"] is None and admitted.json()["routes"] is False
    assert [e["name"] for e in client.get("/experts").json()] == ["closedgate"]


def test_a_greedy_expert_is_refused_naming_the_plugged_domain_it_takes(
    make_client, expert_bytes, backbone_fingerprint
) -> None:
    client = make_client(admission="refuse", max_false_positive_rate=-1, max_base_ppl_increase=-1)
    owner = tiny_expert("owner", seed=1, up_scale=0.3, metadata={"domain_sample": SAMPLE})
    assert _upload(client, ExpertFile.to_bytes(owner, backbone_fingerprint)).status_code == 201
    refused = _upload(client, expert_bytes("greedy", open_gate=True))
    assert refused.status_code == 422
    detail = refused.json()["detail"]
    assert "its steal rate on expert 'owner''s domain_sample is 100.0000% of a layer's decisions" in detail
    assert refused.json()["admission"]["steal_rates"] == {"owner": 1.0}
    assert [e["name"] for e in client.get("/experts").json()] == ["owner"]


def test_repair_mode_plugs_a_greedy_expert_with_raised_thresholds(
    make_client, expert_bytes, backbone_fingerprint
) -> None:
    client = make_client(admission="repair")
    owner = tiny_expert("owner", seed=1, up_scale=0.3, metadata={"domain_sample": SAMPLE})
    assert _upload(client, ExpertFile.to_bytes(owner, backbone_fingerprint)).status_code == 201
    response = _upload(client, expert_bytes("greedy", open_gate=True))
    assert response.status_code == 201, response.text
    report = response.json()["admission"]
    repair = report["repair"]
    assert repair["thresholds_before"] == [-2.0, -2.0]
    pairs = zip(repair["thresholds_after"], repair["thresholds_before"], strict=True)
    assert all(after > before for after, before in pairs)
    assert report["false_positive_rate"] <= 1e-4 and report["steal_rates"]["owner"] <= 2e-3
    unrepaired = {c["domain"]: c for c in repair["unrepaired"]}
    assert unrepaired["owner"]["take_rates"] == [1.0, 1.0] and unrepaired["base"]["take_rates"] == [1.0, 1.0]
    checks = {c["domain"]: c for c in report["domains"]}
    assert checks["base"]["ppl_change"] <= 2e-4 and checks["owner"]["ppl_change"] <= 5e-3
    # what is served and what is stored are the repaired expert
    plugged = client.app.state.engine.model.plugged.read("greedy")  # its weights, out of its slot
    assert plugged.thresholds.tolist() == pytest.approx(repair["thresholds_after"])
    served = client.app.state.experts
    stored = ExpertFile.load(served.store.read_blob(served.manifest.get("greedy").sha256))
    assert torch.equal(stored.thresholds, plugged.thresholds.cpu())
    assert stored.metadata["evals"]["admission_repair"]["beside"] == ["owner"]
    described = client.get("/experts/greedy").json()
    assert described["evals"]["admission_repair"]["thresholds_after"] == pytest.approx(repair["thresholds_after"])
    assert described["size_bytes"] == served.manifest.get("greedy").size, "the stored file's size, not the upload's"


def test_under_the_context_router_a_twin_is_plugged_with_raised_floors_and_served_with_them(
    make_client, expert_bytes, backbone_fingerprint
) -> None:
    """--router context: admission measures under the set's router, the repair raises the candidate's floors in
    the refit router, and that repaired router is the one published with the new set; an unplug restores the
    router before the plug."""
    from moe.admission.samples import context_sample_pass

    client = make_client(admission="repair", router="context", max_base_ppl_increase=0.02, max_domain_ppl_increase=0.02)
    texts = [
        f"Question: Tom has {a} apples and buys {b} more. How many? Answer: {a + b}"
        for a in range(1, 5)
        for b in (2, 7)
    ]
    owner = tiny_expert("owner", seed=1, up_scale=0.3, metadata={"domain_sample": texts})
    assert _upload(client, ExpertFile.to_bytes(owner, backbone_fingerprint)).status_code == 201
    engine = client.app.state.engine
    before = engine.model.plugged.context
    assert before is not None and before.classes == ("base", "owner")
    twin = tiny_expert("twin", seed=2, up_scale=0.3, threshold=-2.0, metadata={"domain_sample": texts})
    response = _upload(client, ExpertFile.to_bytes(twin, backbone_fingerprint))
    assert response.status_code == 201, response.text
    report = response.json()["admission"]
    repair = report["repair"]
    assert repair["raised"] == "floors" and repair["thresholds_after"] == repair["thresholds_before"]
    assert max(c["take_rates"][0] for c in repair["unrepaired"] if c["domain"] == "owner") > 2e-3
    assert report["steal_rates"]["owner"] <= 2e-3
    served = engine.model.plugged.context
    assert served is not None and served.classes == ("base", "owner", "twin")
    assert served.token_floors("twin", [0, 1]) == repair["floors_after"]  # the repaired router serves
    steal = context_sample_pass(engine.model, engine.tokenizer, texts, engine.model.plugged, "twin")
    assert max(steal.take_rates()) <= 2e-3
    assert client.delete("/experts/twin").status_code in (200, 204)
    assert engine.model.plugged.context is before
