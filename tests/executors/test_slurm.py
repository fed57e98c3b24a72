"""The ``slurm`` executor against a real single-node Slurm (``bash scripts/slurm.sh start``).

Every task here goes through the real Scheduler to real ``sbatch`` / ``squeue`` / ``scontrol``
/ ``scancel``; jobs are cpu-only (no GPU on this machine). The pure parts (time limits, names,
the scontrol parser, the sbatch plan) get property tests that need no cluster.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import anyio
import pytest
from _rpc_support import serve_process, stop_process
from adoption import adoption_round, wait_for_text
from engines import skip_or_fail
from harness import open_scheduler
from hypothesis import example, given
from hypothesis import strategies as st
from strategies import slurm_task_ids, states

from dspy_infra.config import load_settings
from dspy_infra.errors import ConfigError, PermanentFailure, ResourceUnavailable, Unavailable
from dspy_infra.executors.journal import HandleJournal, RemoteHandle
from dspy_infra.executors.slurm import (
    FAILED_STATES,
    SlurmExecutor,
    SlurmJob,
    _finish_despite_cancel,
    failure_message,
    job_dir_name,
    job_name,
    job_tag,
    parse_scontrol_job,
    plan_job,
    time_limit_minutes,
)
from dspy_infra.models import TaskSpec, TaskStatus
from dspy_infra.rpc.remote import RemoteInfra
from dspy_infra.scheduler.context import TaskContext
from dspy_infra.scheduler.scheduler import Scheduler


def _slurm_answers() -> bool:
    if shutil.which("scontrol") is None:
        return False
    try:
        out = subprocess.run(["scontrol", "ping"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return "is UP" in out.stdout


@pytest.fixture
def slurm() -> None:
    if not _slurm_answers():
        skip_or_fail("no Slurm controller answers `scontrol ping` (run: bash scripts/slurm.sh start)")


def scheduler(home: Path, **overrides: Any) -> contextlib.AbstractAsyncContextManager[Scheduler]:
    overrides.setdefault("durable", False)
    overrides.setdefault("shutdown_grace", 0.5)
    return open_scheduler(home, **overrides)


def slurm_task(task_id: str, cmd: str, **kw: Any) -> TaskSpec:
    payload = {"cmd": cmd, **kw.pop("payload", {})}
    return TaskSpec(task_id, task_class="gpu_slurm", payload=payload, **kw)


async def _cli(*argv: str) -> str:
    proc = await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, _ = await proc.communicate()
    return out.decode()


async def _running_job(name: str, timeout: float = 30) -> str:
    """The id of the job named ``name`` once Slurm runs it."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for line in (await _cli("squeue", "-h", "-n", name, "-o", "%i|%T")).splitlines():
            job_id, _, state = line.partition("|")
            if state == "RUNNING":
                return job_id
        await asyncio.sleep(0.1)
    raise AssertionError(f"job {name!r} did not start running within {timeout}s")


async def _left_queue(job_id: str, timeout: float = 30) -> bool:
    """True once ``squeue`` stops listing the job (a cancelled job lingers while it completes)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not (await _cli("squeue", "-h", "-j", job_id, "-o", "%i")).strip():
            return True
        await asyncio.sleep(0.1)
    return False


async def _job_state(job_id: str) -> SlurmJob:
    return parse_scontrol_job(await _cli("scontrol", "show", "-o", "job", job_id))


# -- against the real Slurm ---------------------------------------------------------------


async def test_echo_runs_on_slurm_and_completes_with_output_and_job_id(slurm: None, tmp_path: Path) -> None:
    async with scheduler(tmp_path, slurm="cli") as sched:
        await sched.submit(slurm_task("hello/slurm", "echo hi from $SLURM_JOB_NAME; echo warn >&2"))
        result = await sched.wait("hello/slurm", timeout=60)
    assert result.status is TaskStatus.COMPLETED, result.error
    assert result.result["stdout"] == "hi from hello_slurm\n"
    assert result.result["stderr"] == "warn\n"
    assert result.result["exit_code"] == "0" and result.result["state"] == "COMPLETED"
    job = await _job_state(result.result["job_id"])
    assert job.state == "COMPLETED" and job.job_id == result.result["job_id"]
    # Output files live under <home>/slurm/<task>/<attempt>.out
    out_file = tmp_path / "slurm" / job_dir_name("hello/slurm") / "1.out"
    assert out_file.read_text() == "hi from hello_slurm\n"


async def test_failing_command_fails_the_task_with_its_exit_code(slurm: None, tmp_path: Path) -> None:
    async with scheduler(tmp_path, slurm="cli") as sched:
        await sched.submit(slurm_task("bad", "echo about to fail >&2; exit 7"))
        result = await sched.wait("bad", timeout=60)
    assert result.status is TaskStatus.FAILED
    assert "exit code 7" in result.error and "about to fail" in result.error
    assert result.result["exit_code"] == "7" and result.result["state"] == "FAILED"
    assert result.result["job_id"].isdigit()


@pytest.mark.parametrize("durable", [False, True])
async def test_cancel_of_a_running_task_scancels_its_job(slurm: None, tmp_path: Path, durable: bool) -> None:
    # Durable: the class leaves its jobs running at a graceful stop, never at a task cancel.
    async with scheduler(tmp_path, slurm="cli", durable=durable) as sched:
        await sched.submit(slurm_task("long", "sleep 120"))
        job_id = await _running_job(job_name("long"))
        await sched.cancel("long")
        result = await sched.wait("long", timeout=30)
        assert result.status is TaskStatus.CANCELLED
    # The job left the queue: squeue no longer lists it, scontrol remembers it as cancelled.
    assert await _left_queue(job_id)
    assert (await _job_state(job_id)).state == "CANCELLED"
    assert HandleJournal(tmp_path).read("long") is None


async def test_timeout_fails_the_task_and_cancels_the_job(slurm: None, tmp_path: Path) -> None:
    # Durable, so on_shutdown defaults to "leave": a timeout still ends the job.
    async with scheduler(tmp_path, slurm="cli", durable=True) as sched:
        await sched.submit(slurm_task("slow", "sleep 120", timeout=5.0))
        job_id = await _running_job(job_name("slow"))
        result = await sched.wait("slow", timeout=30)
    assert result.status is TaskStatus.FAILED
    assert "timed out after 5s" in result.error
    assert await _left_queue(job_id)
    assert (await _job_state(job_id)).state == "CANCELLED"


@pytest.mark.parametrize(
    "overrides",
    [
        pytest.param({"durable": False}, id="memory-only"),
        pytest.param(
            {"durable": True, "task_classes": {"gpu_slurm": {"on_shutdown": "cancel"}}},
            id="on_shutdown-cancel",
        ),
    ],
)
async def test_shutdown_cancels_jobs_still_running_unless_they_are_left(
    slurm: None, tmp_path: Path, overrides: dict[str, Any]
) -> None:
    # A memory-only scheduler keeps no handle a next start could adopt the job by, and a
    # class with on_shutdown = "cancel" (a CI job) asks to leave no job behind.
    async with scheduler(tmp_path, slurm="cli", **overrides) as sched:
        await sched.submit(slurm_task("left-running", "sleep 120"))
        job_id = await _running_job(job_name("left-running"))
    assert await _left_queue(job_id)
    assert (await _job_state(job_id)).state == "CANCELLED"
    assert HandleJournal(tmp_path).read("left-running") is None


@pytest.mark.parametrize("restart", ["while_running", "after_it_ended"])
async def test_a_graceful_stop_leaves_the_job_to_the_next_start(
    slurm: None, tmp_path: Path, restart: str
) -> None:
    # A durable scheduler stops (a deploy) while a job runs: the job keeps running with its
    # handle, and the next start adopts it (watched, or collected if it ended meanwhile).
    # The job runs until the test creates `go`, so "still running" does not depend on how
    # fast the stop and the restart are.
    runs, go = tmp_path / "runs", tmp_path / "go"
    task = slurm_task(
        "train/deploy", f"echo run >> {runs}; while [ ! -e {go} ]; do sleep 0.2; done; echo finished"
    )
    async with scheduler(tmp_path, slurm="cli", durable=True) as sched:
        await sched.submit(task)
        job_id = await _running_job(job_name(task.id))
        await wait_for_text(runs)
    assert (await _job_state(job_id)).state == "RUNNING"
    handle = HandleJournal(tmp_path).read(task.id)
    assert handle is not None and handle.fields["job_id"] == job_id
    if restart == "after_it_ended":
        go.touch()
        assert await _left_queue(job_id)
    async with scheduler(tmp_path, slurm="cli", durable=True) as sched:
        if restart == "while_running":
            with anyio.fail_after(60):  # the next start's attempt has taken the job over
                while True:
                    current = await sched.get(task.id)
                    if current.status is TaskStatus.RUNNING and current.attempts == 2:
                        break
                    await anyio.sleep(0.1)
            assert (await _job_state(job_id)).state == "RUNNING"
            go.touch()
        result = await sched.wait(task.id, timeout=120)
        state = await sched.get(task.id)
    assert result.status is TaskStatus.COMPLETED, result.error
    assert result.result["job_id"] == job_id and result.result["stdout"] == "finished\n"
    assert runs.read_text() == "run\n", "the job ran more than once"
    assert state.attempts == 2  # the interrupted attempt, then the one that adopted its job
    assert HandleJournal(tmp_path).read(task.id) is None


async def test_a_request_slurm_refuses_fails_at_once_naming_the_fix(slurm: None, tmp_path: Path) -> None:
    async with scheduler(tmp_path, slurm="cli") as sched:
        # No GPU is configured in this cluster: Slurm refuses the gres, no retry can help.
        await sched.submit(slurm_task("wants-gpu", "nvidia-smi", payload={"gpus": "1"}, max_attempts=3))
        result = await sched.wait("wants-gpu", timeout=30)
        assert result.status is TaskStatus.FAILED
        assert "generic resource" in result.error and "payload.gpus" in result.error
        assert (await sched.get("wants-gpu")).attempts == 1
    async with scheduler(tmp_path, slurm="cli", slurm_partition="no-such-partition") as sched:
        await sched.submit(slurm_task("wrong-partition", "true", max_attempts=3))
        result = await sched.wait("wrong-partition", timeout=30)
        assert result.status is TaskStatus.FAILED
        assert "partition" in result.error and "slurm_partition" in result.error
        assert (await sched.get("wrong-partition")).attempts == 1


async def test_a_named_partition_and_time_limit_reach_the_job(slurm: None, tmp_path: Path) -> None:
    partition = (await _cli("sinfo", "-h", "-o", "%R")).split()[0]
    async with scheduler(tmp_path, slurm="cli", slurm_partition=partition) as sched:
        await sched.submit(slurm_task("placed", "echo $SLURM_JOB_PARTITION", timeout=90))
        result = await sched.wait("placed", timeout=60)
    assert result.status is TaskStatus.COMPLETED, result.error
    assert result.result["stdout"].strip() == partition
    record = await _cli("scontrol", "show", "-o", "job", result.result["job_id"])
    assert "TimeLimit=00:02:00" in record  # 90 s rounds up to 2 minutes


async def test_parallel_tasks_each_get_their_own_job(slurm: None, tmp_path: Path) -> None:
    async with scheduler(tmp_path, slurm="cli") as sched:
        for i in range(4):
            await sched.submit(slurm_task(f"p{i}", f"echo {i}"))
        results = [await sched.wait(f"p{i}", timeout=60) for i in range(4)]
    assert [r.result["stdout"] for r in results] == [f"{i}\n" for i in range(4)]
    assert len({r.result["job_id"] for r in results}) == 4


async def test_a_later_attempt_cancels_the_job_an_earlier_one_left_running(
    slurm: None, tmp_path: Path
) -> None:
    # A job of attempt 1 that no handle records (its scancel failed, or it was submitted
    # without one) still runs when attempt 2 starts: attempt 2 cancels it first, so one task
    # never runs twice at once.
    settings = load_settings(env={}, home=tmp_path, slurm="cli")
    task = slurm_task("survivor", "echo second")
    async with SlurmExecutor(settings) as executor:
        first = plan_job(TaskContext(slurm_task("survivor", "sleep 120"), 1), settings)
        await anyio.Path(first.stdout_path.parent).mkdir(parents=True)
        orphan = await executor.cli.submit(first)
        assert await _running_job(job_name("survivor")) == orphan
        result = await executor.run(TaskContext(task, 2))
    assert result["stdout"] == "second\n" and result["job_id"] != orphan
    assert (await _job_state(orphan)).state == "CANCELLED"
    assert await _left_queue(orphan)


@pytest.fixture
def dead_controller_conf(slurm: None, tmp_path: Path) -> Path:
    """This cluster's slurm.conf with a controller port nobody listens on: Slurm calls fail fast."""
    conf = Path("/etc/slurm/slurm.conf").read_text()
    dead = tmp_path / "dead-slurm.conf"
    extra = "SlurmctldPort=1\nMessageTimeout=1\nTCPTimeout=1\n"
    dead.write_text(conf.replace("ClusterName=", extra + "ClusterName=", 1))
    return dead


async def test_losing_the_controller_fails_the_attempt_after_the_limit(
    slurm: None, tmp_path: Path, dead_controller_conf: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = load_settings(env={}, home=tmp_path, slurm="cli")
    async with SlurmExecutor(settings, poll_max=0.2, unreachable_limit=0.5) as executor:
        attempt = asyncio.ensure_future(executor.run(TaskContext(slurm_task("cut-off", "sleep 120"), 1)))
        job_id = await _running_job(job_name("cut-off"))
        try:
            with monkeypatch.context() as patch:
                patch.setenv("SLURM_CONF", str(dead_controller_conf))
                with pytest.raises(Unavailable, match="no job states from the controller") as info:
                    await asyncio.wait_for(attempt, 30)
            assert "scontrol ping" in str(info.value)
            # scancel could not reach the controller either: the job is still there.
            assert (await _job_state(job_id)).state == "RUNNING"
        finally:
            await _cli("scancel", job_id)
    assert await _left_queue(job_id)


# -- without a cluster --------------------------------------------------------------------


async def test_with_slurm_unset_gpu_slurm_is_refused_clearly(tmp_path: Path) -> None:
    async with scheduler(tmp_path) as sched:
        with pytest.raises(ResourceUnavailable, match="no Slurm executor configured") as info:
            await sched.submit(slurm_task("refused", "echo hi"))
        assert info.value.field == "task_class"
        # Nothing half-accepted stays behind.
        assert await sched.list_tasks() == []


async def test_an_unknown_slurm_setting_is_refused_naming_the_field(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        async with scheduler(tmp_path, slurm="rest"):
            pass
    assert info.value.field == "slurm" and "cli" in str(info.value)  # refused when settings are built


async def test_missing_slurm_tools_name_the_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    with pytest.raises(ConfigError) as info:
        async with scheduler(tmp_path, slurm="cli"):
            pass
    assert info.value.field == "slurm"
    assert "sbatch" in str(info.value) and "slurm-client" in str(info.value)


async def test_run_before_entering_is_refused(tmp_path: Path) -> None:
    executor = SlurmExecutor(load_settings(env={}, home=tmp_path, slurm="cli"))
    with pytest.raises(Unavailable, match="async with"):
        await executor.run(TaskContext(slurm_task("t", "true"), 1))


def test_bad_payloads_fail_permanently_naming_the_field(tmp_path: Path) -> None:
    settings = load_settings(env={}, home=tmp_path, slurm="cli")
    with pytest.raises(PermanentFailure, match=r"payload\.cmd"):
        plan_job(TaskContext(slurm_task("t", "  "), 1), settings)
    for gpus in ("two", "0", "-1", "1.5"):
        with pytest.raises(PermanentFailure, match=r"payload\.gpus"):
            plan_job(TaskContext(slurm_task("t", "true", payload={"gpus": gpus}), 1), settings)


async def test_clean_up_work_finishes_even_when_its_caller_is_cancelled() -> None:
    finished: list[str] = []

    async def cleanup() -> str:
        await asyncio.sleep(0.2)
        finished.append("done")
        return "done"

    async def caller() -> str:
        return await _finish_despite_cancel(asyncio.ensure_future(cleanup()))

    task = asyncio.ensure_future(caller())
    await asyncio.sleep(0.05)
    task.cancel()
    await asyncio.sleep(0.01)
    task.cancel()  # a second cancellation does not cut it short either
    with pytest.raises(asyncio.CancelledError):
        await task
    assert finished == ["done"]
    assert await _finish_despite_cancel(asyncio.ensure_future(cleanup())) == "done"


# -- properties ---------------------------------------------------------------------------

# Any id a TaskSpec accepts: valid UTF-8 (no lone surrogates), no NUL.


@given(st.floats(min_value=1e-3, max_value=1e7, allow_nan=False))
def test_time_limit_is_whole_minutes_never_shorter_than_the_timeout(timeout: float) -> None:
    minutes = time_limit_minutes(timeout)
    assert minutes >= 1 and minutes * 60 >= timeout
    assert (minutes - 1) * 60 < timeout or minutes == 1


@example(".", "..")  # once a job named "." (hypothesis found it)
@given(slurm_task_ids, slurm_task_ids)
def test_job_dirs_are_safe_and_distinct_for_distinct_ids(a: str, b: str) -> None:
    for name in (job_dir_name(a), job_dir_name(b), job_name(a)):
        assert name and name not in (".", "..")
        assert all(c.isascii() and (c.isalnum() or c in "._+@-") for c in name)
        assert "%" not in name and "/" not in name
    assert (job_dir_name(a) == job_dir_name(b)) == (a == b)


@given(
    st.integers(1, 10**9),
    states,
    st.integers(0, 255),
    st.integers(0, 64),
    st.sampled_from(["None", "NonZeroExitCode", "TimeLimit"]),
)
def test_scontrol_records_parse_back(job_id: int, state: str, code: int, sig: int, reason: str) -> None:
    record = (
        f"JobId={job_id} JobName=x UserId=root(0) JobState={state} Reason={reason}"
        f" Dependency=(null) ExitCode={code}:{sig} RunTime=00:00:01 WorkDir=/tmp/a b\n"
    )
    job = parse_scontrol_job(record)
    assert job == SlurmJob(str(job_id), state, code, sig, "" if reason == "None" else reason)
    assert job.terminal == (state in FAILED_STATES or state == "COMPLETED")
    assert job.succeeded == (state == "COMPLETED" and code == 0 and sig == 0)


def test_a_record_without_a_job_is_refused() -> None:
    with pytest.raises(ValueError, match="not a scontrol job record"):
        parse_scontrol_job("slurm_load_jobs error: Invalid job id specified")


@given(
    slurm_task_ids,
    st.integers(1, 100),
    st.none() | st.floats(min_value=0.5, max_value=1e5),
    st.none() | st.integers(1, 16),
    st.none() | st.sampled_from(["debug", "gpu"]),
)
def test_the_sbatch_call_carries_exactly_what_was_asked(
    task_id: str, attempt: int, timeout: float | None, gpus: int | None, partition: str | None
) -> None:
    home = Path("/srv/100%home")
    settings = load_settings(env={}, home=home, slurm="cli", slurm_partition=partition)
    payload = {"gpus": str(gpus)} if gpus is not None else {}
    plan = plan_job(
        TaskContext(slurm_task(task_id, "echo 'it''s' $X", payload=payload, timeout=timeout), attempt),
        settings,
    )
    flags = dict(a.split("=", 1) for a in plan.argv if "=" in a)
    assert flags["--comment"] == job_tag(task_id, settings)
    assert plan.argv[:3] == ("sbatch", "--parsable", "--no-requeue")
    assert flags["--job-name"] == job_name(task_id)
    assert flags.get("--partition") == partition
    assert flags.get("--gres") == (f"gpu:{gpus}" if gpus is not None else None)
    assert flags.get("--time") == (str(time_limit_minutes(timeout)) if timeout is not None else None)
    # A literal % in the path is escaped for sbatch's filename patterns.
    assert flags["--output"] == str(plan.stdout_path).replace("%", "%%")
    assert plan.stdout_path == home / "slurm" / job_dir_name(task_id) / f"{attempt}.out"
    assert plan.script.startswith("#!/bin/sh\n/bin/sh -c ")
    assert plan.exit_path == plan.stdout_path.with_suffix(".exit")


def test_the_batch_script_runs_the_command_like_the_exec_handler(tmp_path: Path) -> None:
    # The script sbatch gets, run by a real shell here, behaves as `/bin/sh -c CMD`.
    cmd = "printf '%s|' \"$0\" 'a b' it\\'s; exit 4"
    plan = plan_job(TaskContext(slurm_task("t", cmd), 1), load_settings(env={}, home=tmp_path, slurm="cli"))
    plan.exit_path.parent.mkdir(parents=True)
    via_script = subprocess.run(["/bin/sh", "-s"], input=plan.script, capture_output=True, text=True)
    direct = subprocess.run(["/bin/sh", "-c", cmd], capture_output=True, text=True)
    assert (
        (via_script.returncode, via_script.stdout)
        == (direct.returncode, direct.stdout)
        == (4, "/bin/sh|a b|it's|")
    )
    # ... and leaves its exit code for an owner that comes back after Slurm forgot the job.
    assert plan.exit_path.read_text() == "4\n"


@given(
    states.filter(lambda s: s in FAILED_STATES),
    st.integers(0, 255),
    st.integers(0, 64),
    st.text(max_size=2000),
    st.text(max_size=2000),
)
def test_failure_messages_name_the_job_its_end_and_the_last_output(
    state: str, code: int, sig: int, stdout: str, stderr: str
) -> None:
    job = SlurmJob("42", state, code, sig)
    result = {"job_id": "42", "state": state, "exit_code": str(code), "stdout": stdout, "stderr": stderr}
    text = failure_message(job, result)
    assert text.startswith("Slurm job 42 ") and f"({state}, exit code {code}" in text
    assert (f"signal {sig}" in text) == (sig != 0)
    tail = stderr.strip() or stdout.strip()
    assert text.endswith(f": {tail[-500:]}" if tail else ")")


def test_a_job_that_wrote_no_output_says_where_to_look() -> None:
    job = SlurmJob("9", "FAILED", 0, 53, "JobLaunchFailure")
    result = {"job_id": "9", "stdout": "", "stderr": "", "output_missing": "/home/x/slurm/t/1.out"}
    text = failure_message(job, result)
    assert "JobLaunchFailure" in text and "/home/x/slurm/t/1.out" in text
    assert "filesystem the compute nodes share" in text


def _fixed_width(width: int) -> dict[str, Any]:
    return {
        "gpu_slurm": {
            "min_concurrency": 1,
            "base_concurrency": width,
            "max_concurrency": width,
            "adaptive": False,
        }
    }


async def test_a_task_cancelled_before_it_adopted_its_left_job_ends_the_job(
    slurm: None, tmp_path: Path
) -> None:
    # A graceful stop left two jobs; at the next start the one slot goes to the higher
    # priority task, so "left" waits in the queue, not yet adopted: cancelling it there
    # still ends its job (and the adopted one ends on its own cancel as always).
    async with scheduler(tmp_path, slurm="cli", durable=True, task_classes=_fixed_width(2)) as sched:
        await sched.submit(slurm_task("left", "sleep 120"))
        await sched.submit(slurm_task("first", "sleep 120", priority=10))
        left_job = await _running_job(job_name("left"))
        first_job = await _running_job(job_name("first"))
    async with scheduler(tmp_path, slurm="cli", durable=True, task_classes=_fixed_width(1)) as sched:
        assert (await sched.get("left")).status is TaskStatus.PENDING
        assert (await sched.cancel("left")).status is TaskStatus.CANCELLED
        assert await _left_queue(left_job)
        assert (await _job_state(left_job)).state == "CANCELLED"
        await sched.cancel("first")
    assert await _left_queue(first_job)
    assert HandleJournal(tmp_path).read("left") is None


async def test_sigterm_to_serve_leaves_the_job_and_the_next_serve_adopts_it(
    slurm: None, tmp_path: Path
) -> None:
    # What `dspy-infra serve` runs, stopped by SIGTERM (a deploy) while a task's job runs,
    # then started again on the same state directory: the job ran once, its result arrives.
    runs, home, go = tmp_path / "runs", tmp_path / "home", tmp_path / "go"
    # The job runs until the test creates `go` (once the next serve is up), however long the
    # stop and the restart take.
    task = slurm_task(
        "train/serve", f"echo run >> {runs}; while [ ! -e {go} ]; do sleep 0.2; done; echo finished"
    )
    with serve_process(home, slurm="cli", shutdown_grace=0.5) as server:
        remote = await RemoteInfra.connect(server.addr, required=True)
        assert remote is not None
        try:
            await remote.submit(task)
        finally:
            await remote.aclose()
        job_id = await _running_job(job_name(task.id))
        await wait_for_text(runs)
        stop_process(server.proc)
        assert server.proc.returncode == 0
    assert (await _job_state(job_id)).state == "RUNNING"
    with serve_process(home, slurm="cli", shutdown_grace=0.5) as server:
        remote = await RemoteInfra.connect(server.addr, required=True)
        assert remote is not None
        try:
            go.touch()
            result = await remote.wait(task.id, timeout=120)
        finally:
            await remote.aclose()
    assert result.status is TaskStatus.COMPLETED, result.error
    assert result.result["job_id"] == job_id and result.result["stdout"] == "finished\n"
    assert runs.read_text() == "run\n", "the job ran more than once"


async def test_a_sigkilled_owner_s_job_is_adopted_and_runs_once(slurm: None, tmp_path: Path) -> None:
    # The owner is SIGKILLed while its job runs; the next owner of the same state directory
    # adopts the job (watches it to its end) instead of cancelling it and running it again.
    runs = tmp_path / "runs"
    settings = {"home": str(tmp_path / "home"), "slurm": "cli", "shutdown_grace": 0.5}
    task = {
        "id": "train/long",
        "task_class": "gpu_slurm",
        "payload": {"cmd": f"echo run >> {runs}; sleep 6; echo finished"},
    }
    outcome = await adoption_round(settings, task, runs)
    assert outcome["result"]["state"] == "COMPLETED"
    assert (await _job_state(outcome["result"]["job_id"])).state == "COMPLETED"


async def test_a_job_that_ended_while_no_owner_watched_is_collected_not_rerun(
    slurm: None, tmp_path: Path
) -> None:
    # The job ends between the crash and the restart: its result is collected from Slurm.
    runs = tmp_path / "runs"
    settings = load_settings(env={}, home=tmp_path, slurm="cli")
    task = slurm_task("quick", f"echo run >> {runs}; echo out")
    async with SlurmExecutor(settings) as executor:
        plan = plan_job(TaskContext(task, 1), settings)
        await anyio.Path(plan.stdout_path.parent).mkdir(parents=True)
        journal = HandleJournal(tmp_path)
        handle = RemoteHandle(
            "slurm",
            task.id,
            1,
            {
                "job_id": "",
                "name": job_name(task.id),
                "tag": job_tag(task.id, settings),
                "stdout": str(plan.stdout_path),
                "stderr": str(plan.stderr_path),
                "exit": str(plan.exit_path),
            },
        )
        journal.write(handle)
        job_id = await executor.cli.submit(plan)
        journal.write(handle.with_fields(job_id=job_id))
        assert await _left_queue(job_id)
        result = await executor.run(TaskContext(task, 2))
    assert result["job_id"] == job_id and result["stdout"] == "out\n"
    assert runs.read_text() == "run\n"
    assert journal.read(task.id) is None
