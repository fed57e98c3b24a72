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

One attempt is one Ray task (``max_retries=0``: retries, timeouts and priorities stay the
scheduler's) with the class's resources and runtime env, running the task's handler on the
cluster (``payload["handler"]``: a built-in such as ``exec``, ``http``, ``sleep``, or
``"package.module:function"``, an async function importable there; ``exec`` when only
``cmd`` is given). Results and errors come back as from a local handler: the same JSON
result (``exec`` output bounded the same way), ``PermanentFailure`` fails the task, other
failures fail the attempt with the handler's message and result.

Survives its owner: attempts are submitted by a named, detached *keeper* actor
(``ray_remote.AttemptKeeper``, one per state directory and namespace, placed on the owner's
node), so they belong to the keeper, not to this process. An attempt's handle needs no
file of its own: it is the keeper's name (state directory's scope, class namespace) and the
task id, and the scheduler has flushed the attempt's row (running, attempt N) to its store
before it calls ``run``, so the one fsync of the attempt covers it. After a crash (SIGKILL
included) or a graceful stop that left the attempt running, the task's next attempt asks
the keeper for the task, in the same call that would start it: the keeper hands over the
attempt it holds (watched to its end, or its outcome if it has ended): it never runs twice.
Only when the keeper holds nothing for the task (it never got it, or the keeper itself was
lost) does the task run anew. The keeper drops an outcome a second after the owner has it
(``COLLECT_DELAY``; the scheduler commits the task's end within milliseconds), or at once
when the owner retries the task. Do not change a class's namespace while attempts run: the
next start would ask another keeper and run them anew. A memory-only scheduler submits its
attempts itself, one hop shorter: they end with this process (a restart has nothing to
adopt them for).

Cancel (task cancel, timeout) asks the keeper to ``ray.cancel`` the attempt: a SIGINT that
cancels the handler (``exec`` ends its process group), then, after
``ray_remote.CANCEL_GRACE`` seconds, a forced cancel that kills the worker. A graceful stop
of the owner cancels it the same way only for a class with ``on_shutdown = "cancel"``;
otherwise (``leave_running``) the attempt runs on under its keeper, and the
next start adopts it as after a crash.

A lost worker, node or keeper fails the attempt with ``RayAttemptLost`` (retried per the
task's ``max_attempts``); a cluster that does not answer at start is ``Unavailable``.
The class's adaptive limit is bounded by what the cluster reports available
(``ray.available_resources()``, polled off the loop every few seconds): the attempts in
flight plus as many more as the free resources fit.

Every blocking Ray call (``ray.init``, actor lookup, ``available_resources``) runs in a
worker thread; ObjectRefs are awaited on the loop.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import math
import socket
import time
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
from ..values import check_finite, check_json_object, preview
from .background import BackgroundTask
from .ray_remote import (
    CANCEL_GRACE,
    AttemptKeeper,
    Outcome,
    cancel_attempt,
    ended,
    outcome_of_error,
    run_attempt,
)

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
RAY_CLASS_FIELDS = ("num_cpus", "num_gpus", "resources", "runtime_env", "namespace")
#: Seconds between two ``ray.available_resources()`` polls (the adaptive limit's bound).
CAPACITY_INTERVAL = 5.0
#: Seconds an outcome in hand stays with the keeper before it is told to drop it.
COLLECT_DELAY = 1.0


class RayAttemptLost(HandlerFailure):
    """The attempt ended without an outcome: its worker, node or keeper died, or it was
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

    def task_options(self) -> dict[str, Any]:
        """Keyword arguments of ``RemoteFunction.options`` for one attempt."""
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
        return check_finite(float(value), field, lo=0.0)
    except ValueError:
        raise ConfigError(
            f"must be a finite number >= 0, got {preview(value)}", field=field, fix="e.g. 1 or 0.5"
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
        #: (namespace, task id) -> (key, when) of outcomes in hand the keeper still holds.
        self._uncollected: dict[tuple[str, str], tuple[str, float]] = {}
        # Attempt keys and the keeper's name: the same across restarts (what adoption needs).
        self._scope = durable_scope(home)
        self._ray: ModuleType | None = None
        self._keeper_class: Any = None
        self._remote_run: Any = None
        #: Class name -> the attempt function with the class's options (memory-only path).
        self._remotes: dict[str, Any] = {}
        self._keepers: dict[str, Any] = {}
        self._keeper_lock = anyio.Lock()
        self._node_id = ""
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
        # (another scheduler, the app itself) may use it. Detached keepers stay too: they
        # hold the attempts a restart adopts.
        await self._poller.stop()
        # Every task's end is committed by now (the scheduler closes its store first).
        with anyio.move_on_after(10):
            for ref in self._collect(math.inf):
                with contextlib.suppress(Exception):
                    await ref

    async def _background(self) -> None:
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._poll_capacity)
            if self.survives_owner:
                tg.start_soon(self._collect_loop)

    def leave_running(self, class_names: frozenset[str]) -> None:
        """The owner stops gracefully: attempts of ``class_names`` cancelled from now on keep
        running under their keeper for the next start (``DetachableExecutor``)."""
        self._leaving = class_names

    async def cancel_left(self, task_id: str, class_name: str) -> None:
        """Cancel the attempt an earlier owner left for ``task_id`` (cancelled before the
        task adopted it), through the class's keeper."""
        if not self.survives_owner:
            return
        options = self.classes.get(class_name) or RayClassOptions(namespace=self.settings.ray_namespace)
        keeper = await self._keeper(options.namespace)
        with contextlib.suppress(Exception):
            await keeper.cancel.remote(task_id)
        keeper.collect.remote([(task_id, None)])

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
        self._node_id = ray.get_runtime_context().get_node_id()
        self._keeper_class = ray.remote(AttemptKeeper)
        # Retries are the scheduler's, never Ray's.
        self._remote_run = ray.remote(max_retries=0)(run_attempt)

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
        """Attempts of ``class_name`` the cluster can run now: those in flight plus as many
        more as its free resources fit, and never more than its whole resources fit (attempts
        in flight may still wait in Ray's queue). None: unknown yet, or the class asks for
        nothing."""
        options = self.classes.get(class_name)
        if options is None or self._available is None or self._total is None:
            return None
        demand = options.demand()
        more = fitting_attempts(demand, self._available)
        whole = fitting_attempts(demand, self._total)
        if more is None or whole is None:
            return None
        return min(self._inflight[class_name] + more, whole)

    # -- keepers --------------------------------------------------------------------------

    async def _keeper(self, namespace: str) -> Any:
        keeper = self._keepers.get(namespace)
        if keeper is not None:
            return keeper
        async with self._keeper_lock:
            if namespace not in self._keepers:
                self._keepers[namespace] = await anyio.to_thread.run_sync(self._open_keeper, namespace)
            return self._keepers[namespace]

    def _open_keeper(self, namespace: str) -> Any:
        ray = self._ray
        assert ray is not None
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        options: dict[str, Any] = {
            "name": f"dspy_infra-keeper-{self._scope}",
            "namespace": namespace,
            "get_if_exists": True,
            "num_cpus": 0,
            "max_concurrency": 10_000,
            # Next to its owner: a keeper on a node that goes away takes its attempts along.
            "scheduling_strategy": NodeAffinitySchedulingStrategy(node_id=self._node_id, soft=True),
            # Outlives this process: it holds the attempts a restart adopts.
            "lifetime": "detached",
        }
        keeper = self._keeper_class.options(**options).remote()
        ray.get(keeper.ping.remote(), timeout=120)
        return keeper

    def _forget_keeper(self, namespace: str, keeper: Any) -> None:
        if self._keepers.get(namespace) is keeper:
            del self._keepers[namespace]

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
        options = self.classes.get(cls_name) or RayClassOptions(namespace=self.settings.ray_namespace)
        call = self._call(ctx)
        self._inflight[cls_name] += 1
        try:
            outcome = await self._outcome(ctx, call, options)
        finally:
            self._inflight[cls_name] -= 1
        return _result(outcome, ctx)

    async def _outcome(self, ctx: TaskContext, call: dict[str, Any], options: RayClassOptions) -> Outcome:
        if not self.survives_owner:
            return await self._run_owned(ctx.spec.task_class, call, options)
        # The attempt's handle is its key (scope, task id, attempt) and the class's keeper:
        # nothing of it needs writing here, since the scheduler flushed the attempt's row
        # (running, attempt N) before calling us. The keeper adopts in the same call.
        key = attempt_marker(self._scope, ctx.spec.id, ctx.attempt)
        outcome = await self._through_keeper(ctx, options.namespace, key, call, options.task_options())
        if outcome["status"] == "unknown":  # only an adoption asks without a call
            raise RayAttemptLost("ray: the attempt keeper lost the attempt it was given")
        if "adopted" in outcome:
            log.warning(
                "ray: task %r attempt %d adopted %s, left running by an earlier owner",
                ctx.spec.id,
                ctx.attempt,
                outcome["adopted"],
            )
        return outcome

    async def _run_owned(self, cls_name: str, call: dict[str, Any], options: RayClassOptions) -> Outcome:
        """Memory-only: the attempt is this process's own Ray task (it ends with us, and a
        restart has nothing to adopt), one hop shorter than through a keeper."""
        ray = self._ray
        assert ray is not None
        remote = self._remotes.get(cls_name)
        if remote is None:
            remote = self._remotes[cls_name] = self._remote_run.options(**options.task_options())
        ref = remote.remote(call)
        try:
            return ended(await ref)
        except ray.exceptions.RayError as exc:
            return outcome_of_error(exc)
        except BaseException:
            with anyio.CancelScope(shield=True), anyio.move_on_after(CANCEL_GRACE + 30):
                await anyio.to_thread.run_sync(cancel_attempt, ref)
            raise

    async def _through_keeper(
        self,
        ctx: TaskContext,
        namespace: str,
        key: str,
        call: dict[str, Any] | None,
        task_options: dict[str, Any] | None,
    ) -> Outcome:
        """Through the keeper, in one call: adopt the attempt it holds for the task, or
        start ``call`` under ``key``; wait for its outcome. Cancelled meanwhile, the attempt
        is cancelled on the cluster first (unless the owner is stopping and the class
        leaves it running: ``leave_running``). The outcome is dropped by the keeper a
        little after it is in hand (``_collect_loop``), once the scheduler has recorded it."""
        ray = self._ray
        assert ray is not None
        keeper = await self._keeper(namespace)
        task_id = ctx.spec.id
        had = self._uncollected.pop((namespace, task_id), None)
        try:
            outcome: Outcome = await keeper.run.remote(task_id, key, call, task_options, had and had[0])
        except ray.exceptions.RayActorError as exc:
            self._forget_keeper(namespace, keeper)
            raise RayAttemptLost(
                f"ray: the attempt keeper died (its node left the cluster?): {exc}"
            ) from None
        except BaseException as exc:
            if isinstance(exc, anyio.get_cancelled_exc_class()) and ctx.spec.task_class in self._leaving:
                log.warning(
                    "ray: the owner stops; attempt %s of task %r keeps running for the next start",
                    key,
                    task_id,
                )
                raise
            with anyio.CancelScope(shield=True), anyio.move_on_after(CANCEL_GRACE + 30):
                with contextlib.suppress(Exception):
                    await keeper.cancel.remote(task_id)
                # Whatever attempt the keeper held for the task (this one, or one it was
                # adopting), it is over: a retry must not adopt it.
                keeper.collect.remote([(task_id, None)])
            raise
        if outcome["status"] != "unknown":
            self._uncollected[(namespace, task_id)] = (outcome.get("adopted", key), time.monotonic())
        return outcome

    async def _collect_loop(self) -> None:
        """Tell the keepers, in one call each per ``COLLECT_DELAY``, which outcomes to drop:
        those in hand for at least that long (the scheduler commits a task's end within
        milliseconds of it; until then a crash leaves the outcome for the next owner)."""
        while True:
            await anyio.sleep(COLLECT_DELAY)
            self._collect(time.monotonic() - COLLECT_DELAY)

    def _collect(self, before: float) -> list[Any]:
        """Send the keepers the outcomes in hand since ``before`` to drop; their refs."""
        sent: list[Any] = []
        due: dict[str, list[tuple[str, str]]] = {}
        for (namespace, task_id), (key, at) in list(self._uncollected.items()):
            if at <= before:
                del self._uncollected[(namespace, task_id)]
                due.setdefault(namespace, []).append((task_id, key))
        for namespace, done in due.items():
            keeper = self._keepers.get(namespace)
            if keeper is not None:
                sent.append(keeper.collect.remote(done))
        return sent


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
