"""Batching text: encode, collate, batches, token_nll against a plain loop, and the MLP inputs the router sees."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from tokenizers import processors

from moe import RoutedModel, RoutingSpec
from moe.model.text_batches import (
    Text,
    batches,
    capture_mlp_inputs,
    collate,
    encode,
    perplexity,
    special_prefix,
    summed_nll,
    texts,
    token_nll,
)
from tests.tiny import EOS, tiny_backbone, tiny_expert, tiny_tokenizer

QA = Text("Question: Tom has 3 apples and buys 4 more. How many?\nAnswer:", " 3 + 4 = 7.\n#### 7")


@pytest.fixture(scope="module")
def tokenizer():
    """The tiny tokenizer: no special prefix."""
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def bos_tokenizer():
    """The tiny tokenizer with a BOS token before every text, as Llama's tokenizers have."""
    tokenizer = tiny_tokenizer()
    tokenizer._tokenizer.post_processor = processors.TemplateProcessing(single=f"{EOS} $A", special_tokens=[(EOS, 0)])
    assert special_prefix(tokenizer) == [0]
    return tokenizer


# --- encode -------------------------------------------------------------------------------------------------


def test_qa_records_score_only_the_answer(tokenizer) -> None:
    example = QA
    ids, scored = encode(tokenizer, example, 512)
    prompt_len = len(tokenizer(example.prompt)["input_ids"])
    assert not any(scored[:prompt_len]) and all(scored[prompt_len:])
    assert ids[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(ids[prompt_len:-1]) == example.target


def test_text_records_score_every_token_but_the_prefix(tokenizer) -> None:
    ids, scored = encode(tokenizer, Text("", "def f(x):\n    return x\n"), 512)
    assert all(scored[1:]) and len(scored) == len(ids)  # token 0 is never predicted, whatever its flag
    assert ids[-1] == tokenizer.eos_token_id


def test_encode_with_a_special_prefix(bos_tokenizer) -> None:
    body = bos_tokenizer("def f(x):", add_special_tokens=False)["input_ids"]
    ids, scored = encode(bos_tokenizer, Text("", "def f(x):"), 512)
    assert ids == [0, *body, bos_tokenizer.eos_token_id]
    assert scored == [False] + [True] * (len(body) + 1), "the prefix is context; the text and EOS are targets"
    prompt = bos_tokenizer("Q:", add_special_tokens=False)["input_ids"]
    ids, scored = encode(bos_tokenizer, Text("Q:", " 7"), 512, eos=False)
    assert ids == [0, *prompt, *bos_tokenizer(" 7", add_special_tokens=False)["input_ids"]]
    assert scored == [False] * (1 + len(prompt)) + [True] * (len(ids) - 1 - len(prompt))


def test_encode_truncates_and_eos_is_optional(tokenizer) -> None:
    full, flags = encode(tokenizer, QA, 512)
    assert encode(tokenizer, QA, 5) == (full[:5], flags[:5])
    without, _ = encode(tokenizer, QA, 512, eos=False)
    assert without == full[:-1]


# --- collate and batches ------------------------------------------------------------------------------------


def test_collate_right_pads_and_counts_the_prefix() -> None:
    encoded = [([1, 2, 3], [False, True, True]), ([4], [False]), ([5, 6], [True, True])]
    batch = collate(encoded, pad_id=9, prefix=2)
    assert batch.ids.tolist() == [[1, 2, 3], [4, 9, 9], [5, 6, 9]]
    assert batch.mask.tolist() == [[1, 1, 1], [1, 0, 0], [1, 1, 0]]
    assert batch.scored.tolist() == [[False, True, True], [False, False, False], [True, True, False]]
    assert batch.prefix.tolist() == [2, 1, 2], "never more prefix than the row has tokens"
    assert batch.targets.tolist() == [[True, True], [False, False], [True, False]]
    assert len(batch) == 3 and collate(encoded, pad_id=9).prefix.tolist() == [0, 0, 0]


def test_batches_keep_order_and_size(bos_tokenizer) -> None:
    strings = ["The quick brown fox", "def add(a, b):", "Mia walks", "In the morning", "0123", "cold"]
    out = batches(bos_tokenizer, texts(strings), batch_size=4, max_tokens=64, eos=False)
    assert [len(b) for b in out] == [4, 2]
    rows = [(batch, row) for batch in out for row in range(len(batch))]
    for string, (batch, row) in zip(strings, rows, strict=True):
        ids, scored = encode(bos_tokenizer, Text("", string), 64, eos=False)
        assert batch.ids[row, : len(ids)].tolist() == ids and batch.scored[row, : len(ids)].tolist() == scored
        assert int(batch.mask[row].sum()) == len(ids) and int(batch.prefix[row]) == 1


# --- token_nll ----------------------------------------------------------------------------------------------


def test_token_nll_equals_a_plain_per_row_loop() -> None:
    g = torch.Generator().manual_seed(0)
    encoded = [
        ([5, 6, 7, 8, 9], [False, False, True, True, True]),
        ([1, 2], [False, True]),
        ([3, 4, 5, 6], [False, True, False, True]),
        ([7], [True]),  # one token: nothing to predict
    ]
    batch = collate(encoded, pad_id=0)
    logits = torch.randn(len(encoded), batch.ids.shape[1], 11, generator=g)
    nll, count = token_nll(logits, batch)
    for row, (ids, scored) in enumerate(encoded):
        want, n = 0.0, 0
        for t in range(1, len(ids)):  # token t is predicted at position t - 1
            if scored[t]:
                want -= float(F.log_softmax(logits[row, t - 1], dim=-1)[ids[t]])
                n += 1
        assert float(nll[row]) == pytest.approx(want, abs=1e-5) and int(count[row]) == n


def test_summed_nll_and_perplexity_over_batches() -> None:
    g = torch.Generator().manual_seed(1)
    batches_ = [
        collate([([5, 6, 7], [False, True, True]), ([1, 2], [True, True])], 0),
        collate([([3, 4], [False, True])], 0),
    ]
    logits = {id(b): torch.randn(len(b), b.ids.shape[1], 11, generator=g) for b in batches_}
    total, count = summed_nll(batches_, lambda b: logits[id(b)])
    rows = [token_nll(logits[id(b)], b) for b in batches_]
    assert count == 4 == sum(int(n.sum()) for _, n in rows)
    assert total == pytest.approx(sum(float(nll.sum()) for nll, _ in rows))
    assert perplexity(total, count) == pytest.approx(math.exp(total / 4))
    assert perplexity(0.0, 0) == 1.0, "no token scored"


# --- capture_mlp_inputs -------------------------------------------------------------------------------------

ITEMS = [*texts(["The quick brown fox", "def add(a, b):", "Mia walks to the market"]), QA]


def alone(model: RoutedModel, tokenizer, item: Text, spec: RoutingSpec) -> list[torch.Tensor]:
    """Per layer, the MLP inputs of one item's tokens run by itself: prefix + prompt + target, no EOS."""
    ids = tokenizer(item.prompt)["input_ids"] + tokenizer(item.target, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        out = model(torch.tensor([ids]), routing=[spec], capture_mlp_inputs=True)
    return [x[0] for x in out.mlp_inputs]


@pytest.fixture(scope="module")
def model(bos_tokenizer) -> RoutedModel:
    model = RoutedModel(tiny_backbone("llama", vocab=len(bos_tokenizer)))
    model.plug(tiny_expert("open", threshold=-2.0))  # changes layer 1's inputs wherever it runs
    return model


@pytest.mark.parametrize("spec", [RoutingSpec("off"), RoutingSpec("pin", "open")], ids=["off", "pin"])
@pytest.mark.parametrize("domain", [False, True])
def test_capture_mlp_inputs_equals_each_item_alone(model, bos_tokenizer, spec: RoutingSpec, domain: bool) -> None:
    """The first-token rule: the special prefix is captured, except for a domain's own positives; no EOS."""
    captured = capture_mlp_inputs(model, bos_tokenizer, ITEMS, spec, batch_size=3, domain=domain)
    per_item = [alone(model, bos_tokenizer, item, spec) for item in ITEMS]
    skip = 1 if domain else 0  # the BOS
    for layer in range(model.num_layers):
        want = torch.cat([inputs[layer][skip:] for inputs in per_item])
        assert captured[layer].shape == want.shape and captured[layer].dtype == torch.float32
        torch.testing.assert_close(captured[layer], want, atol=1e-5, rtol=1e-4)
    pinned = capture_mlp_inputs(model, bos_tokenizer, ITEMS, RoutingSpec("pin", "open"), domain=domain)
    off = capture_mlp_inputs(model, bos_tokenizer, ITEMS, RoutingSpec("off"), domain=domain)
    assert torch.equal(pinned[0], off[0]) and not torch.allclose(pinned[1], off[1]), "inputs flow under the spec"


def test_capture_mlp_inputs_without_a_special_prefix_keeps_every_token(tokenizer) -> None:
    model = RoutedModel(tiny_backbone("llama", vocab=len(tokenizer)))
    lengths = [len(tokenizer(item.prompt)["input_ids"] + tokenizer(item.target)["input_ids"]) for item in ITEMS]
    for domain in (False, True):
        captured = capture_mlp_inputs(model, tokenizer, ITEMS, RoutingSpec("off"), domain=domain)
        assert [x.shape[0] for x in captured] == [sum(lengths)] * model.num_layers


@pytest.mark.parametrize("limit", [1, 7, 12, 1000])
def test_capture_mlp_inputs_stops_at_the_limit(model, bos_tokenizer, limit: int) -> None:
    everything = capture_mlp_inputs(model, bos_tokenizer, ITEMS, RoutingSpec("off"))
    limited = capture_mlp_inputs(model, bos_tokenizer, ITEMS, RoutingSpec("off"), limit=limit, batch_size=1)
    for layer in range(model.num_layers):
        assert limited[layer].shape[0] == min(limit, everything[layer].shape[0])
        torch.testing.assert_close(limited[layer], everything[layer][:limit], atol=1e-5, rtol=1e-4)
