"""RequestHandle and its EventRelay: events pushed from another thread arrive in order, a phase's pushes inside
one_wakeup_per_loop wake the loop once, and a closed loop cancels the handle instead of raising."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time

from moe.decode.sequence import Event, Finished, GenerationRequest
from server.requests import RequestHandle, one_wakeup_per_loop, relay_for


def _finished() -> Finished:
    return Finished("length", "abc", 1, 3, {}, 0.0)


def _push_from_thread(pushes) -> None:
    worker = threading.Thread(target=pushes)
    worker.start()
    worker.join()


def _pushed_from_a_thread(held: bool) -> tuple[list[list[str]], int]:
    """Four handles, three steps of one event each then their finishes, pushed from another thread (each step's
    pushes inside one_wakeup_per_loop when held) -> (each handle's texts, wake-ups of the loop)."""

    async def main() -> tuple[list[list[str]], int]:
        loop = asyncio.get_running_loop()
        wakeups = 0
        call_soon_threadsafe = loop.call_soon_threadsafe

        def counted(callback, *args, **kwargs):
            nonlocal wakeups
            wakeups += getattr(callback, "__name__", "") == "_drain"  # a relay's drain (not the test's own calls)
            return call_soon_threadsafe(callback, *args, **kwargs)

        loop.call_soon_threadsafe = counted  # type: ignore[method-assign]
        handles = [RequestHandle(GenerationRequest([1], 3), loop) for _ in range(4)]
        steps = [[Event(piece, [0]) for _ in handles] for piece in ("a", "b", "c")]
        steps.append([Event(finished=_finished()) for _ in handles])
        released = threading.Event()

        def pushes() -> None:  # the engine thread: one event per row a step, the loop drains between steps
            for events in steps:
                released.clear()
                with one_wakeup_per_loop() if held else contextlib.nullcontext():
                    for handle, event in zip(handles, events, strict=True):
                        handle.push(event)
                        time.sleep(0.002)  # the GIL goes to the loop between pushes (a wake-up's socket write does)
                loop.call_soon_threadsafe(released.set)  # after this step's drain
                released.wait()

        worker = threading.Thread(target=pushes)
        worker.start()
        texts = []
        for handle in handles:
            texts.append([event.text async for event in handle.events()])
        await asyncio.to_thread(worker.join)
        return texts, wakeups

    return asyncio.run(main())


def test_a_steps_pushes_inside_one_wakeup_per_loop_wake_the_loop_once_and_keep_each_handles_order() -> None:
    texts, wakeups = _pushed_from_a_thread(held=True)
    assert texts == [["a", "b", "c", ""]] * 4
    assert wakeups == 4, "one per step"


def test_pushes_outside_a_block_arrive_in_order_too() -> None:
    texts, wakeups = _pushed_from_a_thread(held=False)
    assert texts == [["a", "b", "c", ""]] * 4
    assert wakeups > 4, "the loop drains between pushes"


def test_pushes_after_a_drain_schedule_a_new_one() -> None:
    async def main() -> list[str]:
        loop = asyncio.get_running_loop()
        handle = RequestHandle(GenerationRequest([1], 2), loop)
        _push_from_thread(lambda: handle.push(Event("x", [0])))
        first = await anext(handle.events())
        _push_from_thread(lambda: (handle.push(Event("y", [0])), handle.push(Event(finished=_finished()))))
        return [first.text] + [event.text async for event in handle.events()]

    assert asyncio.run(main()) == ["x", "y", ""]


def test_a_closed_loop_cancels_every_handle_that_pushes_to_it() -> None:
    loop = asyncio.new_event_loop()
    handles = [RequestHandle(GenerationRequest([1], 2), loop) for _ in range(2)]
    loop.close()
    for handle in handles:
        handle.push(Event("x", [0]))
    assert [handle.cancelled for handle in handles] == [True, True]


def test_one_relay_per_loop() -> None:
    first, second = asyncio.new_event_loop(), asyncio.new_event_loop()
    try:
        assert relay_for(first) is relay_for(first)
        assert relay_for(first) is not relay_for(second)
    finally:
        first.close()
        second.close()
