"""A real evaluation client against a real server: lm-evaluation-harness' `local-completions` model runs a small
loglikelihood task (shipped in lm_eval_tasks/, offline) against `python -m server` serving the demo model and
its experts, and every per-choice loglikelihood it logs equals a direct forward of the same routed model.

lm-eval sends what evaluation harnesses send: token-id prompts, `echo: true`, `max_tokens: 1`, `logprobs: 1`,
`temperature: 0`, and reads `logprobs.token_logprobs` / `top_logprobs` of the prompt's continuation."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from moe import ExpertFile, RoutedModel, load_backbone
from moe.admission.router_fit import ContextRouterFitter
from server.settings import DEMO_EXPERTS_DIR, DEMO_MODEL_DIR, DEMO_MODEL_NAME
from tests.server.conftest import LiveServer

TASKS = Path(__file__).parent / "lm_eval_tasks"

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("lm_eval") is None, reason='needs lm-eval (pip install -e ".[dev]")'
)


@torch.no_grad()
def _direct_loglikelihood(model: RoutedModel, tokenizer, context: str, continuation: str) -> tuple[float, bool]:
    """lm-eval's pair encoding (whole = context + continuation, the continuation is what follows the
    context's tokens; BOS first), scored by one forward of the routed model in token mode."""
    whole = tokenizer(context + continuation, add_special_tokens=False).input_ids
    context_ids = tokenizer(context, add_special_tokens=False).input_ids
    continuation_ids = whole[len(context_ids) :]
    ids = [tokenizer.bos_token_id, *context_ids, *continuation_ids]
    logprobs = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)  # [T, V]
    start = len(ids) - len(continuation_ids)
    rows = logprobs[start - 1 : len(ids) - 1]  # row j predicts continuation_ids[j]
    target = torch.tensor(continuation_ids)
    total = float(rows.gather(1, target[:, None]).sum())
    return total, bool((rows.argmax(dim=-1) == target).all())


def test_lm_eval_local_completions_scores_like_a_direct_forward(tmp_path: Path) -> None:
    server = LiveServer(DEMO_MODEL_DIR, tmp_path / "experts")
    model_args = ",".join(
        [
            f"base_url={server.url}/v1/completions",
            f"model={DEMO_MODEL_NAME}",
            "tokenizer_backend=huggingface",
            f"tokenizer={DEMO_MODEL_DIR}",
            "tokenized_requests=True",
            "add_bos_token=True",
            "max_length=512",
        ]
    )
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "HF_HOME": str(tmp_path / "hf"),
    }
    command = [sys.executable, "-m", "lm_eval", "--model", "local-completions", "--model_args", model_args]
    command += ["--tasks", "plugmoe_tiny", "--include_path", str(TASKS), "--output_path", str(tmp_path / "out")]
    command += ["--log_samples"]
    try:
        run = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    finally:
        server.stop()
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-5000:]

    results = json.loads(next((tmp_path / "out").rglob("results_*.json")).read_text())["results"]["plugmoe_tiny"]
    assert results["sample_len"] == 12 and 0.0 <= results["acc,none"] <= 1.0
    samples = [json.loads(line) for line in next((tmp_path / "out").rglob("samples_plugmoe_tiny_*.jsonl")).open()]
    assert len(samples) == 12

    backbone, _ = load_backbone(DEMO_MODEL_DIR, device="cpu")
    model = RoutedModel(backbone)
    experts = [ExpertFile.load(path, model.fingerprint) for path in sorted(DEMO_EXPERTS_DIR.glob("*.safetensors"))]
    for expert in experts:  # what the server plugged on first start
        model.plug(expert)
    tokenizer = AutoTokenizer.from_pretrained(DEMO_MODEL_DIR)
    # and the router it serves them with (--router context, the default): the same deterministic fit
    assert ContextRouterFitter(model, tokenizer).offer(experts) is not None
    worst = 0.0
    for sample in samples:
        for args, (loglikelihood, greedy) in zip(sample["arguments"].values(), sample["filtered_resps"], strict=True):
            want, want_greedy = _direct_loglikelihood(model, tokenizer, args["arg_0"], args["arg_1"])
            worst = max(worst, abs(float(loglikelihood) - want))
            assert str(want_greedy) == str(greedy)
    print(f"lm-eval vs direct forward: max |difference| = {worst:.2e} over {12 * 4} loglikelihoods")
    assert worst < 1e-4, worst
