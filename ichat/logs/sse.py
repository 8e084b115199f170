"""Log lines as Server-Sent Events: serving a hub (or a group of hubs), and reading them back.

Serving (:func:`stream_logs`, :func:`stream_hubs`). Query: ``tail=N`` (backlog size, default
100), ``follow=false`` (backlog only, then end). Header ``Last-Event-ID`` (or ``?after=ID``)
resumes after that id instead of a tail; only a single hub can be resumed (a group's ids are
per hub). Each event: ``id: <n>`` + ``event: log`` + ``data: <json line>`` (a group's events
carry no ``id:`` field, so an EventSource never sends back a meaningless one; the id is in the
data). A reader that fell behind gets ``event: dropped`` with the number of lines it lost, placed
exactly where they are missing (see :class:`~ichat.logs.hub.Subscription`). A single hub's
response names its id sequence in the ``X-Log-Epoch`` header: a reader that sees a different
epoch than before knows the ids started over (the worker restarted) and must not resume by id.
An app that calls :func:`end_streams_on_shutdown` ends its open streams when it shuts down,
instead of holding the shutdown for its whole grace period.

Reading (:class:`SSEParser`): a pure, incremental parser: feed it bytes, get events.
"""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Iterable

import attrs
import orjson
from aiohttp import web

from ichat.errors import InvalidRequest
from ichat.logs.hub import HubGroup, LogHub, LogLine, Subscription

DEFAULT_TAIL = 100
KEEPALIVE_S = 15.0
#: lines a reader may fall behind the live stream before the oldest are dropped
READER_BUFFER_LINES = 1000
EPOCH_HEADER = "X-Log-Epoch"


class StreamSet:
    """An app's open log streams, so that shutting the app down can end them."""

    def __init__(self) -> None:
        self.closing = False
        self._subs: set[Subscription] = set()

    def add(self, sub: Subscription) -> None:
        self._subs.add(sub)

    def discard(self, sub: Subscription) -> None:
        self._subs.discard(sub)

    def close_all(self) -> None:
        self.closing = True
        for sub in self._subs:
            sub.close()


STREAMS_KEY = web.AppKey("ichat_log_streams", StreamSet)


def end_streams_on_shutdown(app: web.Application) -> None:
    """Open log streams never end by themselves; without this a graceful stop waits out its
    whole shutdown timeout for them."""
    streams = StreamSet()
    app[STREAMS_KEY] = streams

    async def on_shutdown(_app: web.Application) -> None:
        streams.close_all()

    app.on_shutdown.append(on_shutdown)


def _int_param(request: web.Request, name: str, default: int | None) -> int | None:
    raw = request.query.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise InvalidRequest(f"query parameter {name!r} must be an integer, got {raw!r}", param=name) from None
    if value < 0:
        raise InvalidRequest(f"query parameter {name!r} must be >= 0", param=name)
    return value


def encode_line(line: LogLine, *, with_id: bool = True) -> bytes:
    if with_id:
        return b"id: %d\nevent: log\ndata: %s\n\n" % (line.id, orjson.dumps(line.to_dict()))
    return b"event: log\ndata: %s\n\n" % orjson.dumps(line.to_dict())


def encode_dropped(count: int) -> bytes:
    return b"event: dropped\ndata: %s\n\n" % orjson.dumps({"dropped": count})


async def stream_hubs(request: web.Request, hubs: Iterable[LogHub]) -> web.StreamResponse:
    """Stream one hub, or several interleaved as lines arrive (then not resumable by id)."""
    hubs = list(hubs)
    return await stream_logs(request, hubs[0] if len(hubs) == 1 else HubGroup(hubs))


async def stream_logs(
    request: web.Request, source: LogHub | HubGroup, *, send_buffer_bytes: int | None = None
) -> web.StreamResponse:
    """Backlog, then live lines until the client leaves (or the app shuts down).

    ``send_buffer_bytes`` caps the socket's kernel send buffer. Without it Linux grows the
    buffer of a reader that stopped reading up to ``tcp_wmem``'s maximum (4 MiB by default), so
    that reader pins that much memory before its own line buffer even starts dropping lines.
    """
    resumable = isinstance(source, LogHub)
    last_event_id = request.headers.get("Last-Event-ID") or request.query.get("after")
    after = None
    if last_event_id is not None:
        if not resumable:
            raise InvalidRequest(
                "Last-Event-ID / after resume one worker's stream; ids are per worker", param="Last-Event-ID"
            )
        try:
            after = int(last_event_id)
        except ValueError:
            raise InvalidRequest("Last-Event-ID must be an integer", param="Last-Event-ID") from None
    tail = _int_param(request, "tail", DEFAULT_TAIL if after is None else None)
    streams = request.app.get(STREAMS_KEY)
    follow = request.query.get("follow", "true").lower() not in ("false", "0", "no")
    follow = follow and not (streams is not None and streams.closing)

    # Subscribe and read the backlog with no await in between: every line is in exactly one.
    sub = source.subscribe(READER_BUFFER_LINES) if follow else None
    backlog = source.backlog(after_id=after, tail=tail)
    if sub is not None and streams is not None:
        streams.add(sub)
    headers = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    if isinstance(source, LogHub):
        headers[EPOCH_HEADER] = source.epoch
    response = web.StreamResponse(headers=headers)
    if send_buffer_bytes is not None and request.transport is not None:
        sock = request.transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, send_buffer_bytes)
    try:
        await response.prepare(request)
        if backlog:
            await response.write(b"".join(encode_line(line, with_id=resumable) for line in backlog))
        else:
            await response.write(b": backlog empty\n\n")
        if sub is not None:
            await _follow(response, sub, with_id=resumable)
        await response.write_eof()
    except ConnectionResetError:  # the reader went away; nothing to tell it
        pass
    finally:
        if sub is not None:
            source.unsubscribe(sub)
            if streams is not None:
                streams.discard(sub)
    return response


async def _follow(response: web.StreamResponse, sub: Subscription, *, with_id: bool) -> None:
    while True:
        if not await sub.wait(KEEPALIVE_S):
            await response.write(b": keep-alive\n\n")
            continue
        dropped, lines = sub.take()
        out = [encode_dropped(dropped)] if dropped else []
        out.extend(encode_line(line, with_id=with_id) for line in lines)
        if out:
            await response.write(b"".join(out))
        if sub.closed:
            return


# -- reading ------------------------------------------------------------------------------------


@attrs.frozen
class SSEEvent:
    event: str
    data: str
    id: str | None = None


#: the parser's bounds: what one peer can make a reader hold in memory
MAX_LINE_BYTES = 1024 * 1024
MAX_EVENT_BYTES = 1024 * 1024


class SSEParser:
    """Incremental Server-Sent Events parser (the subset servers use: ``\\n`` or ``\\r\\n`` line
    ends, ``event``/``data``/``id`` fields, ``:`` comments). ``feed`` returns the events completed
    by the bytes given. Bounded: a line longer than ``max_line_bytes``, or an event whose data
    lines add up to more than ``max_event_bytes`` (a peer that never sends the blank line that
    ends it), raises ValueError, so a hostile or broken stream cannot grow the reader's memory."""

    def __init__(self, max_line_bytes: int = MAX_LINE_BYTES, max_event_bytes: int = MAX_EVENT_BYTES) -> None:
        self.max_line_bytes = max_line_bytes
        self.max_event_bytes = max_event_bytes
        self._buffer = b""
        self._event = ""
        self._data: list[str] = []
        self._data_bytes = 0
        self._id: str | None = None

    def feed(self, chunk: bytes) -> list[SSEEvent]:
        self._buffer += chunk
        *lines, self._buffer = self._buffer.split(b"\n")
        if len(self._buffer) > self.max_line_bytes:
            raise ValueError(f"SSE line longer than {self.max_line_bytes} bytes")
        events = []
        for raw in lines:
            line = raw.decode("utf-8", "replace")
            if line.endswith("\r"):
                line = line[:-1]
            if not line:
                if self._data:
                    events.append(SSEEvent(self._event or "message", "\n".join(self._data), self._id))
                self._event, self._data, self._id, self._data_bytes = "", [], None, 0
                continue
            if line.startswith(":"):
                continue
            field, _, value = line.partition(":")
            if value.startswith(" "):
                value = value[1:]
            if field == "data":
                self._data_bytes += len(value) + 1
                if self._data_bytes > self.max_event_bytes:
                    raise ValueError(f"SSE event larger than {self.max_event_bytes} bytes")
                self._data.append(value)
            elif field == "event":
                self._event = value
            elif field == "id":
                self._id = value
        return events
