"""The data plane, in process: a gateway app in front of fake upstreams (aiohttp apps)."""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import socket
import time
from collections.abc import Callable
from typing import Any

import aiohttp
import orjson
import pytest

from ichat.gateway.app import TABLE_KEY
from ichat.gateway.proxy import Proxy, _Target
from ichat.gateway.sniff import form_fields
from .fakes import FakeClock, FakeUpstream, MakeGateway, MakeUpstream

CHAT = "/v1/chat/completions"


@pytest.fixture(autouse=True, params=["small-client", "aiohttp-fallback"])
def upstream_client(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Every test runs through both upstream clients: the proxy's own (plain http://) and the
    aiohttp session it falls back to for anything else (https://)."""
    if request.param == "aiohttp-fallback":
        resolve = Proxy._target

        def fallback(self: Proxy, api_base: str) -> _Target:
            target = resolve(self, api_base)
            return _Target(None, target.path_prefix, target.host_line)

        monkeypatch.setattr(Proxy, "_target", fallback)
    return request.param


def routes(model: str, *upstreams: FakeUpstream | str, **extra: Any) -> list[dict[str, Any]]:
    return [{"model_name": model, "api_base": u if isinstance(u, str) else u.api_base, **extra} for u in upstreams]


def dead_api_base() -> str:
    """A local address nothing listens on: connecting is refused at once."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/v1"


async def eventually(condition: Callable[[], bool], timeout: float = 2.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


async def error_of(resp: aiohttp.ClientResponse) -> dict[str, Any]:
    body = orjson.loads(await resp.read())
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "code", "param"}
    assert "Traceback" not in body["error"]["message"]
    return body["error"]


# -- routing ----------------------------------------------------------------------------------


async def test_routes_by_model_and_forwards_the_body_untouched(fake_upstream: MakeUpstream, gateway: MakeGateway):
    a = await fake_upstream("a")
    b = await fake_upstream("b")
    client = await gateway({"routes": routes("model-a", a) + routes("model-b", b)})
    raw = b'{"model": "model-b",   "messages": [{"role": "user", "content": "caf\\u00e9"}], "x": 1.50}'

    resp = await client.post(CHAT, data=raw, headers={"Content-Type": "application/json"})

    assert resp.status == 200
    assert (await resp.json())["upstream"] == "b"
    assert (a.hits, b.hits) == (0, 1)
    assert b.requests[0]["path"] == CHAT and b.requests[0]["body"] == raw  # byte for byte


@pytest.mark.parametrize(
    "path", ["/v1/completions", "/v1/embeddings", "/v1/rerank", "/v1/score", "/v1/responses", "/v1/audio/speech"]
)
async def test_every_proxied_route_passes_through(path: str, fake_upstream: MakeUpstream, gateway: MakeGateway):
    a = await fake_upstream("a")
    client = await gateway({"routes": routes("m", a)})
    resp = await client.post(path + "?api-version=1", json={"model": "m", "input": "hi"})
    assert resp.status == 200
    assert a.requests[0]["path"] == path + "?api-version=1"


async def test_multipart_audio_is_routed_by_its_model_field(fake_upstream: MakeUpstream, gateway: MakeGateway):
    a = await fake_upstream("a")
    client = await gateway({"routes": routes("whisper", a)})
    form = aiohttp.FormData()
    form.add_field("file", b"RIFF" + bytes(5000), filename="a.wav", content_type="audio/wav")
    form.add_field("model", "whisper")

    resp = await client.post("/v1/audio/transcriptions", data=form)

    assert resp.status == 200
    assert a.requests[0]["path"] == "/v1/audio/transcriptions"
    assert a.requests[0]["headers"]["Content-Type"].startswith("multipart/form-data; boundary=")


@pytest.mark.parametrize("path", ["/v1/audio/../../metrics", "/v1/audio/%2e%2e/admin", "/v1/audio/./x"])
async def test_dot_segments_cannot_escape_the_proxied_routes(path: str, fake_upstream: MakeUpstream, gateway: MakeGateway):
    a = await fake_upstream("a")
    client = await gateway({"routes": routes("m", a)})
    port = client.server.port
    assert port is not None
    head = b"POST %s HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n" % path.encode()
    assert (await raw_exchange(port, head)).startswith(b"HTTP/1.1 400 ")
    assert a.hits == 0


def test_form_fields_reads_named_fields_and_skips_files():
    body = (
        b"--XyZ\r\nContent-Disposition: form-data; name=\"file\"; filename=\"model\"\r\n\r\nmodel=bad\r\n"
        b"--XyZ\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\nwhisper-1\r\n"
        b"--XyZ\r\nContent-Disposition: form-data; name=\"stream\"\r\n\r\ntrue\r\n--XyZ--\r\n"
    )
    assert form_fields(body, b"XyZ", (b"model", b"stream")) == {b"model": b"whisper-1", b"stream": b"true"}


async def test_round_robin_spreads_requests_exactly(fake_upstream: MakeUpstream, gateway: MakeGateway):
    a, b, c = [await fake_upstream(n) for n in "abc"]
    client = await gateway({"routes": routes("m", a, b, c), "routing": {"per_model": {"m": "round_robin"}}})
    served = []
    for _ in range(9):
        resp = await client.post(CHAT, json={"model": "m"})
        served.append((await resp.json())["upstream"])
    assert served == list("abcabcabc")


async def test_least_inflight_prefers_the_idle_endpoint(fake_upstream: MakeUpstream, gateway: MakeGateway):
    a = await fake_upstream("a", "stream", chunks=100, delay=0.02)
    b = await fake_upstream("b", "stream", chunks=100, delay=0.02)
    client = await gateway({"routes": routes("m", a, b), "routing": {"policy": "least_inflight"}})

    first = await client.post(CHAT, json={"model": "m", "stream": True})
    await first.content.readany()
    busy = first.headers["X-Upstream"]
    second = await client.post(CHAT, json={"model": "m", "stream": True})
    await second.content.readany()

    assert second.headers["X-Upstream"] != busy
    first.close()
    second.close()


async def test_keeps_upstream_connections_alive(fake_upstream: MakeUpstream, gateway: MakeGateway):
    a = await fake_upstream("a")
    client = await gateway({"routes": routes("m", a)})
    for _ in range(3):
        assert (await client.post(CHAT, json={"model": "m"})).status == 200
    assert len(set(a.peers)) == 1  # one TCP connection, reused


# -- passthrough ------------------------------------------------------------------------------


async def test_headers_hop_by_hop_dropped_request_id_and_upstream_key(fake_upstream: MakeUpstream, gateway: MakeGateway):
    a = await fake_upstream("a")
    client = await gateway({"routes": routes("m", a, api_key="sk-upstream")})

    resp = await client.post(
        CHAT,
        json={"model": "m"},
        headers={"Authorization": "Bearer client-key", "X-Custom": "yes", "Keep-Alive": "timeout=5", "Connection": "keep-alive, X-Hop"},
        skip_auto_headers=("Accept-Encoding",),
    )

    seen = a.requests[0]["headers"]
    assert seen["Authorization"] == "Bearer sk-upstream"
    assert seen["X-Custom"] == "yes"
    assert "Keep-Alive" not in seen and "X-Hop" not in seen
    assert seen["Content-Type"] == "application/json"
    assert "Accept-Encoding" not in seen and "User-Agent" in seen  # the client's, nothing invented
    request_id = resp.headers["X-Request-Id"]
    assert request_id and seen["X-Request-Id"] == request_id
    assert resp.headers.getall("Server") == [resp.headers["Server"]]  # ours only, not duplicated

    assert "X-Ichat-Correlation-Id" not in seen  # the client sent no id of its own


async def test_client_request_id_is_a_correlation_id_never_the_engine_key(fake_upstream: MakeUpstream, gateway: MakeGateway):
    """Two clients reusing one X-Request-Id reach the worker under two different, random ids
    (the engine keys aborts by it: one client must not be able to name another's generation)."""
    a = await fake_upstream("a")
    client = await gateway({"routes": routes("m", a)})

    answers = await asyncio.gather(
        *(client.post(CHAT, json={"model": "m"}, headers={"X-Request-Id": "req-42", "X-Ichat-Correlation-Id": "forged"}) for _ in range(2))
    )

    assert [r.headers["X-Request-Id"] for r in answers] == ["req-42", "req-42"]  # echoed as it came
    sent = [r["headers"] for r in a.requests]
    ids = [h["X-Request-Id"] for h in sent]
    assert "req-42" not in ids and ids[0] != ids[1]
    assert all(len(i) == 24 and int(i, 16) >= 0 for i in ids)  # 96 random bits, hex
    assert [h.getall("X-Ichat-Correlation-Id") for h in sent] == [["req-42"], ["req-42"]]  # the client's forgery dropped


@pytest.mark.parametrize("auth_on", [False, True])
async def test_client_key_reaches_keyless_upstream_only_when_gateway_auth_is_off(
    auth_on: bool, fake_upstream: MakeUpstream, gateway: MakeGateway
):
    a = await fake_upstream("a")
    config: dict[str, Any] = {"routes": routes("m", a)}
    if auth_on:
        config["auth"] = {"api_keys": ["client-key"]}
    await (await gateway(config)).post(CHAT, json={"model": "m"}, headers={"Authorization": "Bearer client-key"})
    assert ("Authorization" in a.requests[0]["headers"]) is not auth_on


async def test_compressed_request_body_goes_upstream_inflated(fake_upstream: MakeUpstream, gateway: MakeGateway):
    a = await fake_upstream("a")
    client = await gateway({"routes": routes("m", a)})
    raw = orjson.dumps({"model": "m", "input": "x" * 1000})
    resp = await client.post(
        "/v1/embeddings", data=gzip.compress(raw), headers={"Content-Encoding": "gzip", "Content-Type": "application/json"}
    )
    assert resp.status == 200 and (await resp.json())["sha256"] == hashlib.sha256(raw).hexdigest()
    assert "Content-Encoding" not in a.requests[0]["headers"]  # the body the upstream got is plain


async def test_compressed_answer_is_relayed_as_is(fake_upstream: MakeUpstream, gateway: MakeGateway):
    a = await fake_upstream("a", "gzip")
    client = await gateway({"routes": routes("m", a)})
    resp = await client.post(CHAT, json={"model": "m"}, headers={"Accept-Encoding": "gzip"})
    assert resp.headers["Content-Encoding"] == "gzip"
    assert await resp.json() == {"upstream": "a"}  # the test client inflates it: bytes arrived intact


async def test_stream_is_relayed_as_it_arrives(fake_upstream: MakeUpstream, gateway: MakeGateway):
    a = await fake_upstream("a", "stream", chunks=3)
    a.hold.clear()  # the upstream sends one chunk, then waits
    client = await gateway({"routes": routes("m", a)})

    resp = await client.post(CHAT, json={"model": "m", "stream": True})
    first = await asyncio.wait_for(resp.content.readany(), 2)  # arrives while the upstream waits
    a.hold.set()
    rest = await resp.read()

    assert resp.headers["Content-Type"] == "text/event-stream"
    assert first == b'data: {"upstream":"a","n":0}\n\n'
    events = (first + rest).split(b"\n\n")
    assert events == [b'data: {"upstream":"a","n":%d}' % i for i in range(3)] + [b"data: [DONE]", b""]


async def test_ten_megabyte_body_arrives_intact(fake_upstream: MakeUpstream, gateway: MakeGateway):
    a = await fake_upstream("a")
    client = await gateway({"routes": routes("m", a)})
    body = b'{"model": "m", "input": "' + b"abcdefghijklmnopqrstuvwxyz0123456789 " * (10 * 2**20 // 37) + b'"}'

    resp = await client.post("/v1/embeddings", data=body, headers={"Content-Type": "application/json"})

    assert resp.status == 200
    assert (await resp.json())["sha256"] == hashlib.sha256(body).hexdigest()


async def test_large_answer_is_relayed_in_pieces_with_its_length(fake_upstream: MakeUpstream, gateway: MakeGateway):
    echo = await fake_upstream("echo", "echo")
    client = await gateway({"routes": routes("m", echo)})
    body = b'{"model": "m", "input": "' + b"y" * (6 * 2**20) + b'"}'

    resp = await client.post("/v1/embeddings", data=body, headers={"Content-Type": "application/json"})

    assert resp.headers["Content-Length"] == str(len(body)) and "Transfer-Encoding" not in resp.headers
    assert hashlib.sha256(await resp.read()).hexdigest() == hashlib.sha256(body).hexdigest()


# -- /v1/models, /health ----------------------------------------------------------------------


async def test_models_lists_routable_pools(fake_upstream: MakeUpstream, gateway: MakeGateway):
    a = await fake_upstream("a")
    client = await gateway({"routes": routes("org/m1", a, a) + routes("m2", a)})
    client.app[TABLE_KEY].get("route:m2:0").routable = False

    listing = await (await client.get("/v1/models")).json()
    assert listing["object"] == "list"
    [card] = listing["data"]
    assert card["id"] == "org/m1" and card["object"] == "model" and card["owned_by"] == "ichat"
    assert card["replicas"] == 2 and card["backends"] == ["openai"] and isinstance(card["created"], int)

    assert (await (await client.get("/v1/models/org/m1")).json()) == card
    resp = await client.get("/v1/models/m2")
    assert resp.status == 404 and (await error_of(resp))["code"] == "model_not_found"


async def test_health(gateway: MakeGateway):
    resp = await (await gateway({})).get("/health")
    assert resp.status == 200 and await resp.json() == {"status": "ok"}


# -- errors -----------------------------------------------------------------------------------


async def test_unknown_model_is_404_naming_the_available_ones(fake_upstream: MakeUpstream, gateway: MakeGateway):
    a = await fake_upstream("a")
    client = await gateway({"routes": routes("alpha", a) + routes("beta", a)})
    resp = await client.post(CHAT, json={"model": "gamma"})
    error = await error_of(resp)
    assert resp.status == 404 and error["code"] == "model_not_found" and error["param"] == "model"
    assert "gamma" in error["message"] and "alpha, beta" in error["message"]


@pytest.mark.parametrize(
    ("body", "content_type", "fragment"),
    [
        (b"{not json", "application/json", "not valid JSON"),
        (b"", "application/json", "not valid JSON"),
        (b"[1, 2]", "application/json", "JSON object"),
        (b'{"messages": []}', "application/json", "model"),
        (b'{"model": 7}', "application/json", "model"),
        (b'{"model": ""}', "application/json", "model"),
        (b"--b\r\nContent-Disposition: form-data; name=\"x\"\r\n\r\n1\r\n--b--\r\n", "multipart/form-data; boundary=b", "model"),
        (b"model=m", "application/x-www-form-urlencoded", "not valid JSON"),
    ],
)
async def test_bad_bodies_are_400(body: bytes, content_type: str, fragment: str, fake_upstream: MakeUpstream, gateway: MakeGateway):
    a = await fake_upstream("a")
    client = await gateway({"routes": routes("m", a)})
    resp = await client.post(CHAT, data=body, headers={"Content-Type": content_type})
    error = await error_of(resp)
    assert resp.status == 400 and error["type"] == "invalid_request_error" and fragment in error["message"]
    assert a.hits == 0


async def test_unknown_route_and_wrong_method_are_openai_shaped(gateway: MakeGateway):
    client = await gateway({})
    resp = await client.get("/v1/nope")
    assert resp.status == 404 and (await error_of(resp))["code"] == "not_found"
    resp = await client.get(CHAT)
    assert resp.status == 405 and "POST" in resp.headers["Allow"]
    await error_of(resp)


async def test_unexpected_exception_is_a_500_without_details(
    fake_upstream: MakeUpstream, gateway: MakeGateway, caplog: pytest.LogCaptureFixture
):
    a = await fake_upstream("a")
    client = await gateway({"routes": routes("m", a)})

    class Broken:
        def select(self, *args: Any) -> Any:
            raise RuntimeError("secret internals")

    client.app[TABLE_KEY]._policies["m"] = Broken()
    resp = await client.post(CHAT, json={"model": "m"})
    error = await error_of(resp)
    assert resp.status == 500 and "secret" not in error["message"]
    assert "secret internals" in caplog.text  # logged server-side, with its traceback


async def test_no_routable_endpoint_is_503_with_retry_after(fake_upstream: MakeUpstream, gateway: MakeGateway):
    a = await fake_upstream("a")
    client = await gateway({"routes": routes("m", a)})
    client.app[TABLE_KEY].get("route:m:0").routable = False
    resp = await client.post(CHAT, json={"model": "m"})
    assert resp.status == 503 and int(resp.headers["Retry-After"]) >= 1
    assert (await error_of(resp))["code"] == "no_healthy_endpoint"


async def test_first_byte_timeout_is_504_and_not_retried(fake_upstream: MakeUpstream, gateway: MakeGateway):
    slow = await fake_upstream("slow", "hang")
    other = await fake_upstream("other")
    client = await gateway(
        {"routes": routes("m", slow, other), "routing": {"policy": "round_robin", "timeouts": {"first_byte_s": 0.3}}}
    )
    start = time.monotonic()
    resp = await client.post(CHAT, json={"model": "m"})
    error = await error_of(resp)
    assert resp.status == 504 and error["code"] == "upstream_timeout"
    assert time.monotonic() - start < 2
    assert other.hits == 0
    assert "127.0.0.1" not in error["message"]


async def test_request_body_over_the_limit_is_413(fake_upstream: MakeUpstream, gateway: MakeGateway):
    a = await fake_upstream("a")
    client = await gateway({"routes": routes("m", a), "routing": {"max_body_mb": 1}})
    resp = await client.post(CHAT, data=b'{"model": "m", "x": "' + b"x" * 2**20 + b'"}')
    assert resp.status == 413 and (await error_of(resp))["code"] == "request_too_large"
    assert a.hits == 0


async def raw_exchange(port: int, head: bytes, body_chunk: bytes = b"", chunks: int = 0) -> bytes:
    """Send a request head, then up to ``chunks`` body chunks while reading the answer."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(head)

    async def send_body() -> None:
        try:
            for _ in range(chunks):
                writer.write(body_chunk)
                await writer.drain()
        except ConnectionError:
            pass  # the gateway answered and hung up: expected

    sender = asyncio.create_task(send_body())
    try:
        return await asyncio.wait_for(reader.read(65536), 10)
    finally:
        sender.cancel()
        writer.close()


async def test_hundred_megabyte_body_is_refused_with_413(fake_upstream: MakeUpstream, gateway: MakeGateway):
    a = await fake_upstream("a")
    client = await gateway({"routes": routes("m", a)})
    port = client.server.port
    assert port is not None
    mb = b"x" * 2**20  # one chunk, sent again and again: no 100 MB in memory

    # Declared up front: refused from the header, before reading the body.
    head = b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n"
    answer = await raw_exchange(port, head % (100 * 2**20), mb, 3)
    assert answer.startswith(b"HTTP/1.1 413 ") and b'"request_too_large"' in answer

    # Streamed without a length (chunked): refused once the limit is crossed.
    head = b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
    answer = await raw_exchange(port, head, b"%x\r\n%s\r\n" % (len(mb), mb), 100)
    assert answer.startswith(b"HTTP/1.1 413 ") and b'"request_too_large"' in answer
    assert a.hits == 0


# -- auth -------------------------------------------------------------------------------------


async def test_auth_on_requires_a_valid_key_on_v1_only(fake_upstream: MakeUpstream, gateway: MakeGateway):
    a = await fake_upstream("a")
    client = await gateway({"routes": routes("m", a), "auth": {"api_keys": ["k1", "k2"]}})

    resp = await client.post(CHAT, json={"model": "m"})
    assert resp.status == 401 and (await error_of(resp))["code"] == "invalid_api_key"
    resp = await client.post(CHAT, json={"model": "m"}, headers={"Authorization": "Bearer nope"})
    assert resp.status == 401
    resp = await client.get("/v1/models", headers={"Authorization": "Basic k1"})
    assert resp.status == 401
    assert a.hits == 0

    resp = await client.post(CHAT, json={"model": "m"}, headers={"Authorization": "Bearer k2"})
    assert resp.status == 200
    assert (await client.get("/v1/models", headers={"Authorization": "bearer k1"})).status == 200
    assert (await client.get("/health")).status == 200


async def test_auth_off_lets_everyone_in(fake_upstream: MakeUpstream, gateway: MakeGateway):
    a = await fake_upstream("a")
    client = await gateway({"routes": routes("m", a)})
    assert (await client.post(CHAT, json={"model": "m"})).status == 200
    assert (await client.get("/v1/models")).status == 200


# -- failures: retries, ejection, broken streams ----------------------------------------------


@pytest.mark.parametrize("failure", ["refused", "reset", "502", "503"])
async def test_failure_before_first_byte_is_retried_elsewhere(
    failure: str, fake_upstream: MakeUpstream, gateway: MakeGateway
):
    bad: FakeUpstream | None = None
    if failure == "reset":
        bad = await fake_upstream("bad", "reset")
    elif failure != "refused":
        bad = await fake_upstream("bad", "status", status=int(failure))
    good = await fake_upstream("good")
    config = {"routes": routes("m", bad or dead_api_base(), good), "routing": {"policy": "round_robin"}}
    client = await gateway(config)

    resp = await client.post(CHAT, json={"model": "m"})

    assert resp.status == 200 and (await resp.json())["upstream"] == "good"
    assert good.hits == 1
    assert bad is None or bad.hits == 1
    assert client.app[TABLE_KEY].get("route:m:0").failures == 1


async def test_retry_budget_is_respected(fake_upstream: MakeUpstream, gateway: MakeGateway):
    bads = [await fake_upstream(f"bad{i}", "status", status=503) for i in range(4)]
    client = await gateway({"routes": routes("m", *bads), "routing": {"retries": 2, "policy": "round_robin"}})

    resp = await client.post(CHAT, json={"model": "m"})

    assert [b.hits for b in bads] == [1, 1, 1, 0]  # one try + two retries, each elsewhere
    error = await error_of(resp)
    assert resp.status == 503 and "bad2 says 503" in error["message"]  # the last answer, relayed


async def test_unreachable_pool_is_502_without_addresses(gateway: MakeGateway):
    dead = [dead_api_base(), dead_api_base()]
    client = await gateway({"routes": routes("m", *dead)})
    resp = await client.post(CHAT, json={"model": "m"})
    error = await error_of(resp)
    assert resp.status == 502 and error["code"] == "upstream_error"
    assert "127.0.0.1" not in error["message"] and "/v1" not in error["message"]


async def test_broken_stream_is_never_retried_and_ends_with_an_error_event(
    fake_upstream: MakeUpstream, gateway: MakeGateway
):
    dying = await fake_upstream("dying", "die_mid_stream")
    good = await fake_upstream("good", "stream")
    client = await gateway({"routes": routes("m", dying, good), "routing": {"policy": "round_robin"}})

    resp = await client.post(CHAT, json={"model": "m", "stream": True})
    body = await asyncio.wait_for(resp.read(), 5)  # a clean end, not a hang

    assert resp.status == 200
    events = body.split(b"\n\n")
    assert events[:2] == [b'data: {"n": 0}', b'data: {"n": 1}']
    error = orjson.loads(events[2].removeprefix(b"data: "))["error"]
    assert error["code"] == "upstream_error" and "127.0.0.1" not in error["message"]
    assert events[3] == b"data: [DONE]"
    assert (dying.hits, good.hits) == (1, 0)


async def test_broken_non_sse_body_is_cut_off_not_ended_cleanly(fake_upstream: MakeUpstream, gateway: MakeGateway):
    dying = await fake_upstream("dying", "die_mid_chunked")
    client = await gateway({"routes": routes("m", dying)})
    resp = await client.post(CHAT, json={"model": "m"})
    with pytest.raises(aiohttp.ClientPayloadError):
        await asyncio.wait_for(resp.read(), 5)


async def test_failing_endpoint_is_ejected_then_probed_back(
    fake_upstream: MakeUpstream, gateway: MakeGateway, clock: FakeClock
):
    flaky = await fake_upstream("flaky", "status", status=503)
    good = await fake_upstream("good")
    client = await gateway(
        {
            "routes": routes("m", flaky, good),
            "routing": {"policy": "round_robin", "circuit_breaker": {"failures": 2, "cooldown_s": 30}},
        }
    )
    endpoint = client.app[TABLE_KEY].get("route:m:0")

    for _ in range(6):
        assert (await client.post(CHAT, json={"model": "m"})).status == 200
    assert flaky.hits == 2  # ejected after its second failure, then left alone
    assert endpoint.ejected_until == clock.now + 30

    clock.now += 29
    await client.post(CHAT, json={"model": "m"})
    assert flaky.hits == 2

    flaky.behaviour, flaky.status = "json", 200  # it recovers; after the cool-down it gets a probe
    clock.now += 1
    served = [(await (await client.post(CHAT, json={"model": "m"})).json())["upstream"] for _ in range(4)]
    assert "flaky" in served and endpoint.failures == 0 and endpoint.ejected_until == 0


async def test_all_ejected_is_503_with_retry_after(fake_upstream: MakeUpstream, gateway: MakeGateway, clock: FakeClock):
    flaky = await fake_upstream("flaky", "status", status=502)
    client = await gateway(
        {"routes": routes("m", flaky), "routing": {"circuit_breaker": {"failures": 1, "cooldown_s": 12}}}
    )
    resp = await client.post(CHAT, json={"model": "m"})
    assert resp.status == 502  # the only endpoint's own answer, relayed

    clock.now += 2
    resp = await client.post(CHAT, json={"model": "m"})
    assert resp.status == 503 and resp.headers["Retry-After"] == "10"
    assert flaky.hits == 1


# -- client disconnect ------------------------------------------------------------------------


@pytest.mark.parametrize("handler_cancellation", [True, False])
async def test_client_disconnect_mid_stream_closes_the_upstream(
    handler_cancellation: bool, fake_upstream: MakeUpstream, gateway: MakeGateway
):
    slow = await fake_upstream("slow", "stream", chunks=500, delay=0.05)
    client = await gateway({"routes": routes("m", slow)}, handler_cancellation=handler_cancellation)

    resp = await client.post(CHAT, json={"model": "m", "stream": True})
    assert (await resp.content.readany()).startswith(b"data: ")
    resp.close()  # the client goes away mid-stream

    await asyncio.wait_for(slow.aborted.wait(), 2)
    endpoint = client.app[TABLE_KEY].get("route:m:0")
    await eventually(lambda: endpoint.inflight == 0)
    assert endpoint.failures == 0  # the client leaving is not the upstream's fault


async def test_client_disconnect_before_first_byte_closes_the_upstream(
    fake_upstream: MakeUpstream, gateway: MakeGateway
):
    queued = await fake_upstream("queued", "hang")
    client = await gateway({"routes": routes("m", queued)})

    request = asyncio.create_task(client.post(CHAT, json={"model": "m"}))
    await eventually(lambda: queued.hits == 1)
    request.cancel()  # the client gives up while the upstream is still thinking

    await asyncio.wait_for(queued.aborted.wait(), 2)
    await eventually(lambda: client.app[TABLE_KEY].get("route:m:0").inflight == 0)
