"""What a generation request is, what it streams back, and why it can be refused: the engine's vocabulary.

The HTTP layer builds a GenerationRequest, hands it to the engine and reads Events from the RequestHandle
until one carries `finished`. Everything here crosses the thread boundary between the event loop (HTTP)
and the engine thread (the model).
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from moe import RoutingSpec
from moe.decode.sampling import SamplingParams, TokenLogprobs
from moe.decode.structured_output import GrammarSpec
from server.text_stream import TextOptions

# why a request finished
STOP, LENGTH, EXPERT_UNPLUGGED, CANCELLED, ERROR = "stop", "length", "expert_unplugged", "cancelled", "error"


class QueueFullError(RuntimeError):
    """Too many requests waiting; the client should retry later."""


class ContextLimitError(ValueError):
    """A prompt that does not fit the model's context."""


class EngineStoppedError(RuntimeError):
    """The engine is not running (starting up or shutting down)."""


class GenerationFailedError(RuntimeError):
    """Generating this request failed on the server (its neighbours in the batch went on)."""


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


@dataclass
class Finished:
    """The end of a request: why, and its accounting."""

    reason: str
    text: str
    prompt_tokens: int
    completion_tokens: int
    shares: dict[str, float]
    routing_entropy: float
    message: str | None = None
    error: Exception | None = None  # reason "error": why (GenerationFailedError, or EngineStoppedError at shutdown)
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


class RequestHandle:
    """The HTTP side of one request: its event queue, and a way to cancel it."""

    def __init__(self, request: GenerationRequest, loop: asyncio.AbstractEventLoop) -> None:
        self.request = request
        self.submitted = time.perf_counter()
        self._loop = loop
        self._queue: asyncio.Queue[Event] = asyncio.Queue()
        self._cancelled = threading.Event()
        self.done = False  # a finished event was pushed (the engine's side; finishing twice is a no-op)

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def cancel(self) -> None:
        """The client is gone: the engine frees the slot at its next step."""
        self._cancelled.set()

    def push(self, event: Event) -> None:
        """From the engine thread. Nothing is pushed after the finished event."""
        if self.done:
            return
        if event.finished is not None:
            self.done = True
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, event)
        except RuntimeError:  # the event loop is closed: nobody is listening any more
            self._cancelled.set()

    async def events(self) -> AsyncIterator[Event]:
        while True:
            event = await self._queue.get()
            yield event
            if event.finished is not None:
                return

    async def result(self) -> Finished:
        async for event in self.events():
            if event.finished is not None:
                return event.finished
        raise AssertionError("stream ended without a finish event")
