"""RequestHandle and its EventRelay: events pushed from another thread arrive in order, a burst wakes the loop once,
and a closed loop cancels the handle instead of raising."""

from __future__ import annotations

import asyncio
import threading

from moe.decode.sequence import Event, Finished, GenerationRequest
from server.requests import RequestHandle, relay_for


def _finished() -> Finished:
    return Finished("length", "abc", 1, 3, {}, 0.0)


def _push_from_thread(pushes) -> None:
    worker = threading.Thread(target=pushes)
    worker.start()
    worker.join()


def test_a_burst_of_pushes_from_another_thread_wakes_the_loop_once_and_keeps_each_handles_order() -> None:
    async def main() -> tuple[list[list[str]], int]:
        loop = asyncio.get_running_loop()
        wakeups = 0
        call_soon_threadsafe = loop.call_soon_threadsafe

        def counted(*args, **kwargs):
            nonlocal wakeups
            wakeups += 1
            return call_soon_threadsafe(*args, **kwargs)

        loop.call_soon_threadsafe = counted  # type: ignore[method-assign]
        handles = [RequestHandle(GenerationRequest([1], 3), loop) for _ in range(4)]

        def pushes() -> None:  # what one decode step then the last one do: one event per row, interleaved
            for piece in ("a", "b", "c"):
                for handle in handles:
                    handle.push(Event(piece, [0]))
            for handle in handles:
                handle.push(Event(finished=_finished()))

        _push_from_thread(pushes)
        texts = []
        for handle in handles:
            texts.append([event.text async for event in handle.events()])
        return texts, wakeups

    texts, wakeups = asyncio.run(main())
    assert texts == [["a", "b", "c", ""]] * 4
    assert wakeups == 1


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
