"""The operator's dashboard: a static page (HTML, JS, CSS) served at ``/`` of the local API.

The page and its assets carry no data, so they load without the bearer token (``PUBLIC_PATHS``
is exempted in the API's token check); the page asks the operator for the token once, keeps it
in sessionStorage and sends it as ``Authorization: Bearer`` on every ``/api`` call it makes.
Everything is served from package files: nothing is fetched from elsewhere at runtime.
"""

from __future__ import annotations

from collections.abc import Callable
from importlib.resources import files

from fastapi import FastAPI
from fastapi.responses import Response

_ASSETS = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/app.js": ("app.js", "text/javascript; charset=utf-8"),
    "/style.css": ("style.css", "text/css; charset=utf-8"),
}
PUBLIC_PATHS = frozenset(_ASSETS)

# Only our own files, no inline script or style, no frames, no referrer: data rendered by the page
# cannot run as code even if a peer puts markup in a record.
_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


def is_public(method: str, path: str) -> bool:
    """The dashboard's own files: the only requests served without the token."""
    return method in ("GET", "HEAD") and path in PUBLIC_PATHS


def mount_dashboard(app: FastAPI) -> None:
    package = files("node") / "dashboard"
    for path, (name, media_type) in _ASSETS.items():
        app.add_api_route(path, _server((package / name).read_bytes(), media_type), methods=["GET"])


def _server(body: bytes, media_type: str) -> Callable[[], Response]:
    # No parameters: FastAPI would read them from the query string.
    def serve() -> Response:
        return Response(body, media_type=media_type, headers=_HEADERS)

    return serve
