"""The console's static files and who may get them (in process; the browser test is tests/e2e/test_console.py)."""

from __future__ import annotations

from typing import Any

import pytest
from aiohttp import web

from ichat.config import GatewayConfig
from ichat.gateway.app import build_app
from ichat.gateway.console import FILES, is_loopback


def from_peer(address: str):
    """A middleware that makes every request look as if it came from ``address``."""

    @web.middleware
    async def middleware(request: web.Request, handler: Any) -> web.StreamResponse:
        return await handler(request.clone(remote=address))

    return middleware


async def client_from(aiohttp_client: Any, config: dict[str, Any], address: str) -> Any:
    app = build_app(GatewayConfig.from_dict(config, source="test.yaml", environ={}))
    app.middlewares.insert(0, from_peer(address))
    return await aiohttp_client(app)


@pytest.mark.parametrize(
    ("remote", "expected"),
    [("127.0.0.1", True), ("127.9.9.9", True), ("::1", True), ("::ffff:127.0.0.1", True),
     ("10.0.0.1", False), ("::ffff:10.0.0.1", False), ("fe80::1%eth0", False), ("", False), (None, False), ("nonsense", False)],
)  # fmt: skip
def test_is_loopback(remote, expected):
    assert is_loopback(remote) is expected


async def test_the_page_and_its_files_are_served_with_a_strict_policy(gateway):
    client = await gateway({})
    resp = await client.get("/ui", allow_redirects=False)
    assert resp.status == 302 and resp.headers["Location"] == "/ui/"
    page = await client.get("/ui/")
    assert page.status == 200 and page.content_type == "text/html"
    html = await page.text()
    assert '<script src="/ui/console.js"' in html and 'id="workers"' in html
    csp = page.headers["Content-Security-Policy"]
    assert "script-src 'self'" in csp and "frame-ancestors 'none'" in csp
    assert page.headers["X-Content-Type-Options"] == "nosniff"
    for name, content_type in FILES.items():
        resp = await client.get("/ui/" + name)
        assert resp.status == 200 and resp.content_type == content_type
    missing = await client.get("/ui/../admin.py")
    assert missing.status == 404
    assert (await (await client.get("/ui/secrets.txt")).json())["error"]["type"] == "invalid_request_error"


async def test_open_admin_api_means_loopback_only_console(aiohttp_client):
    client = await client_from(aiohttp_client, {}, "192.0.2.10")
    resp = await client.get("/ui/")
    assert resp.status == 403
    error = (await resp.json())["error"]
    assert error["code"] == "forbidden" and "auth.admin_key" in error["message"]
    assert (await client.get("/ui/console.js")).status == 403


async def test_with_an_admin_key_the_page_is_served_and_the_data_needs_the_key(aiohttp_client):
    client = await client_from(aiohttp_client, {"auth": {"admin_key": "k"}}, "192.0.2.10")
    assert (await client.get("/ui/")).status == 200  # the page alone shows nothing
    assert (await client.get("/v1/admin/workers")).status == 401
    ok = await client.get("/v1/admin/workers", headers={"Authorization": "Bearer k"})
    assert ok.status == 200
