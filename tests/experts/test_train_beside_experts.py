"""Training an expert to compose: the domain sample it stores, thresholds fitted on held-out calibration text, the
repair beside plugged experts at train time, and the `add-sample` and `admit` commands."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from experts.config import TrainConfig
from experts.data import Example
from experts.train import TrainingError, split_calibration, train_expert
from moe.adapters.file import ExpertFile
from moe.admission.samples import sample_pass
from tests.experts.test_train import FAST, code_texts, general_texts, qa_records, write_jsonl
from tests.tiny import tiny_expert

OWNER_SAMPLE = ["Tom has 3 apples and buys 4 more. How many?", "Mia has 2 pens and buys 5 more. How many?"]


def _train(model, tokenizer, others=(), sample=(), adapter=None, **overrides):
    config = TrainConfig(name="code", seed=0, **{**FAST, **overrides})
    domain = [Example("", t) for t in code_texts(40)]
    calibration = [Example("", t) for t in general_texts(60)]
    return train_expert(
        model,
        tokenizer,
        config,
        domain[:32],
        domain[32:],
        calibration[:48],
        calibration[48:],
        others=others,
        sample=sample,
        repair_calibration=general_texts(10, seed=7),
        adapter=adapter,
    )


def test_the_calibration_split_is_seeded_and_disjoint() -> None:
    items = [Example("", t) for t in general_texts(20)]
    key, held = split_calibration(items, 0.5, seed=3)
    assert (key, held) == split_calibration(items, 0.5, seed=3)
    assert len(held) == 10 and not {e.target for e in key} & {e.target for e in held}
    assert split_calibration(items, 0.0, seed=3) == (items, [])


def test_the_file_carries_a_domain_sample_and_held_out_false_positives(model, tokenizer, tmp_path: Path) -> None:
    expert = _train(model, tokenizer)
    held_out = set(code_texts(40)[32:])
    assert expert.metadata["domain_sample"] and set(expert.metadata["domain_sample"]) <= held_out
    gate = expert.metadata["evals"]["gate"]
    assert len(gate["heldout_false_positive_per_layer"]) == len(expert.layers)
    assert all(f <= 1e-3 for f in gate["heldout_false_positive_per_layer"]), "the cap holds on unseen text too"
    assert expert.metadata["evals"]["admission"] is None, "nothing plugged beside it: no repair"
    chosen = [Example("", f"x = {i}") for i in range(80)]
    sampled = _train(model, tokenizer, sample=chosen, sample_size=8)
    assert len(sampled.metadata["domain_sample"]) == 8 and set(sampled.metadata["domain_sample"]) <= {
        e.target for e in chosen
    }
    path = ExpertFile.save(sampled, tmp_path / "code.safetensors", model.fingerprint)
    assert ExpertFile.load(path, model.fingerprint).metadata["domain_sample"] == sampled.metadata["domain_sample"]


def test_beside_a_plugged_expert_the_gate_is_repaired_at_train_time(model, tokenizer) -> None:
    # a plugged expert whose gate is open wherever its sample is: the new gate must leave those tokens alone
    owner = tiny_expert("owner", seed=1, up_scale=0.0, threshold=2.0, metadata={"domain_sample": OWNER_SAMPLE})
    expert = _train(model, tokenizer, others=(owner,), max_steal_rate=0.0, max_false_positive_rate=0.0)
    report = expert.metadata["evals"]["admission"]
    assert {c["domain"] for c in report["domains"]} == {"base", "owner", "code"}
    with_both = model.plugged.plugging(owner).plugging(expert)
    for sample in (OWNER_SAMPLE, general_texts(10, seed=7)):
        rates = sample_pass(model, tokenizer, sample, with_both, with_both, "code").take_rates()
        assert max(rates) == 0.0, rates
    repair = report["repair"]  # the unrepaired gate took some of them; what the repair did is in the file
    assert max(max(c["take_rates"]) for c in repair["unrepaired"] if c["domain"] != "code") > 0.0
    assert repair["thresholds_after"] == pytest.approx(expert.thresholds.tolist())
    assert len(repair["own_recall_before"]) == len(repair["own_recall_after"]) == len(expert.layers)


def test_add_sample_and_admit_commands(tiny_model_dir: Path, backbone_fingerprint, tmp_path: Path) -> None:
    from experts.cli import main

    plugged = tmp_path / "plugged"
    plugged.mkdir()
    owner = tiny_expert("owner", seed=1, up_scale=0.3)
    ExpertFile.save(owner, tmp_path / "owner-bare.safetensors", backbone_fingerprint)
    data = write_jsonl(tmp_path / "owner.jsonl", qa_records(100))
    args = ["add-sample", "--expert", str(tmp_path / "owner-bare.safetensors"), "--data", str(data)]
    assert main([*args, "--out", str(plugged / "owner.safetensors"), "--size", "16"]) == 0
    sample = ExpertFile.load(plugged / "owner.safetensors").metadata["domain_sample"]
    assert len(sample) == 16 and all(text.startswith("Question: Tom has") for text in sample)

    greedy = tiny_expert("greedy", seed=2, up_scale=0.3, threshold=-2.0)
    ExpertFile.save(greedy, tmp_path / "greedy.safetensors", backbone_fingerprint)
    calibration = tmp_path / "cal.txt"
    calibration.write_text("\n".join(general_texts(20)) + "\n")
    common = ["admit", "--model", str(tiny_model_dir), "--experts", str(plugged), "--calibration", str(calibration)]
    common += ["--candidate", str(tmp_path / "greedy.safetensors")]
    refused = main([*common, "--admission", "refuse", "--report", str(tmp_path / "refused.json")])
    report = json.loads((tmp_path / "refused.json").read_text())
    assert refused == 3 and not report["admitted"] and report["steal_rates"] == {"owner": 1.0}
    out = tmp_path / "greedy-repaired.safetensors"
    assert main([*common, "--out", str(out), "--report", str(tmp_path / "repaired.json")]) == 0
    report = json.loads((tmp_path / "repaired.json").read_text())
    repaired = ExpertFile.load(out)
    assert report["admitted"] and repaired.thresholds.tolist() == pytest.approx(report["repair"]["thresholds_after"])
    assert (repaired.thresholds > greedy.thresholds).all()


def test_a_gate_can_be_refitted_on_another_files_adapter(model, tokenizer) -> None:
    first = _train(model, tokenizer)
    refitted = _train(model, tokenizer, adapter=first, threshold_holdout=0.25)
    assert torch.equal(refitted.down, first.down) and torch.equal(refitted.up, first.up)
    assert refitted.metadata["evals"]["stage1"]["best_step"] == -1
    assert not torch.equal(refitted.thresholds, first.thresholds), "the gate was fitted again, on another split"
    with pytest.raises(TrainingError, match="rank"):
        _train(model, tokenizer, adapter=first, rank=first.rank * 2)


def test_admit_under_the_context_router(tiny_model_dir: Path, backbone_fingerprint, tmp_path: Path) -> None:
    """`admit --router context`: the limits measured under the set's context router, a repair raising the
    candidate's floors there (its thresholds stay), and the report giving its own recall and oracle gap."""
    from experts.cli import main

    plugged = tmp_path / "plugged"
    plugged.mkdir()
    owner_texts = [f"Question: {r['question']} Answer: {r['answer']}" for r in qa_records(16)]
    owner = tiny_expert("owner", seed=1, up_scale=0.3, metadata={"domain_sample": owner_texts})
    ExpertFile.save(owner, plugged / "owner.safetensors", backbone_fingerprint)
    # a twin of the owner's domain with an open gate: under the router it would take the owner's decisions
    twin = tiny_expert("twin", seed=2, up_scale=0.3, threshold=-2.0, metadata={"domain_sample": owner_texts})
    ExpertFile.save(twin, tmp_path / "twin.safetensors", backbone_fingerprint)
    calibration = tmp_path / "cal.txt"
    calibration.write_text("\n".join(general_texts(20)) + "\n")
    args = ["admit", "--model", str(tiny_model_dir), "--experts", str(plugged), "--calibration", str(calibration)]
    args += ["--candidate", str(tmp_path / "twin.safetensors"), "--router", "context"]
    status = main([*args, "--report", str(tmp_path / "report.json")])
    report = json.loads((tmp_path / "report.json").read_text())
    assert status == (0 if report["admitted"] else 3)
    routing = report["context_routing"]
    assert routing["routed_by"] == "context router" and "oracle_gap" in routing["sequence_oracle"]
    assert report["repair"] is not None and report["repair"]["raised"] == "floors", report["repair"]
    assert report["repair"]["thresholds_after"] == report["repair"]["thresholds_before"]
    if report["admitted"]:
        assert report["steal_rates"]["owner"] <= 2e-3
