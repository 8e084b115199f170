"""Header rules of the data plane: what crosses the gateway in each direction, as raw bytes.

Pure functions over ``(name, value)`` byte pairs, no aiohttp objects beyond the request whose
method and path the upstream request head repeats. Hop-by-hop headers (RFC 9110 §7.6.1, and
any a ``Connection`` header names) never cross; the client's ``Authorization`` and
``X-Request-Id`` are taken apart so the proxy decides what goes upstream in their place.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from ichat.protocol import PREFIX_BLOCKS_HEADER

if TYPE_CHECKING:
    from aiohttp import web

RawHeaders = Sequence[tuple[bytes, bytes]]

# RFC 9110 §7.6.1: meaningful for one connection only, never forwarded.
HOP_BY_HOP = (
    "Connection",
    "Keep-Alive",
    "Proxy-Connection",
    "Proxy-Authenticate",
    "Proxy-Authorization",
    "TE",
    "Trailer",
    "Transfer-Encoding",
    "Upgrade",
)
#: the header naming the id the worker and its engine use; the gateway always makes it
REQUEST_ID = "X-Request-Id"
#: the client's own X-Request-Id, passed to the worker beside ours (logged, never a key)
CORRELATION_ID = "X-Ichat-Correlation-Id"
#: a client's X-Request-Id longer than this is cut (it is only logged and echoed)
MAX_CORRELATION_ID = 200

# Host and Content-Length are the upstream request's own; Authorization is set per endpoint;
# X-Request-Id is ours and the client's goes as the correlation id, which a client must not
# forge either; Expect: the gateway already has the body; Content-Encoding: aiohttp's server
# inflates a gzip/deflate/br request body before the proxy reads it, so what goes upstream is plain;
# X-Ichat-Prefix-Blocks: only the gateway's routing policy speaks it to a worker.
_DROP_FROM_REQUEST = frozenset(
    n.lower().encode()
    for n in (
        *HOP_BY_HOP, "Host", "Content-Length", "Authorization", REQUEST_ID, CORRELATION_ID, "Expect", "Content-Encoding",
        PREFIX_BLOCKS_HEADER,
    )  # fmt: skip
)
# Content-Length is recomputed (or the body is re-chunked); Date and Server are our own.
_DROP_FROM_RESPONSE = frozenset(
    n.lower().encode() for n in (*HOP_BY_HOP, "Content-Length", "Date", "Server", REQUEST_ID, CORRELATION_ID)
)


def _connection_tokens(value: bytes, into: set[bytes] | None) -> set[bytes]:
    """Header names a ``Connection`` header declares hop-by-hop (RFC 9110 §7.6.1)."""
    tokens = into if into is not None else set()
    for token in value.split(b","):
        token = token.strip().lower()
        if token:
            tokens.add(token)
    return tokens


def split_request_headers(raw: RawHeaders) -> tuple[list[tuple[bytes, bytes]], bytes | None, bytes | None]:
    """The client's headers to forward as they came (bytes, in order), and apart from them
    its Authorization and X-Request-Id values. Hop-by-hop headers, and those its Connection
    header names, are dropped."""
    kept = []
    auth = request_id = None
    hop: set[bytes] | None = None
    for name, value in raw:
        lower = name.lower()
        if lower in _DROP_FROM_REQUEST:
            if lower == b"authorization":
                auth = value
            elif lower == b"x-request-id":
                request_id = value
            elif lower == b"connection":
                hop = _connection_tokens(value, hop)
            continue
        kept.append((name, value))
    if hop:
        kept = [(name, value) for name, value in kept if name.lower() not in hop]
    return kept, auth, request_id


def correlation_id(client_request_id: bytes | None) -> bytes | None:
    """The client's X-Request-Id as a correlation id: printable ASCII only, bounded in size
    (it lands in log lines and in a header we send)."""
    if not client_request_id:
        return None
    cleaned = bytes(c for c in client_request_id[:MAX_CORRELATION_ID] if 0x21 <= c <= 0x7E)
    return cleaned or None


def request_head(
    request: web.Request,
    path_prefix: str,
    host_line: bytes,
    forwarded: list[tuple[bytes, bytes]],
    auth: bytes | None,
    request_id: bytes,
    correlation: bytes | None,
    body_length: int,
) -> bytes:
    """The upstream request's head, bytes ready for the wire."""
    raw_path = request.raw_path
    if not raw_path.startswith("/v1/"):  # an absolute-form request target; rare
        rel = request.rel_url
        raw_path = rel.raw_path + (f"?{rel.raw_query_string}" if rel.raw_query_string else "")
    return b"%s %s HTTP/1.1\r\n%s%s%sX-Request-Id: %s\r\n%sContent-Length: %d\r\n\r\n" % (
        request.method.encode("ascii"),
        (path_prefix + raw_path[3:]).encode("utf-8", "surrogateescape"),
        host_line,
        b"".join([name + b": " + value + b"\r\n" for name, value in forwarded]),
        b"Authorization: " + auth + b"\r\n" if auth else b"",
        request_id,
        b"X-Ichat-Correlation-Id: " + correlation + b"\r\n" if correlation else b"",
        body_length,
    )


def response_headers(raw: RawHeaders, request_id: str) -> list[tuple[str, str]]:
    """The upstream's headers for the client: hop-by-hop ones dropped, X-Request-Id ours
    (the client's own, when it sent one: a correlation id is echoed as it came)."""
    out = []
    hop: set[bytes] | None = None
    for name, value in raw:
        lower = name.lower()
        if lower in _DROP_FROM_RESPONSE:
            if lower == b"connection":
                hop = _connection_tokens(value, hop)
            continue
        out.append((name.decode("latin-1"), value.decode("utf-8", "surrogateescape")))
    if hop:
        out = [(name, value) for name, value in out if name.lower().encode("latin-1") not in hop]
    out.append((REQUEST_ID, request_id))
    return out
