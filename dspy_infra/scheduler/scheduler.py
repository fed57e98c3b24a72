"""Scheduler: task classes, priorities, dispatch, retries, timeouts, cancellation, durability.

Shape of the hot path (kept cheap on purpose: no per-task threads, transactions or scans):

- Each class has a heap of queued tasks ordered by (priority desc, submission order) and a
  ``ResizableSemaphore`` whose ``in_use`` is exactly the number of running tasks.
- Running tasks are executed by *workers*: coroutines owned by the scheduler's task group.
  A worker that finishes a task takes the next one itself while a slot is free, and parks
  when its class has nothing to do; a new worker is started only when no parked one exists,
  so there are never more workers than the class's peak concurrency.
- State changes go to the store as cheap tuples; the store's writer thread commits them in
  groups. A task is queued once its row is in the store's log and ``submit`` returns
  once it is on disk (the task may run meanwhile); a row the store refuses rejects that
  task alone and leaves no trace in memory. An attempt is
  recorded (``running``, attempts + 1) and committed before its handler starts, so recovery
  counts attempts that a crash interrupted and ``max_attempts`` bounds how often one task
  can take the process down. An in-process handler waits only until the record is in the
  kernel (safe from this process's death, which is what the record guards against): the
  attempts started in one loop step are appended to the store's attempt journal with one
  write from the loop, and their rows follow through group commit;
  a handler that starts processes or containers (``exec``, ``container``) or a class run by
  an executor waits until it is flushed to the disk, so not even a power cut can make such
  work run twice unnoticed. Results are delivered (``wait``, ``stream_results``) once the
  terminal row is on disk, so a result a caller has seen is never run again after a crash.
- Every ``limiter_interval`` the sampler asks each adaptive class's ``AimdPolicy`` for a new
  limit and resizes the semaphore.

Executors: a class whose ``executor`` is not ``"local"`` runs its tasks through the executor
of that name from the ``dspy_infra_executors`` hook: ``factory(settings)`` returns an
``Executor`` (``context.py``: ``async run(ctx) -> Mapping[str, Any]``).
Results are JSON objects (``values.check_json_object``); a value JSON cannot hold fails the
task with an error naming its key.

Size: over 600 lines on purpose. What is left here is the ``Scheduler`` class alone, whose
dispatch, attempt end, retry, cancel, recovery and commit paths share its private state on
the hot path; the pieces with an idea of their own already live next to it (``task.py``,
``queue.py``, ``delivery.py``, ``limiter.py``, ``store.py``, ``context.py``). Cutting the
class into mixins would hide the invariants that tie those paths together.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from typing import Any, Self

import anyio
import pluggy
from anyio.abc import AsyncResource

from ..config import Settings
from ..errors import (
    AlreadyExists,
    DeadlineExceeded,
    HandlerFailure,
    InfraError,
    NotFound,
    PermanentFailure,
    PermissionDenied,
    SpecError,
    Unavailable,
)
from ..events import EventBus
from ..hardware import detect_hardware
from ..metrics import InfraMetrics
from ..models import HardwareInfo, QueueStatus, TaskClass, TaskResult, TaskSpec, TaskState, TaskStatus
from ..ownership import end_interrupted_attempts
from ..plugins import collect_mapping
from ..values import check_json_object, preview
from .classes import check_runnable, resolve_classes
from .context import (
    BoundedExecutor,
    DetachableExecutor,
    Executor,
    ExecutorFactory,
    Handler,
    SharedResources,
    classes_left_running,
)
from .delivery import STREAM_BUFFER_LIMIT, Subscriber
from .queue import ClassQueue, queue_key
from .store import (
    InsertRow,
    MemoryStore,
    PrunedId,
    SqliteStore,
    StoredTask,
    encode_json_object,
)
from .task import NO_RESULT, TaskRecord

__all__ = ["RETRY_BACKOFF_BASE", "RETRY_BACKOFF_CAP", "STREAM_BUFFER_LIMIT", "Scheduler", "retry_delay"]

log = logging.getLogger(__name__)

#: First retry waits this long (seconds); each further retry doubles it, up to the cap.
RETRY_BACKOFF_BASE = 0.1
RETRY_BACKOFF_CAP = 30.0

_PENDING = TaskStatus.PENDING
_RUNNING = TaskStatus.RUNNING
_COMPLETED = TaskStatus.COMPLETED
_FAILED = TaskStatus.FAILED
_CANCELLED = TaskStatus.CANCELLED
_EVENT_TYPE = {s: f"task_{s.value}" for s in TaskStatus}
#: An attempt whose start record the store refuses this many times in a row fails the task.
_MAX_UNSAVED_STARTS = 5
#: A worker yields to the event loop after this many tasks that finished without awaiting.
_YIELD_EVERY = 64
#: Handlers whose attempts start work outside this process (a process, a container): their
#: attempt record is flushed to the disk before they start, not only written to the log.
_OUTSIDE_HANDLERS = frozenset({"exec", "container"})


class _SharedGate(asyncio.Future[InfraError | None]):
    """A future that many workers await and none may cancel: a task cancelled while
    awaiting it gets its CancelledError once the gate resolves (the journal gate resolves at
    the end of the loop step that armed it, or when the store answers its fallback)."""

    def cancel(self, msg: Any | None = None) -> bool:
        return False


def retry_delay(failed_attempts: int) -> float:
    """Backoff before the next attempt after ``failed_attempts`` failures (>= 1)."""
    return min(RETRY_BACKOFF_CAP, RETRY_BACKOFF_BASE * 2 ** (failed_attempts - 1))


class Scheduler(AsyncResource):
    """Runs submitted tasks by class. ``async with Scheduler(settings, bus=..., ...)``."""

    def __init__(
        self,
        settings: Settings,
        *,
        bus: EventBus,
        metrics: InfraMetrics,
        plugins: pluggy.PluginManager,
        hardware: HardwareInfo | None = None,
    ) -> None:
        self.settings = settings
        self.bus = bus
        self.metrics = metrics
        self.plugins = plugins
        self._hardware_arg = hardware
        self.hardware: HardwareInfo | None = hardware
        self._classes: dict[str, TaskClass] = {}
        self._queues: dict[str, ClassQueue] = {}
        self._handlers: dict[str, Handler] = {}
        #: Recovered tasks parked until their handler is registered (see _park_for_handler).
        self._awaiting_handler: dict[str, list[TaskRecord]] = {}
        self._handler_grace_until = 0.0
        self._executors: dict[str, Handler] = {}
        #: Executor name -> what its engine can hold per class (the adaptive limit's ceiling).
        self._capacities: dict[str, Callable[[str], int | None]] = {}
        #: Executors whose attempts outlive this process (a restart adopts them).
        self._adopting: set[str] = set()
        #: Those that a graceful stop tells to leave the attempts of ``_left_running`` running.
        self._detachable: dict[str, DetachableExecutor] = {}
        self._left_running: frozenset[str] = frozenset()
        #: Engine connections and the like that handlers reuse across attempts.
        self._shared = SharedResources()
        self._tasks: dict[str, TaskRecord] = {}
        #: Ids of finished tasks pruned from retention -> their content hash (see _existing).
        #: Memory-only stores keep them here; the durable store keeps them on disk only (its
        #: trigger refuses such an id when the row is written), so memory stays flat.
        self._pruned: dict[str, str] = {}
        #: Delivered terminal tasks in delivery order (for retention).
        self._finished: dict[str, None] = {}
        self._listeners: list[Callable[[TaskState], None]] = []
        self._subscribers: set[Subscriber] = set()
        #: Terminal tasks whose commit callback is not registered yet (durable mode).
        self._undelivered: list[TaskRecord] = []
        self._store: SqliteStore | MemoryStore = MemoryStore()
        #: Memory-only stores keep nothing: the hot path skips building rows for them.
        self._durable = False
        self._seq = 0
        self._inflight = 0
        self._idle_event: asyncio.Event | None = None
        self._tg: anyio.abc.TaskGroup | None = None
        self._stack: contextlib.AsyncExitStack | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread = 0
        self._accepting = False
        self._dispatching = False
        self._stopping = False
        #: Resolve once the attempts started in this loop step are in the store's log / on
        #: the disk (_attempt_gate).
        self._start_gate: asyncio.Future[InfraError | None] | None = None
        self._synced_start_gate: asyncio.Future[InfraError | None] | None = None
        #: Attempts waiting at ``_start_gate``: written to the attempt journal when it opens.
        self._journaled: list[TaskRecord] = []
        #: The gate of a task that started at its submit with its row in the attempt
        #: journal: already open (set at start).
        self._open_gate: asyncio.Future[InfraError | None] | None = None
        #: Monotonic deadline of the shutdown grace once ``drain`` was first called.
        self._drain_deadline: float | None = None

    # -- lifecycle ------------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        self._loop = asyncio.get_running_loop()
        self._open_gate = self._loop.create_future()
        self._open_gate.set_result(None)
        self._loop_thread = threading.get_ident()
        # nvidia-smi is a subprocess: detect off the loop. The result is cached for the
        # process, so the built-in classes hook (called below, on the loop) finds it ready.
        detected = await anyio.to_thread.run_sync(detect_hardware)
        if self.hardware is None:
            self.hardware = detected
        self._classes = resolve_classes(self.settings, self.plugins, self._hardware_arg)
        for name, fn in collect_mapping(self.plugins.hook.dspy_infra_handlers()).items():
            self.register_handler(name, fn)
        stack = contextlib.AsyncExitStack()
        await stack.__aenter__()
        try:
            await self._build_executors(stack)
            for cls in self._classes.values():
                refusal: InfraError | None = None
                try:
                    check_runnable(
                        cls, hardware=self.hardware, settings=self.settings, executors=self._executors
                    )
                except InfraError as exc:
                    refusal = exc
                self._queues[cls.name] = ClassQueue(cls, self.metrics, refusal, self._flush_if_loop_thread)
            self._left_running = classes_left_running(
                self._classes.values(), self._detachable, self._executors
            )
            self._durable = self.settings.durable
            if self._durable:
                self._store = SqliteStore(
                    self.settings.resolved_home(),
                    commit_interval=self.settings.commit_interval,
                    on_rejected=self._rows_rejected,
                )
            opened = await self._store.open()
            self._pruned = opened.pruned
            stack.push_async_callback(self._fail_leftovers)
            stack.push_async_callback(self._store.aclose)
            # Closed right after the task group: no attempt is left to use them.
            self._shared = SharedResources()
            stack.push_async_callback(self._shared.aclose)
            self._tg = await stack.enter_async_context(anyio.create_task_group())
            self._accepting = self._dispatching = True
            self._handler_grace_until = time.monotonic() + self.settings.handler_grace
            if self._durable:
                await self._before_recovery([row for row in opened.tasks if not row.status.terminal])
            self._recover(opened.tasks)
            self._tg.start_soon(self._sample_loop, name="dspy_infra-limiter")
        except BaseException:
            await stack.aclose()
            raise
        self._stack = stack
        return self

    async def _build_executors(self, stack: contextlib.AsyncExitStack) -> None:
        factories: dict[str, ExecutorFactory] = collect_mapping(self.plugins.hook.dspy_infra_executors())
        for name, factory in factories.items():
            executor = factory(self.settings)
            if executor is None:  # the plugin is installed but not configured (e.g. slurm unset)
                continue
            if not isinstance(executor, Executor):
                raise SpecError(
                    f"executor {name!r} has no run(ctx) method",
                    field="dspy_infra_executors",
                    fix="return a factory whose result has `async def run(ctx)`",
                )
            if isinstance(executor, contextlib.AbstractAsyncContextManager):
                await stack.enter_async_context(executor)  # its watchers live as long as we do
            self._executors[name] = executor.run
            if isinstance(executor, BoundedExecutor):
                self._capacities[name] = executor.capacity
            if getattr(executor, "survives_owner", False):
                self._adopting.add(name)
                if isinstance(executor, DetachableExecutor):
                    self._detachable[name] = executor

    async def aclose(self) -> None:
        """Stop accepting, give running tasks ``settings.shutdown_grace`` to finish, then stop.

        Tasks still queued or running stay in the store and run again on the next start.
        """
        stack, self._stack = self._stack, None
        if stack is None:
            return
        self._accepting = False
        try:
            await self.drain(self.settings.shutdown_grace)
        finally:
            self._stopping = True
            self._dispatching = False
            for rec in self._tasks.values():
                if rec.timer is not None:
                    rec.timer.cancel()
                    rec.timer = None
            for executor in self._detachable.values():
                executor.leave_running(self._left_running)  # before their attempts are cancelled
            if self._tg is not None:
                self._tg.cancel_scope.cancel()
            await stack.aclose()
            self.flush_metrics()

    async def _fail_leftovers(self) -> None:
        """After the store is closed: nobody waits forever on a task that will not finish here."""
        # Finished just before the store closed: their rows went out with its last commit.
        recs, self._undelivered = self._undelivered, []
        for rec in recs:
            self._deliver(rec)
        for rec in self._tasks.values():
            if rec.waiters:
                for fut in rec.waiters:
                    if not fut.done():
                        fut.set_exception(
                            Unavailable(
                                f"the scheduler stopped before task {rec.spec.id!r} finished"
                                " (it is kept and runs again on the next start)"
                            )
                        )
                rec.waiters = None
        for sub in list(self._subscribers):
            sub.close()

    async def drain(self, timeout: float) -> None:
        """Start no more tasks; wait up to ``timeout`` seconds for running ones to finish.

        Queued tasks (and ones still running at the deadline) stay durable.
        """
        self._dispatching = False
        # One grace period per shutdown: a server that drains before closing (run_server)
        # and the close's own drain share the deadline of the first call.
        deadline = time.monotonic() + timeout
        if self._drain_deadline is not None:
            deadline = min(deadline, self._drain_deadline)
        self._drain_deadline = deadline
        if self._inflight == 0:
            return
        self._idle_event = asyncio.Event()
        with anyio.move_on_after(max(0.0, deadline - time.monotonic())):
            await self._idle_event.wait()

    # -- recovery -------------------------------------------------------------------------

    async def _before_recovery(self, unfinished: list[StoredTask]) -> None:
        """Runs before recovery re-queues anything: ends what interrupted attempts left.

        The processes of attempts a crashed predecessor left running (recorded pid + start
        time, process group, environment marker) end before any of those tasks runs again,
        so no two runs of one task overlap. Pending tasks are included: a graceful shutdown
        that was itself killed may have saved a still-running attempt as pending.
        """
        await end_interrupted_attempts(self.settings.resolved_home(), [row.spec.id for row in unfinished])

    def _adopts(self, class_name: str) -> bool:
        """True when the class's attempts outlive this process: an interrupted one is still
        running (or has a result) elsewhere, and its next attempt adopts it."""
        cq = self._queues.get(class_name)
        return cq is not None and cq.cls.executor in self._adopting

    def _recover(self, stored: list[StoredTask]) -> None:
        finished: list[TaskRecord] = []
        requeue: list[TaskRecord] = []
        exhausted: list[TaskRecord] = []
        for row in stored:
            rec = TaskRecord(row.spec, row.seq, row.submitted_at)
            rec.attempts = row.attempts
            rec.result = row.result
            rec.error = row.error
            rec.started_at = row.started_at
            rec.completed_at = row.completed_at
            rec.duration_ms = row.duration_ms
            self._tasks[rec.spec.id] = rec
            self._seq = max(self._seq, row.seq + 1)
            if row.status.terminal:
                rec.status = row.status
                rec.delivered = True
                finished.append(rec)
            elif (
                row.status is _RUNNING
                and row.attempts >= row.spec.max_attempts
                and not self._adopts(row.spec.task_class)
            ):
                # The attempt was recorded before its handler started, so a task whose run
                # takes the process down uses up its attempts like any other failure.
                rec.status = _RUNNING
                exhausted.append(rec)
            else:
                # Queued, or running when the last process stopped with attempts left: run it
                # again (at-least-once). The interrupted attempt stays counted in ``attempts``.
                requeue.append(rec)
        finished.sort(key=lambda r: r.completed_at)
        for rec in finished:
            self._finished[rec.spec.id] = None
        self._prune()
        now = time.time()
        for rec in exhausted:
            self._terminal(
                rec,
                _FAILED,
                "the process running this task stopped (crash or kill) during attempt"
                f" {rec.attempts} of {rec.spec.max_attempts}; not retried"
                " (fix: find why it stopped, e.g. in the task's command or its memory use;"
                " raise max_attempts to retry such tasks)",
                now,
                count_inflight=False,
            )
        for rec in requeue:
            cq = self._queues.get(rec.spec.task_class)
            if cq is None:
                self._terminal(
                    rec,
                    _FAILED,
                    f"task_class: {rec.spec.task_class!r} is no longer configured"
                    " (fix: declare it again under [task_classes] to run such tasks)",
                    now,
                    count_inflight=False,
                )
                continue
            if rec.status is not _PENDING:
                rec.status = _PENDING
            rec.recovered = True
            self._enqueue(cq, rec, now)
        for cq in self._queues.values():
            self._pump(cq)

    # -- classes and handlers -------------------------------------------------------------

    @property
    def classes(self) -> dict[str, TaskClass]:
        return dict(self._classes)

    def register_handler(self, name: str, fn: Handler) -> None:
        """Make ``fn`` run tasks whose ``payload["handler"]`` is ``name`` (replaces any)."""
        if not isinstance(name, str) or not name:
            raise SpecError(f"handler name must be a non-empty string, got {name!r}", field="name")
        if not callable(fn):
            raise SpecError(
                f"handler {name!r} is not callable",
                field="fn",
                fix="pass `async def handler(ctx) -> dict[str, str]`",
            )
        self._handlers[name] = fn
        for rec in self._awaiting_handler.pop(name, ()):
            if rec.timer is not None:
                rec.timer.cancel()
            cq = self._queues.get(rec.spec.task_class)
            if cq is not None:
                self._requeue(cq, rec)

    def handler_names(self) -> list[str]:
        return sorted(self._handlers)

    # -- submit ---------------------------------------------------------------------------

    def _check(self, spec: TaskSpec) -> tuple[ClassQueue, str]:
        """Refuse what this scheduler cannot run; returns the class queue and the payload's
        JSON text, or "" from a memory-only scheduler (which keeps no row) when the payload
        is plainly within the limit (``TaskRecord.insert_row`` encodes a missing text)."""
        if not self._accepting:
            raise Unavailable("the scheduler is not running", fix="start it (async with Scheduler(...))")
        cq = self._queues.get(spec.task_class)
        if cq is None:
            raise SpecError(
                f"unknown task class {preview(spec.task_class)}",
                field="task_class",
                fix="use one of " + ", ".join(sorted(self._queues)) + " or declare it under [task_classes]",
            )
        if cq.refusal is not None:
            raise cq.refusal
        payload = spec.payload
        handler = payload.get("handler")
        if handler is not None and not isinstance(handler, str):
            raise SpecError(
                f"must be a string, got {preview(handler)}", field="payload.handler", fix='e.g. "exec"'
            )
        if handler == "exec" and self.settings.exec_policy == "deny":
            raise PermissionDenied(
                'the exec handler is turned off on this server (exec_policy = "deny")',
                field="exec_policy",
                fix='set exec_policy = "allow" (or "embedded") in dspy-infra.toml or'
                " DSPY_INFRA_EXEC_POLICY to run commands, or use another handler",
            )
        limit = self.settings.max_payload_bytes
        if not self._durable and _plainly_within(payload, limit):
            return cq, ""  # (the text would only be measured, at twice the cost of this test)
        text = encode_json_object(payload) if payload else "{}"
        if len(text) * 4 > limit:  # cheap bound first; exact UTF-8 size only when it may matter
            size = len(text.encode("utf-8"))
            if size > limit:
                raise SpecError(
                    f"payload is {size} bytes as JSON, more than the limit of {limit}",
                    field="payload",
                    fix="pass large data by reference (a path or URL), or raise max_payload_bytes",
                )
        return cq, text

    def _existing(self, spec: TaskSpec) -> TaskRecord | None:
        rec = self._tasks.get(spec.id)
        if rec is not None and rec.spec != spec and rec.spec.content_hash != spec.content_hash:
            raise AlreadyExists(
                f"task {preview(spec.id)} already exists with different content",
                field="id",
                fix=f"ids are kept in {self._where()}; use a fresh id, or submit the same content to"
                " get the earlier task back (scripts that rerun with fixed ids: derive the id from"
                " the content or the run)",
            )
        if rec is None and spec.id in self._pruned:
            raise self._pruned_refusal(spec, self._pruned[spec.id])
        return rec

    def _pruned_refusal(self, spec: TaskSpec, content_hash: str) -> AlreadyExists:
        same = content_hash == spec.content_hash
        return AlreadyExists(
            f"task {preview(spec.id)} already ran"
            + (" with the same content" if same else " with different content")
            + f" and its result was pruned (only the newest {self.settings.retention} finished"
            " tasks are kept); a reused id is refused so it never runs twice by accident",
            field="id",
            fix=f"ids are kept in {self._where()}; use a fresh id (e.g. add a run number or a"
            " timestamp to fixed ids), or raise retention to keep results longer",
        )

    def _where(self) -> str:
        if self._durable:
            return str(self.settings.resolved_home() / "state.db")
        return "this process's memory"

    async def submit(self, spec: TaskSpec) -> TaskState:
        """Accept ``spec`` durably and queue it. Idempotent on (id, content)."""
        outcome = (await self.submit_each((spec,)))[0]
        if isinstance(outcome, InfraError):
            raise outcome
        return outcome

    async def submit_many(self, specs: Sequence[TaskSpec]) -> list[TaskState]:
        """Accept a batch with one group commit. Validation is all-or-nothing; a task the
        store refuses raises its error (the batch's other tasks are accepted: use
        ``submit_each`` to learn the outcome of each)."""
        outcomes = await self.submit_each(specs, all_or_nothing=True)
        for outcome in outcomes:
            if isinstance(outcome, InfraError):
                raise outcome
        return [outcome for outcome in outcomes if not isinstance(outcome, InfraError)]

    async def submit_and_wait(self, spec: TaskSpec, timeout: float | None = None) -> TaskResult:
        """Submit ``spec`` and wait for its result (``DeadlineExceeded`` after ``timeout``).

        No acknowledgement is given before the result, so the task's row need only survive
        this process's death before it runs (as an attempt record needs); the flush that
        delivers the result covers it too: one disk flush per task instead of two. A lone
        in-process task with a free slot starts at once, its row in the attempt journal
        (``_intake``), without waiting for the store's writer thread. A timeout tells the
        caller that the task stays queued, so that answer waits for the row's flush."""
        outcome = (await self._intake((spec,), False, False))[0]
        if type(outcome) is TaskRecord:
            outcome = outcome.rejection  # (no TaskState: the result is what is returned)
        if outcome is not None:
            raise outcome
        try:
            return await self.wait(spec.id, timeout)
        except DeadlineExceeded:
            await self._committed()
            raise

    async def submit_each(
        self, specs: Sequence[TaskSpec], *, all_or_nothing: bool = False, acknowledged: bool = True
    ) -> list[TaskState | InfraError]:
        """Accept a batch with one group commit; one outcome per spec, in order: its state,
        or the error that refused it (bad spec, reused id, or a row the store refused).

        A refused task leaves no trace; its neighbours are accepted. With
        ``all_or_nothing``, a spec that fails validation raises before anything is accepted.
        ``acknowledged`` (the default): return once the rows are on disk. False: once they
        are in the store's log (or, for a lone in-process task that starts at once, in the
        attempt journal: the same level), for a caller that acknowledges nothing before a
        result (``submit_and_wait``). Either way a task is queued (and may run) as soon as its row
        is in the log; if the disk flush then fails, the error is raised though the task
        stays queued (it was never acknowledged, and the store acknowledges nothing more).
        """
        outcomes = await self._intake(specs, all_or_nothing, acknowledged)
        for index, outcome in enumerate(outcomes):
            if type(outcome) is TaskRecord:
                outcomes[index] = outcome.rejection if outcome.rejection is not None else outcome.state()
        return outcomes

    async def submit_batch(self, specs: Sequence[TaskSpec]) -> list[tuple[int, InfraError]]:
        """Accept a batch for a caller that answers with refusals only (``SubmitTasks``):
        (index, error) of each refused spec, in order; every other spec is accepted, or was
        already (the same id and content). The same rules, group commit and acknowledgement
        as ``submit_each`` (returns once every accepted row is flushed to the disk), without
        building a ``TaskState`` per task that such a caller would throw away."""
        refused: list[tuple[int, InfraError]] = []
        for index, outcome in enumerate(await self._intake(specs, False, True)):
            if type(outcome) is TaskRecord:
                if outcome.rejection is not None:
                    refused.append((index, outcome.rejection))
            else:
                refused.append((index, outcome))
        return refused

    async def _intake(self, specs: Sequence[TaskSpec], all_or_nothing: bool, acknowledged: bool) -> list[Any]:
        """``submit_each``'s work: one entry per spec, its error or its record (whose
        ``rejection`` is set if the store refused its row)."""
        outcomes: list[Any] = [None] * len(specs)
        # Parallel lists rather than a tuple per spec: in a batch of thousands such
        # temporaries outlive the young collections and make the full ones come sooner.
        checked: list[int] = []
        queues: list[ClassQueue | None] = []
        texts: list[str] = []
        batch: dict[str, TaskSpec] = {}
        for index, spec in enumerate(specs):
            try:
                if not isinstance(spec, TaskSpec):
                    raise SpecError(f"expected a TaskSpec, got {type(spec).__name__}", field="spec")
                queue, text = self._check(spec)
                earlier = batch.get(spec.id)
                if earlier is not None and earlier != spec:
                    raise AlreadyExists(
                        f"task {preview(spec.id)} appears twice in the batch with different content",
                        field="id",
                    )
                batch[spec.id] = spec
                existing = self._existing(spec)
            except InfraError as exc:
                if all_or_nothing:
                    raise
                outcomes[index] = exc
                continue
            checked.append(index)
            queues.append(queue if existing is None else None)
            texts.append(text)
        now = time.time()
        tasks = self._tasks
        fresh: list[TaskRecord] = []
        rows: list[InsertRow] = []
        # A lone task may start with its submit when a slot is free and none of its class is
        # queued (a batch keeps the queue's priority order instead): its row then records
        # the attempt. One whose attempt must be flushed first (work outside this process)
        # waits for the submit's flush, which covers both. For a caller that acknowledges
        # nothing before the result (submit_and_wait), an in-process task starts at once:
        # its row goes to the attempt journal from here, the level its attempt needs, so it
        # waits for no writer thread (the result's flush covers the row).
        lone = len(checked) == 1
        early: tuple[ClassQueue, TaskRecord] | None = None
        journaled = False
        for index, cq, text in zip(checked, queues, texts, strict=True):
            spec = specs[index]
            if cq is None or spec.id in tasks:
                outcomes[index] = tasks[spec.id]
                continue
            rec = TaskRecord(spec, self._seq, now)
            self._seq += 1
            tasks[spec.id] = rec
            if self._durable:
                rec.stored = False
                rec.payload_text = text
                if lone and self._starts_with_intake(cq, spec, acknowledged):
                    self._mark_started(cq, rec, now)
                    early = (cq, rec)
                    journaled = not _attempt_needs_flush(cq, spec)
                rows.append(rec.insert_row())
            self.bus.emit(
                "task_submitted",
                spec.id,
                {"task_class": spec.task_class, "priority": spec.priority, "workflow_id": spec.workflow_id},
            )
            if self._listeners:
                self._notify(rec)
            fresh.append(rec)
            outcomes[index] = rec
        if journaled:
            try:
                self._store.record_started(rows)
            except (OSError, ValueError) as exc:
                # Not known to be recorded: the attempt waits for the row's flush instead.
                log.warning("the attempt journal could not be written (%s); waiting for the store", exc)
                journaled = False
        elif rows:
            # One append: the store's writer never takes a batch's rows in two transactions.
            self._store.insert_many(rows)
        if early is not None:
            if journaled:
                self._start_journaled(*early)
            else:
                self._start_with_intake(*early)
        # Existing tasks whose row is committed need no wait; new ones (or ones whose insert is
        # still in flight, from a concurrent submit) do.
        if self._durable and (
            fresh or any(type(o) is TaskRecord and not (o.stored and o.flushed) for o in outcomes)
        ):
            # Queued once its row is in the store's log, from the store's callback (not from
            # this coroutine, which a disconnecting client may cancel): a task never runs
            # without its row. The acknowledgement (returning) waits for the flush, but the
            # task need not: it may run while the disk flushes, and a fast task's result row
            # then shares the flush with its acknowledgement (docs/performance.md says why
            # running before the acknowledgement gives nothing away).
            if fresh:
                self._store.after_write(lambda error: self._accepted(fresh, error, flushed=False))
            if journaled:
                return outcomes  # (its row survives this process's death: it is journaled)
            await self._committed(self._flushed(fresh) if acknowledged else None, flushed=acknowledged)
        else:
            self._accepted(fresh, None)
        return outcomes

    def _accepted(self, fresh: list[TaskRecord], error: InfraError | None, flushed: bool = True) -> None:
        """The commit holding these tasks' rows is done: queue the stored ones. Not
        ``flushed`` (only in the store's log): an acknowledged resubmit of one of them waits
        for a flush first."""
        touched: dict[str, ClassQueue] = {}
        queues = self._queues
        for rec in fresh:
            if rec.rejection is not None:
                continue
            if error is not None:
                self._reject(rec, error)
                continue
            rec.stored = True
            if not flushed:
                rec.flushed = False
            if rec.status is _PENDING and rec.timer is None:
                cq = queues[rec.spec.task_class]  # checked at submit; classes never go away
                key = queue_key(rec.spec.priority, rec.seq)  # _enqueue, inlined for batches
                cq.queued[key] = rec
                heapq.heappush(cq.heap, key)
                touched[cq.cls.name] = cq
        for cq in touched.values():
            self._pump(cq)

    @staticmethod
    def _flushed(fresh: list[TaskRecord]) -> Callable[[InfraError | None], None]:
        """The store callback that marks these accepted tasks' rows as on the disk."""

        def flushed(error: InfraError | None) -> None:
            if error is None:
                for rec in fresh:
                    rec.flushed = True

        return flushed

    def _rows_rejected(self, rejected: dict[str, InfraError]) -> None:
        """The store could not write these tasks' rows (called before the batch's callbacks)."""
        for task_id, error in rejected.items():
            rec = self._tasks.get(task_id)
            if rec is None:
                continue
            if not rec.stored:
                if isinstance(error, PrunedId):
                    error = self._pruned_refusal(rec.spec, error.content_hash)
                self._reject(rec, error)
            else:
                log.error("task %s: its state change was not saved: %s", preview(task_id), error)
                rec.write_error = error

    def _reject(self, rec: TaskRecord, error: InfraError) -> None:
        """A task whose row was never written was not accepted: forget it entirely."""
        rec.rejection = error
        if self._tasks.get(rec.spec.id) is rec:
            del self._tasks[rec.spec.id]
        if rec.waiters:
            for fut in rec.waiters:
                if not fut.done():
                    fut.set_exception(error)
            rec.waiters = None

    async def _committed(
        self, then: Callable[[InfraError | None], None] | None = None, *, flushed: bool = True
    ) -> None:
        """Return once everything queued for the store so far is committed and flushed to the
        disk (``flushed=False``: in the store's log); ``then(error)`` runs first, from the
        store's callback, even if this coroutine is cancelled."""
        assert self._loop is not None
        fut: asyncio.Future[None] = self._loop.create_future()

        def done(error: InfraError | None) -> None:
            try:
                if then is not None:
                    then(error)
            finally:  # the waiter is always answered
                if not fut.done():
                    if error is None:
                        fut.set_result(None)
                    else:
                        fut.set_exception(error)

        if flushed:
            self._store.after_commit(done)
        else:
            self._store.after_write(done)
        await fut

    # -- queries --------------------------------------------------------------------------

    def _record(self, task_id: str) -> TaskRecord:
        rec = self._tasks.get(task_id)
        if rec is None:
            raise NotFound(f"no task with id {task_id!r}", field="task_id")
        return rec

    async def get(self, task_id: str) -> TaskState:
        return self._record(task_id).state()

    async def wait(self, task_id: str, timeout: float | None = None) -> TaskResult:
        """The task's result once it is terminal (and committed). ``DeadlineExceeded`` after
        ``timeout`` seconds."""
        rec = self._record(task_id)
        if rec.delivered:
            return rec.to_result()
        assert self._loop is not None
        fut: asyncio.Future[None] = self._loop.create_future()
        if rec.waiters is None:
            rec.waiters = []
        rec.waiters.append(fut)
        try:
            if timeout is None:
                await fut  # (a cancel scope that never fires costs more than the rest of wait)
            else:
                with anyio.fail_after(timeout):
                    await fut
        except TimeoutError:
            raise DeadlineExceeded(
                f"task {task_id!r} is still {rec.status.value} after {timeout:g}s",
                field="timeout",
                fix="wait longer, or cancel the task",
            ) from None
        finally:
            if rec.waiters is not None and fut in rec.waiters:
                rec.waiters.remove(fut)
        return rec.to_result()

    async def list_tasks(
        self, *, status: str | None = None, limit: int = 100, workflow_id: str | None = None
    ) -> list[TaskState]:
        """Newest first, optionally only one status and/or one workflow."""
        wanted: TaskStatus | None = None
        if status:
            try:
                wanted = TaskStatus(status)
            except ValueError:
                raise SpecError(
                    f"unknown status {status!r}",
                    field="status",
                    fix="use one of " + ", ".join(s.value for s in TaskStatus),
                ) from None
        if not isinstance(limit, int) or limit < 1:
            raise SpecError(f"must be a positive integer, got {limit!r}", field="limit")
        out: list[TaskState] = []
        for rec in reversed(self._tasks.values()):
            if wanted is not None and rec.status is not wanted:
                continue
            if workflow_id is not None and rec.spec.workflow_id != workflow_id:
                continue
            out.append(rec.state())
            if len(out) >= limit:
                break
        return out

    def queue_status(self) -> dict[str, QueueStatus]:
        return {
            name: QueueStatus(
                task_class=name,
                depth=len(cq.queued),
                inflight=cq.sem.in_use,
                limit=cq.sem.limit,
                min_limit=cq.cls.min_concurrency,
                max_limit=cq.cls.max_concurrency,
            )
            for name, cq in self._queues.items()
        }

    def add_listener(self, fn: Callable[[TaskState], None]) -> Callable[[], None]:
        """Call ``fn(state)`` synchronously on every state change; returns the remover."""
        self._listeners.append(fn)

        def remove() -> None:
            with contextlib.suppress(ValueError):
                self._listeners.remove(fn)

        return remove

    async def stream_results(
        self, task_ids: Sequence[str] | None = None, *, include_completed: bool = False
    ) -> AsyncIterator[TaskResult]:
        """Terminal results as they happen (finished ones first with ``include_completed``).

        With ``task_ids``, the stream ends once every one of them is terminal.
        """
        wanted = set(task_ids) if task_ids else None
        remaining: set[str] = set()
        if wanted is not None:
            tasks = self._tasks
            for task_id in wanted:
                rec = tasks.get(task_id) or self._record(task_id)  # (which raises NotFound)
                if not rec.delivered:
                    remaining.add(task_id)
        sub = Subscriber(wanted)
        self._subscribers.add(sub)
        try:
            if include_completed:
                ids: Iterable[str]
                if not task_ids:
                    ids = list(self._finished)
                elif len(remaining) == len(task_ids):
                    ids = ()  # every one is still to come (a batch streamed as it was submitted)
                else:
                    ids = [t for t in task_ids if t not in remaining]
                for task_id in ids:
                    done = self._tasks.get(task_id)
                    if done is not None and done.delivered:
                        yield done.to_result()
            while wanted is None or remaining:
                while sub.buffer:
                    result = sub.buffer.popleft()
                    remaining.discard(result.task_id)
                    yield result
                if wanted is not None and not remaining:
                    return
                if sub.closed:
                    if sub.overflowed:
                        raise Unavailable(
                            f"this result stream fell more than {STREAM_BUFFER_LIMIT} results"
                            " behind and was closed",
                            fix="read results as they come, or reopen the stream (with"
                            " include_completed to catch up)",
                        )
                    if remaining:
                        raise Unavailable(
                            f"the scheduler stopped before {len(remaining)} streamed task(s) finished"
                        )
                    return
                assert self._loop is not None
                sub.wakeup = self._loop.create_future()
                await sub.wakeup
                sub.wakeup = None
        finally:
            self._subscribers.discard(sub)

    # -- cancel ---------------------------------------------------------------------------

    async def cancel(self, task_id: str) -> TaskState:
        """Cancel a queued task (removed from its queue) or a running one (its handler is
        cancelled; an ``exec`` subprocess group is killed). Terminal tasks are unchanged."""
        rec = self._record(task_id)
        if rec.status.terminal:
            return rec.state()
        now = time.time()
        if rec.status is _PENDING:
            cq = self._queues.get(rec.spec.task_class)
            if cq is not None:
                cq.queued.pop(queue_key(rec.spec.priority, rec.seq), None)
            if rec.timer is not None:
                rec.timer.cancel()
                rec.timer = None
            self._terminal(rec, _CANCELLED, "cancelled while queued", now, count_inflight=False)
            if cq is not None and rec.attempts and cq.cls.executor in self._detachable:
                # An earlier owner may have left its attempt running (on_shutdown = "leave").
                await self._detachable[cq.cls.executor].cancel_left(task_id, cq.cls.name)
        elif rec.status is _RUNNING and not rec.cancel_requested:
            rec.cancel_requested = True
            # No worker yet: it was handed over but has not run; it checks the flag first.
            if rec.worker is not None:
                rec.worker.cancel()
        if not rec.delivered:
            # Return once the handler has stopped (its subprocess is gone) and it is recorded.
            await self.wait(task_id)
        return rec.state()

    # -- dispatch (hot path) --------------------------------------------------------------

    def _enqueue(self, cq: ClassQueue, rec: TaskRecord, now: float) -> None:
        rec.ready_at = now
        key = queue_key(rec.spec.priority, rec.seq)
        cq.queued[key] = rec
        heapq.heappush(cq.heap, key)

    def _take(self, cq: ClassQueue) -> TaskRecord | None:
        """Next queued task of ``cq`` if a slot is free (the slot is then taken)."""
        if not self._dispatching:
            return None
        heap, queued = cq.heap, cq.queued
        while heap and heap[0] not in queued:
            heapq.heappop(heap)  # entry of a task cancelled while queued
        if not heap or not cq.sem.try_acquire():
            return None
        rec = queued.pop(heapq.heappop(heap))
        self._start(cq, rec)
        return rec

    def _starts_with_intake(self, cq: ClassQueue, spec: TaskSpec, acknowledged: bool) -> bool:
        """Whether a new task may start at its submit, its row recording the attempt (the
        slot is then taken): a slot is free and no task of its class is queued (nothing it
        would overtake), and either its attempt waits for a flush anyway (work outside this
        process) or nothing is acknowledged before its result and its id was never pruned
        (it runs before the store's trigger could refuse its row)."""
        if not (self._dispatching and not cq.queued):
            return False
        if not _attempt_needs_flush(cq, spec) and (acknowledged or self._store.is_pruned(spec.id)):
            return False
        return cq.sem.try_acquire()

    def _start_with_intake(self, cq: ClassQueue, rec: TaskRecord) -> None:
        """Hand ``rec``, started by ``_intake`` (its slot taken, its row queued with the
        attempt), to a worker; the attempt waits for the row's flush (``intake_gate``)."""
        assert self._loop is not None
        gate: asyncio.Future[InfraError | None] = self._loop.create_future()

        def flushed(error: InfraError | None) -> None:
            if not gate.done():
                gate.set_result(error)

        # Registered in the same loop step as the row: the flush that acknowledges the
        # submit covers the attempt too (one flush where there were two).
        self._store.after_commit(flushed)
        rec.intake_gate = gate
        self._announce_start(cq, rec)
        self._hand_to_worker(cq, rec)

    def _start_journaled(self, cq: ClassQueue, rec: TaskRecord) -> None:
        """Hand ``rec``, started by ``_intake`` with its row in the attempt journal, to a
        worker: its attempt is recorded, there is nothing to wait for."""
        rec.intake_gate = self._open_gate
        self._announce_start(cq, rec)
        self._hand_to_worker(cq, rec)

    def _start(self, cq: ClassQueue, rec: TaskRecord) -> None:
        self._mark_started(cq, rec, time.time())
        if self._durable:
            self._store.put(rec.update_row())
        self._announce_start(cq, rec)

    def _mark_started(self, cq: ClassQueue, rec: TaskRecord, now: float) -> None:
        rec.status = _RUNNING
        rec.attempts += 1
        rec.started_at = now
        rec.cancel_requested = False
        rec.write_error = None
        self._inflight += 1
        waited = now - rec.ready_at
        window = cq.window  # counted inline: this runs once per task
        window.started += 1
        window.wait_total += waited
        cq.m_wait.observe(waited)
        if cq.gpu_wait is not None:
            cq.gpu_wait.observe(waited)

    def _announce_start(self, cq: ClassQueue, rec: TaskRecord) -> None:
        self.bus.emit("task_started", rec.spec.id, {"task_class": cq.cls.name, "attempt": rec.attempts})
        if self._listeners:
            self._notify(rec)

    def _pump(self, cq: ClassQueue) -> None:
        """Start as many queued tasks of ``cq`` as its free slots allow."""
        while (rec := self._take(cq)) is not None:
            self._hand_to_worker(cq, rec)

    def _hand_to_worker(self, cq: ClassQueue, rec: TaskRecord) -> None:
        """Run started ``rec`` on a parked worker of ``cq``, or on a new one."""
        while cq.idle:
            parked = cq.idle.popleft()
            if not parked.done():
                parked.set_result(rec)
                return
        assert self._tg is not None
        self._tg.start_soon(self._worker, cq, rec)

    async def _worker(self, cq: ClassQueue, first: TaskRecord) -> None:
        """Run tasks of one class until cancelled at shutdown; park while there is no work."""
        me = asyncio.current_task()
        assert me is not None and self._loop is not None
        rec: TaskRecord | None = first
        streak = 0
        while True:
            if rec is None:
                parked: asyncio.Future[TaskRecord] = self._loop.create_future()
                cq.idle.append(parked)
                rec = await parked
                streak = 0
            await self._run(cq, rec, me)
            cq.sem.release()
            streak += 1
            if streak >= _YIELD_EVERY:
                # Handlers that never suspend would otherwise hold the loop for a whole backlog.
                streak = 0
                await asyncio.sleep(0)
            rec = self._take(cq)

    def _handler_for(self, cq: ClassQueue, spec: TaskSpec) -> Handler:
        if cq.cls.executor != "local":
            executor = self._executors.get(cq.cls.executor)
            if executor is None:  # only a task recovered from an earlier run can get here
                raise PermanentFailure(
                    f"task_class: no {cq.cls.executor!r} executor configured for {cq.cls.name!r}"
                    " (fix: install the plugin that provides it, then resubmit)"
                )
            return executor
        name = spec.payload.get("handler", "")
        handler = self._handlers.get(name)
        if handler is None:
            known = ", ".join(self.handler_names()) or "none"
            what = f"no handler named {name!r}" if name else "missing"
            raise PermanentFailure(
                f"payload.handler: {what} (known handlers: {known}; fix: name one of them,"
                f" or register one with @infra.handler({name or 'NAME'!r}))"
            )
        return handler

    async def _run(self, cq: ClassQueue, rec: TaskRecord, me: asyncio.Task[Any]) -> None:
        """One attempt of ``rec``; records its outcome. Re-raises only shutdown cancellation."""
        if rec.cancel_requested:
            self._attempt_ended(cq, rec, _CANCELLED, "cancelled while running", None)
            return
        rec.worker = me
        spec = rec.spec
        result: Mapping[str, Any] | None = None
        error = ""
        retryable = True
        timeout_cm: asyncio.Timeout | None = None
        if rec.recovered and self._park_for_handler(cq, rec):
            return
        try:
            if self._durable:
                # The attempt (running, attempts + 1) is recorded before the handler starts:
                # a crash during it counts against max_attempts on recovery.
                # The gate is shared by every attempt started in this loop step, and a
                # cancelled await must not cancel it for all of them (their workers would
                # die with a CancelledError nobody asked for, taking the task group down):
                # the flush gate is shielded (it may take a while); the journal gate opens
                # within a loop step and ignores cancel(), so a cancellation arrives then,
                # without a shield's extra future per attempt.
                synced = _attempt_needs_flush(cq, spec)
                if rec.intake_gate is not None:
                    gate, rec.intake_gate = rec.intake_gate, None
                    store_error = await asyncio.shield(gate)
                    if rec.rejection is not None:
                        # The store refused the submit's row: the task was never accepted
                        # (its submitter got the error), so its attempt never happened.
                        rec.worker = None
                        self._inflight -= 1
                        self._idle_check()
                        return
                elif synced:
                    store_error = await asyncio.shield(self._attempt_gate(True, rec))
                else:
                    store_error = await self._attempt_gate(False, rec)
                if rec.write_error is None and store_error is not None:
                    rec.write_error = store_error
                if rec.write_error is not None:
                    self._unstarted(cq, rec, rec.write_error)
                    return
            handler = self._handler_for(cq, spec)
            if spec.timeout is None:
                result = await handler(rec.attempt_context(self.settings, self._shared))
            else:
                timeout_cm = asyncio.timeout(spec.timeout)
                async with timeout_cm:
                    result = await handler(rec.attempt_context(self.settings, self._shared))
        except asyncio.CancelledError:
            if rec.cancel_requested and not self._stopping and me.uncancel() == 0:
                rec.worker = None
                self._attempt_ended(cq, rec, _CANCELLED, "cancelled while running", None)
                return
            self._interrupted(cq, rec)
            raise
        except PermanentFailure as exc:
            error, retryable = str(exc), False
        except HandlerFailure as exc:
            error = str(exc) or type(exc).__name__
            if exc.result is not None:
                with contextlib.suppress(SpecError):  # a partial result JSON cannot hold is dropped
                    rec.result = check_json_object(exc.result, "result")
        except Exception as exc:
            if isinstance(exc, TimeoutError) and timeout_cm is not None and timeout_cm.expired():
                error = f"timed out after {spec.timeout:g}s"
            else:
                error = str(exc) or type(exc).__name__
        rec.worker = None
        if rec.cancel_requested:
            # The handler swallowed the cancellation (or ended just as it arrived). A success
            # stands; anything else is the cancel the caller asked for, never a retry.
            while me.cancelling():
                me.uncancel()
            if result is None or error:
                self._attempt_ended(cq, rec, _CANCELLED, "cancelled while running", None)
                return
        if result is not None and not error:
            try:
                # An empty result is kept as the shared NO_RESULT (a record's result is only
                # ever copied out, never changed), not as one more object per retained task.
                clean = NO_RESULT if type(result) is dict and not result else _result_object(result)
            except SpecError as exc:
                error, retryable = f"the handler's result cannot be kept: {exc}", False
            else:
                self._attempt_ended(cq, rec, _COMPLETED, "", clean)
                return
        if not error:
            error = "handler returned None (fix: return a JSON object, e.g. {})"
            retryable = False
        if retryable and rec.attempts < spec.max_attempts and not self._stopping:
            self._retry(cq, rec, error)
        else:
            self._attempt_ended(cq, rec, _FAILED, error, None)

    def _park_for_handler(self, cq: ClassQueue, rec: TaskRecord) -> bool:
        """Park a recovered task whose handler is not registered yet; True when parked.

        Apps register handlers with ``@infra.handler`` after ``ensure_infra()`` returns, but
        tasks recovered from the store are dispatched as the scheduler starts. Failing them
        for a handler that is about to exist would lose accepted work, so such a task waits
        (not counted as an attempt) until its handler is registered, or until
        ``settings.handler_grace`` seconds after start, when it runs and fails as usual,
        naming the known handlers.
        """
        if cq.cls.executor != "local" or self._stopping:
            return False
        name = rec.spec.payload.get("handler", "")
        left = self._handler_grace_until - time.monotonic()
        if not name or name in self._handlers or left <= 0:
            return False
        assert self._loop is not None
        rec.worker = None
        rec.attempts -= 1
        rec.status = _PENDING
        self._inflight -= 1
        if self._durable:
            self._store.put(rec.update_row())
        self._awaiting_handler.setdefault(name, []).append(rec)
        rec.timer = self._loop.call_later(left, self._requeue, cq, rec)
        self._idle_check()
        return True

    def _attempt_gate(self, synced: bool, rec: TaskRecord) -> asyncio.Future[InfraError | None]:
        """A future that resolves (to the store's error, or None) once the attempts started in
        this loop step are recorded. ``synced`` (work outside this process): every row queued
        so far is flushed to the disk, one store callback for all of them, registered after
        the step, so after each of their rows. Otherwise: the attempts are written to the
        store's attempt journal, one write at the end of the step from the loop itself
        (``journal.py``; their rows follow through group commit)."""
        if not synced:
            self._journaled.append(rec)
        gate = self._synced_start_gate if synced else self._start_gate
        if gate is None:
            assert self._loop is not None
            gate = self._loop.create_future() if synced else _SharedGate(loop=self._loop)
            if synced:
                self._synced_start_gate = gate
            else:
                self._start_gate = gate
            self._loop.call_soon(self._arm_attempt_gate, synced)
        return gate

    def _arm_attempt_gate(self, synced: bool) -> None:
        if synced:
            gate, self._synced_start_gate = self._synced_start_gate, None
        else:
            gate, self._start_gate = self._start_gate, None
        if gate is None:
            return

        def saved(error: InfraError | None) -> None:
            if not gate.done():
                gate.set_result(error)

        if synced:
            self._store.after_commit(saved)
            return
        recs, self._journaled = self._journaled, []
        try:
            # A task whose last row change was refused does not start (_unstarted): not
            # journaled, or a crash would count an attempt that never ran.
            self._store.record_attempts(
                [(rec.spec.id, rec.attempts) for rec in recs if rec.write_error is None]
            )
        except OSError as exc:
            # Not known to be recorded: wait for the rows to reach the store's log instead.
            log.warning("the attempt journal could not be written (%s); waiting for the store", exc)
            self._store.after_write(saved)
        else:
            saved(None)

    def _unstarted(self, cq: ClassQueue, rec: TaskRecord, error: InfraError) -> None:
        """The attempt could not be recorded, so it does not run: back to the queue after a
        backoff, the attempt not counted (the store is failing; nothing is run unrecorded)."""
        assert self._loop is not None
        log.warning("task %s: attempt not started, its record was not saved: %s", preview(rec.spec.id), error)
        rec.worker = None
        rec.attempts -= 1
        rec.unsaved_starts += 1
        if rec.unsaved_starts >= _MAX_UNSAVED_STARTS:
            # The store keeps refusing this task's row: stop trying (the task never ran).
            self._attempt_ended(
                cq,
                rec,
                _FAILED,
                f"the task's state could not be saved {rec.unsaved_starts} times in a row, so it"
                f" was never started: {error}",
                None,
            )
            return
        rec.status = _PENDING
        self._inflight -= 1
        self._store.put(rec.update_row())
        rec.timer = self._loop.call_later(retry_delay(rec.unsaved_starts), self._requeue, cq, rec)
        self._idle_check()

    def _interrupted(self, cq: ClassQueue, rec: TaskRecord) -> None:
        """Shutdown cancelled a running attempt: saved as ``pending`` (the attempt stays
        counted), so the next start runs it again. Only a crash leaves a ``running`` row,
        and recovery counts such an attempt against ``max_attempts``."""
        rec.worker = None
        rec.status = _PENDING
        self._inflight -= 1
        if self._durable:
            self._store.put(rec.update_row())

    def _retry(self, cq: ClassQueue, rec: TaskRecord, error: str) -> None:
        assert self._loop is not None
        now = time.time()
        delay = retry_delay(rec.attempts)
        cq.window.record_outcome(True)
        cq.m_errors.pending += 1
        cq.m_duration[_FAILED].observe(now - rec.started_at)
        self._inflight -= 1
        rec.status = _PENDING
        rec.error = error
        if self._durable:
            self._store.put(rec.update_row())
        self.bus.emit(
            "task_retried",
            rec.spec.id,
            {"task_class": cq.cls.name, "attempt": rec.attempts, "delay": f"{delay:g}", "error": error},
        )
        if self._listeners:
            self._notify(rec)
        rec.timer = self._loop.call_later(delay, self._requeue, cq, rec)
        self._idle_check()

    def _requeue(self, cq: ClassQueue, rec: TaskRecord) -> None:
        rec.timer = None
        if rec.status is _PENDING and not self._stopping:
            self._enqueue(cq, rec, time.time())
            self._pump(cq)

    def _attempt_ended(
        self, cq: ClassQueue, rec: TaskRecord, status: TaskStatus, error: str, result: dict[str, Any] | None
    ) -> None:
        now = time.time()
        window = cq.window  # SampleWindow.record_outcome, inlined
        window.finished += 1
        if status is _FAILED:
            window.errors += 1
            cq.m_errors.pending += 1
        cq.m_duration[status].observe(now - rec.started_at)
        if result is not None:
            rec.result = result
        self._terminal(rec, status, error, now, cq=cq)

    def _terminal(
        self,
        rec: TaskRecord,
        status: TaskStatus,
        error: str,
        now: float,
        *,
        count_inflight: bool = True,
        cq: ClassQueue | None = None,
    ) -> None:
        """``rec`` ends as ``status``; ``cq``: its class queue, when the caller has it."""
        if count_inflight:
            self._inflight -= 1
        rec.status = status
        rec.error = error
        rec.completed_at = now
        if rec.started_at:
            rec.duration_ms = (now - rec.started_at) * 1000.0
        if cq is None:
            cq = self._queues.get(rec.spec.task_class)
        if cq is not None:
            cq.m_total[status].pending += 1
        if self._durable:
            self._store.put(rec.update_row())
        data: dict[str, object] = {"task_class": rec.spec.task_class, "attempts": rec.attempts}
        if status is _COMPLETED:
            # emit() turns values into strings only when the event is read
            data["duration_ms"] = round(rec.duration_ms, 3)
        elif error:
            data["error"] = error
        self.bus.emit(_EVENT_TYPE[status], rec.spec.id, data)
        if self._listeners:
            self._notify(rec)
        if self._durable:
            # Delivered once its row is committed; one commit callback per loop step.
            if not self._undelivered:
                assert self._loop is not None
                self._loop.call_soon(self._deliver_after_commit)
            self._undelivered.append(rec)
        else:
            self._deliver(rec)
        if self._inflight == 0:
            self._idle_check()

    def _deliver_after_commit(self) -> None:
        """Runs after the current loop step, so every row of ``_undelivered`` is queued
        before the callback: it fires once they are all committed."""
        recs, self._undelivered = self._undelivered, []

        def committed(error: InfraError | None) -> None:
            for rec in recs:
                self._deliver(rec, error)

        self._store.after_commit(committed)

    def _deliver(self, rec: TaskRecord, store_error: InfraError | None = None) -> None:
        """The terminal row is committed: hand the result to waiters and streams."""
        if store_error is not None:
            # The result stands (it happened), but after a crash the task would run again.
            log.warning("task %s finished but its state was not saved: %s", rec.spec.id, store_error)
        rec.delivered = True
        if rec.waiters:
            for fut in rec.waiters:
                if not fut.done():
                    fut.set_result(None)
            rec.waiters = None
        task_id = rec.spec.id
        if self._subscribers:
            result = rec.to_result()
            overflowed: list[Subscriber] | None = None
            for sub in self._subscribers:
                if sub.wanted is None or task_id in sub.wanted:
                    sub.buffer.append(result)  # Subscriber.push, inlined: once per task
                    if sub.wanted is None and len(sub.buffer) > STREAM_BUFFER_LIMIT:
                        overflowed = [*(overflowed or ()), sub]
                    wakeup = sub.wakeup
                    if wakeup is not None and not wakeup.done():
                        wakeup.set_result(None)
            for sub in overflowed or ():
                # A consumer that stopped reading must not hold results without bound.
                sub.overflowed = True
                sub.buffer.clear()
                self._subscribers.discard(sub)
                sub.close()
        if self._tasks.get(task_id) is rec:
            finished = self._finished
            finished[task_id] = None
            if len(finished) > self.settings.retention:
                self._prune()

    def _prune(self) -> None:
        """Keep at most ``settings.retention`` finished tasks (oldest go first)."""
        excess = len(self._finished) - self.settings.retention
        if excess <= 0:
            return
        finished = self._finished
        oldest = iter(finished)
        for task_id in [next(oldest) for _ in range(excess)]:
            del finished[task_id]
            rec = self._tasks.pop(task_id, None)
            if rec is not None:
                # Its id stays (with its content hash): reusing it is refused, never run again.
                content_hash = rec.spec.content_hash
                if not self._durable:
                    self._pruned[task_id] = content_hash
                self._store.prune(task_id, content_hash)

    def _idle_check(self) -> None:
        if self._inflight == 0 and self._idle_event is not None:
            self._idle_event.set()

    def _notify(self, rec: TaskRecord) -> None:
        state = rec.state()
        for fn in list(self._listeners):
            try:
                fn(state)
            except Exception:
                log.exception("task listener %r failed", fn)

    # -- adaptive limits ------------------------------------------------------------------

    async def _sample_loop(self) -> None:
        while True:
            await anyio.sleep(self.settings.limiter_interval)
            self.sample_limits()

    def flush_metrics(self) -> None:
        """Fold the batched counters and histograms into the Prometheus metrics.

        Runs on every limiter sample, at close, and whenever the registry is collected on
        the event loop's thread; call it before reading the metric objects directly.
        """
        for cq in self._queues.values():
            cq.flush_metrics()

    def _flush_if_loop_thread(self) -> None:
        # The batches are plain ints touched by the loop thread only; a scrape from another
        # thread reads what was folded in at the last sample instead.
        if threading.get_ident() == self._loop_thread:
            self.flush_metrics()

    def sample_limits(self) -> None:
        """Take one sample per class and apply its policy (the sampler calls this)."""
        self.flush_metrics()
        for cq in self._queues.values():
            sample = cq.window.take(len(cq.queued), cq.sem.in_use)
            cq.m_error_rate.set(sample.error_rate)
            if cq.policy is None:
                continue
            new = cq.policy.next_limit(cq.sem.limit, sample)
            capacity = self._capacities.get(cq.cls.executor)
            ceiling = capacity(cq.cls.name) if capacity is not None else None
            if ceiling is not None:
                new = max(1, min(new, ceiling))
            if new != cq.sem.limit:
                cq.sem.resize(new)
                self._pump(cq)

    # -- inspection (in-process only: nothing on the gRPC or HTTP face reaches these) -------

    @property
    def store(self) -> SqliteStore | MemoryStore:
        """The task store (``SqliteStore`` when durable), for its diagnostics seams."""
        return self._store

    @property
    def open_result_streams(self) -> int:
        """How many ``stream_results`` consumers are attached (one that left or fell behind
        no longer counts: its buffer is released)."""
        return len(self._subscribers)


def _attempt_needs_flush(cq: ClassQueue, spec: TaskSpec) -> bool:
    """Whether an attempt of ``spec`` does work outside this process (an executor's, or an
    ``exec``/``container`` handler's), so its record must be on the disk before it starts,
    not only in the store's log."""
    return cq.cls.executor != "local" or spec.payload.get("handler") in _OUTSIDE_HANDLERS


def _plainly_within(payload: Mapping[str, Any], limit: int) -> bool:
    """Whether a flat map of strings is certainly at most ``limit`` bytes as the JSON text
    ``_check`` measures, told from its lengths alone: a character takes at most 12 bytes
    there (``encode_json_object`` escapes every non-ASCII one, an astral one as two
    ``\\uXXXX``), an entry 6 more (quotes, colon, comma), the braces 2. False for any other
    payload (a value that is not a string) or one too close to tell."""
    try:
        chars = len("".join(payload)) + len("".join(payload.values()))
    except TypeError:
        return False
    return 12 * chars + 6 * len(payload) + 2 <= limit


def _result_object(result: Mapping[str, Any]) -> dict[str, Any]:
    """A handler's result as kept: a JSON object (numbers, booleans, nesting preserved)."""
    if not isinstance(result, Mapping):
        raise SpecError(
            f"handler returned a {type(result).__name__}",
            field="result",
            fix="return a JSON object (a dict), e.g. {'answer': 42}",
        )
    return check_json_object(result, "result")
