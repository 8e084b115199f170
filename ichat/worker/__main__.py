"""python -m ichat.worker --model PATH [--served-model-name NAME] [--gateway-address URL] [engine flags...]"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys

import attrs
from aiohttp import web

from ichat.engines import load_engine_factory
from ichat.engines.base import EngineFactory, EngineSpec
from ichat.errors import EngineUnavailable
from ichat.httperrors import install_log_filters
from ichat.logs.hub import LogHub
from ichat.worker.app import DRAINING, ERROR, READY, WorkerState, build_app, take_child_secret
from ichat.worker.cli import WorkerOptions, build_parser, parse_worker_args
from ichat.worker.enginewatch import watch_engine
from ichat.worker.logcapture import FdCapture

log = logging.getLogger("ichat.worker")


def _fail(message: str, code: int = 2) -> int:
    print(f"ichat.worker: error: {message}", file=sys.stderr, flush=True)
    return code


async def serve(options: WorkerOptions, factory: EngineFactory, spec: EngineSpec, hub: LogHub, capture: FdCapture | None) -> int:
    loop = asyncio.get_running_loop()
    if capture is not None:
        capture.attach(loop)
    state = WorkerState(options, spec=spec, child_secret=take_child_secret())
    app = build_app(state, hub)
    # handler_cancellation: a client that goes away cancels its handler, which aborts the
    # engine request instead of generating tokens nobody reads.
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None, shutdown_timeout=options.drain_timeout)
    await runner.setup()
    try:
        await web.TCPSite(runner, options.host, options.port).start()
    except OSError as exc:
        await runner.cleanup()
        log.error("cannot listen on %s:%d: %s", options.host, options.port, exc)
        return 1
    log.info(
        "iChat worker %s listening on http://%s:%d (backend %s, model %s); loading the engine",
        options.worker_id, options.host, options.port, spec.backend, spec.model_path,
    )

    stop = asyncio.Event()
    exit_code = 0
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)

    agent = None
    if options.gateway_address:
        from ichat.worker.heartbeat import HeartbeatAgent

        agent = HeartbeatAgent(state)
        await agent.open()
        agent_task = asyncio.create_task(agent.run(), name="heartbeat")

    async def start_engine() -> None:
        nonlocal exit_code
        try:
            state.engine = await factory.start(spec)
        except Exception as exc:
            state.phase, state.error = ERROR, f"{type(exc).__name__}: {exc}"
            log.exception("engine failed to start")
            exit_code = 1
            stop.set()
            return
        state.phase = READY
        if agent is not None:
            agent.poke()  # become routable now, not at the next interval
            tracker = getattr(state.engine, "prefix_cache", None)
            if tracker is not None:
                # the gateway learns what the cache holds within a report interval of a change
                tracker.on_change = agent.poke_soon
        log.info(
            "iChat worker ready: model %s at http://%s:%d/v1", spec.served_model_names[0], options.dial_host, options.port
        )

    def engine_died(reason: str) -> None:
        # A dead rank (a crashed process, a lost Ray node) leaves nothing to serve with: report
        # it (the stop path below sends the gateway a beat with state "error" at once), then exit
        # non-zero so a supervisor starts a fresh engine.
        nonlocal exit_code
        state.phase, state.error = ERROR, reason
        log.error("%s; stopping so that the worker can be restarted", reason)
        exit_code = 1
        stop.set()

    engine_task = asyncio.create_task(start_engine(), name="engine-start")
    watch_task = asyncio.create_task(watch_engine(state, engine_died), name="engine-watch")
    await stop.wait()
    watch_task.cancel()

    loading = not engine_task.done()
    if state.phase == READY:
        state.phase = DRAINING
    log.info("iChat worker %s stopping (%s)", options.worker_id, "still loading" if loading else state.phase)
    if agent is not None:
        # Cancel until it is done: on Python 3.11, asyncio.wait_for returns instead of raising
        # when a cancel meets a wake-up (a poke) in the same turn of the loop, and the beat loop
        # would carry on, holding the worker up forever.
        while not agent_task.done():
            agent_task.cancel()
            await asyncio.wait({agent_task}, timeout=1.0)
        await agent.announce_draining()
    await runner.cleanup()  # stops accepting, lets in-flight requests finish within drain_timeout
    if agent is not None:
        await agent.deregister()
        await agent.close()
    if loading:
        # The engine is being built in a thread that cannot be interrupted; its processes notice
        # their parent's exit and stop. Leave without waiting for it.
        logging.shutdown()
        os._exit(exit_code)
    if state.engine is not None:
        try:
            await state.engine.shutdown()
        except Exception:  # stopping anyway; its processes die with this one
            log.exception("engine shutdown failed")
    log.info("iChat worker %s stopped", options.worker_id)
    return exit_code


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    options, engine_argv, want_help = parse_worker_args(argv)
    if want_help:
        build_parser().print_help()
        print("\nEngine flags (backend %r):" % options.backend, flush=True)
        engine_argv = ["--help"]
    try:
        factory = load_engine_factory(options.backend)
        spec = factory.parse_args(engine_argv, served_model_name=options.served_model_name)
        if options.report_prefix_cache:
            spec = attrs.evolve(spec, report_prefix_cache=True)
    except EngineUnavailable as exc:
        return _fail(exc.message)

    hub = LogHub(options.log_lines, worker_id=options.worker_id)
    capture = None
    if options.log_streaming:
        capture = FdCapture(hub)
        capture.install()
    logging.basicConfig(
        level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    install_log_filters()
    try:
        with contextlib.suppress(ImportError):
            import uvloop

            asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
        return asyncio.run(serve(options, factory, spec, hub, capture))
    finally:
        if capture is not None:
            capture.uninstall()


if __name__ == "__main__":  # the guard matters: vLLM's engine core is a spawned subprocess
    sys.exit(main())
