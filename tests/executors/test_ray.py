"""The ``ray`` executor against the real two-node Ray cluster of ``bash scripts/ray.sh start``
(head with the custom resource ``head``, a second raylet with ``worker2``).

Every task goes through the real Scheduler to the executor's real runner actors;
the SIGKILL test kills a real owner process mid-task and lets a new one adopt the attempt;
the node-loss test starts a private third raylet, SIGKILLs it mid-task and starts another.
Config refusals, the journal and the capacity arithmetic need no cluster.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest
from adoption import RAY_ADDRESS, adoption_round, wait_for_text
from harness import open_scheduler
from hypothesis import given, settings
from strategies import ray_demands, runner_calls

from dspy_infra.config import load_settings
from dspy_infra.errors import ConfigError, ResourceUnavailable, Unavailable
from dspy_infra.executors import ray as ray_executor
from dspy_infra.executors.journal import HandleJournal, RemoteHandle
from dspy_infra.executors.ray import RayClassOptions, RayExecutor, fitting_attempts, ray_classes
from dspy_infra.executors.ray_remote import AttemptRunner
from dspy_infra.models import TaskResult, TaskSpec, TaskState, TaskStatus
from dspy_infra.ownership import end_leftover_attempts, pid_alive
from dspy_infra.scheduler.context import TaskContext
from dspy_infra.scheduler.scheduler import Scheduler
from dspy_infra.scheduler.task_logs import log_root, read_task_log

HERE = Path(__file__).resolve().parent
#: Workers import ``ray_probe`` from this directory.
PROBE_ENV = {"env_vars": {"PYTHONPATH": str(HERE)}}


def ray_settings(tmp_path: Path, namespace: str, **classes: dict[str, Any]) -> dict[str, Any]:
    """Settings overrides for a scheduler whose classes NAME=ray_options run on the cluster."""
    return {
        "ray_address": RAY_ADDRESS,
        "ray_namespace": namespace,
        "task_classes": {name: {"executor": "ray", "max_concurrency": 4} for name in classes},
        "ray_classes": {name: opts for name, opts in classes.items() if opts},
        "shutdown_grace": 0.5,
    }


@pytest.fixture
def namespace(ray_cluster: str) -> Iterator[str]:
    """A Ray namespace of the test's own; its named runners are killed afterwards (detached
    ones left running would outlive the test)."""
    name = f"dspy-test-{uuid.uuid4().hex[:10]}"
    yield name
    import ray

    if not ray.is_initialized():  # the test's owners were other processes
        ray.init(address=RAY_ADDRESS, log_to_driver=False, configure_logging=False)
    for actor in ray.util.list_named_actors(all_namespaces=True):
        if actor["namespace"] == name:
            with contextlib.suppress(Exception):
                ray.kill(ray.get_actor(actor["name"], namespace=name))


@contextlib.asynccontextmanager
async def ray_scheduler(
    tmp_path: Path, namespace: str, **classes: dict[str, Any]
) -> AsyncIterator[Scheduler]:
    async with open_scheduler(tmp_path, durable=False, **ray_settings(tmp_path, namespace, **classes)) as s:
        yield s


def exec_task(task_id: str, task_class: str, cmd: str, **spec: Any) -> TaskSpec:
    return TaskSpec(task_id, task_class=task_class, payload={"cmd": cmd}, **spec)


async def _gone(pid: int, timeout: float = 30) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not pid_alive(pid):
            return True
        await anyio.sleep(0.1)
    return False


def _node_with(resource: str) -> str:
    import ray

    ids = [n["NodeID"] for n in ray.nodes() if n["Alive"] and resource in n["Resources"]]
    assert len(ids) == 1, ids
    return str(ids[0])


# -- without a cluster --------------------------------------------------------------------


async def test_without_ray_the_executor_is_refused_at_start_naming_the_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(ray_executor, "_ray_installed", lambda: False)
    with pytest.raises(ConfigError) as caught:
        async with open_scheduler(
            tmp_path, task_classes={"train": {"executor": "ray", "max_concurrency": 2}}
        ):
            pass
    assert caught.value.field == "task_classes.train.executor"
    assert "pip install 'dspy-infra[ray]'" in str(caught.value)


async def test_the_built_in_ray_class_is_refused_at_submit_until_ray_address_is_set(tmp_path: Path) -> None:
    async with open_scheduler(tmp_path) as sched:
        with pytest.raises(ResourceUnavailable) as caught:
            await sched.submit(TaskSpec("solo", task_class="ray", payload={"cmd": "true"}))
    assert caught.value.field == "task_class"
    assert "no Ray executor configured for class 'ray'" in str(caught.value)
    assert "ray_address" in str(caught.value) and "dspy-infra[ray]" in str(caught.value)


async def test_ray_address_without_ray_installed_is_refused_at_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(ray_executor, "_ray_installed", lambda: False)
    with pytest.raises(ConfigError) as caught:
        async with open_scheduler(tmp_path, ray_address="127.0.0.1:26379"):
            pass
    assert caught.value.field == "ray_address" and "pip install 'dspy-infra[ray]'" in str(caught.value)


def test_the_built_in_ray_class_takes_options_once_ray_is_configured() -> None:
    settings = load_settings(env={}, ray_address="h:1", ray_classes={"ray": {"num_gpus": 1}})
    assert ray_classes(settings)["ray"].num_gpus == 1.0
    with pytest.raises(ConfigError) as caught:
        ray_classes(load_settings(env={}, ray_classes={"ray": {"num_gpus": 1}}))
    assert caught.value.field == "ray_classes.ray" and "ray_address" in str(caught.value)
    # A config that moves the name `ray` to a local class keeps it local.
    assert (
        ray_classes(load_settings(env={}, ray_address="h:1", task_classes={"ray": {"executor": "local"}}))
        == {}
    )


@pytest.mark.parametrize(
    ("address", "error", "text"),
    [("127.0.0.1:1", Unavailable, "nothing answers at 127.0.0.1:1"), ("head-node", ConfigError, "HOST:PORT")],
)
async def test_an_address_nothing_answers_at_is_refused_at_once(
    tmp_path: Path, address: str, error: type[Exception], text: str
) -> None:
    # ray.init would retry such an address for minutes; the executor refuses it at start.
    if importlib.util.find_spec("ray") is None:
        pytest.skip("needs Ray installed (the address is checked only where Ray could connect)")
    code = (
        "import asyncio, sys\n"
        "from dspy_infra.config import load_settings\n"
        "from dspy_infra.executors.ray import RayExecutor, ray_classes\n"
        "async def main():\n"
        f"    s = load_settings(env={{}}, home={str(tmp_path)!r}, ray_address={address!r},\n"
        "        task_classes={'r': {'executor': 'ray', 'max_concurrency': 1}})\n"
        "    try:\n"
        "        async with RayExecutor(s, ray_classes(s)):\n"
        "            pass\n"
        "    except Exception as exc:\n"
        "        print(type(exc).__name__, exc)\n"
        "asyncio.run(main())\n"
    )
    started = time.monotonic()
    done = await asyncio.to_thread(
        subprocess.run, [sys.executable, "-c", code], capture_output=True, text=True, timeout=120
    )
    assert done.stdout.startswith(error.__name__), done.stdout + done.stderr[-2000:]
    assert "ray_address" in done.stdout and text in done.stdout
    assert time.monotonic() - started < 60


def test_ray_options_for_a_class_not_on_ray_are_refused() -> None:
    settings = load_settings(env={}, ray_classes={"cpu_long": {"num_cpus": 1}})
    with pytest.raises(ConfigError) as caught:
        ray_classes(settings)
    assert caught.value.field == "ray_classes.cpu_long" and 'executor = "ray"' in str(caught.value)


@pytest.mark.parametrize(
    ("table", "field", "fix"),
    [
        ({"num_cpu": 1}, "ray_classes.t.num_cpu", "num_cpus"),
        ({"num_cpus": -1}, "ray_classes.t.num_cpus", "e.g. 1"),
        ({"num_gpus": "1"}, "ray_classes.t.num_gpus", "e.g. 1"),
        ({"num_cpus": float("nan")}, "ray_classes.t.num_cpus", "e.g. 1"),
        ({"resources": {"worker2": True}}, "ray_classes.t.resources.worker2", "e.g. 1"),
        ({"resources": {"CPU": 1}}, "ray_classes.t.resources", "num_cpus"),
        ({"resources": 3}, "ray_classes.t.resources", "worker2"),
        ({"runtime_env": "pip"}, "ray_classes.t.runtime_env", "env_vars"),
        ({"namespace": ""}, "ray_classes.t.namespace", "namespace ="),
        ({"idle_timeout": 0.5}, "ray_classes.t.idle_timeout", "idle_timeout = 60"),
        ({"idle_timeout": "60"}, "ray_classes.t.idle_timeout", "idle_timeout = 60"),
        ({"idle_timeout": float("inf")}, "ray_classes.t.idle_timeout", "idle_timeout = 60"),
        ({"idle_timeout": 10**400}, "ray_classes.t.idle_timeout", "idle_timeout = 60"),
        ({"num_cpus": 10**400}, "ray_classes.t.num_cpus", "e.g. 1"),
    ],
)
def test_bad_ray_options_are_refused_naming_the_field(table: dict[str, Any], field: str, fix: str) -> None:
    settings = load_settings(
        env={}, task_classes={"t": {"executor": "ray", "max_concurrency": 1}}, ray_classes={"t": table}
    )
    with pytest.raises(ConfigError) as caught:
        ray_classes(settings)
    assert caught.value.field == field and fix in str(caught.value)


def test_ray_options_map_to_the_runner_options_and_demand() -> None:
    settings = load_settings(
        env={},
        ray_namespace="ns",
        task_classes={"t": {"executor": "ray", "max_concurrency": 1}},
        ray_classes={
            "t": {"num_gpus": 1, "resources": {"worker2": 0.5}, "runtime_env": PROBE_ENV, "idle_timeout": 5}
        },
    )
    options = ray_classes(settings)["t"]
    assert options.idle_timeout == 5.0
    assert ray_classes(load_settings(env={}, ray_address=RAY_ADDRESS))["ray"].idle_timeout == 60.0
    assert options.actor_options() == {
        "num_cpus": 1.0,
        "num_gpus": 1.0,
        "resources": {"worker2": 0.5},
        "runtime_env": PROBE_ENV,
    }
    assert options.demand() == {"CPU": 1.0, "GPU": 1.0, "worker2": 0.5}
    assert options.namespace == "ns"


@given(ray_demands, ray_demands)
def test_fitting_attempts_is_the_largest_count_that_fits(
    demand: dict[str, float], free: dict[str, float]
) -> None:
    fits = fitting_attempts(demand, free)
    if not demand:
        assert fits is None
        return
    assert fits is not None and fits >= 0
    for name, amount in demand.items():
        assert fits * amount <= free.get(name, 0.0) + 1e-3
    assert any((fits + 1) * amount > free.get(name, 0.0) for name, amount in demand.items())


@settings(deadline=None)  # asyncio.run per example: no per-example time limit on a loaded machine
@given(runner_calls)
def test_a_runner_starts_each_task_at_most_once_until_its_outcome_is_dropped(
    calls: list[tuple[str, int, int]],
) -> None:
    # The runner (in process: its attempt logic needs no cluster) against a model of what
    # it holds: a call for a task it holds adopts that attempt's outcome, never starting
    # another; only a dropped (collected, or retried) outcome lets the task start again.
    import ray_probe

    async def scenario() -> None:
        runner = AttemptRunner(idle_timeout=3600.0, keep=True)
        held: dict[str, int] = {}  # task id -> attempt held (the model)
        expected: list[tuple[str, int]] = []
        ray_probe.STARTED.clear()
        for what, index, attempt in calls:
            task_id, key = f"t{index}", f"scope:t{index}:{attempt}"
            if what == "collect":
                await runner.collect([(task_id, f"scope:{task_id}:{held.get(task_id)}")])
                held.pop(task_id, None)
                continue
            drop = None
            if what == "retry" and task_id in held:
                drop = f"scope:{task_id}:{held.pop(task_id)}"
            call = None
            if what != "adopt":
                call = {
                    "handler": "ray_probe:count",
                    "task_id": task_id,
                    "task_class": "c",
                    "payload": {},
                    "attempt": attempt,
                    "exec_policy": "allow",
                }
            outcome = await runner.run(task_id, key, call, drop)
            if task_id in held:
                assert outcome["result"] == {"attempt": held[task_id]}
                assert ("adopted" in outcome) == (held[task_id] != attempt)
            elif call is None:
                assert outcome == {"status": "unknown"}
            else:
                assert outcome == {"status": "ended", "ok": True, "result": {"attempt": attempt}}
                held[task_id] = attempt
                expected.append((task_id, attempt))
        assert ray_probe.STARTED == expected
        assert sorted((t, k) for t, k, _ in await runner.held()) == sorted(
            (t, f"scope:{t}:{a}") for t, a in held.items()
        )

    asyncio.run(scenario())


def test_handles_survive_the_start_that_ends_leftover_local_attempts(tmp_path: Path) -> None:
    journal = HandleJournal(tmp_path)
    handle = RemoteHandle("ray", "t/1", 3, {"namespace": "n", "key": "k"})
    journal.write(handle)
    end_leftover_attempts(tmp_path, ["t/1"], grace=0.1)
    assert journal.read("t/1") == handle
    # A damaged file or one naming another task is no handle (never adopted by mistake).
    journal.path_for("t/2").write_text('{"executor": "ray", "task_id": "other"}')
    assert journal.read("t/2") is None
    journal.path_for("t/2").write_text("{")
    assert journal.read("t/2") is None
    journal.remove("t/1")
    assert journal.read("t/1") is None


# -- on the real cluster ------------------------------------------------------------------


async def test_exec_on_ray_gives_the_result_a_local_exec_gives(tmp_path: Path, namespace: str) -> None:
    cmd = "printf 'out\\n'; printf 'err\\n' >&2; exit 0"
    async with ray_scheduler(tmp_path, namespace, on_ray={"num_cpus": 0.5}) as sched:
        await sched.submit(TaskSpec("remote", task_class="on_ray", payload={"cmd": cmd}))
        await sched.submit(TaskSpec("local", task_class="cpu_short", payload={"handler": "exec", "cmd": cmd}))
        await sched.submit(TaskSpec("fails", task_class="on_ray", payload={"cmd": "echo bad >&2; exit 3"}))
        remote = await sched.wait("remote", timeout=120)
        local = await sched.wait("local", timeout=60)
        failed = await sched.wait("fails", timeout=120)
        # The task log comes back with the outcome and is kept where a local one is.
        root = log_root(sched.settings)
        logs = {task: read_task_log(root, task, 1) for task in ("remote", "local", "fails")}
    # stdout and stderr are two pipes: the log interleaves them as they arrived, so which line
    # comes first is a race on either side; each run's log holds both lines, whole.
    assert sorted(logs["remote"].splitlines()) == sorted(logs["local"].splitlines()) == ["err", "out"]
    assert logs["remote"].endswith("\n") and logs["local"].endswith("\n")
    assert logs["fails"] == "bad\n"
    assert remote.status is TaskStatus.COMPLETED, remote.error
    assert remote.result == local.result == {"exit_code": 0, "stdout": "out\n", "stderr": "err\n"}
    assert failed.status is TaskStatus.FAILED
    assert failed.error == "command exited with 3: bad" and failed.result["exit_code"] == 3


async def test_one_task_runs_on_ray_through_the_built_in_class(tmp_path: Path, namespace: str) -> None:
    # No class of one's own: ray_address alone, and task_class="ray". The command's parent
    # is the class's runner, a Ray actor process (its title is "ray::AttemptRunner...").
    settings = {"ray_address": RAY_ADDRESS, "ray_namespace": namespace, "shutdown_grace": 0.5}
    async with open_scheduler(tmp_path, durable=True, **settings) as sched:
        await sched.submit(
            TaskSpec("solo", task_class="ray", payload={"cmd": "tr -d '\\0' < /proc/$PPID/cmdline"})
        )
        result = await sched.wait("solo", timeout=120)
    assert result.status is TaskStatus.COMPLETED, result.error
    assert result.result["stdout"].startswith("ray::AttemptRunner"), result.result


async def test_a_task_pinned_by_a_custom_resource_runs_on_that_node(tmp_path: Path, namespace: str) -> None:
    async with ray_scheduler(
        tmp_path,
        namespace,
        on_worker2={"num_cpus": 0, "resources": {"worker2": 0.01}, "runtime_env": PROBE_ENV},
        on_head={"num_cpus": 0, "resources": {"head": 0.01}, "runtime_env": PROBE_ENV},
    ) as sched:
        for cls in ("on_worker2", "on_head"):
            await sched.submit(TaskSpec(cls, task_class=cls, payload={"handler": "ray_probe:where"}))
        second = await sched.wait("on_worker2", timeout=180)
        head = await sched.wait("on_head", timeout=180)
    assert second.status is TaskStatus.COMPLETED, second.error
    assert head.status is TaskStatus.COMPLETED, head.error
    assert second.result["node_id"] == _node_with("worker2")
    assert head.result["node_id"] == _node_with("head")
    assert second.result["node_id"] != head.result["node_id"]


async def test_cancel_ends_the_remote_command_and_its_process(tmp_path: Path, namespace: str) -> None:
    pid_file = tmp_path / "pid"
    async with ray_scheduler(tmp_path, namespace, on_ray={"num_cpus": 0}) as sched:
        await sched.submit(
            TaskSpec("long", task_class="on_ray", payload={"cmd": f"echo $$ > {pid_file}; exec sleep 300"})
        )
        pid = int(await wait_for_text(pid_file))
        assert pid_alive(pid)
        await sched.cancel("long")
        result = await sched.wait("long", timeout=60)
    assert result.status is TaskStatus.CANCELLED
    assert await _gone(pid), f"the command (pid {pid}) outlived its cancelled attempt"


async def test_timeout_fails_the_task_and_ends_the_remote_command(tmp_path: Path, namespace: str) -> None:
    pid_file = tmp_path / "pid"
    async with ray_scheduler(tmp_path, namespace, on_ray={"num_cpus": 0}) as sched:
        # The timeout also covers starting the attempt on the cluster (slow on a loaded machine).
        await sched.submit(exec_task("slow", "on_ray", f"echo $$ > {pid_file}; exec sleep 300", timeout=20.0))
        pid = int(await wait_for_text(pid_file))
        result = await sched.wait("slow", timeout=90)
    assert result.status is TaskStatus.FAILED and "timed out after 20s" in result.error
    assert await _gone(pid)


async def test_the_adaptive_limit_is_bounded_by_what_the_cluster_has_free(
    tmp_path: Path, namespace: str
) -> None:
    settings = load_settings(env={}, home=tmp_path, durable=False, **ray_settings(tmp_path, namespace, w2={}))
    # One worker2 unit in the whole cluster: at most one attempt of a class needing all of it.
    classes = {"w2": RayClassOptions(namespace=namespace, num_cpus=0, resources={"worker2": 1})}
    async with RayExecutor(settings, classes, capacity_interval=0.2) as executor:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if executor.capacity("w2") is not None:
                break
            await anyio.sleep(0.1)
        assert executor.capacity("w2") == 1
        assert executor.capacity("not_a_ray_class") is None


async def test_the_scheduler_keeps_a_ray_class_s_limit_within_the_cluster(
    tmp_path: Path, namespace: str
) -> None:
    # The class may adapt up to 8 and starts at 4, but the cluster has one worker2 unit and
    # each attempt needs all of it: the sampled limit drops to what the cluster can hold.
    settings = ray_settings(tmp_path, namespace, w2={"num_cpus": 0, "resources": {"worker2": 1}})
    settings["task_classes"]["w2"].update(base_concurrency=4, max_concurrency=8)
    async with open_scheduler(tmp_path, durable=False, limiter_interval=0.2, **settings) as sched:
        assert sched.queue_status()["w2"].limit == 4
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if sched.queue_status()["w2"].limit == 1:
                break
            await anyio.sleep(0.2)
        assert sched.queue_status()["w2"].limit == 1


async def test_ray_calls_never_block_the_event_loop(tmp_path: Path, namespace: str) -> None:
    # Connecting, creating a detached named runner and fsyncing the attempt all happen while
    # a watchdog ticks; blocking calls on the loop (ray.init, ray.get) showed gaps of seconds.
    gaps: list[float] = []

    async def watchdog() -> None:
        last = time.monotonic()
        while True:
            await anyio.sleep(0.02)
            now = time.monotonic()
            gaps.append(now - last)
            last = now

    settings = ray_settings(tmp_path, namespace, on_ray={"num_cpus": 0})
    async with anyio.create_task_group() as tg:
        tg.start_soon(watchdog)
        async with open_scheduler(tmp_path, durable=True, **settings) as sched:
            await sched.submit(
                TaskSpec("w", task_class="on_ray", payload={"handler": "sleep", "seconds": 0.2})
            )
            result = await sched.wait("w", timeout=120)
        tg.cancel_scope.cancel()
    assert result.status is TaskStatus.COMPLETED, result.error
    # Generous for a loaded 2-core machine; the bug this guards against blocks for seconds.
    assert max(gaps) < 1.0, f"the loop stalled for {max(gaps):.2f}s"


@pytest.mark.parametrize("restart", ["while_running", "after_it_ended"])
async def test_a_sigkilled_owner_s_attempt_is_adopted_and_runs_once(
    tmp_path: Path, namespace: str, restart: str
) -> None:
    # while_running: the new owner watches the same attempt to its end; after_it_ended: the
    # runner kept the outcome for it. Either way the command ran once.
    runs, ended = tmp_path / "runs", tmp_path / "ended"
    settings = {"home": str(tmp_path / "home"), **ray_settings(tmp_path, namespace, on_ray={"num_cpus": 0})}
    task = {
        "id": "long/job",
        "task_class": "on_ray",
        "payload": {"cmd": f"echo run >> {runs}; sleep 6; echo finished; echo yes > {ended}"},
    }
    await adoption_round(settings, task, runs, ended=ended if restart == "after_it_ended" else None)


@pytest.mark.parametrize("restart", ["while_running", "after_it_ended"])
async def test_a_graceful_stop_leaves_the_attempt_to_the_next_start(
    tmp_path: Path, namespace: str, restart: str
) -> None:
    # A durable scheduler stops (a deploy) mid-attempt: the attempt runs on under its runner,
    # and the next start adopts it (or collects its outcome). Runs once.
    # The command runs until the test creates `go`, so "still running" does not depend on
    # how fast the stop and the restart are.
    runs, ended, go = tmp_path / "runs", tmp_path / "ended", tmp_path / "go"
    settings = ray_settings(tmp_path, namespace, on_ray={"num_cpus": 0})
    cmd = f"echo run >> {runs}; while [ ! -e {go} ]; do sleep 0.2; done; echo finished; echo yes > {ended}"
    async with open_scheduler(tmp_path, durable=True, **settings) as sched:
        await sched.submit(exec_task("train/deploy", "on_ray", cmd))
        await wait_for_text(runs, timeout=120)
    assert not ended.exists(), "the attempt was not running when the owner stopped"
    if restart == "after_it_ended":
        go.touch()
        await wait_for_text(ended, timeout=60)
    async with open_scheduler(tmp_path, durable=True, **settings) as sched:
        if restart == "while_running":
            with anyio.fail_after(120):  # the next start's attempt has taken the command over
                while True:
                    current = await sched.get("train/deploy")
                    if current.status is TaskStatus.RUNNING and current.attempts == 2:
                        break
                    await anyio.sleep(0.1)
            assert not ended.exists()
            go.touch()
        result = await sched.wait("train/deploy", timeout=120)
        state = await sched.get("train/deploy")
    assert result.status is TaskStatus.COMPLETED, result.error
    assert result.result["stdout"] == "finished\n"
    assert runs.read_text() == "run\n", "the attempt ran more than once"
    assert state.attempts == 2  # the interrupted attempt, then the one that adopted it


async def test_a_task_cancelled_before_it_adopted_its_left_attempt_ends_it(
    tmp_path: Path, namespace: str
) -> None:
    # A graceful stop left two attempts; at the next start the one slot goes to the higher
    # priority task, so "left" waits in the queue, not yet adopted: cancelling it there
    # still ends its command.
    settings = ray_settings(tmp_path, namespace, on_ray={"num_cpus": 0})
    pids = {name: tmp_path / f"{name}.pid" for name in ("left", "first")}
    width = {"min_concurrency": 1, "base_concurrency": 2, "max_concurrency": 2, "adaptive": False}
    settings["task_classes"]["on_ray"] = {"executor": "ray", **width}
    async with open_scheduler(tmp_path, durable=True, **settings) as sched:
        await sched.submit(exec_task("left", "on_ray", f"echo $$ > {pids['left']}; exec sleep 300"))
        await sched.submit(
            exec_task("first", "on_ray", f"echo $$ > {pids['first']}; exec sleep 300", priority=10)
        )
        left, first = [int(await wait_for_text(pids[name], timeout=120)) for name in ("left", "first")]
    settings["task_classes"]["on_ray"].update(base_concurrency=1, max_concurrency=1)
    async with open_scheduler(tmp_path, durable=True, **settings) as sched:
        assert (await sched.get("left")).status is TaskStatus.PENDING
        assert (await sched.cancel("left")).status is TaskStatus.CANCELLED
        assert await _gone(left), "the left attempt outlived the cancel of its task"
        assert pid_alive(first)
        await sched.cancel("first")
    assert await _gone(first)


async def test_on_shutdown_cancel_ends_the_attempt_at_a_graceful_stop(tmp_path: Path, namespace: str) -> None:
    pid_file = tmp_path / "pid"
    settings = ray_settings(tmp_path, namespace, on_ray={"num_cpus": 0})
    settings["task_classes"]["on_ray"]["on_shutdown"] = "cancel"
    async with open_scheduler(tmp_path, durable=True, **settings) as sched:
        await sched.submit(exec_task("ci", "on_ray", f"echo $$ > {pid_file}; exec sleep 300"))
        pid = int(await wait_for_text(pid_file))
    assert await _gone(pid), "the command outlived a graceful stop with on_shutdown = 'cancel'"


async def test_an_attempt_no_runner_got_runs_anew_once(tmp_path: Path, namespace: str) -> None:
    # The owner recorded attempt 1 and died before a runner had it (or the runner was lost
    # with its node): attempt 2 finds nothing to adopt, so the task runs, once.
    runs = tmp_path / "runs"
    settings = load_settings(
        env={}, home=tmp_path, durable=True, **ray_settings(tmp_path, namespace, on_ray={"num_cpus": 0})
    )
    async with RayExecutor(settings, ray_classes(settings)) as executor:
        task = exec_task("orphan", "on_ray", f"echo run >> {runs}; echo ok")
        result = await executor.run(TaskContext(task, 2))
    assert result["stdout"] == "ok\n"
    assert await anyio.Path(runs).read_text() == "run\n"


async def test_a_retry_runs_anew_rather_than_adopting_the_attempt_it_retries(
    tmp_path: Path, namespace: str
) -> None:
    # Attempt 1 fails; its outcome stays with its runner a moment (for an owner that would
    # crash before recording it). Attempt 2, a retry in the same owner, must run again.
    marker, runs = tmp_path / "failed-once", tmp_path / "runs"
    cmd = f"echo run >> {runs}; if [ -e {marker} ]; then echo ok; else touch {marker}; exit 1; fi"
    settings = ray_settings(tmp_path, namespace, on_ray={"num_cpus": 0})
    async with open_scheduler(tmp_path, durable=True, **settings) as sched:
        await sched.submit(exec_task("flaky", "on_ray", cmd, max_attempts=2))
        result = await sched.wait("flaky", timeout=120)
        state = await sched.get("flaky")
    assert_second_attempt_finished(result, state, runs)


async def test_a_runner_idle_for_its_idle_timeout_exits_by_itself(tmp_path: Path, namespace: str) -> None:
    # Runners hold their class's resources (GPUs) while they wait: idle for idle_timeout,
    # each exits and its resources go back, while the owner runs on. The command's parent
    # is its runner, so $PPID names the runner's process.
    settings = ray_settings(tmp_path, namespace, on_ray={"num_cpus": 0, "idle_timeout": 1})
    async with open_scheduler(tmp_path, durable=True, **settings) as sched:
        await sched.submit(exec_task("once", "on_ray", "echo $PPID"))
        result = await sched.wait("once", timeout=120)
        assert result.status is TaskStatus.COMPLETED, result.error
        runner = int(result.result["stdout"])
        # The durable runner keeps the outcome until it is collected (~1 s), then idles 1 s.
        assert await _gone(runner, timeout=60), "the idle runner never exited"
        assert not await asyncio.to_thread(_runners_in, namespace)
        # The next task starts a new runner.
        await sched.submit(exec_task("again", "on_ray", "echo $PPID"))
        again = await sched.wait("again", timeout=120)
    assert again.status is TaskStatus.COMPLETED, again.error
    assert int(again.result["stdout"]) != runner


def _runners_in(namespace: str) -> list[str]:
    import ray

    return [
        actor["name"]
        for actor in ray.util.list_named_actors(all_namespaces=True)
        if actor["namespace"] == namespace and actor["name"].startswith("dspy_infra-runner-")
    ]


@pytest.mark.parametrize("durable", [False, True])
async def test_a_runner_killed_mid_attempt_fails_it_as_lost_and_the_retry_runs(
    tmp_path: Path, namespace: str, durable: bool
) -> None:
    # The first attempt writes its runner's pid (the command's parent) and waits: the
    # runner is SIGKILLed under it. The retry finds the pid written and ends at once.
    runs, pid_file = tmp_path / "runs", tmp_path / "runner.pid"
    settings = ray_settings(tmp_path, namespace, on_ray={"num_cpus": 0})
    async with open_scheduler(tmp_path, durable=durable, **settings) as sched:
        cmd = f"echo run >> {runs}; if [ ! -e {pid_file} ]; then echo $PPID > {pid_file}; sleep 300; fi"
        await sched.submit(exec_task("victim", "on_ray", cmd + "; echo ok", max_attempts=2))
        os.kill(int(await wait_for_text(pid_file, timeout=120)), signal.SIGKILL)
        result = await sched.wait("victim", timeout=120)
        state = await sched.get("victim")
    assert_second_attempt_finished(result, state, runs)


async def test_cancel_ends_the_whole_process_tree_of_a_running_exec(tmp_path: Path, namespace: str) -> None:
    # The command starts a child of its own and waits for it: a cancel ends both.
    pids = tmp_path / "pids"
    cmd = f"sleep 300 & echo $$ $! > {pids}; wait"
    async with ray_scheduler(tmp_path, namespace, on_ray={"num_cpus": 0}) as sched:
        await sched.submit(exec_task("tree", "on_ray", cmd))
        shell, child = (int(pid) for pid in (await wait_for_text(pids)).split())
        assert pid_alive(shell) and pid_alive(child)
        await sched.cancel("tree")
        result = await sched.wait("tree", timeout=60)
        assert result.status is TaskStatus.CANCELLED
        assert await _gone(shell) and await _gone(child), "a process of the cancelled attempt lived on"
        # The runner survived the cancel and runs the next attempt.
        await sched.submit(exec_task("next", "on_ray", "echo ok"))
        after = await sched.wait("next", timeout=60)
    assert after.status is TaskStatus.COMPLETED and after.result["stdout"] == "ok\n"


def assert_second_attempt_finished(result: TaskResult, state: TaskState, runs: Path) -> None:
    """The task completed ("ok") on its second attempt, its command run once per attempt."""
    assert result.status is TaskStatus.COMPLETED, result.error
    assert result.result["stdout"] == "ok\n" and state.attempts == 2
    assert runs.read_text() == "run\nrun\n"


def _raylet_pids(resource: str) -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError):
                argv = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
                if any(
                    a.startswith(b"--static_resource_list=") and resource.encode() + b"," in a for a in argv
                ):
                    pids.append(int(entry))
    return pids


def _start_node(resource: str) -> None:
    ray_bin = str(Path(sys.executable).with_name("ray"))
    subprocess.run(
        [
            ray_bin,
            "start",
            f"--address={RAY_ADDRESS}",
            "--node-ip-address=127.0.0.1",
            "--num-cpus=1",
            f"--resources={json.dumps({resource: 1})}",
            "--disable-usage-stats",
        ],
        check=True,
        capture_output=True,
        timeout=180,
    )


async def test_losing_the_node_mid_task_fails_the_attempt_and_the_retry_finishes(
    tmp_path: Path, namespace: str
) -> None:
    # A private third raylet (not the nodes other tests use) carries the only unit of a
    # resource the class needs; it is SIGKILLed mid-task and another raylet takes its place.
    resource = f"lossy_{uuid.uuid4().hex[:8]}"
    runs = tmp_path / "runs"
    await asyncio.to_thread(_start_node, resource)
    try:
        async with ray_scheduler(
            tmp_path, namespace, lossy={"num_cpus": 0, "resources": {resource: 1}}
        ) as sched:
            await sched.submit(
                exec_task("survive", "lossy", f"echo run >> {runs}; sleep 5; echo done", max_attempts=2)
            )
            await wait_for_text(runs, timeout=180)
            for pid in _raylet_pids(resource):
                os.kill(pid, signal.SIGKILL)
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                if (await sched.get("survive")).attempts >= 2:
                    break
                await anyio.sleep(0.2)
            state = await sched.get("survive")
            assert state.attempts == 2 and state.status is not TaskStatus.COMPLETED, state
            assert "lost with its worker or node" in state.error, state.error
            await asyncio.to_thread(_start_node, resource)
            result = await sched.wait("survive", timeout=180)
        assert result.status is TaskStatus.COMPLETED, result.error
        assert result.result["stdout"] == "done\n"
        assert runs.read_text() == "run\nrun\n"
    finally:
        for pid in _raylet_pids(resource):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
