"""A fake OpenAI upstream that schedules like a continuous-batching engine, in real time.

    python benchmarks/batching_upstream.py --port 9200 [--step-ms 20] [--prefill-us-per-token 8]
        [--budget 4096] [--hit 0.47] [--prompt-tokens 2176] [--cached-tokens 2048]
        [--prefix-cache-tokens 0]

Not an engine and not a test double: a stand-in for the one property of an engine that decides
how least-in-flight routing behaves under a closed loop. One scheduler loop per process, as in
vLLM: every step takes ``step_ms`` plus ``prefill_us_per_token`` for each prompt token it
prefills; a step prefills at most ``budget`` tokens (chunked prefill, running requests first,
then waiting ones in arrival order) and gives every request past its prefill one output token,
sent at once as an SSE ``chat.completion.chunk``. ``GET /stats`` returns how many new requests
each admitting step took in (a burst of arrivals shows as large numbers) and resets them. A request's prompt costs ``prompt_tokens``,
or ``prompt_tokens - cached_tokens`` with probability ``hit`` (a prefix-cache hit). It stops
after ``max_tokens`` tokens (``data: [DONE]``). ``GET /health`` answers 200.

With ``--prefix-cache-tokens N`` the hit is no coin: the request's first message is its shared
prefix (``cached_tokens`` long), and the process keeps an LRU of the prefixes whose KV would fit
in N tokens; a request hits when its prefix is there (an engine's automatic prefix caching, at
the grain of whole prefixes). ``GET /stats`` then also returns ``hits``, ``queries`` and
``distinct_prefixes`` (and
``?reset_cache=1`` empties the cache, as a benchmark resets an engine's prefix cache).

With ``--tokenize-us-per-token T`` a request first waits for one of ``--tokenizer-threads``
tokenizers and holds it ``T`` µs per prompt token before the scheduler sees it: vLLM's renderer
tokenizes in a pool of that many threads, ahead of the scheduler (on the GPU, one thread took
~31 ms for a 6,272-token prompt: ~5 µs a token; README "Where long_prefix's TTFT went").

Used by ``benchmarks/least_inflight_herding.py`` and ``benchmarks/prefix_placement.py``.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import time
from collections import OrderedDict

import orjson
from aiohttp import web


SCHEDULER = web.AppKey("scheduler", object)


class Request:
    __slots__ = ("prefill", "out", "sent", "queue", "done")

    def __init__(self, prefill: int, out: int) -> None:
        self.prefill = prefill
        self.out = out
        self.sent = 0
        self.queue: asyncio.Queue[bytes | None] = asyncio.Queue()
        self.done = False


class Scheduler:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.rng = random.Random(args.seed)
        self.running: list[Request] = []
        self.waiting: list[Request] = []
        self.wake = asyncio.Event()
        self.steps = 0
        #: per step that admitted new requests: how many it admitted (bounded: the last 100k)
        self.admitted: list[int] = []
        #: --prefix-cache-tokens: the prefixes held, oldest use first
        self.prefixes: OrderedDict[str, None] = OrderedDict()
        self.hits = self.queries = 0
        self.seen: set[str] = set()  # distinct prefixes since the last /stats
        #: --tokenizer-threads: the renderer's pool
        self.tokenizers = asyncio.Semaphore(args.tokenizer_threads)

    async def tokenize(self) -> None:
        """Wait for a tokenizer and hold it for the prompt's tokens (nothing when the cost is 0)."""
        a = self.args
        if not a.tokenize_us_per_token:
            return
        async with self.tokenizers:
            await asyncio.sleep(a.prompt_tokens * a.tokenize_us_per_token / 1e6)

    def cached(self, prefix: str) -> bool:
        """Whether the prompt's prefix is cached (and, either way, it is now, as the newest)."""
        a = self.args
        if not a.prefix_cache_tokens:
            return self.rng.random() < a.hit
        self.queries += 1
        self.seen.add(prefix)
        if prefix in self.prefixes:
            self.prefixes.move_to_end(prefix)
            self.hits += 1
            return True
        self.prefixes[prefix] = None
        while len(self.prefixes) * a.cached_tokens > a.prefix_cache_tokens:
            self.prefixes.popitem(last=False)
        return False

    def submit(self, out: int, prefix: str = "") -> Request:
        a = self.args
        prefill = a.prompt_tokens - (a.cached_tokens if self.cached(prefix) else 0)
        request = Request(prefill, out)
        self.waiting.append(request)
        self.wake.set()
        return request

    async def run(self) -> None:
        a = self.args
        chunk = b"data: " + orjson.dumps({"object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {"content": "x"}}]}) + b"\n\n"
        while True:
            if not self.running and not self.waiting:
                self.wake.clear()
                await self.wake.wait()
            budget = a.budget
            prefilled = 0
            plan: list[tuple[Request, int]] = []
            for r in self.running:
                if r.prefill == 0:
                    plan.append((r, 0))
                    budget -= 1
            for r in self.running:
                if r.prefill and budget > 0:
                    k = min(budget, r.prefill)
                    plan.append((r, k))
                    budget -= k
                    prefilled += k
            admitted = 0
            while self.waiting and budget > 0:
                admitted += 1
                r = self.waiting.pop(0)
                self.running.append(r)
                k = min(budget, r.prefill)
                plan.append((r, k))
                budget -= k
                prefilled += k
            if admitted and len(self.admitted) < 100_000:
                self.admitted.append(admitted)
            await asyncio.sleep((a.step_ms * 1000 + a.prefill_us_per_token * prefilled) / 1e6)
            self.steps += 1
            for r, k in plan:
                if k:
                    r.prefill -= k
                    if r.prefill:
                        continue
                r.sent += 1
                r.queue.put_nowait(chunk)
                if r.sent >= r.out:
                    r.queue.put_nowait(None)
                    r.done = True
            self.running = [r for r in self.running if not r.done]


async def chat(request: web.Request) -> web.StreamResponse:
    scheduler: Scheduler = request.app[SCHEDULER]  # type: ignore[assignment]
    body = orjson.loads(await request.read())
    messages = body.get("messages")
    first = messages[0] if isinstance(messages, list) and messages and isinstance(messages[0], dict) else {}
    await scheduler.tokenize()
    job = scheduler.submit(int(body.get("max_tokens") or 16), str(first.get("content")))
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await response.prepare(request)
    try:
        while (piece := await job.queue.get()) is not None:
            await response.write(piece)
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
    finally:
        if not job.done:  # the client left: stop generating for it
            job.out = 0
    return response


async def health(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def stats(request: web.Request) -> web.Response:
    """How many requests each admitting step took in, and the prefix cache's hits and queries,
    since the last call (then reset)."""
    scheduler: Scheduler = request.app[SCHEDULER]  # type: ignore[assignment]
    admitted, scheduler.admitted = scheduler.admitted, []
    counts = {"hits": scheduler.hits, "queries": scheduler.queries, "distinct_prefixes": len(scheduler.seen)}
    scheduler.hits = scheduler.queries = 0
    scheduler.seen = set()
    if request.query.get("reset_cache"):
        scheduler.prefixes.clear()
    return web.json_response({"admitted_per_step": admitted, **counts})


def build_app(args: argparse.Namespace) -> web.Application:
    app = web.Application()
    scheduler = Scheduler(args)

    async def lifecycle(app: web.Application):
        task = asyncio.get_running_loop().create_task(scheduler.run())
        yield
        task.cancel()

    app[SCHEDULER] = scheduler
    app.cleanup_ctx.append(lifecycle)
    app.router.add_post("/v1/chat/completions", chat)
    app.router.add_get("/health", health)
    app.router.add_get("/stats", stats)
    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--step-ms", type=float, default=20.0)
    parser.add_argument("--prefill-us-per-token", type=float, default=8.0)
    parser.add_argument("--budget", type=int, default=4096)
    parser.add_argument("--hit", type=float, default=0.47)
    parser.add_argument("--prompt-tokens", type=int, default=2176)
    parser.add_argument("--cached-tokens", type=int, default=2048)
    parser.add_argument("--prefix-cache-tokens", type=int, default=0, help="an LRU of whole prefixes instead of --hit")
    parser.add_argument("--tokenize-us-per-token", type=float, default=0.0, help="tokenizing before the scheduler (0: free)")
    parser.add_argument("--tokenizer-threads", type=int, default=1, help="tokenizers working at once")
    parser.add_argument("--seed", type=int, default=int(time.time()))
    args = parser.parse_args()
    web.run_app(build_app(args), host="127.0.0.1", port=args.port, print=None, access_log=None)


if __name__ == "__main__":
    main()
