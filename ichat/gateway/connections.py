"""Bounds on client connections: how many at once, and how long a client may take over headers.

``GatewayRunner`` is aiohttp's ``AppRunner`` with two limits (``limits`` in the config):

- ``max_connections``: beyond it, a new connection is answered ``503`` (an OpenAI-shaped body,
  ``Retry-After: 1``) and closed at once, before any of its bytes are read. Without a cap, a
  peer that opens connections and never finishes them exhausts the process's file descriptors,
  and with them the upstream connections every other request needs.
- ``header_timeout_s``: aiohttp's keep-alive timer, which also runs from the moment a
  connection opens and closes it if no complete request head arrived by then (a slowloris
  peer trickling header bytes). It bounds an idle keep-alive connection's life the same way.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import orjson
from aiohttp import web

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


class _Limited:
    """The protocol factory of an aiohttp ``Server``, refusing connections over the cap."""

    def __init__(self, server: web.Server, max_connections: int) -> None:
        self._server = server
        self.max_connections = max_connections
        self.refused = 0

    def __call__(self) -> asyncio.Protocol:
        if len(self._server.connections) >= self.max_connections:
            self.refused += 1
            if self.refused == 1 or self.refused % 1000 == 0:
                log.warning("connection refused: %d open (limits.max_connections); %d refused so far", self.max_connections, self.refused)
            return _Refuse()
        return self._server()

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
