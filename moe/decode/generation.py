"""Decode n tokens: complete whole prompts offline (evaluation, training, distillation), through the one scheduler.

gpt-fast's habit, for a batch whose rows join and leave at any step (continuous batching):

    moe.decode.prefill          prefill(model, prompts, specs): each row's next-token logits and keys and values
    moe.decode.static_decoder   StaticDecoder: fixed slots; decode_one_token: one step of every live slot
    moe.decode.scheduler        Scheduler: a sequence's life, admission to finish (what the server's engine runs)
    generate(model, tokenizer, prompts, spec, max_new_tokens)   here: a Scheduler stepped until every prompt is done

generate follows the server's rules (moe.decode.sequence, moe.decode.scheduler): the same admission, sampling,
EOS and stop_token_ids, stop strings, finish reasons and token_ids (the ending EOS / stop token kept in
token_ids, never in text); a sequence that fails raises here instead of finishing alone.
"""

from __future__ import annotations

from collections.abc import Sequence as Seq
from dataclasses import dataclass, field
from typing import Any

import torch

from moe.adapters.slots import PluggedSet
from moe.decode.sampling import SamplingParams
from moe.decode.scheduler import Scheduler, SchedulerObserver
from moe.decode.sequence import LENGTH, STOP, GenerationFailedError, GenerationRequest, Sequence
from moe.decode.static_decoder import StaticDecoder, context_length
from moe.model.routed import RoutedModel
from moe.routing.router import RoutingSpec


@dataclass
class Generation:
    token_ids: list[int]  # generated tokens, the ending EOS / stop token included (moe.decode.sequence)
    text: str  # without the EOS / stop token, cut before a stop string
    finish_reason: str  # "stop" (EOS, a stop_token_id or a stop string) or "length"
    route: str | None  # sequence mode: the decision; None otherwise
    counts: dict[str, float] = field(default_factory=dict)  # (token, layer) decisions, prompt and generated


class _Progress(SchedulerObserver):
    def __init__(self, bar: Any) -> None:
        self.bar = bar

    def finished(self, seq: Sequence) -> None:
        self.bar.update(1)


@torch.no_grad()
def generate(
    model: RoutedModel,
    tokenizer: Any,
    prompts: Seq[str],
    spec: RoutingSpec | Seq[RoutingSpec],
    max_new_tokens: int,
    sampling: Seq[SamplingParams] | None = None,
    plugged: PluggedSet | None = None,
    batch_size: int = 32,
    progress: Any = None,
    stop: tuple[str, ...] = (),
) -> list[Generation]:
    """Complete each prompt as the server would (greedy unless `sampling` says), up to `batch_size` at a time:
    a finished row's slot takes the next prompt (continuous batching).

    Rows stop at an EOS id (moe.decode.scheduler.eos_token_ids) or one of their stop_token_ids, at a stop
    string (`stop`), after max_new_tokens, or at the model's context length.
    plugged: a set to use (e.g. a training set); default the model's live slots.
    progress: something with update(n) (a tqdm bar), told of each finished prompt.
    Raises ValueError for a prompt that does not fit the context, GenerationFailedError when a row fails.
    """
    specs = [spec] * len(prompts) if isinstance(spec, RoutingSpec) else list(spec)
    params = list(sampling) if sampling is not None else [SamplingParams()] * len(prompts)
    if not prompts:
        return []
    ids = [tokenizer(p)["input_ids"] for p in prompts]
    limit = context_length(model)
    too_long = [i for i, p in enumerate(ids) if len(p) >= limit]
    if too_long:
        raise ValueError(f"prompt {too_long[0]} has {len(ids[too_long[0]])} tokens; the context limit is {limit}")
    decoder = StaticDecoder(
        model,
        max_batch=min(batch_size, len(prompts)),
        max_len=min(limit, max(len(p) for p in ids) + max_new_tokens),
        plugged=plugged,
    )
    scheduler = Scheduler(model, tokenizer, decoder, observer=_Progress(progress) if progress is not None else None)
    seqs = [
        Sequence(GenerationRequest(prompt_ids, max_new_tokens, p, stop=stop, routing=s))
        for prompt_ids, p, s in zip(ids, params, specs, strict=True)
    ]
    scheduler.add(seqs)
    while scheduler.busy:
        scheduler.step()
    out: list[Generation] = []
    for seq, asked in zip(seqs, specs, strict=True):
        done = seq.finished
        assert done is not None, "the scheduler finishes every sequence it takes"
        if done.reason not in (STOP, LENGTH):
            raise GenerationFailedError(f"generation failed ({done.reason}): {done.message}") from done.error
        undecided = asked.mode == "sequence" and asked.expert is None
        route = seq.spec.expert if undecided and seq.spec is not None else None
        out.append(Generation(done.token_ids, done.text, done.reason, route, seq.counts))
    return out
