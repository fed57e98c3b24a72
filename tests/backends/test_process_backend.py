"""Process-backend specifics beyond the shared contract suite: log files and their
tail/since invariants, pid checks (zombies, pid reuse), SIGKILL escalation, records read by
a fresh backend (adoption across processes), exec timeouts, and the missing-binary and
port-remap errors."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import anyio
import pytest
from hypothesis import HealthCheck as HypothesisHealthCheck
from hypothesis import given, settings
from hypothesis import strategies as st
from strategies import lines

from dspy_infra.backends.process import ProcessBackend
from dspy_infra.backends.registry import dspy_infra_backends
from dspy_infra.errors import AlreadyExists, BackendError, MissingBinary, NotFound, SpecError
from dspy_infra.models import PortMapping, ServiceSpec, VolumeMount
from dspy_infra.ownership import pid_alive, proc_stat

pytestmark = pytest.mark.usefixtures("anyio_backend")


@pytest.fixture
def backend(process_backend: ProcessBackend) -> ProcessBackend:
    return process_backend


async def _wait_exited(b: ProcessBackend, instance_id: str) -> None:
    with anyio.fail_after(10):
        while True:
            if (await b.inspect(instance_id)).state == "exited":
                return
            await anyio.sleep(0.02)


def test_registered_through_the_backends_hook() -> None:
    assert dspy_infra_backends()["process"] is ProcessBackend


def test_zombies_and_reused_pids_do_not_count_as_alive() -> None:
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        info = proc_stat(child.pid)
        assert info is not None and pid_alive(child.pid, info.start_time)
        assert not pid_alive(child.pid, info.start_time + 1)  # same pid, another process's start time
        child.send_signal(signal.SIGKILL)
        deadline = time.monotonic() + 5
        while (state := proc_stat(child.pid)) is not None and state.state != "Z":
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert proc_stat(child.pid) is not None  # still there, as a zombie: not reaped yet
        assert not pid_alive(child.pid)
    finally:
        child.wait()
    assert not pid_alive(child.pid) and not pid_alive(0) and not pid_alive(-5)


async def test_records_survive_a_new_backend_object(backend: ProcessBackend, tmp_path: Path) -> None:
    spec = ServiceSpec(name="sleeper", command=["sleep", "30"], environment={"X": "1"})
    inst = await backend.run(spec, instance_name="sleeper", labels={"dspy_infra.owner": "me", "k": "v"})
    fresh = ProcessBackend(home=tmp_path)  # what a restarted owner process would build
    (seen,) = await fresh.list_instances({"dspy_infra.owner": "me"})
    assert (seen.id, seen.state, seen.labels["k"], seen.started_at) == (
        inst.id,
        "running",
        "v",
        inst.started_at,
    )
    assert await fresh.list_instances({"dspy_infra.owner": "someone-else"}) == []
    with pytest.raises(AlreadyExists):
        await fresh.run(spec, instance_name="sleeper", labels={})
    result = await fresh.exec(inst.id, ["sh", "-c", 'echo "X=$X"'])
    assert (result.exit_code, result.output.strip()) == (0, "X=1")  # the service's environment


async def test_stop_escalates_to_sigkill_when_sigterm_is_ignored(backend: ProcessBackend) -> None:
    spec = ServiceSpec(
        name="stubborn", command=["sh", "-c", "trap '' TERM; echo ready; while :; do sleep 0.05; done"]
    )
    inst = await backend.run(spec, instance_name="stubborn", labels={})
    with anyio.fail_after(5):
        while True:  # wait until the trap is set (the script printed its first line)
            if [e async for e in backend.logs(inst.id, service_name="stubborn")]:
                break
            await anyio.sleep(0.02)
    started = time.monotonic()
    await backend.stop(inst.id, timeout=0.3)
    took = time.monotonic() - started
    after = await backend.inspect(inst.id)
    assert after.state == "exited" and 0.25 <= took < 5
    await backend.stop(inst.id)  # idempotent
    await backend.remove(inst.id)
    await backend.remove(inst.id)  # idempotent
    with pytest.raises(NotFound):
        await backend.inspect(inst.id)


async def test_graceful_stop_keeps_the_exit_code_and_last_lines(backend: ProcessBackend) -> None:
    spec = ServiceSpec(
        name="polite",
        command=["sh", "-c", "trap 'echo bye; exit 7' TERM; echo ready; while :; do sleep 0.05; done"],
    )
    inst = await backend.run(spec, instance_name="polite", labels={})
    with anyio.fail_after(10):
        while True:  # wait until the trap is set (the script printed its first line)
            if [e async for e in backend.logs(inst.id, service_name="polite")]:
                break
            await anyio.sleep(0.02)
    await backend.stop(inst.id, timeout=5)
    after = await backend.inspect(inst.id)
    assert (after.state, after.exit_code) == ("exited", 7)
    assert [e.message async for e in backend.logs(inst.id, service_name="polite")][-1] == "bye"


async def test_exec_times_out(backend: ProcessBackend) -> None:
    inst = await backend.run(ServiceSpec(name="s", command=["sleep", "30"]), instance_name="s", labels={})
    started = time.monotonic()
    result = await backend.exec(inst.id, ["sleep", "10"], timeout=0.3)
    assert result.exit_code == 124 and time.monotonic() - started < 5
    missing = await backend.exec(inst.id, ["no-such-tool-xyz"])
    assert missing.exit_code == 127


async def test_missing_binary_and_port_remap_are_named(backend: ProcessBackend) -> None:
    with pytest.raises(MissingBinary) as info:
        await backend.prepare([ServiceSpec(name="kafka", image="confluentinc/cp-kafka:7.5.0")])
    assert info.value.field == "services.kafka.command" and 'backend="docker"' in str(info.value)
    with pytest.raises(MissingBinary, match=r"apt-get install -y prometheus"):
        await backend.prepare([ServiceSpec(name="prom", command=["/opt/none/prometheus"])])
    remap = ServiceSpec(name="web", command=["sleep", "1"], ports=[PortMapping(80, 8080)])
    with pytest.raises(SpecError) as err:
        await backend.run(remap, instance_name="web", labels={})
    assert err.value.field == "services.web.ports" and "{port.80}" in str(err.value)
    mounted = ServiceSpec(name="vol", command=["sleep", "1"], volumes=[VolumeMount("data", "/data")])
    with pytest.raises(SpecError) as vol:
        await backend.prepare([mounted])
    assert vol.value.field == "services.vol.volumes"
    same = ServiceSpec(name="web2", command=["sleep", "1"], ports=[PortMapping(8080, 0), PortMapping(9090)])
    await backend.prepare([same])  # 0 / None publish the container port as is


async def test_a_process_runs_entrypoint_and_command_as_you_where_the_files_are(
    backend: ProcessBackend, tmp_path: Path
) -> None:
    """The container-only fields mean what they can for a process: ``entrypoint + command``
    runs; a host path mounted at the same path and ``network_mode = "host"`` need nothing;
    another user, or a mount that moves a path, is refused naming the field."""
    marker = tmp_path / "ran"
    spec = ServiceSpec(
        name="both",
        entrypoint=["sh", "-c"],
        command=[f"echo $0 > {marker}; sleep 30", "from-entrypoint"],
        volumes=[VolumeMount(str(tmp_path), str(tmp_path))],
        network_mode="host",
        user=f"{os.getuid()}:{os.getgid()}",
    )
    await backend.prepare([spec])
    instance = await backend.run(spec, instance_name="both", labels={})
    try:
        with anyio.fail_after(10):
            while True:
                if marker.exists() and marker.read_text():
                    break
                await anyio.sleep(0.02)
        assert marker.read_text() == "from-entrypoint\n"
    finally:
        await backend.stop(instance.id, timeout=1)
        await backend.remove(instance.id)
    other = ServiceSpec(name="other", command=["sleep", "1"], user="12345")
    with pytest.raises(SpecError) as user:
        await backend.prepare([other])
    assert user.value.field == "services.other.user" and "12345" in str(user.value)
    moved = ServiceSpec(name="moved", command=["sleep", "1"], volumes=[VolumeMount(str(tmp_path), "/data")])
    with pytest.raises(SpecError) as vol:
        await backend.prepare([moved])
    assert vol.value.field == "services.moved.volumes"


async def test_a_port_held_by_someone_else_is_refused_before_starting(backend: ProcessBackend) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        spec = ServiceSpec(name="late", command=["sleep", "30"], ports=[PortMapping(port, port)])
        with pytest.raises(BackendError) as info:
            await backend.run(spec, instance_name="late", labels={})
    assert info.value.field == "services.late.ports" and "already in use" in str(info.value)
    assert await backend.list_instances({}) == []  # nothing half-created


async def test_logs_rotate_beyond_the_size_limit_and_stay_readable(tmp_path: Path) -> None:
    b = ProcessBackend(home=tmp_path, log_max_bytes=4096)
    await b.open()
    script = "i=0; while [ $i -lt 600 ]; do echo line-$i; i=$((i+1)); done"
    inst = await b.run(
        ServiceSpec(name="chatty", command=["sh", "-c", script]), instance_name="chatty", labels={}
    )
    await _wait_exited(b, inst.id)
    d = b.root / inst.id
    assert (d / "stdout.log.1").exists() and (d / "stdout.log").stat().st_size <= 4096 + 200
    lines = [e.message async for e in b.logs(inst.id, service_name="chatty")]
    assert lines[-1] == "line-599"  # (the oldest lines may have gone with an older file)
    numbers = [int(m.split("-")[1]) for m in lines]
    assert numbers == list(range(numbers[0], 600))  # what is kept is contiguous and in order
    assert [e.message async for e in b.logs(inst.id, service_name="chatty", tail=3)] == [
        "line-597",
        "line-598",
        "line-599",
    ]
    await b.remove(inst.id)


async def test_follow_reads_across_rotations_without_gaps(tmp_path: Path) -> None:
    b = ProcessBackend(home=tmp_path, log_max_bytes=1024)
    await b.open()
    script = "i=0; while [ $i -lt 100 ]; do echo line-$i; i=$((i+1)); sleep 0.01; done"
    inst = await b.run(
        ServiceSpec(name="slow", command=["sh", "-c", script]), instance_name="slow", labels={}
    )
    with anyio.fail_after(30):
        lines = [e.message async for e in b.logs(inst.id, service_name="slow", follow=True)]
    assert lines == [f"line-{i}" for i in range(100)]
    assert (b.root / inst.id / "stdout.log.1").exists()  # it did rotate meanwhile
    await b.remove(inst.id)


async def test_stats_see_a_busy_process(backend: ProcessBackend) -> None:
    spec = ServiceSpec(
        name="busy", command=[sys.executable, "-c", "x = bytearray(30_000_000)\nwhile True: pass"]
    )
    inst = await backend.run(spec, instance_name="busy", labels={})
    # How soon the interpreter has started, allocated and got the CPU depends on the machine's
    # load: sample until one window sees both (each sample is a fresh measurement).
    with anyio.fail_after(15):
        while True:
            usage = await backend.stats(inst.id)
            if usage.cpu_percent > 20 and usage.memory_bytes > 30_000_000:
                break
            await anyio.sleep(0.1)
    await backend.stop(inst.id, timeout=2)
    assert (await backend.stats(inst.id)).memory_bytes == 0


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HypothesisHealthCheck.function_scoped_fixture]
)
@given(lines, st.integers(0, 30), st.floats(0, 1))
async def test_log_tail_and_since_invariants(
    tmp_path: Path, lines: list[tuple[str, str]], tail: int, cut: float
) -> None:
    # Write the log files exactly as the shim does ("<unix time> <line>"), then read them back.
    b = ProcessBackend(home=tmp_path / f"h{time.monotonic_ns()}")
    await b.open()
    inst = await b.run(ServiceSpec(name="quiet", command=["true"]), instance_name="quiet", labels={})
    await _wait_exited(b, inst.id)
    base = 1_700_000_000.0
    written: list[tuple[float, str, str]] = []
    d = b.root / inst.id
    content: dict[str, bytes] = {"stdout": b"", "stderr": b""}
    for i, (stream, text) in enumerate(lines):
        text = text.replace("\n", " ")
        ts = base + i
        written.append((ts, stream, text))
        content[stream] += f"{ts:.6f} {text}\n".encode()
    for stream, data in content.items():
        await anyio.Path(d / f"{stream}.log").write_bytes(data)
    got = [(e.timestamp, e.stream, e.message) async for e in b.logs(inst.id, service_name="quiet")]
    assert got == written
    since = base + cut * len(lines)
    expected = [w for w in written if w[0] >= since][-tail:] if tail else []
    got = [
        (e.timestamp, e.stream, e.message)
        async for e in b.logs(inst.id, service_name="quiet", tail=tail, since=since)
    ]
    assert got == expected
    await b.remove(inst.id)
