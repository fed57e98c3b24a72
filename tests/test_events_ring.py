"""EventBus's ring (four flat slots per event, sequence numbers counted from the newest) gives
the same events, numbers and drop notices as a plain list of every event ever sent."""

from __future__ import annotations

import asyncio
import itertools
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from dspy_infra.events import PAGE, EventBus
from dspy_infra.models import Event

#: (publish or emit, type, resource id, data) of one sent event.
sends = st.lists(
    st.tuples(
        st.booleans(),
        st.sampled_from(["task_started", "task_completed", "tick"]),
        st.sampled_from(["a", "b", ""]),
        st.one_of(
            st.none(),
            st.dictionaries(
                st.sampled_from(["n", "task_class", "error"]),
                st.one_of(st.integers(), st.text(max_size=3), st.floats(allow_nan=False)),
                max_size=3,
            ),
        ),
    ),
    max_size=40,
)


def send_all(
    history: int, sent: list[tuple[bool, str, str, dict[str, Any] | None]]
) -> tuple[EventBus, list[Event]]:
    """A bus fed ``sent`` with a ticking clock, and every event as a plain list would keep it."""
    ticks = itertools.count()
    bus = EventBus(history, clock=lambda: float(next(ticks)))
    expected = []
    for i, (publish, type, resource_id, data) in enumerate(sent):
        if publish:
            bus.publish(type, resource_id, data)
        else:
            bus.emit(type, resource_id, data)
        expected.append(Event(type, resource_id, {k: str(v) for k, v in (data or {}).items()}, float(i)))
    return bus, expected


@given(
    history=st.integers(1, 12), sent=sends, types=st.sampled_from([None, ["tick"], ["tick", "task_started"]])
)
def test_history_is_the_newest_events_as_sent(
    history: int, sent: list[tuple[bool, str, str, dict[str, Any] | None]], types: list[str] | None
) -> None:
    bus, expected = send_all(history, sent)
    kept = expected[-history:] if expected else []
    assert bus.history() == kept
    assert bus.history(types) == [e for e in kept if types is None or e.type in types]
    assert bus.history(resource_id="a") == [e for e in kept if e.resource_id == "a"]
    assert bus.history(since=3.0) == [e for e in kept if e.timestamp >= 3.0]


@settings(deadline=None)
@given(history=st.integers(1, 12), sent=sends, after=st.integers(-2, 45))
def test_numbered_replay_matches_the_sequence_of_sends(
    history: int, sent: list[tuple[bool, str, str, dict[str, Any] | None]], after: int
) -> None:
    bus, expected = send_all(history, sent)
    bus.close()  # the replay ends once it has drained the ring

    async def replay() -> list[tuple[int, Event]]:
        return [item async for item in bus.subscribe_numbered(after=after)]

    got = asyncio.run(replay())
    oldest = max(0, len(expected) - history)
    cursor = min(max(after + 1, 0), len(expected))
    want: list[tuple[int, Event]] = []
    if cursor < oldest:
        want.append((oldest - 1, Event("events_dropped", "", {"missed": str(oldest - cursor)}, 0.0)))
        cursor = oldest
    want += [(seq, expected[seq]) for seq in range(cursor, len(expected))]
    # The drop notice's timestamp is the bus clock's next tick: compare the rest of it.
    assert [(s, e.type, e.data) for s, e in got[:1] if e.type == "events_dropped"] == [
        (s, e.type, e.data) for s, e in want[:1] if e.type == "events_dropped"
    ]
    assert [item for item in got if item[1].type != "events_dropped"] == [
        item for item in want if item[1].type != "events_dropped"
    ]


async def test_replay_longer_than_a_page_is_complete_and_in_order() -> None:
    bus = EventBus(PAGE * 3)
    for i in range(PAGE * 2 + 5):
        bus.emit("tick", str(i), {"i": i})
    bus.close()
    got = [item async for item in bus.subscribe_numbered(after=-1)]
    assert [seq for seq, _ in got] == list(range(PAGE * 2 + 5))
    assert [e.data for _, e in got] == [{"i": str(i)} for i in range(PAGE * 2 + 5)]
