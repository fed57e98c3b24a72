"""The ``exec`` handler's short paths keep its promises: the sweep that reads only the pids
handed out since the command started still ends a descendant that left the group; the
cached environment follows changes to ours; a silent command still leaves its (empty) log."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import anyio
import pytest

from dspy_infra import ownership
from dspy_infra.config import Settings, load_settings
from dspy_infra.handlers.basic import ExecFailed, exec_handler
from dspy_infra.models import TaskSpec
from dspy_infra.ownership import ATTEMPT_ENV, find_marked, pid_mark, pids_since
from dspy_infra.scheduler.context import TaskContext
from dspy_infra.scheduler.task_logs import log_root, read_task_log


def _alive(pid: int) -> bool:
    st = ownership.proc_stat(pid)
    return st is not None and not st.dead


async def _gone(pid: int, within: float = 5.0) -> bool:
    deadline = time.monotonic() + within
    while _alive(pid) and time.monotonic() < deadline:  # noqa: ASYNC110 (another process; no event to await)
        await anyio.sleep(0.02)
    return not _alive(pid)


def _settings(kind: str, home: Path) -> Settings | None:
    if kind == "none":
        return None
    return load_settings(env={}, home=home, durable=kind == "durable")


def _ctx(settings: Settings | None, cmd: str, task_id: str = "t") -> TaskContext:
    return TaskContext(TaskSpec(task_id, payload={"handler": "exec", "cmd": cmd}), 1, settings)


@pytest.mark.parametrize("kind", ["none", "memory", "durable"])
@pytest.mark.parametrize("window", ["pids since the start", "every process"])
async def test_a_descendant_that_left_the_group_is_ended_when_the_command_exits(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kind: str, window: str
) -> None:
    # An attempt too old for the pid window reads every process; a loaded machine must not
    # turn the window variant into that one.
    monkeypatch.setattr(ownership, "PID_WINDOW_MAX_AGE", 0.0 if window == "every process" else 60.0)
    pidfile = tmp_path / "escaped.pid"
    # setsid: a new session, so the group kill misses it; only its marker finds it. Its
    # output goes elsewhere, so nothing but the sweep ends it.
    cmd = (
        f"setsid sh -c 'echo $$ > {pidfile}.tmp; mv {pidfile}.tmp {pidfile}; exec sleep 30'"
        f" </dev/null >/dev/null 2>&1 & while [ ! -s {pidfile} ]; do sleep 0.01; done"
    )
    with anyio.fail_after(20):
        await exec_handler(_ctx(_settings(kind, tmp_path / "home"), cmd))
    escaped = int(pidfile.read_text())
    assert await _gone(escaped), "a descendant that left the process group outlived its task"


async def test_a_background_child_that_let_go_of_the_pipes_is_ended_with_the_shell(tmp_path: Path) -> None:
    pidfile = tmp_path / "bg.pid"
    with anyio.fail_after(10):
        result = await exec_handler(_ctx(None, f"sleep 30 >/dev/null 2>&1 & echo $! > {pidfile}"))
    assert result["exit_code"] == 0
    assert await _gone(int(pidfile.read_text())), "a child left in the group outlived its task"


async def test_a_command_ended_by_a_signal_fails_with_the_negative_signal_number() -> None:
    with pytest.raises(ExecFailed) as failed:
        await exec_handler(_ctx(None, "kill -9 $$"))
    assert failed.value.exit_code == -9


async def test_the_command_sees_changes_to_our_environment_between_runs(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async def foo() -> str:
        return str((await exec_handler(_ctx(None, 'echo "[${DSPY_TEST_FOO-unset}]"')))["stdout"]).strip()

    monkeypatch.delenv("DSPY_TEST_FOO", raising=False)
    assert await foo() == "[unset]"
    monkeypatch.setenv("DSPY_TEST_FOO", "one")
    assert await foo() == "[one]"
    monkeypatch.setenv("DSPY_TEST_FOO", "two")
    assert await foo() == "[two]"
    monkeypatch.delenv("DSPY_TEST_FOO")
    assert await foo() == "[unset]"


@pytest.mark.parametrize("kind", ["memory", "durable"])
async def test_a_silent_command_leaves_an_empty_log_for_its_attempt(tmp_path: Path, kind: str) -> None:
    settings = _settings(kind, tmp_path / "home")
    assert settings is not None
    await exec_handler(_ctx(settings, "true", "quiet"))
    assert read_task_log(log_root(settings), "quiet", 1) == ""
    assert read_task_log(log_root(settings), "quiet") == "=== attempt 1 ===\n"
    assert list((tmp_path / "home").glob("attempts/*")) == []


# -- ownership.pids_since / find_marked(pids=...) ------------------------------------------


def test_every_process_started_after_a_mark_is_in_its_window(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ownership, "PID_WINDOW_MAX_AGE", 60.0)  # however slow the machine
    before = subprocess.Popen(["sleep", "30"])
    mark = pid_mark()
    assert mark is not None, "this test needs /proc"
    children = [subprocess.Popen(["sleep", "30"]) for _ in range(5)]
    try:
        window = pids_since(mark)
        assert window is not None
        assert all(any(c.pid in w for w in window) for c in children)
        assert not any(before.pid in w for w in window)
    finally:
        for proc in [before, *children]:
            proc.kill()
            proc.wait()


def test_a_window_wraps_at_pid_max_and_is_unknown_once_the_allocator_may_have_come_round(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    state = {"last": 32700, "forks": 1000}
    monkeypatch.setattr(ownership, "_last_pid", lambda: state["last"])
    monkeypatch.setattr(ownership, "_forks", lambda: state["forks"])
    real_read = ownership._read_proc
    monkeypatch.setattr(
        ownership, "_read_proc", lambda path: b"32768\n" if path.endswith("pid_max") else real_read(path)
    )
    mark = pid_mark()
    state.update(last=350, forks=1100)
    assert pids_since(mark) == [range(32701, 32768), range(1, 351)]
    state.update(last=32700, forks=1000)
    assert pids_since(mark) == [range(32701, 32701)]  # nothing handed out: an empty window
    state.update(last=32750, forks=1000 + (32768 - 300) // 2)
    assert pids_since(mark) is None  # as many forks as could have wrapped all the way round
    monkeypatch.setattr(ownership, "PID_WINDOW_MAX_AGE", 0.0)
    state.update(forks=1001)
    assert pids_since(mark) is None  # too old to trust
    assert pids_since(None) is None


THREADED = """
import sys, threading, time
for _ in range(4):
    threading.Thread(target=time.sleep, args=(30,), daemon=True).start()
print("ready", flush=True)
time.sleep(30)
"""


def test_a_window_finds_a_marked_process_once_and_never_its_threads(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ownership, "PID_WINDOW_MAX_AGE", 60.0)  # however slow Python starts
    scope = f"test-window-{os.getpid()}"
    mark = pid_mark()
    env = {**os.environ, ATTEMPT_ENV: ownership.attempt_marker(scope, "job", 1)}
    proc = subprocess.Popen([sys.executable, "-c", THREADED], env=env, stdout=subprocess.PIPE)
    try:
        assert proc.stdout is not None and proc.stdout.readline() == b"ready\n"
        window = pids_since(mark)
        assert window is not None
        # The threads' ids are in the window too, and /proc/TID answers for each of them.
        assert len(os.listdir(f"/proc/{proc.pid}/task")) == 5
        assert [st.pid for st in find_marked(scope, {"job"}, pids=window)] == [proc.pid]
        assert find_marked(scope, {"other"}, pids=window) == []
        # A window too wide to probe pid by pid filters the /proc listing instead.
        wide = [range(1, proc.pid + 1)]
        assert [st.pid for st in find_marked(scope, {"job"}, pids=wide)] == [proc.pid]
        assert find_marked(scope, {"job"}, pids=[range(1, proc.pid)]) == []
    finally:
        proc.kill()
        proc.wait()


async def test_an_argument_list_finds_its_program_on_our_path() -> None:
    # The child's environment is bytes (as the system holds it); the program is still looked
    # up on its PATH.
    spec = TaskSpec("t", payload={"handler": "exec", "cmd": ["echo", "hi"]})
    result = await exec_handler(TaskContext(spec, 1))
    assert result["stdout"] == "hi\n"
