"""A registered worker that black-holes connections (accepts nothing, answers nothing) costs the
gateway a bounded number of sockets: one health probe at a time, each cut at probe_timeout_s,
and one log-stream connection."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

from ichat.gateway.admin import CONTROL_KEY

from .test_control import beat_for


def open_connections_to(port: int) -> int:
    """Sockets of this machine in ESTABLISHED or SYN_SENT state towards ``port`` (/proc/net/tcp*)."""
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            remote_port = int(fields[2].rsplit(":", 1)[1], 16)
            if remote_port == port and fields[3] in ("01", "02"):
                count += 1
    return count


async def test_a_black_holing_worker_costs_bounded_sockets(gateway):
    hole = socket.socket()
    hole.bind(("127.0.0.1", 0))
    hole.listen(1)  # never accepted: connections sit in the queue, later ones hang in SYN_SENT
    port = hole.getsockname()[1]
    try:
        client = await gateway({"registry": {"probe_interval_s": 0.05, "probe_timeout_s": 0.2, "probe_failures": 2}})

        class Hole:
            api_base = f"http://127.0.0.1:{port}/v1"

        assert (await client.post("/v1/workers/heartbeat", json=beat_for(Hole()))).status == 200
        control = client.app[CONTROL_KEY]
        peak, loop = 0, asyncio.get_running_loop()
        deadline = loop.time() + 2.0  # ~10 probe timeouts
        while loop.time() < deadline:
            peak = max(peak, open_connections_to(port))
            await asyncio.sleep(0.02)
        control.tick()
        view = control.worker_view("w1")
        assert view["state"] == "unhealthy" and not view["routable"]  # the probes did run, and failed
        # one probe at a time (+1 being torn down) and one log-stream connection
        print(f"\npeak sockets towards the black hole: {peak}")
        assert peak <= 3, peak
    finally:
        hole.close()
