"""The proxy's upstream HTTP client, in layers (imports only ``ichat.errors`` and aiohttp).

    errors.py    UpstreamFailure and its kinds: what every failure below becomes
    parser.py    sans-IO HTTP/1.1 response framing: bytes in, head and body pieces out
    pool.py      keep-alive connections (asyncio protocols) per host, timeouts, UpstreamClient
    fallback.py  the aiohttp session behind the same interface, for ``https://`` upstreams

Plain ``http://`` upstreams (the workers) go through :class:`UpstreamClient`; anything else
through :func:`aiohttp_request`. Both answer with an object that has ``status``, ``reason``,
``headers`` (raw byte pairs), ``content_length``, ``content_type``, ``chunked``, ``read()``,
``read_chunk()`` and ``close()``, and both raise only :class:`UpstreamFailure`.
"""

from ichat.gateway.upstream.errors import ConnectFailed, ConnectionBroken, ProtocolError, ReadTimeout, UpstreamFailure
from ichat.gateway.upstream.fallback import AiohttpResponse, aiohttp_request
from ichat.gateway.upstream.parser import MAX_HEAD, ResponseHead, ResponseParser
from ichat.gateway.upstream.pool import HIGH_WATER, KEEPALIVE_S, Pool, UpstreamClient, UpstreamResponse

__all__ = [
    "HIGH_WATER",
    "KEEPALIVE_S",
    "MAX_HEAD",
    "AiohttpResponse",
    "ConnectFailed",
    "ConnectionBroken",
    "Pool",
    "ProtocolError",
    "ReadTimeout",
    "ResponseHead",
    "ResponseParser",
    "UpstreamClient",
    "UpstreamFailure",
    "UpstreamResponse",
    "aiohttp_request",
]
