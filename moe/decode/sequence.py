"""What a generation request is, what it streams back, and the scheduler's record of it while it runs.

    GenerationRequest   what to generate: prompt ids, how many tokens, sampling, stop strings, routing, grammar
    Sequence            one request as moe.decode.scheduler runs it, from the waiting queue to its finish
    Event               one streamed piece: new text and the token it came from, or the finish
    Finished            the end: why (STOP, LENGTH, EXPERT_UNPLUGGED, CANCELLED, ERROR), its text and accounting

The EOS rule, one for every caller: `token_ids` holds every token the sequence sampled, the EOS or stop token
that ended it included (it was generated: `completion_tokens` counts it and `logprobs` has its entry); `text`
never includes it, nor a stop string.

A Sequence's `output` is where its events go (the server's RequestHandle, an asyncio queue across the engine
thread); None keeps them in the Sequence only (`finished`), which is what offline generation reads.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

from moe.decode.sampling import SamplingParams, TokenLogprobs
from moe.decode.structured_output import GrammarSpec
from moe.decode.text_stream import TextOptions, TextStream
from moe.routing.router import RoutingSpec

# why a sequence finished
STOP, LENGTH, EXPERT_UNPLUGGED, CANCELLED, ERROR = "stop", "length", "expert_unplugged", "cancelled", "error"


class GenerationFailedError(RuntimeError):
    """Generating this sequence failed (its neighbours in the batch went on)."""


@dataclass(frozen=True)
class GenerationRequest:
    prompt_ids: list[int]
    max_new_tokens: int  # 0: prefill only (prompt logprobs), nothing generated
    sampling: SamplingParams = SamplingParams()
    stop: tuple[str, ...] = ()
    routing: RoutingSpec = RoutingSpec()
    prompt_logprobs: int | None = None  # each prompt token's logprob and this many most likely (echo)
    grammar: GrammarSpec | None = None  # structured output
    text: TextOptions = TextOptions()  # how the generated ids become text (detokenisation)
    client: str = ""  # who asked (an opaque tag from the caller): the scheduler admits round-robin over tags


@dataclass
class Finished:
    """The end of a sequence: why, and its accounting."""

    reason: str
    text: str
    prompt_tokens: int
    completion_tokens: int
    shares: dict[str, float]
    routing_entropy: float
    message: str | None = None
    error: Exception | None = None  # reason "error": why (GenerationFailedError, or the caller's own at shutdown)
    token_ids: list[int] = field(default_factory=list)  # generated, the ending EOS / stop token included
    logprobs: list[TokenLogprobs | None] = field(default_factory=list)  # per token_ids, when asked
    prompt_logprobs: list[TokenLogprobs | None] | None = None  # per prompt token (first: None), when asked


@dataclass
class Event:
    """One streamed piece: new text (possibly empty), or the last event with `finished` set."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finished: Finished | None = None
    logprobs: list[TokenLogprobs | None] = field(default_factory=list)  # per token_ids, when asked


class SequenceOutput(Protocol):
    """Where a sequence's events go. `push` is called on the scheduler's thread; `cancelled`, a plain attribute
    (any thread may set it), is read once per step (True: the reader is gone, the sequence finishes with
    CANCELLED)."""

    cancelled: bool

    def push(self, event: Event) -> None: ...


@dataclass(eq=False)
class Sequence:
    """One request as the scheduler runs it. The fields below `output` are the scheduler's, set at admission."""

    request: GenerationRequest
    output: SequenceOutput | None = None
    spec: RoutingSpec | None = None  # the routing it runs with (a sequence-mode decision made at prefill)
    generator: Any = None  # its torch.Generator (seeded sampling), None when greedy
    text: TextStream | None = None
    matcher: Any = None  # its grammar (structured output), None when unconstrained
    stop_ids: frozenset[int] = frozenset()  # EOS and the request's stop_token_ids
    token_ids: list[int] = field(default_factory=list)  # sampled so far (the EOS rule above)
    logprobs: list[TokenLogprobs | None] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprobs | None] | None = None
    counts: dict[str, float] = field(default_factory=dict)  # (token, layer) decisions, prompt and generated
    slot: int = -1  # the decoder slot it decodes in (-1 before it joins, and while preempted)
    preemptions: int = 0  # times it left the batch for other clients' rows (moe.decode.scheduler._preempt)
    finished: Finished | None = None  # set once, when it ends
