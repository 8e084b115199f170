"""Partitions heal without an operator: a worker on another "host" (a network namespace joined
by a veth pair) is cut off, by link down and by dropped packets, while clients keep sending.

The gateway (auth on, listening on all addresses) has two stub workers for one model: ``near``
on loopback and ``far`` on the namespace host, registering over the veth with the worker token.
Stub engines, because the engine is beside the point: the drills are about the network and the
control plane, and a stub answers at once, so every wait measured is the gateway's. Heartbeats every second;
probes every 0.5 s with a 0.5 s timeout, two failures to eject.

Measured per drill (printed, and bounded by the asserts): time to eject, the worst request
wait while cut (no longer than the connect timeout: a request waiting on the cut worker is woken
when the probes declare it unhealthy, and re-sent), failed requests, time to heal after the link
is restored.
"""

from __future__ import annotations

import os
import signal
import time

import httpx
import orjson
import pytest

from ichat.logs.sse import SSEParser
from tests.cluster import ADMIN_KEY, Clients, ClusterGateway, stub_worker, worst_wait
from tests.procs import wait_until

INTERVAL = 1.0
PROBE_INTERVAL, PROBE_TIMEOUT, PROBE_FAILURES = 0.5, 0.5, 2
CONNECT_S = 5.0  # the default routing.timeouts.connect_s
TICK_S = 0.25  # ichat.gateway.control.TICK_S: how often the registry applies the clock
#: a cut worker is out once PROBE_FAILURES probes started after the cut have timed out (a probe
#: cycle is the pause plus the timeout), at the next registry tick; plus 1 s for a loaded machine
EJECT_BOUND_S = PROBE_FAILURES * (PROBE_INTERVAL + PROBE_TIMEOUT) + TICK_S + 1.0
#: back once a beat and a probe get through: the beat in flight at the restore may still time out
#: (the worker's beat timeout is one interval, at least 1 s), the next comes within an interval
HEAL_BOUND_S = 2 * INTERVAL + PROBE_INTERVAL + TICK_S
CLIENT_THREADS = 4


@pytest.fixture(scope="module")
def tmp(e2e_tmp):
    path = e2e_tmp / "partitions"
    path.mkdir()
    return path


@pytest.fixture(scope="module")
def cluster(tmp, netns_hosts):
    config = {
        "registry": {"probe_interval_s": PROBE_INTERVAL, "probe_timeout_s": PROBE_TIMEOUT, "probe_failures": PROBE_FAILURES},
        "routing": {"timeouts": {"connect_s": CONNECT_S}},
        "logs": {"ring_lines": 50_000},
    }
    gateway = ClusterGateway(tmp, config, name="partitions-gateway")
    far_host = netns_hosts("far")
    procs = [gateway]
    try:
        gateway.wait_up()
        near = stub_worker(tmp, gateway, "near", interval=INTERVAL)
        procs.append(near)
        far = stub_worker(tmp, gateway, "far", "--stub-log-interval", "0.05", host=far_host, interval=INTERVAL)
        procs.append(far)
        near.wait_ready(60)
        far.wait_ready(60)
        wait_until(lambda: gateway.routable("near") and gateway.routable("far"), 10, what="both workers routable")
        yield gateway, far_host, far
    finally:
        for proc in reversed(procs):
            proc.stop()


def log_lines(gateway: ClusterGateway, worker_id: str) -> list[dict]:
    """Every line of the gateway's mirror of the worker's log."""
    resp = httpx.get(
        f"{gateway.base_url}/v1/logs/stream/{worker_id}", params={"tail": 100_000, "follow": "false"},
        headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=30,
    )  # fmt: skip
    assert resp.status_code == 200, resp.text
    return [orjson.loads(e.data) for e in SSEParser().feed(resp.content) if e.event == "log"]


def stub_numbers(lines: list[dict]) -> list[int]:
    """The stub engine child's line numbers (it prints ``stub engine line N`` every 50 ms)."""
    return [int(l["line"].rsplit(" ", 1)[1]) for l in lines if l["line"].startswith("stub engine line ")]


def assert_log_whole(gateway: ClusterGateway, worker_id: str, since: float) -> None:
    """The mirror caught up past ``since`` (a wall-clock time) with every line once, no gap."""
    wait_until(
        lambda: any(l["ts"] > since + 1 for l in log_lines(gateway, worker_id) if l["line"].startswith("stub engine line ")),
        60, interval=0.2, what="log lines written after the link came back",
    )  # fmt: skip
    lines = log_lines(gateway, worker_id)
    numbers = stub_numbers(lines)
    assert numbers == list(range(numbers[0], numbers[-1] + 1)), "log lines lost or repeated"
    assert not [l for l in lines if l["stream"] == "gateway"], "the gateway marked a gap or a restart"


def drill(gateway: ClusterGateway, cut, restore, *, label: str, hold_s: float = 3.0) -> dict[str, float]:
    """Cut with clients running, hold, restore; measure, check the log, return the figures."""
    with Clients(gateway.base_url, "stub", CLIENT_THREADS, timeout=60) as clients:
        clients.wait_for(20, 0.0, 15)
        cut_at = time.monotonic()
        cut()
        wait_until(lambda: not gateway.routable("far"), 30, interval=0.05, what="far out of rotation")
        eject_s = time.monotonic() - cut_at
        time.sleep(hold_s)  # traffic goes on while the far host is cut off and out of rotation
        restored_at, restored_wall = time.monotonic(), time.time()
        restore()
        wait_until(lambda: gateway.routable("far"), 30, interval=0.05, what="far back in rotation")
        heal_s = time.monotonic() - restored_at
        clients.wait_for(20, time.monotonic(), 15)
    results = clients.snapshot()
    end = restored_at + heal_s
    window = [r for r in results if r[1] >= cut_at and r[0] <= end]
    failed = [r for r in window if not r[2]]
    figures = {
        "eject_s": eject_s,
        "worst_wait_s": worst_wait(results, cut_at, end),
        "failed": len(failed),
        "requests": len(window),
        "heal_s": heal_s,
    }
    print(f"\n{label}: " + ", ".join(f"{k}={v:.2f}" if isinstance(v, float) else f"{k}={v}" for k, v in figures.items()))
    slow = sorted((r for r in window if r[1] - r[0] > CONNECT_S), key=lambda r: r[0])
    if slow:
        print(f"  {len(slow)} request(s) over {CONNECT_S:g}s, started at cut{slow[0][0] - cut_at:+.2f}s..{slow[-1][0] - cut_at:+.2f}s")
    if failed:
        print("  failures:", failed[:5])
    assert_log_whole(gateway, "far", restored_wall)
    return figures


def test_link_down(cluster):
    gateway, host, _far = cluster
    figures = drill(gateway, host.link_down, host.link_up, label="link down")
    assert figures["eject_s"] <= EJECT_BOUND_S
    assert figures["worst_wait_s"] <= CONNECT_S  # requests waiting on it are woken and re-sent
    assert figures["failed"] == 0
    assert figures["heal_s"] <= HEAL_BOUND_S


def test_dropped_packets(cluster):
    gateway, host, _far = cluster
    figures = drill(gateway, lambda: host.drop_packets("both"), host.restore_packets, label="packets dropped")
    assert figures["eject_s"] <= EJECT_BOUND_S
    assert figures["worst_wait_s"] <= CONNECT_S
    assert figures["failed"] == 0
    assert figures["heal_s"] <= HEAL_BOUND_S


def test_heartbeats_lost_data_path_fine(cluster):
    """Only the worker's connections to the gateway are cut (its beats are lost); the gateway
    still reaches the worker. The gateway takes it out after missed_heartbeats x interval: a
    registration is a lease, and without beats the gateway can no longer vouch for what is at
    that address (its state, a drain under way, the same instance). Probes alone only say that
    something answers /health there. Back with the first beat that gets through."""
    gateway, host, _far = cluster
    figures = drill(gateway, lambda: host.drop_packets("in", dport=gateway.port), host.restore_packets, label="beats lost")
    missed = 3 * INTERVAL  # registry.missed_heartbeats (default 3) x the worker's interval
    # counted from the last beat that arrived, up to one interval before the cut
    assert missed - INTERVAL <= figures["eject_s"] <= missed + TICK_S + 0.5
    assert figures["failed"] == 0
    assert figures["worst_wait_s"] <= CONNECT_S  # the data path was never cut
    assert figures["heal_s"] <= HEAL_BOUND_S


def test_data_path_cut_beats_fine(cluster):
    """Only the gateway's connections to the worker are cut (requests, probes, the log stream);
    its beats still arrive. The probes take it out, and beats do not bring it back: a beat says
    the worker is alive, not that the gateway can reach it. Back with the first probe that
    gets through."""
    gateway, host, _far = cluster
    far_port = int(gateway.workers()["far"]["address"].rsplit(":", 1)[1])
    figures = drill(gateway, lambda: host.drop_packets("out", dport=far_port), host.restore_packets, label="data path cut")
    assert figures["eject_s"] <= EJECT_BOUND_S
    assert figures["worst_wait_s"] <= CONNECT_S
    assert figures["failed"] == 0
    assert figures["heal_s"] <= PROBE_INTERVAL + PROBE_TIMEOUT + TICK_S + 0.5
    assert gateway.workers()["far"]["heartbeat_age_s"] <= 2 * INTERVAL


def test_hung_worker_sigstop(cluster):
    """Not a partition but its twin: the far worker's process is stopped (SIGSTOP) with requests
    in flight. The probes declare it unhealthy; the requests waiting on it are re-sent to the
    other replica; SIGCONT brings it back by itself."""
    gateway, _host, far = cluster
    figures = drill(gateway, lambda: os.kill(far.pid, signal.SIGSTOP), lambda: os.kill(far.pid, signal.SIGCONT), label="SIGSTOP")
    assert figures["eject_s"] <= EJECT_BOUND_S
    assert figures["worst_wait_s"] <= CONNECT_S
    assert figures["failed"] == 0
    assert figures["heal_s"] <= HEAL_BOUND_S


@pytest.mark.slow
def test_long_partition_log_link_resumes_by_last_event_id(cluster):
    """A partition longer than the log link's read timeout (45 s): the gateway gives the link
    up, reconnects by itself once the host is back, resumes with Last-Event-ID, and the mirror
    holds every line once. The worker is not evicted (120 s) and is routable again by itself."""
    from ichat.gateway.logs import READ_TIMEOUT_S

    gateway, host, _far = cluster
    resumed_before = gateway.log_text().count("log stream of worker far resumed after id")
    broken_before = gateway.log_text().count("log stream of worker far (")
    host.link_down()
    cut_at = time.monotonic()
    try:
        wait_until(lambda: not gateway.routable("far"), EJECT_BOUND_S + 1, interval=0.05, what="far out of rotation")
        wait_until(
            lambda: gateway.log_text().count("log stream of worker far (") > broken_before,
            READ_TIMEOUT_S + 30, interval=0.5, what="the log link given up",
        )  # fmt: skip
        given_up_s = time.monotonic() - cut_at
    finally:
        host.link_up()
    restored_at, restored_wall = time.monotonic(), time.time()
    wait_until(lambda: gateway.routable("far"), 30, interval=0.05, what="far back in rotation")
    print(f"\nlong partition: log link given up after {given_up_s:.0f}s; back in rotation {time.monotonic() - restored_at:.2f}s after the link came up")
    assert given_up_s >= READ_TIMEOUT_S - 1
    assert_log_whole(gateway, "far", restored_wall)
    assert gateway.log_text().count("log stream of worker far resumed after id") > resumed_before
