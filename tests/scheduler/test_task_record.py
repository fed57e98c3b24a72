"""``TaskRecord`` builds its public views with positional arguments (cheaper on the hot path);
they must equal the keyword forms field for field, whatever order the model classes declare."""

from __future__ import annotations

from typing import Any

from hypothesis import given
from hypothesis import strategies as st
from strategies import task_specs

from dspy_infra.models import TaskResult, TaskSpec, TaskState, TaskStatus
from dspy_infra.scheduler.task import TaskRecord

times = st.floats(min_value=0, max_value=2e9, allow_nan=False)


@given(
    spec=task_specs(),
    status=st.sampled_from(list(TaskStatus)),
    attempts=st.integers(0, 100),
    result=st.dictionaries(st.text(max_size=5), st.integers(), max_size=3),
    error=st.text(max_size=20),
    stamps=st.tuples(times, times, times, times, times),
)
def test_state_and_result_equal_their_keyword_forms(
    spec: TaskSpec,
    status: TaskStatus,
    attempts: int,
    result: dict[str, Any],
    error: str,
    stamps: tuple[float, float, float, float, float],
) -> None:
    submitted, ready, started, completed, duration = stamps
    rec = TaskRecord(spec, 7, submitted)
    rec.ready_at = ready
    rec.status, rec.attempts, rec.result, rec.error = status, attempts, result, error
    rec.started_at, rec.completed_at, rec.duration_ms = started, completed, duration
    assert rec.state() == TaskState(
        spec=spec,
        status=status,
        attempts=attempts,
        result=result,
        error=error,
        submitted_at=submitted,
        started_at=started,
        completed_at=completed,
        duration_ms=duration,
    )
    assert rec.to_result() == TaskResult.of(rec)
    # Copies: a caller changing its view leaves the record alone.
    assert rec.state().result is not rec.result and rec.to_result().result is not rec.result
