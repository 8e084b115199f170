"""The relay: pick an endpoint, send the request, relay the answer, retry before the first byte.

A request's body is read once and parsed once (:mod:`ichat.gateway.sniff`) only to learn
``model`` (and ``stream``); the original bytes go upstream untouched, and the upstream's bytes
come back as they arrive, never re-parsed. Non-streaming answers up to ``WHOLE_BODY_MAX``
(they carry a Content-Length) are read whole and returned in one write; streams and larger
bodies are relayed chunk by chunk, ``StreamResponse.write`` pushing back on a slow client.
Header rules live in :mod:`ichat.gateway.headers`; upstream I/O in :mod:`ichat.gateway.upstream`,
whose errors are the only ones handled here.

Failures, by when they happen:

* before the upstream's response headers (connect error, connection reset), or a 502/503
  answer: the endpoint's circuit breaker is charged and the request goes to another endpoint
  of the pool, at most ``routing.retries`` more times. Nothing has reached the client yet.
* no response headers within ``first_byte_s``: 504, no retry (the upstream may be working).
* the worker is declared unhealthy (the registry's probe or missed beats) while requests wait
  on it: the table tells the proxy (:meth:`Proxy.endpoint_lost`), which wakes them at once.
  Those with no byte yet go to another replica; streams that started end as below.
* after the response started: never retried. A broken SSE stream gets a final ``error``
  event and a clean end, unless its model opted into migration (:mod:`ichat.gateway.migration`):
  then it continues on another replica and the client sees one stream. Any other broken body
  is cut off so the client sees it incomplete.
* the client goes away: the upstream connection is closed at once (the handler is cancelled,
  or the next write fails), so the worker aborts the engine's work.

Request ids: the gateway makes the id the worker and its engine use (``X-Request-Id``, random,
never the client's). A client's own ``X-Request-Id`` is a correlation id: echoed on the answer,
written in the gateway's log lines, and passed to the worker as ``X-Ichat-Correlation-Id``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import time
from collections.abc import Callable
from typing import Any

from aiohttp import ClientSession, ClientTimeout, web
from multidict import CIMultiDict
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
from ichat.gateway.headers import CORRELATION_ID, correlation_id, request_head, response_headers, split_request_headers
from ichat.gateway.metrics import CLIENT_CLOSED, NO_ENDPOINT, UNKNOWN_MODEL, GatewayMetrics
from ichat.gateway.migration import StreamSplicer, migratable
from ichat.gateway.sniff import read_model
from ichat.gateway.upstream import (
    AiohttpResponse,
    ConnectFailed,
    Pool,
    ReadTimeout,
    UpstreamClient,
    UpstreamFailure,
    UpstreamResponse,
    aiohttp_request,
)
from ichat.routing.policy import RequestInfo
from ichat.routing.table import Endpoint, RoutingTable

log = logging.getLogger(__name__)

#: statuses meaning "this endpoint cannot serve right now": try another one
RETRY_STATUSES = frozenset({502, 503})
MAX_MODELS_IN_MESSAGE = 20
#: answers with a Content-Length up to this size are read whole and sent in one write;
#: larger ones (audio, big embedding batches) are relayed in pieces to bound memory
WHOLE_BODY_MAX = 4 * 2**20
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
    """One client request as it goes: what the metrics and log lines need, and the client's
    response once it has started (a migrated stream keeps writing to it)."""

    __slots__ = ("model", "endpoint", "status", "first_byte", "request_id", "correlation", "out", "sse", "splicer")

    def __init__(self) -> None:
        self.model = UNKNOWN_MODEL
        self.endpoint = NO_ENDPOINT
        self.status = 500
        self.first_byte: float | None = None
        self.request_id = b""
        self.correlation: bytes | None = None
        self.out: web.StreamResponse | None = None
        #: whether ``out`` is an SSE stream (a break ends it with an error event, not a cut)
        self.sse = False
        self.splicer: StreamSplicer | None = None

    def ids(self) -> str:
        """How log lines name the request: our id, and the client's correlation id if any."""
        rid = self.request_id.decode("latin-1")
        return f"{rid} (correlation {self.correlation.decode('latin-1')})" if self.correlation else rid


class _InFlight:
    """One attempt waiting on an endpoint; ``Proxy.endpoint_lost`` cancels its task."""

    __slots__ = ("task", "lost", "absorbed")

    def __init__(self, task: asyncio.Task[Any] | None) -> None:
        self.task = task
        self.lost = False
        self.absorbed = False

    def ours(self) -> bool:
        """Whether a CancelledError caught now is the wake-up, not the client leaving."""
        if not self.lost or self.absorbed:
            return False
        self.absorbed = True
        uncancel = getattr(self.task, "uncancel", None)  # Python 3.11+
        return uncancel is None or uncancel() == 0


class _Lost(Exception):
    """Internal: the endpoint was declared unhealthy while this attempt waited on it."""


class _Broken(Exception):
    """Internal: a started answer broke; carries the client-facing error."""

    def __init__(self, error: IChatError) -> None:
        super().__init__(error.message)
        self.error = error


class Proxy:
    """The relay handler. One per app; ``session`` (the aiohttp fallback) is set when the app
    starts, and :meth:`close` closes the small client's connections when it stops."""

    def __init__(
        self,
        table: RoutingTable,
        routing: RoutingSettings,
        *,
        upstreams: UpstreamClient,
        rng: random.Random,
        clock: Callable[[], float],
        forward_client_auth: bool,
        metrics: GatewayMetrics,
        unknown_model_message: Callable[[str], str] | None = None,
    ) -> None:
        self.table = table
        self.rng = rng
        self.clock = clock
        self.upstreams = upstreams
        self.metrics = metrics
        #: with gateway auth on, the client's key is ours and must not travel upstream
        self.forward_client_auth = forward_client_auth
        self.session: ClientSession | None = None
        self.unknown_model_message = unknown_model_message or self._unknown_model_message
        self._targets: dict[str, _Target] = {}
        self._inflight: dict[str, set[_InFlight]] = {}
        self.configure(routing)
        table.add_lost_listener(self.endpoint_lost)

    def configure(self, routing: RoutingSettings) -> None:
        """Settings of (re)loaded config; requests already running keep theirs."""
        self.retries = routing.retries
        self.max_body = routing.max_body_bytes
        t = routing.timeouts
        # sock_read bounds the wait for the response headers (first byte) and each gap between
        # chunks afterwards; total (0 = none) bounds the whole exchange, stream included.
        self.timeout = ClientTimeout(total=t.total_s or None, sock_connect=t.connect_s, sock_read=t.first_byte_s)
        self.migration_models = frozenset(routing.migration.models)
        self.migration_attempts = routing.migration.max_attempts

    def close(self) -> None:
        """Close every upstream connection of the small client (the app is stopping)."""
        self.upstreams.close()
        self._targets.clear()

    def endpoint_lost(self, endpoint: Endpoint) -> None:
        """The table declared ``endpoint`` unhealthy: wake every request waiting on it."""
        for attempt in self._inflight.get(endpoint.id, ()):
            if not attempt.lost and attempt.task is not None:
                attempt.lost = True
                attempt.task.cancel()

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
        model, stream, obj = read_model(body, request.headers)
        table = self.table
        if not table.has_model(model):
            raise ModelNotFound(self.unknown_model_message(model), param="model")
        exchange.model = model

        forwarded, client_auth, client_request_id = split_request_headers(request.raw_headers)
        # Ours, always, and unguessable: the engine keys (and aborts) requests by it, and it
        # shows in answers (``chatcmpl-<id>``), so a counter would let one client name another's.
        exchange.request_id = os.urandom(12).hex().encode()
        exchange.correlation = correlation_id(client_request_id)
        if not self.forward_client_auth:
            client_auth = None
        if stream and obj is not None and model in self.migration_models and migratable(path, obj):
            exchange.splicer = StreamSplicer(path, obj)
            body = exchange.splicer.upstream_body()
        info = RequestInfo(model, path, len(body), stream, body=obj, headers=request.headers)
        policy = table.policy_for(model)

        tried: list[Endpoint] = []
        error: IChatError | None = None
        attempt = retries = migrations = 0
        while True:
            candidates = table.candidates(model, self.clock())
            if tried:
                candidates = [ep for ep in candidates if ep not in tried]
            if not candidates:
                break
            if attempt:
                self.metrics.retried(model)
            attempt += 1
            endpoint = policy.select(candidates, info, self.rng)
            tried.append(endpoint)
            exchange.endpoint = endpoint.id
            auth = endpoint.authorization
            may_retry = retries < self.retries and len(candidates) > 1
            hints = info.upstream_headers
            outcome = await self._attempt(
                request, exchange, endpoint, body, forwarded + hints if hints else forwarded,
                auth.encode("latin-1") if auth else client_auth, may_retry,
            )  # fmt: skip
            if not isinstance(outcome, IChatError):
                return outcome
            error = outcome
            if exchange.out is None:  # nothing reached the client: an ordinary retry
                if retries >= self.retries:
                    break
                retries += 1
                continue
            # A started stream broke: continue it elsewhere, if its model opted in.
            splicer = exchange.splicer
            next_body = splicer.continuation_body() if splicer is not None else None
            if next_body is None or migrations >= self.migration_attempts:
                break
            migrations += 1
            splicer.next_segment()
            body = next_body
            self.metrics.migrated(model)
            log.warning("request %s: stream of %s continues on another replica (%d tokens sent)", exchange.ids(), model, splicer.sent_tokens())
        if exchange.out is not None:
            # The answer started and could not be continued: an SSE stream ends with the error
            # event, any other body is cut off.
            await self._end_broken_stream(request, exchange.out, error or UpstreamError("stream broke"), exchange.sse)
            return exchange.out
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
        exchange: _Exchange,
        endpoint: Endpoint,
        body: bytes,
        forwarded: list[tuple[bytes, bytes]],
        auth: bytes | None,
    ) -> AiohttpResponse:
        """The fallback for upstreams the small client does not speak to (``https://``)."""
        if self.session is None:
            raise ConnectFailed("the gateway's client session is not running")
        headers: CIMultiDict[str] = CIMultiDict(
            (name.decode("latin-1"), value.decode("utf-8", "surrogateescape")) for name, value in forwarded
        )
        headers["X-Request-Id"] = exchange.request_id.decode("latin-1")
        if exchange.correlation:
            headers[CORRELATION_ID] = exchange.correlation.decode("latin-1")
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
        may_retry: bool,
    ) -> web.StreamResponse | IChatError:
        """Send the request to one endpoint. Returns the client's response, or the error to
        report if no other endpoint succeeds (nothing new was sent to the client: the caller
        retries, or continues a started stream elsewhere)."""
        target = self._target(endpoint.api_base)
        waiting = _InFlight(asyncio.current_task())
        bucket = self._inflight.get(endpoint.id)
        if bucket is None:
            bucket = self._inflight[endpoint.id] = set()
        bucket.add(waiting)
        endpoint.inflight += 1
        upstream: UpstreamResponse | AiohttpResponse | None = None
        try:
            try:
                if target.pool is not None:
                    head = request_head(
                        request, target.path_prefix, target.host_line, forwarded, auth,
                        exchange.request_id, exchange.correlation, len(body),
                    )  # fmt: skip
                    upstream = await self.upstreams.request(target.pool, head, body, method_head=request.method == "HEAD")
                else:
                    upstream = await self._send_via_session(request, exchange, endpoint, body, forwarded, auth)
            except ConnectFailed as exc:
                self._failed(endpoint, exchange, exc.kind, "unreachable", exc)
                return UpstreamError(f"{_server(endpoint)} could not be reached.")
            except ReadTimeout as exc:
                self._failed(endpoint, exchange, exc.kind, "timed out before answering", exc)
                if exchange.out is not None:
                    return UpstreamTimeout(f"{_server(endpoint)} did not answer in time.")
                raise UpstreamTimeout(f"{_server(endpoint)} did not answer in time.") from exc
            except UpstreamFailure as exc:
                self._failed(endpoint, exchange, exc.kind, "failed before answering", exc)
                return UpstreamError(f"{_server(endpoint)} closed the connection.")
            except asyncio.CancelledError:
                if not waiting.ours():
                    raise
                self._failed(endpoint, exchange, "unhealthy", "declared unhealthy before answering", None)
                return UpstreamError(f"{_server(endpoint)} stopped responding.")

            if exchange.first_byte is None:
                exchange.first_byte = time.perf_counter()
            status = upstream.status
            if status in RETRY_STATUSES:
                self._failed(endpoint, exchange, f"status_{status}", f"answered {status}", None)
                if may_retry or exchange.out is not None:
                    return UpstreamError(f"{_server(endpoint)} is unavailable (HTTP {status}).")
            elif endpoint.breaker.tripped:
                self.table.record_success(endpoint)  # closes the breaker; skipped when already closed
            if exchange.out is not None:
                if status != 200:
                    log.warning("request %s: continuation on %s answered %d", exchange.ids(), endpoint.id, status)
                    return UpstreamError(f"{_server(endpoint)} could not continue the stream (HTTP {status}).")
                return await self._relay_stream(request, exchange, upstream, endpoint, waiting, exchange.out)
            return await self._relay(request, exchange, upstream, endpoint, waiting)
        except _Broken as broken:
            return broken.error
        except asyncio.CancelledError:
            # Woken (the endpoint was declared unhealthy) at an await not handled above, such as
            # sending the client its response head: the caller ends or continues the answer.
            if not waiting.ours():
                raise
            return self._lost_mid_answer(endpoint, exchange)
        finally:
            endpoint.inflight -= 1
            bucket.discard(waiting)
            if not bucket and self._inflight.get(endpoint.id) is bucket:
                del self._inflight[endpoint.id]
            if upstream is not None:
                # A no-op once the body was read to the end (the connection went back to the
                # pool); otherwise it closes the upstream connection, which aborts its work.
                upstream.close()
            if waiting.lost and not waiting.absorbed:
                # Woken after the attempt had already moved on: take the cancellation here,
                # so that it does not land in whatever this task awaits next.
                try:
                    await asyncio.sleep(0)
                except asyncio.CancelledError:
                    if not waiting.ours():
                        raise

    async def _relay(
        self,
        request: web.Request,
        exchange: _Exchange,
        upstream: UpstreamResponse | AiohttpResponse,
        endpoint: Endpoint,
        waiting: _InFlight,
    ) -> web.StreamResponse:
        correlation = exchange.correlation
        headers = response_headers(upstream.headers, (correlation or exchange.request_id).decode("latin-1"))
        sse = upstream.content_type.startswith(b"text/event-stream")
        length = upstream.content_length
        exchange.status = upstream.status
        if length is not None and length <= WHOLE_BODY_MAX and not sse:
            try:
                data = await upstream.read()
            except UpstreamFailure as exc:
                raise self._upstream_broke(endpoint, exchange, exc) from exc
            except asyncio.CancelledError:
                if not waiting.ours():
                    raise
                raise _Broken(self._lost_mid_answer(endpoint, exchange)) from None  # nothing sent: retried
            return web.Response(body=data, status=upstream.status, reason=upstream.reason, headers=headers)

        out = web.StreamResponse(status=upstream.status, reason=upstream.reason, headers=headers)
        if length is not None and not sse:
            out.content_length = length  # a large file: relayed in pieces, with its length
        if not sse or upstream.status != 200:
            exchange.splicer = None  # not a stream of chunks: nothing to migrate
        exchange.out, exchange.sse = out, sse  # from here on, a failure cannot be retried afresh
        try:
            await out.prepare(request)
        except ConnectionError:
            exchange.status = CLIENT_CLOSED
            return out  # the client left before the headers went out
        return await self._relay_stream(request, exchange, upstream, endpoint, waiting, out)

    async def _relay_stream(
        self,
        request: web.Request,
        exchange: _Exchange,
        upstream: UpstreamResponse | AiohttpResponse,
        endpoint: Endpoint,
        waiting: _InFlight,
        out: web.StreamResponse,
    ) -> web.StreamResponse:
        """Copy the body to the client as it comes; raise :class:`_Broken` when it breaks."""
        splicer = exchange.splicer
        sse = upstream.content_type.startswith(b"text/event-stream")
        while True:
            try:
                chunk = await upstream.read_chunk()
            except UpstreamFailure as exc:
                err = self._upstream_broke(endpoint, exchange, exc)
                if not sse:
                    await self._end_broken_stream(request, out, err, False)
                    return out
                raise _Broken(err) from exc
            except asyncio.CancelledError:
                if not waiting.ours():
                    raise
                err = self._lost_mid_answer(endpoint, exchange)
                if not sse:
                    await self._end_broken_stream(request, out, err, False)
                    return out
                raise _Broken(err) from None
            if not chunk:
                break
            if splicer is not None:
                chunk = splicer.feed(chunk)
                if not chunk:
                    continue
            try:
                await out.write(chunk)
            except ConnectionError:
                exchange.status = CLIENT_CLOSED
                return out  # the client left; _attempt's finally closes the upstream
            except asyncio.CancelledError:
                if not waiting.ours():
                    raise
                raise _Broken(self._lost_mid_answer(endpoint, exchange)) from None
        if splicer is not None and splicer.can_continue():
            # The upstream ended its body cleanly but mid-answer (no finish, no [DONE]).
            raise _Broken(UpstreamError(f"{_server(endpoint)} ended the stream early."))
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
        # Addresses go to the operator's log only, never into a client-facing message.
        detail = f": {type(exc).__name__}: {exc}" if exc is not None else ""
        log.warning("request %s: upstream %s (%s) %s%s", exchange.ids(), endpoint.id, endpoint.api_base, what, detail)

    def _upstream_broke(self, endpoint: Endpoint, exchange: _Exchange, exc: UpstreamFailure) -> IChatError:
        self._failed(endpoint, exchange, "broken_stream", "broke mid-response", exc)
        if isinstance(exc, ReadTimeout):
            return UpstreamTimeout(f"{_server(endpoint)} stopped sending in time.")
        return UpstreamError(f"{_server(endpoint)} closed the connection mid-response.")

    def _lost_mid_answer(self, endpoint: Endpoint, exchange: _Exchange) -> IChatError:
        self._failed(endpoint, exchange, "unhealthy", "declared unhealthy mid-response", None)
        return UpstreamError(f"{_server(endpoint)} stopped responding mid-response.")

    async def _end_broken_stream(self, request: web.Request, out: web.StreamResponse, err: IChatError, sse: bool) -> None:
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


def _server(endpoint: Endpoint) -> str:
    """How client-facing messages name an upstream: by its model, never its address."""
    return f"The server for the model '{endpoint.model_name}'"
