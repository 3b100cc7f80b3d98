"""Every OpenAI parameter through the official `openai` client against a real server: each supported one has
its documented effect (checked against a direct forward of the same model, or against its definition), each
refused one is a 400 naming it, and the README's parameter table says exactly what these tests cover."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path

import httpx
import openai
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, RepetitionPenaltyLogitsProcessor

from server.openai_params import PARAMS
from tests.server.conftest import REPO, LiveServer

EOS = 0  # the tiny tokenizer's <|endoftext|>


@pytest.fixture(scope="module")
def client(live_server: LiveServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{live_server.url}/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def reference(tiny_model_dir: Path):
    """The server's model and tokenizer, loaded here for direct forwards."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    return model, AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="module")
def model_name(client: openai.OpenAI) -> str:
    return client.models.list().data[0].id


PROMPT = [5, 60, 7, 41, 200, 13, 99]  # token ids: taken as they are


@torch.no_grad()
def _logprobs(model, ids: list[int]) -> torch.Tensor:
    """[len(ids), V]: row j is log p(next | ids[: j + 1])."""
    return torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)


@torch.no_grad()
def _greedy(
    model, ids: list[int], steps: int, process: Callable[[torch.Tensor, list[int]], torch.Tensor] | None = None
):
    """The plain reference loop: full forward, optional logits processing, argmax; stops at EOS."""
    generated: list[int] = []
    for _ in range(steps):
        logits = model(torch.tensor([ids + generated])).logits[0, -1].float()
        if process is not None:
            logits = process(logits, generated)
        generated.append(int(logits.argmax()))
        if generated[-1] == EOS:
            break
    return generated


def _text(tokenizer, ids: list[int]) -> str:
    return tokenizer.decode([t for t in ids if t != EOS], skip_special_tokens=True)


def _chat_ids(tokenizer, content: str) -> list[int]:
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False
    )
    return tokenizer.encode(prompt, add_special_tokens=False)


# --- logprobs, top_logprobs, echo --------------------------------------------------------------------


def test_completion_logprobs_equal_a_direct_forward(client, model_name, reference) -> None:
    model, tokenizer = reference
    out = client.completions.create(model=model_name, prompt=PROMPT, max_tokens=6, temperature=0, logprobs=3)
    lp = out.choices[0].logprobs
    generated = _greedy(model, PROMPT, 6)
    assert lp.tokens == [tokenizer.decode([t]) for t in generated]
    full = _logprobs(model, PROMPT + generated)
    for j, token in enumerate(generated):
        row = full[len(PROMPT) - 1 + j]
        assert lp.token_logprobs[j] == pytest.approx(float(row[token]), abs=1e-4)
        values, ids = row.topk(3)
        want = {tokenizer.decode([token]): float(row[token])}  # the chosen token, then the top 3 (vLLM's order)
        for t, v in zip(ids.tolist(), values.tolist(), strict=True):
            want.setdefault(tokenizer.decode([t]), v)
        assert lp.top_logprobs[j] == pytest.approx(want, abs=1e-4)
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:j]) for j in range(len(lp.tokens))]

    streamed = client.completions.create(
        model=model_name, prompt=PROMPT, max_tokens=6, temperature=0, logprobs=3, stream=True
    )
    tokens, values = [], []
    for chunk in streamed:
        if chunk.choices and chunk.choices[0].logprobs is not None:
            tokens += chunk.choices[0].logprobs.tokens
            values += chunk.choices[0].logprobs.token_logprobs
    assert tokens == lp.tokens and values == pytest.approx(lp.token_logprobs, abs=1e-6)


def test_echo_scores_the_prompt_like_a_direct_forward(client, model_name, reference) -> None:
    """lm-eval's loglikelihood request: token-id prompts, echo, max_tokens 0 or 1, logprobs 1."""
    model, tokenizer = reference
    second = [12, 77, 3, 150]
    for max_tokens in (0, 1):
        out = client.completions.create(
            model=model_name, prompt=[PROMPT, second], max_tokens=max_tokens, temperature=0, logprobs=1, echo=True
        )
        assert [c.index for c in out.choices] == [0, 1]
        for choice, ids in zip(out.choices, [PROMPT, second], strict=True):
            lp = choice.logprobs
            assert len(lp.tokens) == len(ids) + max_tokens
            assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
            full = _logprobs(model, ids)
            for j in range(1, len(ids)):
                assert lp.token_logprobs[j] == pytest.approx(float(full[j - 1, ids[j]]), abs=1e-4)
                greedy = tokenizer.decode([int(full[j - 1].argmax())])
                assert greedy in lp.top_logprobs[j]  # lm-eval's is_greedy reads this dict
            assert choice.text.startswith(tokenizer.decode(ids))
        assert out.usage.prompt_tokens == len(PROMPT) + len(second)

    plain = client.completions.create(model=model_name, prompt="The quick", max_tokens=3, temperature=0)
    echoed = client.completions.create(model=model_name, prompt="The quick", max_tokens=3, temperature=0, echo=True)
    assert echoed.choices[0].text == "The quick" + plain.choices[0].text
    chunks = list(
        client.completions.create(
            model=model_name, prompt="The quick", max_tokens=3, temperature=0, echo=True, stream=True
        )
    )
    assert chunks[0].choices[0].text == "The quick"
    assert "".join(c.choices[0].text for c in chunks if c.choices) == echoed.choices[0].text


def test_chat_logprobs_and_top_logprobs(client, model_name, reference) -> None:
    model, tokenizer = reference
    ids = _chat_ids(tokenizer, "hello there")
    out = client.chat.completions.create(
        model=model_name,
        messages=[{"role": "user", "content": "hello there"}],
        max_tokens=5,
        temperature=0,
        logprobs=True,
        top_logprobs=2,
    )
    content = out.choices[0].logprobs.content
    generated = _greedy(model, ids, 5)
    full = _logprobs(model, ids + generated)
    assert [c.token for c in content] == [tokenizer.decode([t]) for t in generated]
    for j, entry in enumerate(content):
        row = full[len(ids) - 1 + j]
        assert entry.logprob == pytest.approx(float(row[generated[j]]), abs=1e-4)
        assert bytes(entry.bytes).decode("utf-8", errors="replace") == entry.token
        values, top = row.topk(2)
        assert [t.token for t in entry.top_logprobs] == [tokenizer.decode([t]) for t in top.tolist()]
        assert [t.logprob for t in entry.top_logprobs] == pytest.approx(values.tolist(), abs=1e-4)

    streamed = client.chat.completions.create(
        model=model_name,
        messages=[{"role": "user", "content": "hello there"}],
        max_tokens=5,
        temperature=0,
        logprobs=True,
        top_logprobs=2,
        stream=True,
    )
    entries = [
        e
        for chunk in streamed
        if chunk.choices and chunk.choices[0].logprobs
        for e in chunk.choices[0].logprobs.content
    ]
    assert [(e.token, e.logprob) for e in entries] == [(e.token, pytest.approx(e.logprob, abs=1e-6)) for e in content]
    without = client.chat.completions.create(
        model=model_name, messages=[{"role": "user", "content": "hello there"}], max_tokens=2, temperature=0
    )
    assert without.choices[0].logprobs is None


def test_generate_returns_logprobs_too(live_server: LiveServer, reference) -> None:
    model, tokenizer = reference
    prompt = tokenizer.decode(PROMPT)
    ids = tokenizer.encode(prompt)
    body = {"prompt": prompt, "max_new_tokens": 4, "min_new_tokens": 4, "logprobs": 2}
    out = httpx.post(f"{live_server.url}/generate", json=body, timeout=60).json()
    generated = [entry["token_id"] for entry in out["logprobs"]]
    full = _logprobs(model, ids + generated)
    for j, entry in enumerate(out["logprobs"]):
        assert entry["logprob"] == pytest.approx(float(full[len(ids) - 1 + j, entry["token_id"]]), abs=1e-4)
        assert [t["token_id"] for t in entry["top_logprobs"]] == full[len(ids) - 1 + j].topk(2).indices.tolist()
    with httpx.stream("POST", f"{live_server.url}/generate", json={**body, "stream": True}, timeout=60) as response:
        events = [line for line in response.iter_lines() if line.startswith("data: ")]
    streamed = [e["token_id"] for line in events[:-1] for e in httpx.Response(200, content=line[6:]).json()["logprobs"]]
    assert streamed == generated


# --- n, several prompts, seed ------------------------------------------------------------------------


def test_n_with_a_seed_gives_different_reproducible_samples(client, model_name) -> None:
    def texts(**kwargs) -> list[str]:
        out = client.completions.create(model=model_name, prompt="The quick", max_tokens=8, temperature=1.0, **kwargs)
        assert [c.index for c in out.choices] == list(range(len(out.choices)))
        return [c.text for c in out.choices]

    three = texts(n=3, seed=7)
    assert len(set(three)) == 3
    assert texts(n=3, seed=7) == three
    assert [texts(seed=7 + i)[0] for i in range(3)] == three  # choice i samples with seed + i
    greedy = client.completions.create(model=model_name, prompt="The quick", max_tokens=8, temperature=0, n=2)
    assert greedy.choices[0].text == greedy.choices[1].text

    streamed: dict[int, str] = {}
    finished = set()
    for chunk in client.completions.create(
        model=model_name, prompt="The quick", max_tokens=8, temperature=1.0, n=3, seed=7, stream=True
    ):
        for choice in chunk.choices:
            streamed[choice.index] = streamed.get(choice.index, "") + choice.text
            if choice.finish_reason:
                finished.add(choice.index)
    assert [streamed[i] for i in range(3)] == three and finished == {0, 1, 2}

    chat = client.chat.completions.create(
        model=model_name, messages=[{"role": "user", "content": "hi"}], max_tokens=6, n=3, seed=3
    )
    assert len({c.message.content for c in chat.choices}) == 3


def test_several_prompts_give_prompt_times_n_choices(client, model_name) -> None:
    out = client.completions.create(
        model=model_name, prompt=["The quick", "Mia walks"], max_tokens=4, temperature=0, n=2
    )
    assert [c.index for c in out.choices] == [0, 1, 2, 3]
    alone = [
        client.completions.create(model=model_name, prompt=p, max_tokens=4, temperature=0).choices[0].text
        for p in ("The quick", "Mia walks")
    ]
    assert [c.text for c in out.choices] == [alone[0], alone[0], alone[1], alone[1]]


# --- penalties, logit_bias, min_tokens, stop_token_ids ----------------------------------------------


def _counts(generated: list[int], vocab: int) -> torch.Tensor:
    return torch.bincount(torch.tensor(generated, dtype=torch.long), minlength=vocab).float()


@pytest.mark.parametrize(
    ("kwargs", "process"),
    [
        ({"frequency_penalty": 1.5}, lambda x, g: x - 1.5 * _counts(g, x.shape[0])),
        ({"presence_penalty": 2.0}, lambda x, g: x - 2.0 * (_counts(g, x.shape[0]) > 0).float()),
        (
            {"presence_penalty": 0.5, "frequency_penalty": 0.7},
            lambda x, g: x - 0.7 * _counts(g, x.shape[0]) - 0.5 * (_counts(g, x.shape[0]) > 0).float(),
        ),
    ],
)
def test_presence_and_frequency_penalties_change_greedy_output_as_defined(
    client, model_name, reference, kwargs, process
) -> None:
    model, tokenizer = reference
    out = client.completions.create(model=model_name, prompt=PROMPT, max_tokens=16, temperature=0, **kwargs)
    want = _greedy(model, PROMPT, 16, process)
    assert out.choices[0].text == _text(tokenizer, want)
    assert want != _greedy(model, PROMPT, 16)  # the penalty did change the greedy output


def test_repetition_penalty_matches_hf_processor(client, model_name, reference) -> None:
    model, tokenizer = reference
    hf = RepetitionPenaltyLogitsProcessor(1.8)

    def process(logits: torch.Tensor, generated: list[int]) -> torch.Tensor:
        return hf(torch.tensor([PROMPT + generated]), logits[None])[0]

    out = client.completions.create(
        model=model_name, prompt=PROMPT, max_tokens=16, temperature=0, extra_body={"repetition_penalty": 1.8}
    )
    want = _greedy(model, PROMPT, 16, process)
    assert out.choices[0].text == _text(tokenizer, want)
    assert want != _greedy(model, PROMPT, 16)


def test_logit_bias_pushes_and_bans_tokens(client, model_name, reference) -> None:
    model, tokenizer = reference
    forced = client.completions.create(
        model=model_name, prompt=PROMPT, max_tokens=4, temperature=0, logit_bias={"77": 100}, logprobs=0
    )
    assert forced.choices[0].logprobs.tokens == [tokenizer.decode([77])] * 4
    first = _greedy(model, PROMPT, 1)[0]
    banned = client.completions.create(
        model=model_name, prompt=PROMPT, max_tokens=1, temperature=0, logit_bias={str(first): -100}
    )
    second_best = int(_logprobs(model, PROMPT)[-1].topk(2).indices[1])
    assert banned.choices[0].text == _text(tokenizer, [second_best])


def test_min_tokens_and_stop_token_ids(client, model_name, reference) -> None:
    model, tokenizer = reference
    eos_first = {"logit_bias": {str(EOS): 100}}
    out = client.completions.create(model=model_name, prompt=PROMPT, max_tokens=10, temperature=0, **eos_first)
    assert out.choices[0].finish_reason == "stop" and out.usage.completion_tokens == 1 and out.choices[0].text == ""
    out = client.completions.create(
        model=model_name, prompt=PROMPT, max_tokens=10, temperature=0, extra_body={"min_tokens": 4}, **eos_first
    )
    assert out.choices[0].finish_reason == "stop" and out.usage.completion_tokens == 5  # 4 blocked, then EOS

    generated = _greedy(model, PROMPT, 6)
    stop_at = generated[2]
    assert stop_at not in generated[:2] and stop_at != EOS
    out = client.completions.create(
        model=model_name, prompt=PROMPT, max_tokens=6, temperature=0, extra_body={"stop_token_ids": [stop_at]}
    )
    assert out.choices[0].finish_reason == "stop"
    assert out.usage.completion_tokens == 3 and out.choices[0].text == _text(tokenizer, generated[:2])
    blocked = client.completions.create(
        model=model_name,
        prompt=PROMPT,
        max_tokens=6,
        temperature=0,
        extra_body={"stop_token_ids": [stop_at], "min_tokens": 6},
    )
    assert blocked.choices[0].finish_reason == "length" and blocked.usage.completion_tokens == 6


def test_top_k_extension_and_stop_and_seed(client, model_name) -> None:
    """top_k through extra_body (k=1 is greedy whatever the temperature); stop strings; seeds reproduce."""
    greedy = client.completions.create(model=model_name, prompt="The quick", max_tokens=8, temperature=0)
    top1 = client.completions.create(
        model=model_name, prompt="The quick", max_tokens=8, temperature=1.5, seed=1, extra_body={"top_k": 1}
    )
    assert top1.choices[0].text == greedy.choices[0].text
    text = greedy.choices[0].text
    cut = text[len(text) // 2 :][:2]
    if cut.strip():
        stopped = client.completions.create(
            model=model_name, prompt="The quick", max_tokens=8, temperature=0, stop=[cut]
        )
        assert stopped.choices[0].text == text[: text.index(cut)] and stopped.choices[0].finish_reason == "stop"
    a, b = (
        client.completions.create(model=model_name, prompt="The quick", max_tokens=8, seed=11, top_p=0.9)
        .choices[0]
        .text
        for _ in range(2)
    )
    assert a == b


# --- stream_options ----------------------------------------------------------------------------------


def test_stream_options_include_usage(client, model_name) -> None:
    chunks = list(
        client.chat.completions.create(
            model=model_name,
            messages=[{"role": "user", "content": "hi"}],
            max_tokens=4,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 4
    assert chunks[-1].usage.total_tokens == chunks[-1].usage.prompt_tokens + 4
    assert all(c.usage is None for c in chunks[:-1]) and chunks[-2].choices[0].finish_reason == "length"
    plain = list(client.completions.create(model=model_name, prompt="hi", max_tokens=4, temperature=0, stream=True))
    assert all(c.usage is None for c in plain) and plain[-1].choices[0].finish_reason == "length"
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=model_name, prompt="hi", max_tokens=4, stream_options={"include_usage": True})
    assert info.value.param == "stream_options"


# --- vLLM's request extensions ------------------------------------------------------------------------


def test_ignore_eos_runs_to_the_length_and_stop_token_ids_still_end(client, model_name) -> None:
    eos_first = {str(EOS): 100}  # EOS is the most likely token at every step
    plain = client.completions.create(
        model=model_name, prompt=PROMPT, max_tokens=8, temperature=0, logit_bias=eos_first
    )
    assert plain.choices[0].finish_reason == "stop" and plain.usage.completion_tokens == 1
    kept = client.completions.create(
        model=model_name,
        prompt=PROMPT,
        max_tokens=8,
        temperature=0,
        logit_bias=eos_first,
        extra_body={"ignore_eos": True},
    )
    assert kept.choices[0].finish_reason == "length" and kept.usage.completion_tokens == 8
    other = {**eos_first, "7": 99}  # token 7 next-most likely: it ends the output as a stop token id
    ended = client.chat.completions.create(
        model=model_name,
        messages=[{"role": "user", "content": "hi"}],
        max_tokens=8,
        temperature=0,
        logit_bias=other,
        extra_body={"ignore_eos": True, "stop_token_ids": [7]},
    )
    assert ended.choices[0].finish_reason == "stop" and ended.usage.completion_tokens == 1


def test_continuous_usage_stats_put_the_usage_on_every_chunk(client, model_name) -> None:
    options = {"include_usage": True, "continuous_usage_stats": True}
    chunks = list(
        client.completions.create(
            model=model_name,
            prompt=PROMPT,
            max_tokens=6,
            temperature=0,
            stream=True,
            stream_options=options,
            extra_body={"ignore_eos": True},
        )
    )
    assert all(c.usage is not None and c.usage.prompt_tokens == len(PROMPT) for c in chunks)
    counts = [c.usage.completion_tokens for c in chunks]
    assert counts == sorted(counts) and counts[-1] == 6 and chunks[-1].choices == []
    assert all(c.usage.total_tokens == len(PROMPT) + c.usage.completion_tokens for c in chunks)
    chat = list(
        client.chat.completions.create(
            model=model_name,
            messages=[{"role": "user", "content": "hi"}],
            max_tokens=3,
            temperature=0,
            stream=True,
            stream_options=options,
            extra_body={"ignore_eos": True},
        )
    )
    assert chat[0].usage.completion_tokens == 0 and chat[-1].usage.completion_tokens == 3
    without_usage = list(  # as in vLLM: continuous_usage_stats only adds to include_usage
        client.completions.create(
            model=model_name, prompt=PROMPT, max_tokens=2, stream=True, stream_options={"continuous_usage_stats": True}
        )
    )
    assert all(c.usage is None for c in without_usage)


def test_detokenisation_options(client, model_name, reference) -> None:
    """skip_special_tokens, include_stop_str_in_output and spaces_between_special_tokens change the text as
    the tokenizer's decode does."""
    model, tokenizer = reference
    eos_first = {str(EOS): 100}

    def text(**extra) -> str:
        out = client.completions.create(
            model=model_name, prompt=PROMPT, max_tokens=4, temperature=0, logit_bias=eos_first, extra_body=extra
        )
        return out.choices[0].text

    assert text() == "" and text(include_stop_str_in_output=True) == ""  # EOS's text is skipped by default
    assert text(include_stop_str_in_output=True, skip_special_tokens=False) == tokenizer.decode([EOS])
    assert text(skip_special_tokens=False) == ""  # the ending EOS is not the output's, unless asked

    generated = _greedy(model, PROMPT, 8)
    reference_text = _text(tokenizer, generated)
    start = next(i for i in range(1, len(reference_text) - 1) if reference_text.find(reference_text[i : i + 2]) == i)
    stop = reference_text[start : start + 2]
    cut = client.completions.create(model=model_name, prompt=PROMPT, max_tokens=8, temperature=0, stop=[stop])
    kept = client.completions.create(
        model=model_name,
        prompt=PROMPT,
        max_tokens=8,
        temperature=0,
        stop=[stop],
        extra_body={"include_stop_str_in_output": True},
    )
    assert cut.choices[0].text == reference_text[:start] and kept.choices[0].text == reference_text[: start + 2]

    forced = {str(EOS): 100}
    spaced = client.completions.create(
        model=model_name,
        prompt=PROMPT,
        max_tokens=3,
        temperature=0,
        logit_bias=forced,
        extra_body={
            "skip_special_tokens": False,
            "spaces_between_special_tokens": False,
            "ignore_eos": False,
            "include_stop_str_in_output": True,
        },
    )
    assert spaced.choices[0].text == tokenizer.decode(
        [EOS], skip_special_tokens=False, spaces_between_special_tokens=False
    )


def test_truncate_prompt_tokens_keeps_the_last_tokens(client, model_name, reference) -> None:
    model, tokenizer = reference
    out = client.completions.create(
        model=model_name, prompt=PROMPT, max_tokens=3, temperature=0, extra_body={"truncate_prompt_tokens": 3}
    )
    assert out.usage.prompt_tokens == 3 and out.choices[0].text == _text(tokenizer, _greedy(model, PROMPT[-3:], 3))
    long_prompt = (PROMPT * 40)[:250]
    fit = client.completions.create(
        model=model_name, prompt=long_prompt, max_tokens=10, extra_body={"truncate_prompt_tokens": -1}
    )
    assert fit.usage.prompt_tokens == 256 - 10  # the tiny model's context is 256 positions
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(
            model=model_name, prompt=PROMPT, max_tokens=2, extra_body={"truncate_prompt_tokens": 0}
        )
    assert info.value.param == "truncate_prompt_tokens"


def test_prompt_logprobs_equal_a_direct_forward(client, model_name, reference) -> None:
    model, _ = reference
    expected = _logprobs(model, PROMPT)
    out = client.completions.create(
        model=model_name, prompt=PROMPT, max_tokens=1, temperature=0, extra_body={"prompt_logprobs": 2}
    )
    entries = out.choices[0].model_extra["prompt_logprobs"]
    assert len(entries) == len(PROMPT) and entries[0] is None
    for j, entry in enumerate(entries[1:], start=1):
        row = expected[j - 1]
        token = entry[str(PROMPT[j])]
        assert token["logprob"] == pytest.approx(float(row[PROMPT[j]]), abs=1e-4)
        assert token["rank"] == int((row > row[PROMPT[j]]).sum()) + 1
        best = row.topk(2).indices.tolist()
        assert {str(t) for t in best} <= set(entry) and len(entry) <= 3
        assert entry[str(best[0])]["rank"] == 1 and isinstance(token["decoded_token"], str)
    chat = client.chat.completions.create(
        model=model_name, messages=[{"role": "user", "content": "hi"}], max_tokens=1, extra_body={"prompt_logprobs": 0}
    )
    scored = chat.model_extra["prompt_logprobs"]
    assert len(scored) == chat.usage.prompt_tokens and scored[0] is None and all(len(e) == 1 for e in scored[1:])
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(
            model=model_name, prompt=PROMPT, max_tokens=1, stream=True, extra_body={"prompt_logprobs": 1}
        )
    assert info.value.param == "prompt_logprobs"


def test_chat_template_options(client, model_name, reference) -> None:
    _, tokenizer = reference
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello the"}]

    def prompt_tokens(**extra) -> int:
        out = client.chat.completions.create(model=model_name, messages=messages, max_tokens=1, extra_body=extra)
        return out.usage.prompt_tokens

    def template(**options) -> int:
        return len(tokenizer.encode(tokenizer.apply_chat_template(messages, tokenize=False, **options)))

    assert prompt_tokens() == template(add_generation_prompt=True)
    assert prompt_tokens(add_generation_prompt=False) == template(add_generation_prompt=False)
    continued = prompt_tokens(add_generation_prompt=False, continue_final_message=True)
    assert continued == template(continue_final_message=True) < template(add_generation_prompt=False)
    assert prompt_tokens(chat_template_kwargs={"enable_thinking": False}) == template(add_generation_prompt=True)
    for extra, param in [
        ({"continue_final_message": True}, "continue_final_message"),  # add_generation_prompt defaults to true
        ({"chat_template_kwargs": {"tokenize": True}}, "chat_template_kwargs.tokenize"),
        ({"chat_template_kwargs": {"messages": []}}, "chat_template_kwargs.messages"),  # the renderer's own
    ]:
        with pytest.raises(openai.BadRequestError) as info:
            prompt_tokens(**extra)
        assert info.value.param == param


# what popular clients send unasked (their request builders, read from their source: GuideLLM 0.8.1's
# openai_http backend with fixed output tokens, lm-eval 0.4's local-completions / local-chat-completions,
# LangChain's ChatOpenAI, the openai client) is honoured, never refused
CLIENT_BODIES: list[tuple[str, str, dict]] = [
    (
        "guidellm completions",
        "completions",
        {
            "prompt": "The quick brown fox",
            "stream": True,
            "stream_options": {"include_usage": True, "continuous_usage_stats": True},
            "max_tokens": 8,
            "stop": None,
            "ignore_eos": True,
        },
    ),
    (
        "guidellm chat",
        "chat/completions",
        {
            "messages": [{"role": "user", "content": [{"type": "text", "text": "The quick brown fox"}]}],
            "stream": True,
            "stream_options": {"include_usage": True, "continuous_usage_stats": True},
            "max_completion_tokens": 8,
            "stop": None,
            "ignore_eos": True,
        },
    ),
    (
        "lm-eval generate",
        "completions",
        {"prompt": "The quick", "max_tokens": 8, "temperature": 0, "stop": ["\n\n"], "seed": 1234},
    ),
    (
        "lm-eval loglikelihood",
        "completions",
        {"prompt": PROMPT, "temperature": 0, "max_tokens": 1, "logprobs": 1, "seed": 1234, "echo": True},
    ),
    (
        "lm-eval chat",
        "chat/completions",
        {
            "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 8,
            "temperature": 0,
            "stop": ["\n\n"],
            "seed": 1234,
        },
    ),
    ("langchain ChatOpenAI", "chat/completions", {"messages": [{"role": "user", "content": "hi"}], "stream": False}),
    (
        "langchain ChatOpenAI stream",
        "chat/completions",
        {
            "messages": [{"role": "user", "content": "hi"}],
            "stream": True,
            "stream_options": {"include_usage": True},
            "max_completion_tokens": 8,
        },
    ),
    ("openai chat", "chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 8}),
]


@pytest.mark.parametrize(("endpoint", "body"), [c[1:] for c in CLIENT_BODIES], ids=[c[0] for c in CLIENT_BODIES])
def test_what_clients_send_by_default_is_honoured(live_server: LiveServer, model_name, endpoint, body) -> None:
    url = f"{live_server.url}/v1/{endpoint}"
    response = httpx.post(url, json={"model": model_name, **body}, timeout=60)
    assert response.status_code == 200, response.text
    if not body.get("stream"):
        assert response.json()["usage"]["completion_tokens"] >= 1
        return
    events = [json.loads(line[6:]) for line in response.text.splitlines() if line.startswith("data: {")]
    usage = events[-1]["usage"]
    if body.get("ignore_eos"):  # fixed output tokens: every chunk counts them, and all of them come
        assert usage["completion_tokens"] == 8 and all(e["usage"] is not None for e in events)


# --- refusals and errors -----------------------------------------------------------------------------

REFUSED: list[tuple[str, str, dict, str]] = [  # (endpoint, param, body extras, param named in the 400)
    ("completions", "best_of", {"best_of": 2}, "best_of"),
    ("completions", "suffix", {"suffix": " end"}, "suffix"),
    ("chat", "tools", {"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]}, "tools"),
    ("chat", "tool_choice", {"tool_choice": "auto"}, "tool_choice"),
    ("chat", "parallel_tool_calls", {"parallel_tool_calls": True}, "parallel_tool_calls"),
    ("chat", "functions", {"functions": [{"name": "f", "parameters": {}}]}, "functions"),
    ("chat", "function_call", {"function_call": "auto"}, "function_call"),
    ("chat", "audio", {"audio": {"voice": "alloy", "format": "wav"}}, "audio"),
    ("chat", "modalities", {"modalities": ["text", "audio"]}, "modalities"),
    ("chat", "prediction", {"prediction": {"type": "content", "content": "x"}}, "prediction"),
    ("chat", "web_search_options", {"web_search_options": {}}, "web_search_options"),
    ("chat", "reasoning_effort", {"reasoning_effort": "low"}, "reasoning_effort"),
    ("chat", "verbosity", {"verbosity": "low"}, "verbosity"),
    ("chat", "store", {"store": True}, "store"),
    ("chat", "service_tier", {"service_tier": "flex"}, "service_tier"),
    ("completions", "unknown", {"frobnicate": 1}, "frobnicate"),
    ("chat", "echo", {"echo": True}, "echo"),  # a completions parameter, unknown to chat
]
NEUTRAL: list[tuple[str, dict]] = [  # values of refused parameters that ask for nothing: accepted
    ("completions", {"best_of": 1, "suffix": ""}),
    ("chat", {"tools": [], "tool_choice": "none", "store": False, "modalities": ["text"], "service_tier": "auto"}),
    ("chat", {"user": "u-1", "metadata": {"k": "v"}, "safety_identifier": "s", "prompt_cache_key": "c"}),
]
MESSAGE_REFUSALS: list[tuple[list[dict], str]] = [
    (
        [
            {
                "role": "user",
                "content": [{"type": "text", "text": "hi"}, {"type": "image_url", "image_url": {"url": "x"}}],
            }
        ],
        "messages[0].content[1]",
    ),
    (
        [{"role": "user", "content": [{"type": "input_audio", "input_audio": {"data": "", "format": "wav"}}]}],
        "messages[0].content[0]",
    ),
    ([{"role": "user", "content": "hi"}, {"role": "tool", "content": "42", "tool_call_id": "c"}], "messages[1].role"),
    (
        [
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [{"id": "c", "type": "function", "function": {"name": "f", "arguments": "{}"}}],
            }
        ],
        "messages[0].tool_calls",
    ),
]


def _create(client: openai.OpenAI, model_name: str, endpoint: str, extra: dict, messages: list | None = None):
    if endpoint == "completions":
        return client.completions.create(model=model_name, prompt="hi", max_tokens=2, extra_body=extra)
    messages = messages or [{"role": "user", "content": "hi"}]
    return client.chat.completions.create(model=model_name, messages=messages, max_tokens=2, extra_body=extra)


@pytest.mark.parametrize(("endpoint", "name", "extra", "param"), REFUSED, ids=[r[1] for r in REFUSED])
def test_refused_parameters_are_400_naming_them(client, model_name, endpoint, name, extra, param) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        _create(client, model_name, endpoint, extra)
    assert info.value.status_code == 400 and info.value.param == param
    assert param in info.value.message


@pytest.mark.parametrize(("endpoint", "extra"), NEUTRAL)
def test_neutral_values_and_harmless_parameters_are_accepted(client, model_name, endpoint, extra) -> None:
    assert _create(client, model_name, endpoint, extra).choices


@pytest.mark.parametrize(("messages", "param"), MESSAGE_REFUSALS, ids=[m[1] for m in MESSAGE_REFUSALS])
def test_refused_message_parts_are_400_naming_them(client, model_name, messages, param) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        _create(client, model_name, "chat", {}, messages)
    assert info.value.param == param


@pytest.mark.parametrize(
    ("endpoint", "extra", "param"),
    [
        ("completions", {"temperature": 5}, "temperature"),
        ("completions", {"n": 0}, "n"),
        ("completions", {"n": 9}, "n"),  # over --max-n
        ("completions", {"logprobs": 21}, "logprobs"),  # over --max-logprobs
        ("chat", {"top_logprobs": 2}, "top_logprobs"),  # without logprobs: true
        ("completions", {"presence_penalty": 3}, "presence_penalty"),
        ("completions", {"logit_bias": {"x": 1}}, "logit_bias"),
        ("completions", {"logit_bias": {"1": 150}}, "logit_bias"),
        ("completions", {"logit_bias": {"99999": 1}}, "logit_bias"),
        ("completions", {"stop_token_ids": [99999]}, "stop_token_ids"),
        ("completions", {"echo": True, "logprobs": 1, "stream": True}, "echo"),
        ("completions", {"max_tokens": 0}, "max_tokens"),  # 0 only with echo
        ("completions", {"response_format": {"type": "xml"}}, "response_format.type"),
        (
            "chat",
            {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {}, "strict": 0}}},
            "response_format.json_schema.strict",
        ),
        ("completions", {"stream_options": {"include_usage": "yes"}}, "stream_options.include_usage"),
        ("completions", {"repetition_penalty": 5e-324}, "repetition_penalty"),
        ("completions", {"routing": {"mode": "banana"}}, "routing.mode"),
    ],
)
def test_invalid_values_are_openai_error_objects_with_param(client, model_name, endpoint, extra, param) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        _create(client, model_name, endpoint, extra)
    assert info.value.param == param and info.value.code == "400"


def test_token_caps_are_400s_that_state_the_cap(client, model_name, live_server: LiveServer) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=model_name, prompt="hi", max_tokens=600)
    assert info.value.param == "max_tokens" and "512" in info.value.message
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(
            model=model_name, messages=[{"role": "user", "content": "hi"}], max_completion_tokens=513
        )
    assert info.value.param == "max_completion_tokens" and "512" in info.value.message
    with pytest.raises(openai.BadRequestError) as info:  # the tiny model's context is 256 positions
        client.completions.create(model=model_name, prompt=PROMPT, max_tokens=250)
    assert info.value.param == "max_tokens" and f"at most {256 - len(PROMPT)}" in info.value.message
    response = httpx.post(f"{live_server.url}/generate", json={"prompt": "hi", "max_new_tokens": 600}, timeout=30)
    assert response.status_code == 400 and response.json()["error"]["param"] == "max_new_tokens"
    assert "512" in response.json()["error"]["message"]


# --- the README's table ------------------------------------------------------------------------------

TESTED_SUPPORTED = {  # supported and extension parameters -> the test that asserts their effect
    "model": "tests/server/test_live.py::test_openai_client",
    "prompt": "test_several_prompts_give_prompt_times_n_choices",
    "messages": "test_chat_logprobs_and_top_logprobs",
    "max_tokens": "test_token_caps_are_400s_that_state_the_cap",
    "max_completion_tokens": "test_token_caps_are_400s_that_state_the_cap",
    "temperature": "test_top_k_extension_and_stop_and_seed",
    "top_p": "test_top_k_extension_and_stop_and_seed",
    "n": "test_n_with_a_seed_gives_different_reproducible_samples",
    "stream": "test_n_with_a_seed_gives_different_reproducible_samples",
    "stream_options": "test_stream_options_include_usage",
    "stop": "test_top_k_extension_and_stop_and_seed",
    "seed": "test_n_with_a_seed_gives_different_reproducible_samples",
    "logprobs": "test_completion_logprobs_equal_a_direct_forward",
    "top_logprobs": "test_chat_logprobs_and_top_logprobs",
    "echo": "test_echo_scores_the_prompt_like_a_direct_forward",
    "presence_penalty": "test_presence_and_frequency_penalties_change_greedy_output_as_defined",
    "frequency_penalty": "test_presence_and_frequency_penalties_change_greedy_output_as_defined",
    "logit_bias": "test_logit_bias_pushes_and_bans_tokens",
    "response_format": "tests/server/test_structured_output.py",
    "routing": "tests/server/test_generate.py",
    "top_k": "test_top_k_extension_and_stop_and_seed",
    "min_tokens": "test_min_tokens_and_stop_token_ids",
    "repetition_penalty": "test_repetition_penalty_matches_hf_processor",
    "stop_token_ids": "test_min_tokens_and_stop_token_ids",
    "guided_regex": "tests/server/test_structured_output.py",
    "ignore_eos": "test_ignore_eos_runs_to_the_length_and_stop_token_ids_still_end",
    "skip_special_tokens": "test_detokenisation_options",
    "spaces_between_special_tokens": "test_detokenisation_options",
    "include_stop_str_in_output": "test_detokenisation_options",
    "truncate_prompt_tokens": "test_truncate_prompt_tokens_keeps_the_last_tokens",
    "prompt_logprobs": "test_prompt_logprobs_equal_a_direct_forward",
    "add_generation_prompt": "test_chat_template_options",
    "continue_final_message": "test_chat_template_options",
    "chat_template_kwargs": "tests/server/test_prompts.py",
}


def _readme_table() -> dict[str, str]:
    """parameter -> status, from the README's table of OpenAI parameters."""
    text = (REPO / "README.md").read_text()
    section = text[text.index("### OpenAI parameters") :]
    rows = {}
    for match in re.finditer(
        r"^\| `([a-z_]+)` \| ([a-z, ]+) \| (supported|extension|accepted|refused) \|", section, re.M
    ):
        rows[match.group(1)] = match.group(3)
    return rows


def test_readme_parameter_table_matches_the_code_and_the_tests() -> None:
    readme = _readme_table()
    assert readme == {p.name: p.status for p in PARAMS}
    covered = {p.name for p in PARAMS if p.status in ("supported", "extension")}
    assert covered == set(TESTED_SUPPORTED)
    refused = {p.name for p in PARAMS if p.status == "refused"}
    assert refused == {r[1] for r in REFUSED} - {"unknown", "echo"}
    accepted = {p.name for p in PARAMS if p.status == "accepted"}
    assert accepted == {k for _, extra in NEUTRAL for k in extra} - refused
    for name, where in TESTED_SUPPORTED.items():
        assert where.startswith("tests/") or where in globals(), (name, where)
