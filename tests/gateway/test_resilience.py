"""The data plane when workers fail under it, in process: a hung worker's requests are woken
when the registry declares it unhealthy, streams migrate to another replica when their model
opted in, and a reload's timeouts reach connection pools already open."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import orjson
import pytest

from ichat.config import GatewayConfig
from ichat.gateway.admin import CONTROL_KEY
from ichat.gateway.app import DATA_PLANE_KEY, TABLE_KEY

from .fakes import STORY, STORY_PROMPT, STORY_TEXT, FakeClock, FakeUpstream, MakeGateway, MakeUpstream
from .test_control import beat_for
from .test_proxy import CHAT, eventually, upstream_client  # noqa: F401 (autouse: both upstream paths)

COMPLETIONS = "/v1/completions"


def chat_body(**extra: Any) -> dict[str, Any]:
    return {"model": "m", "messages": [{"role": "user", "content": "Tell a story"}], "stream": True, **extra}


def events(raw: bytes) -> list[Any]:
    out = []
    for block in raw.split(b"\n\n"):
        if block.startswith(b"data: "):
            payload = block[6:]
            out.append(payload.decode() if payload == b"[DONE]" else orjson.loads(payload))
    return out


def text_of(evs: list[Any], chat: bool = True) -> str:
    text = ""
    for ev in evs:
        if isinstance(ev, dict) and ev.get("choices"):
            choice = ev["choices"][0]
            text += (choice.get("delta", {}).get("content") or "") if chat else choice.get("text", "")
    return text


#: probes every 0.1 s, 0.2 s timeout, two failures: a hung worker is out within about 0.6 s
FAST_PROBES = {"probe_interval_s": 0.1, "probe_timeout_s": 0.2, "probe_failures": 2}


async def hang(client: Any, fake: FakeUpstream, worker_id: str) -> float:
    """Make ``fake`` stop answering its probes (as a SIGSTOPped worker); return when the gateway
    has declared it unhealthy, with the time that took."""
    started = time.monotonic()
    fake.health_ok = False
    await eventually(lambda: not client.app[TABLE_KEY].get(worker_id).routable, timeout=5)
    return time.monotonic() - started


# -- a hung worker ------------------------------------------------------------------------------


async def test_request_waiting_on_a_hung_worker_is_resent_when_it_is_declared_unhealthy(
    gateway: MakeGateway, fake_upstream: MakeUpstream
):
    hung, good = await fake_upstream("hung", "hang"), await fake_upstream("good")
    client = await gateway({"routing": {"timeouts": {"first_byte_s": 600}}, "registry": FAST_PROBES})
    await client.post("/v1/workers/heartbeat", json=beat_for(hung, worker_id="hung"))
    pending = asyncio.ensure_future(client.post(CHAT, json={"model": "m", "messages": []}))
    await eventually(lambda: hung.hits == 1)
    await client.post("/v1/workers/heartbeat", json=beat_for(good, worker_id="good"))
    assert not pending.done()

    started = time.monotonic()
    await hang(client, hung, "hung")
    resp = await asyncio.wait_for(pending, 5)

    assert resp.status == 200 and (await resp.json())["upstream"] == "good"
    assert time.monotonic() - started < 3  # not first_byte_s (600 s)
    await eventually(lambda: hung.aborted.is_set())  # its connection was closed: the worker sees it
    assert client.app[TABLE_KEY].get("hung").inflight == 0


async def test_stream_that_started_on_a_hung_worker_ends_with_the_error_event(
    gateway: MakeGateway, fake_upstream: MakeUpstream
):
    hung, good = await fake_upstream("hung", "stream", chunks=3), await fake_upstream("good")
    hung.hold.clear()  # the first chunk goes out, then nothing
    client = await gateway({"registry": FAST_PROBES})
    await client.post("/v1/workers/heartbeat", json=beat_for(hung, worker_id="hung"))
    resp = await client.post(CHAT, json={"model": "m", "stream": True})
    first = await resp.content.readuntil(b"\n\n")
    assert b'"n":0' in first
    await client.post("/v1/workers/heartbeat", json=beat_for(good, worker_id="good"))

    await hang(client, hung, "hung")
    rest = await asyncio.wait_for(resp.content.read(), 5)

    evs = events(rest)
    assert evs[-1] == "[DONE]" and evs[-2]["error"]["code"] == "upstream_error"
    assert "127.0.0.1" not in rest.decode()  # no address reaches the client


async def test_other_workers_requests_are_left_alone(gateway: MakeGateway, fake_upstream: MakeUpstream):
    hung, slow = await fake_upstream("hung", "hang"), await fake_upstream("slow", "stream", chunks=3)
    slow.hold.clear()
    client = await gateway({"registry": FAST_PROBES})
    await client.post("/v1/workers/heartbeat", json=beat_for(slow, worker_id="good"))
    resp = await client.post(CHAT, json={"model": "m", "stream": True})
    await resp.content.readuntil(b"\n\n")
    await client.post("/v1/workers/heartbeat", json=beat_for(hung, worker_id="hung"))

    await hang(client, hung, "hung")
    slow.hold.set()
    rest = await asyncio.wait_for(resp.content.read(), 5)

    assert [e for e in events(rest) if isinstance(e, dict) and "error" in e] == []
    assert events(rest)[-1] == "[DONE]"


async def test_missed_beats_alone_leave_its_requests_alone(gateway: MakeGateway, fake_upstream: MakeUpstream, clock: FakeClock):
    """Beats lost but the data path fine (probes pass): out of rotation, yet the stream it is
    serving goes on (only a worker the gateway cannot reach is declared unhealthy)."""
    quiet = await fake_upstream("quiet", "stream", chunks=3)
    quiet.hold.clear()
    client = await gateway({"registry": FAST_PROBES})
    await client.post("/v1/workers/heartbeat", json=beat_for(quiet, worker_id="quiet"))
    resp = await client.post(CHAT, json={"model": "m", "stream": True})
    await resp.content.readuntil(b"\n\n")

    clock.now += 6.5  # three intervals without a beat
    client.app[CONTROL_KEY].tick()
    assert not client.app[TABLE_KEY].get("quiet").routable
    quiet.hold.set()
    rest = await asyncio.wait_for(resp.content.read(), 5)

    assert [e for e in events(rest) if isinstance(e, dict) and "error" in e] == []
    assert events(rest)[-1] == "[DONE]"


# -- stream migration -----------------------------------------------------------------------------


def migrating(**routing: Any) -> dict[str, Any]:
    return {"routing": {"policy": "round_robin", "migration": {"models": ["m"], "max_attempts": 2}, **routing}}


async def two_story_workers(gateway: MakeGateway, fake_upstream: MakeUpstream, config: dict[str, Any], die_after: int | None = 4):
    dying = await fake_upstream("dying", "story", die_after=die_after)
    spare = await fake_upstream("spare", "story")
    client = await gateway(config)
    await client.post("/v1/workers/heartbeat", json=beat_for(dying, worker_id="dying"))
    return client, dying, spare


@pytest.mark.parametrize("route", [CHAT, COMPLETIONS])
@pytest.mark.parametrize("usage", ["none", "final", "continuous"])
async def test_stream_continues_on_another_replica_when_its_worker_dies(
    route: str, usage: str, gateway: MakeGateway, fake_upstream: MakeUpstream
):
    client, dying, spare = await two_story_workers(gateway, fake_upstream, migrating())
    await client.post("/v1/workers/heartbeat", json=beat_for(spare, worker_id="spare"))
    body: dict[str, Any] = chat_body() if route == CHAT else {"model": "m", "prompt": STORY_PROMPT, "stream": True}
    if usage != "none":
        body["stream_options"] = {"include_usage": True, "continuous_usage_stats": usage == "continuous"}
    body["max_tokens"] = 15

    resp = await client.post(route, json=body)
    evs = events(await resp.read())

    assert resp.status == 200 and dying.hits == 1 and spare.hits == 1
    assert text_of(evs, route == CHAT) == "".join(w + " " for w in STORY[:15])  # no word lost or twice
    assert evs.count("[DONE]") == 1 and evs[-1] == "[DONE]"
    chunks = [e for e in evs if isinstance(e, dict)]
    assert {(c["id"], c["created"], c["model"]) for c in chunks} == {(chunks[0]["id"], chunks[0]["created"], "served-by-dying")}
    if route == CHAT:
        assert sum(1 for c in chunks if c["choices"] and "role" in c["choices"][0]["delta"]) == 1
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1] == "length"
    # the continuation asked for what was left: 15 - 4 tokens, from the text so far
    sent = orjson.loads(spare.requests[0]["body"])
    assert sent["max_tokens"] == 11
    if route == CHAT:
        # its trailing space held back (templates trim it) and not written twice
        assert sent["messages"][-1] == {"role": "assistant", "content": "w0 w1 w2 w3"}
        assert sent["continue_final_message"] is True and sent["add_generation_prompt"] is False
    else:
        assert sent["prompt"] == STORY_PROMPT + "w0 w1 w2 w3 "
    with_usage = [c for c in chunks if "usage" in c]
    if usage == "none":
        assert with_usage == []
    else:
        final = with_usage[-1]
        assert final["choices"] == [] and final["usage"] == {"prompt_tokens": 7, "completion_tokens": 15, "total_tokens": 22}
        assert len(with_usage) == (1 if usage == "final" else len(chunks))


async def test_migration_is_opt_in_per_model(gateway: MakeGateway, fake_upstream: MakeUpstream):
    client, dying, spare = await two_story_workers(gateway, fake_upstream, {"routing": {"policy": "round_robin"}})
    await client.post("/v1/workers/heartbeat", json=beat_for(spare, worker_id="spare"))

    evs = events(await (await client.post(CHAT, json=chat_body())).read())

    assert spare.hits == 0 and text_of(evs) == "w0 w1 w2 w3 "
    assert evs[-2]["error"]["code"] == "upstream_error" and evs[-1] == "[DONE]"
    assert "stream_options" not in orjson.loads(dying.requests[0]["body"])  # the client's bytes, untouched


async def test_migration_attempts_are_capped(gateway: MakeGateway, fake_upstream: MakeUpstream):
    config = migrating()
    config["routing"]["migration"]["max_attempts"] = 1
    client, dying, spare = await two_story_workers(gateway, fake_upstream, config)
    spare.die_after = 3  # the second replica dies too
    third = await fake_upstream("third", "story")
    for fake, wid in ((spare, "spare"), (third, "third")):
        await client.post("/v1/workers/heartbeat", json=beat_for(fake, worker_id=wid))

    evs = events(await (await client.post(CHAT, json=chat_body())).read())

    assert third.hits == 0 and text_of(evs) == "w0 w1 w2 w3 w4 w5 w6 "
    assert evs[-2]["error"]["code"] == "upstream_error" and evs.count("[DONE]") == 1
    assert STORY_TEXT.startswith(text_of(evs))


async def test_hung_worker_stream_migrates_when_declared_unhealthy(gateway: MakeGateway, fake_upstream: MakeUpstream):
    hung = await fake_upstream("hung", "story")
    config = migrating()
    config["registry"] = FAST_PROBES
    client = await gateway(config)
    await client.post("/v1/workers/heartbeat", json=beat_for(hung, worker_id="hung"))
    gate = asyncio.Event()

    # Hold the hung worker after 3 words: patch its story to wait on the gate mid-stream.
    async def stuck(request: Any, body: bytes) -> Any:
        from aiohttp import web

        out = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await out.prepare(request)
        for n, word in enumerate(STORY[:3], 1):
            chunk = {"id": "chatcmpl-hung", "object": "chat.completion.chunk", "created": 1, "model": "m",
                     "choices": [{"index": 0, "delta": {"content": word + " "}, "finish_reason": None}],
                     "usage": {"prompt_tokens": 7, "completion_tokens": n, "total_tokens": 7 + n}}  # fmt: skip
            await out.write(b"data: " + orjson.dumps(chunk) + b"\n\n")
        await gate.wait()
        return out

    hung._story = stuck  # type: ignore[method-assign]
    good = await fake_upstream("good", "story")
    resp = await client.post(CHAT, json=chat_body())
    seen = b""
    while seen.count(b"\n\n") < 3:
        seen += await resp.content.readany()
    await client.post("/v1/workers/heartbeat", json=beat_for(good, worker_id="good"))
    await hang(client, hung, "hung")
    rest = await asyncio.wait_for(resp.content.read(), 5)
    gate.set()

    assert text_of(events(seen + rest)) == STORY_TEXT
    assert good.hits == 1


# -- reload ---------------------------------------------------------------------------------------


async def test_reloaded_timeouts_reach_connection_pools_already_open(
    gateway: MakeGateway, fake_upstream: MakeUpstream, upstream_client: str
):
    fast, slow = await fake_upstream("fast"), await fake_upstream("slow", "hang")
    client = await gateway({"routes": [{"model_name": "m", "api_base": fast.api_base}, {"model_name": "h", "api_base": slow.api_base}]})
    assert (await client.post(CHAT, json={"model": "m"})).status == 200  # the pool to fast exists now
    data_plane = client.app[DATA_PLANE_KEY]
    pools_before = dict(data_plane.upstreams._pools)
    new = GatewayConfig.from_dict(
        {
            "routes": [{"model_name": "m", "api_base": fast.api_base}, {"model_name": "h", "api_base": slow.api_base}],
            "routing": {"timeouts": {"connect_s": 1, "first_byte_s": 0.3, "total_s": 0}},
        },
        source="new.yaml",
        environ={},
    )
    await client.app[CONTROL_KEY].apply(new)

    if upstream_client == "small-client":
        assert pools_before and all(p.read_timeout == 0.3 and p.connect_timeout == 1 for p in pools_before.values())
    started = time.monotonic()
    resp = await client.post(CHAT, json={"model": "h"})
    assert resp.status == 504 and time.monotonic() - started < 3


async def test_breaker_state_is_exported(gateway: MakeGateway, fake_upstream: MakeUpstream, clock: FakeClock):
    bad = await fake_upstream("bad", "status", status=503)
    client = await gateway(
        {"routes": [{"model_name": "m", "api_base": bad.api_base}], "routing": {"retries": 0, "circuit_breaker": {"failures": 1, "cooldown_s": 10}}}
    )

    def state() -> str:
        return next(
            line for line in text.splitlines() if line.startswith("ichat_gateway_circuit_breaker_state{")
        ).rsplit(" ", 1)[1]

    text = await (await client.get("/metrics")).text()
    assert state() == "0.0"
    await client.post(CHAT, json={"model": "m"})
    text = await (await client.get("/metrics")).text()
    assert state() == "1.0"
    clock.now += 11
    text = await (await client.get("/metrics")).text()
    assert state() == "2.0"
