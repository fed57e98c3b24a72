"""The HTTP app (aiohttp): ``GET /metrics``, ``GET /health``, ``GET /queue/status`` and
``POST /queue/submit``.

With a token configured every endpoint but ``/health`` and ``/metrics`` needs
``Authorization: Bearer <token>``. Errors are JSON ``{"error": ..., "field": ..., "fix": ...}``
with the HTTP status derived from the gRPC status the error maps to (``rpc.server``'s one
table, then Google's standard gRPC -> HTTP mapping below), so both faces agree.
"""

from __future__ import annotations

import hmac
import json
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from aiohttp import web
from grpclib.const import Status

from .config import Settings
from .errors import InfraError, SpecError, Unauthenticated
from .metrics import CONTENT_TYPE_LATEST

if TYPE_CHECKING:
    from .infra import Infra

__all__ = ["HTTP_STATUS_BY_GRPC", "INFRA_KEY", "build_app", "http_status_for"]

INFRA_KEY: web.AppKey[Infra] = web.AppKey("infra")
_PUBLIC_PATHS = frozenset({"/health", "/metrics"})

#: gRPC status -> HTTP status (google.rpc's published mapping).
HTTP_STATUS_BY_GRPC: dict[Status, int] = {
    Status.INVALID_ARGUMENT: 400,
    Status.FAILED_PRECONDITION: 400,
    Status.OUT_OF_RANGE: 400,
    Status.UNAUTHENTICATED: 401,
    Status.PERMISSION_DENIED: 403,
    Status.NOT_FOUND: 404,
    Status.ALREADY_EXISTS: 409,
    Status.ABORTED: 409,
    Status.RESOURCE_EXHAUSTED: 429,
    Status.CANCELLED: 499,
    Status.UNIMPLEMENTED: 501,
    Status.UNAVAILABLE: 503,
    Status.DEADLINE_EXCEEDED: 504,
}


def http_status_for(exc: BaseException) -> int:
    from .rpc.server import grpc_status_for

    return HTTP_STATUS_BY_GRPC.get(grpc_status_for(exc), 500)


def _error_response(exc: InfraError) -> web.Response:
    body = {"error": str(exc), "message": exc.message, "field": exc.field, "fix": exc.fix}
    return web.json_response(body, status=http_status_for(exc))


def _auth_middleware(token: str | None) -> Callable[..., Awaitable[web.StreamResponse]]:
    expected = f"Bearer {token}".encode() if token else None

    @web.middleware
    async def middleware(
        request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        if expected is not None and request.path not in _PUBLIC_PATHS:
            given = request.headers.get("Authorization", "").encode()
            if not hmac.compare_digest(given, expected):
                return _error_response(
                    Unauthenticated(
                        "missing or wrong bearer token",
                        field="Authorization",
                        fix="send the header 'Authorization: Bearer <token>'",
                    )
                )
        try:
            return await handler(request)
        except InfraError as exc:
            return _error_response(exc)

    return middleware


async def _metrics(request: web.Request) -> web.Response:
    infra = request.app[INFRA_KEY]
    # CONTENT_TYPE_LATEST carries its own charset parameter, so set the header directly.
    return web.Response(body=infra.metrics.exposition(), headers={"Content-Type": CONTENT_TYPE_LATEST})


async def _health(request: web.Request) -> web.Response:
    doc = await request.app[INFRA_KEY].health()
    return web.json_response(doc, status=200 if doc["healthy"] else 503)


async def _queue_status(request: web.Request) -> web.Response:
    queues = request.app[INFRA_KEY].queue_status()
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
    from .rpc.server import spec_from_doc

    infra = request.app[INFRA_KEY]
    raw = await request.read()
    try:
        doc = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SpecError(f"invalid JSON: {exc}", field="body", fix='send {"payload": {...}}') from None
    state = await infra.scheduler.submit(spec_from_doc(doc, generate_id=True))
    return web.json_response({"id": state.id, "class": state.spec.task_class, "status": str(state.status)})


def build_app(infra: Infra, settings: Settings | None = None) -> web.Application:
    """The aiohttp application serving ``infra``."""
    settings = settings if settings is not None else infra.settings
    # Bodies over the payload limit (plus room for JSON framing) are refused by aiohttp itself.
    app = web.Application(
        middlewares=[_auth_middleware(settings.token)],
        client_max_size=settings.max_payload_bytes + 64 * 1024,
    )
    app[INFRA_KEY] = infra
    app.router.add_get("/metrics", _metrics)
    app.router.add_get("/health", _health)
    app.router.add_get("/queue/status", _queue_status)
    app.router.add_post("/queue/submit", _submit)
    return app
