"""The process backend's supervisor shim, run as a script: ``python -I -S supervisor.py DIR
LIMIT COMMAND...`` (the same idea as Podman's ``conmon``).

It double-forks so the service is not a child of the caller, reports ``ok <service pid>
<shim pid>`` (or ``error <text>``) on stdout, then pumps the service's output into
timestamped log files (``DIR/stdout.log``, ``DIR/stderr.log``; past ``LIMIT`` bytes one older
file is kept as ``<stream>.log.1``) until it exits, and records its exit code in
``DIR/exit.json``. So an instance outlives the Python process that started it and can be
adopted later.

Only light standard-library modules (no subprocess, no json, nothing of dspy_infra): its
start-up time is on every service start, and it runs with ``-I -S`` (no site packages).
"""

from __future__ import annotations

import os
import selectors
import signal
import sys
import time
from typing import BinaryIO

__all__ = ["main"]

#: Signals the shim ignores: the process group gets SIGTERM; the shim drains logs, then exits.
_STOP = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


def main(argv: list[str]) -> None:
    d, limit, cmd = argv[0], int(argv[1]), argv[2:]
    if os.fork():
        os._exit(0)
    for s in _STOP:
        signal.signal(s, signal.SIG_IGN)
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    chk_r, chk_w = os.pipe()  # close-on-exec: EOF here means the exec worked
    pid = os.fork()
    if pid == 0:
        try:
            for s in (*_STOP, signal.SIGPIPE, signal.SIGXFSZ):
                signal.signal(s, signal.SIG_DFL)
            os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
            os.dup2(out_w, 1)
            os.dup2(err_w, 2)
            os.execvp(cmd[0], cmd)
        except BaseException as e:
            os.write(chk_w, str(e).encode("utf-8", "replace"))
        os._exit(127)
    for fd in (out_w, err_w, chk_w):
        os.close(fd)
    failed = os.read(chk_r, 4096)
    if failed:
        os.waitpid(pid, 0)
        sys.stdout.write(f"error {failed.decode('utf-8', 'replace')}\n")
        sys.stdout.flush()
        os._exit(0)
    sys.stdout.write(f"ok {pid} {os.getpid()}\n")
    sys.stdout.flush()
    null = os.open(os.devnull, os.O_RDWR)
    os.dup2(null, 1)
    os.dup2(null, 2)
    outs: dict[int, BinaryIO] = {
        out_r: open(os.path.join(d, "stdout.log"), "ab", buffering=0),
        err_r: open(os.path.join(d, "stderr.log"), "ab", buffering=0),
    }
    partial = dict.fromkeys(outs, b"")
    sel = selectors.DefaultSelector()
    for fd in outs:
        sel.register(fd, selectors.EVENT_READ)

    def emit(fd: int, data: bytes, final: bool = False) -> None:
        data = partial[fd] + data
        lines = data.split(b"\n")
        partial[fd] = b"" if final else lines.pop()
        stamp = b"%.6f " % time.time()
        chunk = b"".join(stamp + ln + b"\n" for ln in lines if ln or not final)
        if chunk:
            f = outs[fd]
            f.write(chunk)
            if f.tell() > limit:  # keep one older file: <stream>.log.1
                f.close()
                os.replace(f.name, f.name + ".1")
                outs[fd] = open(f.name, "ab", buffering=0)

    while sel.get_map():
        for key, _ in sel.select():
            fd = int(key.fd)
            data = os.read(fd, 65536)
            if data:
                emit(fd, data)
            else:
                emit(fd, b"", final=True)
                sel.unregister(fd)
    _, status = os.waitpid(pid, 0)
    rc = os.waitstatus_to_exitcode(status)
    tmp = os.path.join(d, "exit.json.tmp")
    with open(tmp, "w") as f:
        f.write(f'{{"exit_code": {rc}, "finished_at": {time.time():f}}}')
    os.replace(tmp, os.path.join(d, "exit.json"))


if __name__ == "__main__":
    main(sys.argv[1:])
