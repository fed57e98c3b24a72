"""The console's page and files, read from the package (no build step, no CDN)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from importlib import resources

from aiohttp import web

from . import STATIC_FILES

__all__ = ["add_static_routes"]

_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
}
#: The page may load only its own files and talk only to this server; no inline script,
#: no frames (clickjacking), no plugins.
_CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:;"
    " connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)


def _load() -> dict[str, bytes]:
    root = resources.files("dspy_infra.console") / "static"
    return {name: (root / name).read_bytes() for name in STATIC_FILES}


def add_static_routes(app: web.Application) -> None:
    files = _load()  # a few tens of kB, read once per app

    def handler_for(name: str) -> Callable[[web.Request], Awaitable[web.Response]]:
        body = files[name]
        content_type = _TYPES[name[name.rindex(".") :]]

        async def serve(_request: web.Request) -> web.Response:
            return web.Response(
                body=body,
                headers={
                    "Content-Type": content_type,
                    "Cache-Control": "no-cache",
                    "Content-Security-Policy": _CSP,
                    "X-Content-Type-Options": "nosniff",
                    "Referrer-Policy": "no-referrer",
                },
            )

        return serve

    app.router.add_get("/", handler_for("index.html"))
    for name in STATIC_FILES:
        app.router.add_get(f"/console/{name}", handler_for(name))
