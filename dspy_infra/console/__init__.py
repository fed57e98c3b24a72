"""The web console and its read API: ``/api/v1/...`` (JSON, OpenAPI at
``/api/v1/openapi.json``, Server-Sent Events at ``/api/v1/events``) and the page at ``/``.

The routes sit behind the HTTP app's middlewares (Host check, bearer token, cross-origin and
Content-Type rules for POST). Only the page and its static files are public (``PUBLIC_PATHS``):
they hold no data, and the page asks for the token itself.

Nothing here is imported by ``http.py`` at module level but ``PUBLIC_PATHS``, so importing
this package never imports the HTTP app (no cycle).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    from aiohttp import web

__all__ = ["PUBLIC_PATHS", "STATIC_FILES", "add_console_routes"]

#: The console's static files (served at ``/console/NAME``; ``/`` serves ``index.html``).
STATIC_FILES = ("index.html", "app.js", "style.css")
#: Paths anyone may fetch without the token: the page and its code, never data.
PUBLIC_PATHS = frozenset({"/", *(f"/console/{name}" for name in STATIC_FILES)})


def add_console_routes(
    app: web.Application,
    infra: object,
    submit: Callable[[web.Request], Awaitable[web.Response]],
) -> None:
    """Add ``/api/v1/...``, ``/`` and ``/console/...`` to the HTTP app (``http.build_app``) for
    ``infra``; ``submit`` is ``/queue/submit``'s handler (the API's submit reuses it)."""
    from .api import add_api_routes
    from .static import add_static_routes

    add_api_routes(app, infra, submit)
    add_static_routes(app)
