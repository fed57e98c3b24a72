"""The built-in ``container`` task handler: one one-shot container per attempt.

This is the scheduler's only way to the container engines (it knows services only through
this handler). It uses the ``docker`` backend (Docker Engine or Podman) at the scheduler's
``settings.docker_host``: one backend per engine and network, opened by the first attempt
that needs it and kept in the scheduler's ``SharedResources`` (closed when the scheduler
closes), so attempts share its connection pool. Called outside a scheduler (``ctx.shared``
is None) it opens one for the call and closes it after (opening asks the engine one
``GET /_ping``, under a millisecond); a caller running many passes a ``SharedResources`` it
owns and closes.

Payload (all strings, as on the wire):

- ``image`` (required);
- ``cmd``: a JSON list of arguments (``["echo", "hi"]``), or a shell string run with
  ``/bin/sh -c``; default: the image's own command;
- ``env``: a JSON object of strings;
- ``workdir``: an absolute path inside the container;
- ``network``: ``none`` (default: a task reaches nothing unless it asks), ``bridge``,
  ``host``, or a user network such as the services' own (``settings.network``);
- ``pull``: ``missing`` (default: pull only an image the engine lacks), ``always`` or
  ``never``. An image that cannot be pulled fails the attempt (retried: engines cannot tell
  an absent image from an unreachable registry); ``never`` with an absent image is permanent.

Every container carries ``dspy_infra.owner`` (``settings.resolved_owner()``),
``dspy_infra.owner_pid``, ``dspy_infra.owner_started`` and ``dspy_infra.task`` (the task id)
labels, so an orphan is
findable by task: a later attempt of the same task (a retry, or the run after a restart)
first removes that task's containers whose owner process is gone. The handler waits for the exit through the engine's wait endpoint, keeps
the last 4 KiB of stdout and stderr (the ``exec`` tail rule) and removes the container. On
timeout or cancel the container is removed (a forced remove: kill, then delete) under a
shield, and the cancellation goes on. A non-zero exit fails the attempt with the stderr tail,
like ``exec``. Result: ``exit_code``, ``stdout``, ``stderr``, ``container_id``, ``image``.
"""

from __future__ import annotations

import contextlib
import json
import re
import uuid
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager

import anyio
import attrs

from ..backends.base import Backend
from ..backends.registry import container_engine, engine_address
from ..config import Settings
from ..errors import BackendError, InfraError, NotFound, PermanentFailure
from ..hookspecs import hookimpl
from ..models import Instance, ServiceSpec
from ..ownership import LABEL_OWNER, labelled_owner_alive, owner_labels
from ..scheduler.context import Handler, Tail, TaskContext, payload_json_object
from .basic import ExecFailed

__all__ = [
    "LABEL_TASK",
    "PULL_POLICIES",
    "ContainerTask",
    "container_handler",
    "container_task",
    "dspy_infra_handlers",
]

#: The label that names the task a container runs (orphans are found by it).
LABEL_TASK = "dspy_infra.task"
PULL_POLICIES = ("missing", "always", "never")
_NETWORK_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
_UNSAFE = re.compile(r"[^a-z0-9_.-]+")
_ENV_KEY_RE = re.compile(r"^[^=\0]+$")


@attrs.frozen
class ContainerTask:
    """A validated ``container`` payload: what to run and where."""

    spec: ServiceSpec
    network: str
    pull: str


def _command(raw: str) -> tuple[str, ...]:
    if not raw.strip():
        return ()
    if raw.lstrip().startswith("["):
        try:
            args = json.loads(raw)
        except ValueError as exc:
            raise PermanentFailure(
                f"payload.cmd: starts with '[' but is not a JSON list ({exc})"
                ' (fix: e.g. ["echo", "hi"], or a shell string such as "echo hi")'
            ) from None
        if not isinstance(args, list) or not args or not all(isinstance(a, str) for a in args):
            raise PermanentFailure(
                'payload.cmd: a JSON list must hold one or more strings (fix: e.g. ["echo", "hi"])'
            )
        return tuple(args)
    return ("/bin/sh", "-c", raw)


def container_task(task_id: str, payload: Mapping[str, str]) -> ContainerTask:
    """Validate a ``container`` payload (every error names the payload field and the fix)."""
    image = payload.get("image", "").strip()
    if not image:
        raise PermanentFailure(
            'payload.image: missing (fix: name the image to run, e.g. {"image": "busybox:latest"})'
        )
    if any(c.isspace() for c in image):
        raise PermanentFailure(f"payload.image: {image!r} contains whitespace (fix: e.g. busybox:latest)")
    env = payload_json_object(payload, "env", '{"LOG_LEVEL": "debug"}')
    bad_keys = sorted(k for k, v in env.items() if not _ENV_KEY_RE.match(k) or "\0" in v)
    if bad_keys:
        raise PermanentFailure(
            f"payload.env: invalid variables {bad_keys!r}"
            " (fix: non-empty names without '=' or NUL, values without NUL)"
        )
    workdir = payload.get("workdir", "").strip() or None
    if workdir is not None and not workdir.startswith("/"):
        raise PermanentFailure(f"payload.workdir: {workdir!r} is not an absolute path (fix: e.g. /work)")
    network = payload.get("network", "").strip() or "none"
    if not _NETWORK_RE.match(network):
        raise PermanentFailure(
            f"payload.network: {network!r} is not a network name (fix: none, bridge, host, or a user network)"
        )
    pull = payload.get("pull", "").strip() or "missing"
    if pull not in PULL_POLICIES:
        raise PermanentFailure(
            f"payload.pull: {pull!r} is not a pull policy (fix: one of {', '.join(PULL_POLICIES)})"
        )
    # A container name per attempt: the task id (made name-safe) plus a random suffix, so
    # retries and overlapping runs never collide.
    name = f"task-{_UNSAFE.sub('_', task_id.lower())[:40]}-{uuid.uuid4().hex[:8]}"
    spec = ServiceSpec(
        name=name,
        image=image,
        command=_command(payload.get("cmd", "")),
        environment=env,
        workdir=workdir,
        one_shot=True,
    )
    return ContainerTask(spec=spec, network=network, pull=pull)


async def _ensure_image(backend: Backend, image: str, pull: str) -> None:
    """Apply the pull policy before creating anything.

    An image that cannot be had is an ordinary failure (retried while attempts remain), not a
    permanent one: engines report an unreachable registry as "not found" too (Docker answers
    404 for a failed DNS lookup), and a registry can come back.
    """
    if pull != "always":
        if await backend.has_image(image):
            return
        if pull == "never":
            raise PermanentFailure(
                f"payload.image: {image!r} is not on the engine and payload.pull is 'never'"
                " (fix: build or pull it first, or set pull to 'missing')"
            )
    try:
        async for _progress in backend.pull(image):
            pass
    except InfraError as exc:
        raise BackendError(
            f"cannot pull {image!r}: {exc.message}",
            field="payload.image",
            fix="check the image name, build it on this engine, or make its registry reachable",
        ) from exc


async def _output(backend: Backend, container_id: str, name: str) -> tuple[str, str]:
    out, err = Tail(), Tail()
    async for entry in backend.logs(container_id, service_name=name):
        (err if entry.stream == "stderr" else out).feed(entry.message.encode() + b"\n")
    return out.text(), err.text()


@asynccontextmanager
async def _backend(ctx: TaskContext, settings: Settings, network: str) -> AsyncIterator[Backend]:
    """The scheduler's shared backend for this engine and network (opened by the first attempt
    that needs it, closed with the scheduler), or, outside a scheduler, one for this call."""
    if ctx.shared is not None:
        key = ("docker", engine_address(settings), network)
        yield await ctx.shared.get(key, lambda: container_engine(settings, network=network))
        return
    backend = container_engine(settings, network=network)
    try:
        await backend.open()
        yield backend
    finally:
        with anyio.CancelScope(shield=True):
            await backend.aclose()


def _owner_gone(labels: Mapping[str, str]) -> bool:
    return not labelled_owner_alive(labels)


async def _remove_leftovers(backend: Backend, labels: Mapping[str, str]) -> None:
    """Remove containers of earlier attempts of this task whose process died.

    A task that was running when its process was killed runs again after a restart (at least
    once, as a later attempt); the container of the lost attempt goes before the new one
    starts. Containers of a live process are never touched.
    """
    mine = {LABEL_OWNER: labels[LABEL_OWNER], LABEL_TASK: labels[LABEL_TASK]}
    for instance in await backend.list_instances(mine):
        # /proc reads: off the event loop.
        if await anyio.to_thread.run_sync(_owner_gone, instance.labels):
            with contextlib.suppress(NotFound):
                await backend.remove(instance.id)


async def _start(backend: Backend, task: ContainerTask, labels: Mapping[str, str]) -> Instance:
    try:
        return await backend.run(task.spec, instance_name=task.spec.name, labels=labels)
    except BaseException:
        # Cancelled while the engine was creating it: the container may exist without our
        # knowing its id. Find it by its labels and name, and remove it.
        with anyio.CancelScope(shield=True), contextlib.suppress(InfraError):
            for instance in await backend.list_instances(labels):
                if instance.name == task.spec.name:
                    await backend.remove(instance.id)
        raise


async def container_handler(ctx: TaskContext) -> dict[str, str]:
    task = container_task(ctx.spec.id, ctx.payload)
    settings = ctx.settings if ctx.settings is not None else Settings()
    labels = {**owner_labels(settings.resolved_owner()), LABEL_TASK: ctx.spec.id}
    async with _backend(ctx, settings, task.network) as backend:
        if ctx.attempt > 1:
            await _remove_leftovers(backend, labels)
        await _ensure_image(backend, task.spec.image, task.pull)
        instance = await _start(backend, task, labels)
        try:
            exit_code = await backend.wait_exit(instance.id)  # the engine's wait endpoint: no polling
            stdout, stderr = await _output(backend, instance.id, task.spec.name)
        finally:
            # Removed however the attempt ends; on cancel or timeout this kills it first.
            with anyio.CancelScope(shield=True), contextlib.suppress(NotFound):
                await backend.remove(instance.id)
    result = {
        "exit_code": str(exit_code),
        "stdout": stdout,
        "stderr": stderr,
        "container_id": instance.id,
        "image": task.spec.image,
    }
    if exit_code != 0:
        raise ExecFailed(exit_code, result)
    return result


@hookimpl
def dspy_infra_handlers() -> Mapping[str, Handler]:
    """The built-in ``container`` handler."""
    return {"container": container_handler}
