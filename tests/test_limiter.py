"""The resizable FIFO semaphore and the AIMD policy."""

from __future__ import annotations

import asyncio

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from strategies import limiter_ops, limiter_samples

from dspy_infra.scheduler.limiter import AimdPolicy, LimiterSample, ResizableSemaphore, SampleWindow


async def _settle() -> None:
    for _ in range(3):
        await asyncio.sleep(0)


@settings(max_examples=150, deadline=None)
@given(initial=st.integers(min_value=1, max_value=5), ops=limiter_ops)
def test_never_grants_more_than_limit_and_never_leaks(initial: int, ops: list[tuple[str, int]]) -> None:
    async def scenario() -> None:
        sem = ResizableSemaphore(initial)
        holders = 0  # slots granted and not yet released
        waiters: list[asyncio.Task[None]] = []
        # (in_use, limit) as seen right after each grant: a grant never exceeds the limit.
        grants: list[tuple[int, int]] = []

        async def waiter() -> None:
            await sem.acquire()
            grants.append((sem.in_use, sem.limit))

        for op, arg in ops:
            if op == "acquire":
                if sem.try_acquire():
                    grants.append((sem.in_use, sem.limit))
                    holders += 1
                else:
                    waiters.append(asyncio.create_task(waiter()))
            elif op == "release" and holders:
                sem.release()
                holders -= 1
            elif op == "resize":
                sem.resize(arg)
            elif op == "cancel" and waiters:
                waiters[arg % len(waiters)].cancel()
            await _settle()
            # Tasks that got their slot count as holders now.
            for t in list(waiters):
                if t.done():
                    waiters.remove(t)
                    if not t.cancelled():
                        holders += 1
            assert sem.in_use == holders, "a slot leaked or was double-counted"
            # Holders above a lowered limit are allowed (resize down lets in-flight finish),
            # but no grant ever takes in_use past the limit of its moment.
            assert all(in_use <= limit for in_use, limit in grants)
            assert sem.waiting == len([t for t in waiters if not t.done()])
        # Drain: release everything, every live waiter eventually gets a slot.
        while holders or any(not t.done() for t in waiters):
            if holders:
                sem.release()
                holders -= 1
            await _settle()
            for t in list(waiters):
                if t.done():
                    waiters.remove(t)
                    if not t.cancelled():
                        holders += 1
        assert sem.in_use == 0

    asyncio.run(scenario())


async def test_grants_are_fifo() -> None:
    sem = ResizableSemaphore(1)
    assert sem.try_acquire()
    order: list[int] = []

    async def take(i: int) -> None:
        await sem.acquire()
        order.append(i)

    tasks = [asyncio.create_task(take(i)) for i in range(5)]
    await _settle()
    for _ in range(5):
        sem.release()
        await _settle()
    await asyncio.gather(*tasks)
    assert order == [0, 1, 2, 3, 4]


async def test_resize_up_wakes_waiters_and_down_lets_holders_finish() -> None:
    sem = ResizableSemaphore(1)
    assert sem.try_acquire()
    tasks = [asyncio.create_task(sem.acquire()) for _ in range(3)]
    await _settle()
    assert sem.waiting == 3
    sem.resize(3)
    await _settle()
    assert sem.in_use == 3 and sem.waiting == 1
    sem.resize(1)  # nobody is interrupted
    assert sem.in_use == 3
    sem.release()
    sem.release()
    await _settle()
    assert sem.in_use == 1 and sem.waiting == 1, "no grant while above the lowered limit"
    sem.release()
    await _settle()
    assert sem.in_use == 1 and sem.waiting == 0
    await asyncio.gather(*tasks)


async def test_cancelled_waiter_never_leaks_its_slot() -> None:
    sem = ResizableSemaphore(1)
    assert sem.try_acquire()
    waiter = asyncio.create_task(sem.acquire())
    await _settle()
    sem.release()  # grants the slot to the waiter ...
    waiter.cancel()  # ... which is cancelled before it runs
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert sem.in_use == 0
    assert sem.try_acquire()


def test_release_without_acquire_and_bad_limits_are_refused() -> None:
    with pytest.raises(ValueError, match="limit must be >= 1"):
        ResizableSemaphore(0)
    sem = ResizableSemaphore(1)
    with pytest.raises(RuntimeError, match="without a matching acquire"):
        sem.release()
    with pytest.raises(ValueError):
        sem.resize(0)


@settings(max_examples=300)
@given(
    bounds=st.tuples(st.integers(1, 20), st.integers(0, 20)),
    step=st.integers(1, 4),
    start=st.integers(1, 40),
    seq=st.lists(limiter_samples, max_size=30),
)
def test_policy_stays_within_bounds(
    bounds: tuple[int, int], step: int, start: int, seq: list[LimiterSample]
) -> None:
    lo, extra = bounds
    policy = AimdPolicy(lo, lo + extra, step=step)
    limit = max(lo, min(lo + extra, start))
    for sample in seq:
        new = policy.next_limit(limit, sample)
        assert lo <= new <= lo + extra
        assert abs(new - limit) <= step
        limit = new


@settings(max_examples=200)
@given(sample=limiter_samples, current=st.integers(2, 9))
def test_policy_direction(sample: LimiterSample, current: int) -> None:
    policy = AimdPolicy(1, 10)
    new = policy.next_limit(current, sample)
    overloaded = sample.error_rate >= policy.error_threshold or sample.mean_wait >= policy.wait_threshold
    saturated = sample.backlog > 0 and sample.inflight >= current and sample.error_rate <= policy.low_error
    if overloaded:
        assert new == current - 1
    elif saturated:
        assert new == current + 1
    else:
        assert new == current


def test_policy_raises_under_backlog_then_cuts_on_errors() -> None:
    policy = AimdPolicy(2, 6)
    limit = 2
    for _ in range(10):
        limit = policy.next_limit(limit, LimiterSample(backlog=50, inflight=limit))
    assert limit == 6
    for _ in range(10):
        limit = policy.next_limit(limit, LimiterSample(backlog=50, inflight=limit, error_rate=0.5))
    assert limit == 2


def test_sample_window_means_and_resets() -> None:
    window = SampleWindow()
    window.record_start(1.0)
    window.record_start(3.0)
    window.record_outcome(error=True)
    window.record_outcome(error=False)
    window.record_outcome(error=False)
    window.record_outcome(error=False)
    sample = window.take(backlog=7, inflight=2)
    assert sample == LimiterSample(backlog=7, inflight=2, mean_wait=2.0, error_rate=0.25)
    assert window.take(0, 0) == LimiterSample(backlog=0, inflight=0)
