"""The data plane: read the model, pick an endpoint, relay bytes, retry before the first byte.

A request's body is read once and parsed once (orjson) only to learn ``model`` (and
``stream``); the original bytes go upstream untouched, and the upstream's bytes come back as
they arrive, never re-parsed. Non-streaming answers (they carry a Content-Length) are read
whole and returned in one write (fewer syscalls); streams (``text/event-stream`` or chunked)
and large bodies are relayed chunk by chunk, ``StreamResponse.write`` pushing back on a slow
client.

Upstream calls go through :mod:`ichat.gateway.upstream`: a small keep-alive HTTP/1.1 client
for ``http://`` upstreams (the common case: the request head is built here from the client's
raw header bytes, in one pass), the aiohttp session for anything else. Both raise that
module's errors, so the failure handling below is written once.

Failures, by when they happen:

* before the upstream's response headers (connect error, connection reset), or a 502/503
  answer: the endpoint is charged a failure and the request goes to another endpoint of the
  pool, at most ``routing.retries`` more times. Nothing has reached the client yet.
* no response headers within ``first_byte_s``: 504, no retry (the upstream may be working).
* after the response started: never retried. A broken SSE stream gets a final ``error``
  event and a clean end; any other broken body is cut off so the client sees it incomplete.
* the client goes away: the upstream connection is closed at once (the handler is cancelled,
  or the next write fails), so the worker aborts the engine's work.

Every answer is counted in :class:`~ichat.gateway.metrics.GatewayMetrics` (model, endpoint,
status, duration, time to the upstream's first byte), and so are retries, ejections and
upstream errors by kind. Client-facing messages name models, never upstream addresses.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import random
import re
import time
from collections.abc import Callable
from typing import Any

import orjson
from aiohttp import ClientSession, ClientTimeout, web
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from ichat.config import RoutingSettings
from ichat.errors import (
    IChatError,
    InvalidRequest,
    ModelNotFound,
    PayloadTooLarge,
    ServiceUnavailable,
    UpstreamError,
    UpstreamTimeout,
    sse_error_event,
)
from ichat.gateway.metrics import CLIENT_CLOSED, NO_ENDPOINT, UNKNOWN_MODEL, GatewayMetrics
from ichat.gateway.upstream import (
    AiohttpResponse,
    ConnectFailed,
    Pool,
    RawHeaders,
    ReadTimeout,
    UpstreamClient,
    UpstreamFailure,
    UpstreamResponse,
    aiohttp_request,
)
from ichat.routing.policy import RequestInfo
from ichat.routing.table import Endpoint, RoutingTable

log = logging.getLogger(__name__)

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
# Host and Content-Length are the upstream request's own; Authorization is set per endpoint;
# X-Request-Id is the client's or ours, set once; Expect: the gateway already has the body;
# Content-Encoding: aiohttp's server inflates a gzip/deflate/br request body before the proxy
# reads it (and the proxy parsed it as JSON or a form), so what goes upstream is plain.
_DROP_FROM_REQUEST = frozenset(
    n.lower().encode()
    for n in (*HOP_BY_HOP, "Host", "Content-Length", "Authorization", "X-Request-Id", "Expect", "Content-Encoding")
)
# Content-Length is recomputed (or the body is re-chunked); Date and Server are our own.
_DROP_FROM_RESPONSE = frozenset(n.lower().encode() for n in (*HOP_BY_HOP, "Content-Length", "Date", "Server", "X-Request-Id"))

#: statuses meaning "this endpoint cannot serve right now": try another one
RETRY_STATUSES = frozenset({502, 503})
MAX_MODELS_IN_MESSAGE = 20
#: answers with a Content-Length up to this size are read whole and sent in one write;
#: larger ones (audio, big embedding batches) are relayed in pieces to bound memory
WHOLE_BODY_MAX = 4 * 2**20
#: idle keep-alive connections to an upstream are reused for this long (seconds)
UPSTREAM_KEEPALIVE_S = 60.0
_TARGET_CACHE_SIZE = 256


class _Target:
    """Where an ``api_base`` points, resolved once: a pool of the small client, or None for
    the aiohttp fallback (``https://``)."""

    __slots__ = ("pool", "path_prefix", "host_line")

    def __init__(self, pool: Pool | None, path_prefix: str, host_line: bytes) -> None:
        self.pool = pool
        #: the api_base's path (normally ``/v1``); the client path after ``/v1`` is appended
        self.path_prefix = path_prefix
        self.host_line = host_line


class _Exchange:
    """What the metrics need to know about one request, filled in as it goes."""

    __slots__ = ("model", "endpoint", "status", "first_byte")

    def __init__(self) -> None:
        self.model = UNKNOWN_MODEL
        self.endpoint = NO_ENDPOINT
        self.status = 500
        self.first_byte: float | None = None


class Proxy:
    """Handlers of the data plane. One per app; ``session`` (the aiohttp fallback) is set when
    the app starts, and :meth:`close` closes the small client's connections when it stops."""

    def __init__(
        self,
        table: RoutingTable,
        routing: RoutingSettings,
        *,
        rng: random.Random,
        clock: Callable[[], float],
        forward_client_auth: bool,
        metrics: GatewayMetrics | None = None,
        keepalive_s: float = UPSTREAM_KEEPALIVE_S,
    ) -> None:
        self.table = table
        self.rng = rng
        self.clock = clock
        self.retries = routing.retries
        self.max_body = routing.max_body_bytes
        t = routing.timeouts
        # sock_read bounds the wait for the response headers (first byte) and each gap between
        # chunks afterwards; total (0 = none) bounds the whole exchange, stream included.
        self.timeout = ClientTimeout(total=t.total_s or None, sock_connect=t.connect_s, sock_read=t.first_byte_s)
        self.upstreams = UpstreamClient(
            connect_timeout=t.connect_s,
            read_timeout=t.first_byte_s,
            total_timeout=t.total_s or None,
            keepalive_s=keepalive_s,
        )
        #: with gateway auth on, the client's key is ours and must not travel upstream
        self.forward_client_auth = forward_client_auth
        self.metrics = metrics if metrics is not None else GatewayMetrics(table)
        self.session: ClientSession | None = None
        self.started = int(time.time())
        self._targets: dict[str, _Target] = {}
        # Request ids: a random per-process prefix and a counter. Unique is all they need to
        # be, and os.urandom per request is a system call.
        self._id_prefix = os.urandom(6).hex().encode()
        self._id_counter = itertools.count(1)

    def apply_timeouts(self, t: Any) -> None:
        """New ``routing.timeouts`` (config reload); requests already running keep theirs."""
        self.timeout = ClientTimeout(total=t.total_s or None, sock_connect=t.connect_s, sock_read=t.first_byte_s)
        self.upstreams.connect_timeout = t.connect_s
        self.upstreams.read_timeout = t.first_byte_s
        self.upstreams.total_timeout = t.total_s or None

    def close(self) -> None:
        """Close every upstream connection of the small client (the app is stopping)."""
        self.upstreams.close()
        self._targets.clear()

    # -- POST /v1/... ------------------------------------------------------------------------

    async def handle(self, request: web.Request) -> web.StreamResponse:
        start = time.perf_counter()
        exchange = _Exchange()
        try:
            return await self._handle(request, exchange)
        except IChatError as err:
            exchange.status = err.status
            raise
        except asyncio.CancelledError:
            exchange.status = CLIENT_CLOSED
            raise
        finally:
            end = time.perf_counter()
            first_byte = exchange.first_byte
            self.metrics.request_done(
                exchange.model,
                exchange.endpoint,
                exchange.status,
                end - start,
                None if first_byte is None else first_byte - start,
            )

    async def _handle(self, request: web.Request, exchange: _Exchange) -> web.StreamResponse:
        path = request.path
        if "/." in path and any(seg in (".", "..") for seg in path.split("/")):
            # /v1/audio/{tail} would otherwise reach the upstream's non-OpenAI routes.
            raise InvalidRequest("Request path must not contain '.' or '..' segments.")
        body = await self._read_body(request)
        model, stream, parsed = read_model(body, request.headers)
        table = self.table
        if not table.has_model(model):
            raise ModelNotFound(self._unknown_model_message(model), param="model")
        exchange.model = model

        forwarded, client_auth, request_id = split_request_headers(request.raw_headers)
        if not request_id:
            request_id = b"%s%012x" % (self._id_prefix, next(self._id_counter))
        if not self.forward_client_auth:
            client_auth = None
        info = RequestInfo(model, path, len(body), stream, body=parsed, headers=request.headers)
        policy = table.policy_for(model)

        tried: list[Endpoint] = []
        error: IChatError | None = None
        for attempt in range(self.retries + 1):
            candidates = table.candidates(model, self.clock())
            if tried:
                candidates = [ep for ep in candidates if ep not in tried]
            if not candidates:
                break
            if attempt:
                self.metrics.retried(model)
            endpoint = policy.select(candidates, info, self.rng)
            tried.append(endpoint)
            exchange.endpoint = endpoint.id
            auth = endpoint.authorization
            may_retry = attempt < self.retries and len(candidates) > 1
            outcome = await self._attempt(
                request,
                exchange,
                endpoint,
                body,
                forwarded,
                auth.encode("latin-1") if auth else client_auth,
                request_id,
                may_retry,
            )
            if not isinstance(outcome, IChatError):
                return outcome
            error = outcome
        if error is not None:
            raise error
        raise ServiceUnavailable(
            f"No healthy endpoint is serving the model '{model}' right now; retry shortly.",
            retry_after_s=table.retry_after(model, self.clock()),
            code="no_healthy_endpoint",
        )

    async def _read_body(self, request: web.Request) -> bytes:
        length = request.content_length
        if length is not None and length > self.max_body:
            raise self._too_large()
        try:
            return await request.read()
        except web.HTTPRequestEntityTooLarge as exc:
            raise self._too_large() from exc

    def _too_large(self) -> PayloadTooLarge:
        return PayloadTooLarge(f"Request body is larger than the gateway's limit of {self.max_body / 2**20:g} MB.")

    def _unknown_model_message(self, model: str) -> str:
        names = self.table.models()
        shown = ", ".join(self._with_kinds(n) for n in names[:MAX_MODELS_IN_MESSAGE]) + (
            ", ..." if len(names) > MAX_MODELS_IN_MESSAGE else ""
        )
        return f"The model '{model}' does not exist. Available models: {shown or '(none)'}."

    def _with_kinds(self, name: str) -> str:
        """``name (kind, kind)`` when its workers report kinds, else the bare name."""
        kinds = self.table.kinds(name)
        return f"{name} ({', '.join(kinds)})" if kinds else name

    def _target(self, api_base: str) -> _Target:
        target = self._targets.get(api_base)
        if target is None:
            if len(self._targets) >= _TARGET_CACHE_SIZE:
                self._targets.clear()
            url = URL(api_base)
            pool = None
            if url.scheme == "http" and url.host:
                pool = self.upstreams.pool(url.host, url.port or 80)
            host = url.raw_host or ""
            if ":" in host:
                host = f"[{host}]"  # IPv6 literal
            if url.explicit_port:
                host += f":{url.port}"
            target = self._targets[api_base] = _Target(pool, url.raw_path.rstrip("/"), b"Host: %s\r\n" % host.encode())
        return target

    async def _send_via_session(
        self,
        request: web.Request,
        endpoint: Endpoint,
        body: bytes,
        forwarded: list[tuple[bytes, bytes]],
        auth: bytes | None,
        request_id: bytes,
    ) -> AiohttpResponse:
        """The fallback for upstreams the small client does not speak to (``https://``)."""
        if self.session is None:
            raise ConnectFailed("the gateway's client session is not running")
        headers: CIMultiDict[str] = CIMultiDict(
            (name.decode("latin-1"), value.decode("utf-8", "surrogateescape")) for name, value in forwarded
        )
        headers["X-Request-Id"] = request_id.decode("latin-1")
        if auth:
            headers["Authorization"] = auth.decode("latin-1")
        rel = request.rel_url
        url = endpoint.url(rel.raw_path, rel.raw_query_string)
        return await aiohttp_request(self.session, request.method, url, headers, body, self.timeout)

    async def _attempt(
        self,
        request: web.Request,
        exchange: _Exchange,
        endpoint: Endpoint,
        body: bytes,
        forwarded: list[tuple[bytes, bytes]],
        auth: bytes | None,
        request_id: bytes,
        may_retry: bool,
    ) -> web.StreamResponse | IChatError:
        """Send the request to one endpoint. Returns the client's response, or the error to
        report if no other endpoint succeeds (meaning: nothing was sent to the client, retry)."""
        target = self._target(endpoint.api_base)
        endpoint.inflight += 1
        upstream: UpstreamResponse | AiohttpResponse | None = None
        try:
            try:
                if target.pool is not None:
                    head = request_head(request, target, forwarded, auth, request_id, len(body))
                    upstream = await self.upstreams.request(target.pool, head, body, method_head=request.method == "HEAD")
                else:
                    upstream = await self._send_via_session(request, endpoint, body, forwarded, auth, request_id)
            except ConnectFailed as exc:
                self._failed(endpoint, exchange, exc.kind, "unreachable", exc)
                return UpstreamError(f"{_server(endpoint)} could not be reached.")
            except ReadTimeout as exc:
                self._failed(endpoint, exchange, exc.kind, "timed out before answering", exc)
                raise UpstreamTimeout(f"{_server(endpoint)} did not answer in time.") from exc
            except UpstreamFailure as exc:
                self._failed(endpoint, exchange, exc.kind, "failed before answering", exc)
                return UpstreamError(f"{_server(endpoint)} closed the connection.")

            exchange.first_byte = time.perf_counter()
            status = upstream.status
            if status in RETRY_STATUSES:
                self._failed(endpoint, exchange, f"status_{status}", f"answered {status}", None)
                if may_retry:
                    return UpstreamError(f"{_server(endpoint)} is unavailable (HTTP {status}).")
            elif endpoint.failures or endpoint.ejected_until:
                self.table.record_success(endpoint)  # closes the breaker; skipped when already closed
            return await self._relay(request, exchange, upstream, endpoint, request_id.decode("latin-1"))
        finally:
            endpoint.inflight -= 1
            if upstream is not None:
                # A no-op once the body was read to the end (the connection went back to the
                # pool); otherwise it closes the upstream connection, which aborts its work.
                upstream.close()

    async def _relay(
        self,
        request: web.Request,
        exchange: _Exchange,
        upstream: UpstreamResponse | AiohttpResponse,
        endpoint: Endpoint,
        request_id: str,
    ) -> web.StreamResponse:
        headers = response_headers(upstream.headers, request_id)
        sse = upstream.content_type.startswith(b"text/event-stream")
        length = upstream.content_length
        exchange.status = upstream.status
        if length is not None and length <= WHOLE_BODY_MAX and not sse:
            try:
                data = await upstream.read()
            except UpstreamFailure as exc:
                raise self._upstream_broke(endpoint, exchange, exc) from exc
            return web.Response(body=data, status=upstream.status, reason=upstream.reason, headers=headers)

        out = web.StreamResponse(status=upstream.status, reason=upstream.reason, headers=headers)
        if length is not None and not sse:
            out.content_length = length  # a large file: relayed in pieces, with its length
        try:
            await out.prepare(request)
        except ConnectionError:
            exchange.status = CLIENT_CLOSED
            return out  # the client left before the headers went out
        while True:
            try:
                chunk = await upstream.read_chunk()
            except UpstreamFailure as exc:
                err = self._upstream_broke(endpoint, exchange, exc)
                await self._end_broken_stream(request, out, err, sse)
                return out
            if not chunk:
                break
            try:
                await out.write(chunk)
            except ConnectionError:
                exchange.status = CLIENT_CLOSED
                return out  # the client left; _attempt's finally closes the upstream
        try:
            await out.write_eof()
        except ConnectionError:
            exchange.status = CLIENT_CLOSED
        return out

    def _failed(self, endpoint: Endpoint, exchange: _Exchange, kind: str, what: str, exc: BaseException | None) -> None:
        """Charge ``endpoint`` a failure (the circuit breaker counts it) and count its kind."""
        metrics = self.metrics
        if self.table.record_failure(endpoint, self.clock()):
            metrics.ejected(exchange.model, endpoint.id)
        metrics.upstream_error(exchange.model, endpoint.id, kind)
        if exc is not None:
            _log_failure(endpoint, what, exc)

    def _upstream_broke(self, endpoint: Endpoint, exchange: _Exchange, exc: UpstreamFailure) -> IChatError:
        self._failed(endpoint, exchange, "broken_stream", "broke mid-response", exc)
        if isinstance(exc, ReadTimeout):
            return UpstreamTimeout(f"{_server(endpoint)} stopped sending in time.")
        return UpstreamError(f"{_server(endpoint)} closed the connection mid-response.")

    async def _end_broken_stream(
        self, request: web.Request, out: web.StreamResponse, err: IChatError, sse: bool
    ) -> None:
        if not sse:
            # No way to say "error" inside an arbitrary body: cut the connection so the client
            # sees an incomplete chunked body rather than a clean, silently truncated one.
            if request.transport is not None:
                request.transport.close()
            return
        try:
            await out.write(sse_error_event(err))
            await out.write_eof()
        except ConnectionError:
            pass

    # -- GET /v1/models ----------------------------------------------------------------------

    async def list_models(self, request: web.Request) -> web.Response:
        table = self.table
        cards = [self._model_card(name) for name in table.models()]
        body = {"object": "list", "data": [card for card in cards if card is not None]}
        return web.Response(body=orjson.dumps(body), content_type="application/json")

    async def get_model(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        card = self._model_card(name) if self.table.has_model(name) else None
        if card is None:
            raise ModelNotFound(self._unknown_model_message(name), param="model")
        return web.Response(body=orjson.dumps(card), content_type="application/json")

    def _model_card(self, name: str) -> dict[str, Any] | None:
        routable = [ep for ep in self.table.endpoints(name) if ep.routable]
        if not routable:
            return None
        return {
            "id": name,
            "object": "model",
            "created": self.started,
            "owned_by": "ichat",
            "backends": sorted({ep.backend for ep in routable}),
            "replicas": len(routable),
            # what its workers serve (routes, plus input kinds); [] when none reports it
            "kinds": sorted({k for ep in routable for k in ep.kinds}),
        }


# -- pure helpers ------------------------------------------------------------------------------


def _server(endpoint: Endpoint) -> str:
    """How client-facing messages name an upstream: by its model, never its address."""
    return f"The server for the model '{endpoint.model_name}'"


def _log_failure(endpoint: Endpoint, what: str, exc: BaseException) -> None:
    # Addresses go to the operator's log only, never into a client-facing message.
    log.warning("upstream %s (%s) %s: %s: %s", endpoint.id, endpoint.api_base, what, type(exc).__name__, exc)


def read_model(body: bytes, headers: CIMultiDictProxy[str]) -> tuple[str, bool, dict[str, Any] | None]:
    """Return (model, stream, the parsed JSON body) from a JSON body, or (model, stream, None)
    from a multipart form's fields."""
    try:
        obj = orjson.loads(body)
    except orjson.JSONDecodeError:
        content_type = headers.get("Content-Type", "")
        if content_type.startswith("multipart/form-data"):
            return (*_model_from_form(body, content_type), None)
        raise InvalidRequest("Request body is not valid JSON.") from None
    if not isinstance(obj, dict):
        raise InvalidRequest("Request body must be a JSON object.")
    model = obj.get("model")
    if not isinstance(model, str) or not model:
        raise InvalidRequest("Request body must name a model: a non-empty string 'model' field.", param="model")
    return model, obj.get("stream") is True, obj


_BOUNDARY = re.compile(r'boundary="?([^";]+)"?', re.IGNORECASE)
_FIELD_NAME = re.compile(rb'(?:^|;)\s*name="([^"]*)"', re.IGNORECASE)


def _model_from_form(body: bytes, content_type: str) -> tuple[str, bool]:
    match = _BOUNDARY.search(content_type)
    fields = form_fields(body, match.group(1).encode(), (b"model", b"stream")) if match else {}
    model = fields.get(b"model")
    if not model:
        raise InvalidRequest("Multipart request must carry a non-empty 'model' form field.", param="model")
    return model.decode("utf-8", "replace"), fields.get(b"stream", b"").lower() == b"true"


def form_fields(body: bytes, boundary: bytes, names: tuple[bytes, ...]) -> dict[bytes, bytes]:
    """Values of the named non-file fields of a multipart/form-data body.

    Walks the boundaries with ``find`` and slices only the small parts it wants, so a large
    uploaded file is never copied.
    """
    found: dict[bytes, bytes] = {}
    delimiter = b"--" + boundary
    pos = body.find(delimiter)
    while pos != -1 and len(found) < len(names):
        start = pos + len(delimiter)
        if body.startswith(b"--", start):
            break  # closing delimiter
        end = body.find(b"\r\n" + delimiter, start)
        head_end = body.find(b"\r\n\r\n", start, len(body) if end == -1 else end)
        if head_end != -1:
            head = body[start:head_end]
            for line in head.split(b"\r\n"):
                key, _, value = line.partition(b":")
                if key.strip().lower() == b"content-disposition" and b"filename" not in value.lower():
                    name = _FIELD_NAME.search(value)
                    if name and name.group(1) in names:
                        found[name.group(1)] = body[head_end + 4 : len(body) if end == -1 else end]
        pos = -1 if end == -1 else end + 2
    return found


def request_head(
    request: web.Request,
    target: _Target,
    forwarded: list[tuple[bytes, bytes]],
    auth: bytes | None,
    request_id: bytes,
    body_length: int,
) -> bytes:
    """The upstream request's head, bytes ready for the wire."""
    raw_path = request.raw_path
    if not raw_path.startswith("/v1/"):  # an absolute-form request target; rare
        rel = request.rel_url
        raw_path = rel.raw_path + (f"?{rel.raw_query_string}" if rel.raw_query_string else "")
    return b"%s %s HTTP/1.1\r\n%s%s%sX-Request-Id: %s\r\nContent-Length: %d\r\n\r\n" % (
        request.method.encode("ascii"),
        (target.path_prefix + raw_path[3:]).encode("utf-8", "surrogateescape"),
        target.host_line,
        b"".join([name + b": " + value + b"\r\n" for name, value in forwarded]),
        b"Authorization: " + auth + b"\r\n" if auth else b"",
        request_id,
        body_length,
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


def response_headers(raw: RawHeaders, request_id: str) -> list[tuple[str, str]]:
    """The upstream's headers for the client: hop-by-hop ones dropped, X-Request-Id ours."""
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
    out.append(("X-Request-Id", request_id))
    return out
