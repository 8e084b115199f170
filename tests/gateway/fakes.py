"""Fake upstreams for gateway tests: in-process aiohttp apps that record and misbehave."""

from __future__ import annotations

import asyncio
import gzip
import hashlib
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from multidict import CIMultiDict


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class FakeUpstream:
    """A fake OpenAI-compatible upstream that records every request and misbehaves on demand.

    ``behaviour``: "json" (answer with a JSON body naming itself), "stream" (SSE chunks),
    "status" (answer ``status`` with a JSON error), "reset" (close the connection before any
    byte), "die_mid_stream" (two SSE chunks, then drop the connection), "die_mid_chunked" (the
    same with a non-SSE chunked body), "hang" (never answer), "gzip" (a gzip-encoded body), "echo" (the request body back),
    "story" (a deterministic OpenAI chat/completions stream, see :meth:`_story`).
    """

    def __init__(
        self, name: str, behaviour: str = "json", *, status: int = 200, chunks: int = 3, delay: float = 0.0, die_after: int | None = None
    ):
        self.name = name
        self.behaviour = behaviour
        self.status = status
        self.chunks = chunks
        self.delay = delay
        #: "story": drop the connection after this many content chunks (a worker killed mid-stream)
        self.die_after = die_after
        self.hits = 0
        self.requests: list[dict[str, Any]] = []
        #: set when a request's handler ended without finishing its answer (client went away)
        self.aborted = asyncio.Event()
        #: "stream" sends its first chunk, then waits for this before the rest
        self.hold = asyncio.Event()
        self.hold.set()
        self.peers: list[Any] = []
        #: False: /health hangs, so the gateway's probes time out (a hung worker)
        self.health_ok = True
        self.api_base = ""

    def app(self) -> web.Application:
        app = web.Application(client_max_size=200 * 2**20)
        app.router.add_route("*", "/v1/{tail:.*}", self.handle)
        app.router.add_get("/health", self.health)
        return app

    async def health(self, request: web.Request) -> web.Response:
        """200 while ``health_ok``; otherwise it never answers, as a hung worker (SIGSTOP)."""
        if not self.health_ok:
            await asyncio.sleep(3600)
        return web.Response(body=b'{"status":"ok"}', content_type="application/json")

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.hits += 1
        body = await request.read()
        self.requests.append(
            {
                "method": request.method,
                "path": request.path_qs,
                "headers": CIMultiDict(request.headers),
                "sha256": hashlib.sha256(body).hexdigest(),
                "size": len(body),
                "body": body if len(body) < 65536 else None,
            }
        )
        self.peers.append(request.transport.get_extra_info("peername") if request.transport else None)
        finished = False
        try:
            response = await getattr(self, "_" + self.behaviour)(request, body)
            finished = True
            return response
        finally:
            if not finished:
                self.aborted.set()

    async def _json(self, request: web.Request, body: bytes) -> web.Response:
        answer = {"upstream": self.name, "sha256": hashlib.sha256(body).hexdigest(), "size": len(body)}
        return web.Response(body=orjson.dumps(answer), status=self.status, content_type="application/json")

    async def _echo(self, request: web.Request, body: bytes) -> web.Response:
        return web.Response(body=body, content_type="application/json")

    async def _gzip(self, request: web.Request, body: bytes) -> web.Response:
        payload = gzip.compress(orjson.dumps({"upstream": self.name}))
        return web.Response(body=payload, headers={"Content-Type": "application/json", "Content-Encoding": "gzip"})

    async def _status(self, request: web.Request, body: bytes) -> web.Response:
        error = {"error": {"message": f"{self.name} says {self.status}", "type": "x", "code": self.status, "param": None}}
        return web.Response(body=orjson.dumps(error), status=self.status, content_type="application/json")

    async def _stream(self, request: web.Request, body: bytes) -> web.StreamResponse:
        out = web.StreamResponse(headers={"Content-Type": "text/event-stream", "X-Upstream": self.name})
        await out.prepare(request)
        for i in range(self.chunks):
            if self.delay:
                await asyncio.sleep(self.delay)
            if i == 1:
                await self.hold.wait()
            await out.write(b"data: " + orjson.dumps({"upstream": self.name, "n": i}) + b"\n\n")
        await out.write(b"data: [DONE]\n\n")
        await out.write_eof()
        return out

    async def _die(self, request: web.Request, content_type: str) -> web.StreamResponse:
        out = web.StreamResponse(headers={"Content-Type": content_type})
        await out.prepare(request)
        await out.write(b'data: {"n": 0}\n\n')
        await out.write(b'data: {"n": 1}\n\n')
        await asyncio.sleep(0.05)
        assert request.transport is not None
        request.transport.abort()
        await asyncio.sleep(0.05)
        return out

    async def _die_mid_stream(self, request: web.Request, body: bytes) -> web.StreamResponse:
        return await self._die(request, "text/event-stream")

    async def _die_mid_chunked(self, request: web.Request, body: bytes) -> web.StreamResponse:
        return await self._die(request, "application/x-ndjson")

    async def _story(self, request: web.Request, body: bytes) -> web.StreamResponse:
        """A stand-in for a greedy model: its whole answer is always ``STORY`` (one word a token),
        continued from wherever the request's text leaves off, as vLLM does with
        ``continue_final_message`` (chat) or a longer prompt (completions). Honours
        ``max_tokens`` and ``stream_options``; stops at ``die_after`` chunks when set."""
        req = orjson.loads(body)
        chat = "messages" in req
        if chat:
            last = req["messages"][-1]
            assert not req.get("continue_final_message") or last["role"] == "assistant"
            assert not req.get("continue_final_message") or req.get("add_generation_prompt") is False
            so_far = last["content"] if req.get("continue_final_message") else ""
        else:
            so_far = req["prompt"][len(STORY_PROMPT) :]
        assert STORY_TEXT.startswith(so_far), so_far
        done = len(so_far.split())
        lead = " " if chat and so_far and not so_far.endswith(" ") else ""  # the space the template trimmed
        words = STORY[done:][: req.get("max_tokens") or len(STORY)]
        options = req.get("stream_options") or {}
        out = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await out.prepare(request)
        rid, created = f"chatcmpl-{self.name}-{self.hits}", 1700000000 + self.hits
        prompt_tokens = 7 + done

        def event(choice: dict[str, Any], n: int, usage: bool) -> bytes:
            chunk: dict[str, Any] = {
                "id": rid, "object": "chat.completion.chunk" if chat else "text_completion", "created": created,
                "model": f"served-by-{self.name}", "choices": [choice],
            }  # fmt: skip
            if usage:
                chunk["usage"] = {"prompt_tokens": prompt_tokens, "completion_tokens": n, "total_tokens": prompt_tokens + n}
            return b"data: " + orjson.dumps(chunk) + b"\n\n"

        continuous = bool(options.get("continuous_usage_stats"))
        if chat:
            await out.write(event({"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}, 0, continuous))
        for n, word in enumerate(words, 1):
            if self.die_after is not None and n > self.die_after:
                assert request.transport is not None
                request.transport.abort()
                await asyncio.sleep(0.05)
                return out
            piece = (lead + word + " ") if n == 1 else word + " "
            choice = {"index": 0, "delta": {"content": piece}} if chat else {"index": 0, "text": piece}
            finish = "stop" if done + n == len(STORY) else ("length" if n == len(words) else None)
            choice["finish_reason"] = finish
            await out.write(event(choice, n, continuous))
            await asyncio.sleep(0)
        if options.get("include_usage"):
            usage = {"prompt_tokens": prompt_tokens, "completion_tokens": len(words), "total_tokens": prompt_tokens + len(words)}
            await out.write(b"data: " + orjson.dumps({"id": rid, "object": "x", "created": created, "model": "m", "choices": [], "usage": usage}) + b"\n\n")
        await out.write(b"data: [DONE]\n\n")
        await out.write_eof()
        return out

    async def _reset(self, request: web.Request, body: bytes) -> web.Response:
        assert request.transport is not None
        request.transport.abort()
        await asyncio.sleep(0.05)
        return web.Response()

    async def _hang(self, request: web.Request, body: bytes) -> web.Response:
        await asyncio.sleep(3600)
        return web.Response()


STORY = [f"w{i}" for i in range(20)]
STORY_TEXT = "".join(word + " " for word in STORY)
STORY_PROMPT = "Tell a story:"


class NoCancellationTestServer(TestServer):
    """A test server run like ``web.run_app`` runs by default: handlers are not cancelled when
    the client goes away (aiohttp's TestServer cancels them)."""

    async def _make_runner(self, **kwargs: Any) -> web.AppRunner:
        kwargs["handler_cancellation"] = False
        return web.AppRunner(self.app, **kwargs)


MakeUpstream = Callable[..., Awaitable[FakeUpstream]]
MakeGateway = Callable[..., Awaitable[TestClient]]
