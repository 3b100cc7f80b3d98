"""Evaluation on a tiny random Llama: generation parity, the report's metrics, extractors, the CLI."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from tokenizers import processors

from experts.config import EvalConfig
from experts.data import DataFormatError, Example, get_extractor, gsm8k_answer, last_number
from experts.evaluate import evaluate, render_table, sequence_decisions
from moe import Expert, RoutedModel, RoutingSpec
from moe.adapters.file import ExpertFile
from moe.decode.generation import generate
from moe.decode.sampling import SamplingParams
from tests.tiny import tiny_expert, tiny_tokenizer

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "def add(a, b):\n    return a + b\n",
    "In the morning the weather was cold.",
    "Mia buys bread, milk and 12 eggs.",
]


def open_expert(name: str, hidden: int, layers: int, seed: int, threshold: float = -2.0) -> Expert:
    """An expert that changes outputs (up != 0) and, with threshold -2, wins every token it is offered."""
    return tiny_expert(name, seed=seed, hidden=hidden, layers=range(layers), threshold=threshold)


@pytest.mark.parametrize(
    ("text", "gsm8k", "last"),
    [
        ("so 3 + 4 = 7.\n#### 7", "7", "7"),
        ("#### 1,234.0 then 5", "1234", "5"),
        ("no answer", None, None),
        ("#### -3", "-3", "-3"),
    ],
)
def test_extractors(text: str, gsm8k: str | None, last: str | None) -> None:
    assert gsm8k_answer(text) == gsm8k and last_number(text) == last


def test_extractor_is_pluggable() -> None:
    assert get_extractor("gsm8k") is gsm8k_answer
    assert get_extractor("experts.data:last_number") is last_number
    with pytest.raises(DataFormatError):
        get_extractor("nope")


def test_greedy_generation_matches_hugging_face(model, tokenizer) -> None:
    prompts = ["The quick brown", "def add(a"]
    ours = generate(model, tokenizer, prompts, RoutingSpec("off"), 8)
    for prompt, out in zip(prompts, ours, strict=True):
        ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
        ref = model.backbone.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=0, eos_token_id=0)
        assert out.text == tokenizer.decode(ref[0, ids.shape[1] :], skip_special_tokens=True)


def test_seeded_sampling_repeats(model, tokenizer) -> None:
    params = [SamplingParams(temperature=0.9, seed=7), SamplingParams(temperature=0.9, seed=8)]
    a = generate(model, tokenizer, ["The quick", "The quick"], RoutingSpec("off"), 10, params)
    b = generate(model, tokenizer, ["The quick", "The quick"], RoutingSpec("off"), 10, params)
    assert [x.text for x in a] == [x.text for x in b]


def test_sequence_decisions_follow_the_gate(model, tokenizer) -> None:
    model.plug(open_expert("code", model.hidden_size, model.num_layers, seed=1))
    assert sequence_decisions(model, tokenizer, TEXTS) == ["code"] * len(TEXTS)
    model.plug(open_expert("code", model.hidden_size, model.num_layers, seed=1, threshold=2.0), replace=True)
    assert sequence_decisions(model, tokenizer, TEXTS) == ["base"] * len(TEXTS)


def test_closed_expert_changes_nothing_and_never_fires(model, tokenizer) -> None:
    model.plug(open_expert("code", model.hidden_size, model.num_layers, seed=1, threshold=2.0))
    domains = {"general": [Example("", t) for t in TEXTS], "code": [Example("", t) for t in TEXTS]}
    report = evaluate(model, tokenizer, domains, EvalConfig(greedy_new_tokens=6))
    general, code = report["domains"]
    assert general["ppl_change"] == {"token": 0.0, "sequence": 0.0}
    assert general["greedy_unchanged"] == {"token": 1.0, "sequence": 1.0}
    assert general["sequence_to_target"] == 1.0 and general["token_to_target"] == 1.0
    assert code["sequence_to_target"] == 0.0 and report["never_fired"] == ["code"]
    assert code["ppl"]["pin:code"] != code["ppl"]["off"]  # pinned, the expert does change the outputs
    assert code["ppl"]["oracle"] <= min(code["ppl"]["off"], code["ppl"]["pin:code"]) + 1e-9


def test_open_expert_routes_and_reports_accuracy(model, tokenizer) -> None:
    model.plug(open_expert("math", model.hidden_size, model.num_layers, seed=2))
    qa = [Example("Question: Tom has 3 apples. How many?\nAnswer:", " 3.\n#### 3", "3")] * 3
    report = evaluate(model, tokenizer, {"math": qa}, EvalConfig(max_new_tokens=4))
    (math_row,) = report["domains"]
    assert math_row["sequence_to_target"] == 1.0 and math_row["token_to_target"] == 1.0
    assert math_row["ppl"]["token"] == pytest.approx(math_row["ppl"]["pin:math"])
    assert set(math_row["accuracy"]) == {"off", "token", "sequence", "pin:math", "oracle"}
    assert math_row["entropy_bits"] == 0.0 and report["never_fired"] == []
    table = render_table(report)
    assert table.count("\n| math |") == 1 and "never fired: none" in table


def test_in_context_perplexity_leaves_out_only_a_text_records_first_token(model) -> None:
    """A text record's first token is predicted from the special prefix alone: ppl_in_context scores the rest,
    equal to the plain loop over each text's later tokens; a QA record has no such token."""
    tokenizer = tiny_tokenizer()  # with a BOS before every text, as the demo's tokenizer has
    bos = tokenizer.bos_token
    tokenizer._tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", special_tokens=[(bos, tokenizer.bos_token_id)]
    )
    assert tokenizer("")["input_ids"] == [tokenizer.bos_token_id]
    model.plug(open_expert("code", model.hidden_size, model.num_layers, seed=1))
    qa = [Example("Question: Tom has 3 apples. How many?\nAnswer:", " 3.\n#### 3", "3")] * 2
    domains = {"general": [Example("", t) for t in TEXTS], "math": qa}
    report = evaluate(model, tokenizer, domains, EvalConfig(behaviour_limit=0, greedy_new_tokens=4))
    general, math_row = report["domains"]
    assert general["blind_tokens"] == len(TEXTS) and math_row["blind_tokens"] == 0
    assert math_row["ppl_in_context"] == {k: math_row["ppl"][k] for k in ("off", "oracle", "token", "sequence")}
    nll = count = 0.0
    for text in TEXTS:  # the backbone alone, every token after the first (and the EOS) scored
        ids = tokenizer(text)["input_ids"] + [tokenizer.eos_token_id]
        prefix = len(tokenizer("")["input_ids"])
        logits = model.backbone(torch.tensor([ids])).logits[0].float()
        losses = torch.nn.functional.cross_entropy(logits[:-1], torch.tensor(ids[1:]), reduction="none")
        nll, count = nll + float(losses[prefix:].sum()), count + len(ids) - 1 - prefix
    assert general["ppl_in_context"]["off"] == pytest.approx(math.exp(nll / count), rel=1e-5)
    assert general["ppl_in_context"]["off"] != pytest.approx(general["ppl"]["off"], rel=1e-6)
    change = general["ppl_change_in_context"]
    assert change["token"] == pytest.approx(general["ppl_in_context"]["token"] / general["ppl_in_context"]["off"] - 1)
    assert "predicted from the special prefix alone" in render_table(report)


def test_eval_cli_prints_a_table_and_writes_json(tiny_model_dir: Path, tmp_path: Path, capsys) -> None:
    from experts.cli import main
    from moe import load_backbone

    backbone, _ = load_backbone(tiny_model_dir, device="cpu")
    fp = RoutedModel(backbone).fingerprint
    experts_dir = tmp_path / "experts"
    ExpertFile.save(open_expert("code", 32, 2, seed=3), experts_dir / "code.safetensors", fp)
    general = tmp_path / "general.jsonl"
    general.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    out = tmp_path / "eval.json"
    assert (
        main(
            [
                "eval",
                "--model",
                str(tiny_model_dir),
                "--experts",
                str(experts_dir),
                "--data",
                f"general={general}",
                f"code={general}",
                "--out",
                str(out),
                "--limit",
                "3",
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "| general | base | 3 |" in printed and "| code | code | 3 |" in printed
    report = json.loads(out.read_text())
    assert [d["domain"] for d in report["domains"]] == ["general", "code"] and report["table"] in printed
