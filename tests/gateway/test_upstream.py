"""The proxy's small HTTP/1.1 client against scripted raw-socket upstreams on 127.0.0.1.

Each scripted upstream is an ``asyncio.start_server`` whose handler reads requests and writes
exactly the bytes a test wants, split where the test wants, so framing edge cases (chunk sizes
cut in the middle, trailers, interim answers, closes at awkward moments) are exercised for real.
"""

from __future__ import annotations

import asyncio
import hashlib
import random
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
from aiohttp.test_utils import make_mocked_request

from ichat.config import RoutingSettings
from ichat.gateway.headers import request_head, split_request_headers
from ichat.gateway.metrics import GatewayMetrics
from ichat.gateway.proxy import Proxy
from ichat.gateway.upstream import (
    HIGH_WATER,
    ConnectFailed,
    ConnectionBroken,
    ProtocolError,
    ReadTimeout,
    UpstreamClient,
)
from ichat.routing.table import RoutingTable

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter, "Scripted"], Awaitable[None]]


class Scripted:
    """A raw upstream: ``handler(reader, writer, self)`` runs per connection."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.connections = 0
        self.requests: list[bytes] = []
        self.lost = asyncio.Event()
        self.port = 0

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._on_connection, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]

    async def _on_connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            await self.handler(reader, writer, self)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        except asyncio.CancelledError:
            pass  # the test ended first; Python 3.11's start_server logs a cancelled handler
        finally:
            self.lost.set()
            writer.close()

    async def read_request(self, reader: asyncio.StreamReader) -> bytes:
        """One request (head + Content-Length body); b"" when the client closed."""
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError:
            return b""
        length = 0
        for line in head.split(b"\r\n"):
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":")[1])
        body = await reader.readexactly(length)
        self.requests.append(head + body)
        return head + body


@pytest.fixture
async def upstream() -> AsyncIterator[Callable[[Handler], Awaitable[Scripted]]]:
    servers: list[Scripted] = []

    async def make(handler: Handler) -> Scripted:
        server = Scripted(handler)
        await server.start()
        servers.append(server)
        return server

    yield make
    for server in servers:
        server.server.close()


@pytest.fixture
async def client() -> AsyncIterator[UpstreamClient]:
    c = UpstreamClient(connect_timeout=2, read_timeout=2, total_timeout=None, keepalive_s=60)
    yield c
    c.close()


def head(body: bytes = b"", path: bytes = b"/v1/x") -> bytes:
    return b"POST %s HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\n\r\n" % (path, len(body))


def answer(body: bytes, extra: bytes = b"") -> bytes:
    return b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n%sContent-Length: %d\r\n\r\n%s" % (extra, len(body), body)


def chunked(*pieces: bytes, trailers: bytes = b"") -> bytes:
    out = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
    for piece in pieces:
        out += b"%x;ext=1\r\n%s\r\n" % (len(piece), piece)
    return out + b"0\r\n" + trailers + b"\r\n"


async def serve_each(reply: Callable[[bytes], bytes]) -> Handler:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, server: Scripted) -> None:
        while request := await server.read_request(reader):
            writer.write(reply(request))
            await writer.drain()

    return handler


async def read_all(response) -> bytes:
    out = b""
    while chunk := await response.read_chunk():
        out += chunk
    return out


# -- framing ------------------------------------------------------------------------------------


async def test_content_length_answer_and_keep_alive_reuse(upstream, client):
    server = await upstream(await serve_each(lambda req: answer(b'{"n": %d}' % len(req))))
    pool = client.pool("127.0.0.1", server.port)
    for i in range(3):
        response = await client.request(pool, head(b"x" * i), b"x" * i)
        assert response.status == 200 and response.content_length is not None
        assert (await response.read()).startswith(b'{"n": ')
        response.close()
    assert server.connections == 1  # one connection, reused
    assert pool.idle_count == 1
    assert server.requests[2].endswith(b"\r\n\r\nxx")


async def test_chunked_answer_split_at_every_byte(upstream, client):
    events = [b"data: %d\n\n" % i for i in range(5)]
    wire = chunked(*events, trailers=b"X-Trailer: yes\r\n")

    async def handler(reader, writer, server):
        while await server.read_request(reader):
            for i in range(len(wire)):  # one byte per write: every cut of the framing
                writer.write(wire[i : i + 1])
                await writer.drain()

    server = await upstream(handler)
    pool = client.pool("127.0.0.1", server.port)
    for _ in range(2):
        response = await client.request(pool, head(), b"")
        assert response.chunked and response.content_type == b"text/event-stream"
        assert await read_all(response) == b"".join(events)
    assert server.connections == 1  # the end of a chunked answer leaves the connection reusable


async def test_chunked_answer_in_one_write_with_the_head(upstream, client):
    server = await upstream(await serve_each(lambda req: chunked(b"a" * 10, b"b" * 300, b"c")))
    response = await client.request(client.pool("127.0.0.1", server.port), head(), b"")
    assert await response.read() == b"a" * 10 + b"b" * 300 + b"c"


@pytest.mark.parametrize("size_line", [b"zz", b"-5", b"+5", b"1_0", b""])
async def test_bad_chunk_size_is_a_protocol_error(size_line: bytes, upstream, client):
    wire = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n%s\r\nhello\r\n0\r\n\r\n" % size_line
    server = await upstream(await serve_each(lambda req: wire))
    response = await client.request(client.pool("127.0.0.1", server.port), head(), b"")
    with pytest.raises(ProtocolError):
        await read_all(response)


async def test_answer_until_close_has_no_length(upstream, client):
    async def handler(reader, writer, server):
        await server.read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\npart one, ")
        await writer.drain()
        await asyncio.sleep(0.01)
        writer.write(b"part two")
        await writer.drain()
        writer.close()

    server = await upstream(handler)
    pool = client.pool("127.0.0.1", server.port)
    response = await client.request(pool, head(), b"")
    assert response.content_length is None and not response.chunked
    assert await response.read() == b"part one, part two"
    assert pool.idle_count == 0


async def test_connection_close_answer_is_not_reused(upstream, client):
    server = await upstream(await serve_each(lambda req: answer(b"{}", b"Connection: close\r\n")))
    pool = client.pool("127.0.0.1", server.port)
    for _ in range(2):
        response = await client.request(pool, head(), b"")
        assert await response.read() == b"{}"
    assert server.connections == 2 and pool.idle_count == 0


async def test_interim_answers_are_skipped(upstream, client):
    server = await upstream(
        await serve_each(lambda req: b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: x\r\n\r\n" + answer(b"ok"))
    )
    response = await client.request(client.pool("127.0.0.1", server.port), head(), b"")
    assert response.status == 200 and await response.read() == b"ok"


async def test_bodiless_answers(upstream, client):
    server = await upstream(await serve_each(lambda req: b"HTTP/1.1 204 No Content\r\nX-A: 1\r\n\r\n"))
    pool = client.pool("127.0.0.1", server.port)
    for _ in range(2):
        response = await client.request(pool, head(), b"")
        assert response.status == 204 and await response.read() == b""
    assert server.connections == 1


async def test_bytes_past_content_length_keep_the_answer_but_not_the_connection(upstream, client):
    server = await upstream(await serve_each(lambda req: answer(b"12345") + b"garbage"))
    pool = client.pool("127.0.0.1", server.port)
    response = await client.request(pool, head(), b"")
    assert await response.read() == b"12345"
    assert pool.idle_count == 0


@pytest.mark.parametrize(
    "wire",
    [
        b"SPDY/3 200 OK\r\n\r\n",
        b"HTTP/1.1 2000 OK\r\n\r\n",
        b"HTTP/1.1 200 OK\r\n folded: header\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nX: " + b"y" * 70000 + b"\r\n\r\n",
    ],
)
async def test_malformed_heads_are_protocol_errors(wire: bytes, upstream, client):
    server = await upstream(await serve_each(lambda req: wire))
    with pytest.raises(ProtocolError):
        await client.request(client.pool("127.0.0.1", server.port), head(), b"")


async def test_large_request_body_and_answer_arrive_intact(upstream, client):
    async def handler(reader, writer, server):
        while request := await server.read_request(reader):
            body = request.split(b"\r\n\r\n", 1)[1]
            writer.write(chunked(*[body[i : i + 100_000] for i in range(0, len(body), 100_000)]))
            await writer.drain()

    server = await upstream(handler)
    body = bytes(range(256)) * (3 * 2**20 // 256)
    response = await client.request(client.pool("127.0.0.1", server.port), head(body), body)
    received = b""
    while chunk := await response.read_chunk():
        received += chunk
        await asyncio.sleep(0.001)  # a slow reader: the connection pauses past HIGH_WATER
        assert len(chunk) <= HIGH_WATER + 2**18  # at most one socket read past the mark
    assert hashlib.sha256(received).digest() == hashlib.sha256(body).digest()


@pytest.mark.parametrize("size", [HIGH_WATER + 1, 2**20, 3 * 2**20])
async def test_whole_body_read_past_the_back_pressure_mark_finishes(size: int, upstream, client):
    # read() wants every byte: pausing the socket at HIGH_WATER would wait forever (issue #12).
    body = bytes(range(256)) * (size // 256) + b"x" * (size % 256)
    server = await upstream(await serve_each(lambda request: answer(body)))

    response = await client.request(client.pool("127.0.0.1", server.port), head(), b"")
    received = await asyncio.wait_for(response.read(), 10)

    assert received == body


# -- connection reuse and its failures ----------------------------------------------------------


async def test_upstream_closing_an_idle_connection_is_invisible(upstream, client):
    async def handler(reader, writer, server):
        await server.read_request(reader)
        writer.write(answer(b"one"))
        await writer.drain()
        await asyncio.sleep(0.05)
        writer.close()  # its keep-alive timer: the idle connection goes

    server = await upstream(handler)
    pool = client.pool("127.0.0.1", server.port)
    response = await client.request(pool, head(), b"")
    assert await response.read() == b"one"
    await asyncio.wait_for(server.lost.wait(), 2)
    await asyncio.sleep(0.01)
    assert pool.idle_count == 0  # dropped from the pool when the close arrived

    response = await client.request(pool, head(), b"")
    assert await response.read() == b"one"
    assert server.connections == 2


async def test_close_crossing_a_request_on_a_reused_connection_is_retried_once(upstream, client):
    async def handler(reader, writer, server):
        await server.read_request(reader)
        writer.write(answer(b"first"))
        await writer.drain()
        if server.connections == 1:
            # The next request arrives just as this idle connection is being closed: it is
            # never answered (the upstream's keep-alive timer won the race).
            await server.read_request(reader)
            writer.transport.abort()

    server = await upstream(handler)
    pool = client.pool("127.0.0.1", server.port)
    assert await (await client.request(pool, head(), b"")).read() == b"first"
    response = await client.request(pool, head(b"again"), b"again")
    assert await response.read() == b"first"
    assert server.connections == 2 and len(server.requests) == 3


async def test_fresh_connection_closed_without_answer_is_an_error(upstream, client):
    async def handler(reader, writer, server):
        await server.read_request(reader)
        writer.transport.abort()

    server = await upstream(handler)
    with pytest.raises(ConnectionBroken) as info:
        await client.request(client.pool("127.0.0.1", server.port), head(), b"")
    assert not info.value.answered
    assert server.connections == 1  # not retried: this connection was new


async def test_reset_mid_body_is_reported_as_answered(upstream, client):
    async def handler(reader, writer, server):
        await server.read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
        await writer.drain()
        await asyncio.sleep(0.02)
        writer.transport.abort()

    server = await upstream(handler)
    response = await client.request(client.pool("127.0.0.1", server.port), head(), b"")
    assert await response.read_chunk() == b"hello"
    with pytest.raises(ConnectionBroken) as info:
        await response.read_chunk()
    assert info.value.answered


async def test_closing_an_unfinished_answer_closes_the_connection(upstream, client):
    async def handler(reader, writer, server):
        await server.read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
        await writer.drain()
        await reader.read()  # until the client goes away

    server = await upstream(handler)
    pool = client.pool("127.0.0.1", server.port)
    response = await client.request(pool, head(), b"")
    assert await response.read_chunk() == b"hello"
    response.close()
    await asyncio.wait_for(server.lost.wait(), 2)  # the upstream sees the request abandoned
    assert pool.idle_count == 0


async def test_cancelled_request_closes_the_connection(upstream, client):
    async def handler(reader, writer, server):
        await server.read_request(reader)
        await reader.read()

    server = await upstream(handler)
    task = asyncio.create_task(client.request(client.pool("127.0.0.1", server.port), head(), b""))
    await asyncio.sleep(0.05)
    task.cancel()
    await asyncio.wait_for(server.lost.wait(), 2)


async def test_connect_refused_and_timeouts(upstream):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead_port = s.getsockname()[1]

    async def silent(reader, writer, server):
        await server.read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n12345")
        await writer.drain()
        await reader.read()

    server = await upstream(silent)
    client = UpstreamClient(connect_timeout=1, read_timeout=0.2, total_timeout=None, keepalive_s=60)
    try:
        with pytest.raises(ConnectFailed):
            await client.request(client.pool("127.0.0.1", dead_port), head(), b"")
        response = await client.request(client.pool("127.0.0.1", server.port), head(), b"")
        with pytest.raises(ReadTimeout):
            await response.read()  # five bytes came, then nothing for longer than read_timeout
    finally:
        client.close()

    async def hang(reader, writer, server):
        await server.read_request(reader)
        await reader.read()

    server = await upstream(hang)
    client = UpstreamClient(connect_timeout=1, read_timeout=5, total_timeout=0.2, keepalive_s=60)
    try:
        with pytest.raises(ReadTimeout):
            await asyncio.wait_for(client.request(client.pool("127.0.0.1", server.port), head(), b""), 2)
    finally:
        client.close()


async def test_idle_connections_expire(upstream):
    server = await upstream(await serve_each(lambda req: answer(b"x")))
    client = UpstreamClient(connect_timeout=1, read_timeout=1, total_timeout=None, keepalive_s=0.05)
    try:
        pool = client.pool("127.0.0.1", server.port)
        await (await client.request(pool, head(), b"")).read()
        await asyncio.sleep(0.1)
        await (await client.request(pool, head(), b"")).read()
        assert server.connections == 2  # the idle one had outlived keepalive_s
    finally:
        client.close()


# -- the head the proxy builds for this client ----------------------------------------------------


@pytest.mark.parametrize(
    ("api_base", "pooled", "host_line", "path"),
    [
        ("http://127.0.0.1:8001/v1", True, b"Host: 127.0.0.1:8001\r\n", b"/v1/chat/completions?x=1"),
        ("http://worker.local/serving/v1/", True, b"Host: worker.local\r\n", b"/serving/v1/chat/completions?x=1"),
        ("http://[::1]:9000", True, b"Host: [::1]:9000\r\n", b"/chat/completions?x=1"),
        ("https://api.example.com/v1", False, b"Host: api.example.com\r\n", None),
    ],
)
async def test_proxy_builds_the_upstream_request_head(api_base: str, pooled: bool, host_line: bytes, path: bytes | None):
    """The api_base's host and path prefix, the client's headers less hop-by-hop ones (and
    those its Connection header names), then the endpoint's key, the request id and the length."""
    table = RoutingTable()
    proxy = Proxy(
        table, RoutingSettings(), upstreams=UpstreamClient(connect_timeout=1, read_timeout=1, total_timeout=None),
        rng=random.Random(0), clock=lambda: 0.0, forward_client_auth=False, metrics=GatewayMetrics(table),
    )  # fmt: skip
    try:
        target = proxy._target(api_base)
        assert (target.pool is not None) is pooled and target.host_line == host_line
        if path is None:
            return
        request = make_mocked_request(
            "POST",
            "/v1/chat/completions?x=1",
            headers={"Host": "gw", "Connection": "keep-alive, X-Hop", "X-Hop": "1", "X-Keep": "2", "Expect": "100-continue"},
        )
        forwarded, _, _ = split_request_headers(request.raw_headers)
        head = request_head(request, target.path_prefix, target.host_line, forwarded, b"Bearer k", b"rid", b"cid", 7)
        assert head == (
            b"POST " + path + b" HTTP/1.1\r\n" + host_line + b"X-Keep: 2\r\nAuthorization: Bearer k\r\n"
            + b"X-Request-Id: rid\r\nX-Ichat-Correlation-Id: cid\r\nContent-Length: 7\r\n\r\n"
        )  # fmt: skip
    finally:
        proxy.close()
