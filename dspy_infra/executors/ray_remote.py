"""What runs on the Ray cluster for the ``ray`` executor (``ray.py`` wraps these with
``ray.remote``; this module imports Ray only inside functions that run where Ray is).

- ``run_attempt(call)``: one attempt, a Ray task with the class's resources. It runs the
  named handler (a built-in such as ``exec`` or ``http``, found through the same plugin hook
  as on the owner, or ``"package.module:function"``, an async function importable on the
  cluster) in its own event loop and returns an *outcome*, a plain dict: ``{"ok": true,
  "result": {...}}`` or ``{"ok": false, "permanent": bool, "error": "...", "result": {...}}``
  (handler errors travel as data, not as pickled exceptions). A cancel from Ray (SIGINT in
  the worker's main thread) cancels the handler, so ``exec`` ends its process group.
- ``AttemptKeeper``: a detached, named async actor (one per owner and namespace) that
  submits attempts and keeps each one's outcome until its owner collects it. Tasks the
  keeper submits belong to the keeper, so they outlive a crashed or stopped owner; the
  task's next attempt, from a restarted owner, asks the same keeper for the same task and
  gets the attempt it holds.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import importlib
import inspect
import signal
import tempfile
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = ["AttemptKeeper", "Outcome", "cancel_attempt", "ended", "outcome_of_error", "run_attempt"]

Outcome = dict[str, Any]

#: Seconds a cancelled attempt gets to end by itself (its handler's clean-up: ``exec``
#: ends its process group) before Ray kills its worker.
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

    # The worker's own state directory: only the exec handler's task log lands there (the
    # owner keeps the result). Never durable: the owner recovers, not the worker.
    home = Path(tempfile.gettempdir()) / "dspy-infra-ray-worker"
    return Settings(home=home, durable=False, exec_policy=exec_policy)


async def _run_handler(call: Mapping[str, Any]) -> Outcome:
    from ..errors import HandlerFailure, PermanentFailure
    from ..models import TaskSpec
    from ..scheduler.context import SharedResources, TaskContext
    from ..values import check_json_object

    shared = SharedResources()
    try:
        try:
            name = call["handler"]
            handler = _builtin_handlers().get(name) or _import_handler(name)
            spec = TaskSpec(call["task_id"], task_class=call["task_class"], payload=call["payload"])
            ctx = TaskContext(spec, call["attempt"], _worker_settings(call["exec_policy"]), shared)
            result = check_json_object(await handler(ctx), "result")
        except PermanentFailure as exc:
            return {"ok": False, "permanent": True, "error": str(exc), "result": dict(exc.result or {})}
        except HandlerFailure as exc:
            return {"ok": False, "permanent": False, "error": str(exc), "result": dict(exc.result or {})}
        except Exception as exc:
            return {"ok": False, "permanent": False, "error": f"{type(exc).__name__}: {exc}", "result": {}}
        return {"ok": True, "result": result}
    finally:
        await shared.aclose()


_worker_loop: asyncio.AbstractEventLoop | None = None
#: The attempt this worker runs now (what a SIGINT from ``ray.cancel`` cancels).
_running: asyncio.Task[Outcome] | None = None


def _cancel_running() -> None:
    if _running is not None:
        _running.cancel()


def run_attempt(call: Mapping[str, Any]) -> Outcome:
    """One attempt on a Ray worker (wrapped by ``ray.remote(max_retries=0)``: retries are the
    scheduler's). Ray's cancel interrupts the main thread with SIGINT; the handler is
    cancelled then, so its clean-up runs, and the cancellation propagates to Ray.

    A Ray worker runs one task at a time, so one event loop per worker process, with its
    SIGINT handler installed once, serves every attempt it runs (a new loop and handler
    per attempt cost more than a no-op handler)."""
    global _worker_loop, _running
    if _worker_loop is None or _worker_loop.is_closed():
        _worker_loop = asyncio.new_event_loop()
        if threading.current_thread() is threading.main_thread():
            _worker_loop.add_signal_handler(signal.SIGINT, _cancel_running)
    task = _running = _worker_loop.create_task(_run_handler(call))
    try:
        return _worker_loop.run_until_complete(task)
    finally:
        _running = None


def cancel_attempt(ref: Any) -> None:
    """Blocking: cancel the attempt behind ``ref`` (SIGINT first: the handler cleans up, exec
    ends its process group); if it has not ended after ``CANCEL_GRACE`` seconds, kill its
    worker. Only the owner of ``ref`` may call it."""
    import ray

    with contextlib.suppress(Exception):
        ray.cancel(ref, force=False)
    ready, _ = ray.wait([ref], timeout=CANCEL_GRACE)
    if not ready:
        with contextlib.suppress(Exception):
            ray.cancel(ref, force=True)


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


class AttemptKeeper:
    """Submits attempts and keeps their outcomes until collected (see the module docstring).

    Holds at most one attempt per task (the keeper is per owner, so a task id is unique
    here). ``run(task_id, key, call, options, drop)`` returns the outcome of the attempt it
    holds for the task, whatever its key (one left by an earlier owner is *adopted*: the
    outcome then names its key under ``"adopted"``), or starts ``call`` under ``key`` when it
    holds none; with ``call`` None it only adopts: ``{"status": "unknown"}`` when it holds
    none (never started, or the keeper was restarted and lost it). ``drop`` names the key of
    an outcome the caller already has (a retry must not adopt the attempt it retries).
    ``collect`` drops outcomes their owner has recorded.
    """

    def __init__(self) -> None:
        import ray

        # Retries are the scheduler's, never Ray's: a lost attempt fails, then the task's
        # policy decides.
        self._remote_run = ray.remote(max_retries=0)(run_attempt)
        #: Task id -> (key, ref) of the attempt held for it.
        self._held: dict[str, tuple[str, Any]] = {}
        #: Task id -> when its held attempt ended (uncollected outcomes expire).
        self._ended: dict[str, float] = {}

    def _expire(self) -> None:
        cutoff = time.time() - UNCOLLECTED_TTL
        for task_id in [t for t, at in self._ended.items() if at < cutoff]:
            self._held.pop(task_id, None)
            self._ended.pop(task_id, None)

    def _drop(self, task_id: str, key: str | None) -> None:
        held = self._held.get(task_id)
        if held is not None and (key is None or held[0] == key):
            del self._held[task_id]
            self._ended.pop(task_id, None)

    async def run(
        self,
        task_id: str,
        key: str,
        call: Mapping[str, Any] | None,
        options: Mapping[str, Any] | None,
        drop: str | None = None,
    ) -> Outcome:
        """The outcome of the task's attempt (see the class docstring). Kept until
        ``collect``: the caller may die before it records it, and its successor asks again."""
        import ray

        if drop is not None:
            self._drop(task_id, drop)
        held = self._held.get(task_id)
        if held is None:
            if call is None or options is None:
                return {"status": "unknown"}
            self._expire()
            held = self._held[task_id] = (key, self._remote_run.options(**options).remote(call))
        held_key, ref = held
        try:
            outcome: Outcome = ended(await ref)
        except ray.exceptions.RayError as exc:
            outcome = outcome_of_error(exc)
        self._ended.setdefault(task_id, time.time())
        return outcome if held_key == key else {**outcome, "adopted": held_key}

    async def cancel(self, task_id: str) -> None:
        """Cancel the task's attempt (``cancel_attempt``, in a thread: the keeper serves
        others meanwhile)."""
        held = self._held.get(task_id)
        if held is not None:
            await asyncio.to_thread(cancel_attempt, held[1])

    async def collect(self, done: list[tuple[str, str | None]]) -> None:
        """Drop the outcomes of these (task id, key) pairs: their owner has recorded them
        (key None: whatever attempt is held for the task)."""
        for task_id, key in done:
            self._drop(task_id, key)

    async def ping(self) -> bool:
        return True
