"""The log collector and the /v1/logs routes, in process.

Fake workers serve a LogHub over real sockets on a fixed port (``stream_hubs``, as the worker
does), so a test can cut the gateway's link, stop a worker and start it again on the same port,
or replace it by a new process (a new hub: ids start over). The gateway is ``build_app``; its
collector is reached through ``LOGS_KEY``. Pure parts (mirror, backoff, parser, buffers) first.
"""

from __future__ import annotations

import asyncio
import random
import socket
import time
from collections.abc import Callable
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from ichat.config import GatewayConfig
from ichat.gateway.app import build_app
from ichat.gateway.logs import GATEWAY_STREAM, LOGS_KEY, MAX_RETRY_S, LogCollector, LogMirror, reconnect_delay
from ichat.logs.hub import HubGroup, LogHub, Subscription
from ichat.logs.sse import EPOCH_HEADER, SSEEvent, SSEParser, end_streams_on_shutdown, stream_hubs

from .fakes import MakeGateway


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def eventually(predicate: Callable[[], object], timeout: float = 10.0, what: str = "condition") -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        assert loop.time() < deadline, f"timed out after {timeout}s waiting for {what}"
        await asyncio.sleep(0.01)


def lines_of(hub: LogHub) -> list[tuple[int, str, float, str]]:
    return [(line.id, line.text, line.ts, line.stream) for line in hub.backlog()]


class FakeWorker:
    """A worker's ``GET /logs/stream`` over ``hub`` on a fixed port, that can misbehave."""

    def __init__(self, hub: LogHub | None = None, port: int | None = None) -> None:
        self.hub = hub if hub is not None else LogHub(10_000, worker_id="w")
        self.port = port or free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.server: TestServer | None = None
        self.connections = 0
        self.open_streams = 0
        #: the Last-Event-ID header of every connection (None: asked for a backlog)
        self.resumed_from: list[str | None] = []
        self._requests: dict[int, web.Request] = {}

    def _app(self) -> web.Application:
        app = web.Application()
        end_streams_on_shutdown(app)
        app.router.add_get("/logs/stream", self._handle)
        return app

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        self.connections += 1
        self.open_streams += 1
        self.resumed_from.append(request.headers.get("Last-Event-ID"))
        self._requests[id(request)] = request
        try:
            return await stream_hubs(request, [self.hub])
        finally:
            self.open_streams -= 1
            self._requests.pop(id(request), None)

    async def start(self) -> FakeWorker:
        self.server = TestServer(self._app(), host="127.0.0.1", port=self.port)
        await self.server.start_server()
        return self

    async def stop(self) -> None:
        self.cut()
        if self.server is not None:
            await self.server.close()
            self.server = None

    def cut(self) -> int:
        """Close every open log connection from the worker's side, as a broken link would."""
        requests = list(self._requests.values())
        for request in requests:
            if request.transport is not None:
                request.transport.close()
        return len(requests)

    def emit(self, count: int, prefix: str = "line", stream: str = "stdout") -> None:
        start = self.hub.last_id + 1
        for n in range(start, start + count):
            self.hub.append(stream, f"{prefix} {n}", time.time())


@pytest.fixture
async def workers() -> Any:
    made: list[FakeWorker] = []

    async def make(hub: LogHub | None = None, port: int | None = None) -> FakeWorker:
        worker = await FakeWorker(hub, port).start()
        made.append(worker)
        return worker

    yield make
    for worker in made:
        await worker.stop()


@pytest.fixture
async def collector() -> Any:
    async with aiohttp.ClientSession() as session:
        collector = LogCollector(10_000, rng=random.Random(0))
        await collector.start(session)
        try:
            yield collector
        finally:
            await collector.close()


class Events:
    """Reads an SSE response event by event."""

    def __init__(self, resp: aiohttp.ClientResponse) -> None:
        self.resp = resp
        self._parser = SSEParser()
        self._pending: list[SSEEvent] = []

    async def next(self, count: int, timeout: float = 10.0) -> list[SSEEvent]:
        """The next ``count`` events (fewer only if the stream ends)."""

        async def fill() -> None:
            while len(self._pending) < count:
                chunk = await self.resp.content.readany()
                if not chunk:
                    return
                self._pending.extend(self._parser.feed(chunk))

        await asyncio.wait_for(fill(), timeout)
        taken, self._pending = self._pending[:count], self._pending[count:]
        return taken


def log_data(events: list[SSEEvent]) -> list[dict[str, Any]]:
    return [orjson.loads(e.data) for e in events if e.event == "log"]


# -- pure: backoff, mirror, parser, buffers ----------------------------------------------------


def test_reconnect_delay_grows_with_jitter_and_is_capped():
    rng = random.Random(1)
    firsts = [reconnect_delay(1, rng) for _ in range(200)]
    assert all(0.125 <= d <= 0.25 for d in firsts) and len(set(firsts)) > 100
    assert all(1.0 <= reconnect_delay(4, rng) <= 2.0 for _ in range(50))
    assert all(MAX_RETRY_S / 2 <= reconnect_delay(40, rng) <= MAX_RETRY_S for _ in range(50))


def test_mirror_resumes_by_cursor_and_skips_what_it_has():
    mirror = LogMirror(LogHub(100, worker_id="w"))
    assert mirror.request(100) == ({"tail": "100"}, {})
    assert mirror.connected("e1", now=1.0)
    for n in (1, 2, 3):
        assert mirror.line(n, float(n), "stdout", f"l{n}", None, now=9.0)
    assert mirror.request(100) == ({}, {"Last-Event-ID": "3"})
    assert mirror.connected("e1", now=9.0)
    assert mirror.line(3, 3.0, "stdout", "l3", None, now=9.0)  # already there: ignored
    assert mirror.line(4, 4.0, "stderr", "l4", "ERROR", now=9.0)
    assert [(l.id, l.text, l.level) for l in mirror.hub.backlog()] == [
        (1, "l1", None), (2, "l2", None), (3, "l3", None), (4, "l4", "ERROR")
    ]


def test_mirror_asks_the_worker_once_then_marks_a_gap():
    mirror = LogMirror(LogHub(100, worker_id="w"))
    mirror.connected("e1", now=0.0)
    mirror.line(1, 1.0, "stdout", "a", None, now=0.0)
    assert not mirror.line(5, 5.0, "stdout", "e", None, now=0.0), "first: resync from the worker's ring"
    assert mirror.request(100) == ({}, {"Last-Event-ID": "1"})
    mirror.connected("e1", now=0.0)
    assert mirror.line(5, 5.0, "stdout", "e", None, now=7.0), "the ring starts later too: a gap"
    got = mirror.hub.backlog()
    assert [l.id for l in got] == [1, 4, 5]
    assert got[1].stream == GATEWAY_STREAM and got[1].level == "WARNING" and got[1].ts == 7.0
    assert "3 log line(s) lost" in got[1].text and "2..4" in got[1].text


def test_mirror_dropped_event_resyncs_once_per_cursor():
    mirror = LogMirror(LogHub(100))
    mirror.connected("e1", now=0.0)
    mirror.line(1, 1.0, "stdout", "a", None, now=0.0)
    assert not mirror.dropped()
    assert mirror.dropped()  # same cursor: the ids will tell
    mirror.line(2, 2.0, "stdout", "b", None, now=0.0)
    assert not mirror.dropped()


def test_mirror_new_epoch_means_restart_with_ids_continuing():
    mirror = LogMirror(LogHub(100, worker_id="w"))
    mirror.connected("old", now=0.0)
    for n in (1, 2):
        mirror.line(n, float(n), "stdout", f"old {n}", None, now=0.0)
    assert not mirror.connected("new", now=5.0), "the cursor means nothing to a new process"
    assert mirror.request(100) == ({"tail": "100"}, {})
    assert mirror.connected("new", now=5.0)
    mirror.line(1, 6.0, "stdout", "new 1", None, now=6.0)
    got = mirror.hub.backlog()
    assert [(l.id, l.stream) for l in got] == [(1, "stdout"), (2, "stdout"), (3, GATEWAY_STREAM), (4, "stdout")]
    assert "started over" in got[2].text and got[3].text == "new 1"


def test_mirror_without_epoch_takes_ids_going_back_as_a_restart():
    mirror = LogMirror(LogHub(100))
    mirror.connected(None, now=0.0)
    for n in (1, 2, 3):
        mirror.line(n, 0.0, "stdout", f"{n}", None, now=0.0)
    mirror.connected(None, now=0.0)
    assert not mirror.line(1, 0.0, "stdout", "again 1", None, now=0.0)
    mirror.connected(None, now=0.0)
    assert mirror.line(1, 0.0, "stdout", "again 1", None, now=0.0)
    assert [l.id for l in mirror.hub.backlog()] == [1, 2, 3, 4, 5]


def test_sse_parser_any_chunking_crlf_comments_multiline():
    raw = (
        b": hello\n\nid: 7\nevent: log\ndata: {\"a\":1}\n\n"
        b"event: dropped\r\ndata: {\"dropped\": 3}\r\n\r\n"
        b"data: one\ndata: two\n\n"
    )
    whole = SSEParser().feed(raw)
    assert whole == [
        SSEEvent("log", '{"a":1}', "7"),
        SSEEvent("dropped", '{"dropped": 3}', None),
        SSEEvent("message", "one\ntwo", None),
    ]
    parser = SSEParser()
    byte_by_byte = [event for i in range(len(raw)) for event in parser.feed(raw[i : i + 1])]
    assert byte_by_byte == whole
    with pytest.raises(ValueError):
        SSEParser(max_line_bytes=10).feed(b"data: " + b"x" * 20)


async def test_subscription_drops_oldest_and_counts_them():
    sub = Subscription(3)
    hub = LogHub(100)
    hub.attach(sub)
    for n in range(5):
        hub.append("stdout", f"{n}", 0.0)
    assert await sub.wait(0)
    dropped, lines = sub.take()
    assert dropped == 2 and [l.text for l in lines] == ["2", "3", "4"]
    assert not await sub.wait(0.01)
    sub.close()
    assert await sub.wait(1) and sub.closed


def test_hub_group_merges_backlogs_and_follows_hubs_added_later():
    a, b, c = LogHub(10, worker_id="a"), LogHub(10, worker_id="b"), LogHub(10, worker_id="c")
    a.append("stdout", "a1", 1.0)
    b.append("stdout", "b1", 2.0)
    a.append("stdout", "a2", 3.0)
    group = HubGroup([a, b])
    assert [l.text for l in group.backlog(tail=2)] == ["b1", "a2"]
    sub = group.subscribe()
    group.add(c)
    c.append("stdout", "c1", 4.0)
    b.append("stdout", "b2", 5.0)
    assert [l.text for l in sub.take()[1]] == ["c1", "b2"]
    group.remove(c)
    c.append("stdout", "c2", 6.0)
    group.unsubscribe(sub)
    a.append("stdout", "a3", 7.0)
    assert sub.take() == (0, []) and a.readers == b.readers == c.readers == 0
    with pytest.raises(ValueError):
        group.backlog(after_id=1)


# -- the collector against fake workers ---------------------------------------------------------


async def test_mirror_has_the_workers_lines_in_order_with_its_ids(collector: LogCollector, workers):
    worker = await workers()
    worker.emit(50, prefix="before")
    worker.hub.append("stderr", "WARNING something odd", time.time())
    collector.watch("w", worker.base_url)
    worker.emit(50, prefix="live")
    hub = collector.hub("w")
    await eventually(lambda: hub.last_id == worker.hub.last_id, what="the mirror to catch up")
    assert lines_of(hub) == lines_of(worker.hub)
    assert [l.level for l in hub.backlog() if l.stream == "stderr"] == ["WARNING"]
    assert {l.worker_id for l in hub.backlog()} == {"w"}
    assert worker.resumed_from == [None] and collector.status("w")["connected"]


async def test_cut_links_mid_stream_lose_and_repeat_nothing(collector: LogCollector, workers):
    worker = await workers()
    collector.watch("w", worker.base_url)

    async def produce() -> None:
        for _ in range(300):
            worker.emit(2)
            await asyncio.sleep(0.003)

    producer = asyncio.create_task(produce())
    for cut in range(1, 4):
        await eventually(lambda: worker.open_streams == 1 and collector.hub("w").last_id > 0)
        await asyncio.sleep(0.1)
        assert worker.cut() == 1
        await eventually(lambda: worker.connections == cut + 1, what=f"reconnect #{cut}")
    await producer
    hub = collector.hub("w")
    await eventually(lambda: hub.last_id == worker.hub.last_id == 600, what="the mirror to catch up")
    assert lines_of(hub) == lines_of(worker.hub), "same ids, texts and times: nothing lost or repeated"
    assert worker.resumed_from[0] is None
    assert all(r is not None for r in worker.resumed_from[1:]), "every reconnect resumed by Last-Event-ID"


async def test_worker_restarted_on_same_port_resumes_from_its_buffer(collector: LogCollector, workers):
    worker = await workers()
    worker.emit(10)
    collector.watch("w", worker.base_url)
    await eventually(lambda: collector.hub("w").last_id == 10)
    await worker.stop()
    worker.emit(30, prefix="while down")
    await asyncio.sleep(0.3)  # a few failed reconnects
    assert not collector.status("w")["connected"]
    await worker.start()
    worker.emit(5, prefix="after")
    await eventually(lambda: collector.hub("w").last_id == 45, what="the mirror to catch up")
    assert lines_of(collector.hub("w")) == lines_of(worker.hub)
    assert worker.resumed_from[-1] == "10"


async def test_gap_line_when_the_worker_no_longer_holds_the_ids(collector: LogCollector, workers):
    worker = await workers(LogHub(20, worker_id="w"))
    worker.emit(10)
    collector.watch("w", worker.base_url)
    await eventually(lambda: collector.hub("w").last_id == 10)
    await worker.stop()
    worker.emit(50)  # ids 11..60; the ring keeps 41..60
    await worker.start()
    await eventually(lambda: collector.hub("w").last_id == 60, what="the mirror to catch up")
    got = collector.hub("w").backlog()
    assert [l.id for l in got] == list(range(1, 11)) + [40] + list(range(41, 61))
    marker = got[10]
    assert marker.stream == GATEWAY_STREAM and marker.level == "WARNING"
    assert "30 log line(s) lost" in marker.text and "11..40" in marker.text
    assert [l.text for l in got[11:]] == [f"line {n}" for n in range(41, 61)]


async def test_worker_replaced_by_a_new_process_continues_after_a_restart_line(collector: LogCollector, workers):
    worker = await workers()
    worker.emit(10, prefix="first process")
    collector.watch("w", worker.base_url)
    await eventually(lambda: collector.hub("w").last_id == 10)
    await worker.stop()
    worker.hub = LogHub(10_000, worker_id="w")  # new process: new epoch, ids from 1
    worker.emit(5, prefix="second process")
    await worker.start()
    await eventually(lambda: collector.hub("w").last_id == 16, what="the new process's lines")
    got = collector.hub("w").backlog()
    assert [l.id for l in got] == list(range(1, 17))
    assert got[10].stream == GATEWAY_STREAM and "started over" in got[10].text
    assert [l.text for l in got[11:]] == [f"second process {n}" for n in range(1, 6)]


async def test_falling_behind_at_the_worker_refetches_from_its_ring(collector: LogCollector, workers):
    worker = await workers()
    worker.emit(5)
    collector.watch("w", worker.base_url)
    await eventually(lambda: collector.hub("w").last_id == 5)
    worker.emit(3000)  # at once: the worker's reader buffer (1000 lines) overflows
    await eventually(lambda: collector.hub("w").last_id == 3005, what="the mirror to catch up")
    assert lines_of(collector.hub("w")) == lines_of(worker.hub)
    assert not [l for l in collector.hub("w").backlog() if l.stream == GATEWAY_STREAM]
    assert worker.resumed_from[1:] == ["5"]


async def test_watch_is_idempotent_and_a_new_address_resumes(collector: LogCollector, workers):
    worker = await workers()
    worker.emit(3)
    collector.watch("w", worker.base_url)
    await eventually(lambda: worker.open_streams == 1 and collector.hub("w").last_id == 3)
    for _ in range(5):
        collector.watch("w", worker.base_url + "/")
    await asyncio.sleep(0.1)
    assert worker.connections == 1
    moved = await workers(worker.hub)  # the same process, reachable at another address
    collector.watch("w", moved.base_url)
    await eventually(lambda: worker.open_streams == 0 and moved.open_streams == 1)
    worker.emit(2)
    await eventually(lambda: collector.hub("w").last_id == 5)
    assert lines_of(collector.hub("w")) == lines_of(worker.hub)
    assert moved.resumed_from == ["3"]


async def test_reconnect_drops_the_link_and_resumes(collector: LogCollector, workers):
    worker = await workers()
    worker.emit(4)
    collector.watch("w", worker.base_url)
    await eventually(lambda: collector.hub("w").last_id == 4)
    collector.reconnect("w")
    await eventually(lambda: worker.connections == 2 and worker.open_streams == 1)
    worker.emit(4)
    await eventually(lambda: collector.hub("w").last_id == 8)
    assert lines_of(collector.hub("w")) == lines_of(worker.hub)
    assert worker.resumed_from == [None, "4"]


async def test_watch_before_start_follows_once_started(workers):
    worker = await workers()
    worker.emit(2)
    collector = LogCollector(100)
    collector.watch("w", worker.base_url)
    assert collector.status("w")["following"] is False
    async with aiohttp.ClientSession() as session:
        await collector.start(session)
        await eventually(lambda: collector.hub("w").last_id == 2)
        await collector.close()
    assert not collector.status("w")["following"] and collector.hub("w").last_id == 2


# -- routes -------------------------------------------------------------------------------------


async def test_unknown_worker_is_an_openai_shaped_404(gateway: MakeGateway):
    client = await gateway({})
    resp = await client.get("/v1/logs/stream/ghost")
    assert resp.status == 404
    body = await resp.json()
    assert body["error"]["code"] == "worker_not_found" and "ghost" in body["error"]["message"]
    resp = await client.get("/v1/logs/stream/ghost", params={"source": "bogus"})
    assert resp.status == 400 and (await resp.json())["error"]["param"] == "source"


async def test_worker_stream_backlog_tail_and_follow_false(gateway: MakeGateway, workers):
    client = await gateway({})
    collector = client.app[LOGS_KEY]
    worker = await workers()
    worker.emit(8)
    worker.hub.append("stderr", "ERROR engine fell over", time.time())
    collector.watch("w", worker.base_url)
    await eventually(lambda: collector.hub("w").last_id == 9)
    resp = await client.get("/v1/logs/stream/w", params={"tail": "3", "follow": "false"})
    assert resp.status == 200 and resp.headers["Content-Type"] == "text/event-stream"
    assert resp.headers[EPOCH_HEADER] == collector.hub("w").epoch
    events = SSEParser().feed(await resp.read())  # ends: follow=false
    assert [e.id for e in events] == ["7", "8", "9"]
    data = log_data(events)
    assert data[-1] == {
        "id": 9, "ts": worker.hub.backlog()[-1].ts, "stream": "stderr", "level": "ERROR",
        "worker_id": "w", "line": "ERROR engine fell over",
    }
    resumed = await client.get("/v1/logs/stream/w", params={"follow": "false"}, headers={"Last-Event-ID": "7"})
    assert [e.id for e in SSEParser().feed(await resumed.read())] == ["8", "9"]


async def test_worker_stream_goes_live_after_the_backlog(gateway: MakeGateway, workers):
    client = await gateway({})
    collector = client.app[LOGS_KEY]
    worker = await workers()
    worker.emit(2)
    collector.watch("w", worker.base_url)
    await eventually(lambda: collector.hub("w").last_id == 2)
    async with client.get("/v1/logs/stream/w", params={"tail": "1"}) as resp:
        worker.emit(3, prefix="live")
        events = await Events(resp).next(4)
    backlog_and_live = log_data(events)
    ids = [d["id"] for d in backlog_and_live]
    assert ids == sorted(ids) and ids[-1] == 5 and len(set(ids)) == len(ids)
    assert [d["line"] for d in backlog_and_live[-3:]] == ["live 3", "live 4", "live 5"]


async def test_unwatch_keeps_lines_forget_removes_them(gateway: MakeGateway, workers):
    client = await gateway({})
    collector = client.app[LOGS_KEY]
    worker = await workers()
    worker.emit(5)
    collector.watch("w", worker.base_url)
    await eventually(lambda: collector.hub("w").last_id == 5)
    collector.unwatch("w")
    await eventually(lambda: worker.open_streams == 0, what="the link to close")
    worker.emit(5, prefix="unheard")
    assert collector.worker_ids() == ["w"] and collector.status("w")["following"] is False
    resp = await client.get("/v1/logs/stream/w", params={"follow": "false", "tail": "100"})
    assert [d["line"] for d in log_data(SSEParser().feed(await resp.read()))] == [f"line {n}" for n in range(1, 6)]
    async with client.get("/v1/logs/stream/w") as following, client.get("/v1/logs/stream") as everyone:
        await Events(following).next(5)
        await Events(everyone).next(5)
        collector.forget("w")
        assert await following.content.read() == b"", "the removed worker's stream ended"
        assert not everyone.content.at_eof(), "the all-workers stream goes on"
    assert collector.worker_ids() == [] and collector.hub("w") is None
    assert (await client.get("/v1/logs/stream/w")).status == 404


async def test_console_source_keeps_a_managed_workers_last_lines(gateway: MakeGateway):
    client = await gateway({})
    collector = client.app[LOGS_KEY]
    console = collector.console("m1")
    assert collector.console("m1") is console
    console.append("stdout", "INFO loading weights", time.time())
    console.append("stderr", "torch.OutOfMemoryError: CUDA out of memory", time.time())
    collector.unwatch("m1")  # the child died; its lines stay
    resp = await client.get("/v1/logs/stream/m1", params={"source": "console", "follow": "false"})
    data = log_data(SSEParser().feed(await resp.read()))
    assert [(d["stream"], d["worker_id"]) for d in data] == [("stdout", "m1"), ("stderr", "m1")]
    assert "OutOfMemoryError" in data[-1]["line"] and data[0]["level"] == "INFO"
    mirror = await client.get("/v1/logs/stream/m1", params={"follow": "false"})
    assert mirror.status == 200 and log_data(SSEParser().feed(await mirror.read())) == []
    collector.watch("r1", "http://127.0.0.1:9")  # a registered worker: no console
    resp = await client.get("/v1/logs/stream/r1", params={"source": "console"})
    assert resp.status == 404 and (await resp.json())["error"]["code"] == "no_console_log"


async def test_all_workers_stream_interleaves_tagged_lines_and_follows_new_workers(gateway: MakeGateway):
    client = await gateway({})
    collector = client.app[LOGS_KEY]
    collector.console("a")
    collector.console("b")
    collector.hub("a").append("stdout", "a one", 1.0)
    collector.hub("b").append("stdout", "b one", 2.0)
    collector.hub("a").append("stdout", "a two", 3.0)
    async with client.get("/v1/logs/stream") as resp:
        reader = Events(resp)
        backlog = await reader.next(3)
        collector.console("c")  # a worker registered after the stream began
        collector.hub("c").append("stdout", "c one", 4.0)
        collector.hub("b").append("stdout", "b two", 5.0)
        live = await reader.next(2)
    events = backlog + live
    assert all(e.id is None for e in events), "ids are per worker: the merged stream carries none"
    assert [(d["worker_id"], d["line"]) for d in log_data(events)] == [
        ("a", "a one"), ("b", "b one"), ("a", "a two"), ("c", "c one"), ("b", "b two")
    ]
    resp = await client.get("/v1/logs/stream", headers={"Last-Event-ID": "3"})
    assert resp.status == 400
    consoles = await client.get("/v1/logs/stream", params={"source": "console", "follow": "false"})
    assert log_data(SSEParser().feed(await consoles.read())) == []


async def test_heartbeat_registers_a_worker_whose_logs_the_gateway_then_follows(gateway: MakeGateway, workers):
    """The flow the e2e tests exercise with real processes: heartbeat -> registry -> watch."""
    client = await gateway({})
    worker = await workers()
    worker.emit(3, prefix="engine says")
    beat = {
        "worker_id": "w", "instance_id": "i1", "model_name": "m", "backend": "stub", "host": "127.0.0.1",
        "port": worker.port, "state": "ready", "heartbeat_interval": 30.0, "log_streaming": True,
    }
    assert (await client.post("/v1/workers/heartbeat", json=beat)).status == 200
    collector = client.app[LOGS_KEY]
    await eventually(lambda: collector.hub("w") is not None and collector.hub("w").last_id == 3)
    async with client.get("/v1/logs/stream/w", params={"tail": "0"}) as resp:
        worker.emit(1, prefix="engine says")
        assert [d["line"] for d in log_data(await Events(resp).next(1))] == ["engine says 4"]
    quiet = {**beat, "worker_id": "q", "log_streaming": False}
    assert (await client.post("/v1/workers/heartbeat", json=quiet)).status == 200
    assert collector.hub("q") is None


async def test_gateway_shutdown_ends_open_log_streams(workers):
    app = build_app(GatewayConfig.from_dict({}, environ={}))
    client = TestClient(TestServer(app))
    await client.start_server()
    app[LOGS_KEY].console("m").append("stdout", "hello", time.time())
    resp = await client.get("/v1/logs/stream/m", params={"source": "console"})
    assert len(await Events(resp).next(1)) == 1
    started = time.monotonic()
    await client.close()  # the runner's shutdown would otherwise wait out its timeout (60 s)
    assert time.monotonic() - started < 5


# -- slow readers ---------------------------------------------------------------------------------


async def test_100_slow_readers_do_not_delay_a_fast_one(gateway: MakeGateway, workers):
    client = await gateway({})
    collector = client.app[LOGS_KEY]
    worker = await workers()
    collector.watch("w", worker.base_url)
    await eventually(lambda: worker.open_streams == 1)
    hub = collector.hub("w")
    loop = asyncio.get_running_loop()
    request = b"GET /v1/logs/stream/w?tail=0 HTTP/1.1\r\nHost: gateway\r\n\r\n"
    slow: list[socket.socket] = []
    for _ in range(100):  # each reads nothing: tiny receive buffers, never read until the end
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.setblocking(False)
        await loop.sock_connect(sock, (client.server.host, client.server.port))
        await loop.sock_sendall(sock, request)
        slow.append(sock)
    try:
        async with client.get("/v1/logs/stream/w", params={"tail": "0"}) as fast:
            await eventually(lambda: hub.readers == 101, what="all readers subscribed")
            arrived: dict[int, float] = {}
            fast_dropped = []

            async def read_fast() -> None:
                parser = SSEParser()
                async for chunk in fast.content.iter_any():
                    now = time.monotonic()
                    for event in parser.feed(chunk):
                        if event.event == "dropped":
                            fast_dropped.append(event)
                        elif event.event == "log":
                            arrived[int(event.id)] = now

            reader = asyncio.create_task(read_fast())
            payload = "x" * 200
            for _ in range(30):  # ~2 MB per reader: fills every slow reader's socket and buffer
                worker.emit(200, prefix=payload)
                await asyncio.sleep(0.005)
            await eventually(lambda: len(arrived) == 6000, timeout=30, what="the fast reader to get the prefill")
            started = time.monotonic()
            worker.emit(500, prefix="burst")
            await eventually(lambda: 6500 in arrived, timeout=10, what="the burst at the fast reader")
            burst_s = arrived[6500] - started
            reader.cancel()
        print(f"burst of 500 lines reached the fast reader in {burst_s * 1000:.0f} ms with 100 stalled readers")
        assert burst_s < 1.0
        assert not fast_dropped and sorted(arrived) == list(range(1, 6501))
        assert lines_of(hub) == lines_of(worker.hub), "the collector was not slowed into losing lines"

        async def read_slow(sock: socket.socket) -> bytes:
            """Read until the newest line arrived; what a slow reader finally sees."""
            seen = b""
            while b'{"id":6500,' not in seen:
                chunk = await loop.sock_recv(sock, 1 << 20)
                assert chunk, "the stream ended early"
                seen += chunk
            return seen

        for sock in slow:
            seen = await asyncio.wait_for(read_slow(sock), 20)
            marker = seen.find(b'event: dropped\ndata: {"dropped":')
            assert marker > 0, "a slow reader learns it lost lines"
            assert seen.find(b'{"id":6500,') > marker, "and then gets the newest lines"
    finally:
        for sock in slow:
            sock.close()
