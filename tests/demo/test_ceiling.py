"""demo.ceiling: fine-tuning the whole backbone on a domain lowers its held-out loss, and leaves no expert in the
model's plugged set (it trains the backbone itself, routing off)."""

from __future__ import annotations

from demo.ceiling import fine_tune_whole_backbone
from experts.config import TrainConfig
from experts.data import Example
from moe import RoutedModel
from tests.tiny import _TEXT, tiny_backbone, tiny_tokenizer


def test_fine_tuning_the_whole_backbone_lowers_the_heldout_loss() -> None:
    tokenizer = tiny_tokenizer()
    model = RoutedModel(tiny_backbone("llama", seed=2, vocab=len(tokenizer)))
    code = [Example("", text) for text in _TEXT if "def " in text or "return" in text] * 4
    config = TrainConfig(name="ceiling", steps=30, lr=3e-3, batch_size=4, eval_every=10, warmup_steps=2)
    history = fine_tune_whole_backbone(model, tokenizer, code, code[:1], config)
    assert [step for step, _ in history] == [0, 10, 20, 30]
    assert history[0][1] > history[1][1] > history[2][1] > history[3][1], history
    assert model.plugged.names == ()
