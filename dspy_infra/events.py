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
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Mapping
from typing import Any

from .models import Event

__all__ = ["PAGE", "EventBus"]

#: Events a subscriber copies out of the ring at a time; it yields to the loop between pages.
PAGE = 256

#: Slots per event in the ring: type, resource id, data, timestamp.
_SLOTS = 4


def _event(type: str, resource_id: str, data: Mapping[str, object] | None, timestamp: float) -> Event:
    """The ``Event`` of one ring entry (an ``emit``'s data becomes strings only here)."""
    return Event(type, resource_id, {k: str(v) for k, v in (data or {}).items()}, timestamp)


class EventBus:
    """In-process event bus. Call ``publish`` from the event loop's thread."""

    def __init__(self, history: int = 10_000, *, clock: Callable[[], float] = time.time) -> None:
        # One flat ring of four slots per event (type, resource id, data, timestamp), not a
        # tuple per event: a tuple that holds a dict stays tracked by the garbage collector
        # for as long as it lives, and with three events per task the ring's tuples were
        # most of what a scheduler's tasks left for the full collections to walk. The
        # sequence number of an entry is its position counted back from ``_next_seq``.
        self._ring: deque[Any] = deque(maxlen=history * _SLOTS)
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
        self._append(event.type, event.resource_id, event.data, event.timestamp)
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
        # _append, inlined: three calls per task.
        self._ring.extend((type, resource_id, data, self._clock()))  # (the tuple dies at once)
        self._next_seq += 1
        if self._waited:
            self._wake()

    def _append(
        self, type: str, resource_id: str, data: Mapping[str, object] | None, timestamp: float
    ) -> None:
        self._ring.extend((type, resource_id, data, timestamp))
        self._next_seq += 1
        if self._waited:
            self._wake()

    def _wake(self) -> None:
        """Wake every waiting subscriber; the next waiters get a fresh Event."""
        self._waited = False
        wakeup, self._wakeup = self._wakeup, asyncio.Event()
        wakeup.set()

    @property
    def _oldest(self) -> int:
        """The sequence number of the oldest kept event (``_next_seq`` when none is kept)."""
        return self._next_seq - len(self._ring) // _SLOTS

    def _entries(self) -> Iterator[tuple[str, str, Mapping[str, object] | None, float]]:
        """(type, resource id, data, timestamp) of every kept event, oldest first; the caller
        must not append meanwhile."""
        slots = iter(self._ring)
        return zip(slots, slots, slots, slots, strict=True)

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
        # Compared on the raw entries: only the matches are built into Events.
        return [
            _event(type, rid, data, timestamp)
            for type, rid, data, timestamp in self._entries()
            if (resource_id is None or rid == resource_id)
            and (wanted is None or type in wanted)
            and (since is None or timestamp >= since)
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
            cursor = self._oldest
        else:
            cursor = self._next_seq
        while True:
            oldest = self._oldest
            if cursor < oldest:
                missed = oldest - cursor
                cursor = oldest
                yield oldest - 1, Event("events_dropped", "", {"missed": str(missed)}, self._clock())
            # One page at a time: a subscriber holds at most PAGE entries (not a copy of the
            # whole ring), and a replay of the whole history gives the loop a turn per page,
            # so the consumer's cancellation (a client that left) lands between pages.
            # The page holds the ring's own slots (no tuple per entry): an unread stream keeps
            # PAGE * 4 references, whatever it was asked to replay.
            start = cursor - oldest
            page = list(itertools.islice(self._ring, start * _SLOTS, (start + PAGE) * _SLOTS))
            slots = iter(page)
            for type, resource_id, data, timestamp in zip(slots, slots, slots, slots, strict=True):
                seq, cursor = cursor, cursor + 1
                if wanted is not None and type not in wanted:
                    continue
                if since is not None and timestamp < since:
                    continue
                yield seq, _event(type, resource_id, data, timestamp)
            del page
            if cursor < self._next_seq:
                await asyncio.sleep(0)
                continue
            if self._closed:
                return
            self._waited = True
            await self._wakeup.wait()
