"""The gateway's log collector and its routes: every worker's log in one place.

    worker GET /logs/stream (SSE) ─► follow task ─► LogMirror ─► mirror hub ──┐
    supervisor: a managed child's stdout/stderr ─────────────────► console hub ┼─► /v1/logs/stream/{id}
                                                  all mirror hubs / all console hubs ─► /v1/logs/stream

Per worker the collector keeps a *mirror* hub: a task follows the worker's SSE stream and
appends each line with the worker's own id. When the link drops it reconnects (backoff with
jitter) with ``Last-Event-ID: <last id>``, so nothing the worker still holds is lost or repeated;
ids the worker no longer holds become one gap line, and a worker whose ids started over (a new
process: another ``X-Log-Epoch``) gets a restart line, its ids continuing after the old ones.
Those lines are ``stream: "gateway"``, level WARNING. Managed workers also get a *console* hub,
fed by the supervisor from the child's own stdout/stderr, so the last lines before a crash are
kept even when the SSE link died first. ``unwatch`` stops following and keeps both hubs (a dead
worker's logs stay readable); ``forget`` drops them.

Appending never waits on readers: each reader has a bounded buffer (``ichat.logs.hub``), so a
slow reader loses lines, and is told so, instead of slowing the collector or other readers.

Routes (the admin route class: admin key, or loopback only; see ichat.gateway.auth):

    GET /v1/logs/stream/{worker_id}   one worker: backlog (?tail=N, default 100) then live;
                                      ?follow=false: backlog only; Last-Event-ID / ?after=ID
                                      resumes; ?source=console: the supervisor-captured output
    GET /v1/logs/stream               all workers interleaved, each line tagged with worker_id
                                      (not resumable by id); ?source=console as above

Each ``event: log`` carries ``{"id", "ts", "stream", "level", "worker_id", "line"}``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import attrs
import orjson
from aiohttp import web

from ichat.backoff import exponential
from ichat.config import GatewayConfig
from ichat.errors import InvalidRequest, LogStreamBroken, NotFound
from ichat.logs.hub import HubGroup, LogHub
from ichat.logs.sse import EPOCH_HEADER, KEEPALIVE_S, SSEParser, end_streams_on_shutdown, stream_logs

log = logging.getLogger("ichat.gateway.logs")

#: the stream name of lines the gateway writes into a mirror (gaps, restarts)
GATEWAY_STREAM = "gateway"
#: seconds to open the TCP connection to a worker
CONNECT_TIMEOUT_S = 5.0
#: seconds without a byte before the link counts as dead: the worker sends a keep-alive every
#: KEEPALIVE_S, so this only fires on a hung worker or a silently broken connection
READ_TIMEOUT_S = 3 * KEEPALIVE_S
#: a connection that lasted this long was healthy: the next reconnect starts the backoff over
STABLE_S = 5.0
#: reconnect backoff: first wait and cap, seconds (each with jitter in [50%, 100%])
FIRST_RETRY_S = 0.25
MAX_RETRY_S = 30.0
#: a mirrored log line longer than this is cut (ring_lines x this bounds one worker's mirror)
MAX_LINE_CHARS = 8 * 1024
#: kernel send buffer of a /v1/logs stream: what a reader that stopped reading can pin in the
#: kernel (Linux doubles it) before its own bounded line buffer starts dropping (see stream_logs)
STREAM_SEND_BUFFER_BYTES = 128 * 1024


def reconnect_delay(failures: int, rng: random.Random) -> float:
    """Pure: seconds to wait after ``failures`` failed connections in a row (>= 1).

    Exponential from FIRST_RETRY_S, capped at MAX_RETRY_S, with jitter so that the gateway does
    not reconnect to a whole fleet in lockstep after a network blip."""
    return exponential(failures, first=FIRST_RETRY_S, cap=MAX_RETRY_S, rng=rng)


class LogMirror:
    """Keeps a hub equal to a worker's log across reconnects. Pure (no I/O): the follow task
    tells it what each connection delivered, and it says when to reconnect.

    Mirror ids are the worker's ids plus ``offset``, which is 0 until the worker restarts (its
    ids begin again at 1); from then on they continue after the lines already mirrored.
    """

    def __init__(self, hub: LogHub) -> None:
        self.hub = hub
        #: the worker's X-Log-Epoch last seen (None: not connected yet, or a server without it)
        self.epoch: str | None = None
        #: the worker's id of the last line mirrored; None: start from the worker's backlog
        self.cursor: int | None = None
        self.offset = 0
        self._resynced_at: int | None = None

    def request(self, tail: int) -> tuple[dict[str, str], dict[str, str]]:
        """Query and headers of the next connection: resume after the cursor, or a backlog."""
        if self.cursor is None:
            return {"tail": str(tail)}, {}
        return {}, {"Last-Event-ID": str(self.cursor)}

    def connected(self, epoch: str | None, now: float) -> bool:
        """A connection answered. False: the worker's ids started over; reconnect (without the
        cursor, which means nothing to the new process)."""
        if epoch is not None and self.epoch is not None and epoch != self.epoch and self.cursor is not None:
            self.epoch = epoch
            self._restarted(now)
            return False
        self.epoch = epoch if epoch is not None else self.epoch
        return True

    def line(self, worker_line_id: int, ts: float, stream: str, text: str, level: str | None, now: float) -> bool:
        """Mirror one line. False: reconnect from the cursor (lines were skipped on the link,
        or the worker restarted); the line was not taken."""
        cursor = self.cursor
        if cursor is not None:
            if worker_line_id <= cursor:
                if self.epoch is None:  # no epoch to tell: ids going back mean a new process
                    self._restarted(now)
                    return False
                return True  # mirrored already
            if worker_line_id > cursor + 1:
                if self._resynced_at != cursor:
                    # Maybe only this link lost them (a reader buffer overflowed at the worker):
                    # ask the worker's ring once. If it still starts later, they are gone.
                    self._resynced_at = cursor
                    return False
                self._gap(cursor, worker_line_id, now)
        self.hub.append(stream, text, ts, level=level, line_id=worker_line_id + self.offset)
        self.cursor = worker_line_id
        return True

    def dropped(self) -> bool:
        """The worker says this link fell behind. False: reconnect from the cursor."""
        if self._resynced_at == self.cursor:
            return True  # already tried from here: the next line's id tells what is gone
        self._resynced_at = self.cursor
        return False

    def _gap(self, cursor: int, next_id: int, now: float) -> None:
        lost = next_id - cursor - 1
        text = (
            f"[gateway] {lost} log line(s) lost: the worker no longer holds ids {cursor + 1}..{next_id - 1}"
            " (its buffer wrapped while the gateway was not connected)"
        )
        # The marker takes the id of the last lost line, so real lines keep the worker's ids.
        self.hub.append(GATEWAY_STREAM, text, now, level="WARNING", line_id=next_id - 1 + self.offset)

    def _restarted(self, now: float) -> None:
        marker_id = self.hub.last_id + 1
        text = (
            f"[gateway] the worker's log started over (a new process); its lines continue from id {marker_id + 1}"
        )
        self.hub.append(GATEWAY_STREAM, text, now, level="WARNING", line_id=marker_id)
        self.offset = marker_id
        self.cursor = None
        self._resynced_at = None


def _parse_line(data: str) -> tuple[int, float, str, str, str | None] | None:
    """(id, ts, stream, text, level) of one ``event: log``, or None when it is malformed."""
    try:
        fields = orjson.loads(data)
        line_id, ts, stream, text = fields["id"], fields["ts"], fields["stream"], fields["line"]
        level = fields.get("level")
    except (orjson.JSONDecodeError, TypeError, KeyError):
        return None
    if not (isinstance(line_id, int) and isinstance(ts, (int, float)) and isinstance(stream, str) and isinstance(text, str)):
        return None
    if len(text) > MAX_LINE_CHARS:  # what one worker can make the gateway hold per line
        text = text[:MAX_LINE_CHARS] + f" [gateway: {len(text) - MAX_LINE_CHARS} more characters cut]"
    stream = stream[:32]
    return line_id, float(ts), stream, text, level if isinstance(level, str) else None


@attrs.define(eq=False)
class _WorkerLogs:
    worker_id: str
    mirror: LogMirror
    console: LogHub | None = None
    base_url: str | None = None
    task: asyncio.Task[None] | None = None
    connected: bool = False
    connects: int = 0
    last_error: str | None = None


class LogCollector:
    """Per-worker mirror and console hubs, and the tasks that follow the workers' streams.

    The registry calls ``watch`` on every heartbeat of a worker with log streaming on (cheap
    when nothing changed), ``unwatch`` when it stops following it and ``forget`` when the
    worker is removed; the supervisor appends a managed child's output to ``console(id)``.
    All methods but ``start``/``close`` are synchronous and must run on the event loop.
    """

    def __init__(
        self,
        ring_lines: int,
        *,
        clock: Callable[[], float] = time.time,
        rng: random.Random | None = None,
        connect_timeout_s: float = CONNECT_TIMEOUT_S,
        read_timeout_s: float = READ_TIMEOUT_S,
        keep_dead: int = 32,
    ) -> None:
        self.ring_lines = ring_lines
        #: workers no longer followed whose logs stay readable; the oldest are forgotten beyond it
        self.keep_dead = keep_dead
        self._dead: dict[str, None] = {}  # insertion-ordered: oldest first
        self._clock = clock
        self._rng = rng or random.Random()
        self._timeout = aiohttp.ClientTimeout(
            total=None, connect=None, sock_connect=connect_timeout_s, sock_read=read_timeout_s
        )
        self._workers: dict[str, _WorkerLogs] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._session: aiohttp.ClientSession | None = None
        self._closed = False
        #: every worker's mirror hub / console hub, for the all-workers stream
        self.mirrors = HubGroup()
        self.consoles = HubGroup()

    # -- lifecycle -------------------------------------------------------------------------------

    async def start(self, session: aiohttp.ClientSession) -> None:
        """Start following (workers watched before this start now). ``session`` is the
        gateway's shared client session; the collector sets its own per-request timeouts."""
        self._session = session
        self._closed = False
        for record in self._workers.values():
            if record.base_url is not None and record.task is None:
                self._start_task(record)

    async def close(self) -> None:
        """Cancel every follow task and wait for them; the hubs stay readable."""
        self._closed = True
        for record in self._workers.values():
            record.task = None
            record.connected = False
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._session = None

    # -- the registry's and supervisor's verbs ---------------------------------------------------

    def watch(self, worker_id: str, base_url: str) -> None:
        """Follow ``{base_url}/logs/stream`` (base_url: the worker's root, ``http://host:port``).
        Idempotent; a changed base_url restarts the link (resuming, or marking a restart)."""
        base_url = base_url.rstrip("/")
        self._dead.pop(worker_id, None)
        record = self._record(worker_id)
        if record.base_url == base_url and record.task is not None and not record.task.done():
            return
        record.base_url = base_url
        self._stop_task(record)
        if self._session is not None and not self._closed:
            self._start_task(record)

    def unwatch(self, worker_id: str) -> None:
        """Stop following; the lines stay readable (a dead worker's last words)."""
        record = self._workers.get(worker_id)
        if record is not None:
            self._stop_task(record)
            record.base_url = None
            # Bounded: a stream of short-lived workers must not grow the gateway's memory.
            self._dead.pop(worker_id, None)
            self._dead[worker_id] = None
            while len(self._dead) > self.keep_dead:
                self.forget(next(iter(self._dead)))

    def forget(self, worker_id: str) -> None:
        """Stop following and drop the worker's lines (it was removed)."""
        self._dead.pop(worker_id, None)
        record = self._workers.pop(worker_id, None)
        if record is None:
            return
        self._stop_task(record)
        # Out of the groups first: the all-workers streams go on, this worker's own streams end.
        self.mirrors.remove(record.mirror.hub)
        record.mirror.hub.close_readers()
        if record.console is not None:
            self.consoles.remove(record.console)
            record.console.close_readers()

    def reconnect(self, worker_id: str) -> None:
        """Drop the current link now and resume at once (an operator's or a test's lever)."""
        record = self._workers.get(worker_id)
        if record is not None and record.task is not None:
            self._stop_task(record)
            self._start_task(record)

    def console(self, worker_id: str) -> LogHub:
        """The hub for lines the supervisor reads from a managed child's stdout/stderr
        (created on first use): ``collector.console(id).append("stderr", text, time.time())``."""
        record = self._record(worker_id)
        if record.console is None:
            record.console = LogHub(self.ring_lines, worker_id=worker_id)
            self.consoles.add(record.console)
        return record.console

    # -- reading ---------------------------------------------------------------------------------

    def hub(self, worker_id: str) -> LogHub | None:
        """The worker's mirrored log, or None for a worker this collector does not know."""
        record = self._workers.get(worker_id)
        return record.mirror.hub if record is not None else None

    def console_hub(self, worker_id: str) -> LogHub | None:
        """The supervisor-captured output, or None (unknown worker, or not a managed one)."""
        record = self._workers.get(worker_id)
        return record.console if record is not None else None

    def worker_ids(self) -> list[str]:
        return sorted(self._workers)

    def status(self, worker_id: str) -> dict[str, Any] | None:
        """The link's state, for admin views: following, connected, connects, last error."""
        record = self._workers.get(worker_id)
        if record is None:
            return None
        return {
            "worker_id": worker_id,
            "base_url": record.base_url,
            "following": record.task is not None,
            "connected": record.connected,
            "connects": record.connects,
            "last_error": record.last_error,
            "last_id": record.mirror.hub.last_id,
            "console": record.console is not None,
        }

    # -- following -------------------------------------------------------------------------------

    def _record(self, worker_id: str) -> _WorkerLogs:
        record = self._workers.get(worker_id)
        if record is None:
            hub = LogHub(self.ring_lines, worker_id=worker_id)
            record = self._workers[worker_id] = _WorkerLogs(worker_id, LogMirror(hub))
            self.mirrors.add(hub)
        return record

    def _start_task(self, record: _WorkerLogs) -> None:
        task = asyncio.get_running_loop().create_task(self._follow(record), name=f"logs-{record.worker_id}")
        record.task = task
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _stop_task(self, record: _WorkerLogs) -> None:
        # The mirror's state changes only between awaits, so a cancelled task leaves it whole
        # and the next task resumes from its cursor.
        if record.task is not None:
            record.task.cancel()
            record.task = None
        record.connected = False

    async def _follow(self, record: _WorkerLogs) -> None:
        assert self._session is not None and record.base_url is not None
        url = record.base_url + "/logs/stream"
        loop = asyncio.get_running_loop()
        this_task = asyncio.current_task()
        failures = 0
        while True:
            started = loop.time()
            try:
                if await self._read_once(record, url) == "reconnect":
                    failures = 0
                    continue
                raise LogStreamBroken("the worker ended the stream")
            except (aiohttp.ClientError, asyncio.TimeoutError, OSError, ValueError, LogStreamBroken) as exc:
                reason = str(exc) or type(exc).__name__
            except Exception as exc:  # a bug must not end the following for good
                log.exception("following the log stream of worker %s failed", record.worker_id)
                reason = f"internal error: {exc!r}"
            finally:
                if record.task is this_task:  # a cancelled task must not touch its successor's state
                    record.connected = False
            failures = 1 if loop.time() - started >= STABLE_S else failures + 1
            if failures == 1 or failures % 20 == 0:
                log.warning("log stream of worker %s (%s): %s; reconnecting", record.worker_id, url, reason)
            record.last_error = reason
            await asyncio.sleep(reconnect_delay(failures, self._rng))

    async def _read_once(self, record: _WorkerLogs, url: str) -> str:
        """One connection. Returns "reconnect" when the mirror asks to resume elsewhere, "eof"
        when the worker ended the stream; raises on errors."""
        assert self._session is not None
        mirror = record.mirror
        params, headers = mirror.request(self.ring_lines)
        async with self._session.get(url, params=params, headers=headers, timeout=self._timeout) as resp:
            if resp.status != 200:
                body = (await resp.content.read(500)).decode("utf-8", "replace")
                raise LogStreamBroken(f"HTTP {resp.status}: {body}")
            if not mirror.connected(resp.headers.get(EPOCH_HEADER), self._clock()):
                log.warning("worker %s restarted: its log ids started over", record.worker_id)
                return "reconnect"
            record.connected = True
            record.connects += 1
            if record.connects > 1:
                log.info("log stream of worker %s resumed after id %s", record.worker_id, mirror.cursor)
            parser = SSEParser()
            async for chunk in resp.content.iter_any():
                for event in parser.feed(chunk):
                    if event.event == "log":
                        parsed = _parse_line(event.data)
                        if parsed is None:
                            log.warning("worker %s sent a malformed log event: %.200s", record.worker_id, event.data)
                            continue
                        if not mirror.line(*parsed, now=self._clock()):
                            return "reconnect"
                    elif event.event == "dropped" and not mirror.dropped():
                        return "reconnect"
        return "eof"


# -- HTTP ---------------------------------------------------------------------------------------

LOGS_KEY = web.AppKey("ichat_logs", LogCollector)
SOURCES = ("worker", "console")


def _source(request: web.Request) -> str:
    source = request.query.get("source", "worker")
    if source not in SOURCES:
        raise InvalidRequest(f"source must be one of {', '.join(SOURCES)}, got {source!r}", param="source")
    return source


async def stream_worker_logs(request: web.Request) -> web.StreamResponse:
    collector = request.app[LOGS_KEY]
    worker_id = request.match_info["worker_id"]
    if _source(request) == "console":
        hub = collector.console_hub(worker_id)
        if hub is None and collector.hub(worker_id) is not None:
            raise NotFound(
                f"worker {worker_id!r} has no console log: only workers this gateway launched have one",
                code="no_console_log",
            )
    else:
        hub = collector.hub(worker_id)
    if hub is None:
        raise NotFound(f"no logs of a worker {worker_id!r} at this gateway", code="worker_not_found")
    return await stream_logs(request, hub, send_buffer_bytes=STREAM_SEND_BUFFER_BYTES)


async def stream_all_logs(request: web.Request) -> web.StreamResponse:
    collector = request.app[LOGS_KEY]
    group = collector.consoles if _source(request) == "console" else collector.mirrors
    return await stream_logs(request, group, send_buffer_bytes=STREAM_SEND_BUFFER_BYTES)


def setup_logs(
    app: web.Application, config: GatewayConfig, client_key: web.AppKey[aiohttp.ClientSession]
) -> LogCollector:
    """Add the collector (``LOGS_KEY``), its lifecycle and the /v1/logs routes to ``app``.
    ``client_key`` names the app's shared client session; add this after that session's
    cleanup_ctx, so the session opens before the collector starts and closes after it."""
    collector = LogCollector(config.logs.ring_lines, keep_dead=config.limits.dead_worker_logs)
    app[LOGS_KEY] = collector

    async def lifecycle(app: web.Application) -> AsyncIterator[None]:
        await collector.start(app[client_key])
        try:
            yield
        finally:
            await collector.close()

    app.cleanup_ctx.append(lifecycle)
    end_streams_on_shutdown(app)
    app.router.add_get("/v1/logs/stream", stream_all_logs)
    app.router.add_get("/v1/logs/stream/{worker_id}", stream_worker_logs)
    return collector
