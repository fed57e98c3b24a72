"""Built-in task handlers, run directly (the scheduler's use of them is in test_scheduler)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import anyio
import pytest
from harness import handler_context, processes_with

from dspy_infra.errors import PermanentFailure
from dspy_infra.handlers.basic import (
    RESULT_OUTPUT_BYTES,
    ExecFailed,
    exec_handler,
    fail_handler,
    noop_handler,
    sleep_handler,
)
from dspy_infra.models import TaskSpec
from dspy_infra.plugins import build_plugin_manager, collect_mapping
from dspy_infra.scheduler.context import TaskContext


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie has exited; only its parent's wait is missing.
    stat = Path(f"/proc/{pid}/stat")
    return stat.exists() and stat.read_text().split(") ", 1)[1][0] != "Z"


async def test_exec_returns_exit_code_and_both_streams() -> None:
    result = await exec_handler(handler_context(cmd="echo out; echo err >&2"))
    assert result == {"exit_code": 0, "stdout": "out\n", "stderr": "err\n"}


async def test_exec_keeps_output_whole_up_to_the_limit() -> None:
    # Regression: stdout used to keep only its last 4 KiB.
    n = RESULT_OUTPUT_BYTES - 10
    result = await exec_handler(
        handler_context(cmd=f"printf START; head -c {n} /dev/zero | tr '\\0' a; printf END")
    )
    assert result["stdout"] == "START" + "a" * n + "END"
    assert "truncated" not in result


async def test_exec_beyond_the_limit_keeps_head_and_tail_and_says_how_much_was_cut() -> None:
    n = 3 * RESULT_OUTPUT_BYTES
    result = await exec_handler(
        handler_context(cmd=f"printf START; head -c {n} /dev/zero | tr '\\0' a; printf END")
    )
    out = result["stdout"]
    assert out.startswith("STARTaaa") and out.endswith("aaaEND")
    assert result["truncated"] is True
    kept = len(out.encode()) - len(out.split("\n")[1].encode()) - 2
    assert result["stdout_omitted_bytes"] == n + 8 - kept
    assert f"{result['stdout_omitted_bytes']} bytes omitted" in out
    assert result["stderr_omitted_bytes"] == 0
    assert len(out.encode()) <= RESULT_OUTPUT_BYTES + 100


async def test_exec_output_of_control_characters_stays_within_the_limit_as_json() -> None:
    import json

    result = await exec_handler(handler_context(cmd=f"head -c {RESULT_OUTPUT_BYTES} /dev/zero"))
    assert result["truncated"] is True
    assert len(json.dumps(result["stdout"])) <= RESULT_OUTPUT_BYTES + 100


async def test_exec_nonzero_exit_fails_with_the_stderr_tail() -> None:
    with pytest.raises(ExecFailed) as info:
        await exec_handler(handler_context(cmd="echo partial; echo 'no such thing' >&2; exit 3"))
    assert info.value.exit_code == 3
    assert "exited with 3" in str(info.value) and "no such thing" in str(info.value)
    assert info.value.result["stdout"] == "partial\n"


async def test_exec_without_cmd_is_a_permanent_failure_naming_the_field() -> None:
    with pytest.raises(PermanentFailure, match=r"payload\.cmd"):
        await exec_handler(handler_context())


async def test_exec_cancel_kills_the_whole_process_group(tmp_path: Path) -> None:
    pidfile = tmp_path / "child.pid"
    # The shell starts a background grandchild: a kill of the shell alone would leak it.
    # The pid is written whole (tmp + mv); the handler is cancelled once it is there, however
    # long the shell took to start.
    cmd = f"sleep 30 & echo $! > {pidfile}.tmp; mv {pidfile}.tmp {pidfile}; wait"
    finished = False

    async def run() -> None:
        nonlocal finished
        await exec_handler(handler_context(cmd=cmd))
        finished = True

    async with anyio.create_task_group() as tg:
        tg.start_soon(run)
        with anyio.fail_after(10):
            while not pidfile.exists():  # noqa: ASYNC110 - a file a subprocess writes; no event to await
                await anyio.sleep(0.02)
        tg.cancel_scope.cancel()
    assert not finished, "the command ended by itself, not by the cancel"
    grandchild = int(pidfile.read_text())
    for _ in range(100):  # up to 5 s for the kill to land
        if not _alive(grandchild):
            break
        await anyio.sleep(0.05)
    assert not _alive(grandchild), "the background child of the command survived the cancel"


async def test_exec_runs_in_cwd(tmp_path: Path) -> None:
    result = await exec_handler(handler_context(cmd="pwd", cwd=str(tmp_path)))
    assert result["stdout"].strip() == str(tmp_path)


async def test_noop_sleep_fail() -> None:
    assert await noop_handler(handler_context()) == {}
    started = time.monotonic()
    assert await sleep_handler(handler_context(seconds="0.05")) == {"slept": 0.05}
    assert await sleep_handler(handler_context(seconds=0.05)) == {"slept": 0.05}
    assert time.monotonic() - started >= 0.04
    with pytest.raises(PermanentFailure, match=r"payload\.seconds"):
        await sleep_handler(handler_context(seconds="soon"))
    with pytest.raises(RuntimeError, match="boom"):
        await fail_handler(handler_context(message="boom"))


def test_builtins_are_registered_through_the_plugin_hook() -> None:
    pm = build_plugin_manager(load_entry_points=False)
    handlers = collect_mapping(pm.hook.dspy_infra_handlers())
    assert {"exec", "noop", "sleep", "fail"} <= set(handlers)
    assert handlers["exec"] is exec_handler


async def test_exec_ends_with_its_shell_even_if_a_background_child_holds_the_pipes(tmp_path: Path) -> None:
    pidfile = tmp_path / "bg.pid"
    with anyio.fail_after(10):
        result = await exec_handler(handler_context(cmd=f"sleep 30 & echo $! > {pidfile}; echo started"))
    assert result["stdout"] == "started\n"
    background = int(pidfile.read_text())
    for _ in range(100):
        if not _alive(background):
            break
        await anyio.sleep(0.05)
    assert not _alive(background), "a process the task started outlived it"


@pytest.mark.parametrize("yields_before_cancel", [0, 1, 2, 3])
async def test_exec_cancelled_while_spawning_ends_at_once_and_leaves_no_child(
    yields_before_cancel: int,
) -> None:
    # Regression: a cancel landing inside create_subprocess_exec used to kill only the shell
    # and then wait for pipes its `sleep` child held open, hanging for the whole command.
    import asyncio

    marker = f"{30 + yields_before_cancel}.{os.getpid() % 1000}1"
    ctx = TaskContext(TaskSpec("t", payload={"handler": "exec", "cmd": f"sleep {marker}; true"}), 1)
    task = asyncio.ensure_future(exec_handler(ctx))
    for _ in range(yields_before_cancel):
        await asyncio.sleep(0)
    task.cancel()
    done, _ = await asyncio.wait([task], timeout=5)
    assert done, "cancel hung"
    assert task.cancelled()
    for _ in range(100):  # the group kill is immediate; reaping may lag a little
        if not processes_with(f"sleep {marker}"):
            break
        await anyio.sleep(0.05)
    assert processes_with(f"sleep {marker}") == []


def _json_ctx(**payload: object) -> TaskContext:
    """A context whose payload holds these JSON values as they are (what TaskSpec keeps once
    payloads are JSON objects; a TaskSpec that still turns values into strings would hide
    the types under test)."""
    spec = TaskSpec("t", payload={})
    object.__setattr__(spec, "payload", payload)
    return TaskContext(spec=spec, attempt=1)


@pytest.mark.parametrize("seconds", [True, [1], {"s": 1}, -1, "nan", "inf", "soon", float("nan")])
async def test_sleep_refuses_what_is_not_a_finite_non_negative_number(seconds: object) -> None:
    with pytest.raises(PermanentFailure, match=r"payload\.seconds"):
        await sleep_handler(_json_ctx(seconds=seconds))


async def test_sleep_takes_a_json_number_or_its_text() -> None:
    assert await sleep_handler(_json_ctx(seconds=0)) == {"slept": 0.0}
    assert await sleep_handler(_json_ctx(seconds="0.01")) == {"slept": 0.01}


async def test_fail_message_of_any_json_type_is_shown() -> None:
    with pytest.raises(RuntimeError, match=r'\{"code":7\}'):
        await fail_handler(_json_ctx(message={"code": 7}))


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (None, {}),
        ("", {}),
        ({"A": "1"}, {"A": "1"}),
        ('{"A": "1"}', {"A": "1"}),
    ],
)
def test_payload_json_object_takes_an_object_or_its_text(value: object, expected: dict[str, str]) -> None:
    from dspy_infra.scheduler.context import payload_json_object

    assert payload_json_object({"env": value}, "env", "{}") == expected


@pytest.mark.parametrize("value", [7, ["a"], '["a"]', "{bad", {"A": 1}, '{"A": 1}'])
def test_payload_json_object_names_the_field_on_anything_else(value: object) -> None:
    from dspy_infra.scheduler.context import payload_json_object

    with pytest.raises(PermanentFailure, match=r"payload\.env.*fix"):
        payload_json_object({"env": value}, "env", '{"A": "1"}')
