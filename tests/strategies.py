"""Shared hypothesis strategies (one place, as the house rules ask). Others may import them."""

from __future__ import annotations

import string

from hypothesis import strategies as st

from dspy_infra.models import TaskSpec
from dspy_infra.scheduler.limiter import LimiterSample

__all__ = [
    "attempt_plans",
    "hostile_json",
    "hostile_task_kwargs",
    "limiter_ops",
    "limiter_samples",
    "poisoned_batches",
    "priorities",
    "task_ids",
    "task_outcomes",
    "task_specs",
]

#: Task ids as users write them (non-empty, short, printable).
task_ids = st.text(alphabet=string.ascii_letters + string.digits + "-_.", min_size=1, max_size=24)

#: Priorities, small enough that ties are common (FIFO within a priority gets exercised).
priorities = st.integers(min_value=-3, max_value=3)

#: What a test task does per attempt: "ok" or "fail"; a list per task, one entry per attempt.
task_outcomes = st.lists(st.sampled_from(["ok", "fail"]), min_size=1, max_size=5)

#: Operations on a ResizableSemaphore: ("acquire", _), ("release", _), ("resize", n), ("cancel", i).
limiter_ops = st.lists(
    st.one_of(
        st.tuples(st.just("acquire"), st.just(0)),
        st.tuples(st.just("release"), st.just(0)),
        st.tuples(st.just("resize"), st.integers(min_value=1, max_value=6)),
        st.tuples(st.just("cancel"), st.integers(min_value=0, max_value=20)),
    ),
    max_size=60,
)

#: One interval of limiter observations, anywhere from idle to overloaded.
limiter_samples = st.builds(
    LimiterSample,
    backlog=st.integers(min_value=0, max_value=1000),
    inflight=st.integers(min_value=0, max_value=100),
    mean_wait=st.floats(min_value=0, max_value=600, allow_nan=False),
    error_rate=st.floats(min_value=0, max_value=1, allow_nan=False),
)


@st.composite
def task_specs(draw: st.DrawFn, task_class: str = "cpu_short", handler: str = "noop") -> TaskSpec:
    """A valid TaskSpec with a random id, priority, attempts and payload extras."""
    extra = draw(
        st.dictionaries(
            st.text(string.ascii_lowercase, min_size=1, max_size=8).filter(lambda k: k != "handler"),
            st.text(string.printable, max_size=20),
            max_size=3,
        )
    )
    return TaskSpec(
        id=draw(task_ids),
        task_class=task_class,
        payload={"handler": handler, **extra},
        priority=draw(priorities),
        max_attempts=draw(st.integers(min_value=1, max_value=4)),
    )


@st.composite
def poisoned_batches(draw: st.DrawFn) -> list[list[tuple[int, bool]]]:
    """Concurrent submit batches of (unique number, refused by the store?) pairs."""
    flags = draw(st.lists(st.booleans(), min_size=1, max_size=40))
    cuts = sorted(draw(st.lists(st.integers(min_value=0, max_value=len(flags)), max_size=5)))
    numbered = list(enumerate(flags))
    batches: list[list[tuple[int, bool]]] = []
    start = 0
    for cut in [*cuts, len(flags)]:
        if cut > start:
            batches.append(numbered[start:cut])
            start = cut
    return batches


#: What each run of a task does, in order: finish, raise, or take its process down ("crash").
attempt_plans = st.lists(st.sampled_from(["ok", "fail", "crash"]), min_size=1, max_size=6)


#: JSON-ish values including what no store can hold (lone surrogates, NUL, huge ints, NaN).
hostile_json = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
    max_leaves=12,
)

#: Keyword arguments for TaskSpec, valid or not.
hostile_task_kwargs = st.fixed_dictionaries(
    {
        "id": st.text(min_size=0, max_size=10),
        "payload": st.dictionaries(st.text(max_size=5), hostile_json, max_size=4),
        "priority": st.integers(min_value=-(2**40), max_value=2**40),
        "timeout": st.none() | st.floats(allow_nan=True, allow_infinity=True) | st.integers(-5, 10**12),
        "max_attempts": st.integers(min_value=-1, max_value=120),
    }
)
