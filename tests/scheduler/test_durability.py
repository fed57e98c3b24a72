"""A real SIGKILL: a child process holding a few hundred accepted tasks (some running) is
killed, a new process starts on the same state directory, and every task completes; none
is lost and none that was recorded completed runs again."""

from __future__ import annotations

import json
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

from harness import kill_when

N_TASKS = 300

CHILD = r"""
import asyncio, json, os, sys

from dspy_infra.config import load_settings
from dspy_infra.events import EventBus
from dspy_infra.metrics import InfraMetrics
from dspy_infra.models import TaskSpec
from dspy_infra.plugins import build_plugin_manager
from dspy_infra.scheduler.scheduler import Scheduler

mode, home, log, n = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
ids = [f"t{i:03d}" for i in range(n)]


async def main() -> None:
    settings = load_settings(
        env={},
        home=home,
        durable=True,
        shutdown_grace=0.1,
        task_classes={"work": {"min_concurrency": 8, "base_concurrency": 8, "max_concurrency": 8,
                               "adaptive": False}},
    )
    # One O_APPEND write per completion: a line is never torn, even by SIGKILL.
    log_fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    async def mark(ctx):
        await asyncio.sleep(float(ctx.payload["seconds"]))
        os.write(log_fd, f"{ctx.spec.id} {ctx.attempt}\n".encode())
        return {"pid": str(os.getpid())}

    pm = build_plugin_manager(load_entry_points=False)
    async with Scheduler(settings, bus=EventBus(), metrics=InfraMetrics(), plugins=pm) as sched:
        sched.register_handler("mark", mark)
        if mode == "submit":
            specs = [
                # Two attempts: the one a SIGKILL interrupts counts (it was recorded before
                # it started), so a task must have one left to finish after the restart.
                TaskSpec(tid, "work", {"handler": "mark", "seconds": "0.2" if i % 3 == 0 else "0.02"},
                         max_attempts=2)
                for i, tid in enumerate(ids)
            ]
            await sched.submit_many(specs)
            print("ACCEPTED", flush=True)
            await asyncio.Event().wait()  # until SIGKILL
        else:
            async for _ in sched.stream_results(ids, include_completed=True):
                pass
            final = {}
            for tid in ids:
                st = await sched.get(tid)
                final[tid] = {"status": st.status.value, "attempts": st.attempts, "pid": st.result.get("pid")}
            print(json.dumps(final), flush=True)


asyncio.run(main())
"""


def _rows(db: Path) -> dict[str, tuple[str, int]]:
    conn = sqlite3.connect(db)
    try:
        return {r[0]: (r[1], r[2]) for r in conn.execute("SELECT id, status, attempts FROM tasks")}
    finally:
        conn.close()


def _log(path: Path) -> list[str]:
    return [line.split()[0] for line in path.read_text().splitlines()] if path.exists() else []


def test_sigkill_loses_nothing_and_never_reruns_a_completed_task(tmp_path: Path) -> None:
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    home, log = tmp_path / "state", tmp_path / "completions.log"

    def child(mode: str) -> list[str]:
        return [sys.executable, str(script), mode, str(home), str(log), str(N_TASKS)]

    first = subprocess.Popen(child("submit"), stdout=subprocess.PIPE, text=True)
    assert first.stdout is not None
    accepted = first.stdout.readline().strip()
    # Let it get going: some tasks done, eight running, most still queued.
    kill_when(first, lambda: accepted != "ACCEPTED" or len(_log(log)) >= 20, timeout=20)
    assert accepted == "ACCEPTED"
    assert first.returncode == -signal.SIGKILL

    at_kill = _rows(home / "state.db")
    assert len(at_kill) == N_TASKS, "every accepted task is on disk"
    completed_at_kill = {tid for tid, (status, _) in at_kill.items() if status == "completed"}
    running_at_kill = {tid for tid, (status, _) in at_kill.items() if status == "running"}
    assert completed_at_kill and running_at_kill, "the kill should land mid-run"
    assert len(completed_at_kill) < N_TASKS
    lines_before = len(_log(log))

    second = subprocess.run(child("finish"), capture_output=True, text=True, timeout=120, check=False)
    assert second.returncode == 0, second.stderr
    final = json.loads(second.stdout.strip().splitlines()[-1])

    assert len(final) == N_TASKS
    assert {v["status"] for v in final.values()} == {"completed"}, "none lost, none failed"
    rerun = _log(log)[lines_before:]
    assert not set(rerun) & completed_at_kill, "a task recorded completed ran again"
    assert len(rerun) == len(set(rerun)), "the second run ran a task twice"
    assert set(rerun) | completed_at_kill >= set(final), "every task ran to completion somewhere"
    for tid in running_at_kill:
        assert final[tid]["attempts"] == at_kill[tid][1] + 1, "the interrupted attempt is counted"
    # Results of tasks finished before the kill are the first process's.
    pids = {final[tid]["pid"] for tid in completed_at_kill}
    assert pids == {str(first.pid)}
