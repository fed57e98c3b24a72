"""The console's per-app state and bounds, shared by its routes, its OpenAPI document and its
event stream (a module of its own so those three import it, not each other)."""

from __future__ import annotations

import asyncio
import collections
import itertools
import re
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from aiohttp import web

from ..errors import FailedPrecondition

if TYPE_CHECKING:
    from ..infra import Infra

__all__ = [
    "API_PREFIX",
    "CONSOLE_KEY",
    "INFRA_KEY",
    "MAX_LIMIT",
    "MAX_OFFSET",
    "SUBMIT_KEY",
    "ConsoleState",
    "embedded",
]

#: The embedded Infra the console reads, and ``/queue/submit``'s handler (the console's submit
#: answers exactly like it). Set by ``add_console_routes``, so the console never imports ``http``.
INFRA_KEY: web.AppKey[Infra] = web.AppKey("console_infra")
SUBMIT_KEY: web.AppKey[Callable[[web.Request], Awaitable[web.Response]]] = web.AppKey("console_submit")

API_PREFIX = "/api/v1"

#: Largest page of tasks or runs.
MAX_LIMIT = 200
#: Largest ``offset`` (pages reach back this far; filter to go further).
MAX_OFFSET = 100_000
#: Tasks a filter by class or id text looks through, newest first (the store keeps them in
#: memory; this bounds the time one request holds the loop).
MAX_SCAN = 50_000
#: Characters of a task's log the detail view returns (its end).
MAX_LOG_CHARS = 64 * 1024
#: Service log lines the detail view returns, and the longest line kept.
SERVICE_LOG_LINES = 200
MAX_LINE_CHARS = 4096
#: Characters of an error text in a list row.
ROW_ERROR_CHARS = 300
#: Seconds between throughput samples, and how many are kept (5 minutes).
SAMPLE_INTERVAL = 2.0
SAMPLES = 150
#: Limit changes kept per class.
LIMIT_CHANGES = 20

_DIGITS = re.compile(r"[0-9]{1,9}")


class ConsoleState:
    """Per-app state: the event-stream epoch, the stop signal of open streams, the samples."""

    def __init__(self, infra: Infra) -> None:
        self.infra = infra
        #: Event ids are ``EPOCH-SEQ``; a ``Last-Event-ID`` of another epoch (another server
        #: process) cannot be resumed.
        self.epoch = uuid.uuid4().hex[:8]
        self.stopping = asyncio.Event()
        self.open_streams = 0
        #: (time, completed, failed, cancelled) totals, one per SAMPLE_INTERVAL.
        self.totals: collections.deque[tuple[float, float, float, float]] = collections.deque(
            maxlen=SAMPLES + 1
        )
        self.limit_changes: dict[str, collections.deque[tuple[float, int]]] = {}

    def sample(self) -> None:
        totals = {"completed": 0.0, "failed": 0.0, "cancelled": 0.0}
        for family in self.infra.metrics.tasks_total.collect():
            for s in family.samples:
                if s.name.endswith("_total") and s.labels.get("status") in totals:
                    totals[s.labels["status"]] += s.value
        now = time.time()
        self.totals.append((now, totals["completed"], totals["failed"], totals["cancelled"]))
        for name, q in self.infra.scheduler.queue_status().items():
            changes = self.limit_changes.setdefault(name, collections.deque(maxlen=LIMIT_CHANGES))
            if not changes or changes[-1][1] != q.limit:
                changes.append((now, q.limit))

    def throughput(self) -> list[list[float]]:
        """Per interval: [end time, completed, failed, cancelled] (deltas of the totals)."""
        points = list(self.totals)
        return [
            [round(b[0], 3), b[1] - a[1], b[2] - a[2], b[3] - a[3]] for a, b in itertools.pairwise(points)
        ]


CONSOLE_KEY: web.AppKey[ConsoleState] = web.AppKey("console", ConsoleState)


def embedded(infra: object) -> Infra:
    """The embedded ``Infra`` the HTTP app serves. The console reads what only the process that
    owns the infra has (its event bus with sequence numbers, its metrics registry, its
    scheduler's queues), so it is served by ``dspy-infra serve`` and ``ensure_infra(serve=True)``,
    never by a proxy of a remote infra."""
    from ..infra import Infra

    if not isinstance(infra, Infra):
        raise FailedPrecondition(
            "the console needs the embedded infra of this server",
            fix="open the console of the server itself (dspy-infra serve)",
        )
    return infra


# -- query parameters ---------------------------------------------------------------------------
