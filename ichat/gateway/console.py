"""The web console at ``/ui``: static files from package data (``ichat/gateway/ui/``), no build step.

The page holds no data of its own. Its script reads and acts through the same admin API as the
``ichat`` command (``/v1/admin/*``, ``/v1/logs/stream``, ``/metrics``), sending the admin key the
operator types in as ``Authorization: Bearer``; the key stays in the tab's sessionStorage. Log
streams are read with ``fetch`` (an ``EventSource`` cannot send that header) and resumed with
``Last-Event-ID``, like ``ichat logs -f``.

Who gets the page: anyone when the admin API needs a key (the page alone shows and does nothing
without it); only loopback peers when the admin API is open, so an open cluster is not operable
from the network through the console.
"""

from __future__ import annotations

from collections.abc import Callable
from importlib import resources

from aiohttp import web

from ichat.errors import NotFound, PermissionDenied
from ichat.gateway.auth import is_loopback  # one definition of "a loopback peer"

#: the files the console is made of, with their content types; nothing else is served
FILES = {
    "index.html": "text/html",
    "console.js": "text/javascript",
    "console.css": "text/css",
}
HEADERS = {
    # the page's own script and style only; fetches to this origin only; never framed
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
    "img-src 'self' data:; frame-ancestors 'none'; base-uri 'none'; form-action 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


def setup_console(app: web.Application, admin_open: Callable[[], bool]) -> None:
    """Serve the console at /ui. ``admin_open()`` says whether the admin API takes no key now
    (asked per request: a config reload may set or clear the key)."""
    files = resources.files("ichat.gateway").joinpath("ui")

    def check_peer(request: web.Request) -> None:
        if admin_open() and not is_loopback(request.remote):
            raise PermissionDenied(
                "The console is served to loopback only while the admin API has no key; "
                "set auth.admin_key (or admin_key_env) in the gateway config to use it from another host.",
            )

    async def index(request: web.Request) -> web.StreamResponse:
        check_peer(request)
        return _file(files, "index.html")

    async def asset(request: web.Request) -> web.StreamResponse:
        check_peer(request)
        name = request.match_info["name"]
        if name not in FILES:
            raise NotFound(f"No console file {name!r}.")
        return _file(files, name)

    async def redirect(request: web.Request) -> web.StreamResponse:
        check_peer(request)
        raise web.HTTPFound("/ui/")

    app.router.add_get("/ui", redirect)
    app.router.add_get("/ui/", index)
    app.router.add_get("/ui/{name}", asset)


def _file(files: resources.abc.Traversable, name: str) -> web.Response:
    body = files.joinpath(name).read_bytes()
    return web.Response(body=body, content_type=FILES[name], charset="utf-8", headers=HEADERS)
