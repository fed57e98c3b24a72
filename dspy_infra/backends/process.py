"""The local-process backend: each service is a process group on this machine.

How an instance runs (the same idea as Podman's ``conmon``): a tiny supervisor *shim*
(``python -S``, stdlib only) is started in a new session, forks into the background and
starts the service's command in its process group. The shim is what owns the service's
stdout/stderr pipes: it writes every line, timestamped, to ``stdout.log`` / ``stderr.log``
and, when the service exits, its exit code to ``exit.json``. So a service keeps running,
keeps logging and has a known exit code even after the Python process that started it died,
which is what lets a later ``ServiceManager`` adopt it.

Each instance lives in ``<home>/services/<instance name>/``: ``record.json`` (labels, pids,
the service's ``/proc`` start time, ports, environment, start time), the two log files and
``exit.json`` (a log beyond ``log_max_bytes`` is rotated to ``<stream>.log.1``, one older file
kept). ``list_instances`` reads these records; a pid is trusted only while
``/proc/PID/stat`` shows the same start time, and a zombie (state ``Z``) counts as exited.

Ports: a process binds whatever its command says. When the command or environment takes a
port from a placeholder (``{port}``, ``{port.6379}``, see ``backends/base.py``), an unpinned
mapping (``ports = [6379]``, host port 0/None) gets a free host port and a pinned one
(``"16379:6379"``) its host port, and the placeholder is filled with it; the record keeps
``{container port: host port}`` so probes and handles find it. Without a placeholder the
process binds the container port itself, so that is its host port, and a pinned host port
that differs is refused with a ``SpecError`` naming the placeholder to use. A pinned or fixed
port that is already taken is a ``BackendError`` before anything starts.

Volumes are refused (a process sees the host's files directly; nothing to mount); resource
limits are not applied. Stopping sends SIGTERM to the process group and SIGKILL after the
timeout. Network counters are reported as 0: a process in the host network namespace has no
counters of its own.

Size: a little over 600 lines: one backend; its supervisor shim is ``supervisor.py``.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from pathlib import Path

import anyio
import attrs

from ..config import Settings
from ..errors import AlreadyExists, BackendError, MissingBinary, NotFound, SpecError
from ..metrics import InfraMetrics
from ..models import ExecResult, ImagePullProgress, Instance, LogEntry, ResourceUsage, ServiceSpec
from ..ownership import pid_alive, proc_stat
from .base import (
    Backend,
    expand_port_placeholders,
    free_port,
    host_port_placeholders,
    listen_port_placeholders,
)

__all__ = ["APT_PACKAGES", "ProcessBackend"]

#: Debian package that provides a binary, for the "install it" hint.
APT_PACKAGES = {
    "redis-server": "redis-server",
    "redis-cli": "redis-tools",
    "prometheus": "prometheus",
    "etcd": "etcd-server",
    "busybox": "busybox-static",
    "python3": "python3",
}

_CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
_STATS_INTERVAL = 0.1
_FOLLOW_POLL = 0.1
#: A claimed instance directory without a record after this long was left by a crash.
_CLAIM_STALE = 30.0

#: The supervisor shim (``supervisor.py``), run as a script: see there.
_SHIM = str(Path(__file__).with_name("supervisor.py"))


def _stat_fields(pid: int | str) -> list[str] | None:
    """Fields of ``/proc/PID/stat`` from field 3 (the state letter) on, None if gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            raw = fh.read().decode("utf-8", "replace")
    except OSError:
        return None
    # The command name (field 2) may contain spaces and parentheses: split after the last ')'.
    return raw[raw.rfind(")") + 2 :].split()


def _proc_cpu_rss(pid: int) -> tuple[int, int] | None:
    """(utime + stime ticks, resident bytes) of ``pid``."""
    fields = _stat_fields(pid)
    return None if fields is None else (int(fields[11]) + int(fields[12]), int(fields[21]) * _PAGE)


def _group_members(pgid: int, exclude: int) -> list[int]:
    """Live pids in process group ``pgid`` (scanning /proc), except ``exclude`` (the shim)."""
    out: list[int] = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == exclude:
            continue
        fields = _stat_fields(entry)
        if fields is not None and int(fields[2]) == pgid and fields[0] not in ("Z", "X"):
            out.append(int(entry))
    return out


@attrs.frozen
class _Record:
    """What ``record.json`` holds about one instance."""

    id: str
    name: str
    labels: dict[str, str]
    pid: int
    pgid: int
    shim_pid: int
    proc_start: int
    ports: dict[int, tuple[str, int]]
    started_at: float
    command: tuple[str, ...]
    environment: dict[str, str]
    workdir: str | None

    def to_json(self) -> str:
        doc = attrs.asdict(self)
        doc["ports"] = {str(k): list(v) for k, v in self.ports.items()}
        return json.dumps(doc, indent=1, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> _Record:
        doc = json.loads(text)
        doc["ports"] = {int(k): (str(v[0]), int(v[1])) for k, v in doc["ports"].items()}
        doc["command"] = tuple(doc["command"])
        return cls(**doc)


def _read_tail(path: Path, offset: int) -> bytes:
    """Whole lines of ``path`` from ``offset`` on (empty when it does not exist)."""
    try:
        with open(path, "rb") as fh:
            fh.seek(offset)
            data = fh.read()
    except FileNotFoundError:
        return b""
    return data[: data.rfind(b"\n") + 1]


def _install_hint(binary: str) -> str:
    pkg = APT_PACKAGES.get(os.path.basename(binary))
    install = f"install it (apt-get install -y {pkg})" if pkg else f"install {binary!r} so it is on PATH"
    return f'{install}, or use backend="docker"'


#: How often an assigned port is picked again when it was taken before the service started.
_PORT_PICKS = 5


def _bind_error(ip: str, port: int) -> str | None:
    """Why ``ip:port`` cannot be bound now (None: it can)."""
    family = socket.AF_INET6 if ":" in ip else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((ip, port))
        except OSError as exc:
            return exc.strerror or str(exc)
    return None


def _bindable(ip: str, port: int) -> bool:
    return _bind_error(ip, port) is None


def as_process(spec: ServiceSpec) -> ServiceSpec:
    """``spec`` as a process runs it: ``entrypoint + command`` (a container's ENTRYPOINT and
    CMD); ``network_mode`` means nothing here, a process is on the host's network."""
    if spec.entrypoint is None:
        return spec
    return attrs.evolve(spec, command=(*spec.entrypoint, *spec.command), entrypoint=None)


class ProcessBackend(Backend):
    """Runs each service's ``command`` as a local process group (see the module docstring)."""

    name = "process"
    binds_host_ports = True

    def __init__(
        self,
        settings: Settings | None = None,
        *,
        home: str | os.PathLike[str] | None = None,
        metrics: InfraMetrics | None = None,
        log_max_bytes: int = 64 << 20,
    ) -> None:
        base = Path(home) if home is not None else (settings or Settings()).resolved_home()
        self.root = base / "services"
        self.metrics = metrics
        #: Each log file is rotated to ``<stream>.log.1`` beyond this size (one old file kept).
        self.log_max_bytes = log_max_bytes
        #: Host ports that prepared specs pin (never handed out as a free port).
        self._pinned: set[int] = set()

    # -- lifecycle -------------------------------------------------------------------------

    async def open(self) -> None:
        await anyio.to_thread.run_sync(lambda: self.root.mkdir(parents=True, exist_ok=True))

    async def aclose(self) -> None:
        """Nothing to release: instances keep running (their shims own them)."""

    # -- helpers ---------------------------------------------------------------------------

    def _dir(self, instance_id: str) -> Path:
        if not instance_id or "/" in instance_id or instance_id.startswith("."):
            raise NotFound(f"no process instance {instance_id!r}", field="instance_id")
        return self.root / instance_id

    def _read_record(self, instance_id: str) -> _Record:
        try:
            return _Record.from_json((self._dir(instance_id) / "record.json").read_text())
        except FileNotFoundError:
            raise NotFound(f"no process instance {instance_id!r}", field="instance_id") from None
        except (ValueError, KeyError, TypeError) as exc:
            raise BackendError(f"corrupt record for {instance_id!r}: {exc}") from None

    def _instance(self, rec: _Record) -> Instance:
        exit_file = self._dir(rec.id) / "exit.json"
        running = pid_alive(rec.pid, rec.proc_start)
        exit_code: int | None = None
        if not running:
            # The shim records the exit code a moment after the service exits (once it has
            # drained the pipes); wait for that briefly rather than report no code.
            for _ in range(200):
                if exit_file.exists() or not pid_alive(rec.shim_pid):
                    break
                time.sleep(0.005)
            try:
                exit_code = int(json.loads(exit_file.read_text())["exit_code"])
            except (OSError, ValueError, KeyError):
                exit_code = None  # killed together with its shim: no code recorded
        return Instance(
            id=rec.id,
            name=rec.name,
            labels=dict(rec.labels),
            state="running" if running else "exited",
            exit_code=exit_code,
            ports=dict(rec.ports),
            started_at=rec.started_at,
            engine_health=None,
            address="127.0.0.1",
        )

    def _inspect_sync(self, instance_id: str) -> Instance:
        return self._instance(self._read_record(instance_id))

    @staticmethod
    def _env(environment: Mapping[str, str]) -> dict[str, str]:
        env = dict(os.environ)
        env.update(environment)
        return env

    @staticmethod
    def _check_volumes(spec: ServiceSpec) -> None:
        # A process sees the host's files as they are: there is nothing to mount, and a bind
        # mount of a host path at the same path (the built-in Prometheus's) is already true.
        # Refusing the others is kinder than silently running without the files they ask for.
        moved = [v for v in spec.volumes if not (v.source.startswith("/") and v.source == v.target)]
        if moved:
            raise SpecError(
                f"the process backend cannot mount volumes ({moved[0].source}:{moved[0].target})",
                field=f"services.{spec.name}.volumes",
                fix="point the command at host paths (or set workdir), or use backend='docker'",
            )

    @staticmethod
    def _check_user(spec: ServiceSpec) -> None:
        if spec.user and spec.user not in (str(os.getuid()), f"{os.getuid()}:{os.getgid()}"):
            raise SpecError(
                f"a process runs as you (uid {os.getuid()}), not as {spec.user!r}",
                field=f"services.{spec.name}.user",
                fix='leave user unset (or "{uid}:{gid}"), or use backend="docker"',
            )

    def _ports(self, spec: ServiceSpec, *, assign: bool) -> dict[int, tuple[str, int]]:
        """``{container port: (host ip, host port)}``. A pinned host port is used as it is; an
        unpinned one gets a free port (with ``assign``; 0 as a placeholder otherwise) when the
        command or environment names it (``{port}``, ``{port.N}``), since only then does the
        process bind what it is told; else the process binds the container port itself."""
        templated = listen_port_placeholders(spec) | host_port_placeholders(spec)
        ports: dict[int, tuple[str, int]] = {}
        for p in spec.ports:
            ip = "127.0.0.1" if p.host_ip in ("", "0.0.0.0") else p.host_ip
            if p.host_port:
                if p.host_port != p.container_port and p.container_port not in templated:
                    raise SpecError(
                        f"host port {p.host_port} differs from port {p.container_port}, but the"
                        f" command does not take its port from a placeholder",
                        field=f"services.{spec.name}.ports",
                        fix=f"pass the port as {{port.{p.container_port}}} (or {{port}}) in the"
                        " command, or use backend='docker'",
                    )
                host = p.host_port
            elif p.container_port in templated:
                host = free_port(p.host_ip or "127.0.0.1", avoid=self._pinned) if assign else 0
            else:
                host = p.container_port
            ports[p.container_port] = (ip, host)
        return ports

    def _check_binary(self, spec: ServiceSpec) -> None:
        if not spec.command:
            raise MissingBinary(
                f"service {spec.name!r} has no process command (only an image: {spec.image or 'none'})",
                field=f"services.{spec.name}.command",
                fix='use backend="docker", or set command = ["binary", "arg", ...] for the process backend',
            )
        binary = spec.command[0]
        path = self._env(spec.environment).get("PATH")
        if "/" in binary:
            found = os.access(binary, os.X_OK)
        else:
            found = shutil.which(binary, path=path) is not None
        if not found:
            raise MissingBinary(
                f"service {spec.name!r} needs {binary!r}, which is not installed",
                field=f"services.{spec.name}.command",
                fix=_install_hint(binary),
            )

    # -- instances -------------------------------------------------------------------------

    def _check(self, spec: ServiceSpec) -> dict[int, tuple[str, int]]:
        """Everything a spec needs here (binary on PATH, no volumes, unmapped ports); blocking
        (it looks through PATH), so called in a worker thread. Returns the published ports."""
        spec = as_process(spec)
        self._check_binary(spec)
        self._check_volumes(spec)
        self._check_user(spec)
        return self._ports(spec, assign=False)

    async def prepare(self, specs: Sequence[ServiceSpec]) -> None:
        for spec in specs:
            await anyio.to_thread.run_sync(self._check, spec)
            # Siblings start in parallel: a free port handed to one must not be the port
            # another is pinned to and has not bound yet.
            self._pinned.update(p.host_port for p in spec.ports if p.host_port)
        await self.open()

    async def run(self, spec: ServiceSpec, *, instance_name: str, labels: Mapping[str, str]) -> Instance:
        return await anyio.to_thread.run_sync(self._spawn, spec, instance_name, dict(labels))

    def _claim(self, instance_name: str) -> Path:
        """Create the instance directory atomically (``mkdir`` is the cross-process lock), so
        two owners starting the same instance at once cannot both run it."""
        d = self._dir(instance_name)
        self.root.mkdir(parents=True, exist_ok=True)
        for _ in range(3):
            try:
                d.mkdir()
                return d
            except FileExistsError:
                pass
            try:
                old = self._read_record(instance_name)
            except NotFound:
                # Being created by someone else right now, or left by a crash during a spawn.
                if time.time() - d.stat().st_mtime < _CLAIM_STALE:
                    raise AlreadyExists(
                        f"process instance {instance_name!r} is being started by another process",
                        field="instance_name",
                    ) from None
            except BackendError:
                pass  # a corrupt record: the directory is garbage
            else:
                if pid_alive(old.pid, old.proc_start):
                    raise AlreadyExists(
                        f"process instance {instance_name!r} is already running (pid {old.pid})",
                        field="instance_name",
                        fix="stop and remove it first",
                    )
            shutil.rmtree(d, ignore_errors=True)
        raise AlreadyExists(f"cannot claim process instance {instance_name!r}", field="instance_name")

    @staticmethod
    def _check_ports_free(spec: ServiceSpec, ports: dict[int, tuple[str, int]]) -> None:
        # A port held by someone else would make the service exit, and worse, a probe could
        # get its answer from the other listener (a stray redis-server answering PING).
        for ip, port in ports.values():
            error = _bind_error(ip, port)
            if error is not None:
                raise BackendError(
                    f"port {ip}:{port} of service {spec.name!r} is already in use ({error})",
                    field=f"services.{spec.name}.ports",
                    fix="stop what listens there, or give the service another port",
                )

    def _free_ports(self, spec: ServiceSpec) -> dict[int, tuple[str, int]]:
        """Assigned ports, checked free. A port picked as free can be taken before the
        service binds it (another process, an outgoing connection's ephemeral port): an
        assigned port found taken is picked again; a taken pinned port stays an error."""
        pinned = {p.container_port for p in spec.ports if p.host_port}
        for attempt in range(_PORT_PICKS):
            ports = self._ports(spec, assign=True)
            try:
                self._check_ports_free(spec, ports)
            except BackendError:
                taken_pinned = any(not _bindable(*ports[c]) for c in pinned if c in ports)
                if taken_pinned or attempt == _PORT_PICKS - 1:
                    raise
                continue
            return ports
        raise AssertionError("unreachable")

    def _spawn(self, spec: ServiceSpec, instance_name: str, labels: dict[str, str]) -> Instance:
        spec = as_process(spec)
        self._check(spec)
        d = self._claim(instance_name)  # first: a running twin is AlreadyExists, not a port clash
        try:
            ports = self._free_ports(spec)
        except BaseException:
            shutil.rmtree(d, ignore_errors=True)
            raise
        # The process binds on the host: the port it listens on is the host port.
        assigned = {container: host for container, (_ip, host) in ports.items()}
        # {listen_host}: loopback, unless the first port asks for another address ("0.0.0.0:...").
        listen_host = (spec.ports[0].host_ip if spec.ports else "") or "127.0.0.1"
        spec = expand_port_placeholders(spec, listen=assigned, published=assigned, listen_host=listen_host)
        env = self._env(spec.environment)
        if spec.workdir:
            Path(spec.workdir).mkdir(parents=True, exist_ok=True)
        shim = subprocess.Popen(
            [sys.executable, "-I", "-S", _SHIM, str(d), str(self.log_max_bytes), *spec.command],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            env=env,
            cwd=spec.workdir or None,
            start_new_session=True,
        )
        assert shim.stdout is not None
        with shim.stdout:
            answer = shim.stdout.readline().decode("utf-8", "replace").strip()
        shim.wait()  # the first shim process exits right after forking; reap it now
        if answer.startswith("error"):
            shutil.rmtree(d, ignore_errors=True)
            raise MissingBinary(
                f"service {spec.name!r}: cannot run {spec.command[0]!r}: {answer[6:]}",
                field=f"services.{spec.name}.command",
                fix=_install_hint(spec.command[0]),
            )
        parts = answer.split()
        if len(parts) != 3 or parts[0] != "ok":
            shutil.rmtree(d, ignore_errors=True)
            raise BackendError(f"service {spec.name!r}: the process shim failed to start ({answer!r})")
        pid, shim_pid = int(parts[1]), int(parts[2])
        info = proc_stat(pid)
        rec = _Record(
            id=instance_name,
            name=instance_name,
            labels=labels,
            pid=pid,
            pgid=shim.pid,
            shim_pid=shim_pid,
            proc_start=info.start_time if info else -1,
            ports=ports,
            started_at=time.time(),
            command=spec.command,
            environment=dict(spec.environment),
            workdir=spec.workdir,
        )
        tmp = d / "record.json.tmp"
        tmp.write_text(rec.to_json())
        tmp.replace(d / "record.json")
        return self._instance(rec)

    def main_pid(self, instance_id: str) -> int:
        """The pid of the service's own process (what ``command`` started), for diagnostics
        and for tests that kill a service from outside."""
        return self._read_record(instance_id).pid

    async def inspect(self, instance_id: str) -> Instance:
        return await anyio.to_thread.run_sync(self._inspect_sync, instance_id)

    def _list_sync(self, labels: Mapping[str, str]) -> list[Instance]:
        out: list[Instance] = []
        if not self.root.is_dir():
            return out
        for d in sorted(self.root.iterdir()):
            if not (d / "record.json").is_file():
                continue
            try:
                rec = self._read_record(d.name)
            except (NotFound, BackendError):
                continue
            if all(rec.labels.get(k) == v for k, v in labels.items()):
                out.append(self._instance(rec))
        return out

    async def list_instances(self, labels: Mapping[str, str]) -> list[Instance]:
        return await anyio.to_thread.run_sync(self._list_sync, labels)

    def _signal_group(self, rec: _Record, sig: signal.Signals) -> None:
        # Only signal the group while its leader processes are still ours (pid reuse guard).
        if pid_alive(rec.pid, rec.proc_start) or pid_alive(rec.shim_pid):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(rec.pgid, sig)

    def _group_alive(self, rec: _Record) -> bool:
        return pid_alive(rec.pid, rec.proc_start) or bool(_group_members(rec.pgid, exclude=-1))

    async def stop(self, instance_id: str, *, timeout: float = 10.0) -> None:
        rec = await anyio.to_thread.run_sync(self._read_record, instance_id)
        if not await anyio.to_thread.run_sync(self._group_alive, rec):
            return
        await anyio.to_thread.run_sync(self._signal_group, rec, signal.SIGTERM)
        if await self._wait_gone(rec, timeout):
            return
        await anyio.to_thread.run_sync(self._signal_group, rec, signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(rec.pgid, signal.SIGKILL)
        if not await self._wait_gone(rec, 5.0):
            raise BackendError(f"process group {rec.pgid} of {instance_id!r} survived SIGKILL")

    async def _wait_gone(self, rec: _Record, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        delay = 0.005
        while await anyio.to_thread.run_sync(self._group_alive, rec):
            if time.monotonic() >= deadline:
                return False
            await anyio.sleep(delay)
            delay = min(delay * 2, 0.1)
        return True

    async def remove(self, instance_id: str) -> None:
        try:
            rec = await anyio.to_thread.run_sync(self._read_record, instance_id)
        except NotFound:
            return
        if await anyio.to_thread.run_sync(self._group_alive, rec):
            await self.stop(instance_id, timeout=0)
        await anyio.to_thread.run_sync(lambda: shutil.rmtree(self._dir(instance_id), ignore_errors=True))

    # -- observation -----------------------------------------------------------------------

    @staticmethod
    def _parse(raw: bytes) -> tuple[float, str]:
        text = raw.decode("utf-8", "replace")
        stamp, _, message = text.partition(" ")
        try:
            return float(stamp), message
        except ValueError:
            return 0.0, text

    def _read_from(
        self, instance_id: str, offsets: dict[str, int], *, rotated: bool = False
    ) -> list[tuple[float, str, str]]:
        """Complete lines appended to each log since ``offsets`` (updated in place); with
        ``rotated``, the kept older file first. A file that is another file (inode) than at
        the last read was rotated since: the rest of the old one is read, then the new one."""
        d = self._dir(instance_id)
        out: list[tuple[float, str, str]] = []
        for stream in ("stdout", "stderr"):
            path = d / f"{stream}.log"
            data = b""
            offset = offsets.get(stream, 0)
            try:
                info = path.stat()
            except FileNotFoundError:
                continue
            moved = offsets.get(f"{stream}.inode", info.st_ino) != info.st_ino
            offsets[f"{stream}.inode"] = info.st_ino
            if rotated or moved or info.st_size < offset:
                data += _read_tail(Path(f"{path}.1"), 0 if rotated else offset)
                offset = 0
            try:
                with open(path, "rb") as fh:
                    fh.seek(offset)
                    current = fh.read()
            except FileNotFoundError:
                current = b""
            end = current.rfind(b"\n") + 1  # leave a half-written line for the next read
            offsets[stream] = offset + end
            data += current[:end]
            for raw in data.split(b"\n")[:-1]:  # only "\n" ends a line (the shim's framing)
                ts, message = self._parse(raw)
                out.append((ts, stream, message))
        out.sort(key=lambda e: e[0])
        return out

    async def logs(
        self,
        instance_id: str,
        *,
        service_name: str,
        follow: bool = False,
        tail: int | None = None,
        since: float | None = None,
    ) -> AsyncIterator[LogEntry]:
        await anyio.to_thread.run_sync(self._read_record, instance_id)  # NotFound early
        offsets: dict[str, int] = {}
        batch = await anyio.to_thread.run_sync(
            functools.partial(self._read_from, instance_id, offsets, rotated=True)
        )
        if since is not None:
            batch = [e for e in batch if e[0] >= since]
        if tail is not None:
            batch = batch[-tail:] if tail > 0 else []
        for ts, stream, message in batch:
            yield LogEntry(service_name, instance_id, stream, message, ts)
        while follow:
            try:
                exited = (await self.inspect(instance_id)).state == "exited"
            except NotFound:
                return  # removed while we followed: nothing more will come
            if exited:
                # The shim writes the last lines after the service exits; give it a moment.
                await self._wait_shim(instance_id)
            batch = await anyio.to_thread.run_sync(self._read_from, instance_id, offsets)
            for ts, stream, message in batch:
                if since is None or ts >= since:
                    yield LogEntry(service_name, instance_id, stream, message, ts)
            if exited:
                return
            await anyio.sleep(_FOLLOW_POLL)

    async def _wait_shim(self, instance_id: str, timeout: float = 2.0) -> None:
        deadline = time.monotonic() + timeout
        try:
            rec = await anyio.to_thread.run_sync(self._read_record, instance_id)
        except NotFound:
            return
        for _ in range(int(timeout / 0.02)):
            if time.monotonic() >= deadline or not await anyio.to_thread.run_sync(pid_alive, rec.shim_pid):
                return
            await anyio.sleep(0.02)

    def _sample(self, rec: _Record) -> tuple[int, int]:
        ticks = rss = 0
        for pid in _group_members(rec.pgid, exclude=rec.shim_pid) or [rec.pid]:
            got = _proc_cpu_rss(pid)
            if got is not None:
                ticks += got[0]
                rss += got[1]
        return ticks, rss

    async def stats(self, instance_id: str) -> ResourceUsage:
        rec = await anyio.to_thread.run_sync(self._read_record, instance_id)
        if not await anyio.to_thread.run_sync(pid_alive, rec.pid, rec.proc_start):
            return ResourceUsage()
        t0 = time.monotonic()
        ticks0, _ = await anyio.to_thread.run_sync(self._sample, rec)
        await anyio.sleep(_STATS_INTERVAL)
        ticks1, rss = await anyio.to_thread.run_sync(self._sample, rec)
        elapsed = time.monotonic() - t0
        cpu = max(0, ticks1 - ticks0) / _CLK_TCK / elapsed * 100.0 if elapsed > 0 else 0.0
        return ResourceUsage(cpu_percent=cpu, memory_bytes=rss, network_rx_bytes=0, network_tx_bytes=0)

    async def exec(self, instance_id: str, command: Sequence[str], *, timeout: float = 10.0) -> ExecResult:
        rec = await anyio.to_thread.run_sync(self._read_record, instance_id)
        if not command:
            raise SpecError("exec needs a command", field="command")
        try:
            return await _run_with_timeout(list(command), self._env(rec.environment), rec.workdir, timeout)
        except FileNotFoundError:
            return ExecResult(127, f"{command[0]}: not found ({_install_hint(command[0])})")

    async def pull(self, image: str) -> AsyncIterator[ImagePullProgress]:
        # Nothing to fetch: a process service runs a binary already on this machine.
        yield ImagePullProgress(image_name=image, status="complete", progress_percent=100)

    def probe_address(self, instance: Instance, container_port: int) -> tuple[str, int]:
        ip, port = instance.ports.get(container_port, ("127.0.0.1", container_port))
        return ("127.0.0.1" if ip in ("", "0.0.0.0") else ip), port


async def _run_with_timeout(
    command: list[str], env: dict[str, str], workdir: str | None, timeout: float
) -> ExecResult:
    # anyio.run_process kills the child when the scope is cancelled.
    with anyio.move_on_after(timeout) as scope:
        done = await anyio.run_process(
            command, check=False, stderr=subprocess.STDOUT, env=env, cwd=workdir or None
        )
    if scope.cancelled_caught:
        return ExecResult(124, f"{command[0]}: timed out after {timeout:g}s")
    return ExecResult(done.returncode, done.stdout.decode("utf-8", "replace"))
