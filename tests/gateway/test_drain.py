"""The gateway's SIGTERM drain (ichat.gateway.__main__.Drain), in process: it waits for the
requests in flight, closes their connections, and gives up after its timeout."""

from __future__ import annotations

import asyncio

from aiohttp import web

from ichat.gateway.__main__ import Drain


async def until(predicate, timeout: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


async def test_idle_waits_for_the_request_in_flight_and_closes_its_connection(aiohttp_client):
    drain = Drain()
    release = asyncio.Event()

    async def slow(_request: web.Request) -> web.Response:
        await release.wait()
        return web.Response(text="done")

    app = web.Application(middlewares=[drain.middleware])
    app.on_response_prepare.append(drain.on_response_prepare)
    app.router.add_get("/slow", slow)
    client = await aiohttp_client(app)
    release.set()
    before = await client.get("/slow")  # an answer before draining keeps its connection
    assert before.status == 200 and before.headers.get("Connection") != "close"
    release.clear()

    answer = asyncio.create_task(client.get("/slow"))
    await until(lambda: drain.inflight == 1)
    idle = asyncio.create_task(drain.idle(5))
    await asyncio.sleep(0.05)
    assert not idle.done()  # the request is still running
    release.set()
    assert await idle is True
    resp = await answer
    assert resp.status == 200 and await resp.text() == "done"
    assert resp.headers["Connection"] == "close"


async def test_idle_at_once_when_nothing_runs_and_false_after_the_timeout():
    drain = Drain()
    assert await asyncio.wait_for(drain.idle(5), 1) is True

    never = asyncio.Event()

    async def handler(_request):
        await never.wait()

    running = asyncio.create_task(drain.middleware(None, handler))
    await until(lambda: drain.inflight == 1)
    assert await drain.idle(0.05) is False
    running.cancel()
    await asyncio.gather(running, return_exceptions=True)
    assert drain.inflight == 0
    assert await asyncio.wait_for(drain.idle(5), 1) is True
