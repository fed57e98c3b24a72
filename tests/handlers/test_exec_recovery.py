"""A real SIGKILL of a scheduler with ``exec`` tasks running: after the restart, the killed
attempts' processes (their process group, and descendants that left it with ``setsid``) are
ended before the tasks run again, so no two runs of one task overlap. Same for workflow steps.

Each task runs ``step.sh ID``, which appends timestamped ``start`` / ``end`` lines to a shared
log; its first run sleeps 6 s and starts an escaped ``setsid`` child, a re-run is short. The
re-run also writes ``alive`` if it finds its first run's shell still alive when it starts.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from harness import finish, wait_until

from dspy_infra.ownership import proc_stat

N_TASKS = 4

STEP_SH = r"""
ID=$1
LOG=__LOG__
PIDS=__MARKS__/$ID.pids
trap 'echo "end $ID $(date +%s.%N) killed" >> $LOG; exit 143' TERM
if [ -e $PIDS ]; then
    # A re-run: every process of the first run must be gone (dead or a zombie) by now.
    for pid in $(cat $PIDS); do
        state=$(cut -d' ' -f3 /proc/$pid/stat 2>/dev/null)
        if [ -n "$state" ] && [ "$state" != Z ]; then echo "alive $ID $pid" >> $LOG; fi
    done
    echo "start $ID $$ $(date +%s.%N)" >> $LOG
    sleep 0.2
else
    echo "start $ID $$ $(date +%s.%N)" >> $LOG
    echo $$ >> $PIDS
    # A descendant that leaves the process group: only the attempt marker finds it.
    setsid sh -c "echo \$\$ >> $PIDS; exec sleep 30" &
    sleep 6 &
    echo $! >> $PIDS
    wait $!
fi
echo "end $ID $(date +%s.%N) done" >> $LOG
"""

TASKS_CHILD = r"""
import asyncio, json, sys

from dspy_infra.config import load_settings
from dspy_infra.events import EventBus
from dspy_infra.metrics import InfraMetrics
from dspy_infra.models import TaskSpec
from dspy_infra.plugins import build_plugin_manager
from dspy_infra.scheduler.scheduler import Scheduler

mode, home, script, n = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
ids = [f"t{i}" for i in range(n)]


async def main() -> None:
    settings = load_settings(
        env={}, home=home, durable=True, shutdown_grace=0.1,
        task_classes={"work": {"min_concurrency": n, "base_concurrency": n, "max_concurrency": n,
                               "adaptive": False}},
    )
    pm = build_plugin_manager(load_entry_points=False)
    async with Scheduler(settings, bus=EventBus(), metrics=InfraMetrics(), plugins=pm) as sched:
        if mode == "submit":
            await sched.submit_many(
                [TaskSpec(tid, "work", {"handler": "exec", "cmd": f"sh {script} {tid}"}, max_attempts=3)
                 for tid in ids]
            )
            print("ACCEPTED", flush=True)
            await asyncio.Event().wait()  # until SIGKILL
        else:
            async for _ in sched.stream_results(ids, include_completed=True):
                pass
            final = {tid: (await sched.get(tid)).status.value for tid in ids}
            print(json.dumps(final), flush=True)


asyncio.run(main())
"""

WORKFLOW_CHILD = r"""
import asyncio, json, sys
from dspy_infra.config import Settings
from dspy_infra.events import EventBus
from dspy_infra.metrics import InfraMetrics
from dspy_infra.plugins import build_plugin_manager
from dspy_infra.scheduler.scheduler import Scheduler
from dspy_infra.workflows import WorkflowEngine

async def main(home, spec):
    settings = Settings(home=home, shutdown_grace=0.1)
    bus = EventBus()
    plugins = build_plugin_manager(load_entry_points=False)
    async with Scheduler(settings, bus=bus, metrics=InfraMetrics(), plugins=plugins) as scheduler:
        async with WorkflowEngine(settings, scheduler=scheduler, bus=bus) as engine:
            await engine.create_workflow("overlap", spec=spec)
            run_id = await engine.start_run("overlap", idempotency_key="once")
            print(json.dumps({"run_id": run_id}), flush=True)
            async for update in engine.run_status(run_id):
                pass
            run = await engine.get_run(run_id)
            print(json.dumps({"run_id": run_id, "status": str(run.status),
                              "steps": {n: str(s.status) for n, s in run.steps.items()}}), flush=True)

asyncio.run(main(sys.argv[1], sys.argv[2]))
"""


def _alive(pid: int) -> bool:
    st = proc_stat(pid)
    return st is not None and not st.dead


class Runs:
    """The shared log of ``step.sh``: start/end lines per task id."""

    def __init__(self, tmp_path: Path) -> None:
        self.log = tmp_path / "runs.log"
        self.marks = tmp_path / "marks"
        self.marks.mkdir()
        self.script = tmp_path / "step.sh"
        self.script.write_text(
            STEP_SH.replace("__LOG__", str(self.log)).replace("__MARKS__", str(self.marks))
        )
        self.log.touch()

    def lines(self) -> list[list[str]]:
        return [line.split() for line in self.log.read_text().splitlines() if line.strip()]

    def started(self, ids: list[str]) -> bool:
        """Every task's first run has recorded its three processes."""
        return all(len(self.first_pids(tid)) == 3 for tid in ids)

    def first_pids(self, tid: str) -> list[int]:
        path = self.marks / f"{tid}.pids"
        return [int(p) for p in path.read_text().split()] if path.exists() else []

    def pids(self) -> list[int]:
        """Every process a first run started (to check, and to clean up)."""
        return [int(p) for path in self.marks.glob("*.pids") for p in path.read_text().split()]

    def overlaps(self, ids: list[str]) -> dict[str, str]:
        """Per task, why two of its runs overlapped (absent: they did not)."""
        bad: dict[str, str] = {}
        lines = self.lines()
        for tid in ids:
            alive = [f[2] for f in lines if f[0] == "alive" and f[1] == tid]
            if alive:
                bad[tid] = f"processes {alive} of its first run were alive when the re-run started"
                continue
            starts = [float(f[3]) for f in lines if f[0] == "start" and f[1] == tid]
            ends = [float(f[2]) for f in lines if f[0] == "end" and f[1] == tid]
            if len(starts) != 2:
                bad[tid] = f"ran {len(starts)} times, expected 2 (killed, then re-run)"
            elif ends and ends[0] > starts[1] and len(ends) == 2:
                bad[tid] = f"the first run ended at {ends[0]}, after the re-run started at {starts[1]}"
            elif not any(f[0] == "end" and f[1] == tid and f[-1] == "done" for f in lines):
                bad[tid] = "the re-run never finished"
        return bad


@pytest.fixture
def runs(tmp_path: Path) -> Iterator[Runs]:
    r = Runs(tmp_path)
    yield r
    # Whatever happens (the old code leaves them), no step process outlives the test.
    for pid in r.pids():
        st = proc_stat(pid)
        if st is not None and not st.dead:
            for target, send in ((st.pgid, os.killpg), (pid, os.kill)):
                try:
                    send(target, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass


def _sigkill(proc: subprocess.Popen[str]) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    assert proc.returncode == -signal.SIGKILL


def test_sigkilled_exec_tasks_are_ended_before_they_run_again(tmp_path: Path, runs: Runs) -> None:
    home = tmp_path / "state"
    ids = [f"t{i}" for i in range(N_TASKS)]

    def child(mode: str) -> list[str]:
        return [sys.executable, "-c", TASKS_CHILD, mode, str(home), str(runs.script), str(N_TASKS)]

    first = subprocess.Popen(child("submit"), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert first.stdout is not None
        assert first.stdout.readline().strip() == "ACCEPTED"
        wait_until(lambda: runs.started(ids), 30, "every task to start")
    finally:
        _sigkill(first)
    first_pids = runs.pids()
    assert len(first_pids) == 3 * N_TASKS
    assert all(_alive(pid) for pid in first_pids), "the kill left the task processes running (as it does)"

    second = subprocess.run(child("finish"), capture_output=True, text=True, timeout=60, check=False)
    assert second.returncode == 0, second.stderr
    final = json.loads(second.stdout.strip().splitlines()[-1])
    assert final == dict.fromkeys(ids, "completed")

    assert runs.overlaps(ids) == {}, runs.log.read_text()
    assert [pid for pid in first_pids if _alive(pid)] == [], (
        "a process of a killed attempt survived the restart"
    )
    # Nothing left behind: every attempt record is gone.
    assert list((home / "attempts").glob("*.json")) == []


def _workflow_spec(script: Path, names: list[str]) -> str:
    return json.dumps(
        {
            "steps": [
                {
                    "name": n,
                    "max_attempts": 2,
                    "payload": {"handler": "exec", "cmd": f"sh {script} overlap.{n}"},
                }
                for n in names
            ]
        }
    )


def test_sigkilled_workflow_steps_are_ended_before_they_run_again(tmp_path: Path, runs: Runs) -> None:
    home = tmp_path / "state"
    names = [f"s{i}" for i in range(N_TASKS)]
    spec = _workflow_spec(runs.script, names)

    def child() -> subprocess.Popen[str]:
        return subprocess.Popen(
            [sys.executable, "-c", WORKFLOW_CHILD, str(home), spec],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    first = child()
    try:
        assert first.stdout is not None
        run_id = json.loads(first.stdout.readline())["run_id"]
        logged = [f"overlap.{n}" for n in names]
        wait_until(lambda: runs.started(logged), 30, "every step to start")
    finally:
        _sigkill(first)
    first_pids = runs.pids()
    assert all(_alive(pid) for pid in first_pids)

    second = child()
    out, err = finish(second)
    assert second.returncode == 0, err
    final = json.loads(out.splitlines()[-1])
    assert final["run_id"] == run_id and final["status"] == "completed", final
    assert set(final["steps"]) == set(names)

    assert runs.overlaps(logged) == {}, runs.log.read_text() + err
    assert [pid for pid in first_pids if _alive(pid)] == []


async def test_a_running_attempt_is_recorded_and_forgotten_when_it_ends(tmp_path: Path) -> None:
    import anyio

    from dspy_infra.config import load_settings
    from dspy_infra.handlers.basic import exec_handler
    from dspy_infra.models import TaskSpec
    from dspy_infra.ownership import AttemptRegistry
    from dspy_infra.scheduler.context import TaskContext

    home = tmp_path / "home"
    registry = AttemptRegistry(home / "attempts")
    settings = load_settings(env={}, home=home)
    ctx = TaskContext(TaskSpec("rec", payload={"handler": "exec", "cmd": "sleep 30"}), 2, settings)
    async with anyio.create_task_group() as tg:
        tg.start_soon(exec_handler, ctx)
        for _ in range(500):
            recs = [r for _, r in registry.records() if r is not None and r.pid]
            if recs:
                break
            await anyio.sleep(0.01)
        (rec,) = recs
        st = proc_stat(rec.pid)
        assert st is not None and (rec.task_id, rec.attempt) == ("rec", 2)
        assert rec.start_time == st.start_time and rec.pgid == st.pgid == rec.pid
        assert rec.marker.endswith(":rec:2")
        tg.cancel_scope.cancel()
    assert registry.records() == []
    for _ in range(100):
        if not _alive(rec.pid):
            break
        await anyio.sleep(0.02)
    assert not _alive(rec.pid)


def _recorded_leftover_ignoring_sigterm(home: Path, ready: Path) -> subprocess.Popen[bytes]:
    """A process of a crashed attempt of task "stubborn", recorded as such, ignoring SIGTERM."""
    from dspy_infra.ownership import AttemptRecord, AttemptRegistry, attempt_marker, durable_scope

    marker = attempt_marker(durable_scope(home), "stubborn", 1)
    code = (
        "import signal, time, pathlib; signal.signal(signal.SIGTERM, signal.SIG_IGN);"
        f" pathlib.Path({str(ready)!r}).touch(); time.sleep(60)"
    )
    env = {**os.environ, "DSPY_INFRA_ATTEMPT": marker}
    leftover = subprocess.Popen([sys.executable, "-c", code], env=env, start_new_session=True)
    wait_until(ready.exists, 10, "the leftover to start")
    st = proc_stat(leftover.pid)
    assert st is not None
    AttemptRegistry(home / "attempts").write(
        AttemptRecord("stubborn", 1, marker, pid=leftover.pid, pgid=leftover.pid, start_time=st.start_time)
    )
    return leftover


async def test_recovery_waits_for_leftovers_off_the_event_loop(tmp_path: Path) -> None:
    """A leftover that ignores SIGTERM holds the start for the whole grace period; the event
    loop keeps running meanwhile (a watchdog measures the longest gap between its ticks)."""
    import anyio

    from dspy_infra.config import load_settings
    from dspy_infra.events import EventBus
    from dspy_infra.metrics import InfraMetrics
    from dspy_infra.plugins import build_plugin_manager
    from dspy_infra.scheduler.scheduler import Scheduler

    home = tmp_path / "home"
    home.mkdir()
    leftover = _recorded_leftover_ignoring_sigterm(home, tmp_path / "ready")
    try:
        longest = 0.0
        stop = anyio.Event()

        async def watchdog() -> None:
            nonlocal longest
            last = time.monotonic()
            while not stop.is_set():
                await anyio.sleep(0.01)
                now = time.monotonic()
                longest, last = max(longest, now - last), now

        settings = load_settings(env={}, home=home, shutdown_grace=0.1)
        pm = build_plugin_manager(load_entry_points=False)
        async with anyio.create_task_group() as tg:
            tg.start_soon(watchdog)
            async with Scheduler(settings, bus=EventBus(), metrics=InfraMetrics(), plugins=pm):
                # SIGTERM was ignored, so SIGKILL ended it.
                assert leftover.poll() == -signal.SIGKILL or proc_stat(leftover.pid) is None
            stop.set()
        # The bug held the loop for the whole 2 s grace (DEFAULT_GRACE) between SIGTERM and
        # SIGKILL; the rest of the bound is room for a loaded machine.
        assert longest < 1.5, f"the event loop stalled {longest:.2f}s while leftovers were ended"
    finally:
        leftover.kill()
        leftover.wait()
