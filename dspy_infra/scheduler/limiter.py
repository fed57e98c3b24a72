"""Adaptive concurrency per task class: a resizable FIFO semaphore plus an AIMD-like policy.

``ResizableSemaphore`` counts slots under a limit that can change: ``resize`` down never
interrupts holders (the in-flight work finishes, new grants wait until ``in_use`` drops below
the new limit); the scheduler's queue decides who gets the next free slot.

``AimdPolicy`` is pure: given the current limit and one ``LimiterSample`` (backlog, in-flight,
mean wait, error rate over the last interval) it returns the next limit. ``SampleWindow``
accumulates the raw observations between samples. The scheduler owns the loop that calls them
once per ``settings.limiter_interval``; tests feed samples directly.
"""

from __future__ import annotations

import attrs

__all__ = ["AimdPolicy", "LimiterSample", "ResizableSemaphore", "SampleWindow"]


class ResizableSemaphore:
    """A counting limit whose size can change while it is in use.

    ``try_acquire`` takes a slot when one is free, ``release`` gives it back; ``resize``
    never interrupts holders (after a lowered limit, new grants wait until ``in_use`` drops
    below it). It holds no waiters: the scheduler keeps the tasks that wait in its own
    priority queue and tries again when a slot is released.
    """

    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError(f"limit must be >= 1, got {limit}")
        self._limit = limit
        self._in_use = 0

    @property
    def limit(self) -> int:
        return self._limit

    @property
    def in_use(self) -> int:
        return self._in_use

    def try_acquire(self) -> bool:
        """Take a slot if one is free under the current limit."""
        if self._in_use < self._limit:
            self._in_use += 1
            return True
        return False

    def release(self) -> None:
        if self._in_use <= 0:
            raise RuntimeError("release() without a matching acquire()")
        self._in_use -= 1

    def resize(self, limit: int) -> None:
        """Change the limit; holders above a lower limit keep their slots until release."""
        if limit < 1:
            raise ValueError(f"limit must be >= 1, got {limit}")
        self._limit = limit


@attrs.frozen
class LimiterSample:
    """What one class looked like over one sampling interval."""

    #: Tasks waiting for a slot at sampling time.
    backlog: int
    #: Tasks holding a slot at sampling time.
    inflight: int
    #: Mean seconds from ready to start, over tasks started in the interval (0 if none).
    mean_wait: float = 0.0
    #: Failed attempts / finished attempts in the interval (0 if none finished).
    error_rate: float = 0.0


@attrs.frozen
class AimdPolicy:
    """Raise by ``step`` while a backlog builds with few errors; cut by ``step`` when the error
    rate or the mean wait passes its threshold; always within [``min_limit``, ``max_limit``].

    A wait past ``wait_threshold`` means the work behind the class (a GPU, a remote API) is
    saturated: more parallel attempts only make each slower, so the limit backs off. The
    default threshold is high so an ordinary backlog raises the limit instead.
    """

    min_limit: int
    max_limit: int
    step: int = 1
    #: Cut when at least this fraction of attempts failed.
    error_threshold: float = 0.2
    #: Raise only while the error rate is at most this.
    low_error: float = 0.05
    #: Cut when tasks waited longer than this on average (seconds).
    wait_threshold: float = 60.0

    def __attrs_post_init__(self) -> None:
        if not 1 <= self.min_limit <= self.max_limit:
            raise ValueError(f"need 1 <= min_limit ({self.min_limit}) <= max_limit ({self.max_limit})")
        if self.step < 1:
            raise ValueError(f"step must be >= 1, got {self.step}")

    def next_limit(self, current: int, sample: LimiterSample) -> int:
        if sample.error_rate >= self.error_threshold or sample.mean_wait >= self.wait_threshold:
            proposed = current - self.step
        elif sample.backlog > 0 and sample.inflight >= current and sample.error_rate <= self.low_error:
            proposed = current + self.step
        else:
            proposed = current
        return max(self.min_limit, min(self.max_limit, proposed))


class SampleWindow:
    """Counts waits and attempt outcomes between two samples (cheap: a few additions)."""

    __slots__ = ("errors", "finished", "started", "wait_total")

    def __init__(self) -> None:
        self.started = 0
        self.wait_total = 0.0
        self.finished = 0
        self.errors = 0

    def record_outcome(self, error: bool) -> None:
        self.finished += 1
        if error:
            self.errors += 1

    def take(self, backlog: int, inflight: int) -> LimiterSample:
        """The sample for the interval that ends now; starts a new interval."""
        sample = LimiterSample(
            backlog=backlog,
            inflight=inflight,
            mean_wait=self.wait_total / self.started if self.started else 0.0,
            error_rate=self.errors / self.finished if self.finished else 0.0,
        )
        self.started = self.finished = self.errors = 0
        self.wait_total = 0.0
        return sample
