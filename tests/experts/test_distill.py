"""Self-distillation on a tiny random Llama: what is kept, the report, repeatability, the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from experts.distill import distill
from moe import RoutedModel
from tests.tiny import tiny_backbone

PROBLEMS = [{"question": f"Tom has {a} apples. How many?", "answer": f"He has {a}.\n#### {a}"} for a in (3, 5, 8)]


@pytest.fixture(scope="module")
def model(tokenizer) -> RoutedModel:
    return RoutedModel(tiny_backbone("llama", vocab=len(tokenizer)))


def accept_all(text: str) -> str:
    """An extractor that calls every text (and gold answer) 'x': every sample counts as correct."""
    return "x"


def test_keeps_only_correct_distinct_solutions(model, tokenizer) -> None:
    records, report = distill(model, tokenizer, PROBLEMS, k=3, max_new_tokens=6, extractor=accept_all, seed=0)
    assert report.problems == 3 and report.solved == 3 and report.samples == 9 and report.correct_samples == 9
    assert report.kept == len(records) <= 9 and report.kept_tokens > 0
    for problem in PROBLEMS:
        answers = [r["answer"] for r in records if r["question"] == problem["question"]]
        assert 1 <= len(answers) == len(set(answers))  # distinct per problem
    assert set(records[0]) == {"question", "answer"}


def test_wrong_answers_are_dropped(model, tokenizer) -> None:
    records, report = distill(model, tokenizer, PROBLEMS, k=2, max_new_tokens=6, seed=0)  # gsm8k: random model
    assert report.solved == 0 and records == [] and report.kept_tokens == 0
    assert "solved 0/3" in report.summary()


def test_same_seed_same_data_other_seed_other_samples(model, tokenizer) -> None:
    kwargs = {"k": 2, "max_new_tokens": 8, "extractor": accept_all, "temperature": 1.0}
    a, _ = distill(model, tokenizer, PROBLEMS, seed=1, **kwargs)
    b, _ = distill(model, tokenizer, PROBLEMS, seed=1, **kwargs)
    c, _ = distill(model, tokenizer, PROBLEMS, seed=2, **kwargs)
    assert a == b and a != c


def test_max_per_problem(model, tokenizer) -> None:
    records, _ = distill(
        model, tokenizer, PROBLEMS, k=4, max_new_tokens=6, extractor=accept_all, temperature=1.0, max_per_problem=1
    )
    assert len(records) == 3


def test_distill_cli(tiny_model_dir: Path, tmp_path: Path, capsys) -> None:
    from experts.cli import main

    problems = tmp_path / "problems.jsonl"
    problems.write_text("".join(json.dumps(p) + "\n" for p in PROBLEMS))
    out, report = tmp_path / "distilled.jsonl", tmp_path / "report.json"
    assert (
        main(
            [
                "distill",
                "--model",
                str(tiny_model_dir),
                "--problems",
                str(problems),
                "--out",
                str(out),
                "--k",
                "2",
                "--max-new-tokens",
                "4",
                "--extractor",
                "tests.experts.test_distill:accept_all",
                "--report",
                str(report),
            ]
        )
        == 0
    )
    assert "solved 3/3 problems" in capsys.readouterr().out
    assert out.exists() and json.loads(report.read_text())["problems"] == 3
