"""The HTTP side of a generation request, and why one can be refused before it runs.

The HTTP layer builds a moe.decode.sequence.GenerationRequest, hands it to the engine (server.engine) and
reads moe.decode.sequence.Events from the RequestHandle until one carries `finished`. The handle is the
sequence's output in the scheduler: it crosses the thread boundary between the event loop (HTTP) and the
engine thread (the model).

Crossing costs a wake-up of the event loop (call_soon_threadsafe writes to its self-pipe, and the woken loop takes
the GIL from the engine thread). A decode step pushes one event per running row, so the pushes go through one
EventRelay per loop: the first push since the loop last drained schedules one drain, later ones only append, and
the drain hands every pending event to its queue in push order. A step of 16 rows then wakes the loop once, not
16 times (bench/step_profile.py: the socket sends were ~8% of the engine thread's time at 16 rows).
"""

from __future__ import annotations

import asyncio
import threading
import time
import weakref
from collections import deque
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


class EventRelay:
    """Events from other threads to asyncio queues of one event loop, with at most one wake-up of the loop
    pending: `send` appends and schedules a drain only when none is scheduled; the drain (on the loop) empties the
    pending events into their queues in the order they were sent."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._lock = threading.Lock()
        self._pending: deque[tuple[asyncio.Queue[Event], Event]] = deque()
        self._scheduled = False  # a drain is queued on the loop and has not taken the pending events yet

    def send(self, queue: asyncio.Queue[Event], event: Event) -> None:
        """Hand `event` to `queue` on the loop (from any thread). Raises RuntimeError when the loop is closed."""
        with self._lock:
            self._pending.append((queue, event))
            if self._scheduled:
                return
            self._scheduled = True
        try:
            self._loop.call_soon_threadsafe(self._drain)
        except RuntimeError:  # the loop is closed: nothing will drain; drop what waits (nobody is listening)
            with self._lock:
                self._pending.clear()
                self._scheduled = False
            raise

    def _drain(self) -> None:
        with self._lock:
            pending, self._pending = self._pending, deque()
            self._scheduled = False
        for queue, event in pending:
            queue.put_nowait(event)


_relays: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, EventRelay] = weakref.WeakKeyDictionary()
_relays_lock = threading.Lock()


def relay_for(loop: asyncio.AbstractEventLoop) -> EventRelay:
    """The one EventRelay of this loop (made on first use, gone with the loop)."""
    with _relays_lock:
        relay = _relays.get(loop)
        if relay is None:
            relay = _relays[loop] = EventRelay(loop)
        return relay


class RequestHandle:
    """The HTTP side of one request: its event queue, and a way to cancel it (a moe.decode.sequence.SequenceOutput)."""

    def __init__(self, request: GenerationRequest, loop: asyncio.AbstractEventLoop) -> None:
        self.request = request
        self.submitted = time.perf_counter()
        self.last_token_at = self.submitted  # the engine's metrics: when its latest token was pushed
        self._relay = relay_for(loop)
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
            self._relay.send(self._queue, event)
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
