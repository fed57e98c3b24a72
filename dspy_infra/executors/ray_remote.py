"""What runs on the Ray cluster for the ``ray`` executor (``ray.py`` wraps these with
``ray.remote``; this module imports Ray only inside functions that run where Ray is).

- ``AttemptRunner``: an async actor with the class's resources (num_cpus, num_gpus, custom
  resources, runtime env) that runs one attempt at a time, as a task of its own persistent
  event loop, so an attempt is one actor call on a warm runner, no worker lease per
  attempt. An attempt runs the named handler (a built-in such as ``exec`` or ``http``,
  found through the same plugin hook as on the owner, or ``"package.module:function"``, an
  async function importable on the cluster) and returns an *outcome*, a plain dict:
  ``{"ok": true, "result": {...}}`` or ``{"ok": false, "permanent": bool, "error": "...",
  "result": {...}}`` (handler errors travel as data, not as pickled exceptions). Cancel
  (the runner's ``cancel``) cancels the handler, so ``exec`` ends its process group.
  A durable owner's runners are detached and named (scope, class, a random suffix): an
  attempt belongs to its runner, not to the owner, which keeps the outcome until the owner
  collects it; a restarted owner finds the runner holding a task by asking the class's
  named runners. Idle runners exit by themselves (``[ray_classes.NAME] idle_timeout``).
"""

from __future__ import annotations

import asyncio
import functools
import importlib
import inspect
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = ["CANCEL_GRACE", "AttemptRunner", "Outcome", "ended", "outcome_of_error"]

Outcome = dict[str, Any]

#: Seconds a cancelled attempt gets to end by itself (its handler's clean-up: ``exec``
#: ends its process group) before its owner kills the runner.
CANCEL_GRACE = 5.0
#: Outcomes nobody collected are dropped this long after the attempt ended (an owner that
#: never came back).
UNCOLLECTED_TTL = 7 * 24 * 3600.0


@functools.cache
def _builtin_handlers() -> Mapping[str, Any]:
    from ..plugins import build_plugin_manager, collect_mapping

    return collect_mapping(build_plugin_manager().hook.dspy_infra_handlers())


def _import_handler(path: str) -> Any:
    from ..errors import PermanentFailure

    module_name, sep, attr = path.partition(":")
    fix = '(fix: "package.module:function", an async function importable on the Ray cluster)'
    if not sep or not module_name or not attr:
        raise PermanentFailure(f"payload.handler: {path!r} is neither a built-in nor an import path {fix}")
    try:
        target: Any = importlib.import_module(module_name)
        for part in attr.split("."):
            target = getattr(target, part)
    except (ImportError, AttributeError) as exc:
        raise PermanentFailure(
            f"payload.handler: cannot import {path!r} on the cluster: {exc} {fix}"
        ) from None
    if not inspect.iscoroutinefunction(target):
        raise PermanentFailure(f"payload.handler: {path!r} is not an async function {fix}")
    return target


@functools.cache
def _worker_settings(exec_policy: str) -> Any:
    from ..config import Settings

    # The worker's own state directory: what the handlers' markers are scoped by (task logs
    # go back to the owner in memory: ``MemoryLog``). Never durable: the owner recovers,
    # not the worker.
    home = Path(tempfile.gettempdir()) / "dspy-infra-ray-worker"
    return Settings(home=home, durable=False, exec_policy=exec_policy)


async def _run_handler(call: Mapping[str, Any]) -> Outcome:
    from ..errors import HandlerFailure, PermanentFailure
    from ..models import TaskSpec
    from ..scheduler.context import SharedResources, TaskContext
    from ..scheduler.task_logs import MemoryLog
    from ..values import check_json_object

    shared = SharedResources()
    settings = _worker_settings(call["exec_policy"])
    log = MemoryLog()
    outcome: Outcome
    try:
        try:
            name = call["handler"]
            handler = _builtin_handlers().get(name) or _import_handler(name)
            spec = TaskSpec(call["task_id"], task_class=call["task_class"], payload=call["payload"])
            ctx = TaskContext(spec, call["attempt"], settings, shared, log)
            result = check_json_object(await handler(ctx), "result")
        except PermanentFailure as exc:
            outcome = {"ok": False, "permanent": True, "error": str(exc), "result": dict(exc.result or {})}
        except HandlerFailure as exc:
            outcome = {"ok": False, "permanent": False, "error": str(exc), "result": dict(exc.result or {})}
        except Exception as exc:
            outcome = {"ok": False, "permanent": False, "error": f"{type(exc).__name__}: {exc}", "result": {}}
        else:
            outcome = {"ok": True, "result": result}
    finally:
        await shared.aclose()
    # The attempt's task log goes back with the outcome (this node keeps no file of it);
    # the owner keeps it where its task_log finds it.
    text = log.text()
    if text is not None:
        outcome["log"] = text
    return outcome


def outcome_of_error(exc: BaseException) -> Outcome:
    """The outcome of an attempt whose ref raised ``exc`` instead of returning one."""
    import ray

    if isinstance(exc, ray.exceptions.TaskCancelledError):
        return {"status": "cancelled"}
    if isinstance(exc, ray.exceptions.RayTaskError):
        if isinstance(exc.cause, asyncio.CancelledError | KeyboardInterrupt):
            return {"status": "cancelled"}
        return {"status": "lost", "error": f"{type(exc.cause).__name__}: {exc.cause}"}
    # The worker or its node died, the object was lost, ...: the attempt is over.
    return {"status": "lost", "error": f"{type(exc).__name__}: {exc}"}


def ended(outcome: Outcome) -> Outcome:
    """A handler's outcome marked as ended (errors from Ray carry their own status)."""
    return outcome if "status" in outcome else {"status": "ended", **outcome}


class AttemptRunner:
    """A warm runner of one class's attempts (see the module docstring): an async actor
    created with the class's resources, running one attempt at a time as a task of its own
    event loop.

    ``run(task_id, key, call, drop)`` returns the outcome of the attempt it holds for the
    task, whatever its key (one left by an earlier owner is *adopted*: the outcome then
    names its key under ``"adopted"``), or starts ``call`` under ``key`` when it holds none
    and runs nothing else (``{"status": "busy"}`` when it does); with ``call`` None it only
    adopts: ``{"status": "unknown"}`` when it holds nothing for the task. ``drop`` names the
    key of an outcome the caller already has (a retry must not adopt the attempt it
    retries). With ``keep`` (a durable owner) an outcome stays until ``collect``: the owner
    may die before it records it, and its successor asks again; without, it is dropped once
    returned.

    Idle (nothing running, nothing held) for ``idle_timeout`` seconds, the runner exits by
    itself, giving its resources (GPUs) back to the cluster.
    """

    def __init__(self, idle_timeout: float, keep: bool) -> None:
        self._idle_timeout = idle_timeout
        self._keep = keep
        #: Task id -> (key, the attempt's asyncio task) of the attempts held.
        self._held: dict[str, tuple[str, asyncio.Task[Outcome]]] = {}
        #: Task id -> when its held attempt ended (uncollected outcomes expire).
        self._ended: dict[str, float] = {}
        self._running: str | None = None
        #: Set once it has decided to exit: later calls are refused, never started.
        self._exiting = False
        self._idle_since = time.monotonic()
        self._watch: asyncio.Task[None] | None = None

    def _touch(self) -> None:
        self._idle_since = time.monotonic()
        if self._watch is None:  # started by the first call: __init__ runs outside the loop
            self._watch = asyncio.get_running_loop().create_task(self._watch_idle())

    async def _watch_idle(self) -> None:
        while True:
            await asyncio.sleep(min(self._idle_timeout / 4, 10.0))
            self._expire()
            if self._idle():
                self._exit()
                return

    def _idle(self) -> bool:
        return (
            self._running is None
            and not self._held
            and time.monotonic() - self._idle_since >= self._idle_timeout
        )

    def _expire(self) -> None:
        cutoff = time.time() - UNCOLLECTED_TTL
        for task_id in [t for t, at in self._ended.items() if at < cutoff]:
            self._drop(task_id, None)

    def _drop(self, task_id: str, key: str | None) -> None:
        held = self._held.get(task_id)
        if held is not None and held[1].done() and (key is None or held[0] == key):
            del self._held[task_id]
            self._ended.pop(task_id, None)

    def _finished(self, task_id: str) -> None:
        self._ended[task_id] = time.time()
        self._running = None
        self._idle_since = time.monotonic()

    async def run(
        self, task_id: str, key: str, call: Mapping[str, Any] | None, drop: str | None = None
    ) -> Outcome:
        """The outcome of the task's attempt (see the class docstring)."""
        self._touch()
        if drop is not None:
            self._drop(task_id, drop)
        elif not self._keep:  # nobody adopts here: an ended attempt of the task is over
            self._drop(task_id, None)
        held = self._held.get(task_id)
        if held is None:
            if call is None:
                return {"status": "unknown"}
            if self._running is not None or self._exiting:
                return {"status": "busy"}
            attempt = asyncio.get_running_loop().create_task(_run_handler(call))
            held = self._held[task_id] = (key, attempt)
            self._running = task_id
            attempt.add_done_callback(lambda _: self._finished(task_id))
        held_key, attempt = held
        try:
            # Shielded: only ``cancel`` ends the attempt, never a cancelled call.
            outcome = ended(await asyncio.shield(attempt))
        except asyncio.CancelledError:
            if not attempt.cancelled():
                raise
            outcome = {"status": "cancelled"}
        if not self._keep:
            self._drop(task_id, None)
        return outcome if held_key == key else {**outcome, "adopted": held_key}

    async def cancel(self, task_id: str) -> bool:
        """Cancel the task's attempt (its handler cleans up: ``exec`` ends its process
        group); whether it ended within ``CANCEL_GRACE`` seconds (if not, the owner kills
        the runner)."""
        held = self._held.get(task_id)
        if held is None or held[1].done():
            return True
        held[1].cancel()
        await asyncio.wait([held[1]], timeout=CANCEL_GRACE)
        return held[1].done()

    async def collect(self, done: list[tuple[str, str | None]]) -> None:
        """Drop the outcomes of these (task id, key) pairs: their owner has recorded them
        (key None: whatever attempt is held for the task)."""
        for task_id, key in done:
            self._drop(task_id, key)

    async def held(self) -> list[tuple[str, str, bool]]:
        """(task id, key, still running) of every attempt held (adoption after a restart)."""
        self._touch()
        return [(task_id, key, not attempt.done()) for task_id, (key, attempt) in self._held.items()]

    async def retire(self) -> bool:
        """Exit now (its owner no longer needs it), unless it runs or holds an attempt
        (False)."""
        if self._running is not None or self._held:
            return False
        self._exit()
        return True

    def _exit(self) -> None:
        """End this runner (Ray's ``kill``, which also frees its name: ``exit_actor`` from an
        async actor left the actor hanging, serving no call, on Ray 2.60)."""
        import ray

        self._exiting = True
        ray.kill(ray.get_runtime_context().current_actor, no_restart=True)
