"""Tests for the demo corpus generator and the shipped demo backbone (CPU, fast)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from demo import DATA_DIR, MODEL_DIR
from demo.corpus import (
    DOMAINS,
    CorpusSizes,
    build_corpus,
    check_math_answer,
    extract_final_number,
    write_corpus,
)

SMALL = CorpusSizes(general_train=120, math_train=120, code_train=120, heldout=40, math_problems=40, calibration=20)
STEP = re.compile(r"(\d+) ([-+*]) (\d+) = (\d+)")


@pytest.fixture(scope="module")
def corpus() -> dict[str, list]:
    return build_corpus(seed=0, sizes=SMALL)


def test_deterministic_for_seed(corpus: dict[str, list]) -> None:
    assert build_corpus(seed=0, sizes=SMALL) == corpus
    assert build_corpus(seed=1, sizes=SMALL) != corpus


def test_record_keys_and_sizes(corpus: dict[str, list]) -> None:
    for domain in DOMAINS:
        keys = {"question", "answer"} if domain == "math" else {"text"}
        for split in ("train", "heldout"):
            recs = corpus[f"{domain}_{split}"]
            assert len(recs) == getattr(SMALL, f"{domain}_train") if split == "train" else SMALL.heldout
            assert all(set(r) == keys and all(isinstance(v, str) and v for v in r.values()) for r in recs)
    assert all(set(r) == {"question", "answer"} for r in corpus["math_problems"])
    calib = corpus["calibration_general"]
    assert len(calib) == SMALL.calibration and all("\n" not in line for line in calib)


def test_splits_are_disjoint(corpus: dict[str, list]) -> None:
    for domain in DOMAINS:
        key = "question" if domain == "math" else "text"
        train = {r[key] for r in corpus[f"{domain}_train"]}
        assert not train & {r[key] for r in corpus[f"{domain}_heldout"]}
    math_train = {r["question"] for r in corpus["math_train"] + corpus["math_heldout"]}
    assert not math_train & {r["question"] for r in corpus["math_problems"]}
    assert not {r["text"] for r in corpus["general_train"]} & set(corpus["calibration_general"])


def test_math_answers_are_correct(corpus: dict[str, list]) -> None:
    recs = corpus["math_train"] + corpus["math_heldout"] + corpus["math_problems"]
    for rec in recs:
        lines = rec["answer"].splitlines()
        assert re.fullmatch(r"#### \d+", lines[-1]), rec
        last = None
        for line in lines[:-1]:
            m = STEP.search(line)
            if m:
                a, op, b, r = int(m[1]), m[2], int(m[3]), int(m[4])
                assert r == {"+": a + b, "-": a - b, "*": a * b}[op], rec
                last = r
        assert last is not None and int(lines[-1][5:]) == last, rec
        assert extract_final_number(rec["answer"]) == last
        assert check_math_answer(rec["answer"])
    assert not check_math_answer("2 + 2 = 5\n#### 5")
    assert not check_math_answer("2 + 2 = 4\n#### 5")


def test_general_and_code_look_different(corpus: dict[str, list]) -> None:
    general = " ".join(r["text"] for r in corpus["general_train"])
    code = " ".join(r["text"] for r in corpus["code_train"])
    assert "def " not in general and "return" not in general
    assert code.count("def ") + code.count("# ") > len(corpus["code_train"]) // 2


def test_shipped_data_matches_generator(tmp_path: Path) -> None:
    if not (DATA_DIR / "general_train.jsonl").exists():
        pytest.skip("demo/data not generated")
    written = write_corpus(tmp_path, seed=0)
    for name, path in written.items():
        assert path.read_bytes() == (DATA_DIR / path.name).read_bytes(), name


@pytest.mark.skipif(not (MODEL_DIR / "model.safetensors").exists(), reason="demo/model not built")
def test_shipped_model_loads_offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    torch = pytest.importorskip("torch")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(MODEL_DIR)
    assert tok.eos_token == tok.pad_token == tok.bos_token == "<|endoftext|>"
    text = 'Mia has 12 apples.\ndef add(a, b):\n    """Sum."""\n    return a + b  # café'
    ids = tok(text)["input_ids"]
    assert ids[0] == tok.eos_token_id
    assert tok.decode(ids, skip_special_tokens=True) == text
    chat = tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True)
    assert chat.endswith("User: Hi\nAssistant:")

    model = AutoModelForCausalLM.from_pretrained(MODEL_DIR)
    assert model.config.vocab_size == len(tok)
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits
    assert logits.shape == (1, len(ids), len(tok)) and torch.isfinite(logits).all()
    cfg = json.loads((MODEL_DIR / "generation_config.json").read_text())
    assert cfg["eos_token_id"] == tok.eos_token_id
