"""Serve a LogHub as Server-Sent Events: backlog first, then live lines, ids for resuming.

Query: ``tail=N`` (backlog size, default 100), ``follow=false`` (backlog only, then end).
Header ``Last-Event-ID`` (or ``?after=ID``) resumes after that id instead of a tail.
Each event: ``id: <n>`` + ``event: log`` + ``data: <json line>``; a reader that fell behind gets
``event: dropped`` with the number of lines it lost.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable

import orjson
from aiohttp import web

from ichat.errors import InvalidRequest
from ichat.logs.hub import LogHub, LogLine

DEFAULT_TAIL = 100
KEEPALIVE_S = 15.0


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


def encode_line(line: LogLine) -> bytes:
    return b"id: %d\nevent: log\ndata: %s\n\n" % (line.id, orjson.dumps(line.to_dict()))


def encode_dropped(count: int) -> bytes:
    return b"event: dropped\ndata: %s\n\n" % orjson.dumps({"dropped": count})


async def stream_hubs(request: web.Request, hubs: Iterable[LogHub]) -> web.StreamResponse:
    """Stream one or several hubs (interleaved as lines arrive). Resuming by id needs one hub."""
    hubs = list(hubs)
    last_event_id = request.headers.get("Last-Event-ID") or request.query.get("after")
    after = None
    if last_event_id is not None:
        try:
            after = int(last_event_id)
        except ValueError:
            raise InvalidRequest("Last-Event-ID must be an integer", param="Last-Event-ID") from None
    tail = _int_param(request, "tail", DEFAULT_TAIL if after is None else None)
    follow = request.query.get("follow", "true").lower() not in ("false", "0", "no")

    # Subscribe before reading the backlog so no line falls between the two.
    subs = [hub.subscribe() for hub in hubs] if follow else []
    try:
        response = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        )
        await response.prepare(request)
        sent_upto: dict[int, int] = {}
        backlog: list[LogLine] = []
        for index, hub in enumerate(hubs):
            lines = hub.backlog(after_id=after, tail=tail)
            backlog.extend(lines)
            sent_upto[index] = lines[-1].id if lines else (after if after is not None else hub.last_id)
        backlog.sort(key=lambda line: line.ts)
        if backlog:
            await response.write(b"".join(encode_line(line) for line in backlog))
        else:
            await response.write(b": backlog empty\n\n")
        if not follow:
            await response.write_eof()
            return response
        await _follow(response, subs, sent_upto)
        return response
    finally:
        for hub, sub in zip(hubs, subs):
            hub.unsubscribe(sub)


async def _follow(response: web.StreamResponse, subs: list, sent_upto: dict[int, int]) -> None:
    getters: dict[asyncio.Task, int] = {}
    try:
        while True:
            for index, sub in enumerate(subs):
                if index not in getters.values():
                    getters[asyncio.ensure_future(sub.queue.get())] = index
            done, _ = await asyncio.wait(getters, timeout=KEEPALIVE_S, return_when=asyncio.FIRST_COMPLETED)
            if not done:
                await response.write(b": keep-alive\n\n")
                continue
            out = []
            for task in done:
                index = getters.pop(task)
                sub = subs[index]
                batch = [task.result()]
                while not sub.queue.empty():
                    batch.append(sub.queue.get_nowait())
                dropped = sub.take_dropped()
                if dropped:
                    out.append(encode_dropped(dropped))
                for line in batch:
                    if line.id > sent_upto[index]:  # the backlog may already hold it
                        out.append(encode_line(line))
                        sent_upto[index] = line.id
            if out:
                await response.write(b"".join(out))
    finally:
        for task in getters:
            task.cancel()
