"""Per-task logs: every exec attempt's whole output, bounded, named by a hash of the task id,
readable through ``Infra.task_log``; and the exec handler's environment and policy."""

from __future__ import annotations

import os
import time
from pathlib import Path

import anyio
import pytest
from hypothesis import HealthCheck, given, settings
from strategies import log_chunks

from dspy_infra.config import load_settings
from dspy_infra.errors import NotFound, PermanentFailure, SpecError
from dspy_infra.handlers.basic import RESULT_OUTPUT_BYTES, exec_handler
from dspy_infra.infra import Infra
from dspy_infra.models import TaskSpec, TaskStatus
from dspy_infra.scheduler.context import TaskContext
from dspy_infra.scheduler.task_logs import TASK_LOG_ATTEMPTS, AttemptLog, MemoryLog, read_task_log


def _settings(home: Path, **kw: object) -> object:
    return load_settings(env={}, home=home, backend="process", mode="embedded", shutdown_grace=0.2, **kw)


async def test_task_log_keeps_whole_output_of_every_attempt(tmp_path: Path) -> None:
    n = 2 * RESULT_OUTPUT_BYTES  # more than the result keeps, less than the log keeps
    cmd = f"printf START; head -c {n} /dev/zero | tr '\\0' a; echo END; exit 3"
    async with Infra(_settings(tmp_path / "home"), load_entry_points=False) as infra:
        await infra.submit_task("big", payload={"handler": "exec", "cmd": cmd}, max_attempts=2)
        done = await infra.wait("big", timeout=60)
        assert done.status is TaskStatus.FAILED
        whole = await infra.task_log("big")
        first = await infra.task_log("big", attempt=1)
        second = await infra.task_log("big", attempt=2)
        with pytest.raises(NotFound, match="attempt"):
            await infra.task_log("big", attempt=3)
        with pytest.raises(NotFound):
            await infra.task_log("no-such-task")
        with pytest.raises(SpecError, match="attempt"):
            await infra.task_log("big", attempt=0)
        await infra.submit_task("quiet", payload={"handler": "noop"})
        await infra.wait("quiet", timeout=10)
        assert await infra.task_log("quiet") == ""
    body = "START" + "a" * n + "END\n"
    assert first.endswith(body) and second.endswith(body)
    assert whole == f"=== attempt 1 ===\n{first}=== attempt 2 ===\n{second}"


async def test_log_files_are_named_by_a_hash_never_by_the_task_id(tmp_path: Path) -> None:
    home = tmp_path / "home"
    evil = "../../../escaped/../" + "x" * 200
    async with Infra(_settings(home), load_entry_points=False) as infra:
        await infra.submit_task(evil, payload={"handler": "exec", "cmd": "echo hi"})
        await infra.wait(evil, timeout=30)
        assert await infra.task_log(evil) == "=== attempt 1 ===\nhi\n"
    assert not (tmp_path / "escaped").exists()
    logs = list((home / "task-logs").rglob("*.log"))
    assert len(logs) == 1
    assert all(len(part) == 32 and int(part, 16) >= 0 for part in [logs[0].parent.name])


def test_an_attempt_log_is_bounded_to_head_and_tail(tmp_path: Path) -> None:
    log = AttemptLog(tmp_path, "t", 1, limit=1000)
    log.open()
    log.write(b"H" * 400)
    for _ in range(100):
        log.write(b"m" * 100)
    log.write(b"T" * 500)
    log.close()
    text = read_task_log(tmp_path, "t", 1)
    assert text is not None
    head, note, tail = text.split("\n", 2)
    assert head == "H" * 400 + "m" * 100
    assert note == f"[dspy_infra: {400 + 100 * 100 + 500 - 1000} bytes of output omitted here]"
    assert tail == "T" * 500


def test_only_the_last_attempts_are_kept(tmp_path: Path) -> None:
    for attempt in range(1, TASK_LOG_ATTEMPTS + 3):
        log = AttemptLog(tmp_path, "t", attempt)
        log.open()
        log.write(f"run {attempt}\n".encode())
        log.close()
    kept = [a for a in range(1, TASK_LOG_ATTEMPTS + 3) if read_task_log(tmp_path, "t", a) is not None]
    assert kept == list(range(3, TASK_LOG_ATTEMPTS + 3))


# -- who may run commands: the exec side ------------------------------------------------------


def _ctx(settings: object, **payload: object) -> TaskContext:
    return TaskContext(TaskSpec("env", payload={"handler": "exec", **payload}), 1, settings)


async def test_exec_never_sees_the_server_token_or_tls_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    token = "s3cr3t-token-value"
    monkeypatch.setenv("DSPY_INFRA_TOKEN", token)
    monkeypatch.setenv("MY_APP_SECRET", token)
    monkeypatch.setenv("AUTH_HEADER", f"Bearer {token}")
    monkeypatch.setenv("DSPY_INFRA_TLS_KEY", "/keys/server.key")
    monkeypatch.setenv("HARMLESS", "kept")
    settings = load_settings(env={}, home=tmp_path, token=token, tls_key="/keys/server.key", durable=False)
    result = await exec_handler(_ctx(settings, cmd="env"))
    env = dict(line.split("=", 1) for line in result["stdout"].splitlines() if "=" in line)
    assert token not in result["stdout"]
    assert "/keys/server.key" not in result["stdout"]
    assert env["HARMLESS"] == "kept"
    assert env["DSPY_INFRA_ATTEMPT"].endswith(":env:1")
    assert "DSPY_INFRA_TOKEN" not in env and "MY_APP_SECRET" not in env and "AUTH_HEADER" not in env


async def test_exec_policy_deny_refuses_naming_the_setting(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    settings = load_settings(env={}, home=tmp_path, exec_policy="deny", durable=False)
    with pytest.raises(PermanentFailure, match=r"exec_policy.*fix"):
        await exec_handler(_ctx(settings, cmd=f"touch {marker}"))
    assert not marker.exists()


def _json_spec(payload: dict[str, object]) -> TaskSpec:
    """A spec whose payload holds these JSON values as they are (what TaskSpec keeps once
    payloads are JSON objects; a TaskSpec that still turns values into strings would hide
    the types under test)."""
    spec = TaskSpec("t", payload={})
    object.__setattr__(spec, "payload", payload)
    return spec


@pytest.mark.parametrize(
    ("payload", "field"),
    [
        ({"cmd": 42}, "payload.cmd"),
        ({"cmd": ["echo", 1]}, r"payload.cmd\[1\]"),
        ({"cmd": {"sh": "x"}}, "payload.cmd"),
        ({"cmd": []}, "payload.cmd"),
        ({"cmd": "echo \x00"}, "payload.cmd"),
        ({"cmd": "true", "cwd": 7}, "payload.cwd"),
        ({"cmd": "true", "cwd": "/no/such/dir"}, "payload.cwd"),
        ({"cmd": ["/no/such/program"]}, r"payload.cmd\[0\]"),
        ({"cmd": ["/etc/passwd"]}, r"payload.cmd\[0\]"),
        ({"cmd": "true", "cwd": "/etc/passwd"}, "payload.cwd"),
        ({"cmd": ["echo", "x" * 200_000]}, "payload.cmd"),
    ],
)
async def test_exec_payload_of_the_wrong_type_is_a_permanent_failure_naming_the_field(
    payload: dict[str, object], field: str
) -> None:
    with pytest.raises(PermanentFailure, match=field):
        await exec_handler(TaskContext(_json_spec(payload), 1))


async def test_exec_takes_an_argument_list_without_a_shell(tmp_path: Path) -> None:
    result = await exec_handler(TaskContext(_json_spec({"cmd": ["printf", "%s", "$HOME; x"]}), 1))
    assert result["stdout"] == "$HOME; x" and result["exit_code"] == 0


async def test_a_finished_attempt_leaves_no_record_and_no_escaped_descendant(tmp_path: Path) -> None:
    pidfile = tmp_path / "escaped.pid"
    settings = load_settings(env={}, home=tmp_path / "home")
    # The command waits for the escaped child's pid (written whole: tmp + mv), however late
    # the child starts; the child keeps the output pipes.
    cmd = (
        f"setsid sh -c 'echo $$ > {pidfile}.tmp; mv {pidfile}.tmp {pidfile}; exec sleep 30'"
        f" & while [ ! -s {pidfile} ]; do sleep 0.01; done"
    )
    # Regression: the escaped child held the output pipes, so the attempt lasted its 30 s.
    with anyio.fail_after(10):
        await exec_handler(_ctx(settings, cmd=cmd))
    escaped = int(pidfile.read_text())
    from dspy_infra.ownership import proc_stat

    deadline = time.monotonic() + 5  # SIGKILLed at the attempt's end; dying takes the kernel a moment
    while (st := proc_stat(escaped)) is not None and not st.dead and time.monotonic() < deadline:  # noqa: ASYNC110 - another process; no event to await
        await anyio.sleep(0.02)
    assert st is None or st.dead, "a descendant that left the process group outlived its attempt"
    assert list((tmp_path / "home" / "attempts").glob("*.json")) == []
    assert os.listdir(tmp_path / "home" / "attempts") == []


async def test_a_timed_out_attempt_keeps_its_output_in_the_log(tmp_path: Path) -> None:
    async with Infra(_settings(tmp_path / "home"), load_entry_points=False) as infra:
        await infra.submit_task(
            "slow", payload={"handler": "exec", "cmd": "echo before; sleep 30; echo after"}, timeout=5.0
        )
        done = await infra.wait("slow", timeout=30)
        assert done.status is TaskStatus.FAILED and "timed out" in done.error
        assert await infra.task_log("slow", attempt=1) == "before\n"
    assert os.listdir(tmp_path / "home" / "attempts") == []


def test_a_first_attempt_starts_the_log_afresh(tmp_path: Path) -> None:
    # An earlier task of the same id (pruned from the store, then the id reused) left logs.
    for attempt, text in ((1, b"old one\n"), (2, b"old two\n"), (1, b"new\n")):
        log = AttemptLog(tmp_path, "reused", attempt)
        log.open()
        log.write(text)
        log.close()
    assert read_task_log(tmp_path, "reused") == "=== attempt 1 ===\nnew\n"


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(chunks=log_chunks)
def test_a_memory_log_keeps_exactly_what_a_log_file_keeps(tmp_path: Path, chunks: list[bytes]) -> None:
    # A Ray runner keeps the attempt's log in memory and ships it back: the owner must get
    # what a local attempt's file would hold, bounds and omission note included.
    root = tmp_path / f"r{len(list(tmp_path.iterdir()))}"
    on_disk = AttemptLog(root, "t", 1, limit=1000)
    in_memory = MemoryLog(limit=1000)
    for log in (on_disk, in_memory):
        log.open()
        for chunk in chunks:
            log.write(chunk)
        log.close()
    assert in_memory.text() == read_task_log(root, "t", 1)
    assert MemoryLog().text() is None  # never opened: the handler wrote no log
