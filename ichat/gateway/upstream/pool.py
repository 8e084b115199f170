"""Keep-alive connections to plain-HTTP upstreams, on asyncio protocols.

Why not ``aiohttp.ClientSession`` for everything: profiling the gateway at concurrency 32 put
most of a proxied request's CPU inside ``ClientSession._request`` (request and response
objects, header multidicts, payload registry, timers, a StreamReader per answer), for a
request whose bytes the proxy already has and an answer it relays untouched. This client does
the least that forwarding needs: one pre-built request head plus the body in one write, the
sans-IO response parser of :mod:`.parser` to frame the answer, and per-host pools of idle
keep-alive connections.

Connection reuse: an idle connection the upstream closed is dropped from its pool when the
loop sees the close, so the next request opens a new one. When the close crosses our request
on the wire (the upstream's keep-alive timer fired just as we sent), the request fails with
no byte of answer; on a *reused* connection that one case is retried once on a fresh
connection, because the upstream never read it. The proxy itself already treats "reset before
the first byte" as retryable, so this retry only keeps that race out of the failure counts.

Backpressure: a response buffers at most ``HIGH_WATER`` bytes its reader has not taken; past
that the connection stops reading from the socket until the reader catches up. A reader that
wants the whole body (``read()``) turns it off: the caller bounds what it reads whole.

Timeouts: one sweeper per pool checks the busy connections (a timer per request would cost
more than the rest of the client's bookkeeping). :meth:`UpstreamClient.configure` changes them
for every pool, those already open included.
"""

from __future__ import annotations

import asyncio
import socket

from ichat.gateway.upstream.errors import ConnectFailed, ConnectionBroken, ProtocolError, ReadTimeout, UpstreamFailure
from ichat.gateway.upstream.parser import DONE, HEAD, IDLE, ResponseParser

#: unread bytes a response buffers before the connection pauses reading
HIGH_WATER = 256 * 1024
#: bodies up to this size are appended to the head in one write; larger ones go as a second buffer
_JOIN_BODY_MAX = 64 * 1024
#: idle keep-alive connections to an upstream are reused for this long (seconds)
KEEPALIVE_S = 60.0


class UpstreamResponse:
    """An answer being received: the head's fields (see :class:`.parser.ResponseHead`), then
    ``read()`` the whole body, or ``read_chunk()`` until b"".

    ``close()`` when done with it: a no-op once the body was read to the end (the connection
    went back to its pool then); otherwise it closes the connection, which tells the upstream
    to stop working on the request.
    """

    __slots__ = (
        "status", "reason", "headers", "content_length", "content_type", "chunked", "keep_alive",
        "_conn", "_loop", "_pieces", "_buffered", "_done", "_exc", "_waiter", "_whole",
    )  # fmt: skip

    def __init__(self, conn: _Connection) -> None:
        self.status = 0
        self.reason = ""
        #: (name, value) pairs as received, hop-by-hop ones included
        self.headers: list[tuple[bytes, bytes]] = []
        self.content_length: int | None = None
        #: the Content-Type header, lower-cased (b"" when absent)
        self.content_type = b""
        self.chunked = False
        self.keep_alive = True
        self._conn: _Connection | None = conn
        # The connection's loop, kept: asyncio.get_running_loop() costs a getpid() call on 3.11.
        self._loop = conn.loop
        self._pieces: list[bytes] = []
        self._buffered = 0
        self._done = False
        self._exc: BaseException | None = None
        self._waiter: asyncio.Future[None] | None = None
        #: the reader wants the whole body (read()): buffer it all, never pause the connection
        self._whole = False

    async def read(self) -> bytes:
        """The whole body. Back-pressure is off: the caller bounds the size it reads whole (the
        proxy does so by ``Content-Length``), and a paused connection would never finish."""
        self._whole = True
        conn = self._conn
        if conn is not None and conn.paused:
            conn.resume()
        while not self._done:
            if self._exc is not None:
                raise self._exc
            waiter = self._waiter = self._loop.create_future()
            try:
                await waiter
            finally:
                self._waiter = None
        if self._exc is not None:
            raise self._exc
        pieces = self._pieces
        self._pieces = []
        self._buffered = 0
        return pieces[0] if len(pieces) == 1 else b"".join(pieces)

    async def read_chunk(self) -> bytes:
        """Every body byte that has arrived since the last call (waiting for at least one);
        b"" at the end of the body."""
        while not self._pieces:
            if self._exc is not None:
                raise self._exc
            if self._done:
                return b""
            # Inline, not a helper coroutine: this wait is paid once per streamed chunk.
            waiter = self._waiter = self._loop.create_future()
            try:
                await waiter
            finally:
                self._waiter = None
        pieces = self._pieces
        self._pieces = []
        self._buffered = 0
        conn = self._conn
        if conn is not None and conn.paused:
            conn.resume()
        return pieces[0] if len(pieces) == 1 else b"".join(pieces)

    def close(self) -> None:
        conn = self._conn
        if conn is not None and not self._done:
            self._conn = None
            conn.abort()

    # -- fed by the connection ---------------------------------------------------------------

    def _feed(self, piece: bytes) -> None:
        self._pieces.append(piece)
        self._buffered += len(piece)
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
        if self._buffered > HIGH_WATER and not self._whole and self._conn is not None:
            self._conn.pause()

    def _finish(self) -> None:
        self._done = True
        self._conn = None
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _fail(self, exc: BaseException) -> None:
        self._exc = exc
        self._conn = None
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)


class _Connection(asyncio.Protocol):
    """One keep-alive connection; at most one request at a time (no pipelining)."""

    def __init__(self, pool: Pool) -> None:
        self.pool = pool
        self.loop = pool.loop
        self.transport: asyncio.Transport | None = None
        self.response: UpstreamResponse | None = None
        self.head_waiter: asyncio.Future[UpstreamResponse] | None = None
        self.parser = ResponseParser(self._on_head, self._on_body, self._complete)
        self.paused = False
        self.idle_since = 0.0
        self._answered = False
        self._last_data = 0.0  # loop time of the last byte received (read timeout)
        self._deadline = 0.0  # loop time by which the whole answer must be in (total timeout)

    @property
    def state(self) -> int:
        return self.parser.state

    # -- asyncio.Protocol --------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        if sock is not None:
            # Relay each piece at once: Nagle would hold a small request or SSE event back
            # until the previous segment is acknowledged (tens of ms on some stacks).
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except (OSError, AttributeError):
                pass

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self.pool.forget(self)
        parser = self.parser
        state = parser.state
        if parser.feed_eof() or state in (IDLE, DONE):
            return
        what = "before answering" if state == HEAD and not self._answered else "mid-response"
        detail = f": {exc}" if exc else ""
        self._fail(ConnectionBroken(f"upstream closed the connection {what}{detail}", answered=self._answered))

    def eof_received(self) -> bool:
        return False  # close our side too; connection_lost follows

    def data_received(self, data: bytes) -> None:
        if self.response is None or self.parser.state == DONE:
            # Bytes nobody asked for: the upstream is out of step with us. Never reuse.
            self.abort()
            return
        self._answered = True
        self._last_data = self.loop.time()
        try:
            self.parser.feed(data)
        except ProtocolError as exc:
            self._fail(exc)
            self.abort()

    # -- the parser's callbacks --------------------------------------------------------------

    def _on_head(self) -> None:
        waiter = self.head_waiter
        self.head_waiter = None
        if waiter is not None and not waiter.done():
            waiter.set_result(self.response)  # type: ignore[arg-type]

    def _on_body(self, data: bytes) -> None:
        self.response._feed(data)  # type: ignore[union-attr]

    # -- requests ----------------------------------------------------------------------------

    def send(self, head: bytes, body: bytes, deadline: float, method_head: bool) -> UpstreamResponse:
        assert self.transport is not None and self.parser.state == IDLE
        response = self.response = UpstreamResponse(self)
        self.head_waiter = self.loop.create_future()
        self.parser.start(response, method_head)
        self._answered = False
        self._deadline = deadline
        self._last_data = self.loop.time()
        self.pool.watch(self)
        if len(body) <= _JOIN_BODY_MAX:
            self.transport.write(head + body if body else head)
        else:
            self.transport.writelines((head, body))
        return response

    def pause(self) -> None:
        if not self.paused and self.transport is not None:
            self.paused = True
            self.transport.pause_reading()

    def resume(self) -> None:
        if self.paused:
            self.paused = False
            self._last_data = self.loop.time()  # the read timeout counts from here again
            if self.transport is not None:
                self.transport.resume_reading()

    def abort(self) -> None:
        """Close now, discarding unsent bytes: the upstream sees the request abandoned."""
        self.parser.reusable = False
        transport = self.transport
        if transport is not None:
            transport.abort()
        elif self.parser.state not in (IDLE, DONE):
            self._fail(ConnectionBroken("connection closed"))

    # -- endings -----------------------------------------------------------------------------

    def _complete(self) -> None:
        self.pool.unwatch(self)
        response = self.response
        self.response = None
        if response is not None:
            response._finish()
        transport = self.transport
        if transport is None:
            return
        if not self.parser.reusable or transport.get_write_buffer_size():
            # An answer that came before our request body was all sent (an early 413, say):
            # the rest of the body would be read as the next request. Never reuse.
            transport.close()
            return
        if self.paused:
            self.paused = False
            transport.resume_reading()
        self.parser.state = IDLE
        self.pool.release(self)

    def _fail(self, exc: UpstreamFailure) -> None:
        parser = self.parser
        parser.state = DONE
        parser.reusable = False
        self.pool.unwatch(self)
        waiter = self.head_waiter
        self.head_waiter = None
        if waiter is not None and not waiter.done():
            waiter.set_exception(exc)
        response = self.response
        self.response = None
        if response is not None:
            response._fail(exc)

    def check_timeouts(self, now: float, read_timeout: float) -> None:
        """Called by the pool's sweeper while a request is in flight."""
        state = self.parser.state
        if state in (IDLE, DONE):
            self.pool.unwatch(self)
            return
        if now >= self._deadline:
            self._fail(ReadTimeout("upstream exceeded the request's total time"))
        elif self.paused:
            self._last_data = now  # our reader is slow, not the upstream
            return
        elif now - self._last_data >= read_timeout:
            what = "answer" if state == HEAD else "send more"
            self._fail(ReadTimeout(f"upstream did not {what} within {read_timeout:g} s"))
        else:
            return
        self.abort()


class Pool:
    """Keep-alive connections to one ``host:port``: the idle ones (most recently used last),
    and the busy ones, whose timeouts one sweeper checks for all (a timer per request would
    cost more than the rest of the client's bookkeeping)."""

    def __init__(
        self, host: str, port: int, *, connect_timeout: float, read_timeout: float, total_timeout: float | None, keepalive_s: float
    ) -> None:
        self.host = host
        self.port = port
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self.total_timeout = total_timeout
        self.keepalive_s = keepalive_s
        #: how often busy connections are checked: timeouts fire at most this late
        self.sweep_every = _sweep_interval(read_timeout, total_timeout)
        self.loop = asyncio.get_running_loop()
        self._idle: list[_Connection] = []
        self._all: set[_Connection] = set()
        self._busy: set[_Connection] = set()
        self._sweeper: asyncio.TimerHandle | None = None
        self.closed = False

    def set_timeouts(self, connect_timeout: float, read_timeout: float, total_timeout: float | None) -> None:
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self.total_timeout = total_timeout
        self.sweep_every = _sweep_interval(read_timeout, total_timeout)

    def take_idle(self) -> _Connection | None:
        """The most recently used idle connection still open, if any."""
        idle = self._idle
        if idle:
            now = self.loop.time()
            while idle:
                conn = idle.pop()
                transport = conn.transport
                if transport is not None and not transport.is_closing() and now - conn.idle_since < self.keepalive_s:
                    return conn
                self._discard(conn)
        return None

    async def connect(self) -> _Connection:
        if self.closed:
            raise ConnectFailed("the gateway is shutting down")
        try:
            _, conn = await asyncio.wait_for(
                self.loop.create_connection(lambda: _Connection(self), self.host, self.port),
                self.connect_timeout,
            )
        except asyncio.TimeoutError as exc:
            raise ConnectFailed(f"no connection within {self.connect_timeout:g} s") from exc
        except OSError as exc:
            raise ConnectFailed(f"cannot connect: {exc.strerror or exc}") from exc
        self._all.add(conn)
        return conn

    def release(self, conn: _Connection) -> None:
        if self.closed:
            self._discard(conn)
            return
        now = self.loop.time()
        conn.idle_since = now
        idle = self._idle
        # Amortized expiry: the least recently used connection goes once it idled too long.
        if idle and now - idle[0].idle_since >= self.keepalive_s:
            self._discard(idle.pop(0))
        idle.append(conn)

    def forget(self, conn: _Connection) -> None:
        """``conn`` closed (while idle: the upstream's keep-alive timer, a restart)."""
        self._all.discard(conn)
        self._busy.discard(conn)
        try:
            self._idle.remove(conn)
        except ValueError:
            pass

    def _discard(self, conn: _Connection) -> None:
        self._all.discard(conn)
        if conn.transport is not None:
            conn.transport.close()

    # -- timeouts of requests in flight --------------------------------------------------------

    def watch(self, conn: _Connection) -> None:
        self._busy.add(conn)
        if self._sweeper is None:
            self._sweeper = self.loop.call_later(self.sweep_every, self._sweep)

    def unwatch(self, conn: _Connection) -> None:
        self._busy.discard(conn)

    def _sweep(self) -> None:
        self._sweeper = None
        now = self.loop.time()
        read_timeout = self.read_timeout
        for conn in list(self._busy):
            conn.check_timeouts(now, read_timeout)
        if self._busy:
            self._sweeper = self.loop.call_later(self.sweep_every, self._sweep)

    def close(self) -> None:
        self.closed = True
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        for conn in list(self._all):
            conn.abort()
        self._idle.clear()
        self._all.clear()
        self._busy.clear()

    @property
    def idle_count(self) -> int:
        return len(self._idle)


def _sweep_interval(read_timeout: float, total_timeout: float | None) -> float:
    return min(1.0, read_timeout / 4, (total_timeout or 4.0) / 4)


class UpstreamClient:
    """Pools by ``(host, port)``, and the request entry point for plain-HTTP upstreams."""

    def __init__(
        self, *, connect_timeout: float, read_timeout: float, total_timeout: float | None, keepalive_s: float = KEEPALIVE_S
    ) -> None:
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self.total_timeout = total_timeout
        self.keepalive_s = keepalive_s
        self._pools: dict[tuple[str, int], Pool] = {}

    def configure(self, *, connect_timeout: float, read_timeout: float, total_timeout: float | None) -> None:
        """New timeouts (config reload), for new pools and for every pool already open:
        requests sent from now on use them (one already waiting keeps its total deadline)."""
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self.total_timeout = total_timeout
        for pool in self._pools.values():
            pool.set_timeouts(connect_timeout, read_timeout, total_timeout)

    def pool(self, host: str, port: int) -> Pool:
        """The pool for ``host:port`` (made on first use; needs the running loop)."""
        key = (host, port)
        pool = self._pools.get(key)
        if pool is None or pool.closed:
            pool = self._pools[key] = Pool(
                host,
                port,
                connect_timeout=self.connect_timeout,
                read_timeout=self.read_timeout,
                total_timeout=self.total_timeout,
                keepalive_s=self.keepalive_s,
            )
        return pool

    async def request(self, pool: Pool, head: bytes, body: bytes, *, method_head: bool = False) -> UpstreamResponse:
        """Send ``head`` (a complete request head, ``Content-Length`` included) and ``body``;
        return once the answer's head arrived. Raises :class:`UpstreamFailure`."""
        total = pool.total_timeout
        deadline = pool.loop.time() + total if total else float("inf")
        conn = pool.take_idle()
        reused = conn is not None
        while True:
            if conn is None:
                conn = await pool.connect()
            response = conn.send(head, body, deadline, method_head)
            waiter = conn.head_waiter
            assert waiter is not None  # set by send(); nothing can answer before we await it
            try:
                await waiter
            except ConnectionBroken as exc:
                if reused and not exc.answered and type(exc) is ConnectionBroken:
                    # The upstream closed this idle connection just as we sent: it never read
                    # the request. Once, on a new connection.
                    conn, reused = None, False
                    continue
                raise
            except BaseException:
                conn.abort()  # cancelled (the client left): the upstream must see it at once
                raise
            return response

    def close(self) -> None:
        for pool in self._pools.values():
            pool.close()
        self._pools.clear()
