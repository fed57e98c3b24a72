"""The ``slurm`` executor: ``gpu_slurm`` tasks run as Slurm batch jobs.

Enabled by ``slurm = "cli"`` in the settings (``DSPY_INFRA_SLURM=cli``); unset, the hook's
factory returns None and ``gpu_slurm`` is refused at submit. It uses Slurm's own command-line
tools (``sbatch``, ``squeue``, ``scontrol``, ``scancel``; Debian: ``slurm-client``), so it
works wherever those reach a controller: a single node (``slurm-wlm``) or a cluster.

One attempt of a task is one batch job:

- ``payload["cmd"]`` runs through ``/bin/sh -c`` (the same meaning as the ``exec`` handler),
  submitted with ``sbatch --parsable --no-requeue`` (the scheduler owns retries, not Slurm).
  Job name: the task id (made safe); ``--partition`` from ``settings.slurm_partition``;
  ``--time`` from the task timeout (whole minutes, rounded up: the scheduler's own timeout is
  the precise one); ``--gres=gpu:N`` when ``payload["gpus"]`` asks; ``--chdir`` from
  ``payload["cwd"]``. Output and error files go to ``<home>/slurm/<task>/<attempt>.out|.err``
  (on a cluster ``home`` must be on a filesystem the compute nodes share).
- One watcher (owned by the executor's task group) polls every job in flight with a single
  ``squeue`` call per tick, backing off from 0.1 s to 2 s; a job that leaves ``squeue`` is
  looked up with ``scontrol show job`` for its final state and exit code (``sacct`` needs
  accounting, which many small clusters do not run).
- Result: ``job_id``, ``state``, ``exit_code`` and the last 4 KiB of ``stdout`` / ``stderr``.
  A non-zero exit or a FAILED / TIMEOUT / NODE_FAIL / CANCELLED / ... state fails the attempt
  (``SlurmJobFailed``, which carries the same map); a submission Slurm refuses as invalid (bad
  partition, unknown gres) fails the task at once.
- Cancelling the attempt (task cancel, task timeout) runs ``scancel`` before the
  cancellation goes on, even if a second cancellation arrives meanwhile: a job never outlives
  its attempt. A graceful stop of a durable owner does the same only for a class with
  ``on_shutdown = "cancel"``; otherwise (``leave_running``) the job keeps running with its
  handle and the next start adopts it, as after a crash.
- Survives its owner: a durable scheduler records each attempt's handle (job name, comment
  tag, output paths) in its handle journal (``journal.py``, fsync) *before* ``sbatch``, and
  the job id right after. The task re-queued after a crash (SIGKILL included) first reads
  the handle and adopts the job: still queued or running -> watched to its end; finished ->
  its state and output collected (from ``scontrol``, or from the exit-code file the batch
  script writes once Slurm has forgotten the job); gone (never submitted) -> run anew. A
  job is never run a second time. A crash between ``sbatch`` and the job id's record is
  covered by the tag: each job carries ``--comment=dspy_infra:<owner>:<task>``.
- A memory-only scheduler keeps no handles (its tasks do not outlive it). With nothing to
  adopt, a later attempt of a task first cancels any job of it still queued or running
  (an earlier scancel failed): two copies of one task never run at once.

Size: a little over 600 lines: one executor; the sbatch script, the squeue/scontrol watcher
and adoption share the job records, and the handle journal is already its own module.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import math
import re
import shlex
import shutil
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Self, TypeVar

import anyio
import attrs
from anyio.abc import AsyncResource

from ..config import Settings
from ..errors import ConfigError, HandlerFailure, PermanentFailure, Unavailable
from ..hookspecs import hookimpl
from ..scheduler.context import TAIL_BYTES, ExecutorFactory, TaskContext
from .background import BackgroundTask
from .journal import HandleJournal, RemoteHandle

__all__ = [
    "FAILED_STATES",
    "SLURM_PACKAGE_HINT",
    "SlurmCli",
    "SlurmCommandError",
    "SlurmExecutor",
    "SlurmJob",
    "SlurmJobFailed",
    "SlurmJobPlan",
    "dspy_infra_executors",
    "failure_message",
    "job_dir_name",
    "job_name",
    "job_tag",
    "parse_scontrol_job",
    "plan_job",
    "time_limit_minutes",
]

log = logging.getLogger(__name__)

_T = TypeVar("_T")

#: What to install when the Slurm tools are missing.
SLURM_PACKAGE_HINT = (
    "install Slurm's client tools (Debian/Ubuntu: apt-get install slurm-client; slurm-wlm for a"
    " whole single-node cluster, with munge), or unset `slurm` to refuse gpu_slurm tasks"
)
#: Job states that end a job unsuccessfully (COMPLETED with a non-zero exit code fails too).
FAILED_STATES = frozenset(
    {
        "BOOT_FAIL",
        "CANCELLED",
        "DEADLINE",
        "FAILED",
        "NODE_FAIL",
        "OUT_OF_MEMORY",
        "PREEMPTED",
        "REVOKED",
        "SPECIAL_EXIT",
        "TIMEOUT",
    }
)
_TERMINAL_STATES = FAILED_STATES | {"COMPLETED"}
#: sbatch refusals that no retry can fix (the request itself is wrong for this cluster).
_INVALID_SUBMISSION = re.compile(r"invalid|not available|unrecognized|no partition specified", re.IGNORECASE)
_UNKNOWN_JOB = "Invalid job id specified"
_SAFE = re.compile(r"[^A-Za-z0-9._+@-]+")
_TOOLS = ("sbatch", "squeue", "scontrol", "scancel")


class SlurmCommandError(Exception):
    """A Slurm command exited non-zero; ``stderr`` is what it said."""

    def __init__(self, argv: Sequence[str], returncode: int, stderr: str) -> None:
        self.argv = list(argv)
        self.returncode = returncode
        self.stderr = stderr.strip()
        super().__init__(f"{argv[0]} exited with {returncode}: {self.stderr or '(no message)'}")


class SlurmJobFailed(HandlerFailure):
    """A job ended unsuccessfully; ``result`` is the attempt's result map (kept on the task)."""


@attrs.frozen
class SlurmJob:
    """A job as ``scontrol show job`` reports it."""

    job_id: str
    state: str
    exit_code: int = 0
    #: Signal that ended the batch script (0 = none).
    signal: int = 0
    reason: str = ""

    @property
    def terminal(self) -> bool:
        return self.state in _TERMINAL_STATES

    @property
    def succeeded(self) -> bool:
        return self.state == "COMPLETED" and self.exit_code == 0 and self.signal == 0


def parse_scontrol_job(text: str) -> SlurmJob:
    """Parse ``scontrol show -o job ID`` output (``Key=Value`` pairs; values we read hold no spaces)."""
    fields = dict(re.findall(r"(?:^|\s)(JobId|JobState|ExitCode|Reason)=(\S*)", text))
    if "JobId" not in fields or "JobState" not in fields:
        raise ValueError(f"not a scontrol job record: {text[:200]!r}")
    code, _, sig = fields.get("ExitCode", "0:0").partition(":")
    return SlurmJob(
        job_id=fields["JobId"],
        # A state can carry a flag suffix on some versions (e.g. "CANCELLED+").
        state=fields["JobState"].rstrip("+"),
        exit_code=int(code or 0),
        signal=int(sig or 0),
        reason="" if fields.get("Reason") in (None, "None") else fields["Reason"],
    )


def time_limit_minutes(timeout: float) -> int:
    """Slurm's ``--time`` (whole minutes) for a task timeout in seconds: never shorter."""
    return max(1, math.ceil(timeout / 60))


def job_name(task_id: str) -> str:
    """The task id as a Slurm job name (what ``squeue -n`` finds). Never empty, ``.`` or
    ``..`` (Slurm uses the name in default output paths)."""
    name = _SAFE.sub("_", task_id)[:200]
    return name if name.strip(".") else "_" * max(1, len(name))


def job_dir_name(task_id: str) -> str:
    """A directory name for one task's files: readable, safe, and distinct for distinct ids."""
    digest = hashlib.sha256(task_id.encode()).hexdigest()[:12]
    return f"{_SAFE.sub('_', task_id)[:64]}-{digest}"


def job_tag(task_id: str, settings: Settings) -> str:
    """The job comment that ties a job to its task and owner (found again after a crash)."""
    return f"dspy_infra:{_SAFE.sub('_', settings.resolved_owner())}:{job_dir_name(task_id)}"


def _slurm_path(path: Path) -> str:
    # sbatch expands %j, %x, ... in --output/--error; "%%" is a literal percent.
    return str(path).replace("%", "%%")


@attrs.frozen
class SlurmJobPlan:
    """Everything needed to submit one attempt: the sbatch arguments, script and file paths."""

    argv: tuple[str, ...]
    script: str
    stdout_path: Path
    stderr_path: Path
    #: Where the batch script writes the command's exit code (read when Slurm has forgotten
    #: a job an earlier owner left: its result survives the job's record).
    exit_path: Path


def plan_job(ctx: TaskContext, settings: Settings) -> SlurmJobPlan:
    """Validate the payload and build the ``sbatch`` call; ``PermanentFailure`` names a bad field."""
    payload = ctx.payload
    cmd = payload.get("cmd", "")
    if not cmd.strip():
        raise PermanentFailure('payload.cmd: missing (fix: give the shell command, e.g. {"cmd": "echo hi"})')
    folder = settings.resolved_home() / "slurm" / job_dir_name(ctx.spec.id)
    out, err = folder / f"{ctx.attempt}.out", folder / f"{ctx.attempt}.err"
    argv = [
        "sbatch",
        "--parsable",
        "--no-requeue",
        f"--job-name={job_name(ctx.spec.id)}",
        f"--comment={job_tag(ctx.spec.id, settings)}",
        f"--output={_slurm_path(out)}",
        f"--error={_slurm_path(err)}",
    ]
    if settings.slurm_partition:
        argv.append(f"--partition={settings.slurm_partition}")
    if ctx.spec.timeout is not None:
        argv.append(f"--time={time_limit_minutes(ctx.spec.timeout)}")
    gpus = payload.get("gpus", "").strip()
    if gpus:
        if not gpus.isdigit() or int(gpus) < 1:
            raise PermanentFailure(
                f'payload.gpus: {gpus!r} is not a whole number of GPUs (fix: e.g. "1", or leave it out)'
            )
        argv.append(f"--gres=gpu:{int(gpus)}")
    if payload.get("cwd"):
        argv.append(f"--chdir={payload['cwd']}")
    # The batch script runs the command exactly as the exec handler does (/bin/sh -c CMD),
    # then records its exit code beside the output for an owner that comes back late.
    exit_path = folder / f"{ctx.attempt}.exit"
    script = (
        f"#!/bin/sh\n/bin/sh -c {shlex.quote(cmd)}\ncode=$?\n"
        f"echo $code > {shlex.quote(str(exit_path))}\nexit $code\n"
    )
    return SlurmJobPlan(tuple(argv), script, out, err, exit_path)


def _read_tail(path: Path) -> str:
    try:
        with path.open("rb") as fh:
            fh.seek(0, 2)
            fh.seek(max(0, fh.tell() - TAIL_BYTES))
            data = fh.read()
    except FileNotFoundError:
        return ""
    return data.decode("utf-8", errors="replace")


async def _finish_despite_cancel(work: asyncio.Future[_T]) -> _T:
    """Await ``work`` to its end even if the caller is cancelled meanwhile; the cancellation
    is re-raised afterwards. For short clean-up calls (sbatch, scancel) that must not be cut."""
    interrupted = False
    while not work.done():
        try:
            await asyncio.wait({work})
        except asyncio.CancelledError:
            interrupted = True
    if interrupted:
        if not work.cancelled():
            work.exception()  # retrieved here: the cancellation is what propagates
        raise asyncio.CancelledError
    return work.result()


class SlurmCli:
    """Slurm's command-line tools as async calls (asyncio subprocesses, never on the loop)."""

    def __init__(self, *, command_timeout: float = 60.0) -> None:
        self.command_timeout = command_timeout

    async def call(self, argv: Sequence[str], stdin: bytes | None = None) -> str:
        """Run ``argv``; return its stdout, raise ``SlurmCommandError`` on a non-zero exit."""
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
            )
        except FileNotFoundError:
            raise PermanentFailure(f"slurm: {argv[0]} is not on PATH (fix: {SLURM_PACKAGE_HINT})") from None
        try:
            async with asyncio.timeout(self.command_timeout):
                out, err = await proc.communicate(stdin)
        finally:
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await _finish_despite_cancel(asyncio.ensure_future(proc.wait()))
        if proc.returncode != 0:
            raise SlurmCommandError(argv, proc.returncode or 0, err.decode(errors="replace"))
        return out.decode(errors="replace")

    async def submit(self, plan: SlurmJobPlan) -> str:
        """``sbatch`` the plan; the job id."""
        out = await self.call(plan.argv, plan.script.encode())
        # --parsable prints "ID" or "ID;CLUSTER".
        job_id = out.strip().split(";", 1)[0]
        if not job_id.isdigit():
            raise SlurmCommandError(plan.argv, 0, f"unexpected sbatch output {out.strip()!r}")
        return job_id

    async def states(self, job_ids: Sequence[str]) -> dict[str, str]:
        """Job id -> state for the given jobs still in ``squeue`` (finished jobs drop out)."""
        argv = ("squeue", "-h", "-j", ",".join(job_ids), "-o", "%i|%T")
        try:
            out = await self.call(argv)
        except SlurmCommandError as exc:
            if _UNKNOWN_JOB in exc.stderr:
                return {}  # none of them is listed any more
            raise
        listed: dict[str, str] = {}
        for line in out.splitlines():
            job_id, sep, state = line.strip().partition("|")
            if sep:
                listed[job_id] = state
        return listed

    async def show(self, job_id: str) -> SlurmJob | None:
        """The job from ``scontrol show job``; None once Slurm has forgotten it."""
        try:
            out = await self.call(("scontrol", "show", "-o", "job", job_id))
        except SlurmCommandError as exc:
            if _UNKNOWN_JOB in exc.stderr:
                return None
            raise
        return parse_scontrol_job(out)

    async def cancel(self, job_id: str) -> None:
        await self.call(("scancel", job_id))

    async def tagged(self, name: str, tag: str) -> list[str]:
        """Ids of queued or running jobs named ``name`` whose comment is ``tag``."""
        out = await self.call(("squeue", "-h", "-n", name, "-o", "%i|%k"))
        return [
            job_id for job_id, _, comment in (ln.partition("|") for ln in out.splitlines()) if comment == tag
        ]


class _JobWatcher:
    """Polls all jobs in flight with one ``squeue`` per tick; resolves each job's future
    with its final ``SlurmJob``. Runs in the executor's task group."""

    def __init__(self, cli: SlurmCli, *, poll_min: float, poll_max: float, unreachable_limit: float) -> None:
        self.cli = cli
        self.poll_min = poll_min
        self.poll_max = poll_max
        self.unreachable_limit = unreachable_limit
        self._waiters: dict[str, asyncio.Future[SlurmJob]] = {}
        self._wake = asyncio.Event()

    async def wait(self, job_id: str) -> SlurmJob:
        fut: asyncio.Future[SlurmJob] = asyncio.get_running_loop().create_future()
        self._waiters[job_id] = fut
        self._wake.set()
        try:
            return await fut
        finally:
            if self._waiters.get(job_id) is fut:
                del self._waiters[job_id]

    async def run_forever(self) -> None:
        interval = self.poll_min
        failing_since: float | None = None
        while True:
            if not self._waiters:
                self._wake.clear()
                await self._wake.wait()
            with anyio.move_on_after(interval):
                await self._wake.wait()
            if self._wake.is_set():
                # A new job: look at it soon (jobs often finish within a second), then back off.
                self._wake.clear()
                interval = self.poll_min
                await anyio.sleep(self.poll_min)
            try:
                await self._poll_once()
            except (SlurmCommandError, ValueError, TimeoutError) as exc:
                now = time.monotonic()
                # Warn once per outage, not on every tick of it.
                log.log(logging.DEBUG if failing_since else logging.WARNING, "slurm: polling failed: %s", exc)
                failing_since = failing_since or now
                if now - failing_since > self.unreachable_limit:
                    self._fail_all(
                        f"slurm: no job states from the controller for {now - failing_since:.0f}s: {exc}"
                    )
                    failing_since = None
            else:
                failing_since = None
            interval = min(self.poll_max, interval * 1.5)

    async def _poll_once(self) -> None:
        ids = list(self._waiters)
        if not ids:
            return
        listed = await self.cli.states(ids)
        for job_id in ids:
            if job_id in listed and listed[job_id] not in _TERMINAL_STATES:
                continue
            job = await self.cli.show(job_id)
            fut = self._waiters.get(job_id)
            if fut is None or fut.done():
                continue
            if job is None:
                fut.set_exception(
                    SlurmCommandError(
                        ("scontrol", "show", "job", job_id),
                        1,
                        f"job {job_id} is no longer known to Slurm (purged before its end was seen;"
                        " raise MinJobAge in slurm.conf)",
                    )
                )
            elif job.terminal:
                fut.set_result(job)

    def _fail_all(self, message: str) -> None:
        for fut in self._waiters.values():
            if not fut.done():
                fut.set_exception(Unavailable(message, fix="check `scontrol ping` on this host"))


class SlurmExecutor(AsyncResource):
    """Runs tasks as Slurm batch jobs (see the module docstring). An async context manager:
    it owns the job watcher (a ``BackgroundTask``); ``run`` needs it entered (the Scheduler does that)."""

    def __init__(
        self,
        settings: Settings,
        *,
        cli: SlurmCli | None = None,
        poll_min: float = 0.1,
        poll_max: float = 2.0,
        unreachable_limit: float = 120.0,
    ) -> None:
        self.settings = settings
        self.cli = cli or SlurmCli()
        self._watcher = _JobWatcher(
            self.cli, poll_min=poll_min, poll_max=poll_max, unreachable_limit=unreachable_limit
        )
        self._background = BackgroundTask(self._watcher.run_forever, "dspy_infra-slurm-watcher")
        self._journal = HandleJournal(settings.resolved_home()) if settings.durable else None
        #: Attempts outlive this process and are adopted after a restart (Scheduler recovery).
        self.survives_owner = self._journal is not None
        #: Classes whose jobs a graceful stop leaves running (``leave_running``).
        self._leaving: frozenset[str] = frozenset()

    async def __aenter__(self) -> Self:
        missing = [tool for tool in _TOOLS if shutil.which(tool) is None]
        if missing:
            raise ConfigError(
                f"slurm = {self.settings.slurm!r} but {', '.join(missing)} not found on PATH",
                field="slurm",
                fix=SLURM_PACKAGE_HINT,
            )
        await self._background.start()
        return self

    async def aclose(self) -> None:
        await self._background.stop()

    def leave_running(self, class_names: frozenset[str]) -> None:
        """The owner stops gracefully: jobs of ``class_names`` cancelled from now on keep
        running with their handles (``scheduler.context.DetachableExecutor``)."""
        self._leaving = class_names

    async def cancel_left(self, task_id: str, class_name: str) -> None:
        """scancel the job an earlier owner left for ``task_id`` (cancelled before adopted)."""
        if self._journal is None:
            return
        prior = await anyio.to_thread.run_sync(self._journal.read, task_id)
        if prior is None or prior.executor != "slurm":
            return
        job_id = str(prior.fields.get("job_id", ""))
        found = (
            [job_id] if job_id else await self.cli.tagged(str(prior.fields["name"]), str(prior.fields["tag"]))
        )
        for job in found:
            log.warning("slurm: task %r was cancelled before it adopted job %s: cancelling it", task_id, job)
            await self._scancel(job)
        await anyio.to_thread.run_sync(self._journal.remove, task_id)

    def _left_behind(self, ctx: TaskContext, job_id: str) -> bool:
        """True when the attempt being cancelled is left running for the next start."""
        if ctx.spec.task_class not in self._leaving:
            return False
        log.warning(
            "slurm: the owner stops; job %s of task %r keeps running for the next start to adopt",
            job_id,
            ctx.spec.id,
        )
        return True

    async def run(self, ctx: TaskContext) -> dict[str, str]:
        """One attempt of ``ctx.spec`` as a batch job; the result map, or raise on failure."""
        if not self._background.running:
            raise Unavailable(
                "the Slurm executor is not running", fix="use it as `async with SlurmExecutor(settings)`"
            )
        plan = plan_job(ctx, self.settings)
        await anyio.to_thread.run_sync(lambda: plan.stdout_path.parent.mkdir(parents=True, exist_ok=True))
        journal = self._journal
        if journal is not None:
            adopted = await self._adopt(ctx, journal)
            if adopted is not None:
                return await self._outcome(*adopted)
        if ctx.attempt > 1:
            # Nothing to adopt, yet a job of an earlier attempt may still run (its scancel
            # failed, or it was submitted without a handle): two copies never run at once.
            name = job_name(ctx.spec.id)
            for stale in await self.cli.tagged(name, job_tag(ctx.spec.id, self.settings)):
                log.warning("slurm: cancelling job %s left by an earlier attempt of %r", stale, ctx.spec.id)
                await self._scancel(stale)
        if journal is not None:
            handle = RemoteHandle(
                "slurm",
                ctx.spec.id,
                ctx.attempt,
                {
                    "job_id": "",
                    "name": job_name(ctx.spec.id),
                    "tag": job_tag(ctx.spec.id, self.settings),
                    "stdout": str(plan.stdout_path),
                    "stderr": str(plan.stderr_path),
                    "exit": str(plan.exit_path),
                },
            )
            # Durable before sbatch: a crash from here on leaves the tag to find the job by.
            await anyio.to_thread.run_sync(journal.write, handle)
        submitting = asyncio.ensure_future(self.cli.submit(plan))
        try:
            job_id = await _finish_despite_cancel(submitting)
        except asyncio.CancelledError:
            # Cancelled while sbatch ran: the job exists now, so it must go again (or, left
            # running by a graceful stop, its id be recorded for the next start).
            if not submitting.cancelled() and submitting.exception() is None:
                job_id = submitting.result()
                if journal is not None and self._left_behind(ctx, job_id):
                    record = handle.with_fields(job_id=job_id)
                    await _finish_despite_cancel(
                        asyncio.ensure_future(anyio.to_thread.run_sync(journal.write, record))
                    )
                else:
                    await self._scancel(job_id)
            raise
        except SlurmCommandError as exc:
            if exc.argv[:1] == ["sbatch"] and _INVALID_SUBMISSION.search(exc.stderr):
                raise PermanentFailure(
                    f"slurm: sbatch refused the job: {exc.stderr} (fix: check slurm_partition and"
                    " payload.gpus against `sinfo`)"
                ) from None
            raise
        log.info("slurm: task %r attempt %d is job %s", ctx.spec.id, ctx.attempt, job_id)
        if journal is not None:
            await anyio.to_thread.run_sync(journal.write, handle.with_fields(job_id=job_id))
        job = await self._watch(ctx, job_id)
        return await self._outcome(job, plan.stdout_path, plan.stderr_path)

    async def _watch(self, ctx: TaskContext, job_id: str) -> SlurmJob:
        """The job's final state; cancelled meanwhile, the job is scancelled first. Either
        way the attempt is over: its handle is forgotten. Only a graceful stop of the owner
        (``leave_running``) leaves the job running and its handle in place."""
        try:
            job = await self._watcher.wait(job_id)
        except BaseException as exc:
            if isinstance(exc, asyncio.CancelledError) and self._left_behind(ctx, job_id):
                raise
            try:
                await self._scancel(job_id)  # re-raises a cancellation once scancel is done
            finally:
                await self._forget(ctx)
            raise
        await self._forget(ctx)
        return job

    async def _forget(self, ctx: TaskContext) -> None:
        if self._journal is not None:
            await _finish_despite_cancel(
                asyncio.ensure_future(anyio.to_thread.run_sync(self._journal.remove, ctx.spec.id))
            )

    async def _adopt(self, ctx: TaskContext, journal: HandleJournal) -> tuple[SlurmJob, Path, Path] | None:
        """The job an earlier owner of this task left (see the module docstring), watched to
        its end; None when there is none to adopt (the task runs anew)."""
        prior = await anyio.to_thread.run_sync(journal.read, ctx.spec.id)
        if prior is None or prior.executor != "slurm":
            return None
        fields = prior.fields
        job_id = str(fields.get("job_id", ""))
        if not job_id:
            # The owner died between sbatch and recording the id: the tag finds the job.
            found = await self.cli.tagged(str(fields["name"]), str(fields["tag"]))
            job_id = found[0] if found else ""
        job: SlurmJob | None = None
        if job_id:
            log.warning(
                "slurm: task %r attempt %d adopts job %s of attempt %d (left by an earlier owner)",
                ctx.spec.id,
                ctx.attempt,
                job_id,
                prior.attempt,
            )
            try:
                job = await self._watch(ctx, job_id)
            except SlurmCommandError as exc:
                log.warning("slurm: adopted job %s: %s; reading its exit file", job_id, exc)
        if job is None:
            code = await anyio.to_thread.run_sync(_read_exit_code, Path(fields["exit"]))
            await anyio.to_thread.run_sync(journal.remove, ctx.spec.id)
            if code is None:
                log.warning(
                    "slurm: task %r: no job of attempt %d is left; running it anew",
                    ctx.spec.id,
                    prior.attempt,
                )
                return None
            job = SlurmJob(job_id or "unknown", "COMPLETED" if code == 0 else "FAILED", exit_code=code)
        return job, Path(fields["stdout"]), Path(fields["stderr"])

    async def _outcome(self, job: SlurmJob, stdout_path: Path, stderr_path: Path) -> dict[str, str]:
        result = await anyio.to_thread.run_sync(self._result_map, job, stdout_path, stderr_path)
        if not job.succeeded:
            raise SlurmJobFailed(failure_message(job, result), result)
        return result

    async def _scancel(self, job_id: str) -> None:
        try:
            await _finish_despite_cancel(asyncio.ensure_future(self.cli.cancel(job_id)))
        except (SlurmCommandError, TimeoutError) as exc:
            log.warning("slurm: scancel %s failed: %s", job_id, exc)
        else:
            log.info("slurm: cancelled job %s", job_id)

    @staticmethod
    def _result_map(job: SlurmJob, stdout_path: Path, stderr_path: Path) -> dict[str, str]:
        result = {
            "job_id": job.job_id,
            "state": job.state,
            "exit_code": str(job.exit_code),
            "stdout": _read_tail(stdout_path),
            "stderr": _read_tail(stderr_path),
        }
        if job.state == "FAILED" and not stdout_path.exists():
            result["output_missing"] = str(stdout_path)
        return result


def _read_exit_code(path: Path) -> int | None:
    """The exit code the batch script recorded; None if it never got that far."""
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def failure_message(job: SlurmJob, result: Mapping[str, str]) -> str:
    """The error of a failed attempt: the job, how it ended, and the end of what it printed."""
    what = {
        "TIMEOUT": "hit its Slurm time limit",
        "CANCELLED": "was cancelled in Slurm",
        "NODE_FAIL": "lost its node",
        "OUT_OF_MEMORY": "ran out of memory",
    }.get(job.state, "failed")
    text = f"Slurm job {job.job_id} {what} ({job.state}, exit code {job.exit_code}"
    text += f", signal {job.signal})" if job.signal else ")"
    if job.reason:
        text += f" reason {job.reason}"
    if "output_missing" in result:
        # The job never opened its output file: the node cannot write where we read.
        text += (
            f"; it wrote no {result['output_missing']} (fix: put `home` on a filesystem the"
            " compute nodes share, or check the node's slurmd log)"
        )
    tail = result.get("stderr", "").strip() or result.get("stdout", "").strip()
    return text + (f": {tail[-500:]}" if tail else "")


def _factory(settings: Settings) -> SlurmExecutor | None:
    if settings.slurm is None:
        return None  # not configured: gpu_slurm stays refused at submit
    if settings.slurm != "cli":
        raise ConfigError(
            f"unknown Slurm executor {settings.slurm!r}",
            field="slurm",
            fix='set slurm = "cli" (sbatch/squeue on PATH), or leave it unset',
        )
    return SlurmExecutor(settings)


@hookimpl
def dspy_infra_executors() -> Mapping[str, ExecutorFactory]:
    """The ``slurm`` executor (None unless ``settings.slurm`` is set)."""
    return {"slurm": _factory}
