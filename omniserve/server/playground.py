"""The playground: one page (``GET /`` and ``GET /playground``) served by omniserve itself.

A person who has just deployed a model wants to try it with a picture, a clip or a recording before
writing client code, and to see how the server is doing. The page is three static files shipped in the
package (``static/``): no build step, no CDN, so it works offline and behind any firewall. It holds no
data, so loading it needs no key; everything it shows comes from the same ``/v1`` API any client uses,
with the key the person types in (kept in the tab's memory only) and from ``/metrics``.

Whether it is served follows ``ServerConfig.ui``: on for a loopback-bound server (only this machine can
reach it), off for one bound elsewhere unless ``--ui`` asks for it: an operator exposing a server
decides whether its address also shows a web page.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Awaitable, Callable
from importlib import resources

from fastapi import APIRouter
from fastapi.responses import Response

from omniserve.config import ServerConfig

#: Everything the page may load or call: its own script, style and API; images and sound only from the
#: files the person picked (``data:`` / ``blob:`` URLs). No inline script is allowed, so even text that a
#: bug let through as HTML could not run.
CONTENT_SECURITY_POLICY = "; ".join(
    (
        "default-src 'none'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self' data: blob:",
        "media-src 'self' data: blob:",
        "connect-src 'self'",
        "base-uri 'none'",
        "form-action 'none'",
        "frame-ancestors 'none'",
    )
)

_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",  # a new omniserve version's page is picked up at once
}

#: The page's files (in ``omniserve/server/static/``) and their media types.
PAGE = "playground.html"
ASSETS = {"playground.js": "text/javascript; charset=utf-8", "playground.css": "text/css; charset=utf-8"}


def is_loopback(host: str) -> bool:
    """Whether binding ``host`` keeps the server reachable from this machine only."""
    if host.strip("[]").lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:  # a host name other than localhost: it may resolve anywhere
        return False


def ui_enabled(server: ServerConfig) -> bool:
    """``--ui`` / ``--no-ui`` when given; otherwise on exactly when the server binds a loopback address."""
    return server.ui if server.ui is not None else is_loopback(server.host)


def read_static(name: str) -> bytes:
    """One file of the page, from the installed package (a wheel carries them as package data)."""
    return (resources.files("omniserve.server") / "static" / name).read_bytes()


def build_playground_router() -> APIRouter:
    """``/`` and ``/playground`` (the page) and ``/playground/<asset>``; read once, they are small."""
    router = APIRouter(include_in_schema=False)  # a page, not part of the OpenAI API
    page = read_static(PAGE)
    assets = {name: (read_static(name), media_type) for name, media_type in ASSETS.items()}

    async def show_page() -> Response:
        return Response(page, media_type="text/html; charset=utf-8", headers=_HEADERS)

    router.add_api_route("/", show_page, methods=["GET"])
    router.add_api_route("/playground", show_page, methods=["GET"])

    for name, (body, media_type) in assets.items():
        router.add_api_route(f"/playground/{name}", _static_route(body, media_type), methods=["GET"])
    return router


def _static_route(body: bytes, media_type: str) -> Callable[[], Awaitable[Response]]:
    """A handler answering one file (a closure: FastAPI would read default arguments as query parameters)."""

    async def asset() -> Response:
        return Response(body, media_type=media_type, headers=_HEADERS)

    return asset
