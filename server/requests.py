"""The HTTP side of a generation request, and why one can be refused before it runs.

The HTTP layer builds a moe.decode.sequence.GenerationRequest, hands it to the engine (server.engine) and
reads moe.decode.sequence.Events from the RequestHandle until one carries `finished`. The handle is the
sequence's output in the scheduler: it crosses the thread boundary between the event loop (HTTP) and the
engine thread (the model).

Crossing costs a wake-up of the event loop (call_soon_threadsafe writes to its self-pipe; the write releases the
GIL, and the woken loop takes it). A decode step pushes one event per running row, so the pushes go through one
EventRelay per loop, and the engine pushes a phase's events inside `one_wakeup_per_loop()`: they are appended,
and each loop is woken once when the block ends; its drain hands every pending event to its queue in push order.
Pushes outside such a block wake the loop at once (at most one wake-up pending). A step of 16 rows then wakes the
loop once, not 16 times (bench/step_profile.py --profile: 938 socket sends in 65 steps before, ~65 after).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
import weakref
from collections import deque
from collections.abc import AsyncIterator, Iterator

from moe.decode.sequence import Event, Finished, GenerationRequest

logger = logging.getLogger(__name__)


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
    pending: `send` appends, and schedules a drain unless one is scheduled or the sending thread is inside
    one_wakeup_per_loop() (then the block's end schedules it); the drain (on the loop) empties the pending events
    into their queues in the order they were sent."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._lock = threading.Lock()
        self._pending: deque[tuple[asyncio.Queue[Event], Event]] = deque()
        self._scheduled = False  # a drain is queued on the loop and has not taken the pending events yet

    def send(self, queue: asyncio.Queue[Event], event: Event) -> None:
        """Hand `event` to `queue` on the loop (from any thread). Raises RuntimeError when the loop is closed."""
        if self._loop.is_closed():
            raise RuntimeError("the event loop is closed")
        with self._lock:
            self._pending.append((queue, event))
            if self._scheduled:
                return
            held = getattr(_held, "relays", None)
            if held is not None:  # woken once, when the sending thread's block ends
                held.add(self)
                return
            self._scheduled = True
        self._wake()

    def wake(self) -> None:
        """Schedule a drain of what is pending, unless one is scheduled (the end of a one_wakeup_per_loop block)."""
        with self._lock:
            if self._scheduled or not self._pending:
                return
            self._scheduled = True
        self._wake()

    def _wake(self) -> None:
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


_held = threading.local()  # .relays: the relays sent to inside this thread's one_wakeup_per_loop block, else None


@contextlib.contextmanager
def one_wakeup_per_loop() -> Iterator[None]:
    """Events sent on this thread inside the block wake each event loop once, when the block ends (the engine
    pushes a phase's events inside one). Not reentrant: a nested block wakes at the outer block's end."""
    if getattr(_held, "relays", None) is not None:
        yield
        return
    relays: set[EventRelay] = set()
    _held.relays = relays
    try:
        yield
    finally:
        _held.relays = None
        for relay in relays:
            try:
                relay.wake()
            except RuntimeError:  # its loop closed meanwhile: its readers are gone
                logger.debug("events for a closed event loop dropped")


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
        # the client is gone (set from the event loop, or by a push that finds the loop closed; only ever set to
        # True): the scheduler reads it as a plain attribute once per step per row (a bool store is atomic)
        self.cancelled = False
        self.done = False  # a finished event was pushed (finishing twice is a no-op)

    def cancel(self) -> None:
        """The client is gone: the engine frees the slot at its next step."""
        self.cancelled = True

    def push(self, event: Event) -> None:
        """From the engine thread. Nothing is pushed after the finished event."""
        if self.done:
            return
        if event.finished is not None:
            self.done = True
        try:
            self._relay.send(self._queue, event)
        except RuntimeError:  # the event loop is closed: nobody is listening any more
            self.cancelled = True

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
