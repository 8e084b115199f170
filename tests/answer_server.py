"""A fake OpenAI upstream, run as its own process, that answers with a body of the size asked for.

    python tests/answer_server.py --port P [--tls-cert C --tls-key K]

``POST /v1/...`` with ``{"model": ..., "answer_bytes": N}`` answers a JSON object of exactly
``N`` bytes with a ``Content-Length`` (its ``"fill"`` field is padding, its ``"sha256"``
field names the padding's digest so a client can check it arrived intact). With
``--tls-cert`` it serves HTTPS, which makes the gateway use its aiohttp fallback instead of
its own keep-alive client. ``GET /health`` answers 200. A test double: it never fails on purpose.
"""

from __future__ import annotations

import argparse
import hashlib
import ssl

import orjson
from aiohttp import web


def answer_of(size: int) -> bytes:
    """A JSON object of exactly ``size`` bytes (at least 100)."""
    skeleton = orjson.dumps({"object": "test.answer", "sha256": "0" * 64, "fill": ""})
    fill = (b"0123456789abcdef" * (size // 16 + 1))[: max(0, size - len(skeleton))]
    body = orjson.dumps({"object": "test.answer", "sha256": hashlib.sha256(fill).hexdigest(), "fill": fill.decode()})
    assert len(body) == max(size, len(skeleton))
    return body


async def handle(request: web.Request) -> web.Response:
    body = orjson.loads(await request.read())
    return web.Response(body=answer_of(int(body["answer_bytes"])), content_type="application/json")


async def health(request: web.Request) -> web.Response:
    return web.Response(body=b'{"status":"ok"}', content_type="application/json")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--tls-cert")
    parser.add_argument("--tls-key")
    args = parser.parse_args()
    context = None
    if args.tls_cert:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(args.tls_cert, args.tls_key)
    app = web.Application(client_max_size=2**20)
    app.router.add_post("/v1/{tail:.*}", handle)
    app.router.add_get("/health", health)
    web.run_app(app, host="127.0.0.1", port=args.port, ssl_context=context, print=None)


if __name__ == "__main__":
    main()
