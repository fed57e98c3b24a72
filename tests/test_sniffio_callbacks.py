"""With sniffio installed (selenium, trio and many HTTP clients bring it), anyio finds the
running async library in a loop callback only through sniffio's context variable. The
scheduler starts workers from such callbacks (the store's commit callbacks, sent from its
writer thread; retry timers), and under a plain ``asyncio.run`` nobody sets that variable:
every start failed with "Not currently running on any asynchronous event loop" and the tasks
never ran. Run in a fresh interpreter, as an app would (the pytest plugin sets the variable
for the test's own loop, which would hide the bug)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from engines import skip_or_fail

ROOT = Path(__file__).resolve().parent.parent
APP = """
import asyncio, sys
from dspy_infra.config import load_settings
from dspy_infra.infra import Infra

async def main():
    settings = load_settings(home=sys.argv[1], backend="process", mode="embedded")
    async with Infra(settings, load_entry_points=False) as infra:
        await infra.submit_task("once", payload={"handler": "noop"})
        await infra.submit_task("retried", payload={"handler": "fail"}, max_attempts=2)
        once = await infra.wait("once", timeout=30)
        retried = await infra.wait("retried", timeout=60)
        print(once.status, retried.status, (await infra.get_task("retried")).attempts)

asyncio.run(main())
"""


def test_tasks_run_and_retry_under_plain_asyncio_with_sniffio_installed(tmp_path: Path) -> None:
    try:
        import sniffio  # noqa: F401
    except ImportError:
        skip_or_fail("sniffio is not installed (it comes with the dev extras' selenium)")
    done = subprocess.run(
        [sys.executable, "-c", APP, str(tmp_path / "state")],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.split() == ["completed", "failed", "2"], done.stdout + done.stderr
    assert "commit callback failed" not in done.stderr
