"""EventBus: filtering, replay from a timestamp, bounded history, slow subscribers."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator, Callable

from hypothesis import given
from hypothesis import strategies as st

from dspy_infra.events import Event, EventBus


def ticking_clock() -> tuple[itertools.count[int], Callable[[], float]]:
    counter = itertools.count()
    return counter, lambda: float(next(counter))


async def collect(agen: AsyncIterator[Event], n: int) -> list[Event]:
    out = []
    async for item in agen:
        out.append(item)
        if len(out) == n:
            break
    return out


async def test_live_subscriber_gets_only_matching_types_in_order() -> None:
    bus = EventBus()
    sub = bus.subscribe(types=["task_completed"])
    reader = asyncio.create_task(collect(sub, 2))
    await asyncio.sleep(0)
    bus.publish("task_started", "a")
    bus.publish("task_completed", "a", {"n": 1})
    bus.publish("task_started", "b")
    bus.publish("task_completed", "b")
    got = await asyncio.wait_for(reader, 2)
    assert [(e.type, e.resource_id) for e in got] == [("task_completed", "a"), ("task_completed", "b")]
    assert got[0].data == {"n": "1"}


async def test_replay_since_timestamp_then_live() -> None:
    _, clock = ticking_clock()
    bus = EventBus(clock=clock)
    for i in range(5):
        bus.publish("tick", str(i))  # timestamps 0..4
    sub = bus.subscribe(since=3.0)
    reader = asyncio.create_task(collect(sub, 3))
    await asyncio.sleep(0)
    bus.publish("tick", "live")
    got = await asyncio.wait_for(reader, 2)
    assert [e.resource_id for e in got] == ["3", "4", "live"]


async def test_subscriber_that_falls_behind_is_told_how_many_it_missed() -> None:
    bus = EventBus(history=3)
    sub = bus.subscribe()
    first = asyncio.create_task(sub.__anext__())
    await asyncio.sleep(0)
    bus.publish("tick", "start")
    assert (await asyncio.wait_for(first, 2)).resource_id == "start"
    for i in range(10):
        bus.publish("tick", str(i))
    got = await asyncio.wait_for(collect(sub, 4), 2)
    assert got[0].type == "events_dropped"
    assert got[0].data == {"missed": "7"}  # events 0..6 left the ring unseen
    assert [e.resource_id for e in got[1:]] == ["7", "8", "9"]


async def test_close_ends_subscriptions_after_draining() -> None:
    bus = EventBus()
    sub = bus.subscribe()
    reader = asyncio.create_task(collect(sub, 100))
    await asyncio.sleep(0)
    bus.publish("a", "1")
    bus.close()
    got = await asyncio.wait_for(reader, 2)
    assert [e.type for e in got] == ["a"]


def test_listener_sees_every_event_synchronously() -> None:
    bus = EventBus()
    seen: list[str] = []
    remove = bus.add_listener(lambda e: seen.append(e.type))
    bus.publish("x", "1")
    remove()
    bus.publish("y", "1")
    assert seen == ["x"]


@given(st.lists(st.sampled_from(["a", "b", "c"]), max_size=60), st.integers(1, 20))
def test_history_is_the_newest_events_in_order(types: list[str], size: int) -> None:
    bus = EventBus(history=size)
    for i, t in enumerate(types):
        bus.publish(t, str(i))
    kept = bus.history()
    assert [e.resource_id for e in kept] == [str(i) for i in range(len(types))][-size:]
    assert all(e.type == "a" for e in bus.history(types=["a"]))
