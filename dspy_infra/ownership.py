"""Ownership: which processes, containers and services belong to whom, and who may end them.

One place for "is this still the process we started?", "end everything an attempt left" and
"whose service instance is this, and may we reap it?" (the last in the section *services and
containers* below: labels, leases, keep markers and orphan rules):

- **Identity.** A pid alone is not a process: pids are reused. A process is its pid plus its
  start time (``/proc/PID/stat`` field 22, clock ticks since boot); a zombie (state ``Z``)
  has exited and counts as dead.
- **Attempt records.** Before a task command starts, the ``exec`` handler writes a small JSON
  record (task id, attempt, marker) under ``<home>/attempts/``, rewrites it with the pid,
  start time and process group once the process exists, and removes it when the attempt has
  ended. Each write is atomic (temporary file, rename), so a crash leaves either the old
  record or the new one, never a torn one. Records are not fsynced: they describe running
  processes, which a power cut ends too, and a crash of the owner leaves them in the
  kernel's page cache for the restart to read.
- **Markers.** The command's environment carries ``DSPY_INFRA_ATTEMPT=<scope>:<task id>:<attempt>``
  and every descendant inherits it, so a descendant that left the process group (``setsid``,
  a daemonizing server) is still found by scanning ``/proc/*/environ``; right after a short
  command only the pids handed out since its start need reading (``pids_since``). ``<scope>`` is
  derived from the state directory for durable schedulers (what a restart looks for) and is
  random per scheduler otherwise.
- **Ending.** SIGTERM to each process group and each marked process, SIGKILL to what is
  still alive after a short grace. Every signal is sent only after checking, just before,
  that the pid still has the start time we saw (so a reused pid is never hit).

Everything here blocks (``/proc`` reads, file writes, sleeping through the grace period):
call it through ``anyio.to_thread``.

Linux only (``/proc``); elsewhere the scans find nothing and records still protect nothing
beyond the process group.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import os
import re
import signal
import tempfile
import time
from collections.abc import Collection, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import attrs

__all__ = [
    "ATTEMPT_ENV",
    "LABEL_HOST_PORTS",
    "LABEL_NETWORK",
    "LABEL_OWNER",
    "LABEL_OWNER_PID",
    "LABEL_OWNER_STARTED",
    "LABEL_PREFIX",
    "LABEL_SERVICE",
    "LABEL_SPEC_HASH",
    "PID_WINDOW_MAX_AGE",
    "AttemptRecord",
    "AttemptRegistry",
    "EndReport",
    "PidMark",
    "ProcStat",
    "ServiceOwnership",
    "SweepAction",
    "attempt_marker",
    "durable_scope",
    "end_attempt_processes",
    "end_interrupted_attempts",
    "end_leftover_attempts",
    "find_marked",
    "instance_name_for",
    "label_pid_alive",
    "labelled_owner_alive",
    "owner_labels",
    "pid_alive",
    "pid_mark",
    "pids_since",
    "proc_stat",
    "reap_before_start",
    "replace_file",
    "same_process",
    "start_time_of",
    "sweep_action",
    "write_durably",
]

_log = logging.getLogger(__name__)

#: Environment variable naming the attempt a process belongs to (inherited by descendants).
ATTEMPT_ENV = "DSPY_INFRA_ATTEMPT"
_ENV_PREFIX = (ATTEMPT_ENV + "=").encode()
#: Seconds between SIGTERM and SIGKILL when ending an attempt's processes.
DEFAULT_GRACE = 2.0
ATTEMPTS_DIR = "attempts"


@attrs.frozen
class ProcStat:
    """What ``/proc/PID/stat`` says about a process."""

    pid: int
    state: str
    pgid: int
    start_time: int

    @property
    def dead(self) -> bool:
        return self.state in ("Z", "X", "x")


def proc_stat(pid: int | str) -> ProcStat | None:
    """``/proc/PID/stat`` of ``pid``, None if there is no such process."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            raw = fh.read().decode("utf-8", "replace")
    except (OSError, ValueError):
        return None
    # The command name (field 2) may hold spaces and parentheses: split after the last ')'.
    fields = raw[raw.rfind(")") + 2 :].split()
    try:
        return ProcStat(pid=int(pid), state=fields[0], pgid=int(fields[2]), start_time=int(fields[19]))
    except (IndexError, ValueError):
        return None


def pid_alive(pid: int, start_time: int | None = None) -> bool:
    """True while ``pid`` runs (a zombie has exited) and, when ``start_time`` is given, is the
    process that started then (not a later process that reused the pid). The one liveness
    check: services, task attempts, containers' owners and pytest workers all use it."""
    if pid <= 0:
        return False
    st = proc_stat(pid)
    return st is not None and not st.dead and (start_time is None or st.start_time == start_time)


def same_process(pid: int, start_time: int) -> bool:
    """True while ``pid`` is alive (not a zombie) and is the process that started at ``start_time``."""
    return pid_alive(pid, start_time)


def label_pid_alive(pid: str, started: str) -> bool:
    """A pid and (when known) its start time, as labels and leases hold them (text), still run."""
    return pid.isdigit() and pid_alive(int(pid), int(started) if started.isdigit() else None)


@functools.cache
def start_time_of(pid: int) -> str:
    """The start time of ``pid`` as label text ("" when it is gone); cached per pid, which is
    right for this process (a forked child has another pid)."""
    st = proc_stat(pid)
    return str(st.start_time) if st is not None else ""


@functools.lru_cache(maxsize=64)
def durable_scope(home: Path) -> str:
    """Marker scope of a durable scheduler on ``home``: the same across restarts, distinct
    per state directory (one process per state directory holds its lock)."""
    return "home-" + hashlib.sha256(str(home.resolve()).encode()).hexdigest()[:12]


def attempt_marker(scope: str, task_id: str, attempt: int) -> str:
    """The ``DSPY_INFRA_ATTEMPT`` value of one attempt (the task id goes last but one; a
    colon in it is harmless since the scope has none and the attempt is the last field)."""
    return f"{scope}:{task_id}:{attempt}"


def _marker_task(marker: str, scope: str) -> str | None:
    """The task id in ``marker`` if it belongs to ``scope``, else None."""
    head = scope + ":"
    if not marker.startswith(head):
        return None
    task_id, sep, attempt = marker[len(head) :].rpartition(":")
    return task_id if sep and attempt.isdigit() else None


def _read_proc(path: str) -> bytes | None:
    """A ``/proc`` file whole, None when it cannot be read."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        data = os.read(fd, _PROC_CHUNK)
        if len(data) == _PROC_CHUNK:
            chunks = [data]
            while chunk := os.read(fd, _PROC_CHUNK):
                chunks.append(chunk)
            data = b"".join(chunks)
        return data
    except OSError:
        return None
    finally:
        os.close(fd)


_PROC_CHUNK = 65536


def _marker_of(pid: int, scope: str, task_ids: Collection[str] | None) -> bool:
    """True when ``pid``'s environment carries a marker of ``scope`` (and of one of ``task_ids``)."""
    environ = _read_proc(f"/proc/{pid}/environ")
    if environ is None or _ENV_PREFIX not in environ:
        return False
    for item in environ.split(b"\0"):
        if item.startswith(_ENV_PREFIX):
            task = _marker_task(item[len(_ENV_PREFIX) :].decode("utf-8", "replace"), scope)
            return task is not None and (task_ids is None or task in task_ids)
    return False


def _leads_its_thread_group(pid: int) -> bool:
    """False for a thread's id (``/proc/TID`` answers for a thread too, though ``/proc``
    does not list it): its process is looked at under its own pid."""
    status = _read_proc(f"/proc/{pid}/status") or b""
    for line in status.split(b"\n"):
        if line.startswith(b"Tgid:"):
            return line[5:].strip() == str(pid).encode()
    return False


#: Windows of at most this many pids are probed pid by pid; wider ones filter a ``/proc`` listing.
_PROBE_LIMIT = 128


def find_marked(
    scope: str,
    task_ids: Collection[str] | None = None,
    *,
    exclude: int | None = None,
    pids: Sequence[range] | None = None,
) -> list[ProcStat]:
    """Live processes whose environment carries a marker of ``scope`` (and, if given, of one
    of ``task_ids``). Processes of other users are unreadable and never found. ``pids``
    (from ``pids_since``) limits the search to processes started since a mark: a marked
    process descends from a command started after it, so none is missed."""
    found: list[ProcStat] = []
    me = os.getpid()
    candidates: Iterable[int]
    if pids is not None and sum(map(len, pids)) <= _PROBE_LIMIT:
        candidates = (pid for window in pids for pid in window)
        probing = True
    else:
        try:
            entries = os.listdir("/proc")
        except OSError:
            return found
        numbers = (int(entry) for entry in entries if entry.isdigit())
        candidates = numbers if pids is None else (n for n in numbers if any(n in w for w in pids))
        probing = False
    for pid in candidates:
        if pid in (me, exclude) or not _marker_of(pid, scope, task_ids):
            continue
        if probing and not _leads_its_thread_group(pid):
            continue
        st = proc_stat(pid)
        if st is not None and not st.dead:
            found.append(st)
    return found


# -- which pids are new: what lets the exec handler's sweep skip the old processes ----------

#: Pids below this are never handed out again once the allocator has wrapped (the kernel's
#: RESERVED_PIDS).
_RESERVED_PIDS = 300
#: How long a ``PidMark`` is trusted. Failed forks (a cgroup's pid limit) move the allocator
#: without being counted, so only a short window is known not to have wrapped around; past
#: this the sweep reads every process (a few ms, nothing next to a command that ran a second).
PID_WINDOW_MAX_AGE = 1.0


@attrs.frozen
class PidMark:
    """A point in pid allocation: the last pid this pid namespace handed out, the system's
    fork count (``/proc/stat`` "processes": every process and thread created), and when."""

    last_pid: int
    forks: int
    at: float


def _forks() -> int | None:
    stat = _read_proc("/proc/stat")
    at = stat.find(b"\nprocesses ") if stat is not None else -1
    if stat is None or at < 0:
        return None
    try:
        return int(stat[at + 11 : stat.index(b"\n", at + 1)])
    except ValueError:
        return None


def _last_pid() -> int | None:
    # /proc/loadavg's last field: the pid namespace's last handed-out pid (ns_last_pid,
    # which needs CONFIG_CHECKPOINT_RESTORE, says the same).
    raw = _read_proc("/proc/loadavg")
    try:
        return int(raw.split()[-1]) if raw else None
    except ValueError:
        return None


def pid_mark() -> PidMark | None:
    """The point to take just before starting a command whose descendants ``pids_since``
    should find (None without ``/proc``)."""
    forks = _forks()  # before the last pid: a fork in between is counted, not missed
    last = _last_pid()
    if forks is None or last is None:
        return None
    return PidMark(last, forks, time.monotonic())


def pids_since(mark: PidMark | None) -> list[range] | None:
    """Every pid handed out in this pid namespace since ``mark``: one range, two when the
    allocator wrapped around ``pid_max`` meanwhile. None when that is not known: no mark, a
    mark older than ``PID_WINDOW_MAX_AGE``, or so many forks since that the allocator may
    have come round past the mark.

    Linux hands out pids in increasing order from the last one, wrapping at ``pid_max``, so a
    process started since ``mark`` has a pid in ``(mark.last_pid, last pid now]``, taken
    cyclically, unless ``pid_max - 300`` pids were handed out meanwhile; the fork count rules
    that out (with a margin for forks in flight while it was read). Blocking (``/proc``
    reads, no disk): a few microseconds.
    """
    if mark is None or time.monotonic() - mark.at > PID_WINDOW_MAX_AGE:
        return None
    last = _last_pid()
    forks = _forks()
    raw_max = _read_proc("/proc/sys/kernel/pid_max")
    if last is None or forks is None or not raw_max:
        return None
    try:
        pid_max = int(raw_max)
    except ValueError:
        return None
    if forks - mark.forks >= (pid_max - _RESERVED_PIDS) // 2:
        return None
    if last >= mark.last_pid:
        return [range(mark.last_pid + 1, last + 1)]
    return [range(mark.last_pid + 1, pid_max), range(1, last + 1)]


@attrs.frozen
class AttemptRecord:
    """One attempt's processes as recorded on disk. ``pid`` is 0 until the process exists."""

    task_id: str
    attempt: int
    marker: str
    pid: int = 0
    pgid: int = 0
    start_time: int = 0
    recorded_at: float = 0.0

    def to_json(self) -> str:
        return json.dumps(attrs.asdict(self), separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> AttemptRecord | None:
        """The record in ``text``, None if it is not one (a foreign or damaged file)."""
        try:
            raw: Any = json.loads(text)
            return cls(
                task_id=str(raw["task_id"]),
                attempt=int(raw["attempt"]),
                marker=str(raw["marker"]),
                pid=int(raw.get("pid", 0)),
                pgid=int(raw.get("pgid", 0)),
                start_time=int(raw.get("start_time", 0)),
                recorded_at=float(raw.get("recorded_at", 0.0)),
            )
        except (ValueError, TypeError, KeyError, AttributeError):
            return None


class AttemptRegistry:
    """Attempt records in one directory, one file per attempt (named by a hash of the task id
    and the attempt number, never by the id itself)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def path_for(self, task_id: str, attempt: int) -> Path:
        digest = hashlib.sha256(task_id.encode("utf-8", "surrogatepass")).hexdigest()[:32]
        return self.directory / f"{digest}-{attempt}.json"

    def write(self, record: AttemptRecord) -> Path:
        """Write ``record`` atomically (blocking). Not flushed to the disk: a record only
        matters while its processes live, and what ends the machine ends them too; a crash
        of this process leaves the written record in the kernel's cache, where a restart
        reads it. (The scheduler's own record of the attempt is flushed before the handler
        runs.)"""
        path = self.path_for(record.task_id, record.attempt)
        _replace_file(path, record.to_json(), flush=False)
        return path

    def remove(self, task_id: str, attempt: int) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path_for(task_id, attempt))

    def records(self) -> list[tuple[Path, AttemptRecord | None]]:
        """Every record file with its record (None for a damaged one)."""
        out: list[tuple[Path, AttemptRecord | None]] = []
        try:
            names = sorted(os.listdir(self.directory))
        except FileNotFoundError:
            return out
        for name in names:
            path = self.directory / name
            if not name.endswith(".json") or name.startswith(".attempt-"):
                # Not a record (a temporary file is one being written, or one a crash left
                # between write and rename: nothing to end either way).
                continue
            try:
                text = path.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError):
                out.append((path, None))
                continue
            out.append((path, AttemptRecord.from_json(text)))
        return out


def replace_file(path: Path, text: str) -> None:
    """Replace ``path`` with ``text`` atomically (blocking): a reader sees the old file or the
    new one, never half of it; not flushed (``write_durably`` for that)."""
    _replace_file(path, text, flush=False)


def write_durably(path: Path, text: str) -> None:
    """Replace ``path`` with ``text`` atomically and durably (blocking): a crash leaves the old
    file or the new one, and the new one is on disk (file and directory entry) on return."""
    _replace_file(path, text, flush=True)


def _replace_file(path: Path, text: str, *, flush: bool) -> None:
    """Replace ``path`` with ``text`` through a temporary file and a rename, so a reader (or a
    crash) sees the old file or the new one; ``flush``: on disk on return."""
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}-", dir=path.parent)
    except FileNotFoundError:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}-", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", errors="surrogatepass") as fh:
            fh.write(text)
            if flush:
                fh.flush()
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    if flush:
        _fsync_dir(path.parent)


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@attrs.frozen
class EndReport:
    """What ``end_attempt_processes`` did: pids it signalled, and pids still alive after
    SIGKILL (normally none: only a process in uninterruptible sleep can linger)."""

    signalled: tuple[int, ...] = ()
    survivors: tuple[int, ...] = ()


def _signal(st: ProcStat, sig: int) -> None:
    """Send ``sig`` to ``st`` only if it is still that process."""
    if same_process(st.pid, st.start_time):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(st.pid, sig)


def _group_members(pgid: int, since: int) -> list[ProcStat]:
    """Live members of process group ``pgid`` that started no earlier than ``since``."""
    out: list[ProcStat] = []
    try:
        entries = os.listdir("/proc")
    except OSError:
        return out
    for entry in entries:
        if entry.isdigit():
            st = proc_stat(entry)
            if st is not None and st.pgid == pgid and not st.dead and st.start_time >= since:
                out.append(st)
    return out


def _targets(records: Iterable[AttemptRecord], scope: str, task_ids: Collection[str]) -> dict[int, ProcStat]:
    me = os.getpid()
    targets: dict[int, ProcStat] = {}
    for rec in records:
        if rec.pid <= 0 or rec.pid == me:
            continue
        leader = proc_stat(rec.pid)
        if leader is not None and leader.start_time != rec.start_time:
            # The pid was reused: the recorded process is gone, and this one is a stranger.
            # Its group (if it leads one) is the stranger's too; marked descendants of ours
            # are still found by the marker scan below.
            continue
        if leader is not None and not leader.dead:
            targets[leader.pid] = leader
        if rec.pgid > 0:
            # Linux keeps a pgid number allocated while any member lives, so live members of
            # the recorded group that started after the recorded leader are the attempt's.
            for st in _group_members(rec.pgid, rec.start_time):
                if st.pid != me:
                    targets[st.pid] = st
    for st in find_marked(scope, task_ids):
        targets[st.pid] = st
    return targets


def end_attempt_processes(
    records: Iterable[AttemptRecord],
    scope: str,
    task_ids: Collection[str],
    *,
    grace: float = DEFAULT_GRACE,
) -> EndReport:
    """End every process of the given attempts: the recorded process and its group (checked
    by start time), and every process whose marker names ``scope`` and one of ``task_ids``.

    SIGTERM first; SIGKILL after ``grace`` seconds to whatever is still alive. Blocking.
    """
    records = list(records)
    targets = _targets(records, scope, task_ids)
    if not targets:
        return EndReport()
    signalled = set(targets)
    for st in targets.values():
        _signal(st, signal.SIGTERM)
    # The grace period lets the signalled processes clean up, which may start new ones (a
    # shell's trap running `date`): those are left alone until the SIGKILL round.
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        targets = {pid: st for pid, st in targets.items() if same_process(pid, st.start_time)}
        if not targets and not _targets(records, scope, task_ids):
            return EndReport(signalled=tuple(sorted(signalled)))
        time.sleep(0.02)
    for _ in range(3):
        targets.update(_targets(records, scope, task_ids))
        signalled.update(targets)
        for st in targets.values():
            _signal(st, signal.SIGKILL)
        kill_deadline = time.monotonic() + 1.0
        while time.monotonic() < kill_deadline:
            targets = {pid: st for pid, st in targets.items() if same_process(pid, st.start_time)}
            if not targets:
                break
            time.sleep(0.01)
        if not targets and not _targets(records, scope, task_ids):
            break
    return EndReport(signalled=tuple(sorted(signalled)), survivors=tuple(sorted(targets)))


def end_leftover_attempts(
    home: Path, task_ids: Collection[str], *, grace: float = DEFAULT_GRACE
) -> EndReport:
    """On start of a durable scheduler: end every process of attempts a previous process of
    this state directory left running, then forget their records. Blocking.

    ``task_ids`` are the tasks the store says were interrupted (pending or running); every
    attempt record left on disk counts too, since only a dead process leaves one (the state
    directory's lock admits one process at a time).
    """
    registry = AttemptRegistry(home / ATTEMPTS_DIR)
    entries = registry.records()
    records = [rec for _, rec in entries if rec is not None]
    wanted = set(task_ids) | {rec.task_id for rec in records}
    report = end_attempt_processes(records, durable_scope(home), wanted, grace=grace)
    # Every file here belongs to a dead process (records, and temporary files a crash left).
    try:
        names = os.listdir(registry.directory)
    except FileNotFoundError:
        names = []
    for name in names:
        with contextlib.suppress(FileNotFoundError, IsADirectoryError, PermissionError):
            os.unlink(registry.directory / name)
    if names:
        _fsync_dir(registry.directory)
    return report


async def end_interrupted_attempts(
    home: Path, task_ids: Collection[str], *, grace: float = DEFAULT_GRACE
) -> EndReport:
    """``end_leftover_attempts`` off the event loop: what a durable scheduler awaits on start,
    before it queues any interrupted task again."""
    import anyio.to_thread

    report = await anyio.to_thread.run_sync(lambda: end_leftover_attempts(home, task_ids, grace=grace))
    if report.signalled:
        _log.warning(
            "ended %d leftover process(es) of interrupted task attempts: %s%s",
            len(report.signalled),
            " ".join(map(str, report.signalled[:50])),
            f"; still alive after SIGKILL: {' '.join(map(str, report.survivors))}"
            if report.survivors
            else "",
        )
    return report


# -- services and containers: labels, leases, keep markers, orphan rules -----------------------
#
# Every instance (container or process) a manager or the container handler creates carries
# labels naming its owner: the configured owner name (``settings.resolved_owner()``) and the
# owner *process* (pid plus start time). An instance belongs to the owner process while that
# process lives, or while a *lease* names a live process (an adopter: a container's labels
# cannot change, so a later process that adopts it writes a lease file). A *keep marker*
# (``<home>/services/.keep/<instance>``) says "leave it running when the owner exits".
#
# Who may reap what: nothing without our owner label is ever touched. An instance of our owner
# whose owner process and lease holder are both dead is an orphan. When a manager opens, an
# orphan that is kept, still running and running the catalog's spec is adopted; every other
# orphan is reaped (``sweep_action``). Before a start, orphans are reaped except kept ones and
# the services the start is about to adopt or recreate (``reap_before_start``).

LABEL_PREFIX = "dspy_infra."
LABEL_OWNER = "dspy_infra.owner"
LABEL_OWNER_PID = "dspy_infra.owner_pid"
#: The owner process's start time (from /proc), so a reused pid is not taken for the owner.
LABEL_OWNER_STARTED = "dspy_infra.owner_started"
LABEL_SERVICE = "dspy_infra.service"
LABEL_SPEC_HASH = "dspy_infra.spec_hash"
#: On a network this library created (value "1"): only such a network is ever removed, and only
#: once no container of anyone is on it; a network a user made and named in settings is left.
LABEL_NETWORK = "dspy_infra.network"
#: On a container on the host's network (``network_mode = "host"``): ``{container port: [host
#: ip, host port]}`` as JSON, the ports it binds, which the engine publishes nowhere.
LABEL_HOST_PORTS = "dspy_infra.host_ports"


def owner_labels(owner: str) -> dict[str, str]:
    """The labels that name ``owner`` and this process as the owner of an instance."""
    pid = os.getpid()
    return {LABEL_OWNER: owner, LABEL_OWNER_PID: str(pid), LABEL_OWNER_STARTED: start_time_of(pid)}


def labelled_owner_alive(labels: Mapping[str, str]) -> bool:
    """True while the owner process named by ``labels`` (pid and start time) still runs."""
    return label_pid_alive(labels.get(LABEL_OWNER_PID, ""), labels.get(LABEL_OWNER_STARTED, ""))


def instance_name_for(owner: str, service: str) -> str:
    """Stable instance (container / process) name, so a later run can find and adopt it."""
    return "dspy_infra-" + re.sub(r"[^a-zA-Z0-9_.-]", "-", owner) + "-" + service


SweepAction = Literal["leave", "adopt", "reap"]


def sweep_action(*, owner_alive: bool, kept: bool, adoptable: bool) -> SweepAction:
    """What a manager opening on this owner does with one of its instances: leave it to its
    live owner, adopt a kept one that still runs the catalog's spec, reap any other."""
    if owner_alive:
        return "leave"
    return "adopt" if kept and adoptable else "reap"


def reap_before_start(*, owner_alive: bool, kept: bool) -> bool:
    """Whether a start reaps one of this owner's instances of a service it does not start:
    only an orphan (owner and lease holder dead) that was not kept on purpose."""
    return not owner_alive and not kept


class ServiceOwnership:
    """The ownership records of one owner on one state directory: instance names, labels,
    leases and keep markers. Blocking file access: call it through ``anyio.to_thread``."""

    def __init__(self, owner: str, home: Path) -> None:
        self.owner = owner
        self._leases = home / "services" / ".leases"
        self._kept = home / "services" / ".keep"

    def instance_name(self, service: str) -> str:
        return instance_name_for(self.owner, service)

    def filter(self, service: str | None = None) -> dict[str, str]:
        """The labels that select this owner's instances (of ``service``, when given)."""
        return (
            {LABEL_OWNER: self.owner}
            if service is None
            else {LABEL_OWNER: self.owner, LABEL_SERVICE: service}
        )

    def labels(self, service: str, spec_hash: str, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        """An instance's labels: ``extra`` (the spec's own), never over the ownership ones."""
        return {
            **(extra or {}),
            **owner_labels(self.owner),
            LABEL_SERVICE: service,
            LABEL_SPEC_HASH: spec_hash,
        }

    def write_lease(self, instance_name: str) -> None:
        """Record this process as the holder of ``instance_name`` (it adopted it)."""
        self._leases.mkdir(parents=True, exist_ok=True)
        pid = os.getpid()
        (self._leases / instance_name).write_text(f"{pid} {start_time_of(pid)}")

    def drop_lease(self, instance_name: str) -> None:
        with contextlib.suppress(OSError):
            (self._leases / instance_name).unlink()

    def lease_holder_alive(self, instance_name: str) -> bool:
        try:
            pid, _, started = (self._leases / instance_name).read_text().strip().partition(" ")
        except OSError:
            return False
        return label_pid_alive(pid, started)

    def owner_alive(self, labels: Mapping[str, str], instance_name: str) -> bool:
        """True while the instance's owner process, or the process holding its lease, lives."""
        return labelled_owner_alive(labels) or self.lease_holder_alive(instance_name)

    def is_kept(self, instance_name: str) -> bool:
        return (self._kept / instance_name).exists()

    def set_kept(self, service: str, kept: bool) -> None:
        """Mark ``service``'s instance as one to leave running after its owner exits (or not)."""
        marker = self._kept / self.instance_name(service)
        if kept:
            self._kept.mkdir(parents=True, exist_ok=True)
            marker.touch()
        else:
            with contextlib.suppress(FileNotFoundError):
                marker.unlink()
