"""A cheap HTTP/1.1 load generator: raw asyncio protocols on uvloop, pre-built requests.

    python benchmarks/loadgen.py --url http://127.0.0.1:4000 --mode json --concurrency 32 \
        --duration 5 --warmup 1 [--key KEY]

Prints one JSON object: completed responses, errors, responses/s, latency percentiles and,
for streams, time-to-first-chunk percentiles (all times in milliseconds).

Cheap on purpose, because it shares two cores with what it measures: ``concurrency``
keep-alive connections (TCP_NODELAY), each sending its next request from the callback that
completed the previous one (closed loop, no coroutine per request), one pre-built request for
the whole run, and a response parser that only frames (Content-Length or chunked) and counts
body bytes. Latency is from the request's write to the response's last byte; time to first
chunk is from the write to the first body bytes of the answer.
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import sys
import time
from array import array
from urllib.parse import urlsplit

import orjson

CHAT_PATH = "/v1/chat/completions"


def build_request(host: str, port: int, model: str, stream: bool, key: str | None) -> bytes:
    body = orjson.dumps(
        {
            "model": model,
            "messages": [{"role": "user", "content": "Hello! Say something nice."}],
            "max_tokens": 64,
            "stream": stream,
        }
    )
    auth = b"Authorization: Bearer %s\r\n" % key.encode() if key else b""
    return (
        b"POST %s HTTP/1.1\r\nHost: %s:%d\r\nUser-Agent: ichat-loadgen\r\nAccept: */*\r\n%s"
        b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
        % (CHAT_PATH.encode(), host.encode(), port, auth, len(body), body)
    )


class Stats:
    def __init__(self) -> None:
        self.recording = False
        self.running = True
        self.latency = array("d")
        self.ttfc = array("d")
        self.errors = 0
        self.statuses: dict[int, int] = {}
        self.body_sizes: set[int] = set()


class LoadConnection(asyncio.Protocol):
    """One keep-alive connection sending the same request again and again."""

    def __init__(self, request: bytes, stats: Stats, closed: asyncio.Future[None]) -> None:
        self.request = request
        self.stats = stats
        self.closed = closed
        self.transport: asyncio.Transport | None = None
        self._reset()

    def _reset(self) -> None:
        self.buf = b""
        self.head_done = False
        self.chunked = False
        self.remaining = 0  # Content-Length mode: body bytes still to come
        self.body = 0
        self.t_first = 0.0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        transport.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        if self.stats.running:
            self.stats.errors += 1
        if not self.closed.done():
            self.closed.set_result(None)

    def send(self) -> None:
        self._reset()
        self.t0 = time.perf_counter()
        assert self.transport is not None
        self.transport.write(self.request)

    def data_received(self, data: bytes) -> None:
        if not self.head_done:
            buf = self.buf + data
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                self.buf = buf
                return
            self.head_done = True
            head = buf[:end].lower()
            self.status = int(head[9:12])
            self.buf = b""
            data = buf[end + 4 :]
            if b"\ntransfer-encoding: chunked" in head:
                self.chunked = True
            else:
                i = head.find(b"\ncontent-length:")
                j = head.find(b"\r", i + 16)
                self.remaining = int(head[i + 16 : j if j >= 0 else len(head)])
        if data and not self.t_first:
            self.t_first = time.perf_counter()
        if self.chunked:
            self.buf = self.buf + data if self.buf else data
            if self._chunks_done():
                self._done()
        else:
            self.body += len(data)
            self.remaining -= len(data)
            if self.remaining <= 0:
                self._done()

    def _chunks_done(self) -> bool:
        buf, pos = self.buf, 0
        while True:
            line_end = buf.find(b"\r\n", pos)
            if line_end < 0:
                break
            size = int(buf[pos:line_end].split(b";", 1)[0], 16)
            if size == 0:
                if len(buf) >= line_end + 4:  # no trailers: "0\r\n\r\n"
                    return True
                break
            if len(buf) < line_end + 2 + size + 2:
                break
            self.body += size
            pos = line_end + 2 + size + 2
        self.buf = buf[pos:]
        return False

    def _done(self) -> None:
        now = time.perf_counter()
        stats = self.stats
        if stats.recording:
            stats.latency.append(now - self.t0)
            if self.t_first:
                stats.ttfc.append(self.t_first - self.t0)
            stats.statuses[self.status] = stats.statuses.get(self.status, 0) + 1
            stats.body_sizes.add(self.body)
        if stats.running:
            self.send()


def read_samples(path: str) -> tuple[array, array]:
    """(latencies, times to first chunk) written by ``--samples``."""
    with open(path, "rb") as f:
        counts = array("q")
        counts.fromfile(f, 2)
        latency, ttfc = array("d"), array("d")
        latency.fromfile(f, counts[0])
        ttfc.fromfile(f, counts[1])
    return latency, ttfc


def percentile(values: array, q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000.0


async def run(
    url: str, mode: str, concurrency: int, duration: float, warmup: float, key: str | None, model: str, samples: str | None
) -> dict:
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    request = build_request(host, port, model, mode == "stream", key)
    loop = asyncio.get_running_loop()
    stats = Stats()
    conns = []
    for _ in range(concurrency):
        closed: asyncio.Future[None] = loop.create_future()
        _, proto = await loop.create_connection(lambda: LoadConnection(request, stats, closed), host, port)
        conns.append(proto)
    for conn in conns:
        conn.send()
    await asyncio.sleep(warmup)
    stats.recording = True
    start = time.perf_counter()
    await asyncio.sleep(duration)
    stats.recording = False
    elapsed = time.perf_counter() - start
    stats.running = False
    await asyncio.sleep(0.2)  # let in-flight answers land before closing
    for conn in conns:
        if conn.transport is not None:
            conn.transport.close()
    done = len(stats.latency)
    if samples:
        # Raw samples for merging rounds: latencies then times to first chunk, float64 seconds.
        with open(samples, "wb") as out:
            array("q", [len(stats.latency), len(stats.ttfc)]).tofile(out)
            stats.latency.tofile(out)
            stats.ttfc.tofile(out)
    return {
        "mode": mode,
        "concurrency": concurrency,
        "completed": done,
        "errors": stats.errors,
        "statuses": stats.statuses,
        "body_sizes": sorted(stats.body_sizes),
        "elapsed": elapsed,
        "rps": done / elapsed,
        "p50_ms": percentile(stats.latency, 0.50),
        "p99_ms": percentile(stats.latency, 0.99),
        "ttfc_p50_ms": percentile(stats.ttfc, 0.50),
        "ttfc_p99_ms": percentile(stats.ttfc, 0.99),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", required=True, help="base URL of the server under test")
    parser.add_argument("--mode", choices=("json", "stream"), default="json")
    parser.add_argument("--concurrency", type=int, default=1)
    parser.add_argument("--duration", type=float, default=5.0, help="measured seconds")
    parser.add_argument("--warmup", type=float, default=1.0, help="unmeasured seconds first")
    parser.add_argument("--key", help="send Authorization: Bearer KEY")
    parser.add_argument("--model", default="bench")
    parser.add_argument("--samples", help="also write the raw samples to this file (see run())")
    args = parser.parse_args(argv)
    import uvloop

    result = uvloop.run(
        run(args.url, args.mode, args.concurrency, args.duration, args.warmup, args.key, args.model, args.samples)
    )
    sys.stdout.write(orjson.dumps(result, option=orjson.OPT_NON_STR_KEYS).decode() + "\n")


if __name__ == "__main__":
    main()
