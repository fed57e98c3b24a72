"""Docker/Podman specifics of ``DockerBackend``.

Pure parts (container config, log demultiplexing, image references, engine times, pull
progress, error translation) are covered by hypothesis properties without an engine; the
rest runs against a real Docker Engine and real Podman (``engine_backend`` is parametrized
over both): network aliases, volumes, image HEALTHCHECK state, resources, stats, a real
Redis answering PING, and a pull with progress from the real local registry.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import struct
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiodocker
import anyio
import attrs
import pytest
from engines import (
    Engine,
    _remove_network,
    build_context,
    docker_engine,
    engine,
    engine_backend,
    engine_kind,
    engine_settings,
    free_port,
    podman_backend,
    podman_engine,
    registry,
    unique_name,
)
from hypothesis import given
from hypothesis import strategies as st
from strategies import label_keys, names, service_specs, text_values

from dspy_infra.backends.base import LABEL_OWNER, LABEL_SERVICE
from dspy_infra.backends.docker import (
    BUILTIN_NETWORKS,
    DEFAULT_DOCKER_HOST,
    DockerBackend,
    LogDemuxer,
    PullTracker,
    _instance_from_inspect,
    container_config,
    parse_engine_time,
    resolve_docker_host,
    split_image_ref,
    translate_docker_error,
)
from dspy_infra.backends.registry import dspy_infra_backends
from dspy_infra.config import Settings
from dspy_infra.errors import (
    AlreadyExists,
    BackendError,
    BackendUnavailable,
    DeadlineExceeded,
    InfraError,
    NotFound,
    SpecError,
)
from dspy_infra.models import HealthCheck, Instance, PortMapping, Resources, ServiceSpec, VolumeMount
from dspy_infra.ownership import LABEL_HOST_PORTS, LABEL_NETWORK

# Fixtures from engines.py, imported so pytest sees them in this module.
__all__ = [
    "docker_engine",
    "engine",
    "engine_backend",
    "engine_kind",
    "podman_backend",
    "podman_engine",
    "registry",
]

# Requesting anyio_backend up front keeps anyio's plugin from re-creating these items at
# collection finish, which would drop the engine parametrization.
pytestmark = pytest.mark.usefixtures("anyio_backend")

# ---------------------------------------------------------------------------------------
# Strategies (kept here: tests/strategies.py belongs to another engineer)


# ---------------------------------------------------------------------------------------
# Pure properties


@given(service_specs(), st.dictionaries(label_keys, text_values, max_size=3), names)
def test_container_config_carries_every_part_of_the_spec(
    spec: ServiceSpec, owner_labels: dict[str, str], network: str
) -> None:
    config = container_config(spec, instance_name="x", labels=owner_labels, network=network)
    assert config["Image"] == spec.image
    # Ownership labels win over the spec's own; nothing of either is lost.
    assert {k: v for k, v in config["Labels"].items() if k != LABEL_HOST_PORTS} == {
        **spec.labels,
        **owner_labels,
    }
    assert sorted(config["Env"]) == sorted(f"{k}={v}" for k, v in spec.environment.items())
    assert config.get("Cmd", []) == list(spec.command)
    # None keeps the image's entrypoint; an empty one clears it ([""]: both engines agree).
    expected_entrypoint = None if spec.entrypoint is None else (list(spec.entrypoint) or [""])
    assert config.get("Entrypoint") == expected_entrypoint
    assert config.get("User", "") == spec.user
    host = config["HostConfig"]
    if spec.network_mode == "host":
        # Nothing published: the ports the service binds ride along in a label.
        assert host["NetworkMode"] == "host" and "NetworkingConfig" not in config
        assert config["ExposedPorts"] == {} and host["PortBindings"] == {}
        assert config["Labels"][LABEL_HOST_PORTS] == json.dumps(
            {str(p.container_port): [p.host_ip, p.host_port] for p in spec.ports if p.host_port}
        )
        return
    if spec.network_mode == "bridge":  # the engine's default network, whatever the owner's
        network = "bridge"
    assert host["NetworkMode"] == network
    if network in BUILTIN_NETWORKS:  # engines refuse aliases there
        assert "NetworkingConfig" not in config
    else:
        assert config["NetworkingConfig"]["EndpointsConfig"][network]["Aliases"] == [spec.name]
    assert host["RestartPolicy"] == {"Name": "no"}  # restarts are the manager's job
    for p in spec.ports:
        key = f"{p.container_port}/{p.protocol}"
        assert key in config["ExposedPorts"]
        if p.host_port is None:
            assert key not in host["PortBindings"]
        else:
            expected = {"HostIp": p.host_ip, "HostPort": str(p.host_port) if p.host_port else ""}
            assert expected in host["PortBindings"][key]
    assert len(config["ExposedPorts"]) == len(spec.ports)
    assert len(host["Binds"]) == len(spec.volumes)
    for volume, bind in zip(spec.volumes, host["Binds"], strict=True):
        assert bind.startswith(f"{volume.source}:{volume.target}")
        assert bind.endswith(":ro") == volume.read_only
    if spec.resources.cpus is None:
        assert "NanoCpus" not in host
    else:
        assert abs(host["NanoCpus"] - spec.resources.cpus * 1e9) <= 1
    assert host.get("Memory") == spec.resources.memory_bytes
    json.dumps(config)  # the body is JSON as is


@given(
    st.one_of(
        st.text(max_size=40),
        st.recursive(
            st.none() | st.integers() | st.text(max_size=5),
            lambda inner: (
                st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3)
            ),
            max_leaves=8,
        ).map(json.dumps),
    )
)
def test_a_host_ports_label_of_any_shape_never_breaks_an_inspect(text: str) -> None:
    """The ports of a host-network container come from its label, which anyone who can label a
    container can write: whatever it holds, the instance is read (without those ports when the
    label is not ours)."""
    data = {
        "Id": "c1",
        "Name": "/x",
        "State": {"Running": True},
        "Config": {"Labels": {LABEL_HOST_PORTS: text}},
    }
    instance = _instance_from_inspect(data)
    assert all(
        isinstance(k, int) and isinstance(v[0], str) and isinstance(v[1], int)
        for k, v in instance.ports.items()
    )


def test_ports_bind_to_loopback_by_default() -> None:
    spec = ServiceSpec(name="web", image="web:1", ports=[PortMapping(80, 8080), PortMapping(81, 0)])
    bindings = container_config(spec, instance_name="w", labels={}, network="n")["HostConfig"]["PortBindings"]
    assert bindings == {
        "80/tcp": [{"HostIp": "127.0.0.1", "HostPort": "8080"}],
        "81/tcp": [{"HostIp": "127.0.0.1", "HostPort": ""}],
    }


def test_spec_without_image_is_refused_naming_the_field() -> None:
    with pytest.raises(SpecError) as info:
        container_config(ServiceSpec(name="svc", command=["x"]), instance_name="s", labels={}, network="n")
    assert info.value.field == "services.svc.image"
    assert info.value.fix and "image" in info.value.fix


def _frame(stream_id: int, payload: bytes) -> bytes:
    return struct.pack(">BxxxL", stream_id, len(payload)) + payload


@given(
    st.lists(
        st.tuples(
            st.sampled_from([1, 2]),
            st.lists(
                st.text(st.characters(codec="utf-8", exclude_characters="\n\r"), max_size=12),
                min_size=1,
                max_size=4,
            ),
        ),
        max_size=6,
    ),
    st.lists(st.integers(1, 40), max_size=30),
)
def test_demuxer_yields_the_same_lines_however_the_wire_is_chunked(
    writes: list[tuple[int, list[str]]], cuts: list[int]
) -> None:
    wire = b"".join(_frame(sid, "".join(line + "\n" for line in lines).encode()) for sid, lines in writes)
    expected = [("stdout" if sid == 1 else "stderr", line) for sid, lines in writes for line in lines]
    demux = LogDemuxer()
    got: list[tuple[str, str]] = []
    position = 0
    for size in cuts:
        got.extend(demux.feed(wire[position : position + size]))
        position += size
    got.extend(demux.feed(wire[position:]))
    got.extend(demux.close())
    assert got == expected


def test_demuxer_joins_a_line_split_across_frames_and_flushes_the_rest() -> None:
    demux = LogDemuxer()
    got = list(demux.feed(_frame(1, b"hel") + _frame(2, b"err\n") + _frame(1, b"lo\nta")))
    assert got == [("stderr", "err"), ("stdout", "hello")]
    assert list(demux.close()) == [("stdout", "ta")]


@given(
    st.one_of(st.none(), st.sampled_from(["127.0.0.1:5000", "registry.example.com", "localhost:5000"])),
    st.lists(names, min_size=1, max_size=3).map("/".join),
    st.one_of(st.none(), st.from_regex(r"[a-z0-9][a-z0-9._-]{0,10}", fullmatch=True)),
)
def test_split_image_ref_never_mistakes_a_registry_port_for_a_tag(
    registry: str | None, path: str, tag: str | None
) -> None:
    repo = f"{registry}/{path}" if registry else path
    image = f"{repo}:{tag}" if tag else repo
    assert split_image_ref(image) == (repo, tag or "latest")


def test_split_image_ref_keeps_digests_whole() -> None:
    ref = "127.0.0.1:5000/app@sha256:" + "a" * 64
    assert split_image_ref(ref) == (ref, "")


@given(
    st.datetimes(min_value=datetime(1971, 1, 1), max_value=datetime(2200, 1, 1)),
    st.integers(0, 999_999_999),
    st.integers(-12 * 60, 14 * 60),
)
def test_parse_engine_time_reads_nanosecond_rfc3339(
    moment: datetime, nanos: int, offset_minutes: int
) -> None:
    zone = UTC if offset_minutes == 0 else None
    moment = moment.replace(microsecond=0, tzinfo=UTC)
    if zone is UTC:
        text = moment.strftime("%Y-%m-%dT%H:%M:%S") + f".{nanos:09d}Z"
        local = moment
    else:
        from datetime import timezone

        tz = timezone(timedelta(minutes=offset_minutes))
        local = moment.astimezone(tz)
        sign = "+" if offset_minutes >= 0 else "-"
        hours, minutes = divmod(abs(offset_minutes), 60)
        text = local.strftime("%Y-%m-%dT%H:%M:%S") + f".{nanos:09d}{sign}{hours:02d}:{minutes:02d}"
    assert abs(parse_engine_time(text) - (moment.timestamp() + nanos / 1e9)) < 1e-5


@pytest.mark.parametrize("text", ["", "0001-01-01T00:00:00Z", "not a time", "2026-01-01 00:00:00"])
def test_parse_engine_time_is_zero_for_unset_or_garbage(text: str) -> None:
    assert parse_engine_time(text) == 0.0


@given(
    st.lists(
        st.tuples(
            st.sampled_from(["a", "b", "c"]),
            st.sampled_from(["Downloading", "Extracting", "Download complete", "Pull complete", "Waiting"]),
            st.integers(0, 1000),
            st.integers(1, 1000),
        ),
        max_size=30,
    ),
    st.integers(0, 1 << 30),
)
def test_pull_progress_stays_within_bounds_and_completes_at_100(
    messages: list[tuple[str, str, int, int]], size: int
) -> None:
    tracker = PullTracker("img:1")
    last_percent = 0
    for layer, status, current, total in messages:
        detail = {"current": current, "total": total} if status in ("Downloading", "Extracting") else {}
        progress = tracker.update({"status": status, "id": layer, "progressDetail": detail})
        assert progress.image_name == "img:1"
        assert 0 <= progress.current <= progress.total or progress.total == 0
        assert 0 <= progress.progress_percent <= 100
        assert progress.status in ("downloading", "extracting")
        assert progress.progress_percent >= last_percent  # never backwards
        last_percent = progress.progress_percent
    done = tracker.complete(size=size)
    assert (done.status, done.progress_percent, done.current) == ("complete", 100, done.total)
    if not any(status in ("Downloading", "Extracting") for _layer, status, *_n in messages):
        assert done.total == size  # no byte figures on the wire: the image size stands in
    else:
        assert done.total > 0


@pytest.mark.parametrize(
    ("status", "message", "kind"),
    [
        (404, "No such container: abc", NotFound),
        (404, "No such image: foo:1", NotFound),
        (409, "Conflict. The container name is already in use", AlreadyExists),
        (400, "invalid reference format", SpecError),
        (500, "boom", BackendError),
        (900, "Cannot connect to Docker Engine", BackendUnavailable),
    ],
)
def test_engine_errors_translate_into_ours(status: int, message: str, kind: type[Exception]) -> None:
    error = translate_docker_error(aiodocker.DockerError(status, message), operation="op", target="t")
    assert type(error) is kind
    assert message in str(error) and "op t" in str(error)
    if "image" in message:
        assert isinstance(error, InfraError) and error.field == "image" and error.fix


@pytest.mark.parametrize(
    ("exc", "kind"),
    [
        (TimeoutError(), DeadlineExceeded),
        (ConnectionRefusedError(111, "refused"), BackendUnavailable),
        (PermissionError(13, "denied"), BackendUnavailable),
    ],
)
def test_os_level_failures_translate_into_ours(exc: Exception, kind: type[Exception]) -> None:
    error = translate_docker_error(exc, operation="container_start", target="svc")
    assert type(error) is kind
    assert "container_start svc" in str(error)


def test_address_comes_from_argument_then_settings_then_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DOCKER_HOST", raising=False)
    assert resolve_docker_host(Settings()) == DEFAULT_DOCKER_HOST
    monkeypatch.setenv("DOCKER_HOST", "unix:///env.sock")
    assert resolve_docker_host(Settings()) == "unix:///env.sock"
    assert resolve_docker_host(Settings(docker_host="unix:///cfg.sock")) == "unix:///cfg.sock"
    assert (
        resolve_docker_host(Settings(docker_host="unix:///cfg.sock"), "unix:///arg.sock")
        == "unix:///arg.sock"
    )


@given(st.integers(0, 10**10), st.integers(10**6, 10**11), st.integers(0, 10**6), st.integers(1, 64))
def test_cpu_percent_is_busy_time_over_the_sampling_interval(
    busy_ns: int, interval_ns: int, memory_cache: int, cpus: int
) -> None:
    from dspy_infra.backends.docker import _usage_from_stats

    base = datetime(2026, 1, 1, tzinfo=UTC)
    later = base + timedelta(microseconds=interval_ns // 1000 or 1)
    stamp = "%Y-%m-%dT%H:%M:%S.%fZ"
    usage = _usage_from_stats(
        {
            "read": later.strftime(stamp),
            "preread": base.strftime(stamp),
            "cpu_stats": {
                "cpu_usage": {"total_usage": 5 + busy_ns},
                "system_cpu_usage": 1,
                "online_cpus": cpus,
            },
            "precpu_stats": {"cpu_usage": {"total_usage": 5}, "system_cpu_usage": 0},
            "memory_stats": {"usage": 10_000_000, "stats": {"cache": memory_cache}},
            "networks": {"eth0": {"rx_bytes": 3, "tx_bytes": 4}, "eth1": {"rx_bytes": 5, "tx_bytes": 6}},
        }
    )
    seconds = (later - base).total_seconds()
    # Engine timestamps are Unix seconds in a float: microseconds survive, so 1e-3 relative
    # over intervals of a millisecond or more.
    assert abs(usage.cpu_percent - busy_ns / 1e9 / seconds * 100) <= 1e-3 * max(1.0, usage.cpu_percent)
    assert usage.memory_bytes == 10_000_000 - memory_cache
    assert (usage.network_rx_bytes, usage.network_tx_bytes) == (8, 10)


def test_hook_registers_the_docker_backend() -> None:
    assert dspy_infra_backends()["docker"] is DockerBackend


async def test_open_without_an_engine_names_the_address_and_the_fix(tmp_path: Path) -> None:
    address = f"unix://{tmp_path}/nothing.sock"
    backend = DockerBackend(Settings(), host=address)
    with pytest.raises(BackendUnavailable) as info:
        await backend.open()
    assert address in str(info.value)
    assert info.value.field == "docker_host"
    # The fix names what a user has (no file of this repository's checkout).
    assert info.value.fix and "podman system service" in info.value.fix and "engines.sh" not in info.value.fix
    assert "backend='process'" in info.value.fix
    with pytest.raises(BackendError, match="not open"):
        await backend.inspect("x")


# ---------------------------------------------------------------------------------------
# Real engines


def _labels(backend: DockerBackend, service: str) -> dict[str, str]:
    return {LABEL_OWNER: backend.settings.resolved_owner(), LABEL_SERVICE: service}


async def _run(backend: DockerBackend, spec: ServiceSpec) -> Instance:
    await backend.prepare([spec])
    return await backend.run(spec, instance_name=unique_name(spec.name), labels=_labels(backend, spec.name))


async def _wait_exit_code(backend: DockerBackend, instance_id: str, within: float = 20) -> int | None:
    with anyio.fail_after(within):
        while True:
            instance = await backend.inspect(instance_id)
            if instance.state == "exited":
                return instance.exit_code
            await anyio.sleep(0.05)


async def _output(backend: DockerBackend, instance_id: str) -> list[str]:
    return [e.message async for e in backend.logs(instance_id, service_name="x")]


async def test_services_reach_each_other_by_name(engine_backend: DockerBackend, engine: Engine) -> None:
    web = ServiceSpec(
        name=unique_name("web"),
        image=engine.images.busybox,
        command=["httpd", "-f", "-p", "8080", "-h", "/www"],
    )
    await _run(engine_backend, web)
    # The client knows the server only by its service name (the network alias).
    client = ServiceSpec(
        name=unique_name("client"),
        image=engine.images.busybox,
        command=[
            "sh",
            "-c",
            f"for i in $(seq 50); do wget -q -O - http://{web.name}:8080/index.html && exit 0; sleep 0.1; done; exit 1",
        ],
    )
    instance = await _run(engine_backend, client)
    assert await _wait_exit_code(engine_backend, instance.id) == 0
    assert await _output(engine_backend, instance.id) == ["ok"]


def _httpd(engine: Engine, prefix: str, listen: str, *, network_mode: str) -> ServiceSpec:
    """busybox ``httpd`` serving ``/www`` (its index says ``ok``) on ``listen``, container port 8080."""
    return ServiceSpec(
        name=unique_name(prefix),
        image=engine.images.busybox,
        command=["httpd", "-f", "-p", listen, "-h", "/www"],
        ports=[PortMapping(8080, 0)],
        network_mode=network_mode,
    )


async def test_a_host_network_service_binds_its_own_free_port_on_loopback(
    engine_backend: DockerBackend, engine: Engine
) -> None:
    """``network_mode = "host"``: no port is published; the service binds the free host port
    ``{port}`` names on ``{listen_host}`` (loopback), and every later inspect or listing (an
    adopting owner's) reports that port, which the engine itself cannot."""
    spec = _httpd(engine, "hostweb", "{listen_host}:{port}", network_mode="host")
    instance = await _run(engine_backend, spec)
    ip, port = instance.ports[8080]
    assert ip == "127.0.0.1" and port > 0
    assert await _http_body("127.0.0.1", port) == b"ok\n"
    assert (await engine_backend.inspect(instance.id)).ports == {8080: ("127.0.0.1", port)}
    [listed] = await engine_backend.list_instances(_labels(engine_backend, spec.name))
    assert listed.ports == {8080: ("127.0.0.1", port)}
    assert engine_backend.probe_address(listed, 8080) == ("127.0.0.1", port)


async def test_a_bridge_service_is_on_the_engines_default_network_and_published(
    engine_backend: DockerBackend, engine: Engine
) -> None:
    """``network_mode = "bridge"``: off the service network (no alias, no name resolver to set
    up, as testcontainers starts its containers), its port published as usual."""
    spec = _httpd(engine, "bridgeweb", "8080", network_mode="bridge")
    instance = await _run(engine_backend, spec)
    raw = await engine_backend.docker.containers.container(instance.id).show()
    assert raw["HostConfig"]["NetworkMode"] == "bridge"
    assert engine_backend.network not in (raw["NetworkSettings"]["Networks"] or {})
    _ip, port = instance.ports[8080]
    assert await _http_body("127.0.0.1", port) == b"ok\n"


async def _http_body(host: str, port: int) -> bytes:
    """The body of ``GET /index.html`` once something answers there (within 10 s)."""
    with anyio.fail_after(10):
        while True:
            try:
                stream = await anyio.connect_tcp(host, port)
            except OSError:
                await anyio.sleep(0.05)
                continue
            reply = b""
            async with stream:
                await stream.send(b"GET /index.html HTTP/1.0\r\n\r\n")
                with contextlib.suppress(anyio.EndOfStream, anyio.BrokenResourceError, OSError):
                    while True:
                        reply += await stream.receive()
            if b"\r\n\r\n" in reply:  # a port proxy may accept and close before the server listens
                return reply.split(b"\r\n\r\n", 1)[1]
            await anyio.sleep(0.05)


async def test_named_volume_and_bind_mounts(
    engine_backend: DockerBackend, engine: Engine, tmp_path: Path
) -> None:
    volume = unique_name("vol")
    shared = tmp_path / "shared"
    shared.mkdir()
    (shared / "in.txt").write_text("from-host\n")
    shared.chmod(0o777)
    try:
        writer = ServiceSpec(
            name=unique_name("writer"),
            image=engine.images.busybox,
            command=[
                "sh",
                "-c",
                "echo kept > /vol/file && cat /host/in.txt > /host/out.txt && ! touch /ro/x",
            ],
            volumes=[
                VolumeMount(volume, "/vol"),
                VolumeMount(str(shared), "/host"),
                VolumeMount(str(shared), "/ro", read_only=True),
            ],
        )
        first = await _run(engine_backend, writer)
        assert await _wait_exit_code(engine_backend, first.id) == 0
        assert (shared / "out.txt").read_text() == "from-host\n"
        assert not (shared / "x").exists()
        # A second container sees what the first left in the named volume.
        reader = ServiceSpec(
            name=unique_name("reader"),
            image=engine.images.busybox,
            command=["cat", "/vol/file"],
            volumes=[VolumeMount(volume, "/vol", read_only=True)],
        )
        second = await _run(engine_backend, reader)
        assert await _wait_exit_code(engine_backend, second.id) == 0
        assert await _output(engine_backend, second.id) == ["kept"]
    finally:
        for instance in await engine_backend.list_instances(
            {LABEL_OWNER: engine_backend.settings.resolved_owner()}
        ):
            await engine_backend.remove(instance.id)
        try:
            await (await engine_backend.docker.volumes.get(volume)).delete()
        except aiodocker.DockerError:
            pass


async def test_image_healthcheck_state_is_reported(engine_backend: DockerBackend, engine: Engine) -> None:
    spec = ServiceSpec(
        name=unique_name("hc"),
        image=engine.images.busybox_health,
        # Ready only once the test says so: "starting" is seen however slow the engine is.
        command=["sh", "-c", "while [ ! -e /tmp/go ]; do sleep 0.1; done; touch /tmp/ready; exec sleep 60"],
        health=HealthCheck(kind="engine"),
    )
    instance = await _run(engine_backend, spec)
    first = await engine_backend.inspect(instance.id)
    assert first.engine_health == "starting"  # /tmp/ready does not exist yet
    seen = {first.engine_health}
    assert (await engine_backend.exec(instance.id, ["touch", "/tmp/go"])).exit_code == 0
    with anyio.fail_after(20):
        while (state := (await engine_backend.inspect(instance.id)).engine_health) != "healthy":
            seen.add(state)
            await anyio.sleep(0.25)
    assert seen <= {"starting", "unhealthy"}
    plain = await _run(
        engine_backend,
        ServiceSpec(name=unique_name("plain"), image=engine.images.busybox, command=["sleep", "30"]),
    )
    assert plain.engine_health is None  # no HEALTHCHECK in the image


async def test_resources_reach_the_engine_and_stats_see_load(
    engine_backend: DockerBackend, engine: Engine
) -> None:
    spec = ServiceSpec(
        name=unique_name("busy"),
        image=engine.images.busybox,
        # A bounded spin: the CPU limit (a fifth of a core) keeps it from hurting the machine,
        # and `timeout` ends it even if nothing stops it. The trailing `exit` keeps the shell
        # as PID 1 (no exec of the last command), so the loop is not PID 1, which ignores TERM.
        command=["sh", "-c", "timeout 20 sh -c 'while :; do :; done'; exit 0"],
        resources=Resources(cpus=0.2, memory_bytes=64 << 20),
    )
    instance = await _run(engine_backend, spec)
    raw = await engine_backend.docker.containers.container(instance.id).show()
    assert raw["HostConfig"]["NanoCpus"] == 200_000_000
    assert raw["HostConfig"]["Memory"] == 64 << 20
    await anyio.sleep(0.5)
    usage = await engine_backend.stats(instance.id)
    assert 5.0 < usage.cpu_percent < 40.0  # busy, but held near the 20 % limit
    assert 0 < usage.memory_bytes <= 64 << 20
    assert usage.network_rx_bytes >= 0 and usage.network_tx_bytes >= 0
    await engine_backend.stop(instance.id, timeout=0)


async def test_real_redis_answers_ping(engine_backend: DockerBackend, engine: Engine) -> None:
    from dspy_infra.services.health import wait_until_healthy

    spec = ServiceSpec(
        name=unique_name("redis"),
        image=engine.images.redis,
        ports=[PortMapping(6379, 0)],
        health=HealthCheck(kind="redis", startup_timeout=20),
    )
    instance = await _run(engine_backend, spec)
    result = await wait_until_healthy(engine_backend, spec, instance, metrics=engine_backend.metrics)
    assert result.ok
    # And it is a real Redis: SET/GET over RESP on the published port.
    host, port = engine_backend.probe_address(instance, 6379)
    async with await anyio.connect_tcp(host, port) as stream:
        await stream.send(b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$2\r\nv1\r\n*2\r\n$3\r\nGET\r\n$1\r\nk\r\n")
        reply = b""
        with anyio.fail_after(5):
            while not reply.endswith(b"v1\r\n"):
                reply += await stream.receive()
    assert reply == b"+OK\r\n$2\r\nv1\r\n"


async def test_pull_with_progress_from_the_local_registry(
    engine_backend: DockerBackend, registry: str
) -> None:
    docker = engine_backend.docker
    repo = f"{registry}/dspy-infra-test/pull-{uuid.uuid4().hex[:8]}"
    ref = f"{repo}:v1"
    # A layer no engine has seen (random bytes), so the pull really downloads it.
    context, _hash = build_context("FROM scratch\nCOPY blob /blob\n", {"blob": os.urandom(3 << 20)})
    await docker.images.build(fileobj=io.BytesIO(context), encoding="identity", tag=ref, rm=True)
    try:
        # Both engines accept an empty credential for an anonymous push (Podman refuses none).
        await docker.images.push(repo, tag="v1", auth={})
        await docker.images.delete(ref, force=True)
        with pytest.raises(aiodocker.DockerError):
            await docker.images.inspect(ref)
        events = [event async for event in engine_backend.pull(ref)]
        assert events[-1].status == "complete" and events[-1].progress_percent == 100
        percents = [e.progress_percent for e in events]
        assert percents == sorted(percents) and percents.count(100) == 1
        assert any(e.status in ("downloading", "extracting") for e in events[:-1])
        moving = [e for e in events if e.status in ("downloading", "extracting") and e.total]
        assert all(0 <= e.current <= e.total for e in moving)
        if engine_backend.engine == "docker":
            # Docker reports bytes while a layer downloads; Podman at most once a second, so
            # a fast local pull may carry none (then the percent counts layers).
            assert moving, f"no byte progress reported: {events}"
            assert max(e.total for e in moving) >= 1 << 20  # the 3 MiB layer (compressed)
        assert events[-1].total >= 3 << 20  # the random layer cannot compress
        assert (await docker.images.inspect(ref))["Id"]
    finally:
        try:
            await docker.images.delete(ref, force=True)
        except aiodocker.DockerError:
            pass


async def test_pull_of_a_missing_image_fails_naming_it(engine_backend: DockerBackend, registry: str) -> None:
    ref = f"{registry}/dspy-infra-test/absent-{uuid.uuid4().hex[:8]}:v1"
    with pytest.raises((NotFound, BackendError)) as info:
        async for _event in engine_backend.pull(ref):
            pass
    assert "absent" in str(info.value)


async def test_api_calls_are_timed_by_operation_and_status(
    engine_backend: DockerBackend, engine: Engine
) -> None:
    instance = await _run(
        engine_backend,
        ServiceSpec(name=unique_name("m"), image=engine.images.busybox, command=["sleep", "30"]),
    )
    with pytest.raises(NotFound):
        await engine_backend.inspect("no-such-container-" + uuid.uuid4().hex)
    samples = {
        (s.labels["operation"], s.labels["status"]): s.value
        for family in engine_backend.metrics.registry.collect()
        if family.name == "env_manager_docker_api_duration_seconds"
        for s in family.samples
        if s.name.endswith("_count")
    }
    assert samples[("container_create", "ok")] >= 1
    assert samples[("container_start", "ok")] >= 1
    assert samples[("container_inspect", "error")] >= 1
    await engine_backend.stop(instance.id, timeout=0)


async def test_name_clash_is_already_exists(engine_backend: DockerBackend, engine: Engine) -> None:
    spec = ServiceSpec(name=unique_name("dup"), image=engine.images.busybox, command=["sleep", "30"])
    await engine_backend.prepare([spec])
    name = unique_name("dup")
    await engine_backend.run(spec, instance_name=name, labels=_labels(engine_backend, spec.name))
    with pytest.raises(AlreadyExists):
        await engine_backend.run(spec, instance_name=name, labels=_labels(engine_backend, spec.name))


async def test_prepare_names_the_service_whose_image_is_missing(
    engine_backend: DockerBackend, registry: str
) -> None:
    spec = ServiceSpec(name="ghost", image=f"{registry}/dspy-infra-test/ghost-{uuid.uuid4().hex[:6]}:1")
    with pytest.raises(BackendError) as info:
        await engine_backend.prepare([spec])
    assert info.value.field == "services.ghost.image"
    assert "ghost" in str(info.value)


async def test_follow_yields_new_lines_live_and_closes_early(
    engine_backend: DockerBackend, engine: Engine
) -> None:
    spec = ServiceSpec(
        name=unique_name("ticker"),
        image=engine.images.busybox,
        command=[
            "sh",
            "-c",
            'trap "exit 0" TERM; i=0; while true; i=$((i+1)); do echo tick$i; sleep 0.2; done',
        ],
    )
    instance = await _run(engine_backend, spec)
    follow = engine_backend.logs(instance.id, service_name=spec.name, follow=True, tail=0)
    seen: list[str] = []
    with anyio.fail_after(15):
        async for entry in follow:
            seen.append(entry.message)
            if len(seen) == 3:
                break
    await follow.aclose()
    # Lines written after the stream opened, in order, and the service is untouched.
    numbers = [int(line.removeprefix("tick")) for line in seen]
    assert numbers == list(range(numbers[0], numbers[0] + 3))
    assert (await engine_backend.inspect(instance.id)).state == "running"


async def test_environment_workdir_and_labels_reach_the_container(
    engine_backend: DockerBackend, engine: Engine
) -> None:
    spec = ServiceSpec(
        name=unique_name("env"),
        image=engine.images.busybox,
        command=["sh", "-c", 'echo "$GREETING from $(pwd)"'],
        environment={"GREETING": "hello world", "EMPTY": ""},
        workdir="/www",
        labels={"team": "infra", LABEL_OWNER: "spoofed"},
    )
    instance = await _run(engine_backend, spec)
    assert await _wait_exit_code(engine_backend, instance.id) == 0
    assert await _output(engine_backend, instance.id) == ["hello world from /www"]
    # The spec's own labels are kept, but never over the ownership labels.
    assert instance.labels["team"] == "infra"
    assert instance.labels[LABEL_OWNER] == engine_backend.settings.resolved_owner()
    assert instance.address == spec.name


async def test_owners_creating_the_network_at_once_leave_one(engine: Engine, tmp_path: Path) -> None:
    # CheckDuplicate is best effort: concurrent first creations could leave two networks of
    # one name, and every container start then failed with "network is ambiguous".
    network = unique_name("race")
    backends = [
        DockerBackend(
            Settings(home=tmp_path / f"h{i}", network=network, owner=unique_name("owner")), host=engine.host
        )
        for i in range(4)
    ]
    spec = ServiceSpec(name=unique_name("probe"), image=engine.images.busybox, command=["true"])
    try:
        for backend in backends:
            await backend.open()
        async with anyio.create_task_group() as tg:
            for backend in backends:
                tg.start_soon(backend.prepare, [spec])
        found = await backends[0].docker.networks.list(filters={"name": [network]})
        assert [n["Name"] for n in found if n["Name"] == network] == [network]
        for backend in backends:
            instance = await backend.run(
                spec, instance_name=unique_name(spec.name), labels=_labels(backend, spec.name)
            )
            assert await _wait_exit_code(backend, instance.id) == 0
            await backend.remove(instance.id)
    finally:
        await _remove_network(backends[0])
        for backend in backends:
            await backend.aclose()


async def test_open_asks_only_ping_and_pins_the_api_version(
    engine: Engine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Regression: open asked GET /version twice (once itself, once through aiodocker's "auto"
    # API version), about 300 ms each on Podman: the container handler paid it per call.
    paths: list[str] = []
    real_query = aiodocker.Docker._do_query

    async def recording_query(self: aiodocker.Docker, path: Any, method: str, **kwargs: Any) -> Any:
        paths.append(str(path))  # a spy: the real call runs
        return await real_query(self, path, method, **kwargs)

    monkeypatch.setattr(aiodocker.Docker, "_do_query", recording_query)
    async with DockerBackend(engine_settings(tmp_path), host=engine.host) as backend:
        assert backend.engine == engine.kind
        assert backend.api_version and backend.docker.api_version == f"v{backend.api_version}"
        assert await backend.has_image(engine.images.busybox)
    assert paths[0] == "_ping" and not any("version" in p for p in paths), paths


async def test_create_then_start_is_run_in_two_steps(engine_backend: DockerBackend, engine: Engine) -> None:
    spec = ServiceSpec(
        name=unique_name("web"),
        image=engine.images.busybox,
        command=["httpd", "-f", "-p", "8080", "-h", "/www"],
        ports=[PortMapping(8080, 0)],
    )
    await engine_backend.prepare([spec])
    created = await engine_backend.create(
        spec, instance_name=unique_name("web"), labels=_labels(engine_backend, spec.name)
    )
    assert created is not None and created.state == "created" and created.ports == {}
    assert created.labels[LABEL_SERVICE] == spec.name and created.address == spec.name
    seen = await engine_backend.inspect(created.id)
    assert (seen.id, seen.name, seen.state) == (created.id, created.name, "created")
    started = await engine_backend.start(created)
    assert started.id == created.id and started.state == "running"
    assert started.ports[8080][1] > 0  # published (engine-chosen) on start
    await engine_backend.remove(started.id)
    # A pinned host port is known before the start: the started instance says what an
    # inspect would say, without asking.
    pinned = attrs.evolve(spec, name=unique_name("pinned"), ports=[PortMapping(8080, free_port())])
    created = await engine_backend.create(
        pinned, instance_name=unique_name("pinned"), labels=_labels(engine_backend, pinned.name)
    )
    assert created is not None
    started = await engine_backend.start(created)
    assert started.state == "running"
    assert (
        started.ports
        == (await engine_backend.inspect(created.id)).ports
        == {8080: ("127.0.0.1", pinned.ports[0].host_port)}
    )
    await engine_backend.remove(started.id)


async def test_a_created_instance_that_cannot_start_is_removed(
    engine_backend: DockerBackend, engine: Engine
) -> None:
    spec = ServiceSpec(name=unique_name("bad"), image=engine.images.busybox, command=["/no/such/binary"])
    await engine_backend.prepare([spec])
    created = await engine_backend.create(
        spec, instance_name=unique_name("bad"), labels=_labels(engine_backend, spec.name)
    )
    assert created is not None
    with pytest.raises(InfraError):
        await engine_backend.start(created)
    with pytest.raises(NotFound):
        await engine_backend.inspect(created.id)


async def _network_names(backend: DockerBackend) -> list[str]:
    found = await backend.docker.networks.list(filters={"name": [backend.network]})
    return [n["Name"] for n in found if n["Name"] == backend.network]


async def test_release_removes_the_network_it_made_once_no_container_is_on_it(
    engine_backend: DockerBackend, engine: Engine
) -> None:
    # Regression: `dspy-infra down` left the service network behind, unlabelled, so nothing
    # could tell it from a user's.
    spec = ServiceSpec(name=unique_name("idle"), image=engine.images.busybox, command=["sleep", "30"])
    await engine_backend.prepare([spec])
    labels = (await engine_backend.docker.networks.list(filters={"name": [engine_backend.network]}))[0][
        "Labels"
    ]
    assert labels == {LABEL_NETWORK: "1"}
    instance = await _run(engine_backend, spec)
    # Anyone's container on it (running, created or exited) keeps it.
    assert await engine_backend.release() is False
    assert await _network_names(engine_backend) == [engine_backend.network]
    await engine_backend.stop(instance.id, timeout=0)
    assert await engine_backend.release() is False  # exited, not yet removed
    await engine_backend.remove(instance.id)
    assert await engine_backend.release() is True
    assert await _network_names(engine_backend) == []
    assert await engine_backend.release() is False  # nothing left to remove: no error
    # The next start makes it again.
    again = await _run(engine_backend, spec)
    assert await _network_names(engine_backend) == [engine_backend.network]
    await engine_backend.remove(again.id)


async def test_release_never_removes_a_network_the_user_made(engine: Engine, tmp_path: Path) -> None:
    settings = engine_settings(tmp_path)
    async with DockerBackend(settings, host=engine.host) as backend:
        await backend.docker.networks.create({"Name": backend.network, "Driver": "bridge"})
        try:
            await backend.prepare([])
            assert await backend.release() is False
            assert await _network_names(backend) == [backend.network]
        finally:
            await _remove_network(backend)


async def test_a_network_released_under_a_create_or_a_start_is_made_again(
    engine: Engine, tmp_path: Path
) -> None:
    # Two owners share the network: one's release may run between the other's network check
    # and its create, or (Docker allows it) between its create and its start.
    settings = engine_settings(tmp_path)
    spec = ServiceSpec(name=unique_name("late"), image=engine.images.busybox, command=["true"])
    async with (
        DockerBackend(settings, host=engine.host) as starter,
        DockerBackend(attrs.evolve(settings, owner=unique_name("other")), host=engine.host) as leaver,
    ):
        try:
            await starter.prepare([spec])
            assert await leaver.release() is True
            instance = await _run(starter, spec)
            assert await _wait_exit_code(starter, instance.id) == 0
            await starter.remove(instance.id)
            created = await starter.create(
                spec, instance_name=unique_name("late"), labels=_labels(starter, spec.name)
            )
            assert created is not None
            assert await leaver.release() is False  # a created container counts as on it
            if engine.kind == "docker":  # Podman refuses to remove a network a created container names
                await _remove_network(leaver)
                assert await _network_names(leaver) == []
            started = await starter.start(created)
            assert await _wait_exit_code(starter, started.id) == 0
            await starter.remove(started.id)
        finally:
            await _remove_network(starter)


async def test_wait_exit_gives_each_exit_code_on_every_engine(
    engine_backend: DockerBackend, engine: Engine
) -> None:
    """The exit code of a one-shot container, whether it ends at once, fails, or outlives the
    first stage of Podman's staged wait (1 s: the wait asks again with a longer interval)."""
    for script, code in (("echo hi", 0), ("exit 3", 3), ("sleep 1.3; exit 5", 5)):
        spec = ServiceSpec(name=unique_name("w"), image=engine.images.busybox, command=["sh", "-c", script])
        instance = await _run(engine_backend, spec)
        with anyio.fail_after(60):
            assert await engine_backend.wait_exit(instance.id) == code, script
        await engine_backend.remove(instance.id)


async def test_wait_exit_on_podman_asks_libpod_with_a_short_interval(
    podman_backend: DockerBackend, podman_engine: Engine
) -> None:
    """Podman's Docker-compatible wait looks at the container every 250 ms (an exit seen up to
    250 ms late, which made the ``container`` task 1.38x a raw container); the backend asks
    libpod's wait with a 10 ms interval first. A spy on the real client records the calls."""
    docker = podman_backend.docker
    asked: list[tuple[str, dict[str, Any]]] = []
    real = docker._query_json

    async def spy(path: str, *args: Any, **kwargs: Any) -> Any:
        asked.append((str(path), dict(kwargs.get("params") or {})))
        return await real(path, *args, **kwargs)

    spec = ServiceSpec(
        name=unique_name("w"), image=podman_engine.images.busybox, command=["sh", "-c", "exit 4"]
    )
    instance = await _run(podman_backend, spec)
    docker._query_json = spy
    try:
        with anyio.fail_after(60):
            assert await podman_backend.wait_exit(instance.id) == 4
    finally:
        del docker._query_json
    waits = [(path, params) for path, params in asked if path.endswith("/wait")]
    # At the libpod version Podman's ping names (a newer prefix is refused by older Podman).
    assert waits and f"v{podman_backend.libpod_api_version}/libpod/containers/" in waits[0][0], waits
    assert waits[0][1]["interval"] == "10ms", waits
    await podman_backend.remove(instance.id)


async def test_a_cancelled_wait_on_podman_leaves_the_container_waitable(
    podman_backend: DockerBackend, podman_engine: Engine
) -> None:
    """Cancelling a wait (a task's timeout) drops the request; the container can still be
    waited for and removed."""
    spec = ServiceSpec(
        name=unique_name("w"), image=podman_engine.images.busybox, command=["sh", "-c", "sleep 2"]
    )
    instance = await _run(podman_backend, spec)
    with anyio.move_on_after(0.3) as scope:
        await podman_backend.wait_exit(instance.id)
    assert scope.cancelled_caught
    with anyio.fail_after(60):
        assert await podman_backend.wait_exit(instance.id) == 0
    await podman_backend.remove(instance.id)
