"""Shared hypothesis strategies (one place, as the house rules ask). Others may import them."""

from __future__ import annotations

import string

from hypothesis import strategies as st

from dspy_infra.models import TaskSpec
from dspy_infra.scheduler.limiter import LimiterSample

__all__ = [
    "limiter_ops",
    "limiter_samples",
    "priorities",
    "task_ids",
    "task_outcomes",
    "task_specs",
    "wire_json_objects",
    "wire_json_values",
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


#: JSON values the stores and the wire hold: 64-bit ints, finite floats, UTF-8 text without
#: NUL (values.check_text refuses it), nesting.
wire_json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(1 << 63), max_value=(1 << 63) - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(st.characters(exclude_categories=("Cs",), exclude_characters="\x00"), max_size=12),
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(
            st.text(st.characters(exclude_categories=("Cs",), exclude_characters="\x00"), max_size=8),
            children,
            max_size=4,
        )
    ),
    max_leaves=20,
)

#: JSON objects (payloads, results, workflow inputs and outputs) as they travel on the wire.
wire_json_objects = st.dictionaries(
    st.text(st.characters(exclude_categories=("Cs",), exclude_characters="\x00"), max_size=12),
    wire_json_values,
    max_size=6,
)
