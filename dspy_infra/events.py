"""EventBus: publish/subscribe with a bounded history that subscribers can replay.

Publishing never blocks and never fails: events go into one ring buffer with a sequence
number, and each subscriber reads from its own cursor. A subscriber that falls so far
behind that its next event has left the ring gets one ``events_dropped`` event saying how
many it missed, then carries on from the oldest kept event. No per-subscriber queues, so a
slow or abandoned subscriber costs nothing. A subscriber copies at most ``PAGE`` entries out
of the ring at a time and yields to the loop between pages, so replaying the whole history
(``since``) neither holds the loop nor keeps a copy of the ring per stream.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable, Mapping

from .models import Event

__all__ = ["PAGE", "EventBus"]

#: Events a subscriber copies out of the ring at a time; it yields to the loop between pages.
PAGE = 256

_Raw = tuple[str, str, Mapping[str, object] | None, float]


def _materialize(item: Event | _Raw) -> Event:
    if isinstance(item, Event):
        return item
    type, resource_id, data, timestamp = item
    return Event(type, resource_id, {k: str(v) for k, v in (data or {}).items()}, timestamp)


class EventBus:
    """In-process event bus. Call ``publish`` from the event loop's thread."""

    def __init__(self, history: int = 10_000, *, clock: Callable[[], float] = time.time) -> None:
        # Entries are Events, or (type, resource_id, data, timestamp) from ``emit`` that
        # become Events when read.
        self._ring: deque[tuple[int, Event | _Raw]] = deque(maxlen=history)
        self._next_seq = 0
        self._clock = clock
        self._wakeup = asyncio.Event()
        #: True while some subscriber waits on ``_wakeup`` (publish skips the swap otherwise).
        self._waited = False
        self._closed = False
        self._listeners: list[Callable[[Event], None]] = []

    def publish(self, type: str, resource_id: str, data: Mapping[str, object] | None = None) -> Event:
        event = Event(
            type=type,
            resource_id=resource_id,
            data={k: str(v) for k, v in (data or {}).items()},
            timestamp=self._clock(),
        )
        self._append(event)
        for listener in self._listeners:
            listener(event)
        return event

    def emit(self, type: str, resource_id: str, data: Mapping[str, object] | None = None) -> None:
        """``publish`` for hot paths: the same event, but the ``Event`` object is built only
        when someone reads it (``history``, ``subscribe``). ``data`` must not be changed
        afterwards. A scheduler emits three events per task, and building each one up front
        cost more than the rest of a no-op task's bookkeeping."""
        if self._listeners:
            self.publish(type, resource_id, data)
            return
        self._append((type, resource_id, data, self._clock()))

    def _append(self, item: Event | _Raw) -> None:
        self._ring.append((self._next_seq, item))
        self._next_seq += 1
        # Wake every waiting subscriber; the next waiters get a fresh Event.
        if self._waited:
            self._waited = False
            wakeup, self._wakeup = self._wakeup, asyncio.Event()
            wakeup.set()

    def add_listener(self, fn: Callable[[Event], None]) -> Callable[[], None]:
        """Call ``fn`` synchronously on every event (for metrics); returns the remover."""
        self._listeners.append(fn)
        return lambda: self._listeners.remove(fn)

    def history(
        self,
        types: Iterable[str] | None = None,
        since: float | None = None,
        *,
        resource_id: str | None = None,
    ) -> list[Event]:
        """The kept events (optionally of these types, since a time, about one resource)."""
        wanted = set(types) if types else None
        if resource_id is not None:
            # Compared on the raw entries: only the matches are built into Events.
            items = (
                item
                for _, item in self._ring
                if (item.resource_id if isinstance(item, Event) else item[1]) == resource_id
            )
        else:
            items = (item for _, item in self._ring)
        events = (_materialize(item) for item in items)
        return [
            e
            for e in events
            if (wanted is None or e.type in wanted) and (since is None or e.timestamp >= since)
        ]

    def close(self) -> None:
        """End every subscription (they return after draining what is buffered)."""
        self._closed = True
        self._wakeup.set()

    async def subscribe(
        self, types: Iterable[str] | None = None, since: float | None = None
    ) -> AsyncIterator[Event]:
        """Yield matching events: those kept since ``since`` (if given), then live ones."""
        async for _seq, event in self.subscribe_numbered(types, since=since):
            yield event

    async def subscribe_numbered(
        self, types: Iterable[str] | None = None, *, since: float | None = None, after: int | None = None
    ) -> AsyncIterator[tuple[int, Event]]:
        """``subscribe``, each event with its sequence number (for resuming a stream: pass the
        last number seen as ``after`` to get every kept event after it). An ``events_dropped``
        event carries the number of the last event it stands for."""
        wanted = set(types) if types else None
        if after is not None:
            cursor = min(max(after + 1, 0), self._next_seq)
        elif since is not None:
            cursor = self._ring[0][0] if self._ring else self._next_seq
        else:
            cursor = self._next_seq
        while True:
            oldest = self._ring[0][0] if self._ring else self._next_seq
            if cursor < oldest:
                missed = oldest - cursor
                cursor = oldest
                yield oldest - 1, Event("events_dropped", "", {"missed": str(missed)}, self._clock())
            # One page at a time: a subscriber holds at most PAGE entries (not a copy of the
            # whole ring), and a replay of the whole history gives the loop a turn per page,
            # so the consumer's cancellation (a client that left) lands between pages.
            start = cursor - oldest
            page = list(itertools.islice(self._ring, start, start + PAGE))
            for seq, item in page:
                cursor = seq + 1
                event = _materialize(item)
                if wanted is not None and event.type not in wanted:
                    continue
                if since is not None and event.timestamp < since:
                    continue
                yield seq, event
            del page
            if cursor < self._next_seq:
                await asyncio.sleep(0)
                continue
            if self._closed:
                return
            self._waited = True
            await self._wakeup.wait()
