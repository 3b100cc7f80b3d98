"""Expert training on a tiny random Llama: data formatting, stage 1, the gate, the file, the CLI."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from experts.config import TrainConfig
from experts.data import (
    DataFormatError,
    Example,
    Template,
    load_examples,
    read_records,
    split_heldout,
    to_examples,
)
from experts.train import (
    heldout_loss,
    offset_ceiling,
    reference_set,
    train_adapter,
    train_expert,
    trainable_expert,
)
from moe import RoutedModel, RoutingSpec
from moe.adapters.file import ExpertFile
from moe.admission.samples import cap_threshold
from moe.model.text_batches import batches, forward, token_nll

FAST = {
    "steps": 4,
    "batch_size": 4,
    "max_tokens": 32,
    "eval_every": 2,
    "eval_examples": 4,
    "max_new_tokens": 8,
    "gate_steps": 20,
    "gate_max_tokens": 2000,
    "balance_steps": 3,
    "balance_batch": 6,
}


def code_texts(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [f"def add_{i}(a, b):\n    return a + {rng.randint(0, 99)} * b\n" for i in range(n)]


def general_texts(n: int, seed: int = 1) -> list[str]:
    rng = random.Random(seed)
    words = (
        "the",
        "quick",
        "brown",
        "fox",
        "jumps",
        "over",
        "lazy",
        "dog",
        "near",
        "river",
        "bank",
        "morning",
        "weather",
        "cold",
        "children",
    )
    return [" ".join(rng.choice(words) for _ in range(12)).capitalize() + "." for _ in range(n)]


def qa_records(n: int, seed: int = 2) -> list[dict[str, str]]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        a, b = rng.randint(1, 9), rng.randint(1, 9)
        out.append(
            {
                "question": f"Tom has {a} apples and buys {b} more. How many?",
                "answer": f"{a} + {b} = {a + b}.\n#### {a + b}",
            }
        )
    return out


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


# --- data -------------------------------------------------------------------------------------------------


def test_qa_records_become_prompt_and_answer() -> None:
    """How the prompt and answer are then encoded and scored: tests/moe/test_batching.py."""
    (example,) = to_examples(qa_records(1), Template(), lambda t: t[-1])
    assert example.prompt.endswith("\nAnswer:") and example.target.startswith(" ")


@pytest.mark.parametrize(
    ("template", "prompt"),
    [
        ("Question: {question}\nAnswer: {answer}", "Question: Q?\nAnswer:"),
        ("Problem: {question}\nSolution:\n{answer}", "Problem: Q?\nSolution:\n"),
    ],
)
def test_template_flag(template: str, prompt: str) -> None:
    assert Template(template).prompt("Q?") == prompt


@pytest.mark.parametrize("bad", ["{answer} {question}", "Question: {question}", "{question} {answer} tail"])
def test_bad_templates_are_refused(bad: str) -> None:
    with pytest.raises(DataFormatError):
        Template(bad).split("q")


def test_bad_jsonl_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "ok"}\n{"foo": 1}\n')
    with pytest.raises(DataFormatError, match="d.jsonl:2"):
        read_records(path)


def test_heldout_split_is_seeded_and_disjoint() -> None:
    items = list(range(50))
    a = split_heldout(items, 0.2, 100, seed=3)
    assert a == split_heldout(items, 0.2, 100, seed=3)
    assert len(a[1]) == 10 and not set(a[0]) & set(a[1])


# --- stage 1 ----------------------------------------------------------------------------------------------


def test_gradients_reach_the_adapter_through_the_pinned_route(model, tokenizer) -> None:
    config = TrainConfig(name="code", **FAST)
    expert = trainable_expert(config, model.hidden_size, model.num_layers, model.device)
    expert.up.data.normal_(0, 0.1)
    (batch,) = batches(tokenizer, [Example("", t) for t in code_texts(4)], 4, 32)
    out = forward(model, batch, [RoutingSpec("pin", "code")] * 4, reference_set(model, (expert,)))
    nll, count = token_nll(out.logits, batch)
    (nll.sum() / count.sum()).backward()
    assert expert.down.grad is not None and expert.down.grad.abs().sum() > 0
    assert expert.up.grad is not None and expert.up.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.backbone.parameters())


def test_stage_one_keeps_the_best_step_not_the_last(model, tokenizer) -> None:
    config = TrainConfig(name="code", **{**FAST, "steps": 6, "lr": 0.5})  # a rate that overshoots
    expert = trainable_expert(config, model.hidden_size, model.num_layers, model.device)
    train = [Example("", t) for t in code_texts(24)]
    held = [Example("", t) for t in code_texts(4, seed=9)]
    result = train_adapter(model, tokenizer, expert, train, held, config)
    losses = [h["heldout_loss"] for h in result.history]
    assert result.best_metric["heldout_loss"] == min(losses)
    held_batches = batches(tokenizer, held, 32, 32)
    now = heldout_loss(model, reference_set(model, (expert,)), RoutingSpec("pin", "code"), held_batches)
    assert now == pytest.approx(min(losses), rel=1e-5)


# --- the gate ---------------------------------------------------------------------------------------------


def test_cap_threshold_lets_at_most_the_cap_through() -> None:
    scores = torch.linspace(-1, 1, 2001)
    for cap in (0.0, 1e-3, 0.01, 0.5):
        t = cap_threshold(scores, cap)
        assert int((scores > t).sum()) <= int(cap * len(scores))
    assert offset_ceiling(scores, cap_threshold(scores, 1e-3), 1e-3) == 0.0
    assert offset_ceiling(scores, 1.5, 1e-3) == pytest.approx(1.5 - cap_threshold(scores, 1e-3))


def _train(model, tokenizer, seed: int = 0, rule: str = "cap"):
    config = TrainConfig(name="code", seed=seed, threshold_rule=rule, **FAST)
    domain = [Example("", t) for t in code_texts(40)]
    calibration = [Example("", t) for t in general_texts(40)]
    other_domain = to_examples(qa_records(10), Template(), lambda t: None)
    return train_expert(
        model,
        tokenizer,
        config,
        domain[:32],
        domain[32:],
        calibration[:32],
        calibration[32:],
        negatives=other_domain,
        provenance={"test": True},
    )


@pytest.mark.parametrize("rule", ["cap", "max"])
def test_trained_gate_respects_the_false_positive_cap(model, tokenizer, rule: str) -> None:
    expert = _train(model, tokenizer, rule=rule)
    gate = expert.metadata["evals"]["gate"]
    assert all(f <= 1e-3 for f in gate["false_positive_per_layer"])
    assert torch.isfinite(expert.thresholds).all() and (expert.thresholds < 2).all()
    assert torch.allclose(expert.keys.norm(dim=-1), torch.ones(len(expert.layers)), atol=1e-5)
    assert (expert.offsets <= torch.tensor(gate["offset_ceiling"]) + 1e-7).all()
    assert expert.down.requires_grad is False and expert.up.abs().sum() > 0  # adapter trained, then frozen


def test_same_seed_same_expert(model, tokenizer) -> None:
    a, b = _train(model, tokenizer, seed=5), _train(model, tokenizer, seed=5)
    for name, tensor in a.tensors().items():
        assert torch.equal(tensor, b.tensors()[name]), name


# --- the CLI and the file ---------------------------------------------------------------------------------


def test_train_expert_cli_writes_a_loadable_file(tiny_model_dir: Path, tmp_path: Path) -> None:
    from experts.cli import main
    from moe import load_backbone

    data = write_jsonl(tmp_path / "math.jsonl", qa_records(30))
    negatives = write_jsonl(tmp_path / "general.jsonl", [{"text": t} for t in general_texts(30)])
    out = tmp_path / "math.safetensors"
    code = main(
        [
            "train-expert",
            "--model",
            str(tiny_model_dir),
            "--data",
            str(data),
            "--name",
            "math",
            "--out",
            str(out),
            "--calibration",
            str(negatives),
            "--steps",
            "2",
            "--eval-every",
            "1",
            "--eval-examples",
            "3",
            "--max-new-tokens",
            "4",
            "--gate-steps",
            "5",
            "--balance-steps",
            "2",
            "--batch-size",
            "4",
            "--max-tokens",
            "48",
            "--seed",
            "1",
            "--description",
            "sums",
        ]
    )
    assert code == 0
    backbone, _ = load_backbone(tiny_model_dir, device="cpu")
    expert = ExpertFile.load(out, RoutedModel(backbone).fingerprint)
    assert expert.name == "math" and expert.description == "sums" and len(expert.examples) == 3
    assert expert.metadata["provenance"]["seed"] == 1 and expert.metadata["provenance"]["train_records"] == 27
    stage1 = expert.metadata["evals"]["stage1"]
    assert "heldout_accuracy" in stage1["best"] and [h["step"] for h in stage1["history"]] == [0, 1, 2]
    assert set(expert.metadata["evals"]["routing"]) == {"domain_to_expert", "negatives_to_base"}
    assert out.stat().st_size < 1_000_000


def test_load_examples_reads_text_files_line_by_line(tmp_path: Path) -> None:
    path = tmp_path / "cal.txt"
    path.write_text("one line\n\ntwo line\n")
    assert [e.target for e in load_examples(path)] == ["one line", "two line"]


def test_default_calibration_is_found_beside_the_model_or_shipped(tmp_path: Path) -> None:
    from experts.cli import default_calibration

    assert default_calibration(tmp_path / "model").name == "calibration.txt"  # the copy shipped in moe/
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "calibration_general.txt").write_text("general text\n")
    assert default_calibration(tmp_path / "model") == tmp_path / "data" / "calibration_general.txt"
