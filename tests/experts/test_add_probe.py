"""`add-probe` stores a behavioural probe in an expert file; `admit` decodes it beside a candidate and reports
accuracy beside perplexity, under `--max-accuracy-drop`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from moe.adapters.file import ExpertFile
from tests.experts.test_train import general_texts, qa_records, write_jsonl
from tests.tiny import tiny_expert


def test_add_probe_then_admit_reports_the_probe(
    tiny_model_dir: Path, backbone_fingerprint, tmp_path: Path, capsys
) -> None:
    from experts.cli import main

    plugged = tmp_path / "plugged"
    plugged.mkdir()
    ExpertFile.save(tiny_expert("owner", seed=1, up_scale=0.3), tmp_path / "owner.safetensors", backbone_fingerprint)
    data = write_jsonl(tmp_path / "owner.jsonl", qa_records(40))
    args = ["add-probe", "--expert", str(tmp_path / "owner.safetensors"), "--data", str(data), "--size", "6"]
    assert main([*args, "--out", str(plugged / "owner.safetensors"), "--max-new-tokens", "8"]) == 0
    probe = ExpertFile.load(plugged / "owner.safetensors").metadata["probe"]
    assert probe["checker"] == "final-answer" and probe["max_new_tokens"] == 8 and len(probe["items"]) == 6
    records = {f"Question: {r['question']}\nAnswer:": r["answer"] for r in qa_records(40)}
    for item in probe["items"]:  # the reference is the gold `#### N` of the record the prompt came from
        assert records[item["prompt"]].endswith(f"#### {item['answer']}")
    with pytest.raises(ValueError, match="--pattern goes with --checker regex"):
        main([*args, "--out", str(tmp_path / "x.safetensors"), "--pattern", "(\\d+)"])  # a pattern needs regex

    ExpertFile.save(tiny_expert("cand", seed=2, threshold=2.0), tmp_path / "cand.safetensors", backbone_fingerprint)
    calibration = tmp_path / "cal.txt"
    calibration.write_text("\n".join(general_texts(10)) + "\n")
    admit = ["admit", "--model", str(tiny_model_dir), "--experts", str(plugged), "--calibration", str(calibration)]
    admit += ["--candidate", str(tmp_path / "cand.safetensors"), "--max-accuracy-drop", "2.5"]
    assert main([*admit, "--report", str(tmp_path / "report.json")]) == 0
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["limits"]["max_accuracy_drop"] == 2.5
    assert [(c["expert"], c["mode"], c["change_points"]) for c in report["behaviour"]] == [
        ("owner", "token", 0.0),
        ("owner", "sequence", 0.0),
    ]
    assert "owner        probe (limit -2.5 points)" in capsys.readouterr().out
