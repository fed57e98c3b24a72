"""pytest plugin (entry point ``pytest11``): fixtures that spin infra up and tear it down.

Fixtures (all synchronous, so no async test framework is forced on anyone):

- ``infra`` (session): an embedded ``Infra`` on a temporary state directory, running on a
  private event loop in a daemon thread, handed out as a ``SyncInfra`` (coroutine methods
  become blocking calls). Closed at session end.
- ``infra_service`` (session): a factory, ``infra_service("redis") -> ServiceHandle``,
  that starts a service (and its dependencies) once per run and returns its handle (``host``,
  ``port``, ``ports``, ``url``: the same handle as ``infra.services["redis"]``).
- ``infra_endpoints`` (function): ``{name: ServiceHandle}`` for the test's
  ``@pytest.mark.infra_services("redis", ...)`` marker (those services are started before
  the test runs).
- ``infra_config`` / ``infra_service_specs`` (session): override them in a conftest to pass
  settings (``{"task_classes": ...}``) or extra ``ServiceSpec`` objects.

Options: ``--infra-backend auto|process|docker`` and ``--infra-reuse`` (leave services running
for the next run, which adopts them by spec hash instead of starting them again).

Sharing under pytest-xdist: services live in a *coordination directory* shared by all workers
of a run and by successive runs of one project (``<state home>/pytest/<hash of rootdir>``;
its ``home/`` is the state directory of the infra that runs the services). Under an ``fcntl`` lock in that directory a ``state.json``
records, per service, its leader (the worker that started it), its endpoint and the pids of
the workers attached to it. The first worker to ask for a service leads: it marks the service
``starting``, starts it outside the lock, then records the endpoint; the others wait for that
and attach. At session end every worker first detaches from what it attached to, then, for
what it leads, waits until no *living* attached worker is left and stops it. So teardown
happens when the last user leaves, and a crashed worker cannot block it.

Ctrl-C: pytest still runs session finalizers after a ``KeyboardInterrupt``; the teardown is
registered both as a fixture finalizer and as a ``config`` cleanup (idempotent), so the stop
runs either way. If the process is killed outright, the ServiceManager's orphan reaping (by
owner label and owner pid) removes what is left the next time an infra starts on that home.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import json
import os
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import attrs
import pytest

from .config import default_home, load_settings
from .models import ServiceSpec
from .ownership import pid_alive
from .services.handles import ServiceHandle

if TYPE_CHECKING:
    from .sync import LoopThread

__all__ = [
    "ServiceEndpoint",
    "ServiceHandle",
    "infra",
    "infra_config",
    "infra_endpoints",
    "infra_service",
    "infra_service_specs",
    "pytest_addoption",
    "pytest_configure",
]

T = TypeVar("T")

_MARKER = "infra_services"
#: How long a worker waits for another worker to finish starting a service.
_ATTACH_TIMEOUT = 900.0
#: How long a leader waits at session end for the workers still attached to its services.
_DETACH_TIMEOUT = 600.0
_POLL = 0.1


#: The fixtures hand out the same ``ServiceHandle`` as ``infra.services[name]`` (``host``,
#: ``port``, ``ports``, ``url``, ``status``); the old name stays for existing tests.
ServiceEndpoint = ServiceHandle


# ---------------------------------------------------------------------------------------------
# Options and markers


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("dspy-infra", "dspy_infra fixtures")
    group.addoption(
        "--infra-backend",
        choices=("auto", "process", "docker"),
        default=None,
        help="service backend of the infra fixtures (default: the settings' backend, auto)",
    )
    group.addoption(
        "--infra-reuse",
        action="store_true",
        default=False,
        help="leave services running at the end; the next run adopts them by spec hash",
    )


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        f"{_MARKER}(*names): start these dspy_infra services (and their dependencies) before the "
        "test; read their endpoints with the infra_endpoints fixture",
    )


# ---------------------------------------------------------------------------------------------
# Cross-process coordination


class _Coordinator:
    """``state.json`` in a shared directory, read and written only under an fcntl lock."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        self._lock_path = directory / "lock"
        self._state_path = directory / "state.json"

    @contextlib.contextmanager
    def locked(self) -> Iterator[dict[str, Any]]:
        """Yield the state under the lock; changes to it are written back on exit."""
        with self._lock_path.open("a+") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                try:
                    state = json.loads(self._state_path.read_text() or "{}")
                except (FileNotFoundError, json.JSONDecodeError):
                    state = {}
                state.setdefault("services", {})
                yield state
                tmp = self._state_path.with_suffix(".tmp")
                tmp.write_text(json.dumps(state, indent=1, sort_keys=True))
                tmp.replace(self._state_path)
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)


class _Session:
    """Everything the plugin started in this pytest process; ``close()`` undoes it all."""

    def __init__(self, config: pytest.Config, worker_home: Path, shared_dir: Path) -> None:
        self.config = config
        self.backend: str | None = config.getoption("--infra-backend")
        self.reuse: bool = bool(config.getoption("--infra-reuse"))
        self.worker_home = worker_home
        self.coordinator = _Coordinator(shared_dir)
        self.pid = os.getpid()
        self.settings_overrides: dict[str, Any] = {}
        self.extra_specs: list[ServiceSpec] = []
        self._loop: LoopThread | None = None
        self._infra: Any = None
        self._sync_infra: Any = None
        self._host: Any = None  # the Infra that runs the services this worker leads
        self._led: list[str] = []  # services (and dependencies) this worker started
        self._attached: list[str] = []
        self._endpoints: dict[str, ServiceEndpoint] = {}
        self._lock = threading.Lock()
        self._closed = False

    # -- infras ----------------------------------------------------------------------------

    def _loop_thread(self) -> LoopThread:
        if self._loop is None:
            from .sync import LoopThread  # loaded once a test asks for an infra

            self._loop = LoopThread("dspy_infra-pytest")
        return self._loop

    def _new_infra(self, home: Path, **extra: Any) -> Any:
        from .infra import Infra

        # The plugin decides where state lives and that it is embedded; the user's
        # infra_config decides everything else (and the backend when no option is given).
        overrides = {**self.settings_overrides, **extra, "home": home, "mode": "embedded"}
        if self.backend is not None:
            overrides["backend"] = self.backend
        settings = load_settings(None, **overrides)

        async def start() -> Any:
            infra = Infra(settings, services=self.extra_specs)
            await infra.start()
            return infra

        return self._loop_thread().call(start())

    def infra(self) -> Any:
        """This worker's embedded Infra as a ``SyncInfra``."""
        from .sync import SyncInfra

        with self._lock:
            if self._sync_infra is None:
                self._infra = self._new_infra(self.worker_home)
                loop = self._loop_thread()
                self._sync_infra = SyncInfra(loop, self._infra)
            return self._sync_infra

    def _service_host(self) -> Any:
        # Services live on the shared home so every worker's records agree on one owner; the
        # host keeps no durable task state (durable=False), so workers never share a store.
        if self._host is None:
            self._host = self._new_infra(self.coordinator.directory / "home", durable=False)
        return self._host

    # -- services --------------------------------------------------------------------------

    def service(self, name: str) -> ServiceEndpoint:
        if not isinstance(name, str) or not name:
            raise pytest.UsageError(f"infra_service: service name must be a non-empty string, got {name!r}")
        with self._lock:
            if name in self._endpoints:
                return self._endpoints[name]
            endpoint = self._acquire(name)
            self._endpoints[name] = endpoint
            return endpoint

    def _acquire(self, name: str) -> ServiceEndpoint:
        deadline = time.monotonic() + _ATTACH_TIMEOUT
        while True:
            with self.coordinator.locked() as state:
                entry = state["services"].get(name)
                leader_alive = entry is not None and pid_alive(int(entry["leader"]))
                if entry is None or not leader_alive:
                    state["services"][name] = {"leader": self.pid, "status": "starting", "attached": []}
                    lead = True
                elif entry["status"] == "ready":
                    if entry["leader"] != self.pid and self.pid not in entry["attached"]:
                        entry["attached"].append(self.pid)
                        self._attached.append(name)
                    return ServiceEndpoint.from_json(name, entry["endpoint"])
                elif entry["status"] == "failed":
                    raise _ServiceStartFailed(
                        f"service {name!r} failed to start in worker {entry['leader']}: "
                        + entry.get("error", "unknown error")
                    )
                else:
                    lead = False
            if lead:
                return self._lead(name)
            if time.monotonic() > deadline:
                raise _ServiceStartFailed(
                    f"service {name!r}: gave up after {_ATTACH_TIMEOUT:g}s waiting for another worker to start it"
                )
            time.sleep(_POLL)

    def _lead(self, name: str) -> ServiceEndpoint:
        try:
            endpoint = self._loop_thread().call(self._start(self._service_host(), name))
        except BaseException as exc:
            with self.coordinator.locked() as state:
                state["services"][name] = {
                    "leader": self.pid,
                    "status": "failed",
                    "attached": [],
                    "error": str(exc).splitlines()[0] if str(exc) else type(exc).__name__,
                }
            raise
        with self.coordinator.locked() as state:
            state["services"][name] = {
                "leader": self.pid,
                "status": "ready",
                "attached": [],
                "endpoint": endpoint.to_json(),
            }
        return endpoint

    async def _start(self, host: Any, name: str) -> ServiceEndpoint:
        # --infra-reuse keeps them: the next run's infra adopts them instead of reaping them.
        started = await host.services.ensure([name], keep=self.reuse)
        for started_name in [*started, name]:
            if started_name not in self._led:
                self._led.append(started_name)
        handle: ServiceHandle = await host.services.get(name)
        # Handed to every worker through the state file: no log source travels with it.
        return attrs.evolve(handle, log_source=None)

    # -- teardown --------------------------------------------------------------------------

    def close(self) -> None:
        """Detach, stop what this worker leads once nobody uses it, close the infras."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        try:
            self._detach()
            if self._led:
                self._wait_for_attached()
                self._stop_led()
            else:
                self._forget_own_entries()  # e.g. a start that failed here
        finally:
            self._close_infras()

    def _detach(self) -> None:
        if not self._attached:
            return
        with self.coordinator.locked() as state:
            for name in self._attached:
                entry = state["services"].get(name)
                if entry is not None and self.pid in entry.get("attached", []):
                    entry["attached"].remove(self.pid)

    def _forget_own_entries(self) -> None:
        with self.coordinator.locked() as state:
            for name in list(state["services"]):
                if state["services"][name].get("leader") == self.pid:
                    del state["services"][name]

    def _wait_for_attached(self) -> None:
        deadline = time.monotonic() + _DETACH_TIMEOUT
        while True:
            with self.coordinator.locked() as state:
                users = {
                    pid
                    for name, entry in state["services"].items()
                    if entry.get("leader") == self.pid
                    for pid in entry.get("attached", [])
                    if pid_alive(int(pid))
                }
                if not users:
                    # Nobody can attach any more: the entries go before the services do.
                    for name in list(state["services"]):
                        if state["services"][name].get("leader") == self.pid:
                            del state["services"][name]
                    return
            if time.monotonic() > deadline:
                warnings.warn(
                    f"dspy_infra: workers {sorted(users)} still use services led by {self.pid}; stopping anyway",
                    stacklevel=1,
                )
                self._forget_own_entries()
                return
            time.sleep(_POLL)

    def _stop_led(self) -> None:
        if self.reuse or self._host is None:
            return
        host = self._host
        self._loop_thread().call(_maybe_await(host.services.stop(list(reversed(self._led)))))
        self._led.clear()

    def _close_infras(self) -> None:
        if self._loop is None:
            return
        for infra in (self._host, self._infra):
            if infra is not None:
                try:
                    self._loop.call(infra.aclose())
                except Exception as exc:  # teardown must go on; say what failed
                    warnings.warn(f"dspy_infra: closing an infra failed: {exc}", stacklevel=1)
        self._host = self._infra = self._sync_infra = None
        self._loop.close()
        self._loop = None


class _ServiceStartFailed(Exception):
    """Another worker failed to start a service this worker asked for."""


async def _maybe_await(value: Any) -> Any:
    if asyncio.iscoroutine(value) or isinstance(value, asyncio.Future):
        return await value
    return value


def _shared_dir(config: pytest.Config) -> Path:
    """Where the workers of a run, and successive runs, of one project meet: a directory per
    rootdir under the state home. Its services are adopted by the next run (by spec hash)
    whether or not they were kept with ``--infra-reuse``, so a run without it cleans up."""
    root = str(config.rootpath.resolve())
    return default_home() / "pytest" / hashlib.sha256(root.encode()).hexdigest()[:12]


# ---------------------------------------------------------------------------------------------
# Fixtures


@pytest.fixture(scope="session")
def infra_config() -> dict[str, Any]:
    """Settings overrides for the plugin's infras (override in a conftest)."""
    return {}


@pytest.fixture(scope="session")
def infra_service_specs() -> Sequence[ServiceSpec]:
    """Extra ``ServiceSpec`` objects the plugin's infras know (override in a conftest)."""
    return ()


@pytest.fixture(scope="session")
def _dspy_infra_session(
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    infra_config: dict[str, Any],
    infra_service_specs: Sequence[ServiceSpec],
) -> Iterator[_Session]:
    config = request.config
    session = _Session(
        config,
        worker_home=tmp_path_factory.mktemp("dspy-infra-home"),
        shared_dir=_shared_dir(config),
    )
    session.settings_overrides = dict(infra_config)
    session.extra_specs = list(infra_service_specs)
    # Either path runs the teardown: the fixture finalizer normally, the config cleanup if
    # the session ended some other way. close() is idempotent.
    config.add_cleanup(session.close)
    try:
        yield session
    finally:
        session.close()


@pytest.fixture(scope="session")
def infra(_dspy_infra_session: _Session) -> Any:
    """An embedded Infra (as a blocking ``SyncInfra``) on a temporary state directory."""
    return _dspy_infra_session.infra()


@pytest.fixture(scope="session")
def infra_service(_dspy_infra_session: _Session) -> Callable[[str], ServiceEndpoint]:
    """``infra_service("redis") -> ServiceEndpoint``: start once per run (shared by xdist
    workers), stopped at session end unless ``--infra-reuse``."""
    return _dspy_infra_session.service


@pytest.fixture
def infra_endpoints(request: pytest.FixtureRequest) -> dict[str, ServiceEndpoint]:
    """Endpoints of the services named by the test's ``infra_services`` markers."""
    names = _marker_names(request.node)
    if not names:
        return {}
    factory: Callable[[str], ServiceEndpoint] = request.getfixturevalue("infra_service")
    return {name: factory(name) for name in names}


@pytest.fixture(autouse=True)
def _dspy_infra_marker_services(request: pytest.FixtureRequest) -> None:
    if _marker_names(request.node):
        request.getfixturevalue("infra_endpoints")


def _marker_names(node: pytest.Item | Any) -> list[str]:
    names: list[str] = []
    for marker in node.iter_markers(_MARKER):
        for name in marker.args:
            if not isinstance(name, str) or not name:
                raise pytest.UsageError(
                    f"@pytest.mark.{_MARKER}: service names must be non-empty strings, got {name!r}"
                )
            if name not in names:
                names.append(name)
    return names
