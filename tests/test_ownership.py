"""ownership.py: a process is its pid and start time; attempts' processes are found by
record, process group and environment marker, and ended with SIGTERM then SIGKILL."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from strategies import any_task_ids, output_chunks

from dspy_infra.handlers.basic import _Capture
from dspy_infra.ownership import (
    ATTEMPT_ENV,
    LABEL_OWNER,
    LABEL_OWNER_PID,
    LABEL_SERVICE,
    AttemptRecord,
    AttemptRegistry,
    ServiceOwnership,
    _marker_task,
    attempt_marker,
    end_attempt_processes,
    end_leftover_attempts,
    find_marked,
    proc_stat,
    reap_before_start,
    same_process,
    sweep_action,
)
from dspy_infra.scheduler.task_logs import AttemptLog, read_task_log

SCOPE = f"test-{os.getpid()}"


def _spawn(code: str, marker: str | None = None) -> subprocess.Popen[bytes]:
    env = dict(os.environ)
    if marker is not None:
        env[ATTEMPT_ENV] = marker
    return subprocess.Popen([sys.executable, "-c", code], env=env, start_new_session=True)


def _wait_file(path: Path) -> None:
    for _ in range(200):
        if path.exists() and path.read_text():
            return
        time.sleep(0.02)
    raise AssertionError(f"{path} never appeared")


@given(any_task_ids)
def test_a_marker_names_its_task_whatever_the_id(task_id: str) -> None:
    marker = attempt_marker(SCOPE, task_id, 3)
    assert _marker_task(marker, SCOPE) == task_id
    assert _marker_task(marker, SCOPE + "x") is None
    assert _marker_task(marker, SCOPE[:-1]) is None


def test_a_reused_pid_is_not_the_same_process() -> None:
    me = proc_stat(os.getpid())
    assert me is not None and same_process(me.pid, me.start_time)
    assert not same_process(me.pid, me.start_time + 1)
    assert not same_process(0, 0) and not same_process(-1, 0)


def test_a_zombie_counts_as_dead() -> None:
    child = subprocess.Popen(["true"])
    for _ in range(200):
        st = proc_stat(child.pid)
        if st is not None and st.dead:
            break
        time.sleep(0.01)
    st = proc_stat(child.pid)
    assert st is not None and st.state == "Z", "the unreaped child should be a zombie"
    assert not same_process(child.pid, st.start_time)
    # Ending a zombie's attempt returns at once: nothing to signal, no grace to sit through.
    report = end_attempt_processes(
        [AttemptRecord("z", 1, "m", pid=child.pid, pgid=child.pid, start_time=st.start_time)],
        SCOPE,
        {"z"},
        grace=30,
    )
    assert report.survivors == ()
    child.wait()


def test_sigterm_first_then_sigkill_for_what_ignores_it(tmp_path: Path) -> None:
    polite, stubborn = tmp_path / "polite", tmp_path / "stubborn"
    graceful = _spawn(
        "import signal, sys, time, pathlib\n"
        f"p = pathlib.Path({str(polite)!r})\n"
        "signal.signal(signal.SIGTERM, lambda *a: (p.write_text('term'), sys.exit(0)))\n"
        "p.write_text('ready')\n"
        "time.sleep(60)\n",
        marker=attempt_marker(SCOPE, "polite", 1),
    )
    ignoring = _spawn(
        "import signal, time, pathlib\n"
        "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        f"pathlib.Path({str(stubborn)!r}).write_text('ready')\n"
        "time.sleep(60)\n",
        marker=attempt_marker(SCOPE, "stubborn", 1),
    )
    try:
        _wait_file(polite)
        _wait_file(stubborn)
        found = {st.pid for st in find_marked(SCOPE)}
        assert {graceful.pid, ignoring.pid} <= found
        report = end_attempt_processes([], SCOPE, {"polite", "stubborn"}, grace=0.5)
        assert graceful.wait(5) == 0 and polite.read_text() == "term"
        assert ignoring.wait(5) == -signal.SIGKILL
        assert report.survivors == ()
        assert {graceful.pid, ignoring.pid} <= set(report.signalled)
    finally:
        for p in (graceful, ignoring):
            p.kill()
            p.wait()


def test_only_the_named_tasks_of_the_scope_are_ended(tmp_path: Path) -> None:
    code = "import time; time.sleep(60)"
    mine = _spawn(code, marker=attempt_marker(SCOPE, "mine", 1))
    other_task = _spawn(code, marker=attempt_marker(SCOPE, "other", 1))
    other_scope = _spawn(code, marker=attempt_marker(SCOPE + "-elsewhere", "mine", 1))
    unmarked = _spawn(code)
    try:
        for _ in range(200):
            if {mine.pid, other_task.pid} <= {st.pid for st in find_marked(SCOPE)}:
                break
            time.sleep(0.02)
        end_attempt_processes([], SCOPE, {"mine"}, grace=0.5)
        assert mine.wait(5) == -signal.SIGTERM
        for p in (other_task, other_scope, unmarked):
            assert p.poll() is None, "a process of another task, scope or nobody was signalled"
    finally:
        for p in (mine, other_task, other_scope, unmarked):
            p.kill()
            p.wait()


def test_a_record_with_a_stale_start_time_never_signals_the_pid(tmp_path: Path) -> None:
    stranger = _spawn("import time; time.sleep(60)")
    try:
        st = proc_stat(stranger.pid)
        assert st is not None
        # As if the recorded attempt's pid had been given to this unrelated process.
        stale = AttemptRecord(
            "gone", 1, "m", pid=stranger.pid, pgid=stranger.pid, start_time=st.start_time - 1
        )
        report = end_attempt_processes([stale], SCOPE, {"gone"}, grace=0.2)
        assert report.signalled == ()
        assert stranger.poll() is None
    finally:
        stranger.kill()
        stranger.wait()


def test_leftover_records_are_ended_and_forgotten(tmp_path: Path) -> None:
    home = tmp_path / "home"
    registry = AttemptRegistry(home / "attempts")
    orphan = _spawn("import time; time.sleep(60)")
    try:
        st = proc_stat(orphan.pid)
        assert st is not None
        registry.write(
            AttemptRecord("t/../x", 2, "m", pid=orphan.pid, pgid=orphan.pid, start_time=st.start_time)
        )
        (home / "attempts" / "damaged.json").write_text("{not json")
        (home / "attempts" / ".attempt-tmp123").write_text("half")
        assert [r.task_id for _, r in registry.records() if r is not None] == ["t/../x"]
        report = end_leftover_attempts(home, set(), grace=1)
        assert orphan.wait(5) == -signal.SIGTERM
        assert report.signalled == (orphan.pid,)
        assert os.listdir(home / "attempts") == []
    finally:
        orphan.kill()
        orphan.wait()


@settings(max_examples=60, deadline=None)
@given(output_chunks)
def test_capture_keeps_everything_or_an_exact_head_and_tail(chunks: list[bytes]) -> None:
    cap = _Capture(limit=2000)
    for c in chunks:
        cap.feed(c)
    data = b"".join(chunks)
    text, omitted = cap.text(budget=100_000)
    if len(data) <= 2000:
        assert (text, omitted) == (data.decode("utf-8", "replace"), 0)
    else:
        head, note, tail = text.partition(f"\n[dspy_infra: {omitted} bytes omitted; the task log has more]\n")
        assert note and omitted == len(data) - 2000
        assert head == data[:1000].decode("utf-8", "replace")
        assert tail == data[-1000:].decode("utf-8", "replace")


@settings(max_examples=40, deadline=None)
@given(output_chunks)
def test_attempt_log_keeps_everything_or_an_exact_head_and_tail(
    tmp_path_factory: object, chunks: list[bytes]
) -> None:
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        log = AttemptLog(Path(tmp), "t", 1, limit=2000)
        log.open()
        for c in chunks:
            log.write(c)
        log.close()
        (path,) = Path(tmp).rglob("1.log")
        stored = path.read_bytes()
        assert read_task_log(Path(tmp), "t", 1) == stored.decode("utf-8", "replace")
    data = b"".join(chunks)
    if len(data) <= 2000:
        assert stored == data
    else:
        note = f"\n[dspy_infra: {len(data) - 2000} bytes of output omitted here]\n".encode()
        assert stored == data[:1000] + note + data[-1000:]


# -- services: labels, leases, keep markers, orphan rules -----------------------------------


@pytest.mark.parametrize(
    ("owner_alive", "kept", "adoptable", "action"),
    [
        (True, True, True, "leave"),
        (True, False, False, "leave"),
        (False, True, True, "adopt"),
        (False, True, False, "reap"),  # kept, but no longer the catalog's spec: reaped
        (False, False, True, "reap"),
        (False, False, False, "reap"),
    ],
)
def test_sweep_on_open_leaves_live_owners_adopts_kept_orphans_and_reaps_the_rest(
    owner_alive: bool, kept: bool, adoptable: bool, action: str
) -> None:
    assert sweep_action(owner_alive=owner_alive, kept=kept, adoptable=adoptable) == action


def test_a_start_reaps_only_orphans_that_were_not_kept() -> None:
    assert reap_before_start(owner_alive=False, kept=False)
    assert not reap_before_start(owner_alive=False, kept=True)
    assert not reap_before_start(owner_alive=True, kept=False)


def test_a_lease_keeps_an_instance_of_a_dead_owner_owned_until_it_is_dropped(tmp_path: Path) -> None:
    ownership = ServiceOwnership("me", tmp_path)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    labels = ownership.labels("redis", "hash", {LABEL_OWNER: "spoofed", "team": "infra"})
    assert labels[LABEL_OWNER] == "me" and labels["team"] == "infra" and labels[LABEL_SERVICE] == "redis"
    assert ownership.owner_alive(labels, "inst")  # this process owns it
    orphan = {**labels, LABEL_OWNER_PID: str(dead.pid)}
    assert not ownership.owner_alive(orphan, "inst")
    ownership.write_lease("inst")  # this process adopts it
    assert ownership.owner_alive(orphan, "inst")
    ownership.drop_lease("inst")
    assert not ownership.owner_alive(orphan, "inst")


def test_keep_markers_are_per_service_instance(tmp_path: Path) -> None:
    ownership = ServiceOwnership("me", tmp_path)
    name = ownership.instance_name("redis")
    assert not ownership.is_kept(name)
    ownership.set_kept("redis", True)
    assert ownership.is_kept(name) and not ownership.is_kept(ownership.instance_name("kafka"))
    ownership.set_kept("redis", False)
    ownership.set_kept("redis", False)  # idempotent
    assert not ownership.is_kept(name)
