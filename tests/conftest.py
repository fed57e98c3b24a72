"""Shared test plumbing. Engine-dependent tests call ``skip_or_fail``: a skip with the reason
locally, a failure when DSPY_INFRA_REQUIRE_ENGINES=1 (CI), so a missing engine never hides."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REQUIRE_ENGINES = os.environ.get("DSPY_INFRA_REQUIRE_ENGINES") == "1"


def skip_or_fail(reason: str) -> None:
    if REQUIRE_ENGINES:
        pytest.fail(f"DSPY_INFRA_REQUIRE_ENGINES=1 but {reason}", pytrace=False)
    pytest.skip(reason)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def state_dir(tmp_path: Path) -> Path:
    d = tmp_path / "state"
    d.mkdir()
    return d


@pytest.fixture(autouse=True)
def _isolated_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # No test reads the developer's config or talks to a server they happen to run.
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "xdg-state"))
    monkeypatch.delenv("DSPY_INFRA_ADDR", raising=False)
    monkeypatch.delenv("DSPY_INFRA_CONFIG", raising=False)
    monkeypatch.delenv("DSPY_INFRA_HOME", raising=False)
