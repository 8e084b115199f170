"""A fast fake OpenAI upstream for benchmarks: raw asyncio protocol on uvloop, canned answers.

    python benchmarks/fake_upstream.py --port 9100 [--chunks 64] [--interval 0]

It must never be the bottleneck of a benchmark, so it does the least an HTTP/1.1 server can:
it frames requests by ``Content-Length`` (keep-alive, pipelining-safe), looks for
``"stream": true`` in the body with a byte search, and answers with pre-built bytes.

* ``GET /health``: ``{"status":"ok"}`` (all the SGLang router needs from a worker).
* ``POST /v1/...``: a chat completion JSON body with a ``Content-Length``; with ``"stream": true``
  in the body, an SSE stream of ``--chunks`` ``chat.completion.chunk`` events then
  ``data: [DONE]``, chunked-encoded like vLLM's. The headers and the first event go out at
  once; every further event is its own write on a later turn of the event loop, so a proxy
  sees a stream arriving in pieces (as from an engine emitting tokens), not one blob.
  ``--interval S`` spaces the events S seconds apart instead (a soak's long-lived streams).
* anything else: 404.

Not a test double for behaviour (``tests/gateway/fakes.py`` is that): it never fails on purpose.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import socket

import orjson

SERVER = b"fake-openai-upstream"

_CHAT = orjson.dumps(
    {
        "id": "chatcmpl-bench",
        "object": "chat.completion",
        "created": 1700000000,
        "model": "bench",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "Hello! How can I help you today? " * 3},
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 9, "completion_tokens": 30, "total_tokens": 39},
    }
)


def json_response(body: bytes, status: bytes = b"200 OK") -> bytes:
    return (
        b"HTTP/1.1 %s\r\nServer: %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
        % (status, SERVER, len(body), body)
    )


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


def sse_event(i: int) -> bytes:
    event = {
        "id": "chatcmpl-bench",
        "object": "chat.completion.chunk",
        "created": 1700000000,
        "model": "bench",
        "choices": [{"index": 0, "delta": {"content": f"tok{i} "}, "finish_reason": None}],
    }
    return b"data: " + orjson.dumps(event) + b"\n\n"


def stream_parts(chunks: int) -> list[bytes]:
    """The wire bytes of one streamed answer, one element per write."""
    head = (
        b"HTTP/1.1 200 OK\r\nServer: %s\r\nContent-Type: text/event-stream\r\n"
        b"Cache-Control: no-cache\r\nTransfer-Encoding: chunked\r\n\r\n" % SERVER
    )
    parts = [chunk(sse_event(i)) for i in range(chunks)]
    parts[0] = head + parts[0]
    parts.append(chunk(b"data: [DONE]\n\n") + b"0\r\n\r\n")
    return parts


HEALTH = json_response(b'{"status":"ok"}')
CHAT = json_response(_CHAT)
NOT_FOUND = json_response(b'{"error":"not found"}', b"404 Not Found")
_STREAM_TRUE = re.compile(rb'"stream"\s*:\s*true')


class UpstreamProtocol(asyncio.Protocol):
    __slots__ = ("transport", "buf", "loop", "stream", "streaming", "pending", "interval")

    def __init__(self, stream: list[bytes], interval: float = 0.0) -> None:
        self.stream = stream
        self.interval = interval
        self.buf = b""
        self.streaming = False
        self.pending = 0  # requests answered in the middle of a stream wait their turn

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.loop = asyncio.get_running_loop()
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.buf = self.buf + data if self.buf else data
        if not self.streaming:
            self._serve()

    def _serve(self) -> None:
        buf = self.buf
        while True:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                break
            head = buf[:end]
            length = 0
            i = head.lower().find(b"\ncontent-length:")
            if i >= 0:
                j = head.find(b"\r", i + 16)
                length = int(head[i + 16 : j if j >= 0 else len(head)])
            total = end + 4 + length
            if len(buf) < total:
                break
            body = buf[end + 4 : total]
            buf = buf[total:]
            if head.startswith(b"POST /v1/"):
                if _STREAM_TRUE.search(body):
                    self.buf = buf
                    self.streaming = True
                    self._send_stream(0)
                    return
                self.transport.write(CHAT)
            elif head.startswith(b"GET /health"):
                self.transport.write(HEALTH)
            else:
                self.transport.write(NOT_FOUND)
        self.buf = buf

    def _send_stream(self, i: int) -> None:
        transport = self.transport
        if transport is None:
            return
        transport.write(self.stream[i])
        if i + 1 < len(self.stream):
            if self.interval:
                self.loop.call_later(self.interval, self._send_stream, i + 1)
            else:
                self.loop.call_soon(self._send_stream, i + 1)
        else:
            self.streaming = False
            if self.buf:
                self._serve()


async def serve(host: str, port: int, chunks: int, interval: float = 0.0) -> None:
    loop = asyncio.get_running_loop()
    parts = stream_parts(chunks)
    server = await loop.create_server(lambda: UpstreamProtocol(parts, interval), host, port, backlog=1024, reuse_address=True)
    print(f"fake OpenAI upstream on http://{host}:{port}", flush=True)
    async with server:
        await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--chunks", type=int, default=64, help="SSE events per streamed answer (before [DONE])")
    parser.add_argument("--interval", type=float, default=0.0, help="seconds between SSE events (default: next loop turn)")
    args = parser.parse_args()
    import uvloop

    try:
        uvloop.run(serve(args.host, args.port, args.chunks, args.interval))
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
