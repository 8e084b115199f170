"""Drill: a worker hangs (SIGSTOP) with requests in flight, real processes end to end.

A real gateway process and two real worker processes on the stub engine (the engine is beside
the point: what matters is a process that stops answering with connections open), registering
with 1 s heartbeats and probed every 0.5 s. Streams are started on both workers, then plain
requests, then one worker is frozen. Requests on it that have no byte yet must be re-sent to
the other worker as soon as the registry declares it unhealthy (not after ``first_byte_s``,
600 s), and its streams must end at that moment with the SSE error event.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from tests.gateway_proc import GatewayProc
from tests.procs import WorkerProc, wait_until

LATENCY_S = 2.0  # the stub's delay before an answer and between stream chunks
FIRST_BYTE_S = 600.0  # the default: the bound a hung worker used to hold requests for


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[tuple[GatewayProc, list[WorkerProc]]]:
    config = {
        "routing": {"policy": "round_robin", "timeouts": {"first_byte_s": FIRST_BYTE_S}},
        "registry": {"probe_interval_s": 0.5, "probe_timeout_s": 0.5, "probe_failures": 2},
    }
    gateway = GatewayProc(tmp_path, config)
    workers: list[WorkerProc] = []
    try:
        gateway.wait_up()
        for name in ("a", "b"):
            workers.append(
                WorkerProc(
                    tmp_path, "stub-model", "stub", "--worker-id", name, "--gateway-address", gateway.base_url,
                    "--heartbeat-interval", "1", "--stub-latency", str(LATENCY_S), "--stub-chunks", "3", backend="stub",
                )  # fmt: skip
            )
        for worker in workers:
            worker.wait_ready(30)
        gateway.wait_routable("stub", 2, 30)
        yield gateway, workers
    finally:
        for worker in workers:
            try:
                os.kill(worker.pid, signal.SIGCONT)
            except ProcessLookupError:
                pass
            worker.stop()
        gateway.stop()


def inflight(gateway: GatewayProc) -> dict[str, int]:
    return {wid: view["inflight_via_gateway"] for wid, view in gateway.workers().items()}


async def stream(client: httpx.AsyncClient, started: asyncio.Event, results: list[dict[str, Any]]) -> None:
    body = {"model": "stub", "messages": [{"role": "user", "content": "hi"}], "stream": True}
    events: list[Any] = []
    async with client.stream("POST", "/v1/chat/completions", json=body) as resp:
        async for line in resp.aiter_lines():
            if line.startswith("data: "):
                payload = line[6:]
                events.append(payload if payload == "[DONE]" else orjson.loads(payload))
                started.set()
    results.append({"kind": "stream", "events": events, "ended": time.monotonic()})


async def plain(client: httpx.AsyncClient, results: list[dict[str, Any]]) -> None:
    resp = await client.post("/v1/chat/completions", json={"model": "stub", "messages": [{"role": "user", "content": "hi"}]})
    results.append({"kind": "plain", "status": resp.status_code, "ended": time.monotonic()})


async def test_sigstopped_worker_releases_its_requests_when_declared_unhealthy(cluster) -> None:
    gateway, (worker_a, _) = cluster
    results: list[dict[str, Any]] = []
    async with httpx.AsyncClient(base_url=gateway.base_url, timeout=httpx.Timeout(60.0)) as client:
        started = [asyncio.Event() for _ in range(4)]
        tasks = [asyncio.ensure_future(stream(client, ev, results)) for ev in started]
        await asyncio.wait_for(asyncio.gather(*(ev.wait() for ev in started)), 30)  # every stream has its first event
        tasks += [asyncio.ensure_future(plain(client, results)) for _ in range(4)]
        await asyncio.to_thread(wait_until, lambda: inflight(gateway) == {"a": 4, "b": 4}, 10, 0.05, "4 requests on each worker")

        os.kill(worker_a.pid, signal.SIGSTOP)
        frozen = time.monotonic()
        await asyncio.to_thread(wait_until, lambda: not gateway.workers()["a"]["routable"], 10, 0.05, "a out of rotation")
        declared = time.monotonic() - frozen
        await asyncio.wait_for(asyncio.gather(*tasks), 30)

    plains = [r for r in results if r["kind"] == "plain"]
    streams = [r for r in results if r["kind"] == "stream"]
    broken = [r for r in streams if isinstance(r["events"][-2], dict) and "error" in r["events"][-2]]
    whole = [r for r in streams if r not in broken]
    worst = max(r["ended"] for r in results) - frozen
    worst_resent = max(r["ended"] for r in plains) - frozen
    print(
        f"\nSIGSTOP -> declared unhealthy in {declared:.2f}s; re-sent requests done within {worst_resent:.2f}s; "
        f"broken streams ended within {max(r['ended'] for r in broken) - frozen:.2f}s; worst wait {worst:.2f}s"
    )
    assert [r["status"] for r in plains] == [200] * 4  # the two on the frozen worker were re-sent
    assert len(broken) == 2 and len(whole) == 2
    for r in broken:
        assert r["events"][-1] == "[DONE]" and r["events"][-2]["error"]["code"] == "upstream_error"
        assert r["ended"] - frozen < declared + 1.5  # ended when the worker was declared, not later
    for r in whole:
        assert r["events"][-1] == "[DONE]" and len(r["events"]) == 4
    assert worst_resent < declared + LATENCY_S + 2.0
    assert worst < 20 < FIRST_BYTE_S
