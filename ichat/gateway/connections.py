"""Bounds on client connections: how many at once, and how long a client may take over headers.

``GatewayRunner`` is aiohttp's ``AppRunner`` with two limits (``limits`` in the config):

- ``max_connections``: beyond it, a new connection is answered ``503`` (an OpenAI-shaped body,
  ``Retry-After: 1``) and closed at once, before any of its bytes are read. Without a cap, a
  peer that opens connections and never finishes them exhausts the process's file descriptors,
  and with them the upstream connections every other request needs.
- ``header_timeout_s``: aiohttp's keep-alive timer, which also runs from the moment a
  connection opens and closes it if no complete request head arrived by then (a slowloris
  peer trickling header bytes). It bounds an idle keep-alive connection's life the same way.

Requests too malformed to reach a handler (bad framing, oversized headers, TLS on the plain
port) are answered by aiohttp's protocol itself; ``_OpenAIErrors`` makes that answer an
OpenAI-shaped JSON error like every other, and logs it as one line, at most once per
``MALFORMED_LOG_EVERY_S`` (aiohttp logs each with a traceback at ERROR: a peer could flood the
log with them).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import orjson
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_protocol import RequestHandler, RequestPayloadError

from ichat.errors import error_body

log = logging.getLogger("ichat.gateway.connections")

_BUSY_BODY = orjson.dumps(
    error_body("The gateway has too many open connections; retry shortly.", "service_unavailable", "too_many_connections")
)
BUSY_RESPONSE = (
    b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nRetry-After: 1\r\n"
    b"Connection: close\r\nContent-Length: %d\r\n\r\n%s" % (len(_BUSY_BODY), _BUSY_BODY)
)


class _Refuse(asyncio.Protocol):
    """A connection over the cap: one 503, then closed."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but write the same
        transport.write(BUSY_RESPONSE)  # type: ignore[attr-defined]
        transport.close()

    def data_received(self, data: bytes) -> None:
        pass


MALFORMED_LOG_EVERY_S = 10.0


class _MalformedLog:
    """One log line per interval for malformed requests, with how many were not logged."""

    def __init__(self) -> None:
        self.next_at = 0.0
        self.unlogged = 0

    def note(self, remote: str | None, status: int, reason: str) -> None:
        now = time.monotonic()
        if now < self.next_at:
            self.unlogged += 1
            return
        more = f" ({self.unlogged} more since the last such line)" if self.unlogged else ""
        log.warning("malformed request from %s answered %d: %s%s", remote, status, reason, more)
        self.next_at, self.unlogged = now + MALFORMED_LOG_EVERY_S, 0


class _OpenAIErrors(RequestHandler):
    """aiohttp's connection handler, answering requests it cannot parse as the gateway answers
    everything else: an OpenAI-shaped JSON error."""

    malformed: _MalformedLog

    def handle_error(
        self, request: Any, status: int = 500, exc: BaseException | None = None, message: str | None = None
    ) -> web.StreamResponse:
        if status >= 500:
            return super().handle_error(request, status, exc, message)
        reason = str(getattr(exc, "message", None) or message or exc or "malformed request").strip()
        reason = " ".join(reason.split())[:200]
        self.malformed.note(request.remote, status, reason)
        if request.writer.output_size > 0:
            raise ConnectionError("the answer had begun; no error can follow it")
        body = orjson.dumps(error_body(f"Malformed HTTP request: {reason}", "invalid_request_error", status))
        response = web.Response(status=status, body=body, content_type="application/json")
        response.force_close()
        return response

    def log_exception(self, *args: Any, **kw: Any) -> None:
        # After a handler answered a body it could not read (ichat.httperrors), aiohttp's
        # lingering read meets the same error again and logs it as unhandled: a client's fault,
        # noted like any malformed request, not a traceback per hostile request.
        exc = kw.get("exc_info")
        if isinstance(exc, (RequestPayloadError, HttpProcessingError)):
            self.malformed.note(None, 400, " ".join(str(getattr(exc, "message", None) or exc).split())[:200])
            return
        super().log_exception(*args, **kw)


class _Limited:
    """The protocol factory of an aiohttp ``Server``, refusing connections over the cap."""

    def __init__(self, server: web.Server, max_connections: int) -> None:
        self._server = server
        self.max_connections = max_connections
        self.refused = 0
        self._malformed = _MalformedLog()

    def __call__(self) -> asyncio.Protocol:
        if len(self._server.connections) >= self.max_connections:
            self.refused += 1
            if self.refused == 1 or self.refused % 1000 == 0:
                log.warning("connection refused: %d open (limits.max_connections); %d refused so far", self.max_connections, self.refused)
            return _Refuse()
        # What web.Server() builds, with the JSON error answers (the kwargs are the runner's).
        handler = _OpenAIErrors(self._server, loop=asyncio.get_running_loop(), **self._server._kwargs)
        handler.malformed = self._malformed
        return handler

    def __getattr__(self, name: str) -> Any:  # everything else is the server's
        return getattr(self._server, name)


class GatewayRunner(web.AppRunner):
    """``AppRunner`` whose sites accept at most ``max_connections`` client connections and give
    each ``header_timeout_s`` to send a request head."""

    def __init__(self, app: web.Application, *, max_connections: int, header_timeout_s: float, **kwargs: Any) -> None:
        super().__init__(app, keepalive_timeout=header_timeout_s, **kwargs)
        self._max_connections = max_connections
        self._limited: _Limited | None = None

    @property
    def server(self) -> Any:  # what the sites hand to loop.create_server
        inner = super().server
        if inner is None:
            return None
        if self._limited is None or self._limited._server is not inner:
            self._limited = _Limited(inner, self._max_connections)
        return self._limited
