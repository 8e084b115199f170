"""Gateway restart under load: clients send all the time while the gateway is restarted, once
stopped with SIGTERM and once killed with SIGKILL, then started again on the same port with the
same config and state directory.

The cluster: two managed stub workers (``stub``, and ``slow`` whose stub answers after 2 s, to
have requests in flight at the signal: an answer, or a stream of one chunk, after 2 s each), one launched through the admin API (persisted in the
state file), and two registered workers for ``stub``: one on loopback, one on a namespace host
over a veth. Stub engines, because the engine is beside the point: what is measured is the
gateway's restart, and a stub worker restarts in about a second where vLLM takes 30 s (the
real-engine kill -9 adoption is in test_cluster.py).

Checked each time: no registered or managed worker is lost and none runs twice; every client
failure falls inside the restart window (signal -> every worker routable again), whose length
is measured; after SIGTERM, requests in flight at the signal complete.
"""

from __future__ import annotations

import signal
import socket
import threading
import time

import httpx
import orjson
import pytest

from tests.cluster import CLIENT_KEY, Clients, ClusterGateway, stub_worker, worker_processes
from tests.procs import free_port, wait_until

INTERVAL = 1.0
SLOW_S = 2.0
CLIENT_THREADS = 4
IN_FLIGHT = 4
#: a clean stop also stops the managed stub workers (SIGTERM, drain, exit: ~2 s here, more on
#: a loaded machine)
STOP_WORKERS_S = 8.0
#: how long a restarted gateway may take to have every worker back, from its /health
READY_AFTER_UP_S = 15.0


def managed_entry(model: str, port: int, **flags) -> dict:
    return {"model_name": model, "model_path": "stub-model", "backend": "stub", "port": port, "heartbeat_interval": INTERVAL, **flags}


@pytest.fixture(scope="module")
def tmp(e2e_tmp):
    path = e2e_tmp / "restart"
    path.mkdir()
    return path


@pytest.fixture(scope="module")
def cluster(tmp, netns_hosts):
    config = {
        "managed_workers": [managed_entry("stub", free_port()), managed_entry("slow", free_port(), stub_latency=SLOW_S, stub_chunks=1)],
        "registry": {"probe_interval_s": 0.5, "probe_timeout_s": 0.5},
        "supervisor": {"backoff_initial_s": 0.5, "stop_timeout_s": 10},
    }
    state = {"gateway": ClusterGateway(tmp, config, name="restart-gateway"), "procs": []}
    far_host = netns_hosts("rfar")
    try:
        gateway = state["gateway"]
        gateway.wait_up()
        launched = httpx.post(
            gateway.base_url + "/v1/admin/workers/launch", json=managed_entry("stub", free_port()),
            headers=gateway.admin_headers(), timeout=30,
        )  # fmt: skip
        assert launched.status_code == 201, launched.text
        for proc in (
            stub_worker(tmp, gateway, "near", interval=INTERVAL),
            stub_worker(tmp, gateway, "far", host=far_host, interval=INTERVAL),
        ):
            state["procs"].append(proc)
            proc.wait_ready(60)
        wait_until(lambda: all_routable(gateway, 5), 60, interval=0.2, what="five routable workers")
        yield state
    finally:
        for proc in state["procs"]:
            proc.stop()
        if state["gateway"].alive():
            state["gateway"].stop(60)


def all_routable(gateway: ClusterGateway, count: int) -> bool:
    views = gateway.workers()
    return len(views) == count and all(v["routable"] for v in views.values())


def snapshot(gateway: ClusterGateway) -> dict[str, dict]:
    return {wid: {"pid": v["pid"], "source": v["source"], "launched": v.get("launched", False)} for wid, v in gateway.workers().items()}


def slow_requests(gateway: ClusterGateway, n: int) -> tuple[list[threading.Thread], list[int | str]]:
    """``n`` requests to the slow model, each in its own thread; their outcomes land in the list."""
    outcomes: list[int | str] = []

    def one(i: int) -> None:
        body = {"model": "slow", "prompt": "Hi", "max_tokens": 4, "stream": i % 2 == 1}
        try:
            resp = httpx.post(gateway.base_url + "/v1/completions", json=body, headers={"Authorization": f"Bearer {CLIENT_KEY}"}, timeout=30)
            ok = resp.status_code == 200 and (not body["stream"] or resp.text.rstrip().endswith("data: [DONE]"))
            outcomes.append(resp.status_code if ok else f"{resp.status_code}: {resp.text[:200]}")
        except httpx.HTTPError as exc:
            outcomes.append(repr(exc))

    threads = [threading.Thread(target=one, args=(i,), daemon=True) for i in range(n)]
    for thread in threads:
        thread.start()
    return threads, outcomes


def half_sent_request(port: int) -> tuple[socket.socket, bytes]:
    """A request whose head and first body bytes are sent now; returns the socket and the rest."""
    body = orjson.dumps({"model": "stub", "prompt": "Hi", "max_tokens": 4})
    head = (
        f"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAuthorization: Bearer {CLIENT_KEY}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    sock.sendall(head.encode() + body[:5])
    return sock, body[5:]


def refuses_connections(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except ConnectionRefusedError:
        return True
    return False


def finish_half_sent(sock: socket.socket, rest: bytes, port: int) -> bytes:
    """Send the rest of the body once the gateway stopped listening; the whole answer."""
    wait_until(lambda: refuses_connections(port), 10, interval=0.02, what="the gateway stopped listening")
    sock.sendall(rest)
    answer = b""
    with sock:
        while chunk := sock.recv(65536):  # the draining gateway closes the connection after answering
            answer += chunk
    return answer


def restart(state: dict, tmp, sig: signal.Signals) -> dict[str, float]:
    """Signal the gateway with clients running, start it again, and measure the window."""
    old: ClusterGateway = state["gateway"]
    before = snapshot(old)
    slow_id = next(wid for wid in before if wid.startswith("managed-slow-"))
    with Clients(old.base_url, "stub", CLIENT_THREADS, timeout=30) as clients:
        clients.wait_for(50, 0.0, 15)
        threads, outcomes = slow_requests(old, IN_FLIGHT)
        wait_until(lambda: old.workers()[slow_id]["inflight_via_gateway"] == IN_FLIGHT, 10, interval=0.05, what="slow requests in flight")
        half_sent = half_sent_request(old.port)
        signalled_at = time.monotonic()
        old.popen.send_signal(sig)
        if sig == signal.SIGTERM:
            # its body's end arrives while the gateway drains (the slow requests hold it for ~4 s)
            half_answer = finish_half_sent(*half_sent, old.port)
        else:
            half_sent[0].close()
            half_answer = b""
        code = old.popen.wait(60)
        exited_at = time.monotonic()
        old.stop()
        for thread in threads:
            thread.join(30)
        new = ClusterGateway(tmp, old.config, port=old.port, name=f"restart-gateway-{sig.name}")
        state["gateway"] = new
        new.wait_up()
        up_at = time.monotonic()
        wait_until(lambda: all_routable(new, len(before)), READY_AFTER_UP_S, interval=0.05, what="every worker routable again")
        ready_at = time.monotonic()
        clients.wait_for(50, ready_at, 15)
    results = clients.snapshot()
    failed = [r for r in results if not r[2]]
    figures = {
        "exit_s": exited_at - signalled_at,
        "down_s": up_at - signalled_at,
        "window_s": ready_at - signalled_at,
        "failed": len(failed),
        "requests": len(results),
        "client_outage_s": (max(r[1] for r in failed) - min(r[0] for r in failed)) if failed else 0.0,
    }
    print(f"\n{sig.name}: exit code {code}; " + ", ".join(f"{k}={v:.2f}" if isinstance(v, float) else f"{k}={v}" for k, v in figures.items()))
    print(f"  slow requests in flight at the signal: {outcomes}")
    outside = [r for r in failed if r[0] < signalled_at - 0.1 or r[1] > ready_at]
    assert not outside, f"failures outside the restart window: {outside[:5]}"
    figures["sent_before_signal_failed"] = len([r for r in failed if r[0] < signalled_at - 0.2])

    after = snapshot(new)
    assert set(after) == set(before), "a worker was lost or appeared"
    for wid, view in after.items():
        assert view["source"] == before[wid]["source"] and view["launched"] == before[wid]["launched"], wid
        assert worker_processes(wid) == [view["pid"]], f"{wid} runs {worker_processes(wid)}, registered pid {view['pid']}"
    for wid in ("near", "far"):  # registered workers are not the gateway's: they never restart
        assert after[wid]["pid"] == before[wid]["pid"]
    return {"code": code, "outcomes": outcomes, "half_answer": half_answer, "before": before, "after": after, "views": new.workers(), **figures}


def test_sigterm_restart_finishes_in_flight_requests(cluster, tmp):
    result = restart(cluster, tmp, signal.SIGTERM)
    assert result["code"] == 0
    assert result["outcomes"] == [200] * IN_FLIGHT, "requests in flight at SIGTERM must finish"
    assert result["sent_before_signal_failed"] == 0, "requests sent before SIGTERM must finish"
    # a request whose body was still on the wire at the signal is answered too (aiohttp alone
    # would drop the rest of its body, hold it for the shutdown timeout, then cut it off)
    assert result["half_answer"].startswith(b"HTTP/1.1 200 "), result["half_answer"][:300]
    assert b"\r\nConnection: close\r\n" in result["half_answer"]  # the client takes its next request elsewhere
    # it waited for them (a slow stream takes 2 x SLOW_S), and no longer than that
    assert SLOW_S * 0.5 <= result["exit_s"] <= 2 * SLOW_S + STOP_WORKERS_S
    # a clean stop stops the gateway's own workers; the new gateway starts each exactly once
    for wid, view in result["after"].items():
        if view["source"] == "managed":
            assert view["pid"] != result["before"][wid]["pid"]
            assert result["views"][wid]["adopted"] is False


def test_kill9_restart_adopts_everything(cluster, tmp):
    result = restart(cluster, tmp, signal.SIGKILL)
    assert result["code"] == -signal.SIGKILL
    # the managed workers outlived the gateway and were adopted, not launched again
    for wid, view in result["after"].items():
        assert view["pid"] == result["before"][wid]["pid"], wid
        if view["source"] == "managed":
            assert result["views"][wid]["adopted"] is True, wid
