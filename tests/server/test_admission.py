"""Admission on plug: the report comes back in the 201 body; over a limit, 422 with the numbers.

The report's maths belongs to moe.admission; here a stand-in with the same interface fixes the
numbers, so these tests check the server's side (limits, disabling, refusal message, nothing plugged)."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from server import admission_policy


@dataclass
class FakeReport:
    false_positive_rate: float
    steal_rates: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"false_positive_rate": self.false_positive_rate, "steal_rates": self.steal_rates}


@pytest.fixture
def admission(monkeypatch: pytest.MonkeyPatch) -> dict:
    """Stand in for the report's maths; set state['report'] to choose what it returns."""
    state: dict = {"report": FakeReport(0.0), "calls": 0, "calibration": None}

    def admission_report(model, tokenizer, expert, calibration_texts, calibration=None):
        state["calls"] += 1
        state["calibration"] = calibration_texts
        return state["report"]

    monkeypatch.setattr(admission_policy, "admission_report", admission_report)
    monkeypatch.setattr(admission_policy, "load_calibration_texts", lambda path=None: [f"calibration from {path}"])
    return state


def _upload(client, data: bytes, **form):
    return client.post("/experts", files={"file": ("e.safetensors", data)}, data=form)


def test_report_is_returned_on_plug(make_client, expert_bytes, admission, tmp_path) -> None:
    client = make_client(max_false_positive_rate=0.05, max_steal_rate=0.5, calibration_file=tmp_path / "cal.txt")
    admission["report"] = FakeReport(0.01, {"other": 0.2})
    response = _upload(client, expert_bytes("good"))
    assert response.status_code == 201, response.text
    assert response.json()["admission"] == {"false_positive_rate": 0.01, "steal_rates": {"other": 0.2}}
    assert admission["calibration"] == [f"calibration from {tmp_path / 'cal.txt'}"]


@pytest.mark.parametrize(
    ("report", "needles"),
    [
        (FakeReport(0.2), ["false-positive rate 0.200", "limit 0.05"]),
        (FakeReport(0.0, {"math": 0.9}), ["'math'", "0.900", "limit 0.5"]),
    ],
)
def test_over_a_limit_is_422_and_nothing_is_plugged(
    make_client, expert_bytes, admission, report, needles: list[str]
) -> None:
    client = make_client(max_false_positive_rate=0.05, max_steal_rate=0.5)
    admission["report"] = report
    response = _upload(client, expert_bytes("greedy"))
    assert response.status_code == 422
    for needle in needles:
        assert needle in response.json()["detail"]
    assert client.get("/experts").json() == []
    metrics = client.get("/metrics").text
    assert 'plugmoe_plug_operations_total{action="plug",result="rejected"} 1.0' in metrics


def test_limits_can_be_disabled(make_client, expert_bytes, admission) -> None:
    client = make_client(max_false_positive_rate=-1, max_steal_rate=None)
    admission["report"] = FakeReport(0.99, {"x": 0.99})
    response = _upload(client, expert_bytes("anything"))
    assert response.status_code == 201 and response.json()["admission"] is None
    assert admission["calls"] == 0
    admission["report"] = FakeReport(0.01, {"x": 0.99})
    steal_off = make_client(max_false_positive_rate=0.05, max_steal_rate=-1)
    response = _upload(steal_off, expert_bytes("steals"))
    assert response.status_code == 201 and response.json()["admission"]["steal_rates"] == {"x": 0.99}


def test_real_report_refuses_an_open_gate_and_admits_a_closed_one(make_client, expert_bytes) -> None:
    """No stand-in: experts.admission's own maths on the shipped calibration text."""
    client = make_client(max_false_positive_rate=0.05, max_steal_rate=0.5)
    refused = _upload(client, expert_bytes("opengate", open_gate=True))
    assert refused.status_code == 422
    assert "false-positive rate 1.000 on general text is over the limit 0.05" in refused.json()["detail"]
    admitted = _upload(client, expert_bytes("closedgate", open_gate=False))
    assert admitted.status_code == 201, admitted.text
    report = admitted.json()["admission"]
    assert report["false_positive_rate"] == 0.0 and report["base_decisions"] > 0
    assert [e["name"] for e in client.get("/experts").json()] == ["closedgate"]
