"""Notice an engine that died under a serving worker: a crashed rank, a lost Ray node.

vLLM watches its own ranks (the multiprocessing executor its worker processes, the Ray executor
its actors on every node) and marks the whole engine dead when one goes, but only says so when
asked. Without asking, a worker whose remote rank vanished would keep reporting "ready" in its
heartbeats until a request failed or the gateway's probe happened to call /health. This loop
asks every ``interval`` seconds; on the first failure it hands the reason to ``on_dead`` (the
worker reports ``error``, tells the gateway at once and exits, so a supervisor restarts it).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from ichat.worker.app import ERROR, READY, WorkerState

log = logging.getLogger("ichat.worker.enginewatch")

#: How often a ready engine is asked whether it still lives. vLLM answers from a flag set by
#: its own rank monitors, so asking often costs nothing.
WATCH_INTERVAL_S = 1.0
#: An engine that cannot answer that question in this long is as good as dead.
CHECK_TIMEOUT_S = 30.0


async def watch_engine(
    state: WorkerState,
    on_dead: Callable[[str], None],
    *,
    interval: float = WATCH_INTERVAL_S,
    timeout: float = CHECK_TIMEOUT_S,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
) -> None:
    """Return after calling ``on_dead`` once, or run until cancelled."""
    while True:
        await sleep(interval)
        engine = state.engine
        # ERROR with an engine: /health saw it die first (it only reports, it does not stop).
        if engine is None or state.phase not in (READY, ERROR):
            continue  # loading or draining: nothing to watch now
        try:
            await asyncio.wait_for(engine.check_health(), timeout)
        except asyncio.TimeoutError:
            reason = f"engine health check did not answer within {timeout:.0f}s"
        except Exception as exc:
            reason = f"engine health check failed: {type(exc).__name__}: {exc}"
        else:
            continue
        if state.phase in (READY, ERROR):  # a drain that began meanwhile is not a death
            on_dead(reason)
            return
