"""The worker's side of service discovery: upsert heartbeats to the gateway.

Every beat carries the full metadata (one :class:`ichat.protocol.Heartbeat`), so the first one
registers and any later one re-registers a worker the gateway forgot (a gateway restart). Beats
go out every ``--heartbeat-interval`` seconds, at once on a state change (loading -> ready ->
draining), and sooner, with backoff and jitter, while the gateway cannot be reached; serving
never waits on it. A worker that reports its prefix cache (``--report-prefix-cache``) also beats
when the cache changed, at most once per ``PREFIX_REPORT_INTERVAL_S``, so that the gateway's
view of it is about that fresh.

Credentials: a worker the gateway started itself sends its own secret (``ICHAT_WORKER_SECRET``,
with ``X-IChat-Worker-Id``), which no token rotation changes; any other worker sends
``--worker-token`` when it has one.
"""

from __future__ import annotations

import asyncio
import logging
import random
from typing import Any

import aiohttp

from ichat.backoff import exponential
from ichat.errors import GatewayRefused, IChatError
from ichat.protocol import CHILD_HEADER, READY, Heartbeat, unstructure
from ichat.worker.app import WorkerState, describe
from ichat.worker.gpus import gpu_inventory

log = logging.getLogger("ichat.worker.heartbeat")

HEARTBEAT_PATH = "/v1/workers/heartbeat"
DEREGISTER_PATH = "/v1/workers/deregister"
#: the shortest gap between beats sent because the engine's prefix cache changed
PREFIX_REPORT_INTERVAL_S = 1.0


def retry_delay(failures: int, interval: float, rng: random.Random) -> float:
    """Pure: the wait before the next try after ``failures`` failed beats in a row.

    Exponential from 0.5 s, capped at the heartbeat interval, with jitter in [50%, 100%] so a
    fleet of workers does not hammer a gateway that just came back all at once.
    """
    if failures <= 0:
        return interval
    return exponential(failures, first=0.5, cap=interval, rng=rng)


async def build_heartbeat(state: WorkerState) -> Heartbeat:
    info = describe(state)
    options = state.options
    engine = state.engine
    load: dict[str, Any] = {"inflight": state.inflight, "running": 0, "waiting": 0, "kv_cache_usage": None}
    if engine is not None and state.phase == READY:
        try:
            engine_load = await engine.load()
        except Exception as exc:  # the beat goes out without it: liveness matters more than load
            log.debug("engine load not available for this beat: %r", exc)
        else:
            load.update(running=engine_load.running, waiting=engine_load.waiting, kv_cache_usage=engine_load.kv_cache_usage)
    spec = getattr(engine, "spec", None) or state.spec
    return Heartbeat(
        worker_id=info["worker_id"],
        instance_id=info["instance_id"],
        model_name=info["model_name"],
        host=info["host"],
        port=info["port"],
        state=info["state"],
        heartbeat_interval=options.heartbeat_interval,
        backend=info["backend"],
        model_path=info["model_path"],
        served_model_names=tuple(spec.served_model_names) if spec else tuple(options.served_model_name or ()),
        engine_args=tuple(spec.canonical_args) if spec else (),
        version=info["version"],
        log_streaming=options.log_streaming,
        load=load,
        gpus=tuple(await asyncio.to_thread(gpu_inventory)),
        pid=info["pid"],
        inflight=state.inflight,
        spec_digest=info["spec_digest"],
        error=state.error,
        kinds=tuple(info["kinds"]),
        prefix_cache=_prefix_cache_report(engine, state.phase),
    )


def _prefix_cache_report(engine: Any, phase: str) -> dict[str, Any] | None:
    tracker = getattr(engine, "prefix_cache", None)
    if tracker is None or phase != READY:
        return None
    return tracker.report()


async def build_payload(state: WorkerState) -> dict[str, Any]:
    return unstructure(await build_heartbeat(state))


class HeartbeatAgent:
    def __init__(self, state: WorkerState, rng: random.Random | None = None) -> None:
        self._state = state
        self._rng = rng or random.Random()
        self._wake = asyncio.Event()
        self._session: aiohttp.ClientSession | None = None
        self.beats_sent = 0
        self._last_beat = float("-inf")
        self._soon: asyncio.TimerHandle | None = None

    def poke(self) -> None:
        """Send the next beat now (a state change the gateway should learn at once)."""
        self._wake.set()

    def poke_soon(self) -> None:
        """Send a beat soon, at most one per PREFIX_REPORT_INTERVAL_S (the prefix cache changed:
        called on every batch of engine events, so it must stay cheap)."""
        if self._soon is not None or self._wake.is_set():
            return
        loop = asyncio.get_running_loop()
        wait = self._last_beat + PREFIX_REPORT_INTERVAL_S - loop.time()
        if wait <= 0:
            self._wake.set()
        else:
            self._soon = loop.call_later(wait, self._fire_soon)

    def _fire_soon(self) -> None:
        self._soon = None
        self._wake.set()

    def _headers(self) -> dict[str, str]:
        state = self._state
        if state.child_secret:
            return {"Authorization": f"Bearer {state.child_secret}", CHILD_HEADER: state.options.worker_id}
        token = state.options.worker_token
        return {"Authorization": f"Bearer {token}"} if token else {}

    async def _post(self, path: str, payload: dict[str, Any]) -> None:
        assert self._session is not None
        url = self._state.options.gateway_address + path
        async with self._session.post(url, json=payload, headers=self._headers()) as resp:
            if resp.status >= 400:
                raise GatewayRefused(f"gateway answered {resp.status}: {(await resp.text())[:300]}")

    async def open(self) -> None:
        interval = self._state.options.heartbeat_interval
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=max(1.0, min(5.0, interval))))

    async def close(self) -> None:
        if self._soon is not None:
            self._soon.cancel()
        if self._session is not None:
            await self._session.close()

    async def run(self) -> None:
        """Beat until cancelled. The session stays open for the draining beat and deregistration."""
        options = self._state.options
        failures = 0
        while True:
            self._wake.clear()
            self._last_beat = asyncio.get_running_loop().time()
            try:
                await self._post(HEARTBEAT_PATH, await build_payload(self._state))
                self.beats_sent += 1
                if failures:
                    log.info("gateway %s reachable again; registered", options.gateway_address)
                failures = 0
            except (aiohttp.ClientError, asyncio.TimeoutError, IChatError, OSError) as exc:
                failures += 1
                tracker = getattr(self._state.engine, "prefix_cache", None)
                if tracker is not None:
                    tracker.resync()  # the report in this beat may be lost: the next one is whole
                if failures == 1 or failures % 20 == 0:
                    log.warning("heartbeat to %s failed (%s); retrying with backoff", options.gateway_address, exc)
            delay = retry_delay(failures, options.heartbeat_interval, self._rng)
            try:
                await asyncio.wait_for(self._wake.wait(), timeout=delay)
            except asyncio.TimeoutError:
                pass

    async def announce_draining(self) -> None:
        """One beat with state 'draining', so the gateway stops routing here before we stop listening."""
        try:
            await self._post(HEARTBEAT_PATH, await build_payload(self._state))
        except (aiohttp.ClientError, asyncio.TimeoutError, IChatError, OSError) as exc:
            log.warning("could not tell the gateway we are draining (%s); it notices by missed beats", exc)

    async def deregister(self) -> None:
        state = self._state
        try:
            await self._post(DEREGISTER_PATH, {"worker_id": state.options.worker_id, "instance_id": state.instance_id})
        except (aiohttp.ClientError, asyncio.TimeoutError, IChatError, OSError) as exc:
            log.warning("could not deregister from the gateway (%s); it evicts this worker by missed beats", exc)
