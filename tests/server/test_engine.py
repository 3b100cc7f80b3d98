"""The engine with the new per-request work: rows that score their prompt (prompt logprobs, max_new_tokens 0)
admitted beside plain and grammar-constrained rows in one step, each getting what it gets alone."""

from __future__ import annotations

import re
import threading
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient

from moe import load_backbone
from moe.sampling import SamplingParams
from moe.structured_output import GrammarSpec
from server import engine as engine_module
from server.engine import Engine, _prompt_logit_groups, _Sequence
from server.requests import LENGTH, STOP, Finished, GenerationRequest

PROMPT = [5, 60, 7, 41, 200, 13, 99]


def _run_together(client: TestClient, requests: list[GenerationRequest]) -> list[Finished]:
    """Submit all while the engine is held, so they are admitted in one step."""
    engine: Engine = client.app.state.engine
    gate = threading.Event()
    engine.call(gate.wait)

    async def run() -> list[Finished]:
        handles = engine.submit_all(requests)
        gate.set()
        return [await handle.result() for handle in handles]

    return client.portal.call(run)


def test_scoring_plain_and_constrained_rows_in_one_admission(client: TestClient, tiny_model_dir: Path) -> None:
    model, _ = load_backbone(tiny_model_dir, device="cpu")
    scored = GenerationRequest(PROMPT, 0, SamplingParams(logprobs=2), prompt_logprobs=2)
    plain = GenerationRequest(PROMPT[:4], 5, SamplingParams(min_new_tokens=5, logprobs=0))
    regex = GenerationRequest(PROMPT[:3], 20, grammar=GrammarSpec.regex("(yes|no)!"))
    together = _run_together(client, [scored, plain, regex])
    alone = [_run_together(client, [r])[0] for r in (scored, plain, regex)]

    score, text, constrained = together
    assert score.reason == LENGTH and score.completion_tokens == 0 and score.token_ids == []
    with torch.inference_mode():
        reference = torch.log_softmax(model(torch.tensor([PROMPT])).logits[0].float(), dim=-1)
    assert score.prompt_logprobs[0] is None
    for j in range(1, len(PROMPT)):
        entry = score.prompt_logprobs[j]
        assert entry.token == PROMPT[j] and entry.logprob == pytest.approx(float(reference[j - 1, PROMPT[j]]), abs=1e-4)
        assert [t for t, _ in entry.top] == reference[j - 1].topk(2).indices.tolist()
    assert text.token_ids == alone[1].token_ids and len(text.logprobs) == 5
    assert [e.logprob for e in text.logprobs] == pytest.approx([e.logprob for e in alone[1].logprobs], abs=1e-5)
    assert constrained.reason == STOP and re.fullmatch("(yes|no)!", constrained.text), constrained.text
    assert constrained.text == alone[2].text


def test_prompt_logit_groups_stay_under_the_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(engine_module, "PROMPT_LOGITS_BUDGET", 1000)

    def seq(length: int) -> _Sequence:
        handle = type("Handle", (), {"request": GenerationRequest([1] * length, 0)})()
        return _Sequence(handle, None, None, None)

    lengths = [3, 4, 2, 30, 5, 5]
    groups = _prompt_logit_groups([seq(n) for n in lengths], vocab=50)
    assert [[len(s.request.prompt_ids) for s in g] for g in groups] == [[3, 4, 2], [30], [5, 5]]
    for group in groups:  # [rows, longest, V] under the budget, or a single row
        assert len(group) == 1 or len(group) * max(len(s.request.prompt_ids) for s in group) * 50 <= 1000
