"""One task class's queue (``ClassQueue``: heap, limiter, policy, sample window, parked
workers) and the metric batching of the hot path (``BatchedCounter``, ``BatchedHistogram``)."""

from __future__ import annotations

import asyncio
from bisect import bisect_left
from collections import deque
from collections.abc import Callable
from typing import Any

from ..errors import (
    InfraError,
)
from ..metrics import InfraMetrics
from ..models import TaskClass, TaskStatus
from .limiter import AimdPolicy, ResizableSemaphore, SampleWindow
from .task import TaskRecord

__all__ = ["BatchedCounter", "BatchedHistogram", "ClassQueue", "queue_key"]

_PENDING = TaskStatus.PENDING
_COMPLETED = TaskStatus.COMPLETED
_FAILED = TaskStatus.FAILED
_CANCELLED = TaskStatus.CANCELLED


#: Priorities are int32 (``TaskSpec`` checks): the highest one gets key prefix 0.
_TOP_PRIORITY = 2**31 - 1


def queue_key(priority: int, seq: int) -> int:
    """A queued task's place in its class's heap: higher priority first, then submission
    order. One int, ``(INT32_MAX - priority) * 2**64 + seq`` (``seq`` is the store's signed
    64-bit integer, so the keys of two priorities never overlap), rather than a
    ``(-priority, seq)`` tuple: a heap of 20,000 tuples spent about 0.9 us per pop comparing
    them, a heap of such ints less than half of that."""
    return ((_TOP_PRIORITY - priority) << 64) + seq


class BatchedCounter:
    """Counts in a plain int on the hot path; ``flush`` adds them to the Prometheus child."""

    __slots__ = ("child", "pending")

    def __init__(self, child: Any) -> None:
        self.child = child
        self.pending = 0

    def flush(self) -> None:
        if self.pending:
            self.child.inc(self.pending)
            self.pending = 0


class BatchedHistogram:
    """Buckets observations in plain ints on the hot path; ``flush`` adds each bucket's count
    and the sum to the Prometheus child in one step per bucket.

    A prometheus_client ``observe`` takes a lock per value and walks the bucket list; at tens
    of thousands of tasks a second that alone was a third of the scheduler's time. The child
    keeps one non-cumulative value per bucket plus a sum (``_buckets``, ``_sum``); when a
    future prometheus_client does not, every observation goes straight to ``observe``.
    """

    __slots__ = ("bounds", "child", "counts", "direct", "pending", "total")

    def __init__(self, child: Any) -> None:
        self.child = child
        bounds = getattr(child, "_upper_bounds", None)
        buckets = getattr(child, "_buckets", None)
        self.direct = not (
            isinstance(bounds, list) and isinstance(buckets, list) and len(bounds) == len(buckets)
        ) or not hasattr(child, "_sum")
        self.bounds: list[float] = list(bounds) if not self.direct else []  # type: ignore[arg-type]
        self.counts = [0] * len(self.bounds)
        self.total = 0.0
        self.pending = 0

    def observe(self, value: float) -> None:
        if self.direct:
            self.child.observe(value)
            return
        # bisect_left: the first bucket whose upper bound is >= value (le semantics).
        self.counts[bisect_left(self.bounds, value)] += 1
        self.total += value
        self.pending += 1

    def flush(self) -> None:
        if not self.pending:
            return
        counts = self.counts
        for i, n in enumerate(counts):
            if n:
                self.child._buckets[i].inc(n)
                counts[i] = 0
        self.child._sum.inc(self.total)
        self.total = 0.0
        self.pending = 0


class ClassQueue:
    """One class: its heap, limiter, policy, sample window, parked workers, metric children."""

    __slots__ = (
        "cls",
        "gpu_wait",
        "heap",
        "idle",
        "m_duration",
        "m_error_rate",
        "m_errors",
        "m_total",
        "m_wait",
        "policy",
        "queued",
        "refusal",
        "sem",
        "window",
    )

    def __init__(
        self,
        cls: TaskClass,
        metrics: InfraMetrics,
        refusal: InfraError | None,
        before_collect: Callable[[], None],
    ) -> None:
        self.cls = cls
        self.sem = ResizableSemaphore(cls.base_concurrency)
        self.policy = AimdPolicy(cls.min_concurrency, cls.max_concurrency) if cls.adaptive else None
        self.window = SampleWindow()
        # Heap entries are ``queue_key``s (ints: nothing for the garbage collector to track);
        # ``queued`` maps the key to the task for the live entries (a cancel just drops it).
        self.heap: list[int] = []
        self.queued: dict[int, TaskRecord] = {}
        self.idle: deque[asyncio.Future[TaskRecord]] = deque()
        self.refusal = refusal
        name = cls.name

        # Gauges are read when scraped, so the hot path never touches them.
        def limit() -> float:
            # Collected before the counters and histograms (metrics.py registers it first):
            # folding the batched values in here makes every scrape exact.
            before_collect()
            return self.sem.limit

        metrics.concurrency_limit.labels(name).set_function(limit)
        metrics.inflight_tasks.labels(name).set_function(lambda: self.sem.in_use)
        metrics.queue_depth.labels(name).set_function(lambda: len(self.queued))
        self.m_error_rate = metrics.error_rate.labels(name)
        # Counters and histograms are batched: see ``Scheduler.flush_metrics``.
        self.m_errors = BatchedCounter(metrics.task_errors_total.labels(name))
        self.m_wait = BatchedHistogram(metrics.task_wait_seconds.labels(name))
        self.gpu_wait = BatchedHistogram(metrics.gpu_wait_seconds.labels(name)) if cls.needs_gpu else None
        self.m_total = {
            s: BatchedCounter(metrics.tasks_total.labels(name, s.value)) for s in TaskStatus if s.terminal
        }
        self.m_duration = {
            s: BatchedHistogram(metrics.task_duration_seconds.labels(name, s.value))
            for s in (_COMPLETED, _FAILED, _CANCELLED)
        }

    def flush_metrics(self) -> None:
        self.m_errors.flush()
        self.m_wait.flush()
        if self.gpu_wait is not None:
            self.gpu_wait.flush()
        for counter in self.m_total.values():
            counter.flush()
        for histogram in self.m_duration.values():
            histogram.flush()
