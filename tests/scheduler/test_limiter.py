"""The resizable FIFO semaphore and the AIMD policy."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from strategies import limiter_ops, limiter_samples

from dspy_infra.scheduler.limiter import AimdPolicy, LimiterSample, ResizableSemaphore, SampleWindow


@settings(max_examples=150, deadline=None)
@given(initial=st.integers(min_value=1, max_value=5), ops=limiter_ops)
def test_never_grants_more_than_limit_and_never_leaks(initial: int, ops: list[tuple[str, int]]) -> None:
    sem = ResizableSemaphore(initial)
    holders = 0  # slots granted and not yet released
    for op, arg in ops:
        if op == "acquire":
            free = sem.in_use < sem.limit
            granted = sem.try_acquire()
            assert granted == free, "a free slot is always granted, a full limit never"
            if granted:
                holders += 1
                assert sem.in_use <= sem.limit, "a grant never takes in_use past the limit"
        elif op == "release" and holders:
            sem.release()
            holders -= 1
        elif op == "resize":
            sem.resize(arg)
        assert sem.in_use == holders, "a slot leaked or was double-counted"
    while holders:
        sem.release()
        holders -= 1
    assert sem.in_use == 0


def test_resize_down_lets_holders_finish_and_up_grants_at_once() -> None:
    sem = ResizableSemaphore(3)
    assert sem.try_acquire() and sem.try_acquire() and sem.try_acquire()
    sem.resize(1)  # nobody is interrupted
    assert sem.in_use == 3
    sem.release()
    sem.release()
    assert not sem.try_acquire(), "no grant while at or above the lowered limit"
    sem.release()
    assert sem.try_acquire() and sem.in_use == 1
    sem.resize(2)
    assert sem.try_acquire() and sem.in_use == 2


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
    # What the scheduler records as each task starts (inlined there: it runs once per task).
    window.started, window.wait_total = 2, 1.0 + 3.0
    window.record_outcome(error=True)
    window.record_outcome(error=False)
    window.record_outcome(error=False)
    window.record_outcome(error=False)
    sample = window.take(backlog=7, inflight=2)
    assert sample == LimiterSample(backlog=7, inflight=2, mean_wait=2.0, error_rate=0.25)
    assert window.take(0, 0) == LimiterSample(backlog=0, inflight=0)
