"""The ``ray`` executor: tasks of a class with ``executor = "ray"`` run on a Ray cluster.

Ray is an optional extra (``pip install 'dspy-infra[ray]'``). A config naming the executor
without Ray installed is refused when the scheduler starts (``ConfigError`` naming
``task_classes.NAME.executor`` and the install command), never at the first task.

Configuration::

    ray_address = "127.0.0.1:26379"     # one cluster per process (a Ray driver has one)
    [task_classes.train]
    executor = "ray"
    max_concurrency = 8
    [ray_classes.train]                 # optional: what each attempt asks of the cluster
    num_cpus = 1                        # default 1, like a Ray task
    num_gpus = 0
    resources = { worker2 = 1 }         # custom resources of the cluster's nodes
    runtime_env = { env_vars = { HF_HOME = "/data/hf" } }
    namespace = "dspy_infra"            # default: ray_namespace
    idle_timeout = 60                   # seconds an idle runner keeps the resources

Attempts run on warm *runners* (``ray_remote.AttemptRunner``): async actors created with
the class's resources and runtime env, each running one attempt at a time in its own
persistent event loop, so an attempt is one actor call, with no worker lease per attempt.
A class has as many runners as attempts it ran at once (at most its concurrency, and the
cluster's capacity bounds that); a runner idle for ``idle_timeout`` seconds exits by itself
and its resources (GPUs) go back to the cluster (at once when the owner stops). Retries,
timeouts and priorities stay the scheduler's. An attempt runs the task's handler on the
cluster (``payload["handler"]``: a built-in such as ``exec``, ``http``, ``sleep``, or
``"package.module:function"``, an async function importable there; ``exec`` when only
``cmd`` is given). Results and errors come back as from a local handler: the same JSON
result (``exec`` output bounded the same way), ``PermanentFailure`` fails the task, other
failures fail the attempt with the handler's message and result.

Survives its owner: a durable scheduler's runners are detached and named (state
directory's scope, class, a random suffix), so an attempt belongs to its runner, not to
this process, and the runner keeps its outcome until the owner has it. An attempt's handle
needs no file of its own: it is the key (scope, task id, attempt) the runner holds it
under, and the scheduler has flushed the attempt's row (running, attempt N) to its store
before it calls ``run``, so the one fsync of the attempt covers it. After a crash (SIGKILL
included) or a graceful stop that left the attempt running, the task's next attempt asks
the class's named runners (once per start, at the first adoption) which holds the task and
takes over the attempt there (watched to its end, or its outcome if it has ended): it never
runs twice. Only when no runner holds the task (it never got it, or the runner was lost)
does the task run anew; a first attempt never asks. A runner drops an outcome a second
after the owner has it (``COLLECT_DELAY``; the scheduler commits the task's end within
milliseconds), or at once when the owner retries the task; a runner holding an outcome
nobody collected (its owner never came back) keeps it, and its resources, for a week. Do
not change a class's namespace while attempts run: the next start would ask other runners
and run them anew. A memory-only scheduler's runners are its own (not detached, unnamed):
they end with this process (a restart has nothing to adopt them for).

Cancel (task cancel, timeout) asks the runner to cancel the attempt's handler (``exec``
ends its process group); a runner that has not ended it after ``ray_remote.CANCEL_GRACE``
seconds is killed. A graceful stop of the owner cancels it the same way only for a class
with ``on_shutdown = "cancel"``; otherwise (``leave_running``) the attempt runs on under its
runner, and the next start adopts it as after a crash.

A lost runner or node fails the attempt with ``RayAttemptLost`` (retried per the task's
``max_attempts``); a cluster that does not answer at start is ``Unavailable``. The class's
adaptive limit is bounded by what the cluster reports available
(``ray.available_resources()``, polled off the loop every few seconds): the attempts in
flight and the idle runners plus as many more as the free resources fit.

Every blocking Ray call (``ray.init``, creating a named runner, finding runners,
``available_resources``) runs in a worker thread; ObjectRefs are awaited on the loop.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import logging
import math
import socket
import time
import uuid
from collections import Counter
from collections.abc import Iterable, Mapping
from types import ModuleType
from typing import Any, Self

import anyio
import attrs
from anyio.abc import AsyncResource

from ..config import Settings
from ..errors import ConfigError, HandlerFailure, PermanentFailure, Unavailable
from ..hookspecs import hookimpl
from ..models import TaskClass
from ..ownership import attempt_marker, durable_scope
from ..scheduler.context import ExecutorFactory, TaskContext
from ..scheduler.task_logs import keep_attempt_log
from ..values import check_finite, check_json_object, preview
from .background import BackgroundTask
from .ray_remote import CANCEL_GRACE, AttemptRunner, Outcome, outcome_of_error

__all__ = [
    "RAY_CLASS",
    "RAY_CLASS_FIELDS",
    "RAY_INSTALL_HINT",
    "RayAttemptLost",
    "RayClassOptions",
    "RayExecutor",
    "RayHandlerFailed",
    "dspy_infra_executors",
    "dspy_infra_task_classes",
    "fitting_attempts",
    "ray_classes",
]

log = logging.getLogger(__name__)

RAY_INSTALL_HINT = "pip install 'dspy-infra[ray]'"
#: The built-in class whose tasks run on Ray (``dspy_infra_task_classes`` below).
RAY_CLASS = "ray"
RAY_CLASS_FIELDS = ("num_cpus", "num_gpus", "resources", "runtime_env", "namespace", "idle_timeout")
#: Seconds between two ``ray.available_resources()`` polls (the adaptive limit's bound).
CAPACITY_INTERVAL = 5.0
#: Seconds an outcome in hand stays with its runner before it is told to drop it.
COLLECT_DELAY = 1.0
#: Default seconds an idle runner waits for another attempt before it exits.
IDLE_TIMEOUT = 60.0
#: At most one week: a runner holds its class's resources (GPUs) while it waits.
MAX_IDLE_TIMEOUT = 7 * 24 * 3600.0
#: Calls a runner serves at once: its one attempt, plus cancel, collect and adoption calls.
RUNNER_CALLS = 16
#: Seconds before its idle timeout from which a runner gets no new attempt.
IDLE_MARGIN = 5.0
#: Runners started in a row for one attempt before it fails (each died before it answered).
RUNNER_STARTS = 3


class RayAttemptLost(HandlerFailure):
    """The attempt ended without an outcome: its runner or node died, or it was
    cancelled on the cluster. Retried per the task's ``max_attempts``."""


class RayHandlerFailed(HandlerFailure):
    """The handler failed its attempt on the cluster; ``result`` is what it returned."""


@attrs.frozen
class RayClassOptions:
    """What each attempt of one class asks of the cluster (``[ray_classes.NAME]``)."""

    namespace: str
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    resources: dict[str, float] = attrs.field(factory=dict)
    runtime_env: dict[str, Any] = attrs.field(factory=dict)
    idle_timeout: float = IDLE_TIMEOUT

    def actor_options(self) -> dict[str, Any]:
        """Keyword arguments of ``ActorClass.options`` for one of the class's runners."""
        options: dict[str, Any] = {"num_cpus": self.num_cpus, "num_gpus": self.num_gpus}
        if self.resources:
            options["resources"] = dict(self.resources)
        if self.runtime_env:
            options["runtime_env"] = dict(self.runtime_env)
        return options

    def demand(self) -> dict[str, float]:
        """Resource name (as ``ray.available_resources()`` spells it) -> amount per attempt."""
        wanted = {"CPU": self.num_cpus, "GPU": self.num_gpus, **self.resources}
        return {name: amount for name, amount in wanted.items() if amount > 0}


def fitting_attempts(demand: Mapping[str, float], available: Mapping[str, float]) -> int | None:
    """How many more attempts with ``demand`` fit into ``available`` (None: no demand, so
    no bound)."""
    if not demand:
        return None
    # A hair of slack: Ray reports fractions such as 0.9999999 for 1 - 0.0001 * 1000.
    return min(math.floor(available.get(name, 0.0) / amount + 1e-6) for name, amount in demand.items())


def _amount(value: Any, field: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(f"must be a number, got {preview(value)}", field=field, fix="e.g. 1 or 0.5")
    try:
        return check_finite(value, field, lo=0.0)
    except ValueError:
        raise ConfigError(
            f"must be a finite number >= 0, got {preview(value)}", field=field, fix="e.g. 1 or 0.5"
        ) from None


def _idle_timeout(value: Any, field: str) -> float:
    fix = "seconds an idle runner keeps the class's resources, e.g. idle_timeout = 60"
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(f"must be a number of seconds, got {preview(value)}", field=field, fix=fix)
    try:
        return check_finite(value, field, lo=1.0, hi=MAX_IDLE_TIMEOUT)
    except ValueError:
        raise ConfigError(
            f"must be between 1 and {MAX_IDLE_TIMEOUT:.0f} seconds, got {preview(value)}",
            field=field,
            fix=fix,
        ) from None


def _class_options(name: str, table: Mapping[str, Any], settings: Settings) -> RayClassOptions:
    where = f"ray_classes.{name}"
    unknown = sorted(set(table) - set(RAY_CLASS_FIELDS))
    if unknown:
        raise ConfigError(
            f"unknown Ray option {preview(unknown[0])}",
            field=f"{where}.{unknown[0]}",
            fix="use " + ", ".join(RAY_CLASS_FIELDS),
        )
    options: dict[str, Any] = {"namespace": settings.ray_namespace}
    for key in ("num_cpus", "num_gpus"):
        if key in table:
            options[key] = _amount(table[key], f"{where}.{key}")
    if "resources" in table:
        resources = table["resources"]
        if not isinstance(resources, Mapping):
            raise ConfigError(
                f"must be a table, got {preview(resources)}",
                field=f"{where}.resources",
                fix="e.g. resources = { worker2 = 1 }",
            )
        options["resources"] = {str(k): _amount(v, f"{where}.resources.{k}") for k, v in resources.items()}
        if {"CPU", "GPU"} & set(options["resources"]):
            raise ConfigError(
                "CPU and GPU are not custom resources",
                field=f"{where}.resources",
                fix="use num_cpus / num_gpus for them",
            )
    if "runtime_env" in table:
        try:
            options["runtime_env"] = check_json_object(table["runtime_env"], f"{where}.runtime_env")
        except ValueError as exc:
            raise ConfigError(
                str(exc), field=f"{where}.runtime_env", fix='a table, e.g. { env_vars = { A = "1" } }'
            ) from None
    if "namespace" in table:
        namespace = table["namespace"]
        if not isinstance(namespace, str) or not namespace.strip():
            raise ConfigError(
                f"must be a non-empty string, got {preview(namespace)}",
                field=f"{where}.namespace",
                fix='e.g. namespace = "dspy_infra"',
            )
        options["namespace"] = namespace
    if "idle_timeout" in table:
        options["idle_timeout"] = _idle_timeout(table["idle_timeout"], f"{where}.idle_timeout")
    return RayClassOptions(**options)


def ray_classes(settings: Settings) -> dict[str, RayClassOptions]:
    """The classes of ``settings`` that run on Ray, with their options (refusing a
    ``[ray_classes.NAME]`` table for a class that does not)."""
    names = {name for name, table in settings.task_classes.items() if table.get("executor") == "ray"}
    builtin = settings.task_classes.get(RAY_CLASS, {})
    if builtin.get("executor", "ray") == "ray" and (
        settings.ray_address is not None or RAY_CLASS in settings.task_classes
    ):
        names.add(RAY_CLASS)  # the built-in class for single tasks, once Ray is configured
    for name in settings.ray_classes:
        if name not in names:
            fix = (
                "set ray_address to the cluster's head"
                if name == RAY_CLASS
                else f'set executor = "ray" in [task_classes.{name}]'
            )
            raise ConfigError(
                f"class {name!r} does not run on Ray",
                field=f"ray_classes.{name}",
                fix=f"{fix}, or remove [ray_classes.{name}]",
            )
    return {
        name: _class_options(name, settings.ray_classes.get(name, {}), settings) for name in sorted(names)
    }


def _probe(address: str | None) -> None:
    """Blocking: refuse an address nothing listens on at once (``ray.init`` retries such an
    address for minutes before it gives up)."""
    if address is None or address == "auto":
        return
    host, sep, port = address.removeprefix("ray://").rpartition(":")
    if not sep or not port.isdigit():
        raise ConfigError(
            f"{preview(address)} is not HOST:PORT",
            field="ray_address",
            fix='the head\'s GCS address, e.g. "127.0.0.1:6379", or "ray://HOST:10001"',
        )
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=10).close()
        return
    except OSError as exc:
        reason = exc.strerror or str(exc)
    raise Unavailable(
        f"ray: nothing answers at {address} ({reason})",
        field="ray_address",
        fix="start the cluster (`ray start --head --port=PORT`) or point ray_address at its head",
    )


def _import_ray(field: str) -> ModuleType:
    try:
        import ray
    except ImportError as exc:
        raise ConfigError(
            f'executor = "ray" but Ray cannot be imported ({exc})', field=field, fix=RAY_INSTALL_HINT
        ) from None
    return ray


@attrs.define(eq=False)
class _Runner:
    """The owner's view of one runner actor."""

    handle: Any
    #: Its actor name (durable owners' runners only).
    name: str | None
    #: When its last call ended, on the owner's clock (-inf: not ours to give new attempts).
    used: float


@attrs.define(eq=False)
class _Pool:
    """One class's runners (see ``RayExecutor``)."""

    options: RayClassOptions
    #: Runners free for a new attempt, the warmest last.
    idle: list[_Runner] = attrs.field(factory=list)
    #: Actor name -> runner, for every named runner this owner knows.
    named: dict[str, _Runner] = attrs.field(factory=dict)
    #: Task id -> (runner, key) of attempts left by an earlier owner, once asked (adoption).
    holders: dict[str, tuple[_Runner, str]] | None = None
    lock: anyio.Lock = attrs.field(factory=anyio.Lock)

    def fresh(self, runner: _Runner, now: float) -> bool:
        # A runner about to exit by itself is never given an attempt: its idle clock started
        # a little before ours, and a call it gets after deciding to exit is refused
        # ("busy"), but one that reaches it after it died fails as a lost attempt.
        timeout = self.options.idle_timeout
        return now - runner.used < timeout - min(timeout / 2, IDLE_MARGIN)

    def take(self, runner: _Runner) -> None:
        if runner in self.idle:
            self.idle.remove(runner)

    def give_back(self, runner: _Runner) -> None:
        runner.used = time.monotonic()
        if runner not in self.idle:
            self.idle.append(runner)

    def forget(self, runner: _Runner) -> None:
        self.take(runner)
        if runner.name is not None:
            self.named.pop(runner.name, None)


class RayExecutor(AsyncResource):
    """Runs attempts on a Ray cluster (see the module docstring). An async context manager:
    entering connects to the cluster (in a thread) and starts the capacity poller (a
    ``BackgroundTask``); ``run`` needs it entered (the Scheduler does that)."""

    def __init__(
        self,
        settings: Settings,
        classes: Mapping[str, RayClassOptions],
        *,
        capacity_interval: float = CAPACITY_INTERVAL,
    ) -> None:
        self.settings = settings
        self.classes = dict(classes)
        self.capacity_interval = capacity_interval
        home = settings.resolved_home()
        #: Attempts outlive this process and are adopted after a restart (Scheduler recovery).
        self.survives_owner = settings.durable
        #: Task id -> (runner, key, when) of outcomes in hand the runner still holds.
        self._uncollected: dict[str, tuple[_Runner, str, float]] = {}
        # Attempt keys and runner names: the same across restarts (what adoption needs).
        self._scope = durable_scope(home)
        self._ray: ModuleType | None = None
        self._runner_class: Any = None
        self._pools: dict[str, _Pool] = {}
        self._available: dict[str, float] | None = None
        self._total: dict[str, float] | None = None
        self._inflight: Counter[str] = Counter()
        #: Classes whose attempts a graceful stop leaves running (``leave_running``).
        self._leaving: frozenset[str] = frozenset()
        self._poller = BackgroundTask(self._background, "dspy_infra-ray-capacity")

    # -- lifetime -------------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        field = f"task_classes.{next(iter(self.classes), 'NAME')}.executor"
        self._ray = await anyio.to_thread.run_sync(_import_ray, field)
        await anyio.to_thread.run_sync(self._connect)
        await self._poller.start()
        return self

    async def aclose(self) -> None:
        # The Ray connection stays: a driver is per process, and others in this process
        # (another scheduler, the app itself) may use it. Runners still running an attempt
        # stay too (a durable owner's hold the attempts a restart adopts); idle ones go, so
        # their resources return to the cluster now rather than after their idle time.
        await self._poller.stop()
        # Every task's end is committed by now (the scheduler closes its store first).
        with anyio.move_on_after(10):
            for ref in self._collect(math.inf):
                with contextlib.suppress(Exception):
                    await ref
            await self.release_idle()
        self._pools.clear()

    async def release_idle(self) -> None:
        """End the runners waiting for an attempt now, rather than after their
        ``idle_timeout``: their resources go back to the cluster (the next attempt starts a
        new runner). Runners holding an attempt, or an outcome in hand for less than
        ``COLLECT_DELAY``, stay."""
        for ref in self._collect(time.monotonic() - COLLECT_DELAY):
            with contextlib.suppress(Exception):
                await ref
        retiring: list[Any] = []
        for pool in self._pools.values():
            retiring += [runner.handle.retire.remote() for runner in pool.idle]
            for runner in list(pool.idle):
                pool.forget(runner)
        for ref in retiring:
            with contextlib.suppress(Exception):  # it exits: its call fails with RayActorError
                await ref

    async def _background(self) -> None:
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._poll_capacity)
            if self.survives_owner:
                tg.start_soon(self._collect_loop)

    def leave_running(self, class_names: frozenset[str]) -> None:
        """The owner stops gracefully: attempts of ``class_names`` cancelled from now on keep
        running on their runners for the next start (``DetachableExecutor``)."""
        self._leaving = class_names

    async def cancel_left(self, task_id: str, class_name: str) -> None:
        """Cancel the attempt an earlier owner left for ``task_id`` (cancelled before the
        task adopted it), on the runner that holds it."""
        if not self.survives_owner:
            return
        pool = self._pool(class_name)
        holder = await self._holder(pool, task_id)
        if holder is not None:
            await self._cancel_on(pool, holder[0], task_id)

    def _connect(self) -> None:
        ray = self._ray
        assert ray is not None
        address = self.settings.ray_address
        if not ray.is_initialized():
            _probe(address)
            try:
                ray.init(
                    address=address,
                    namespace=self.settings.ray_namespace,
                    log_to_driver=False,
                    configure_logging=False,
                )
            except Exception as exc:  # ConnectionError, RuntimeError, auth errors, ...
                raise Unavailable(
                    f"ray: cannot connect to the cluster at {address or 'the default address'}: {exc}",
                    fix="start it (`ray start --head`), set ray_address to its head (HOST:PORT), and"
                    " give this process the cluster's auth settings (e.g. RAY_AUTH_MODE=token)",
                ) from None
        # Retries are the scheduler's, never Ray's (an actor's default: no restarts, no
        # task retries).
        self._runner_class = ray.remote(AttemptRunner)

    # -- the adaptive limit's bound --------------------------------------------------------

    def _resources(self) -> tuple[dict[str, float], dict[str, float]]:
        """Blocking: (free, total) resources of the cluster."""
        assert self._ray is not None
        return dict(self._ray.available_resources()), dict(self._ray.cluster_resources())

    async def _poll_capacity(self) -> None:
        while True:
            try:
                self._available, self._total = await anyio.to_thread.run_sync(self._resources)
            except Exception as exc:  # the cluster went away: no bound until it answers again
                log.debug("ray: polling the cluster's resources failed: %s", exc)
                self._available = self._total = None
            await anyio.sleep(self.capacity_interval)

    def capacity(self, class_name: str) -> int | None:
        """Attempts of ``class_name`` the cluster can run now: those in flight, its idle
        runners (their resources are held, so not free) and as many more as its free
        resources fit, and never more than its whole resources fit (attempts in flight may
        still wait for a runner's placement). None: unknown yet, or the class asks for
        nothing."""
        options = self.classes.get(class_name)
        if options is None or self._available is None or self._total is None:
            return None
        demand = options.demand()
        more = fitting_attempts(demand, self._available)
        whole = fitting_attempts(demand, self._total)
        if more is None or whole is None:
            return None
        pool = self._pools.get(class_name)
        now = time.monotonic()
        idle = sum(pool.fresh(runner, now) for runner in pool.idle) if pool is not None else 0
        return min(self._inflight[class_name] + idle + more, whole)

    # -- runners --------------------------------------------------------------------------

    def _pool(self, class_name: str) -> _Pool:
        pool = self._pools.get(class_name)
        if pool is None:
            options = self.classes.get(class_name) or RayClassOptions(namespace=self.settings.ray_namespace)
            pool = self._pools[class_name] = _Pool(options)
        return pool

    def _prefix(self, class_name: str) -> str:
        return f"dspy_infra-runner-{self._scope}-{class_name}-"

    async def _acquire(self, class_name: str, pool: _Pool) -> _Runner:
        """A runner free for a new attempt: the warmest idle one, else a new one."""
        now = time.monotonic()
        while pool.idle:
            runner = pool.idle.pop()
            if pool.fresh(runner, now):
                return runner
            # The rest are older still: they exit by themselves (or have).
            for stale in [runner, *pool.idle]:
                pool.forget(stale)
        return await self._started_runner(class_name, pool)

    async def _started_runner(self, class_name: str, pool: _Pool) -> _Runner:
        """A new runner, once placed and answering (waiting, like a Ray task, until a node
        with the class's resources has room). One that dies before it answers never ran an
        attempt (its node died as it was placed there, say): another takes its place."""
        ray = self._ray
        assert ray is not None
        for tries_left in reversed(range(RUNNER_STARTS)):
            runner = await anyio.to_thread.run_sync(self._new_runner, class_name, pool)
            try:
                await runner.handle.held.remote()
            except ray.exceptions.RayError as exc:
                pool.forget(runner)
                if not tries_left:
                    raise RayAttemptLost(f"ray: no runner of {class_name!r} could start: {exc}") from None
                log.warning(
                    "ray: a runner of %r died before it started (%s); starting another", class_name, exc
                )
                continue
            return runner
        raise AssertionError("unreachable")

    def _new_runner(self, class_name: str, pool: _Pool) -> _Runner:
        """Blocking (a named actor is registered with the cluster before this returns)."""
        options: dict[str, Any] = {**pool.options.actor_options(), "max_concurrency": RUNNER_CALLS}
        name = None
        if self.survives_owner:
            # Outlives this process: it holds the attempt a restart adopts.
            name = self._prefix(class_name) + uuid.uuid4().hex[:12]
            options.update(name=name, namespace=pool.options.namespace, lifetime="detached")
        handle = self._runner_class.options(**options).remote(pool.options.idle_timeout, self.survives_owner)
        runner = _Runner(handle, name, time.monotonic())
        if name is not None:
            pool.named[name] = runner
        return runner

    async def _holder(self, pool: _Pool, task_id: str) -> tuple[_Runner, str] | None:
        """The runner holding an attempt of ``task_id`` left by an earlier owner, and its
        key (the class's named runners are asked once, at the first adoption)."""
        if pool.holders is None:
            async with pool.lock:
                if pool.holders is None:
                    class_name = next(name for name, p in self._pools.items() if p is pool)
                    pool.holders = await anyio.to_thread.run_sync(self._discover, class_name, pool)
        return pool.holders.pop(task_id, None)

    def _discover(self, class_name: str, pool: _Pool) -> dict[str, tuple[_Runner, str]]:
        """Blocking: task id -> (runner, key) of every attempt the class's named runners
        hold (a running attempt wins over an ended one for the same task)."""
        ray = self._ray
        assert ray is not None
        namespace, prefix = pool.options.namespace, self._prefix(class_name)
        asked: list[tuple[_Runner, Any]] = []
        for entry in ray.util.list_named_actors(all_namespaces=True):
            name = entry["name"]
            if entry["namespace"] != namespace or not name.startswith(prefix):
                continue
            runner = pool.named.get(name)
            if runner is None:
                try:
                    handle = ray.get_actor(name, namespace=namespace)
                except ValueError:  # exited meanwhile
                    continue
                # Not given new attempts: its idle clock is its own.
                runner = pool.named[name] = _Runner(handle, name, -math.inf)
            asked.append((runner, runner.handle.held.remote()))
        holders: dict[str, tuple[_Runner, str]] = {}
        running: set[str] = set()
        for runner, ref in asked:
            try:
                held = ray.get(ref, timeout=120)
            except Exception as exc:  # exited or lost meanwhile: it holds nothing
                log.debug("ray: runner %s did not answer: %s", runner.name, exc)
                continue
            for task_id, key, is_running in held:
                if task_id not in running:
                    holders[task_id] = (runner, key)
                    if is_running:
                        running.add(task_id)
        return holders

    async def _cancel_on(self, pool: _Pool, runner: _Runner, task_id: str) -> None:
        """Cancel the task's attempt on ``runner`` (the handler cleans up: ``exec`` ends its
        process group); a runner that does not end it within ``CANCEL_GRACE`` is killed."""
        ray = self._ray
        assert ray is not None
        with anyio.CancelScope(shield=True):
            done = False
            with contextlib.suppress(Exception), anyio.move_on_after(CANCEL_GRACE + 10):
                done = await runner.handle.cancel.remote(task_id)
            if not done:
                pool.forget(runner)
                with contextlib.suppress(Exception):
                    await anyio.to_thread.run_sync(
                        functools.partial(ray.kill, runner.handle, no_restart=True)
                    )
                return
            if self.survives_owner:
                # Whatever attempt the runner held for the task, it is over: a retry must
                # not adopt it.
                runner.handle.collect.remote([(task_id, None)])
            if runner.used != -math.inf:
                pool.give_back(runner)

    # -- one attempt ----------------------------------------------------------------------

    def _call(self, ctx: TaskContext) -> dict[str, Any]:
        """What the cluster needs to run the attempt; refuses a bad handler field here."""
        payload = ctx.payload
        handler = payload.get("handler")
        if handler is None and "cmd" in payload:
            handler = "exec"
        if not isinstance(handler, str) or not handler:
            raise PermanentFailure(
                f"payload.handler: expected a handler name, got {preview(handler)} (fix: a built-in"
                ' such as "exec" or "http", or "package.module:function" importable on the cluster)'
            )
        policy = self.settings.exec_policy
        if handler == "exec" and policy == "deny":
            raise PermanentFailure(
                "exec_policy: 'deny' forbids running commands, so the exec handler refuses this task"
                ' (fix: set exec_policy = "allow" or "embedded", then submit it again)'
            )
        if ":" in handler and policy != "allow":
            raise PermanentFailure(
                f"payload.handler: {handler!r} imports code on the cluster, which exec_policy"
                f' {policy!r} forbids (fix: set exec_policy = "allow", or use a built-in handler)'
            )
        return {
            "handler": handler,
            "task_id": ctx.spec.id,
            "task_class": ctx.spec.task_class,
            "payload": dict(payload),
            "attempt": ctx.attempt,
            "exec_policy": policy,
        }

    async def run(self, ctx: TaskContext) -> dict[str, Any]:
        """One attempt of ``ctx.spec`` on the cluster (adopting one left by a crashed owner)."""
        if not self._poller.running:
            raise Unavailable(
                "the Ray executor is not running", fix="use it as `async with RayExecutor(...)`"
            )
        cls_name = ctx.spec.task_class
        call = self._call(ctx)
        self._inflight[cls_name] += 1
        try:
            outcome = await self._outcome(ctx, call)
        finally:
            self._inflight[cls_name] -= 1
        if outcome["status"] == "unknown":  # only an adoption asks without a call
            raise RayAttemptLost("ray: the runner lost the attempt it was given")
        if "adopted" in outcome:
            log.warning(
                "ray: task %r attempt %d adopted %s, left running by an earlier owner",
                ctx.spec.id,
                ctx.attempt,
                outcome["adopted"],
            )
        text = outcome.get("log")
        if text is not None:
            # The log came back with the outcome: kept where this owner's task_log finds
            # it, as for a local attempt (before the result, so a caller can read it then).
            await anyio.to_thread.run_sync(keep_attempt_log, self.settings, ctx.spec.id, ctx.attempt, text)
        return _result(outcome, ctx)

    async def _outcome(self, ctx: TaskContext, call: dict[str, Any]) -> Outcome:
        """Run ``call`` on a runner of the class, or adopt the attempt a runner holds for the
        task. Nothing of the attempt needs writing here: the scheduler flushed its row
        (running, attempt N) before calling us, and its handle is the runner's name and the
        attempt's key, found again by asking the class's runners."""
        task_id = ctx.spec.id
        pool = self._pool(ctx.spec.task_class)
        key = attempt_marker(self._scope, task_id, ctx.attempt)
        target: _Runner | None = None
        drop: str | None = None
        # A first attempt has nothing to adopt; a later one may (a restart, a retry).
        if self.survives_owner and ctx.attempt > 1:
            had = self._uncollected.pop(task_id, None)
            if had is not None:  # a retry here: its runner drops the outcome we have
                target, drop = had[0], had[1]
            else:
                holder = await self._holder(pool, task_id)
                target = holder[0] if holder is not None else None
        while True:
            if target is not None:
                runner = target
                pool.take(runner)
            else:
                runner = await self._acquire(ctx.spec.task_class, pool)
            outcome = await self._on_runner(ctx, pool, runner, key, call, drop)
            if outcome["status"] != "busy":
                return outcome
            target = drop = None  # it runs another attempt: a free runner runs this one

    async def _on_runner(
        self, ctx: TaskContext, pool: _Pool, runner: _Runner, key: str, call: dict[str, Any], drop: str | None
    ) -> Outcome:
        """One ``run`` call on ``runner``. Cancelled meanwhile, the attempt is cancelled on
        the runner first (unless the owner is stopping and the class leaves it running:
        ``leave_running``). A durable runner drops the outcome a little after it is in hand
        (``_collect_loop``), once the scheduler has recorded it."""
        ray = self._ray
        assert ray is not None
        task_id = ctx.spec.id
        try:
            outcome: Outcome = await runner.handle.run.remote(task_id, key, call, drop)
        except ray.exceptions.RayError as exc:
            pool.forget(runner)
            return outcome_of_error(exc)
        except BaseException as exc:
            if isinstance(exc, anyio.get_cancelled_exc_class()) and ctx.spec.task_class in self._leaving:
                log.warning(
                    "ray: the owner stops; attempt %s of task %r keeps running for the next start",
                    key,
                    task_id,
                )
                raise
            await self._cancel_on(pool, runner, task_id)
            raise
        if outcome["status"] == "busy":
            return outcome
        pool.give_back(runner)
        if self.survives_owner and outcome["status"] != "unknown":
            self._uncollected[task_id] = (runner, outcome.get("adopted", key), time.monotonic())
        return outcome

    async def _collect_loop(self) -> None:
        """Tell the runners, in one call each per ``COLLECT_DELAY``, which outcomes to drop:
        those in hand for at least that long (the scheduler commits a task's end within
        milliseconds of it; until then a crash leaves the outcome for the next owner)."""
        while True:
            await anyio.sleep(COLLECT_DELAY)
            self._collect(time.monotonic() - COLLECT_DELAY)

    def _collect(self, before: float) -> list[Any]:
        """Send the runners the outcomes in hand since ``before`` to drop; their refs."""
        due: dict[_Runner, list[tuple[str, str]]] = {}
        for task_id, (runner, key, at) in list(self._uncollected.items()):
            if at <= before:
                del self._uncollected[task_id]
                due.setdefault(runner, []).append((task_id, key))
        return [runner.handle.collect.remote(done) for runner, done in due.items()]


def _result(outcome: Outcome, ctx: TaskContext) -> dict[str, Any]:
    status = outcome["status"]
    if status == "cancelled":
        raise RayAttemptLost(f"ray: attempt {ctx.attempt} of {ctx.spec.id!r} was cancelled on the cluster")
    if status != "ended":
        raise RayAttemptLost(
            f"ray: attempt {ctx.attempt} of {ctx.spec.id!r} was lost with its worker or node:"
            f" {outcome.get('error', status)}"
        )
    if outcome["ok"]:
        return dict(outcome["result"])
    if outcome["permanent"]:
        raise PermanentFailure(outcome["error"], outcome["result"] or None)
    raise RayHandlerFailed(outcome["error"], outcome["result"] or None)


def _ray_installed() -> bool:
    return importlib.util.find_spec("ray") is not None


def _factory(settings: Settings) -> RayExecutor | None:
    classes = ray_classes(settings)
    if not classes:
        return None  # no class runs on Ray: Ray is never imported
    explicit = [name for name in classes if "executor" in settings.task_classes.get(name, {})]
    if not _ray_installed():
        raise ConfigError(
            'executor = "ray" but Ray is not installed'
            if explicit
            else "ray_address is set but Ray is not installed",
            field=f"task_classes.{explicit[0]}.executor" if explicit else "ray_address",
            fix=RAY_INSTALL_HINT,
        )
    return RayExecutor(settings, classes)


@hookimpl
def dspy_infra_task_classes() -> Iterable[TaskClass]:
    """The built-in ``ray`` class: a single task goes to the Ray cluster with
    ``task_class="ray"``, no class of one's own needed. It runs once ``ray_address`` is set
    (refused at submit before that, like ``gpu_slurm`` without ``slurm``); its attempts ask
    for one CPU unless ``[ray_classes.ray]`` says otherwise."""
    return [TaskClass(RAY_CLASS, min_concurrency=1, base_concurrency=4, max_concurrency=64, executor="ray")]


@hookimpl
def dspy_infra_executors() -> Mapping[str, ExecutorFactory]:
    """The ``ray`` executor (None unless a class has ``executor = "ray"``)."""
    return {"ray": _factory}
