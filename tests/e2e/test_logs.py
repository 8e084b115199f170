"""Workers' logs at the gateway, with real processes: worker registers by heartbeat, the gateway
follows its /logs/stream and serves the lines at /v1/logs/stream/{worker_id}.

The stub engine's child process prints ``stub engine line N`` every 50 ms (a stand-in for an
engine subprocess: the same fd-capture path as vLLM's EngineCore). Its worker binds 127.0.0.2 and
advertises 127.0.0.1, where a TcpRelay forwards to it: the gateway reaches the worker only
through the relay, so the test can cut that link and hold it down while the child keeps
printing. One test starts a real vLLM worker to show an ``(EngineCore`` line at the gateway.
"""

from __future__ import annotations

import os
import signal
import time
from typing import Any

import httpx
import orjson
import pytest

from ichat.logs.sse import SSEParser
from tests.gateway_proc import GatewayProc
from tests.procs import TcpRelay, WorkerProc, free_port, smollm2_path, wait_until

STUB_ID = "stub-logs"


def backlog(base_url: str, path: str, *, missing_ok: bool = False, **params: Any) -> list[dict[str, Any]]:
    """Every line an SSE log endpoint holds (``follow=false``); [] for an unknown worker when
    ``missing_ok`` (not registered yet)."""
    resp = httpx.get(base_url + path, params={"tail": 100_000, "follow": "false", **params}, timeout=30)
    if missing_ok and resp.status_code == 404:
        return []
    assert resp.status_code == 200, resp.text
    return [orjson.loads(e.data) for e in SSEParser().feed(resp.content) if e.event == "log"]


def stub_numbers(lines: list[dict[str, Any]]) -> list[int]:
    return [int(l["line"].rsplit(" ", 1)[1]) for l in lines if l["line"].startswith("stub engine line ")]


@pytest.fixture(scope="module")
def gateway(e2e_tmp):
    proc = GatewayProc(e2e_tmp, {"logs": {"ring_lines": 20_000}}, name="logs-gateway")
    try:
        proc.wait_up()
        yield proc
    finally:
        proc.stop()


@pytest.fixture(scope="module")
def stub(e2e_tmp, gateway):
    port = free_port()
    relay = TcpRelay(("127.0.0.1", port), ("127.0.0.2", port))
    worker = WorkerProc(
        e2e_tmp, "stub-model", "stub", "--stub-log-interval", "0.05",
        "--gateway-address", gateway.base_url, "--heartbeat-interval", "1",
        "--worker-id", STUB_ID, "--advertise-host", "127.0.0.1",
        port=port, host="127.0.0.2", backend="stub",
    )  # fmt: skip
    try:
        worker.wait_ready(60)
        # registered by its heartbeat, and followed
        wait_until(lambda: backlog(gateway.base_url, f"/v1/logs/stream/{STUB_ID}", missing_ok=True), 30)
        yield worker, relay
    finally:
        worker.stop()
        relay.close()


def test_engine_child_lines_reach_the_gateway_in_order(gateway, stub):
    worker, _relay = stub
    with httpx.stream("GET", gateway.base_url + f"/v1/logs/stream/{STUB_ID}", params={"tail": 5}, timeout=30) as resp:
        assert resp.status_code == 200  # the worker registered by heartbeat and the gateway follows it
        parser, events = SSEParser(), []
        for chunk in resp.iter_bytes():
            events += [orjson.loads(e.data) for e in parser.feed(chunk) if e.event == "log"]
            if len(stub_numbers(events)) >= 30:
                break
    numbers = stub_numbers(events)
    assert numbers == list(range(numbers[0], numbers[0] + len(numbers))), "the child's lines, in order"
    ids = [e["id"] for e in events]
    assert ids == list(range(ids[0], ids[0] + len(ids))), "the worker's ids, consecutive"
    assert {e["worker_id"] for e in events} == {STUB_ID}
    assert {e["stream"] for e in events if e["line"].startswith("stub engine line")} == {"stdout"}
    assert all(isinstance(e["ts"], float) for e in events)
    own = {l["id"]: l["line"] for l in backlog(worker.base_url, "/logs/stream")}
    assert all(own[e["id"]] == e["line"] for e in events), "the gateway's ids are the worker's"


def test_cut_links_lose_and_repeat_nothing(gateway, stub):
    worker, relay = stub

    def gateway_last_id() -> int:
        lines = backlog(gateway.base_url, f"/v1/logs/stream/{STUB_ID}", tail=1)
        return lines[-1]["id"] if lines else 0

    def resumes() -> int:
        return gateway.log_text().count(f"log stream of worker {STUB_ID} resumed after id")

    for _ in range(3):
        before = resumes()
        assert relay.cut() >= 1, "the gateway had a link open"
        wait_until(lambda: resumes() > before, 30, what="the gateway to resume")
    before = resumes()
    relay.down()  # the path stays broken for 2 s: ~40 lines wait at the worker
    time.sleep(2)
    relay.up()
    wait_until(lambda: resumes() > before, 60, what="the gateway to resume after the outage")
    target = backlog(worker.base_url, "/logs/stream", tail=1)[-1]["id"]
    wait_until(lambda: gateway_last_id() >= target, 30, what="the gateway to catch up")

    at_gateway = backlog(gateway.base_url, f"/v1/logs/stream/{STUB_ID}")
    at_worker = {l["id"]: l for l in backlog(worker.base_url, "/logs/stream")}
    ids = [l["id"] for l in at_gateway]
    assert ids == list(range(ids[0], ids[-1] + 1)), "no id missing or repeated"
    assert not [l for l in at_gateway if l["stream"] == "gateway"], "no gap: the worker still held every line"
    assert all(at_worker[l["id"]]["line"] == l["line"] and at_worker[l["id"]]["ts"] == l["ts"] for l in at_gateway)
    numbers = stub_numbers(at_gateway)
    assert numbers == list(range(numbers[0], numbers[-1] + 1)) and len(numbers) > 60


def test_managed_worker_killed_keeps_its_last_lines(e2e_tmp):
    port = free_port()
    config = {
        "managed_workers": [
            {
                "model_name": "stub-managed", "model_path": "stub", "backend": "stub", "port": port,
                "heartbeat_interval": 1.0, "extra_args": ["--stub-log-interval", "0.05"],
            }
        ],
        "supervisor": {"backoff_initial_s": 120, "backoff_max_s": 120},  # no restart within this test
    }  # fmt: skip
    gateway = GatewayProc(e2e_tmp, config, name="logs-managed-gateway")
    worker_id = f"managed-stub-managed-{port}"
    path = f"/v1/logs/stream/{worker_id}"
    try:
        gateway.wait_up()
        wait_until(
            lambda: len(stub_numbers(backlog(gateway.base_url, path, missing_ok=True))) >= 20, 60, what="mirrored lines"
        )
        wait_until(lambda: len(stub_numbers(backlog(gateway.base_url, path, source="console"))) >= 20, 10)
        pid = gateway.workers()[worker_id]["pid"]
        seen_live = stub_numbers(backlog(gateway.base_url, path))[-1]
        os.kill(pid, signal.SIGKILL)
        wait_until(lambda: gateway.workers().get(worker_id, {}).get("managed_state") != "ready", 30, what="crash seen")
        console = backlog(gateway.base_url, path, source="console")
        assert stub_numbers(console)[-1] >= seen_live, "the console kept the lines up to the kill"
        assert {l["worker_id"] for l in console} == {worker_id}
        numbers = stub_numbers(console)
        assert numbers == list(range(numbers[0], numbers[-1] + 1))
        mirrored = stub_numbers(backlog(gateway.base_url, path))
        assert mirrored and mirrored[-1] >= seen_live, "the mirror of a dead worker stays readable"
    finally:
        gateway.stop()


def test_vllm_engine_core_lines_reach_the_gateway(e2e_tmp, gateway):
    worker = WorkerProc(
        e2e_tmp, smollm2_path(), "smollm2-logs", "--max-model-len", "2048",
        "--gateway-address", gateway.base_url, "--heartbeat-interval", "1", "--worker-id", "vllm-logs",
    )  # fmt: skip
    path = "/v1/logs/stream/vllm-logs"

    def engine_core_line() -> bool:
        assert worker.alive(), worker.log_text()[-3000:]
        resp = httpx.get(gateway.base_url + path, params={"tail": 100_000, "follow": "false"}, timeout=30)
        if resp.status_code == 404:  # not registered yet
            return False
        return any("(EngineCore" in e.data for e in SSEParser().feed(resp.content) if e.event == "log")

    try:
        wait_until(engine_core_line, 300, interval=1, what="an (EngineCore line at the gateway")
    finally:
        worker.stop()
