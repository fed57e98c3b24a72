"""Workflows: DAGs of scheduler tasks, idempotent runs and a live status stream.

A *workflow* is a named ``WorkflowSpec``: steps, each an ordinary scheduler task (class,
payload, priority, timeout, attempts) with ``depends_on`` edges. A *run* executes it once for
an input mapping::

    {"steps": [
        {"name": "fetch", "task_class": "cpu_short",
         "payload": {"handler": "exec", "cmd": "printf /data/%s.bin '{{ input.model }}'"}},
        {"name": "train", "depends_on": ["fetch"],
         "payload": {"handler": "exec", "cmd": "train '{{ steps.fetch.result.stdout }}'"}}],
     "continue_on_failure": false,
     "output": {"model": "{{ steps.train.result.stdout }}"}}

Rules (each enforced in exactly one place below):

- Validation at ``create_workflow``: duplicate step names, unknown dependencies, cycles (the
  cycle is named), unknown task classes and handlers, malformed JSON (line and column), and
  templates that refer to unknown steps or to steps that are not upstream. A refused spec
  leaves no trace.
- Size: a spec has at most ``MAX_STEPS`` steps and ``MAX_SPEC_BYTES`` of JSON; bigger specs
  are refused before they are parsed further. Validation is linear in the spec's size (plus
  one bit per step pair for the upstream check, at most 2000 x 2000 bits) and runs in a
  worker thread, so a large spec does not hold the event loop.
- Every step field is checked against what a task can hold (the ``TaskSpec`` rules: priority
  a 32-bit integer, a finite timeout, a JSON-object payload of valid UTF-8, 64-bit integers,
  finite numbers, bounded depth and size), so a created workflow never fails to store a step.
- Templating: ``{{ input.KEY }}`` and ``{{ steps.NAME.result.KEY }}``, in any string of a
  payload or of ``output``. A template that is the whole string is replaced by the value with
  its JSON type (a number stays a number, an object stays an object); inside a longer string
  the value is substituted as text (strings as they are, other values as compact JSON). Run
  inputs are JSON objects. Missing input keys are refused by ``start_run``; a missing result
  key fails the step (before its task exists). Inside an ``exec`` command, quote substituted
  values, and do not feed untrusted input to a shell.
- Output: the declared ``output`` mapping (templates, filled when the run ends; one that
  cannot be filled fails the run, naming ``output.KEY``), else the results of the sink steps
  keyed ``"STEP.KEY"``.
- Steps become scheduler tasks with deterministic ids ``f"{run_id}.{step}"`` carrying the
  workflow id, so the scheduler's idempotent submit makes re-driving a run after a crash safe.
  A step is submitted only after all its dependencies completed.
- Failure policy: by default the first failed step fails the run, no new step starts (steps
  already running finish) and everything not started is ``skipped``. With
  ``continue_on_failure`` only the failed step's dependents are skipped; independent branches
  run to the end. Either way a run with a failed step ends ``failed``. ``cancel_run`` cancels
  running tasks on the scheduler and marks every unfinished step ``cancelled``; a step whose
  task is cancelled from outside the run counts as failed for the policy and the run.
- Events on the bus: ``workflow_created`` (resource: workflow id), ``workflow_started``,
  ``workflow_step_completed`` (every step that ends, its ``status`` in the data),
  ``workflow_completed``, ``workflow_failed``, ``workflow_cancelled`` (resource: run id).
- Idempotent runs: a non-empty ``idempotency_key`` maps to one run id per workflow (a hash of
  both, inserted once in SQLite), so repeated or concurrent ``start_run`` calls never start a
  second run.
- Durability: workflows, runs and step states live in ``<home>/workflows.db`` (WAL; every
  SQLite call runs in a worker thread). On start the engine re-drives unfinished runs:
  completed steps keep their results, interrupted steps are re-submitted (the scheduler
  returns the task it recovered, or runs it again).
"""

from __future__ import annotations

import hashlib
import logging
import time
import uuid
from collections.abc import AsyncIterator, Mapping
from typing import TYPE_CHECKING, Any, Self

import anyio
import anyio.abc
import attrs
from anyio.abc import AsyncResource

from ..config import Settings
from ..errors import AlreadyExists, InfraError, NotFound, SpecError, Unavailable
from ..events import EventBus
from ..models import TaskSpec, TaskStatus
from ..values import (
    JsonObject,
    check_json_object,
    check_text,
)

if TYPE_CHECKING:
    from ..scheduler.scheduler import Scheduler
from .spec import (
    MAX_INPUT_BYTES,
    WORKFLOW_ID_RE,
    RunState,
    RunStatus,
    RunUpdate,
    StepSpec,
    StepState,
    StepStatus,
    Workflow,
    WorkflowSpec,
    string_leaves,
)
from .store import MemoryWorkflowStore, WorkflowStore
from .template import RenderError, render, template_refs
from .validate import check_step_count, parse_workflow_spec, validate_workflow

__all__ = [
    "WorkflowEngine",
]


log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------
# The engine


def _run_id_for_key(workflow_id: str, key: str) -> str:
    # Deterministic, so the store's primary key makes one key = one run even across processes.
    return "run-" + hashlib.sha256(f"{workflow_id}\0{key}".encode()).hexdigest()[:20]


class _LiveRun:
    """The engine's in-memory record of an active run: current state, the update history
    subscribers read with their own cursor, and the events steps wait on."""

    def __init__(self, state: RunState, workflow: Workflow, cancel_requested: bool = False) -> None:
        self.state = state
        self.workflow = workflow
        self.cancel_requested = cancel_requested
        #: Set when the default policy stops new steps after a failure.
        self.stop_new = False
        #: Set when the engine stops driving this run (shutdown); wakes status readers.
        self.closed = False
        self.completed = state.steps_completed
        self.updates: list[RunUpdate] = [state.to_update()]
        self.wakeup = anyio.Event()
        self.finished = anyio.Event()
        self.step_done = {name: anyio.Event() for name in state.steps}

    def publish(self, current_step: str = "") -> None:
        # The count is kept incrementally: recounting every step on every change would make
        # a run quadratic in its number of steps.
        self.updates.append(self.state.to_update(current_step, steps_completed=self.completed))
        self._wake()

    def set_step(self, step: StepState) -> None:
        """Replace one step's state (and keep the completed count)."""
        state = self.state
        old = state.steps[step.name]
        self.completed += (step.status is StepStatus.COMPLETED) - (old.status is StepStatus.COMPLETED)
        self.state = attrs.evolve(state, steps={**state.steps, step.name: step}, updated_at=time.time())

    def close(self) -> None:
        self.closed = True
        self._wake()

    def _wake(self) -> None:
        # Readers check for new updates right before waiting (no await in between), so with
        # nobody waiting there is nothing to wake and the event can stay.
        if self.wakeup.statistics().tasks_waiting:
            wakeup, self.wakeup = self.wakeup, anyio.Event()
            wakeup.set()


class WorkflowEngine(AsyncResource):
    """Creates workflows and drives their runs on the scheduler.

    An async context manager: entering opens the store and re-drives unfinished runs;
    leaving cancels the drivers (their runs stay durable and resume on the next start).
    """

    def __init__(self, settings: Settings, *, scheduler: Scheduler, bus: EventBus) -> None:
        self.settings = settings
        self.scheduler = scheduler
        self.bus = bus
        self._store: WorkflowStore | MemoryWorkflowStore = (
            WorkflowStore(settings.resolved_home() / "workflows.db")
            if settings.durable
            else MemoryWorkflowStore()
        )
        self._tg: anyio.abc.TaskGroup | None = None
        self._live: dict[str, _LiveRun] = {}
        self._workflows: dict[str, Workflow] = {}
        self._create_lock = anyio.Lock()
        self._start_lock = anyio.Lock()

    # -- lifecycle -------------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        await self._store.open()
        try:
            for wf in await self._store.workflows():
                self._workflows[wf.id] = wf
            tg = anyio.create_task_group()
            await tg.__aenter__()
            self._tg = tg
            for run_id in await self._store.unfinished_run_ids():
                loaded = await self._load_run(run_id)
                if loaded is not None:
                    self._drive(*loaded)
        except BaseException:
            await self.aclose()
            raise
        return self

    async def aclose(self) -> None:
        """Stop driving runs (they stay durable) and close the store. Safe to call twice."""
        tg, self._tg = self._tg, None
        if tg is not None:
            tg.cancel_scope.cancel()
            await tg.__aexit__(None, None, None)
        for live in self._live.values():
            live.close()
        self._live.clear()
        await self._store.close()

    def _need_tg(self) -> anyio.abc.TaskGroup:
        if self._tg is None:
            raise Unavailable("the workflow engine is not running", fix="use it inside `async with`")
        return self._tg

    # -- workflows -------------------------------------------------------------------------

    async def create_workflow(
        self, id: str, name: str = "", description: str = "", spec: Any = None
    ) -> Workflow:
        """Validate and store a workflow. Same id and spec again returns the stored one; the
        same id with a different spec raises ``AlreadyExists``."""
        self._need_tg()
        if not isinstance(id, str) or not WORKFLOW_ID_RE.match(id):
            raise SpecError(
                f"invalid workflow id {id!r}",
                field="id",
                fix="use 1-128 letters, digits, '_', '.', ':' or '-', starting with a letter or digit",
            )
        name = check_text(name, "name", allow_empty=True)
        description = check_text(description, "description", max_length=4096, allow_empty=True)
        classes, handlers = dict(self.scheduler.classes), self.scheduler.handler_names()

        def parse_and_validate() -> WorkflowSpec:
            parsed = parse_workflow_spec(spec)
            check_step_count(len(parsed.steps))  # also for a WorkflowSpec built in Python
            validate_workflow(parsed, classes, handlers)
            return parsed

        # Bounded (MAX_STEPS, MAX_SPEC_BYTES) and linear, but still up to a few hundred ms of
        # CPU for the largest spec: a worker thread, so the loop keeps serving meanwhile.
        parsed = await anyio.to_thread.run_sync(parse_and_validate)
        wf = Workflow(id=id, name=name or id, description=description, spec=parsed, created_at=time.time())
        async with self._create_lock:
            existing = await self._store.insert_workflow(wf)
            if existing is not None:
                if existing.spec_hash != wf.spec_hash:
                    raise AlreadyExists(
                        f"workflow {id!r} exists with a different spec",
                        field="id",
                        fix="use a new workflow id for the changed spec",
                    )
                return existing
            self._workflows[id] = wf
        self.bus.publish("workflow_created", id, {"name": wf.name, "steps": len(parsed.steps)})
        return wf

    async def get_workflow(self, workflow_id: str) -> Workflow:
        try:
            return self._workflows[workflow_id]
        except KeyError:
            raise NotFound(
                f"no workflow {workflow_id!r}", field="workflow_id", fix="create it with create_workflow"
            ) from None

    async def list_workflows(self) -> list[Workflow]:
        return sorted(self._workflows.values(), key=lambda w: (w.created_at, w.id))

    # -- runs ------------------------------------------------------------------------------

    async def start_run(
        self, workflow_id: str, *, input: Mapping[str, Any] | None = None, idempotency_key: str = ""
    ) -> str:
        """Start a run and return its id. With a non-empty ``idempotency_key`` the same key for
        the same workflow returns the same run id and never starts a second run (a different
        input under a used key raises ``AlreadyExists``)."""
        self._need_tg()
        wf = await self.get_workflow(workflow_id)
        values = check_json_object(input, "input", max_bytes=MAX_INPUT_BYTES)
        missing = sorted(wf.spec.input_keys() - set(values))
        if missing:
            raise SpecError(
                "missing input key" + ("s " if len(missing) > 1 else " ") + ", ".join(map(repr, missing)),
                field=f"input.{missing[0]}",
                fix="pass input={" + ", ".join(f"{k!r}: ..." for k in missing) + "}",
            )
        check_text(idempotency_key, "idempotency_key", allow_empty=True)
        run_id = (
            _run_id_for_key(workflow_id, idempotency_key)
            if idempotency_key
            else "run-" + uuid.uuid4().hex[:20]
        )
        now = time.time()
        state = RunState(
            run_id=run_id,
            workflow_id=workflow_id,
            status=RunStatus.RUNNING,
            steps={s.name: StepState(name=s.name) for s in wf.spec.steps},
            input=values,
            idempotency_key=idempotency_key,
            created_at=now,
            updated_at=now,
        )
        # The lock makes check-then-insert atomic within this process; the primary key makes
        # it atomic against anything else sharing the database file.
        async with self._start_lock:
            if not await self._store.insert_run(state):
                existing = await self.get_run(run_id)
                if existing.workflow_id != workflow_id or existing.input != values:
                    raise AlreadyExists(
                        f"idempotency key {idempotency_key!r} was used for a run with a different input",
                        field="idempotency_key",
                        fix="use a new idempotency key for a new run",
                    )
                return run_id
            self._drive(state, False)
        self.bus.publish("workflow_started", run_id, {"workflow_id": workflow_id, "key": idempotency_key})
        return run_id

    async def get_run(self, run_id: str) -> RunState:
        live = self._live.get(run_id)
        if live is not None:
            return live.state
        loaded = await self._load_run(run_id)
        if loaded is None:
            raise NotFound(f"no run {run_id!r}", field="run_id", fix="use the id start_run returned")
        return loaded[0]

    async def _load_run(self, run_id: str) -> tuple[RunState, bool] | None:
        """A stored run with its steps in declaration order (the store keeps no order)."""
        loaded = await self._store.load_run(run_id)
        if loaded is None:
            return None
        run, cancel_requested = loaded
        wf = self._workflows.get(run.workflow_id)
        if wf is not None and set(wf.spec.names) == set(run.steps):
            run = attrs.evolve(run, steps={name: run.steps[name] for name in wf.spec.names})
        return run, cancel_requested

    async def list_runs(self, workflow_id: str | None = None, *, limit: int = 100) -> list[RunState]:
        """Most recent first."""
        return [await self.get_run(rid) for rid in await self._store.run_ids(workflow_id, limit)]

    async def run_status(self, run_id: str) -> AsyncIterator[RunUpdate]:
        """The run's current state, then every change; ends after the terminal update."""
        live = self._live.get(run_id)
        if live is None:
            run = await self.get_run(run_id)
            live = self._live.get(run_id)
            if live is None:
                yield run.to_update()
                return
        first = live.state.to_update(live.state.current_step)
        yield first
        if first.status.terminal:
            return
        cursor = len(live.updates)
        while True:
            while cursor < len(live.updates):
                update = live.updates[cursor]
                cursor += 1
                yield update
                if update.status.terminal:
                    return
            if live.closed:
                raise Unavailable(
                    f"run {run_id!r} stopped being driven (the engine stopped or its store failed)",
                    fix="the run resumes when the infra starts again; follow it then",
                )
            await live.wakeup.wait()

    async def cancel_run(self, run_id: str) -> RunState:
        """Cancel a run: steps not started are cancelled, running tasks are cancelled on the
        scheduler. Returns the final state (a finished run is returned unchanged)."""
        live = self._live.get(run_id)
        if live is None:
            return await self.get_run(run_id)
        if not live.cancel_requested:
            live.cancel_requested = True
            await self._store.save_run(live.state, cancel_requested=True)
            await self._cancel_running_tasks(live)
        await live.finished.wait()
        return live.state

    async def _cancel_running_tasks(self, live: _LiveRun) -> None:
        for step in list(live.state.steps.values()):
            if step.status is StepStatus.RUNNING and step.task_id:
                try:
                    await self.scheduler.cancel(step.task_id)
                except NotFound:
                    pass  # not accepted yet: the step sees cancel_requested before submitting

    # -- driving ---------------------------------------------------------------------------

    def _drive(self, state: RunState, cancel_requested: bool) -> None:
        wf = self._workflows.get(state.workflow_id)
        if wf is None:
            return  # the store holds a run of an unknown workflow: nothing to drive it with
        live = _LiveRun(state, wf, cancel_requested)
        self._live[state.run_id] = live
        self._need_tg().start_soon(self._drive_run, live, name=f"workflow-run {state.run_id}")

    async def _drive_run(self, live: _LiveRun) -> None:
        for name, state in live.state.steps.items():
            if state.status.terminal:
                live.step_done[name].set()
        if live.cancel_requested:
            await self._cancel_running_tasks(live)
        if not live.workflow.spec.continue_on_failure and any(
            s.status is StepStatus.FAILED for s in live.state.steps.values()
        ):
            live.stop_new = True  # resumed after a failure: the default policy still holds
        try:
            async with anyio.create_task_group() as tg:
                for step in live.workflow.spec.steps:
                    if not live.state.steps[step.name].status.terminal:
                        tg.start_soon(self._drive_step, live, step)
            await self._finish_run(live)
        except* InfraError:
            # The store failed (disk full, file gone): this run stops here, stays recorded as
            # unfinished and resumes on the next start; other runs and the infra carry on.
            log.exception("workflow run %s stopped", live.state.run_id)
            live.close()
        finally:
            live.finished.set()
            if live.state.status.terminal:
                self._live.pop(live.state.run_id, None)

    async def _drive_step(self, live: _LiveRun, step: StepSpec) -> None:
        try:
            for dep in step.depends_on:
                await live.step_done[dep].wait()
            await self._execute_step(live, step)
        finally:
            live.step_done[step.name].set()

    async def _execute_step(self, live: _LiveRun, step: StepSpec) -> None:
        steps = live.state.steps
        if live.cancel_requested:
            await self._set_step(live, step.name, status=StepStatus.CANCELLED, error="run cancelled")
            return
        failed_deps = [d for d in step.depends_on if steps[d].status is not StepStatus.COMPLETED]
        if failed_deps:
            reason = f"dependency {failed_deps[0]!r} ended {steps[failed_deps[0]].status}"
            await self._set_step(live, step.name, status=StepStatus.SKIPPED, error=reason)
            return
        if live.stop_new and steps[step.name].status is StepStatus.PENDING:
            await self._set_step(live, step.name, status=StepStatus.SKIPPED, error="run failed")
            return
        task_id = f"{live.state.run_id}.{step.name}"
        try:
            results = {d: steps[d].result for d in _upstream_results(step)}
            payload = render(step.payload, "payload", live.state.input, results)
            spec = TaskSpec(
                id=task_id,
                task_class=step.task_class,
                payload=payload,
                priority=step.priority,
                timeout=step.timeout,
                max_attempts=step.max_attempts,
                workflow_id=live.state.workflow_id,
            )
        except (RenderError, SpecError) as exc:
            # A filled-in value the task cannot hold fails this step, naming the field.
            await self._step_failed(live, step.name, str(exc))
            return
        if steps[step.name].status is not StepStatus.RUNNING:
            # Recorded before submitting: after a crash in between, re-submitting is idempotent.
            await self._set_step(
                live, step.name, status=StepStatus.RUNNING, task_id=task_id, started_at=time.time()
            )
        try:
            await self.scheduler.submit(spec)
            if live.cancel_requested:
                # cancel_run looked for running tasks before this one was accepted.
                await self.scheduler.cancel(task_id)
            result = await self.scheduler.wait(task_id)
            attempts = (await self.scheduler.get(task_id)).attempts
        except InfraError as exc:
            await self._step_failed(live, step.name, f"task {task_id!r}: {exc}")
            return
        status = {
            TaskStatus.COMPLETED: StepStatus.COMPLETED,
            TaskStatus.CANCELLED: StepStatus.CANCELLED,
        }.get(result.status, StepStatus.FAILED)
        if status is StepStatus.FAILED:
            await self._step_failed(
                live, step.name, result.error or f"task ended {result.status}", attempts, result.result
            )
            return
        if status is StepStatus.CANCELLED and not live.cancel_requested:
            # Cancelled from outside the run (e.g. infra.cancel(task_id)): the step did not
            # do its work, so the failure policy applies as for a failure.
            if not live.workflow.spec.continue_on_failure:
                live.stop_new = True
        await self._set_step(
            live,
            step.name,
            status=status,
            attempts=attempts,
            result=dict(result.result),
            error=result.error,
            completed_at=time.time(),
        )

    async def _step_failed(
        self,
        live: _LiveRun,
        name: str,
        error: str,
        attempts: int | None = None,
        result: Mapping[str, str] | None = None,
    ) -> None:
        if not live.workflow.spec.continue_on_failure:
            live.stop_new = True
        changes: dict[str, Any] = {"status": StepStatus.FAILED, "error": error, "completed_at": time.time()}
        if attempts is not None:
            changes["attempts"] = attempts
        if result is not None:
            changes["result"] = dict(result)
        await self._set_step(live, name, **changes)

    async def _set_step(self, live: _LiveRun, name: str, **changes: Any) -> None:
        step = attrs.evolve(live.state.steps[name], **changes)
        live.set_step(step)
        # Published with the change itself (so each update counts exactly the steps done by
        # then); dependents start only after the save below, which is what durability needs.
        live.publish(name)
        await self._store.save_step(live.state.run_id, step)
        if step.status.terminal:
            self.bus.publish(
                "workflow_step_completed",
                live.state.run_id,
                {
                    "workflow_id": live.state.workflow_id,
                    "step": name,
                    "status": str(step.status),
                    "task_id": step.task_id,
                    "error": step.error,
                },
            )

    async def _finish_run(self, live: _LiveRun) -> None:
        state = live.state
        steps = state.steps.values()
        failed = [s for s in steps if s.status in (StepStatus.FAILED, StepStatus.CANCELLED)]
        if live.cancel_requested:
            status, error = RunStatus.CANCELLED, "run cancelled"
        elif failed:
            how = "failed" if failed[0].status is StepStatus.FAILED else "was cancelled"
            status, error = RunStatus.FAILED, f"step {failed[0].name!r} {how}: {failed[0].error}"
        else:
            status, error = RunStatus.COMPLETED, ""
        output, output_error = _run_output(live.workflow.spec, state)
        if output_error and status is RunStatus.COMPLETED:
            status, error = RunStatus.FAILED, output_error
        final = attrs.evolve(state, status=status, error=error, output=output, updated_at=time.time())
        # Saved first: whoever sees the terminal state (stream, get_run, event) can rely on it.
        await self._store.save_run(final, cancel_requested=live.cancel_requested)
        live.state = final
        live.publish()
        event = {
            RunStatus.COMPLETED: "workflow_completed",
            RunStatus.FAILED: "workflow_failed",
            RunStatus.CANCELLED: "workflow_cancelled",
        }[status]
        self.bus.publish(event, state.run_id, {"workflow_id": state.workflow_id, "error": error})


def _upstream_results(step: StepSpec) -> list[str]:
    """The steps whose results ``step``'s payload reads (validated to be upstream)."""
    names: list[str] = []
    for field, text in string_leaves(step.payload, "payload"):
        for ref in template_refs(text, field):
            if ref[0] == "steps" and ref[1] not in names:
                names.append(ref[1])
    return names


def _run_output(spec: WorkflowSpec, run: RunState) -> tuple[JsonObject, str]:
    """The run's output and, if a declared output could not be filled, the error."""
    results = {n: s.result for n, s in run.steps.items() if s.status is StepStatus.COMPLETED}
    if spec.output:
        out: dict[str, Any] = {}
        for key, text in spec.output.items():
            try:
                out[key] = render(text, f"output.{key}", run.input, results)
            except RenderError as exc:
                return out, str(exc)
        return out, ""
    return {
        f"{name}.{k}": v for name in spec.sinks() if name in results for k, v in results[name].items()
    }, ""
