"""Delivering results to ``stream_results`` consumers: one bounded buffer per consumer."""

from __future__ import annotations

import asyncio
from collections import deque

from ..models import TaskResult

__all__ = ["STREAM_BUFFER_LIMIT", "Subscriber"]


#: Most results a ``stream_results`` consumer of every task may leave unread; one that falls
#: further behind is dropped (its buffer freed) and its stream ends with an error.
STREAM_BUFFER_LIMIT = 10_000


class Subscriber:
    """One ``stream_results`` consumer: a bounded buffer and a wake-up future."""

    __slots__ = ("buffer", "closed", "overflowed", "wakeup", "wanted")

    def __init__(self, wanted: set[str] | None) -> None:
        self.wanted = wanted
        self.buffer: deque[TaskResult] = deque()
        self.wakeup: asyncio.Future[None] | None = None
        self.closed = False
        self.overflowed = False

    def close(self) -> None:
        self.closed = True
        self._wake()

    def _wake(self) -> None:
        if self.wakeup is not None and not self.wakeup.done():
            self.wakeup.set_result(None)
