"""The restart policy's pure parts (``services/monitor.py``); the monitor itself runs in the
manager tests against real backends (``test_manager.py``: a service killed from outside is
restarted, a clean exit is a stop, a service that keeps failing is given up)."""

from __future__ import annotations

import pytest
from hypothesis import given
from strategies import prior_restarts, restart_policies

from dspy_infra.errors import BackendError, HealthCheckFailed, MissingBinary, SpecError
from dspy_infra.models import RestartPolicy
from dspy_infra.services.monitor import failure_reason, restart_delay


@given(policy=restart_policies, restarts=prior_restarts)
def test_restart_delay_doubles_from_backoff_and_never_exceeds_the_cap(
    policy: RestartPolicy, restarts: int
) -> None:
    delay = restart_delay(policy, restarts)
    assert delay <= policy.max_backoff
    assert delay == min(policy.max_backoff, policy.backoff * 2**restarts)
    assert restart_delay(policy, restarts + 1) >= delay


@pytest.mark.parametrize(
    ("error", "reason"),
    [
        (HealthCheckFailed("s", last_failure="exited with code 3"), "exited"),
        (HealthCheckFailed("s", last_failure="connection refused"), "health_check"),
        (MissingBinary("redis-server", fix="install it"), "missing_binary"),
        (BackendError("engine gone"), "backend_error"),
        (SpecError("bad", field="image"), "invalid_spec"),
        (RuntimeError("boom"), "RuntimeError"),
    ],
)
def test_failed_restarts_are_counted_under_few_reasons(error: BaseException, reason: str) -> None:
    assert failure_reason(error) == reason
