"""Hostile input against a real gateway process: 10,000+ seeded, generated, malformed or
adversarial requests over raw sockets. None may get a 5xx, none may hang, and the gateway's
memory may not grow past a stated bound.

The gateway is the real ``python -m ichat.gateway``; behind its one static route is a fake
OpenAI upstream (tests/gateway/fakes.py ``FakeUpstream`` run as its own process, named so): the
engine is beside the point here, the gateway's handling of what clients send is the point.
Admin and worker credentials are configured, and the generator never produces a launch spec
that validates, so nothing it sends can start a process.

What is generated (``Case.kind``): broken JSON bodies and wrong types on every POST route;
bad framing (conflicting or bogus Content-Length / Transfer-Encoding, bad chunk sizes, bodies
shorter or longer than declared, then a half-close); oversized and malformed request lines and
headers; odd methods, paths and percent-encodings; bad or missing credentials on every route
class; heartbeats and deregistrations with mutated fields (and the right token half the time);
admin calls with the right key and bodies that never validate; TLS and other binary garbage on
the plain port. A case passes when the gateway answers with a status below 500 or closes the
connection, within ``HANG_S`` seconds of the last byte sent.

Seed: ``ICHAT_HOSTILE_SEED`` (default 12); count: ``ICHAT_HOSTILE_CASES`` (default 10,000).
"""

from __future__ import annotations

import asyncio
import collections
import json
import os
import random
import sys
import time
from pathlib import Path

import attrs
import pytest

from tests.gateway_proc import GatewayProc
from tests.procs import Proc, free_port, wait_until

SEED = int(os.environ.get("ICHAT_HOSTILE_SEED", "12"))
CASES = int(os.environ.get("ICHAT_HOSTILE_CASES", "10000"))
CONCURRENCY = 24
HANG_S = 10.0
#: the stated bound: resident memory may grow at most this much between the end of the warm-up
#: (the first 10% of cases, which fill caches and pools) and the end of the run
RSS_GROWTH_BOUND_MB = 48
ADMIN_KEY, WORKER_TOKEN = "hostile-admin-key", "hostile-worker-token"
MODEL = "m"

FAKE_UPSTREAM = """
import sys
from aiohttp import web
from tests.gateway.fakes import FakeUpstream
web.run_app(FakeUpstream("fuzz-fake").app(), host="127.0.0.1", port=int(sys.argv[1]), print=None, access_log=None)
"""


@attrs.frozen
class Case:
    kind: str
    data: bytes
    #: half-close after sending: for requests that stop short of what they declared (a body
    #: shorter than its Content-Length), so the gateway sees the end instead of waiting for more
    shut: bool = False


# -- the generator -------------------------------------------------------------------------------


def dumps(value) -> bytes:
    # the stdlib encoder: it writes what orjson refuses (integers past 64 bits, lone surrogates)
    return json.dumps(value).encode()


def _garbage_json(rng: random.Random) -> bytes:
    choices = [
        b"{", b"}", b"[", b"{\"model\":", b"null", b"\x00\x01\x02", b"{\"model\": \"m\", \"messages\": [",
        b"\xff\xfe\xfd", b"1e999999", b"\"" + b"\\u" * 10, b"{\"a\":" * 2000, b"[" * 5000 + b"]" * 5000,
        b"{\"model\": \"\\ud800\"}", b"NaN", b"{\"model\": 1.5e308}", b"true",
    ]  # fmt: skip
    return b"".join(rng.choice(choices) for _ in range(rng.randint(1, 4)))


def _value(rng: random.Random):
    return rng.choice(
        [None, True, 0, -1, 2**70, 1.5, "", "x" * rng.randint(1, 3000), [], {}, [1, "a"], {"a": {"b": [None]}},
         "\u0000\ud7ff\uffff", "../../etc/passwd", "http://evil.example/x", "route:m:0", "managed-m-8001"]
    )  # fmt: skip


def _chat_body(rng: random.Random) -> dict:
    body = {"model": rng.choice([MODEL, MODEL, "unknown-model", "m/../../x", ""]), "messages": [{"role": "user", "content": "hi"}]}
    for _ in range(rng.randint(0, 3)):
        body[rng.choice(["model", "messages", "stream", "max_tokens", "temperature", "n", "x" * 40])] = _value(rng)
    if rng.random() < 0.2:
        body.pop("model", None)
    return body


def _heartbeat_body(rng: random.Random) -> dict:
    body = {
        "worker_id": f"fz{rng.randint(0, 40)}", "instance_id": f"i{rng.randint(0, 3)}",
        "model_name": f"hb-{rng.randint(0, 5)}", "backend": "fuzz", "host": "127.0.0.1",
        "port": rng.choice([1, 9, 65535]), "state": rng.choice(["ready", "loading", "draining", "error"]),
        "heartbeat_interval": rng.choice([1, 30, 3600]), "load": {"running": 0, "waiting": 0},
    }  # fmt: skip
    for _ in range(rng.randint(0, 3)):
        body[rng.choice(list(body) + ["gpus", "pid", "engine_args", "kinds", "extra"])] = _value(rng)
    if isinstance(body.get("model_name"), str) and not body["model_name"].startswith("hb-"):
        # a model no data-plane case asks for: a registered dead address answering a client's
        # request with 502 would be the gateway doing its job, not a finding
        body["model_name"] = "hb-" + body["model_name"][:50]
    if rng.random() < 0.3:
        body["host"] = rng.choice(["10.0.0.1", "evil.example", "127.0.0.1@evil", "[::1]", "h:1", "a/b", "::1"])
    if rng.random() < 0.2:
        body["worker_id"] = rng.choice(["route:m:0", "managed-m-8001", "", "x" * 300, "a b"])
    return body


def _launch_body(rng: random.Random) -> dict:
    body = {"model_name": "fz", "model_path": "/nonexistent", "port": rng.randint(1, 65535)}
    for _ in range(rng.randint(0, 3)):
        body[rng.choice(["model_name", "gpu_ids", "host", "backend", "extra_args", "tensor_parallel_size"])] = _value(rng)
    body["port"] = rng.choice(["eighty", None, -1, 70000, [], 1.5])  # never a spec that validates
    return body


def _request(method: str, path: str, headers: list[tuple[str, str]], body: bytes | None, *, length: int | None = None) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: gateway"]
    lines += [f"{k}: {v}" for k, v in headers]
    if body is not None:
        lines.append(f"Content-Length: {len(body) if length is None else length}")
    lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8", "surrogateescape") + (body or b"")


def _auth(rng: random.Random, right: str | None) -> list[tuple[str, str]]:
    pick = rng.random()
    if right is not None and pick < 0.5:
        return [("Authorization", f"Bearer {right}")]
    return rng.choice(
        [[], [("Authorization", "Bearer")], [("Authorization", "Basic eDp5")], [("Authorization", "Bearer wrong")],
         [("Authorization", "Bearer " + "k" * 5000)], [("Authorization", "bearer  " + (right or "x") + " ")],
         [("X-IChat-Worker-Id", "managed-m-8001"), ("Authorization", "Bearer guess")]]
    )  # fmt: skip


POST_ROUTES = ["/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/rerank", "/v1/score", "/v1/responses", "/v1/audio/x"]
GET_ROUTES = ["/v1/models", f"/v1/models/{MODEL}", "/v1/models/a/b/c", "/health", "/metrics", "/v1/admin/workers",
              "/v1/admin/cluster/status", "/v1/admin/cluster/version", "/v1/admin/workers/fz1", "/v1/logs/stream/fz1?follow=false",
              "/v1/logs/stream?follow=false&tail=5", "/v1/logs/stream?follow=false&tail=-1", "/ui", "/nope"]  # fmt: skip


def make_case(rng: random.Random) -> Case:
    kind = rng.choices(
        ["json", "framing", "headers", "method_path", "auth", "worker", "admin", "binary", "valid"],
        weights=[26, 12, 10, 10, 8, 14, 8, 4, 8],
    )[0]
    if kind == "json":
        route = rng.choice(POST_ROUTES)
        body = _garbage_json(rng) if rng.random() < 0.5 else dumps(_chat_body(rng))
        ctype = rng.choice(["application/json", "text/plain", "multipart/form-data; boundary=x", "application/json; charset=latin-1", ""])
        return Case(kind, _request("POST", route, [("Content-Type", ctype)] if ctype else [], body))
    if kind == "valid":
        body = dumps({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "stream": rng.random() < 0.5})
        return Case(kind, _request("POST", "/v1/chat/completions", [("Content-Type", "application/json")], body))
    if kind == "framing":
        body = dumps(_chat_body(rng))
        variant = rng.randrange(8)
        head = "POST /v1/chat/completions HTTP/1.1\r\nHost: g\r\nContent-Type: application/json\r\n"
        if variant == 0:  # shorter than declared, then the client half-closes
            return Case(kind, _request("POST", "/v1/chat/completions", [], body[: len(body) // 2], length=len(body)), shut=True)
        if variant == 1:  # longer than declared: the rest is a second, broken request
            return Case(kind, _request("POST", "/v1/chat/completions", [], body + b"GARBAGE\r\n\r\n", length=len(body)))
        if variant == 2:
            return Case(kind, (head + f"Content-Length: {len(body)}\r\nContent-Length: {len(body) + 5}\r\n\r\n").encode() + body)
        if variant == 3:
            return Case(kind, (head + f"Content-Length: {len(body)}\r\nTransfer-Encoding: chunked\r\n\r\n").encode() + body)
        if variant == 4:
            return Case(kind, (head + "Transfer-Encoding: chunked\r\n\r\n").encode() + rng.choice([b"zz\r\n", b"-1\r\n", b"ffffffffffffffffff\r\n", b"5\r\nab\r\n0\r\n\r\n"]), shut=True)
        if variant == 5:
            return Case(kind, (head + f"Content-Length: {rng.choice(['-1', 'abc', '1e3', '99999999999999999999', ' 5'])}\r\n\r\n").encode() + body)
        if variant == 6:
            return Case(kind, (head + "Transfer-Encoding: gzip, chunked\r\n\r\n").encode() + b"3\r\nabc\r\n0\r\n\r\n")
        return Case(kind, (head + "Transfer-Encoding: chunked\r\n\r\n").encode() + b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body))
    if kind == "headers":
        variant = rng.randrange(6)
        if variant == 0:
            return Case(kind, _request("GET", "/v1/models", [("X-Big", "a" * rng.choice([9000, 70000]))], None))
        if variant == 1:
            return Case(kind, _request("GET", "/v1/models", [(f"X-H{i}", "v") for i in range(rng.choice([120, 500]))], None))
        if variant == 2:
            return Case(kind, b"GET /v1/models HTTP/1.1\r\nHost: g\r\nBad Header: x\r\nX: \x00\x7f\r\n\r\n")
        if variant == 3:
            return Case(kind, b"GET /v1/models HTTP/1.1\r\nHost: g\r\nX-Folded: a\r\n  continued\r\n\r\n")
        if variant == 4:
            return Case(kind, b"GET /v1/models HTTP/1.1\nHost: g\n\n")
        return Case(kind, _request("POST", "/v1/chat/completions", [("Content-Type", "application/json"), ("Content-Encoding", "gzip")], b"\x1f\x8b\x08garbage"))
    if kind == "method_path":
        method = rng.choice(["GET", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD", "TRACE", "CONNECT", "FOO", "G\x00T", "get"])
        path = rng.choice(
            ["/v1/chat/completions", "/v1/%61dmin/workers", "/v1/chat/../admin/workers", "//v1//admin/workers", "/v1/admin/workers/%00",
             "/" + "a" * rng.choice([100, 9000, 20000]), "/v1/models/" + "%ff" * 50, "*", "http://evil.example/v1/models",
             "/v1/models?" + "a=b&" * 500, "/v1/workers/heartbeat", "/v1/logs/stream/../../x", "/ui/../v1/admin/workers"]
        )  # fmt: skip
        version = rng.choice(["HTTP/1.1", "HTTP/1.0", "HTTP/2.0", "HTTP/9", "FOO"])
        return Case(kind, f"{method} {path} {version}\r\nHost: g\r\nConnection: close\r\n\r\n".encode("utf-8", "surrogateescape"))
    if kind == "auth":
        if rng.random() < 0.5:
            return Case(kind, _request("GET", rng.choice(GET_ROUTES), _auth(rng, ADMIN_KEY), None))
        return Case(kind, _request("POST", rng.choice(POST_ROUTES), _auth(rng, None), dumps(_chat_body(rng))))
    if kind == "worker":
        if rng.random() < 0.8:
            beat = _heartbeat_body(rng)
            # Only loopback addresses may get the right token: a registered address is dialled
            # (probes, log streams), and tests send traffic to this machine only.
            token = WORKER_TOKEN if beat.get("host") in ("127.0.0.1", "::1", "localhost") else None
            body = dumps(beat) if rng.random() < 0.85 else _garbage_json(rng)
            return Case(kind, _request("POST", "/v1/workers/heartbeat", _auth(rng, token), body))
        body = dumps(rng.choice([{"worker_id": f"fz{rng.randint(0, 40)}"}, {"worker_id": "route:m:0", "instance_id": "i0"},
                                        {"worker_id": f"fz{rng.randint(0, 40)}", "instance_id": _value(rng)}, [1]]))  # fmt: skip
        return Case(kind, _request("POST", "/v1/workers/deregister", _auth(rng, WORKER_TOKEN), body))
    if kind == "admin":
        variant = rng.randrange(4)
        headers = _auth(rng, ADMIN_KEY)
        if variant == 0:
            body = dumps(_launch_body(rng)) if rng.random() < 0.8 else _garbage_json(rng)
            return Case(kind, _request("POST", "/v1/admin/workers/launch", headers, body))
        if variant == 1:
            return Case(kind, _request("DELETE", rng.choice(["/v1/admin/workers/nobody", "/v1/admin/workers/route:m:0", "/v1/admin/workers/%2e%2e"]), headers, None))
        if variant == 2:
            return Case(kind, _request("GET", rng.choice(["/v1/admin/workers/" + "x" * 3000, "/v1/logs/stream/nobody", "/v1/logs/stream?source=evil&follow=false"]), headers, None))
        return Case(kind, _request("POST", "/v1/admin/config/reload", headers, b"" if rng.random() < 0.5 else _garbage_json(rng)))
    # binary: a TLS ClientHello, random bytes, or an HTTP/2 preface on the plain port
    return Case(kind, rng.choice([
        bytes.fromhex("16030100a5010000a10303") + rng.randbytes(150),
        rng.randbytes(rng.randint(1, 4000)),
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + rng.randbytes(50),
    ]))  # fmt: skip


# -- the client ----------------------------------------------------------------------------------


async def run_case(port: int, case: Case) -> tuple[str, int | None]:
    """("answered", status) | ("closed", None) | ("hang", None)."""
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), HANG_S)
    except (OSError, asyncio.TimeoutError):
        return "hang", None
    try:
        try:
            writer.write(case.data)
            await asyncio.wait_for(writer.drain(), HANG_S)
            if case.shut and writer.can_write_eof():
                writer.write_eof()
        except (ConnectionError, OSError):
            pass  # the gateway may refuse to read a huge request: the answer tells
        try:
            line = await asyncio.wait_for(reader.readline(), HANG_S)
        except asyncio.TimeoutError:
            return "hang", None
        except (ConnectionError, OSError):
            return "closed", None
        if not line:
            return "closed", None
        parts = line.split()
        if len(parts) >= 2 and parts[0].startswith(b"HTTP/") and parts[1].isdigit():
            return "answered", int(parts[1])
        return "answered", -1  # not HTTP at all: counted as a failure below
    finally:
        writer.close()


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("hostile")
    upstream_port = free_port()
    upstream = Proc([sys.executable, "-c", FAKE_UPSTREAM, str(upstream_port)], tmp / "fake-upstream.log")
    gateway = None
    try:
        import httpx

        wait_until(lambda: httpx.post(f"http://127.0.0.1:{upstream_port}/v1/x", timeout=2).status_code == 200, 20, what="fake upstream")
        gateway = GatewayProc(
            tmp,
            {
                "routes": [{"model_name": MODEL, "api_base": f"http://127.0.0.1:{upstream_port}/v1"}],
                "auth": {"admin_key": ADMIN_KEY, "worker_token": WORKER_TOKEN},
                "routing": {"max_body_mb": 1, "timeouts": {"connect_s": 2, "first_byte_s": 5, "total_s": 20}},
                "registry": {"probe_interval_s": 5},
                "server_settings": {"log_level": "warning"},
            },
        )
        gateway.wait_up()
        yield gateway, upstream
    finally:
        if gateway is not None:
            gateway.stop()
        upstream.stop()


async def test_hostile_requests_get_no_5xx_no_hang_and_bounded_memory(stack):
    gateway, _upstream = stack
    rng = random.Random(SEED)
    cases = [make_case(rng) for _ in range(CASES)]
    outcomes: collections.Counter[tuple[str, str]] = collections.Counter()
    statuses: collections.Counter[int] = collections.Counter()
    failures: list[tuple[Case, str, int | None]] = []
    warm_rss: list[float] = []
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(len(cases)):
        queue.put_nowait(i)
    started = time.monotonic()

    async def worker() -> None:
        while True:
            try:
                i = queue.get_nowait()
            except asyncio.QueueEmpty:
                return
            if i == len(cases) // 10:
                warm_rss.append(rss_mb(gateway.pid))
            case = cases[i]
            outcome, status = await run_case(gateway.port, case)
            outcomes[(case.kind, outcome)] += 1
            if status is not None:
                statuses[status] += 1
            if outcome == "hang" or (status is not None and (status >= 500 or status < 100)):
                failures.append((case, outcome, status))

    await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
    elapsed = time.monotonic() - started
    end_rss = rss_mb(gateway.pid)
    growth = end_rss - warm_rss[0]
    print(
        f"\n{len(cases)} hostile cases (seed {SEED}) in {elapsed:.1f}s; statuses {dict(sorted(statuses.items()))}; "
        f"RSS {warm_rss[0]:.1f} -> {end_rss:.1f} MB (growth {growth:+.1f} MB, bound {RSS_GROWTH_BOUND_MB} MB)"
    )
    print("outcomes by kind:", dict(sorted(outcomes.items())))
    assert not failures, [(f.kind, outcome, status, f.data[:200]) for f, outcome, status in failures[:10]]
    assert growth < RSS_GROWTH_BOUND_MB
    assert gateway.alive()
    log = gateway.log_text()
    assert "Traceback" not in log and "unhandled error" not in log, log[-3000:]
    # and it still serves
    ok = await run_case(gateway.port, Case("valid", _request("POST", "/v1/chat/completions", [("Content-Type", "application/json")],
                                                               dumps({"model": MODEL, "messages": []}))))  # fmt: skip
    assert ok == ("answered", 200)
