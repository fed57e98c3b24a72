"""The built-in ``container`` handler on real engines (Docker Engine and Podman, parametrized),
with the busybox test image built through each engine's API. Removal on timeout and cancel
is checked through the engine API by the ``dspy_infra.task`` label."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
from pathlib import Path
from typing import Any

import aiodocker
import attrs
import pytest
from engines import (
    Engine,
    build_context,
    docker_engine,
    engine,
    engine_kind,
    podman_engine,
    registry,
    unique_name,
)
from harness import open_scheduler
from hypothesis import given
from hypothesis import strategies as st
from strategies import container_fields

from dspy_infra.backends.base import LABEL_OWNER, LABEL_OWNER_PID, LABEL_OWNER_STARTED
from dspy_infra.backends.docker import DockerBackend
from dspy_infra.config import Settings, load_settings
from dspy_infra.errors import BackendError, PermanentFailure
from dspy_infra.handlers.basic import ExecFailed
from dspy_infra.handlers.container import LABEL_TASK, container_handler, container_task
from dspy_infra.models import ServiceSpec, TaskSpec, TaskStatus, validate_name
from dspy_infra.plugins import build_plugin_manager, collect_mapping
from dspy_infra.scheduler.context import TAIL_BYTES, TaskContext
from dspy_infra.scheduler.scheduler import Scheduler

__all__ = ["docker_engine", "engine", "engine_kind", "podman_engine", "registry"]  # fixtures used by name


def settings_for(engine: Engine, tmp_path: Path) -> Settings:
    return load_settings(
        env={},
        home=tmp_path / "home",
        docker_host=engine.host,
        owner=unique_name("owner"),
        durable=False,
        shutdown_grace=0.5,
    )


def ctx(settings: Settings | None, task_id: str = "t", **payload: str) -> TaskContext:
    return TaskContext(spec=TaskSpec(task_id, payload=payload), attempt=1, settings=settings)


async def labelled(engine: Engine, task_id: str) -> list[dict[str, Any]]:
    """What the engine says of each container (any state) carrying ``dspy_infra.task=<task_id>``
    (its inspect document)."""
    async with aiodocker.Docker(url=engine.host) as docker:
        found = await docker.containers.list(
            all=True, filters=json.dumps({"label": [f"{LABEL_TASK}={task_id}"]})
        )
        shown = []
        for container in found:
            with contextlib.suppress(aiodocker.DockerError):  # removed since it was listed
                shown.append(await container.show())
        return shown


def _is_open(backend: DockerBackend) -> bool:
    """Whether ``backend`` holds an engine client (its ``docker`` property refuses when closed)."""
    try:
        return backend.docker is not None
    except BackendError:
        return False


async def until_labelled(engine: Engine, task_id: str, timeout: float = 20) -> dict[str, Any]:
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(timeout):
            while True:
                found = await labelled(engine, task_id)
                if found and found[0]["State"]["Status"] == "running":
                    return found[0]
                await asyncio.sleep(0.1)
    raise AssertionError(f"no running container labelled {LABEL_TASK}={task_id} within {timeout}s")


def scheduler(settings: Settings) -> contextlib.AbstractAsyncContextManager[Scheduler]:
    return open_scheduler(settings, hardware=None)


# -- on each engine ----------------------------------------------------------------------


async def test_shell_cmd_output_and_labels_then_the_container_is_removed(
    engine: Engine, tmp_path: Path
) -> None:
    settings = settings_for(engine, tmp_path)
    task_id = unique_name("echo")
    result = await container_handler(
        ctx(settings, task_id, image=engine.images.busybox, cmd="echo out; echo err >&2")
    )
    assert result["exit_code"] == "0"
    assert result["stdout"] == "out\n" and result["stderr"] == "err\n"
    assert result["image"] == engine.images.busybox and len(result["container_id"]) >= 12
    assert await labelled(engine, task_id) == []


async def test_json_list_cmd_is_passed_without_a_shell(engine: Engine, tmp_path: Path) -> None:
    settings = settings_for(engine, tmp_path)
    result = await container_handler(
        ctx(settings, image=engine.images.busybox, cmd=json.dumps(["echo", "$HOME", "a  b"]))
    )
    assert result["stdout"] == "$HOME a  b\n"  # no shell: nothing expanded or split


async def test_long_output_keeps_only_the_tail(engine: Engine, tmp_path: Path) -> None:
    settings = settings_for(engine, tmp_path)
    # 20,000 lines (about 109 KB) through the engine's log stream.
    result = await container_handler(ctx(settings, image=engine.images.busybox, cmd="busybox seq 1 20000"))
    assert len(result["stdout"].encode()) == TAIL_BYTES
    assert result["stdout"].endswith("\n19999\n20000\n")


async def test_nonzero_exit_fails_with_the_stderr_tail(engine: Engine, tmp_path: Path) -> None:
    settings = settings_for(engine, tmp_path)
    task_id = unique_name("fail")
    with pytest.raises(ExecFailed) as info:
        await container_handler(
            ctx(
                settings,
                task_id,
                image=engine.images.busybox,
                cmd="echo partial; echo 'no such thing' >&2; exit 3",
            )
        )
    assert info.value.exit_code == 3
    assert "exited with 3" in str(info.value) and "no such thing" in str(info.value)
    assert info.value.result["stdout"] == "partial\n" and info.value.result["container_id"]
    assert await labelled(engine, task_id) == []


async def test_env_and_workdir_reach_the_process(engine: Engine, tmp_path: Path) -> None:
    settings = settings_for(engine, tmp_path)
    result = await container_handler(
        ctx(
            settings,
            image=engine.images.busybox,
            cmd='echo "$GREETING"; pwd',
            env=json.dumps({"GREETING": "hi there"}),
            workdir="/www",
        )
    )
    assert result["stdout"] == "hi there\n/www\n"


async def test_network_none_by_default_and_bridge_on_request(engine: Engine, tmp_path: Path) -> None:
    settings = settings_for(engine, tmp_path)
    isolated = await container_handler(ctx(settings, image=engine.images.busybox, cmd="ls /sys/class/net"))
    assert isolated["stdout"].split() == ["lo"]
    bridged = await container_handler(
        ctx(settings, image=engine.images.busybox, cmd="ls /sys/class/net", network="bridge")
    )
    assert "lo" in bridged["stdout"].split() and len(bridged["stdout"].split()) >= 2


async def test_a_task_on_the_services_network_reaches_a_service_by_name(
    engine: Engine, tmp_path: Path
) -> None:
    settings = settings_for(engine, tmp_path)
    network = unique_name("net")
    backend = DockerBackend(attrs.evolve(settings, network=network))
    async with backend:
        web = ServiceSpec(
            name="web", image=engine.images.busybox, command=("httpd", "-f", "-p", "8080", "-h", "/www")
        )
        service = await backend.run(
            web, instance_name=unique_name("web"), labels={LABEL_OWNER: settings.resolved_owner()}
        )
        try:
            result = await container_handler(
                ctx(
                    settings,
                    image=engine.images.busybox,
                    network=network,
                    # Retry briefly: httpd may still be binding its port.
                    cmd="for i in 1 2 3 4 5 6 7 8 9 10; do wget -q -O - http://web:8080/ && exit 0; sleep 0.3; done; exit 1",
                )
            )
            assert result["stdout"] == "ok\n"
        finally:
            await backend.remove(service.id)
            with contextlib.suppress(aiodocker.DockerError):
                await (await backend.docker.networks.get(network)).delete()


async def test_pull_never_with_an_absent_image_is_permanent_naming_the_field(
    engine: Engine, tmp_path: Path
) -> None:
    settings = settings_for(engine, tmp_path)
    with pytest.raises(PermanentFailure, match=r"payload\.image: .*'never'.*fix:"):
        await container_handler(
            ctx(settings, image=f"dspy-infra-test/absent:{unique_name('x')}", pull="never")
        )


async def test_an_image_that_cannot_be_pulled_is_an_ordinary_failure_naming_the_field(
    engine: Engine, tmp_path: Path
) -> None:
    settings = settings_for(engine, tmp_path)
    with pytest.raises(BackendError) as info:
        await container_handler(ctx(settings, image=f"dspy-infra-test/absent:{unique_name('x')}"))
    # Not permanent: engines report an unreachable registry as "not found" too.
    assert not isinstance(info.value, PermanentFailure)
    assert info.value.field == "payload.image" and "fix:" in str(info.value)


async def test_pull_policies_against_the_local_registry(
    engine: Engine, registry: str, tmp_path: Path
) -> None:
    settings = settings_for(engine, tmp_path)
    repo = f"{registry}/dspy-infra-test/ct-{unique_name('pull')}"
    ref = f"{repo}:v1"
    built: list[str] = []

    async def publish(marker: bytes) -> None:
        # An image from the busybox one plus a marker file, pushed, then dropped locally.
        context, _ = build_context(f"FROM {engine.images.busybox}\nCOPY marker /marker\n", {"marker": marker})
        async with aiodocker.Docker(url=engine.host) as docker:
            await docker.images.build(fileobj=io.BytesIO(context), encoding="identity", tag=ref, rm=True)
            await docker.images.push(repo, tag="v1", auth={})
            built.append((await docker.images.inspect(ref))["Id"])

    async def marker(pull: str) -> str:
        result = await container_handler(ctx(settings, image=ref, cmd="cat /marker", pull=pull))
        return result["stdout"]

    try:
        await publish(b"one")
        async with aiodocker.Docker(url=engine.host) as docker:
            await docker.images.delete(ref, force=True)
        assert await marker("missing") == "one\n"  # absent, so pulled
        async with aiodocker.Docker(url=engine.host) as docker:
            first = (await docker.images.inspect(ref))["Id"]
        await publish(b"two")  # the registry now holds "two" ...
        async with aiodocker.Docker(url=engine.host) as docker:
            await docker.images.tag(first, repo, tag="v1")  # ... and the engine "one" again
        assert await marker("missing") == "one\n"  # present: not pulled
        assert await marker("never") == "one\n"
        assert await marker("always") == "two\n"  # pulled the registry's newer image
    finally:
        async with aiodocker.Docker(url=engine.host) as docker:
            for image in [ref, *built]:  # the tag, then the images it pointed at
                with contextlib.suppress(aiodocker.DockerError):
                    await docker.images.delete(image, force=True)


async def test_a_task_through_the_scheduler(engine: Engine, tmp_path: Path) -> None:
    settings = settings_for(engine, tmp_path)
    async with scheduler(settings) as sched:
        payload = {"handler": "container", "image": engine.images.busybox, "cmd": "echo from-a-task"}
        await sched.submit(TaskSpec("ct", payload=payload))
        result = await sched.wait("ct", timeout=60)
    assert result.status is TaskStatus.COMPLETED, result.error
    assert result.result["stdout"] == "from-a-task\n" and result.result["exit_code"] == "0"


async def test_a_scheduler_opens_one_backend_per_engine_and_network_and_closes_it(
    engine: Engine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    opened: list[DockerBackend] = []
    real_open = DockerBackend.open

    async def counting_open(self: DockerBackend) -> None:  # a spy: the real open runs
        opened.append(self)
        await real_open(self)

    monkeypatch.setattr(DockerBackend, "open", counting_open)
    settings = settings_for(engine, tmp_path)
    async with scheduler(settings) as sched:
        for i, network in enumerate(("none", "none", "none", "bridge")):
            payload = {
                "handler": "container",
                "image": engine.images.busybox,
                "cmd": "true",
                "network": network,
            }
            await sched.submit(TaskSpec(f"c{i}", payload=payload))
        for i in range(4):
            assert (await sched.wait(f"c{i}", timeout=60)).status is TaskStatus.COMPLETED
        assert sorted(b.network for b in opened) == ["bridge", "none"]
        assert all(_is_open(b) for b in opened)  # kept open for the next attempt
    assert not any(_is_open(b) for b in opened)  # closed with the scheduler


async def test_a_later_attempt_removes_leftovers_of_dead_owners_only(engine: Engine, tmp_path: Path) -> None:
    settings = settings_for(engine, tmp_path)
    task_id = unique_name("again")
    proc = await asyncio.create_subprocess_exec("true")  # its pid: a process that has exited
    await proc.wait()
    backend = DockerBackend(attrs.evolve(settings, network="none"))
    async with backend:
        leftovers = {}
        # "reused": our pid, but another start time, as when a dead owner's pid is reused.
        owners = (("dead", proc.pid, ""), ("live", os.getpid(), ""), ("reused", os.getpid(), "1"))
        for who, pid, started in owners:
            spec = container_task(task_id, {"image": engine.images.busybox, "cmd": "sleep 60"}).spec
            labels = {
                LABEL_OWNER: settings.resolved_owner(),
                LABEL_OWNER_PID: str(pid),
                LABEL_OWNER_STARTED: started,
                LABEL_TASK: task_id,
            }
            leftovers[who] = (await backend.run(spec, instance_name=spec.name, labels=labels)).id
        try:
            # A first attempt leaves them alone; a later one removes the dead owner's only.
            await container_handler(ctx(settings, task_id, image=engine.images.busybox, cmd="true"))
            assert {c["Id"] for c in await labelled(engine, task_id)} == set(leftovers.values())
            retry = TaskContext(
                spec=TaskSpec(task_id, payload={"image": engine.images.busybox, "cmd": "true"}),
                attempt=2,
                settings=settings,
            )
            await container_handler(retry)
            assert [c["Id"] for c in await labelled(engine, task_id)] == [leftovers["live"]]
        finally:
            for container_id in leftovers.values():
                await backend.remove(container_id)


async def test_timeout_removes_the_running_container(engine: Engine, tmp_path: Path) -> None:
    settings = settings_for(engine, tmp_path)
    task_id = unique_name("slow")
    async with scheduler(settings) as sched:
        payload = {"handler": "container", "image": engine.images.busybox, "cmd": "sleep 60"}
        await sched.submit(TaskSpec(task_id, payload=payload, timeout=4))
        seen = await until_labelled(engine, task_id)
        assert seen["Config"]["Labels"][LABEL_OWNER] == settings.resolved_owner()
        result = await sched.wait(task_id, timeout=60)
    assert result.status is TaskStatus.FAILED and "timed out after 4s" in result.error
    assert await labelled(engine, task_id) == []


async def test_cancel_removes_the_running_container(engine: Engine, tmp_path: Path) -> None:
    settings = settings_for(engine, tmp_path)
    task_id = unique_name("cancel")
    async with scheduler(settings) as sched:
        payload = {"handler": "container", "image": engine.images.busybox, "cmd": "sleep 60"}
        await sched.submit(TaskSpec(task_id, payload=payload))
        await until_labelled(engine, task_id)
        await sched.cancel(task_id)
        result = await sched.wait(task_id, timeout=60)
        assert result.status is TaskStatus.CANCELLED
        # The removal ran (shielded) before the handler gave the cancellation back.
        assert await labelled(engine, task_id) == []


# -- without an engine ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        ({}, "payload.image: missing"),
        ({"image": "bad image"}, "payload.image"),
        ({"image": "busybox", "cmd": "[not json"}, "payload.cmd"),
        ({"image": "busybox", "cmd": "[]"}, "payload.cmd"),
        ({"image": "busybox", "cmd": "[1, 2]"}, "payload.cmd"),
        ({"image": "busybox", "env": "[]"}, "payload.env"),
        ({"image": "busybox", "env": '{"A": 1}'}, "payload.env"),
        ({"image": "busybox", "env": '{"A=B": "c"}'}, "payload.env"),
        ({"image": "busybox", "env": '{"A": "b\\u0000c"}'}, "payload.env"),
        ({"image": "busybox", "workdir": "relative/dir"}, "payload.workdir"),
        ({"image": "busybox", "network": "no such net!"}, "payload.network"),
        ({"image": "busybox", "pull": "sometimes"}, "payload.pull"),
    ],
)
async def test_bad_payloads_are_permanent_failures_naming_the_field(
    payload: dict[str, str], message: str
) -> None:
    # No engine is contacted: a dead address would fail differently (not permanently).
    settings = Settings(docker_host="unix:///nonexistent/engine.sock")
    with pytest.raises(PermanentFailure) as info:
        await container_handler(ctx(settings, **payload))
    assert message in str(info.value) and "fix:" in str(info.value)


async def test_an_unreachable_engine_is_an_ordinary_failure_naming_docker_host(tmp_path: Path) -> None:
    settings = Settings(docker_host=f"unix://{tmp_path}/no-engine.sock")
    with pytest.raises(Exception) as info:
        await container_handler(ctx(settings, image="busybox"))
    assert not isinstance(info.value, PermanentFailure)
    assert "docker_host" in str(info.value)


def test_container_is_registered_as_a_built_in_handler() -> None:
    pm = build_plugin_manager(load_entry_points=False)
    assert collect_mapping(pm.hook.dspy_infra_handlers())["container"] is container_handler


# -- properties ----------------------------------------------------------------------------


@given(st.text(min_size=1, max_size=200).filter(str.strip))
def test_every_task_id_gives_a_valid_unique_container_name(task_id: str) -> None:
    first = container_task(task_id, {"image": "busybox"}).spec.name
    second = container_task(task_id, {"image": "busybox"}).spec.name
    validate_name(first, "name")  # raises if an engine could refuse it
    assert first != second  # retries and overlapping runs never collide


@given(st.lists(st.text(), min_size=1, max_size=8))
def test_a_json_list_cmd_is_the_exact_argv(args: list[str]) -> None:
    assert container_task("t", {"image": "i", "cmd": json.dumps(args)}).spec.command == tuple(args)


@given(st.text(min_size=1).filter(lambda s: s.strip() and not s.lstrip().startswith("[")))
def test_any_other_cmd_runs_through_the_shell_unchanged(cmd: str) -> None:
    assert container_task("t", {"image": "i", "cmd": cmd}).spec.command == ("/bin/sh", "-c", cmd)


@given(
    st.dictionaries(
        st.text(min_size=1).filter(lambda k: "=" not in k and "\0" not in k),
        st.text().filter(lambda v: "\0" not in v),
        max_size=5,
    )
)
def test_env_reaches_the_spec_unchanged(env: dict[str, str]) -> None:
    assert container_task("t", {"image": "i", "env": json.dumps(env)}).spec.environment == env


@given(
    st.text(min_size=1, max_size=50),
    st.dictionaries(container_fields, st.one_of(st.text(), st.text(alphabet='{}[]":,=/ abc-_.'))),
)
def test_any_payload_is_either_a_container_task_or_a_permanent_failure_naming_a_field(
    task_id: str, payload: dict[str, str]
) -> None:
    try:
        task = container_task(task_id, payload)
    except PermanentFailure as exc:
        assert str(exc).startswith("payload.") and "fix:" in str(exc)
    else:
        assert task.spec.image == payload["image"].strip() and task.pull in ("missing", "always", "never")
        assert task.spec.workdir is None or task.spec.workdir.startswith("/")
