"""``ensure_infra()``: the process's one shared ``InfraAPI``, embedded or attached to a
server, and ``shutdown_infra()`` / ``use_infra()`` around it.

The auto mode's rule: attach only to the server this app would have started itself (same
state directory and owner); any other server is left alone and this process embeds.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import signal
import threading
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .api import InfraAPI
from .config import Settings, load_settings
from .errors import FailedPrecondition, Unauthenticated
from .infra import Infra
from .scheduler.store import LOCK_FILE_NAME

if TYPE_CHECKING:
    from .backends.base import Backend
    from .rpc.remote import RemoteInfra

__all__ = ["ensure_infra", "shutdown_infra", "use_infra"]

_log = logging.getLogger("dspy_infra")

#: Seconds auto mode waits for a server that holds this app's state directory but missed
#: the quick first answer (0.5 s, meant for "nothing listens"): a busy server is still the
#: app's own, and embedding beside it would be refused (its store lock) anyway.
BUSY_SERVER_WAIT = 10.0


# -- the process-wide shared instance ---------------------------------------------------------

_shared: InfraAPI | None = None
_shared_lock: asyncio.Lock | None = None
_shared_loop: asyncio.AbstractEventLoop | None = None


def _lock() -> asyncio.Lock:
    global _shared_lock, _shared_loop
    loop = asyncio.get_running_loop()
    if _shared_lock is None or _shared_loop is not loop:
        _shared_lock, _shared_loop = asyncio.Lock(), loop
    return _shared_lock


async def ensure_infra(
    *,
    services: Sequence[str] = (),
    backend: Backend | str | None = None,
    state_dir: str | os.PathLike[str] | None = None,
    mode: str | None = None,
    addr: str | None = None,
    serve: bool = False,
    config_file: str | os.PathLike[str] | None = None,
    plugins: Iterable[Any] = (),
    keep: bool = False,
    **settings: Any,
) -> InfraAPI:
    """Return the process's shared infra, creating it on first call (concurrent callers get
    the same one); its ``mode`` says which kind it is, and the choice is logged once.

    - ``addr=`` / ``DSPY_INFRA_ADDR`` (or ``mode="remote"``): a ``RemoteInfra`` on that
      server, which must answer.
    - ``mode="auto"`` (the default): a ``RemoteInfra`` only when the server answering at
      ``127.0.0.1:grpc_port`` is the one this app would have started (it advertises the
      same state directory and owner); any other server is left alone and this process
      runs an embedded ``Infra``.
    - otherwise (or ``serve=True``): an embedded ``Infra`` (``serve=True`` also serves
      gRPC/HTTP for other processes).

    When attached, ``services`` are started on the server, and an option the server cannot
    honour (another ``backend``, a ``Backend`` object, ``plugins``) raises
    ``FailedPrecondition`` naming it instead of being ignored.

    The services an embedded infra starts stop with ``shutdown_infra()``, or at the latest when
    the process exits (``atexit``; SIGTERM is made to exit like Ctrl-C while it has its default
    action); ``keep=True`` leaves them running for the next run to adopt."""
    global _shared
    async with _lock():
        if _shared is not None and getattr(_shared, "running", True):
            if services:
                await _shared.ensure_services(services, keep=keep)
            return _shared
        backend_name = backend if isinstance(backend, str) else None
        cfg = load_settings(
            config_file, home=state_dir, mode=mode, addr=addr, backend=backend_name, **settings
        )
        # What only an embedded infra can honour: objects of this process.
        local_only = [
            name
            for name, given in (
                ("backend", backend is not None and not isinstance(backend, str)),
                ("plugins", bool(plugins)),
            )
            if given
        ]
        remote = await _maybe_remote(cfg, serve=serve, local_only=local_only)
        if remote is not None:
            if services:
                await remote.ensure_services(services)
            _shared = remote
            return remote
        infra = Infra(cfg, backend=backend if not isinstance(backend, str) else None, plugins=plugins)
        server = None
        if serve:
            from .serve import InfraServer  # the servers load only when asked for

            server = InfraServer
        await infra.start(services, server=server, keep=keep)
        _exit_on_sigterm()
        _log.info("dspy_infra: embedded infra on %s%s", infra.home, " (serving gRPC/HTTP)" if serve else "")
        _shared = infra
        return infra


async def _maybe_remote(cfg: Settings, *, serve: bool, local_only: Sequence[str] = ()) -> RemoteInfra | None:
    """A connected RemoteInfra when the settings say to use a server, or (auto mode) when the
    server answering at the default address is this app's own; else None (embed)."""
    if cfg.mode == "embedded" or serve:
        return None
    from .rpc.remote import RemoteInfra  # the gRPC client loads only when it may be used

    # A server configured with TLS is reached with its certificate as the trusted CA.
    tls = cfg.tls_cert or None
    named = bool(cfg.addr) or cfg.mode == "remote"
    target = cfg.addr or f"127.0.0.1:{cfg.grpc_port}"
    try:
        remote = await RemoteInfra.connect(target, token=cfg.token, required=named, tls=tls, settings=cfg)
    except Unauthenticated:
        if named:
            raise
        # Auto mode: a server that refuses our token cannot be identified, so it is not ours.
        _log.info("dspy_infra: the server at %s refused this app's token; running embedded", target)
        return None
    if remote is None and not named and _home_held(cfg):
        _log.info("dspy_infra: the server at %s is slow to answer; waiting for it", target)
        remote = await RemoteInfra.connect(
            target, token=cfg.token, required=False, tls=tls, settings=cfg, timeout=BUSY_SERVER_WAIT
        )
    if remote is None:
        return None
    try:
        identity = await remote.health()
        if not named and not _same_app(identity, cfg):
            _log.info(
                "dspy_infra: the server at %s belongs to another app (home %s); running embedded",
                target,
                identity.get("home") or "unknown",
            )
            await remote.aclose()
            return None
        _check_can_honour(cfg, identity, target, local_only)
    except BaseException:
        await remote.aclose()
        raise
    how = "named by addr/DSPY_INFRA_ADDR" if cfg.addr else ("mode=remote" if named else "same home")
    _log.info("dspy_infra: attached to the server at %s (%s, home %s)", target, how, identity.get("home"))
    return remote


def _home_held(cfg: Settings) -> bool:
    """Whether another scheduler holds this app's state directory now (its store lock is
    taken): then a server is this app's own, even if it has not answered yet."""
    try:
        fd = os.open(cfg.resolved_home() / LOCK_FILE_NAME, os.O_RDONLY)
    except OSError:
        return False  # no state directory, or none we may read: nobody to wait for
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:
        return True
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    finally:
        os.close(fd)


def _same_app(identity: Mapping[str, Any], cfg: Settings) -> bool:
    """Whether a server's advertised identity is the one this app's settings would start:
    the same state directory and owner. A server too old to say is not ours."""
    home, owner = identity.get("home") or "", identity.get("owner") or ""
    if not home or not owner:
        return False
    return owner == cfg.resolved_owner() and Path(home) == cfg.resolved_home().resolve()


def _check_can_honour(
    cfg: Settings, identity: Mapping[str, Any], target: str, local_only: Sequence[str]
) -> None:
    if local_only:
        name = local_only[0]
        raise FailedPrecondition(
            f"{name} objects live in this process, and the infra is the server at {target}",
            field=name,
            fix=f"drop {name}= (register it in the server's plugins), or run embedded (mode='embedded')",
        )
    served = identity.get("backend") or ""
    if cfg.backend != "auto" and served and served != cfg.backend:
        raise FailedPrecondition(
            f"backend {cfg.backend!r} was asked for, but the server at {target} runs the {served!r} backend",
            field="backend",
            fix=f"drop backend= (use the server's), restart the server with `dspy-infra serve --backend"
            f" {cfg.backend}`, or run embedded (mode='embedded')",
        )


async def shutdown_infra() -> None:
    """Close the shared infra (stopping the services it started). Safe to call twice."""
    global _shared
    async with _lock():
        infra, _shared = _shared, None
    if infra is not None:
        await infra.aclose()


@contextlib.asynccontextmanager
async def use_infra(**kwargs: Any) -> AsyncIterator[InfraAPI]:
    """``async with use_infra(services=["redis"]) as infra:`` — ensure, then shut down."""
    infra = await ensure_infra(**kwargs)
    try:
        yield infra
    finally:
        await shutdown_infra()


def _exit_on_sigterm() -> None:
    """Make SIGTERM end the program like Ctrl-C (so ``atexit`` runs and the services stop),
    only where SIGTERM still has its default action (which ends the process without any
    cleanup) and only from the main thread; an app's own handler is never replaced."""
    if threading.current_thread() is not threading.main_thread():
        return
    with contextlib.suppress(ValueError, OSError):
        if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
            signal.signal(signal.SIGTERM, _raise_system_exit)


def _raise_system_exit(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)


if TYPE_CHECKING:
    # mypy proves both kinds satisfy the one interface (names, sync/async-ness, types).
    _embedded: type[InfraAPI] = Infra
    _remote: type[InfraAPI] = RemoteInfra
