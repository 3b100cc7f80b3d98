"""The HTTP side of a generation request, and why one can be refused before it runs.

The HTTP layer builds a moe.decode.sequence.GenerationRequest, hands it to the engine (server.engine) and
reads moe.decode.sequence.Events from the RequestHandle until one carries `finished`. The handle is the
sequence's output in the scheduler: it crosses the thread boundary between the event loop (HTTP) and the
engine thread (the model).
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator

from moe.decode.sequence import Event, Finished, GenerationRequest


class QueueFullError(RuntimeError):
    """Too many requests waiting; the client should retry later."""


class ClientBusyError(RuntimeError):
    """One client has its share of sequences in flight (429): it should retry when some have finished."""


class ContextLimitError(ValueError):
    """A prompt that does not fit the model's context."""


class EngineStoppedError(RuntimeError):
    """The engine is not running (starting up or shutting down)."""


class RequestHandle:
    """The HTTP side of one request: its event queue, and a way to cancel it (a moe.decode.sequence.SequenceOutput)."""

    def __init__(self, request: GenerationRequest, loop: asyncio.AbstractEventLoop) -> None:
        self.request = request
        self.submitted = time.perf_counter()
        self.last_token_at = self.submitted  # the engine's metrics: when its latest token was pushed
        self._loop = loop
        self._queue: asyncio.Queue[Event] = asyncio.Queue()
        self._cancelled = threading.Event()
        self.done = False  # a finished event was pushed (finishing twice is a no-op)

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
