"""The examples run as a user runs them (a fresh interpreter, from the checkout) and leave
nothing behind: no temporary state directory, no state under the user's home."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("example", ["quickstart.py", "workflow.py"])
def test_example_runs_and_cleans_up(tmp_path: Path, example: str) -> None:
    tmp, state = tmp_path / "tmp", tmp_path / "xdg-state"
    tmp.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("DSPY_INFRA_")}
    env.update(TMPDIR=str(tmp), XDG_STATE_HOME=str(state), PYTHONPATH=str(ROOT))
    done = subprocess.run(
        [sys.executable, str(ROOT / "examples" / example)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Traceback" not in done.stderr
    assert sorted(p.name for p in tmp.iterdir()) == []
    assert not state.exists() or not any(state.rglob("*.db"))
