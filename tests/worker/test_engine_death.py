"""A worker whose engine dies while it serves: it says so and exits for its supervisor, with
real processes. The stub engine's child process stands in for an engine rank (no model: the
behaviour under test is the worker's, the real-engine case is in tests/e2e/test_distributed.py)."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import httpx

from tests.gateway_proc import GatewayProc
from tests.procs import WorkerProc, wait_until


def stub_child(worker_pid: int) -> int:
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
                cmd = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            if int(stat.rsplit(") ", 1)[1].split()[1]) == worker_pid and b"stub engine child" in cmd:
                return int(entry.name)
    raise AssertionError("no stub engine child")


def test_dead_engine_child_makes_the_worker_report_error_and_exit_1(tmp_path):
    gateway = GatewayProc(tmp_path, {"registry": {"probe_interval_s": 0.5}})
    worker = None
    try:
        gateway.wait_up()
        worker = WorkerProc(
            tmp_path, "stub-model", "stub", "--stub-log-interval", "0.2", "--gateway-address", gateway.base_url,
            "--heartbeat-interval", "1", "--worker-id", "dying", backend="stub",
        )  # fmt: skip
        worker.wait_ready(30)
        wait_until(lambda: gateway.workers().get("dying", {}).get("routable"), 10, what="routable")

        os.kill(stub_child(worker.pid), signal.SIGKILL)
        assert worker.popen.wait(20) == 1
        log = worker.log_text()
        assert "engine health check failed: RuntimeError: stub engine child exited with -9" in log, log[-2000:]
        # It told the gateway on the way out: no longer routable, then gone.
        wait_until(lambda: not gateway.workers().get("dying", {}).get("routable"), 5, what="out of rotation")
        assert httpx.get(gateway.base_url + "/health", timeout=5).status_code == 200
    finally:
        if worker is not None:
            worker.stop()
        gateway.stop()
