"""``python -m ichat.gateway --config conf/config.yaml [--host H] [--port P]``

Exit codes: 0 after a clean stop (SIGINT/SIGTERM), 2 for a bad config, 1 when the address
cannot be bound.

Why ``handler_cancellation=True``: aiohttp's test server cancels a handler whose client went
away, but ``web.run_app``/``AppRunner`` do not by default. Without it the proxy would notice a
departed client only at its next write to it, which for a request still queued or in prefill
(or any non-streaming one) is when the whole answer is ready: the engine would do all that work
for nobody. With it, the handler is cancelled at once and the proxy's ``finally`` closes the
upstream connection, which the worker sees and aborts on. The proxy keeps every step that must survive
cancellation (in-flight counts, breaker state) synchronous in ``finally`` blocks, and still
handles a failed write for servers run without cancellation.

Why SIGTERM drains before ``runner.cleanup()``: aiohttp's graceful stop first marks every
connection closing, and from then on drops whatever else arrives on it (aiohttp #2298), so a
request whose head had arrived but whose body was still on the wire hangs until the shutdown
timeout and is then cut off. So the gateway stops listening, ends log streams, answers what is
in flight (each answer with ``Connection: close``, so clients take their next request
elsewhere) and only then runs aiohttp's stop.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys

from aiohttp import web

from ichat.config import GatewayConfig, load_config
from ichat.errors import ConfigError
from ichat.gateway.admin import CONTROL_KEY
from ichat.gateway.app import build_app
from ichat.gateway.auth import describe_access
from ichat.gateway.connections import GatewayRunner
from ichat.gateway.progress import show_progress
from ichat.httperrors import install_log_filters
from ichat.logs.sse import STREAMS_KEY

log = logging.getLogger("ichat.gateway")

SHUTDOWN_TIMEOUT_S = 10.0


class Drain:
    """Counts requests in flight; once draining, every answer closes its connection and
    ``idle()`` returns when none is left. One per serve()."""

    def __init__(self) -> None:
        self.inflight = 0
        self.draining = False
        self._idle = asyncio.Event()
        self._idle.set()

    @web.middleware
    async def middleware(self, request: web.Request, handler):  # type: ignore[no-untyped-def]
        self.inflight += 1
        self._idle.clear()
        try:
            return await handler(request)
        finally:
            self.inflight -= 1
            if not self.inflight:
                self._idle.set()

    async def on_response_prepare(self, _request: web.Request, response: web.StreamResponse) -> None:
        if self.draining:
            # This hook runs after aiohttp chose the Connection header, so say it here too.
            response.force_close()
            response.headers["Connection"] = "close"

    async def idle(self, timeout: float) -> bool:
        """Start draining; True when every request in flight finished within ``timeout``."""
        self.draining = True
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except asyncio.TimeoutError:
            return False
        return True


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="ichat-gateway", description="iChat gateway: one OpenAI-compatible endpoint for many workers"
    )
    parser.add_argument("--config", required=True, help="YAML config file (see conf/config.yaml)")
    parser.add_argument("--host", help="listen address (default: server_settings.host)")
    parser.add_argument("--port", type=int, help="listen port (default: server_settings.port; 0 picks a free one)")
    return parser.parse_args(argv)


async def serve(config: GatewayConfig, host: str, port: int, config_path: str | None = None) -> None:
    """Run until SIGINT/SIGTERM. Signal handlers only set an event; this coroutine stops."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)

    app = build_app(config, config_path=config_path)
    drain = Drain()
    app.middlewares.append(drain.middleware)
    app.on_response_prepare.append(drain.on_response_prepare)
    debug = config.server_settings.log_level == "debug"
    runner = GatewayRunner(
        app,
        max_connections=config.limits.max_connections,
        header_timeout_s=config.limits.header_timeout_s,
        handler_cancellation=True,  # see the module docstring
        access_log=log if debug else None,  # an access line per request costs more than routing it
        shutdown_timeout=SHUTDOWN_TIMEOUT_S,
    )
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port, backlog=1024)
        await site.start()
        bound = [a for a in runner.addresses if isinstance(a, tuple)]
        actual_port = bound[0][1] if bound else port
        log.info("iChat gateway listening on http://%s:%d", host, actual_port)
        # One block, so that an operator sees at a glance what this address exposes.
        log.info("%s", "\n".join(describe_access(config.auth, host)))
        # Managed workers run on this machine: they reach us on loopback unless we bound one address.
        local = host if host not in ("0.0.0.0", "::", "") else "127.0.0.1"
        await app[CONTROL_KEY].start_managed(f"http://{local}:{actual_port}")
        async with show_progress(app, f"http://{local}:{actual_port}"):  # ichat.gateway.progress
            await stop.wait()
        log.info("iChat gateway stopping: no new connections; finishing %d request(s) in flight", drain.inflight)
        for running in list(runner.sites):
            await running.stop()
        if STREAMS_KEY in app:
            app[STREAMS_KEY].close_all()  # log streams never end by themselves
        if not await drain.idle(SHUTDOWN_TIMEOUT_S):
            log.warning("%d request(s) still running after %gs; stopping anyway", drain.inflight, SHUTDOWN_TIMEOUT_S)
    finally:
        await runner.cleanup()


def _run(coro: object) -> None:
    try:
        import uvloop
    except ImportError:
        asyncio.run(coro)  # type: ignore[arg-type]
    else:
        uvloop.run(coro)  # type: ignore[arg-type]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # Logging first, so that warnings from loading the config are formatted like the rest.
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    install_log_filters()
    try:
        config = load_config(args.config)
    except ConfigError as err:
        print(f"ichat-gateway: {err}", file=sys.stderr)
        return 2
    logging.getLogger().setLevel(config.server_settings.log_level.upper())
    host = args.host or config.server_settings.host
    port = config.server_settings.port if args.port is None else args.port
    try:
        _run(serve(config, host, port, config_path=args.config))
    except ConfigError as err:
        print(f"ichat-gateway: {err}", file=sys.stderr)
        return 2
    except OSError as err:
        print(f"ichat-gateway: cannot listen on {host}:{port}: {err.strerror or err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
