"""Soak: many concurrent streams through the gateway for minutes; every stream must complete and
the gateway's memory and open file descriptors must stay flat.

    python benchmarks/soak.py [--streams 1000] [--duration 120] [--chunks 16] [--interval 0.25]
    make test-slow     (runs it through tests/e2e/test_soak.py at 1,000 streams for 2 minutes)

One fake OpenAI upstream (``benchmarks/fake_upstream.py``, events spaced ``--interval`` apart,
so each stream lives ``chunks x interval`` seconds, like an engine emitting tokens), one real
gateway process (``python -m ichat.gateway``: a static route to the fake, auth on), and this
process as the client: ``--streams`` keep-alive connections, each streaming a chat completion
again and again (a closed loop). All on 127.0.0.1.

While it runs, the gateway's resident memory (``VmRSS``) and open file descriptors are read
from ``/proc`` every second. The report compares the steady state at the start (the median of
the samples in the ``--settle`` seconds after warm-up) with the end (the median of the last
``--settle`` seconds), and keeps the largest sample. At the end the clients stop sending and
wait for every stream in flight to end; a stream that does not is counted ``unfinished``.

Checks (``check()``; the exit status is 1 when one fails):
* every stream answered 200 and carried the whole body (the same byte count as the fake sent);
  no connection lost, none unfinished;
* memory: end - start <= max(RSS_GROWTH_MB, RSS_GROWTH_FRACTION x start);
* file descriptors: end - start <= FD_GROWTH, and the largest sample <= start + FD_GROWTH.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import orjson

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from fake_upstream import sse_event  # noqa: E402
from loadgen import LoadConnection, Stats, build_request, percentile  # noqa: E402

KEY = "soak-client-key"
#: allowed growth of the gateway's resident memory from the start of the steady state to its end
RSS_GROWTH_MB = 8.0
RSS_GROWTH_FRACTION = 0.10
#: allowed growth of its open file descriptors (the client connections are a fixed set)
FD_GROWTH = 16
SAMPLE_EVERY_S = 1.0


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def process(argv: list[str], log_path: Path) -> Iterator[subprocess.Popen[bytes]]:
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def wait_http(url: str, proc: subprocess.Popen[bytes], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args[:4]} exited with {proc.returncode}")
        with contextlib.suppress(OSError):
            with urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status == 200:
                    return
        time.sleep(0.1)
    raise TimeoutError(f"{url} not up after {timeout}s")


def sample(pid: int) -> tuple[float, int]:
    """(resident MB, open fds) of a process, from /proc."""
    rss_kb = 0
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                rss_kb = int(line.split()[1])
                break
    return rss_kb / 1024.0, len(os.listdir(f"/proc/{pid}/fd"))


class SoakConnection(LoadConnection):
    """loadgen's keep-alive streaming connection, knowing whether a stream is in flight."""

    in_flight = False

    def send(self) -> None:
        self.in_flight = True
        super().send()

    def _done(self) -> None:
        self.in_flight = False
        super()._done()


async def drive(gateway_url: str, pid: int, streams: int, duration: float, warmup: float, grace: float) -> dict:
    """The client side and the sampler, on one loop."""
    host, port = gateway_url.rsplit("//", 1)[1].split(":")
    request = build_request(host, int(port), "bench", True, KEY)
    loop = asyncio.get_running_loop()
    stats = Stats()
    stats.recording = True
    conns: list[SoakConnection] = []
    for _ in range(streams):
        closed: asyncio.Future[None] = loop.create_future()
        _, proto = await loop.create_connection(lambda: SoakConnection(request, stats, closed), host, int(port))
        conns.append(proto)
    started = time.monotonic()
    for conn in conns:
        conn.send()
    samples: list[tuple[float, float, int]] = []
    while (now := time.monotonic()) < started + warmup + duration:
        rss, fds = sample(pid)
        samples.append((now - started, rss, fds))
        await asyncio.sleep(SAMPLE_EVERY_S)
    stats.running = False  # each connection finishes the stream it is on, then stays quiet
    stop_at = time.monotonic()
    while any(c.in_flight for c in conns) and time.monotonic() < stop_at + grace:
        await asyncio.sleep(0.1)
    drain_s = time.monotonic() - stop_at
    unfinished = sum(1 for c in conns if c.in_flight)
    lost = stats.errors
    for conn in conns:
        if conn.transport is not None:
            conn.transport.close()
    return {
        "samples": samples,
        "completed": len(stats.latency),
        "errors": lost,
        "unfinished": unfinished,
        "statuses": stats.statuses,
        "body_sizes": sorted(stats.body_sizes),
        "elapsed_s": stop_at - started,
        "drain_s": drain_s,
        "latency_p50_ms": percentile(stats.latency, 0.50),
        "latency_p99_ms": percentile(stats.latency, 0.99),
        "latency_max_ms": max(stats.latency, default=0.0) * 1000.0,
        "ttfc_p99_ms": percentile(stats.ttfc, 0.99),
    }


def steady(samples: list[tuple[float, float, int]], start: float, end: float) -> tuple[float, float]:
    """Median (RSS MB, fds) of the samples taken in [start, end) seconds."""
    window = [s for s in samples if start <= s[0] < end] or samples[-1:]
    return statistics.median(s[1] for s in window), statistics.median(s[2] for s in window)


def soak(streams: int, duration: float, chunks: int, interval: float, warmup: float, settle: float, workdir: Path) -> dict:
    upstream_port, gateway_port = free_port(), free_port()
    config = {
        "server_settings": {"host": "127.0.0.1", "port": gateway_port, "log_level": "warning"},
        "routes": [{"model_name": "bench", "api_base": f"http://127.0.0.1:{upstream_port}/v1"}],
        "auth": {"api_keys": [KEY]},
        "state_dir": str(workdir / "state"),
    }
    config_path = workdir / "soak-gateway.yaml"
    config_path.write_bytes(orjson.dumps(config))  # JSON is YAML
    fake = [sys.executable, str(HERE / "fake_upstream.py"), "--port", str(upstream_port), "--chunks", str(chunks), "--interval", str(interval)]
    gateway = [sys.executable, "-m", "ichat.gateway", "--config", str(config_path)]
    with process(fake, workdir / "fake-upstream.log") as fake_proc, process(gateway, workdir / "gateway.log") as gw_proc:
        wait_http(f"http://127.0.0.1:{upstream_port}/health", fake_proc)
        wait_http(f"http://127.0.0.1:{gateway_port}/health", gw_proc)
        idle = sample(gw_proc.pid)
        import uvloop

        grace = chunks * interval * 3 + 10
        result = uvloop.run(drive(f"http://127.0.0.1:{gateway_port}", gw_proc.pid, streams, duration, warmup, grace))
        gateway_alive = gw_proc.poll() is None
    samples = result.pop("samples")
    total = warmup + duration
    rss_start, fds_start = steady(samples, warmup, warmup + settle)
    rss_end, fds_end = steady(samples, total - settle, total + 1)
    after_warmup = [s for s in samples if s[0] >= warmup] or samples
    expected_body = sum(len(sse_event(i)) for i in range(chunks)) + len(b"data: [DONE]\n\n")
    return {
        "streams": streams, "duration_s": duration, "chunks": chunks, "interval_s": interval,
        "stream_s": chunks * interval, "warmup_s": warmup, "settle_s": settle,
        **result,
        "streams_per_s": result["completed"] / result["elapsed_s"],
        "expected_body": expected_body,
        "gateway_alive": gateway_alive,
        "idle_rss_mb": idle[0], "idle_fds": idle[1],
        "rss_start_mb": rss_start, "rss_end_mb": rss_end, "rss_max_mb": max(s[1] for s in after_warmup),
        "fds_start": fds_start, "fds_end": fds_end, "fds_max": max(s[2] for s in after_warmup),
        "rss_bound_mb": max(RSS_GROWTH_MB, RSS_GROWTH_FRACTION * rss_start),
        "fd_bound": FD_GROWTH,
        "series": [(round(t, 1), round(rss, 1), fds) for t, rss, fds in samples],
    }  # fmt: skip


def check(report: dict) -> list[str]:
    """What is wrong with a soak report; empty when it passed."""
    problems = []
    if not report["gateway_alive"]:
        problems.append("the gateway died")
    if report["errors"] or report["unfinished"]:
        problems.append(f"{report['errors']} connection(s) lost, {report['unfinished']} stream(s) unfinished")
    if set(report["statuses"]) != {200}:
        problems.append(f"statuses {report['statuses']}")
    if report["body_sizes"] != [report["expected_body"]]:
        problems.append(f"stream bodies of {report['body_sizes']} bytes, expected {report['expected_body']}")
    if report["completed"] < report["streams"]:
        problems.append(f"only {report['completed']} streams completed")
    growth = report["rss_end_mb"] - report["rss_start_mb"]
    if growth > report["rss_bound_mb"]:
        problems.append(f"memory grew {growth:.1f} MB (bound {report['rss_bound_mb']:.1f} MB)")
    if report["fds_end"] - report["fds_start"] > FD_GROWTH or report["fds_max"] > report["fds_start"] + FD_GROWTH:
        problems.append(f"open fds {report['fds_start']} -> {report['fds_end']} (max {report['fds_max']}, bound +{FD_GROWTH})")
    return problems


def summary(report: dict) -> str:
    r = report
    return (
        f"soak: {r['streams']} concurrent streams x {r['duration_s']:.0f}s (+{r['warmup_s']:.0f}s warm-up), "
        f"{r['chunks']} events {r['interval_s']}s apart: {r['completed']} streams completed ({r['streams_per_s']:.0f}/s), "
        f"{r['errors']} lost, {r['unfinished']} unfinished; latency p50 {r['latency_p50_ms']:.0f} ms, "
        f"p99 {r['latency_p99_ms']:.0f} ms, max {r['latency_max_ms']:.0f} ms\n"
        f"gateway RSS {r['idle_rss_mb']:.1f} MB idle, {r['rss_start_mb']:.1f} -> {r['rss_end_mb']:.1f} MB "
        f"(max {r['rss_max_mb']:.1f}, bound +{r['rss_bound_mb']:.1f}); open fds {r['idle_fds']} idle, "
        f"{r['fds_start']:.0f} -> {r['fds_end']:.0f} (max {r['fds_max']}, bound +{r['fd_bound']})"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--streams", type=int, default=1000, help="concurrent streams (client connections)")
    parser.add_argument("--duration", type=float, default=120.0, help="seconds measured after the warm-up")
    parser.add_argument("--warmup", type=float, default=10.0, help="seconds before the steady state is measured")
    parser.add_argument("--settle", type=float, default=15.0, help="seconds of samples for the start and the end medians")
    parser.add_argument("--chunks", type=int, default=16, help="SSE events per stream")
    parser.add_argument("--interval", type=float, default=0.25, help="seconds between a stream's events")
    parser.add_argument("--json", help="write the whole report (with the per-second series) here")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="ichat-soak-") as tmp:
        report = soak(args.streams, args.duration, args.chunks, args.interval, args.warmup, args.settle, Path(tmp))
    print(summary(report))
    if args.json:
        Path(args.json).write_bytes(orjson.dumps(report, option=orjson.OPT_INDENT_2 | orjson.OPT_NON_STR_KEYS))
    problems = check(report)
    for problem in problems:
        print("FAILED:", problem)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
