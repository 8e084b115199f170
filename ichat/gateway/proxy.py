"""The data plane: read the model, pick an endpoint, relay bytes, retry before the first byte.

A request's body is read once and parsed once (orjson) only to learn ``model`` (and
``stream``); the original bytes go upstream untouched, and the upstream's bytes come back as
they arrive, never re-parsed. Non-streaming answers (they carry a Content-Length) are read
whole and returned in one write (fewer syscalls); streams (``text/event-stream`` or chunked)
and large bodies are relayed chunk by chunk, ``StreamResponse.write`` pushing back on a slow
client.

Failures, by when they happen:

* before the upstream's response headers (connect error, connection reset), or a 502/503
  answer: the endpoint is charged a failure and the request goes to another endpoint of the
  pool, at most ``routing.retries`` more times. Nothing has reached the client yet.
* no response headers within ``first_byte_s``: 504, no retry (the upstream may be working).
* after the response started: never retried. A broken SSE stream gets a final ``error``
  event and a clean end; any other broken body is cut off so the client sees it incomplete.
* the client goes away: the upstream connection is closed at once (the handler is cancelled,
  or the next write fails), so the worker aborts the engine's work.

Client-facing messages name models, never upstream addresses.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import re
import time
from collections.abc import Callable
from typing import Any

import orjson
from aiohttp import (
    ClientError,
    ClientResponse,
    ClientSession,
    ClientTimeout,
    ConnectionTimeoutError,
    ServerTimeoutError,
    web,
)
from aiohttp import ClientConnectorError as _ConnectError
from multidict import CIMultiDict, CIMultiDictProxy

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
# Host and Content-Length are the client session's to set; Authorization is set per endpoint.
_DROP_FROM_REQUEST = (*HOP_BY_HOP, "Host", "Content-Length", "Authorization")
# Content-Length is recomputed (or the body is re-chunked); Date and Server are our own.
_DROP_FROM_RESPONSE = (*HOP_BY_HOP, "Content-Length", "Date", "Server")

#: statuses meaning "this endpoint cannot serve right now": try another one
RETRY_STATUSES = frozenset({502, 503})
MAX_MODELS_IN_MESSAGE = 20
#: answers with a Content-Length up to this size are read whole and sent in one write;
#: larger ones (audio, big embedding batches) are relayed in pieces to bound memory
WHOLE_BODY_MAX = 4 * 2**20


class Proxy:
    """Handlers of the data plane. One per app; ``session`` is set when the app starts."""

    def __init__(
        self,
        table: RoutingTable,
        routing: RoutingSettings,
        *,
        rng: random.Random,
        clock: Callable[[], float],
        forward_client_auth: bool,
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
        #: with gateway auth on, the client's key is ours and must not travel upstream
        self.forward_client_auth = forward_client_auth
        self.session: ClientSession | None = None
        self.started = int(time.time())

    # -- POST /v1/... ------------------------------------------------------------------------

    async def handle(self, request: web.Request) -> web.StreamResponse:
        path = request.path
        if "/." in path and any(seg in (".", "..") for seg in path.split("/")):
            # /v1/audio/{tail} would otherwise reach the upstream's non-OpenAI routes.
            raise InvalidRequest("Request path must not contain '.' or '..' segments.")
        body = await self._read_body(request)
        model, stream = read_model(body, request.headers)
        table = self.table
        if not table.has_model(model):
            raise ModelNotFound(self._unknown_model_message(model), param="model")

        request_id = request.headers.get("X-Request-Id") or os.urandom(12).hex()
        headers = upstream_headers(request.headers, request_id)
        client_auth = request.headers.get("Authorization") if self.forward_client_auth else None
        info = RequestInfo(model, path, len(body), stream)
        policy = table.policy_for(model)

        tried: list[Endpoint] = []
        error: IChatError | None = None
        for attempt in range(self.retries + 1):
            candidates = table.candidates(model, self.clock())
            if tried:
                candidates = [ep for ep in candidates if ep not in tried]
            if not candidates:
                break
            endpoint = policy.select(candidates, info, self.rng)
            tried.append(endpoint)
            auth = endpoint.authorization or client_auth
            if auth:
                headers["Authorization"] = auth
            else:
                headers.popall("Authorization", None)
            may_retry = attempt < self.retries and len(candidates) > 1
            outcome = await self._attempt(request, endpoint, body, headers, request_id, may_retry)
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
        shown = ", ".join(names[:MAX_MODELS_IN_MESSAGE]) + (", ..." if len(names) > MAX_MODELS_IN_MESSAGE else "")
        return f"The model '{model}' does not exist. Available models: {shown or '(none)'}."

    async def _attempt(
        self,
        request: web.Request,
        endpoint: Endpoint,
        body: bytes,
        headers: CIMultiDict[str],
        request_id: str,
        may_retry: bool,
    ) -> web.StreamResponse | IChatError:
        """Send the request to one endpoint. Returns the client's response, or the error to
        report if no other endpoint succeeds (meaning: nothing was sent to the client, retry)."""
        table = self.table
        assert self.session is not None, "the app's client session starts with the app"
        rel_url = request.rel_url
        url = endpoint.url(rel_url.raw_path, rel_url.raw_query_string)
        endpoint.inflight += 1
        upstream = None
        try:
            try:
                upstream = await self.session.request(request.method, url, data=body, headers=headers)
            except (ConnectionTimeoutError, _ConnectError) as exc:
                table.record_failure(endpoint, self.clock())
                _log_failure(endpoint, "unreachable", exc)
                return UpstreamError(f"{_server(endpoint)} could not be reached.")
            except (ServerTimeoutError, asyncio.TimeoutError) as exc:
                table.record_failure(endpoint, self.clock())
                _log_failure(endpoint, "timed out before answering", exc)
                raise UpstreamTimeout(f"{_server(endpoint)} did not answer in time.") from exc
            except ClientError as exc:
                table.record_failure(endpoint, self.clock())
                _log_failure(endpoint, "failed before answering", exc)
                return UpstreamError(f"{_server(endpoint)} closed the connection.")

            if upstream.status in RETRY_STATUSES:
                table.record_failure(endpoint, self.clock())
                if may_retry:
                    return UpstreamError(f"{_server(endpoint)} is unavailable (HTTP {upstream.status}).")
            else:
                table.record_success(endpoint)
            return await self._relay(request, upstream, endpoint, request_id)
        finally:
            endpoint.inflight -= 1
            if upstream is not None:
                # A no-op once the body was read to the end (the connection went back to the
                # pool); otherwise it closes the upstream connection, which aborts its work.
                upstream.close()

    async def _relay(
        self, request: web.Request, upstream: ClientResponse, endpoint: Endpoint, request_id: str
    ) -> web.StreamResponse:
        headers = response_headers(upstream.headers, request_id)
        sse = upstream.headers.get("Content-Type", "").startswith("text/event-stream")
        length = upstream.content_length
        if length is not None and length <= WHOLE_BODY_MAX and not sse:
            try:
                data = await upstream.read()
            except (ClientError, asyncio.TimeoutError) as exc:
                raise self._upstream_broke(endpoint, exc) from exc
            return web.Response(body=data, status=upstream.status, reason=upstream.reason, headers=headers)

        out = web.StreamResponse(status=upstream.status, reason=upstream.reason, headers=headers)
        if length is not None and not sse:
            out.content_length = length  # a large file: relayed in pieces, with its length
        try:
            await out.prepare(request)
        except ConnectionError:
            return out  # the client left before the headers went out
        content = upstream.content
        while True:
            try:
                chunk = await content.readany()
            except (ClientError, asyncio.TimeoutError) as exc:
                err = self._upstream_broke(endpoint, exc)
                await self._end_broken_stream(request, out, err, sse)
                return out
            if not chunk:
                break
            try:
                await out.write(chunk)
            except ConnectionError:
                return out  # the client left; _attempt's finally closes the upstream
        try:
            await out.write_eof()
        except ConnectionError:
            pass
        return out

    def _upstream_broke(self, endpoint: Endpoint, exc: BaseException) -> IChatError:
        self.table.record_failure(endpoint, self.clock())
        _log_failure(endpoint, "broke mid-response", exc)
        if isinstance(exc, asyncio.TimeoutError):
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
        }


# -- pure helpers ------------------------------------------------------------------------------


def _server(endpoint: Endpoint) -> str:
    """How client-facing messages name an upstream: by its model, never its address."""
    return f"The server for the model '{endpoint.model_name}'"


def _log_failure(endpoint: Endpoint, what: str, exc: BaseException) -> None:
    # Addresses go to the operator's log only, never into a client-facing message.
    log.warning("upstream %s (%s) %s: %s: %s", endpoint.id, endpoint.api_base, what, type(exc).__name__, exc)


def read_model(body: bytes, headers: CIMultiDictProxy[str]) -> tuple[str, bool]:
    """Return (model, stream) from a JSON body, or from a multipart form's fields."""
    try:
        obj = orjson.loads(body)
    except orjson.JSONDecodeError:
        content_type = headers.get("Content-Type", "")
        if content_type.startswith("multipart/form-data"):
            return _model_from_form(body, content_type)
        raise InvalidRequest("Request body is not valid JSON.") from None
    if not isinstance(obj, dict):
        raise InvalidRequest("Request body must be a JSON object.")
    model = obj.get("model")
    if not isinstance(model, str) or not model:
        raise InvalidRequest("Request body must name a model: a non-empty string 'model' field.", param="model")
    return model, obj.get("stream") is True


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


def _drop(headers: CIMultiDict[str], names: tuple[str, ...]) -> None:
    # Connection may name further hop-by-hop headers of this one hop.
    connection = headers.get("Connection")
    if connection:
        for token in connection.split(","):
            token = token.strip()
            if token:
                headers.popall(token, None)
    for name in names:
        headers.popall(name, None)


def upstream_headers(client_headers: CIMultiDictProxy[str], request_id: str) -> CIMultiDict[str]:
    headers = CIMultiDict(client_headers)
    _drop(headers, _DROP_FROM_REQUEST)
    headers["X-Request-Id"] = request_id
    return headers


def response_headers(upstream: CIMultiDictProxy[str], request_id: str) -> CIMultiDict[str]:
    headers = CIMultiDict(upstream)
    _drop(headers, _DROP_FROM_RESPONSE)
    headers["X-Request-Id"] = request_id
    return headers
