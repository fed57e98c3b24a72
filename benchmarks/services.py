"""Service start cost through dspy_infra against raw aiodocker and testcontainers, on the real
engines (Docker Engine and Podman), the same Redis image, the same finish line.

The finish line of every start is the same event: Redis answers ``PING`` with ``+PONG`` on
the published port. A bare TCP accept is not used: Docker's port proxy accepts on the host
port before Redis listens inside, so an accept would time the proxy, not the service.

1. **Start.** ``--n`` rounds; each round runs every variant once, in a new (seeded, shuffled)
   order so the drift of a shared machine and the leftovers of the previous start fall on
   all alike, and removes what it started (untimed):

   - *raw*: aiodocker ``containers.create`` + ``start`` with the exact create body dspy_infra
     sends (the service network with the service's alias), then a ``PING`` every 5 ms;
   - *raw_bridge*: the same on the engine's default ``bridge`` network (no user network: what
     testcontainers and a plain ``docker run -p`` do), to show what the service network costs;
   - *dspy*: ``ServiceManager.ensure(["redis"])`` on an open manager: the whole user path
     (orphan sweep, adoption check, create, start, the ``redis`` health probe);
   - *dspy_bridge*: the same with ``network_mode = "bridge"`` (the service on the engine's
     default network, as testcontainers puts it: faster, without a name or the isolation);
   - *testcontainers*: ``RedisContainer(image).start()`` with its defaults (run in a worker
     thread; its Ryuk reaper off: no Ryuk image offline; connection mode ``docker_host``),
     where the package is installed.

   Ratios are medians of per-round ratios (the variants of a round ran back to back).
   Target: ``start_ratio`` (dspy over raw) <= 1.05, and dspy ahead of testcontainers
   (``start_dspy_over_testcontainers``; on the same network as testcontainers:
   ``start_dspy_bridge_over_testcontainers``).

2. **Graph.** A three-level Redis graph (``base`` -> ``left``, ``right`` -> ``top``) brought up
   by ``ServiceManager.ensure(["top"])`` against its critical path: the sum over levels of the
   slowest *single* start in that level (``DockerBackend.run`` + the health wait, each alone),
   measured in the same rounds. Also raw aiodocker starting each level's containers at once,
   level after level (the engine's own cost of parallel starts). Target: ``graph_ratio`` <= 1.1.

3. **Container handler.** The ``container`` task handler against a raw one-shot container
   (``benchmarks/containers.py``). Target: the task <= 1.1x raw on both engines.

4. **Phases** (``--phases N``, first). Where the engine spends one start call: the same
   create body on the service network and on the default ``bridge``, split by the engine's
   own events (``network connect``, then ``start``). On Docker the service network's extra is
   between the two: the runtime's prestart hook sets up the embedded DNS resolver that every
   user-defined network gets (the default ``bridge`` has none), whatever the create body says.

Engines come from ``tests/engines.py`` (``bash scripts/engines.sh start``); the Redis image
is built there from the host's ``redis-server`` (no registry needed). Prints each figure with
its ratio; the last line is one JSON object (keys prefixed by engine).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))  # the test image builders (one place for them)

import aiodocker  # noqa: E402
import anyio  # noqa: E402
import attrs  # noqa: E402
import containers  # noqa: E402  (benchmarks/containers.py: the container handler row)
import engines  # noqa: E402

from dspy_infra.backends.base import LABEL_OWNER, LABEL_SERVICE  # noqa: E402
from dspy_infra.backends.docker import DockerBackend, container_config  # noqa: E402
from dspy_infra.config import Settings  # noqa: E402
from dspy_infra.events import EventBus  # noqa: E402
from dspy_infra.metrics import InfraMetrics  # noqa: E402
from dspy_infra.models import DependsOn, HealthCheck, PortMapping, ServiceSpec  # noqa: E402
from dspy_infra.plugins import build_plugin_manager  # noqa: E402
from dspy_infra.services.health import wait_until_healthy  # noqa: E402
from dspy_infra.services.manager import ServiceManager  # noqa: E402

__all__ = ["main", "redis_answers"]

_POLL = 0.005  # raw paths: seconds between PINGs (tighter than any health schedule)
_SETTLE = 0.2  # after removing a container the engine still tears down its network: let it
_PING = b"*1\r\n$4\r\nPING\r\n"


def _spec(name: str, image: str, port: int, deps: Sequence[str] = ()) -> ServiceSpec:
    return ServiceSpec(
        name=name,
        image=image,
        ports=[PortMapping(6379, port)],
        depends_on=[DependsOn(d) for d in deps],
        health=HealthCheck(kind="redis", interval=0.5, startup_timeout=60),
    )


async def redis_answers(port: int, host: str = "127.0.0.1") -> None:
    """Poll until Redis behind ``host:port`` answers PING with +PONG (raw sockets)."""
    while True:
        try:
            reader, writer = await asyncio.open_connection(host, port)
            try:
                writer.write(_PING)
                if (await reader.readline()).startswith(b"+PONG"):
                    return
            finally:
                writer.close()
        except OSError:
            pass
        await asyncio.sleep(_POLL)


def _median_ratio(top: list[float], bottom: list[float]) -> float:
    return statistics.median(t / b for t, b in zip(top, bottom, strict=True))


class Bench:
    """One engine: an open backend (its own network and owner), the images, the samples."""

    def __init__(self, kind: str, host: str, backend: DockerBackend, images: engines.TestImages, home: Path):
        self.kind, self.host, self.backend, self.images, self.home = kind, host, backend, images, home
        self.owner = backend.settings.resolved_owner()

    def labels(self, service: str) -> dict[str, str]:
        return {LABEL_OWNER: self.owner, LABEL_SERVICE: service}

    async def clean(self) -> None:
        for instance in await self.backend.list_instances({LABEL_OWNER: self.owner}):
            await self.backend.remove(instance.id)
        await asyncio.sleep(_SETTLE)

    def manager(self, specs: Sequence[ServiceSpec]) -> ServiceManager:
        settings = Settings(
            home=self.home, backend="docker", network=self.backend.network, owner=self.backend.settings.owner
        )
        return ServiceManager(
            settings,
            bus=EventBus(),
            metrics=InfraMetrics(),
            plugins=build_plugin_manager(load_entry_points=False),
            backend=self.backend,
            extra_services=specs,
        )

    # -- single starts -------------------------------------------------------------------

    async def raw(self, *, bridge: bool = False, service: str = "redis") -> float:
        port = engines.free_port()
        spec = _spec(service, self.images.redis, port)
        network = "bridge" if bridge else self.backend.network
        config = container_config(spec, instance_name=service, labels=self.labels(service), network=network)
        started = time.perf_counter()
        container = await self.backend.docker.containers.create(
            config, name=f"bench-raw-{uuid.uuid4().hex[:8]}"
        )
        await container.start()
        await redis_answers(port)
        return time.perf_counter() - started

    async def dspy(self, *, network_mode: str = "service") -> float:
        spec = attrs.evolve(_spec("redis", self.images.redis, engines.free_port()), network_mode=network_mode)
        async with self.manager([spec]) as manager:
            started = time.perf_counter()
            await manager.ensure(["redis"])
            elapsed = time.perf_counter() - started
            await manager.stop(timeout=2)
        return elapsed

    async def single(self, name: str) -> float:
        """One service alone through the backend and the health wait (the graph's unit)."""
        spec = _spec(name, self.images.redis, engines.free_port())
        started = time.perf_counter()
        instance = await self.backend.run(
            spec, instance_name=f"bench-{name}-{uuid.uuid4().hex[:8]}", labels=self.labels(name)
        )
        await wait_until_healthy(self.backend, spec, instance)
        return time.perf_counter() - started

    async def testcontainers(self) -> float:
        from testcontainers.community.redis import RedisContainer

        def run() -> float:
            container = RedisContainer(self.images.redis)  # its docker client: before the clock
            container.with_kwargs(labels=self.labels("testcontainers"))
            started = time.perf_counter()
            container.start()  # returns once its redis client's PING succeeded
            elapsed = time.perf_counter() - started
            container.stop()
            return elapsed

        return await anyio.to_thread.run_sync(run)

    # -- graph ---------------------------------------------------------------------------

    async def graph_wall(self) -> float:
        specs = [
            _spec(name, self.images.redis, engines.free_port(), deps)
            for level in _LEVELS
            for name, deps in level
        ]
        async with self.manager(specs) as manager:
            started = time.perf_counter()
            await manager.ensure(["top"])
            elapsed = time.perf_counter() - started
            await manager.stop(timeout=2)
        return elapsed

    async def critical_path(self) -> float:
        total = 0.0
        for level in _LEVELS:
            slowest = 0.0
            for name, _deps in level:
                slowest = max(slowest, await self.single(name))
                await self.clean()
            total += slowest
        return total

    async def raw_levels(self) -> float:
        total = 0.0
        for level in _LEVELS:
            started = time.perf_counter()
            await asyncio.gather(*(self.raw(service=name) for name, _deps in level))
            total += time.perf_counter() - started
            await self.clean()
        return total


_LEVELS: tuple[tuple[tuple[str, tuple[str, ...]], ...], ...] = (
    (("base", ()),),
    (("left", ("base",)), ("right", ("base",))),
    (("top", ("left", "right")),),
)


def _engine_calls(metrics: InfraMetrics) -> list[str]:
    """``operation: n calls, total ms`` per engine call recorded in ``metrics``."""
    counts: dict[str, float] = {}
    sums: dict[str, float] = {}
    for family in metrics.docker_api_duration_seconds.collect():
        for sample in family.samples:
            operation = sample.labels.get("operation", "")
            if sample.name.endswith("_count"):
                counts[operation] = counts.get(operation, 0) + sample.value
            elif sample.name.endswith("_sum"):
                sums[operation] = sums.get(operation, 0) + sample.value
    return [f"{op:18s} n={counts[op]:3.0f}  {sums.get(op, 0) * 1000:8.1f} ms" for op in sorted(counts)]


async def engine_call_rows(bench: Bench) -> None:
    """Which engine calls one open, one single start and one graph make, and their time."""
    for title, run in (
        ("open a backend", None),
        ("one start (ServiceManager.ensure)", bench.dspy),
        ("the graph (ServiceManager.ensure)", bench.graph_wall),
    ):
        metrics = InfraMetrics()
        if run is None:
            async with DockerBackend(bench.backend.settings, host=bench.host, metrics=metrics) as fresh:
                await fresh.has_image(bench.images.redis)
        else:
            saved, bench.backend.metrics = bench.backend.metrics, metrics
            try:
                await run()
            finally:
                bench.backend.metrics = saved
            await bench.clean()
        print(f"{bench.kind:6s} engine calls: {title}")
        for line in _engine_calls(metrics):
            print(f"{bench.kind:6s}   {line}")


async def phase_rows(bench: Bench, rounds: int) -> dict[str, Any]:
    """Where one ``POST /containers/{id}/start`` spends its time, on the service network
    and on the default ``bridge`` (the same create body otherwise), from the engine's own
    event stamps: the call until the endpoint's ``network connect`` event (address, port
    publishing), from there to the container's ``start`` event (runtime create, the
    network namespace set up in the runtime's prestart hook, where a user-defined network
    also gets its embedded DNS resolver; then the process starts) and the reply after it."""
    docker = bench.backend.docker
    subscriber = docker.events.subscribe()
    stamps: dict[str, dict[str, float]] = {}

    async def read_events() -> None:
        while (event := await subscriber.get()) is not None:
            actor = event.get("Actor") or {}
            attributes = actor.get("Attributes") or {}
            who = attributes.get("container") if event.get("Type") == "network" else actor.get("ID")
            if who:
                stamps.setdefault(str(who), {})[str(event.get("Action"))] = event["timeNano"] / 1e9

    samples: dict[str, list[tuple[float, float, float, float]]] = {"network": [], "bridge": []}
    shuffler = random.Random(13)
    async with anyio.create_task_group() as tg:
        tg.start_soon(read_events)
        await asyncio.sleep(0.2)  # the subscription is open before the first start
        for round_ in range(rounds + 1):  # round 0 warms up, untimed
            for kind in shuffler.sample(list(samples), len(samples)):
                network = bench.backend.network if kind == "network" else "bridge"
                spec = _spec("redis", bench.images.redis, engines.free_port())
                config = container_config(
                    spec, instance_name="redis", labels=bench.labels("redis"), network=network
                )
                container = await docker.containers.create(config, name=f"bench-phase-{uuid.uuid4().hex[:8]}")
                called = time.time()
                await container.start()
                replied = time.time()
                await asyncio.sleep(0.1)  # the events arrive
                seen = stamps.pop(container.id, {})
                if round_ and "connect" in seen and "start" in seen:
                    samples[kind].append(
                        (
                            seen["connect"] - called,
                            seen["start"] - seen["connect"],
                            replied - seen["start"],
                            replied - called,
                        )
                    )
                await bench.clean()
        await docker.events.stop()
        tg.cancel_scope.cancel()
    out: dict[str, Any] = {}
    for kind, values in samples.items():
        medians = [statistics.median(v[i] for v in values) * 1000 for i in range(4)]
        print(
            f"{bench.kind:6s} start call on {kind:7s}  to network connect {medians[0]:6.1f} ms,"
            f" to start event {medians[1]:6.1f} ms, to reply {medians[2]:5.1f} ms; whole call {medians[3]:6.1f} ms"
            f"  (n={len(values)})"
        )
        out[f"phase_{kind}_start_call_ms"] = round(medians[3], 1)
    if samples["network"] and samples["bridge"]:
        ratio = _median_ratio([v[3] for v in samples["network"]], [v[3] for v in samples["bridge"]])
        out["phase_network_over_bridge"] = round(ratio, 3)
        print(f"{bench.kind:6s} start call: service network / default bridge  {ratio:.3f}")
    return out


def _testcontainers_missing() -> str:
    try:
        import testcontainers.community.redis  # noqa: F401
    except ImportError as exc:
        return f"testcontainers[redis] is not installed ({exc}); pip install 'testcontainers>=4.8' redis"
    return ""


async def _rounds(
    bench: Bench, variants: dict[str, Callable[[], Awaitable[float]]], rounds: int
) -> dict[str, list[float]]:
    names = list(variants)
    samples: dict[str, list[float]] = {name: [] for name in names}
    for name in names:  # one untimed run of each warms the engine's caches and our pools
        await variants[name]()
        await bench.clean()
    shuffler = random.Random(11)  # seeded: the same orders each run
    for _ in range(rounds):
        # A new order each round: a rotation keeps each variant behind the same neighbour,
        # whose leftovers (a force-removed container's network still being torn down) it
        # would always inherit.
        for name in shuffler.sample(names, len(names)):
            samples[name].append(await variants[name]())
            await bench.clean()
    return samples


async def start_rows(bench: Bench, rounds: int, skip_tc: str) -> dict[str, Any]:
    variants: dict[str, Callable[[], Awaitable[float]]] = {
        "raw": bench.raw,
        "raw_bridge": lambda: bench.raw(bridge=True),
        "dspy": bench.dspy,
        "dspy_bridge": lambda: bench.dspy(network_mode="bridge"),
    }
    if not skip_tc:
        variants["testcontainers"] = bench.testcontainers
    samples = await _rounds(bench, variants, rounds)
    out: dict[str, Any] = {}
    for name, values in samples.items():
        ms = statistics.median(values) * 1000
        ratio = _median_ratio(values, samples["raw"])
        out[f"start_{name}_ms"] = round(ms, 1)
        out[f"start_{name}_over_raw"] = round(ratio, 3)
        print(
            f"{bench.kind:6s} start {name:15s} median {ms:7.1f} ms  (min {min(values) * 1000:6.1f})"
            f"  x{ratio:.3f} of raw  (n={rounds})"
        )
    out["start_ratio"] = out["start_dspy_over_raw"]
    print(f"{bench.kind:6s} start dspy/raw        {out['start_ratio']:.3f}  (target <= 1.05)")
    if skip_tc:
        print(f"{bench.kind:6s} start testcontainers  skipped: {skip_tc}")
    else:
        vs_tc = _median_ratio(samples["dspy"], samples["testcontainers"])
        out["start_dspy_over_testcontainers"] = round(vs_tc, 3)
        print(f"{bench.kind:6s} start dspy/testcont.  {vs_tc:.3f}  (target < 1: ahead of testcontainers)")
        vs_tc_bridge = _median_ratio(samples["dspy_bridge"], samples["testcontainers"])
        out["start_dspy_bridge_over_testcontainers"] = round(vs_tc_bridge, 3)
        print(
            f"{bench.kind:6s} start dspy(bridge)/tc  {vs_tc_bridge:.3f}"
            '  (network_mode = "bridge", the network testcontainers uses)'
        )
    return out


async def graph_rows(bench: Bench, rounds: int) -> dict[str, Any]:
    samples = await _rounds(
        bench, {"wall": bench.graph_wall, "path": bench.critical_path, "raw_levels": bench.raw_levels}, rounds
    )
    wall, path, raw = (statistics.median(samples[k]) * 1000 for k in ("wall", "path", "raw_levels"))
    ratio = _median_ratio(samples["wall"], samples["path"])
    vs_raw = _median_ratio(samples["wall"], samples["raw_levels"])
    print(
        f"{bench.kind:6s} graph 3 levels wall    median {wall:7.1f} ms  (ServiceManager.ensure, n={rounds})"
    )
    print(
        f"{bench.kind:6s} graph critical path    median {path:7.1f} ms  (sum of the slowest single start per level)"
    )
    print(
        f"{bench.kind:6s} graph raw level floor  median {raw:7.1f} ms  (raw aiodocker, a level's containers at once)"
    )
    print(f"{bench.kind:6s} graph wall/path        {ratio:.3f}  (target <= 1.1)")
    print(f"{bench.kind:6s} graph wall/raw levels  {vs_raw:.3f}")
    return {
        "graph_wall_ms": round(wall, 1),
        "graph_critical_path_ms": round(path, 1),
        "graph_raw_levels_ms": round(raw, 1),
        "graph_ratio": round(ratio, 3),
        "graph_over_raw_levels": round(vs_raw, 3),
    }


async def run_engine(
    kind: str,
    host: str,
    rounds: tuple[int, int, int],
    contexts: dict[str, tuple[bytes, str]],
    skip_tc: str,
    calls: bool = False,
    phases: int = 0,
) -> dict[str, Any]:
    start_rounds, graph_rounds, container_rounds = rounds
    async with aiodocker.Docker(url=host) as docker:
        images = await engines.ensure_test_images(docker, contexts)
    with tempfile.TemporaryDirectory(prefix="dspy-bench-") as tmp:
        settings = Settings(
            home=Path(tmp) / "home",
            network=f"bench-{uuid.uuid4().hex[:8]}",
            owner=f"bench-{uuid.uuid4().hex[:8]}",
        )
        async with DockerBackend(settings, host=host) as backend:
            bench = Bench(kind, host, backend, images, Path(tmp) / "manager-home")
            print(
                f"{kind:6s} engine {backend.engine} API {backend.api_version} at {host}; image {images.redis}"
            )
            try:
                # The network is made here, as a user's: one the backend made goes with the
                # last container on it (Backend.release), and the raw variants share it.
                await backend.docker.networks.create({"Name": settings.network, "Driver": "bridge"})
                await backend.prepare([_spec("redis", images.redis, 0)])
                if calls:
                    await engine_call_rows(bench)
                out = await phase_rows(bench, phases) if phases else {}
                if start_rounds:
                    out |= await start_rows(bench, start_rounds, skip_tc)
                if graph_rounds:
                    out |= await graph_rows(bench, graph_rounds)
                if container_rounds:
                    out |= await containers.run_engine(kind, host, images.busybox, container_rounds)
                return out
            finally:
                with anyio.CancelScope(shield=True):
                    await bench.clean()
                    with contextlib.suppress(aiodocker.DockerError):
                        await (await backend.docker.networks.get(settings.network)).delete()


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--engine", choices=[*engines.ENGINE_KINDS, "all"], default="all")
    parser.add_argument(
        "--n", type=int, default=10, help="start rounds (each runs every variant once; 0: skip)"
    )
    parser.add_argument("--rounds", type=int, default=5, help="graph rounds (0: skip the graph)")
    parser.add_argument(
        "--containers", type=int, default=10, help="container handler rounds (0: skip that row)"
    )
    parser.add_argument(
        "--calls", action="store_true", help="first print the engine calls of an open, a start and the graph"
    )
    parser.add_argument(
        "--phases",
        type=int,
        default=0,
        metavar="N",
        help="first time N start calls on the service network and on the default bridge, split by the engine's events",
    )
    args = parser.parse_args(argv)
    kinds = engines.ENGINE_KINDS if args.engine == "all" else (args.engine,)
    # Its Ryuk reaper container image is not here offline; our rounds remove what they start.
    os.environ.setdefault("TESTCONTAINERS_RYUK_DISABLED", "true")
    # The engines publish ports on this host's 127.0.0.1. Inside a container testcontainers
    # would otherwise guess a gateway address (and fails on Podman, whose list has no HostConfig).
    os.environ.setdefault("TESTCONTAINERS_CONNECTION_MODE", "docker_host")
    skip_tc = _testcontainers_missing()
    contexts = engines.image_build_contexts()  # reads host files: before any event loop
    result: dict[str, Any] = {}
    for kind in kinds:
        host = engines._host_for(kind)
        if not engines._ping(host):
            print(f"{kind:6s} skipped: no engine answers at {host} (bash scripts/engines.sh start)")
            continue
        os.environ["DOCKER_HOST"] = host  # testcontainers' docker client reads it
        rounds = (args.n, args.rounds, args.containers)
        found = asyncio.run(run_engine(kind, host, rounds, contexts, skip_tc, args.calls, args.phases))
        result |= {f"{kind}_{key}": value for key, value in found.items()}
    print(json.dumps(result, sort_keys=True))


if __name__ == "__main__":
    main()
