"""The HTTP app (aiohttp): ``GET /metrics``, ``GET /health``, ``GET /queue/status`` and
``POST /queue/submit``.

With a token configured every endpoint but ``/health`` and ``/metrics`` needs
``Authorization: Bearer <token>``. Errors are JSON ``{"error": ..., "field": ..., "fix": ...}``
with the HTTP status from ``wire.py``'s one table (the gRPC status the error maps to, then
Google's standard gRPC -> HTTP mapping), so both faces agree.

The app talks to the infra only through ``InfraAPI``; the Prometheus text of ``/metrics``
comes from the ``metrics`` callable its owner (``serve.InfraServer``) passes in.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

from aiohttp import web
from aiohttp.typedefs import Middleware

from .api import InfraAPI
from .config import Settings
from .console import PUBLIC_PATHS as _CONSOLE_PUBLIC_PATHS
from .console import add_console_routes
from .errors import InfraError, SpecError, Unauthenticated
from .metrics import CONTENT_TYPE_LATEST
from .values import decode_json_object, preview
from .wire import (
    bearer_matches,
    check_remote_payload,
    error_message,
    http_status_for,
    preview_text,
    spec_from_doc,
)

__all__ = ["INFRA_KEY", "build_app"]

INFRA_KEY: web.AppKey[InfraAPI] = web.AppKey("infra")
_METRICS_KEY: web.AppKey[Callable[[], bytes]] = web.AppKey("metrics")
_SETTINGS_KEY: web.AppKey[Settings] = web.AppKey("settings", Settings)
log = logging.getLogger("dspy_infra.http")
_PUBLIC_PATHS = frozenset({"/health", "/metrics"}) | _CONSOLE_PUBLIC_PATHS


def _json_error(
    status: int, message: str, *, field: str | None = None, fix: str | None = None
) -> web.Response:
    text = f"{field}: {message}" if field else message
    if fix:
        text = f"{text} (fix: {fix})"
    body = {"error": text, "message": message, "field": field, "fix": fix}
    return web.json_response(body, status=status)


def _error_response(exc: InfraError) -> web.Response:
    return web.json_response(
        {
            "error": error_message(exc),
            "message": preview_text(exc.message),
            "field": exc.field,
            "fix": exc.fix,
        },
        status=http_status_for(exc),
    )


_Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
_Middleware = Middleware


@web.middleware
async def _errors_middleware(request: web.Request, handler: _Handler) -> web.StreamResponse:
    """Outermost: every error leaves as the JSON error format, never as text or a traceback.

    aiohttp's own refusals (404, 405, 413 body too large, 400 bad body) come as HTTPException;
    dspy_infra errors map through the one status table; anything else is a bug: logged once
    here with its traceback, answered 500 without internals."""
    try:
        return await handler(request)
    except InfraError as exc:
        return _error_response(exc)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        reason = exc.reason or "error"
        if isinstance(exc, web.HTTPRequestEntityTooLarge):
            return _json_error(
                413,
                f"request body is larger than {request.app[_SETTINGS_KEY].max_payload_bytes} bytes (plus framing)",
                field="body",
                fix="send a smaller payload (or raise max_payload_bytes)",
            )
        return _json_error(exc.status, reason, field=None, fix=None)
    except Exception:
        log.exception("unexpected error in HTTP %s %s", request.method, request.path[:200])
        return _json_error(500, "internal error", fix="see the server log; this is a bug, please report it")


def _host_parts(value: str, default_port: int | None) -> tuple[str, int | None] | None:
    """(lower-case host, port) of a Host header or an Origin's netloc; None if malformed."""
    value = value.strip().lower()
    if not value or len(value) > 300:
        return None
    if value.startswith("["):
        host, sep, rest = value[1:].partition("]")
        if not sep:
            return None
        port_text = rest[1:] if rest.startswith(":") else ("" if not rest else None)
    else:
        host, _, port_text = value.partition(":") if value.count(":") <= 1 else (value, "", "")
    if port_text is None:
        return None
    if port_text:
        if not port_text.isdigit() or len(port_text) > 5:
            return None
        return host, int(port_text)
    return host, default_port


_LOOPBACK_NAMES = frozenset({"127.0.0.1", "localhost", "::1"})


def _served_host(request: web.Request, host: str, port: int | None) -> bool:
    """Whether (host, port) names this server: a loopback name, the configured ``host`` or the
    address the client connected to, on the port it connected to; or an ``allowed_hosts``
    entry ("name" for any port, "name:port")."""
    settings = request.app[_SETTINGS_KEY]
    sockname = request.transport.get_extra_info("sockname") if request.transport is not None else None
    local_ip = str(sockname[0]).lower() if sockname else ""
    local_port = int(sockname[1]) if sockname else None
    if port == local_port and (host in _LOOPBACK_NAMES or host == settings.host.lower() or host == local_ip):
        return True
    for entry in settings.allowed_hosts:
        parts = _host_parts(entry, None)
        if parts is not None and parts[0] == host and (parts[1] is None or parts[1] == port):
            return True
    return False


@web.middleware
async def _host_middleware(request: web.Request, handler: _Handler) -> web.StreamResponse:
    """Answer only Host names this server serves (DNS rebinding: a page on evil.example whose
    name now resolves to 127.0.0.1 sends ``Host: evil.example``)."""
    default = 443 if request.secure else 80
    raw = request.headers.get("Host", "")
    parts = _host_parts(raw, default)
    if parts is None or not _served_host(request, *parts):
        return _json_error(
            421,
            f"this server does not serve the host {preview(raw)}",
            field="Host",
            fix="use 127.0.0.1:PORT, localhost:PORT or the configured host; add a proxy's name to allowed_hosts",
        )
    return await handler(request)


_MUTATING = frozenset({"POST", "PUT", "PATCH", "DELETE"})


@web.middleware
async def _mutation_middleware(request: web.Request, handler: _Handler) -> web.StreamResponse:
    """A request that changes state must be one a web page cannot forge: a cross-site page can
    POST ``text/plain`` or form bodies without asking, but not ``application/json`` (that
    needs a CORS preflight we never grant), and its ``Origin`` names the foreign site."""
    if request.method not in _MUTATING:
        return await handler(request)
    origin = request.headers.get("Origin")
    if origin is not None:
        scheme, sep, netloc = origin.partition("://")
        default = {"http": 80, "https": 443}.get(scheme.lower())
        parts = _host_parts(netloc, default) if sep and default is not None else None
        if parts is None or not _served_host(request, *parts):
            return _json_error(
                403,
                f"cross-origin request from {preview(origin)} refused",
                field="Origin",
                fix="call the API from a program (no Origin header) or from a page served by this server",
            )
    if request.headers.get("Sec-Fetch-Site", "").lower() in ("cross-site", "same-site"):
        return _json_error(
            403, "cross-site request refused", field="Sec-Fetch-Site", fix="call the API from a program"
        )
    if request.content_type != "application/json":
        return _json_error(
            415,
            f"Content-Type must be application/json, got {preview(request.content_type)}",
            field="Content-Type",
            fix="send the header 'Content-Type: application/json' with a JSON body",
        )
    return await handler(request)


def _auth_middleware(token: str | None) -> _Middleware:
    @web.middleware
    async def middleware(request: web.Request, handler: _Handler) -> web.StreamResponse:
        if token and request.path not in _PUBLIC_PATHS:
            if not bearer_matches(request.headers.get("Authorization", ""), token):
                return _error_response(
                    Unauthenticated(
                        "missing or wrong bearer token",
                        field="Authorization",
                        fix="send the header 'Authorization: Bearer <token>'",
                    )
                )
        return await handler(request)

    return middleware


async def _metrics(request: web.Request) -> web.Response:
    # CONTENT_TYPE_LATEST carries its own charset parameter, so set the header directly.
    return web.Response(body=request.app[_METRICS_KEY](), headers={"Content-Type": CONTENT_TYPE_LATEST})


async def _health(request: web.Request) -> web.Response:
    doc = await request.app[INFRA_KEY].health()
    return web.json_response(doc, status=200 if doc["healthy"] else 503)


async def _queue_status(request: web.Request) -> web.Response:
    queues = await request.app[INFRA_KEY].queue_status()
    return web.json_response(
        {
            name: {
                "depth": q.depth,
                "inflight": q.inflight,
                "limit": q.limit,
                "min_limit": q.min_limit,
                "max_limit": q.max_limit,
            }
            for name, q in queues.items()
        }
    )


async def _submit(request: web.Request) -> web.Response:
    infra = request.app[INFRA_KEY]
    settings = request.app[_SETTINGS_KEY]
    raw = await request.read()
    if raw.strip(b" \t\r\n") == b"null":  # decode_json_object reads null as {}; a body must be a task
        raise SpecError("expected a JSON object, got null", field="body", fix='send {"payload": {...}}')
    doc = decode_json_object(raw, "body", max_bytes=_body_limit(settings))
    spec = spec_from_doc(doc, generate_id=True)
    check_remote_payload(settings, spec.payload, "payload")
    state = await infra.submit(spec)
    return web.json_response({"id": state.id, "class": state.spec.task_class, "status": str(state.status)})


def _body_limit(settings: Settings) -> int:
    # The payload limit plus room for the JSON framing around it (id, class, ...).
    return settings.max_payload_bytes + 64 * 1024


def build_app(
    infra: InfraAPI, settings: Settings | None = None, *, metrics: Callable[[], bytes] | None = None
) -> web.Application:
    """The aiohttp application serving ``infra``; ``metrics`` gives the Prometheus text of
    ``/metrics`` (without it the endpoint serves an empty exposition)."""
    settings = settings if settings is not None else infra.settings
    # Bodies over the limit are refused by aiohttp itself (413, turned into our JSON format).
    app = web.Application(
        middlewares=[
            _errors_middleware,
            _host_middleware,
            _auth_middleware(settings.token),
            _mutation_middleware,
        ],
        client_max_size=_body_limit(settings),
    )
    app[INFRA_KEY] = infra
    app[_SETTINGS_KEY] = settings
    app[_METRICS_KEY] = metrics if metrics is not None else bytes
    app.router.add_get("/metrics", _metrics)
    app.router.add_get("/health", _health)
    app.router.add_get("/queue/status", _queue_status)
    app.router.add_post("/queue/submit", _submit)
    add_console_routes(app, infra, _submit)  # /api/v1/..., the console page at /
    return app
