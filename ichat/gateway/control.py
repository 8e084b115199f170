"""The control plane: a façade with verbs over the registry, the supervisor and the log collector.

    heartbeat ─► beat() ─► admit (pure) ─► WorkerRegistry (pure) ─► routing table endpoint ─► proxy
                                  ▲    │
                  /health probes ─┘    └─► Supervisor (managed: ready / unhealthy / hung)
    admin API / config file ─► launch(), remove(), reload(): managed workers reconciled
                                                             (plan_reconcile, pure)

Admin handlers and the metrics source call the verbs below, never the collaborators behind
them. The collaborators (routing table, authenticator, log collector, the data plane's
``apply_settings``, the children's key, the state file) are given to the constructor.

Admin operations that change what runs (launch, remove, reload) run as tasks the control plane
owns, shielded from the HTTP handler: a client that disconnects halfway never leaves a worker
removed but not stopped, or a state file that says otherwise. They are serialised by one lock.

Background loops (tasks owned by the app, cancelled on shutdown): a fast tick that applies the
clock to the registry (missed beats take a worker out of rotation within a tick), a /health
prober (one probe per worker at a time, each bounded by ``probe_timeout_s``, so a worker that
black-holes connections costs at most one socket), and a config-file watcher.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable, Coroutine, Iterable
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import attrs

from ichat.config import GatewayConfig, ManagedWorkerSpec, load_config, structure_managed_worker
from ichat.errors import ConfigError, NotFound, ServiceUnavailable, UnprocessableEntity
from ichat.gateway.auth import Authenticator, Principal
from ichat.gateway.childkeys import ChildKeys
from ichat.gateway.registry import WorkerRecord, WorkerRegistry, admit_address, admit_claim, external_load
from ichat.gateway.statefile import LaunchedStore, default_state_dir
from ichat.gateway.supervisor import RUNNING_STATES, ManagedWorker, Supervisor
from ichat.gateway.views import cluster_status, metric_samples, worker_views
from ichat.protocol import READY, Heartbeat
from ichat.routing.cachereport import CachedPrefixes
from ichat.routing.table import Endpoint, RoutingTable

log = logging.getLogger("ichat.gateway.control")

T = TypeVar("T")

TICK_S = 0.25
CONFIG_POLL_S = 1.0


@attrs.frozen
class ReconcilePlan:
    """What a reload does to the managed workers of the config file (launched ones are kept)."""

    stop: tuple[str, ...]
    restart: tuple[str, ...]
    start: tuple[str, ...]


def plan_reconcile(current: dict[str, ManagedWorkerSpec], desired: dict[str, ManagedWorkerSpec]) -> ReconcilePlan:
    """Pure: ids to stop (gone from the config), restart (spec changed) and start (new)."""
    return ReconcilePlan(
        stop=tuple(wid for wid in current if wid not in desired),
        restart=tuple(wid for wid, spec in desired.items() if wid in current and current[wid] != spec),
        start=tuple(wid for wid in desired if wid not in current),
    )


def is_routable(registry: WorkerRegistry, record: WorkerRecord, managed: ManagedWorker | None, now: float) -> bool:
    """Pure: the registry says ready, and for a managed worker the process that beats is the one
    running now. A managed process that exited is out at once, before its missed beats tell; the
    record of a process that is gone does not vouch for its replacement."""
    if not registry.is_routable(record, now):
        return False
    if managed is None:
        return True
    return managed.state in RUNNING_STATES and (record.pid is None or record.pid == managed.pid)


class ControlPlane:
    def __init__(
        self,
        config: GatewayConfig,
        table: RoutingTable,
        *,
        clock: Callable[[], float] = time.monotonic,
        config_path: str | None = None,
        apply_settings: Callable[[GatewayConfig], None] | None = None,
        authenticator: Authenticator | None = None,
        collector: Any = None,
        child_keys: ChildKeys | None = None,
        session: Callable[[], aiohttp.ClientSession | None] | None = None,
    ) -> None:
        self.config = config
        self._table = table
        self._clock = clock
        self.config_path = config_path
        #: applies routes/policies/timeouts of a new config to the data plane
        self._apply_settings = apply_settings
        self._auth = authenticator
        #: the log collector (ichat.gateway.logs.LogCollector), when the app has one
        self._collector = collector
        state_dir = Path(config.state_dir) if config.state_dir else default_state_dir()
        self._child_keys = child_keys if child_keys is not None else ChildKeys(state_dir)
        self._store = LaunchedStore(state_dir)
        self._registry = WorkerRegistry(config.registry, max_workers=config.limits.max_workers)
        self._supervisor = Supervisor(self._make_worker)
        self.gateway_url: str | None = None
        self.started_at = time.time()
        self.reloads = 0
        #: the process's one client session (the app's), for probes and adoption checks; a control
        #: plane built without one (tests) opens its own in start()
        self._shared_session = session
        self._own_session: aiohttp.ClientSession | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._ops: set[asyncio.Task[Any]] = set()
        self._config_stamp: tuple[int, int] | None = None
        self._ops_lock = asyncio.Lock()

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        if self._shared_session is None:
            self._own_session = aiohttp.ClientSession()
        self._tasks = [
            asyncio.create_task(self._tick_forever(), name="registry-tick"),
            asyncio.create_task(self._probe_forever(), name="health-probe"),
        ]
        if self.config_path:
            self._config_stamp = _stamp(self.config_path)
            self._tasks.append(asyncio.create_task(self._watch_config_forever(), name="config-watch"))

    async def start_managed(self, gateway_url: str) -> None:
        """Start (or adopt) the managed workers; needs the gateway's own URL for their beats."""
        self.gateway_url = gateway_url
        for spec in self.config.managed_workers:
            self._add_managed(spec, launched=False)
        loaded = self._store.load()
        if loaded.specs:
            log.info("relaunching %d worker(s) recorded in %s", len(loaded.specs), self._store.path)
        for spec in loaded.specs:
            if spec.worker_id not in self._supervisor.workers:
                self._add_managed(spec, launched=True)

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        # admin operations in flight finish first: they must not leave half a state
        if self._ops:
            await asyncio.gather(*self._ops, return_exceptions=True)
        for task in self._tasks:
            try:
                await task
            except asyncio.CancelledError:
                pass
        await self._supervisor.stop_all()
        if self._own_session is not None:
            await self._own_session.close()

    def _session(self) -> aiohttp.ClientSession | None:
        return self._shared_session() if self._shared_session is not None else self._own_session

    async def _finish(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run an admin operation to its end even if the caller is cancelled (its client left)."""
        task = asyncio.create_task(coro)
        self._ops.add(task)
        task.add_done_callback(self._ops.discard)
        return await asyncio.shield(task)

    # -- the registry's verbs ----------------------------------------------------------------

    def beat(self, beat: Heartbeat, principal: Principal) -> WorkerRecord:
        """A heartbeat from ``principal``: admitted (or PermissionDenied), then upserted."""
        static_ids = {e.id for e in self._table.endpoints() if e.source == "route"}
        admit_claim(beat.worker_id, principal, self._registry.managed_ids, static_ids)
        if principal.kind != "child":
            admit_address(beat, principal)
        now = self._clock()
        upserted = self._registry.upsert(beat, now)
        record = upserted.record
        if upserted.event != "updated":
            log.info("worker %s %s: model %s at %s (%s)", record.worker_id, upserted.event, record.model_name, record.base_url, record.reported_state)
        self._sync(record, now)
        if beat.prefix_cache is not None:
            endpoint = self._table.get(record.worker_id)
            if endpoint is not None:
                if endpoint.cached_prefixes is None:
                    endpoint.cached_prefixes = CachedPrefixes()
                endpoint.cached_prefixes.apply(beat.instance_id, beat.prefix_cache)
        if self._collector is not None and record.log_streaming:
            self._collector.watch(record.worker_id, record.base_url)
        return record

    def routable(self, worker_id: str) -> bool:
        endpoint = self._table.get(worker_id)
        return bool(endpoint and endpoint.routable)

    def deregister(self, worker_id: str, instance_id: str, principal: Principal) -> bool:
        """A worker leaving cleanly. Only the instance that is registered may remove itself:
        an older instance saying goodbye must not remove its successor."""
        static_ids = {e.id for e in self._table.endpoints() if e.source == "route"}
        admit_claim(worker_id, principal, self._registry.managed_ids, static_ids)
        record = self._registry.get(worker_id)
        if record is None or record.instance_id != instance_id:
            return False
        self._forget_registration(worker_id, keep_logs=True)
        log.info("worker %s deregistered", worker_id)
        return True

    def _forget_registration(self, worker_id: str, *, keep_logs: bool) -> None:
        self._registry.remove(worker_id)
        self._table.remove(worker_id)
        if self._collector is not None:
            if keep_logs:
                # its logs stay readable (a stopped worker is when they matter), within a bound
                self._collector.unwatch(worker_id)
            else:
                self._collector.forget(worker_id)

    def _sync(self, record: WorkerRecord, now: float) -> None:
        current = self._table.get(record.worker_id)
        self._table.upsert(
            Endpoint(
                id=record.worker_id,
                model_name=record.model_name,
                api_base=record.api_base,
                backend=record.backend,
                source=record.source,
                reported_load=external_load(record.reported_load(), current.inflight if current else 0),
                routable=self._is_routable(record, now),
                kinds=record.kinds,
            )
        )

    def _is_routable(self, record: WorkerRecord, now: float) -> bool:
        return is_routable(self._registry, record, self._supervisor.workers.get(record.worker_id), now)

    def tick(self) -> None:
        """Apply the clock: routability, evictions, and the supervisor's view of its workers."""
        now = self._clock()
        for record in self._registry.expired(now):
            log.warning("worker %s evicted: no heartbeat for %.0fs", record.worker_id, record.heartbeat_age(now))
            self._forget_registration(record.worker_id, keep_logs=record.worker_id in self._supervisor.workers)
        for record in self._registry.all():
            endpoint = self._table.get(record.worker_id)
            routable = self._is_routable(record, now)
            if endpoint is not None and endpoint.routable != routable:
                endpoint.routable = routable
                log.warning("worker %s %s", record.worker_id, "back in rotation" if routable else f"out of rotation ({self._registry.status(record, now)})")
            if endpoint is not None and self._registry.probes_failing(record):
                # The gateway cannot get an answer from it (hung, or the path is cut): wake the
                # requests waiting on it. Missed beats alone do not: the data path may be fine.
                self._table.declare_unhealthy(record.worker_id)
        for worker in self._supervisor.workers.values():
            record = self._registry.get(worker.worker_id)
            was = worker.state
            if record is None:
                worker.observe(None, now)
            else:
                worker.observe(self._registry.status(record, now), now, registered_pid=record.pid)
            if worker.state == READY and was != READY:
                self._announce_ready(worker)

    def _announce_ready(self, worker: ManagedWorker) -> None:
        key = " -H 'Authorization: Bearer $KEY'" if self.config.auth.api_keys else ""
        log.info(
            "model %r is ready (worker %s). Try:\n  curl %s/v1/chat/completions -H 'Content-Type: application/json'%s "
            "-d '{\"model\": \"%s\", \"messages\": [{\"role\": \"user\", \"content\": \"What is the capital of France? Answer in one word.\"}]}'",
            worker.spec.model_name, worker.worker_id, self.gateway_url, key, worker.spec.model_name,
        )

    async def _tick_forever(self) -> None:
        while True:
            await asyncio.sleep(TICK_S)
            try:
                self.tick()
            except Exception:
                log.exception("registry tick failed")

    async def _probe_one(self, record: WorkerRecord) -> None:
        session = self._session()
        assert session is not None
        timeout = aiohttp.ClientTimeout(total=self.config.registry.probe_timeout_s)
        try:
            async with session.get(record.base_url + "/health", timeout=timeout) as resp:
                ok = resp.status == 200
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError):
            ok = False
        if self._registry.get(record.worker_id) is record:  # not replaced meanwhile
            self._registry.record_probe(record.worker_id, ok)

    async def _probe_forever(self) -> None:
        while True:
            await asyncio.sleep(self.config.registry.probe_interval_s)
            # only workers that claim to serve: a loading engine answers 503 by design
            targets = [r for r in self._registry.all() if r.reported_state == READY]
            await asyncio.gather(*(self._probe_one(r) for r in targets), return_exceptions=True)

    # -- managed workers ---------------------------------------------------------------------

    def _make_worker(self, spec: ManagedWorkerSpec, launched: bool) -> ManagedWorker:
        assert self.gateway_url is not None, "start_managed() sets the gateway URL first"
        collector = self._collector

        def on_line(worker_id: str, stream: str, line: str) -> None:
            if collector is not None:
                collector.console(worker_id).append(stream, line, time.time())

        return ManagedWorker(
            spec,
            gateway_url=self.gateway_url,
            settings=self.config.supervisor,
            child_secret=self._child_keys.secret_for(spec.worker_id),
            on_line=on_line,
            launched=launched,
            clock=self._clock,
            session=self._session,
        )

    def _add_managed(self, spec: ManagedWorkerSpec, *, launched: bool) -> ManagedWorker:
        self._registry.managed_ids.add(spec.worker_id)
        return self._supervisor.add(spec, launched=launched)

    def _check_free(self, spec: ManagedWorkerSpec) -> None:
        if spec.worker_id in self._supervisor.workers:
            raise UnprocessableEntity(f"a managed worker {spec.worker_id} already exists", code="worker_exists")
        for other in self._supervisor.workers.values():
            if other.spec.port == spec.port and other.spec.host == spec.host:
                raise UnprocessableEntity(f"port {spec.port} is taken by managed worker {other.worker_id}", code="port_in_use", param="port")

    def _launched_specs(self) -> list[ManagedWorkerSpec]:
        return [w.spec for w in self._supervisor.workers.values() if w.launched]

    def _save_launched(self, specs: list[ManagedWorkerSpec]) -> None:
        try:
            self._store.save(specs)
        except OSError as exc:
            raise ServiceUnavailable(
                f"cannot write the state file {self._store.path}: {exc.strerror or exc}", code="state_not_saved"
            ) from exc

    async def launch(self, body: Any) -> dict[str, Any]:
        """Validate, record in the state file, then start; 422 names a bad field."""
        try:
            spec = structure_managed_worker(body, "launch")
        except ConfigError as exc:
            raise UnprocessableEntity(exc.message, code="invalid_worker_spec") from exc
        return await self._finish(self._launch(spec))

    async def _launch(self, spec: ManagedWorkerSpec) -> dict[str, Any]:
        async with self._ops_lock:
            self._check_free(spec)
            if self.gateway_url is None:
                raise ServiceUnavailable("the gateway is still starting; launch again in a moment", code="not_ready")
            # Recorded before the process starts: a crash right after still knows about it.
            self._save_launched([*self._launched_specs(), spec])
            try:
                worker = self._add_managed(spec, launched=True)
            except BaseException:
                self._registry.managed_ids.discard(spec.worker_id)
                self._save_launched(self._launched_specs())  # rolled back
                raise
            log.info("worker %s launched through the admin API (model %s, port %d)", spec.worker_id, spec.model_name, spec.port)
            return {"worker_id": worker.worker_id, "state": worker.state, "launched": True}

    async def remove(self, worker_id: str) -> dict[str, Any]:
        """Stop and remove a managed worker, or deregister a registered one (NotFound if neither)."""
        return await self._finish(self._remove(worker_id))

    async def _remove(self, worker_id: str) -> dict[str, Any]:
        async with self._ops_lock:
            if worker_id in self._supervisor.workers:
                worker = await self._remove_managed(worker_id)
                log.info("managed worker %s stopped and removed through the admin API", worker_id)
                note = "stopped and removed"
                if worker is not None and not worker.launched:
                    note += "; it is in the config file, so a reload starts it again unless you remove it there"
                return {"worker_id": worker_id, "removed": True, "managed": True, "message": note}
            if self._registry.get(worker_id) is not None:
                self._forget_registration(worker_id, keep_logs=False)
                log.info("worker %s deregistered by the admin API", worker_id)
                return {
                    "worker_id": worker_id,
                    "removed": True,
                    "managed": False,
                    "message": "deregistered; this worker was not started by the gateway, so it is still running "
                    "and registers again with its next heartbeat unless you stop it",
                }
        raise NotFound(f"no worker {worker_id!r}", code="worker_not_found")

    async def _remove_managed(self, worker_id: str) -> ManagedWorker | None:
        worker = await self._supervisor.remove(worker_id)
        if worker is None:
            return None
        self._registry.managed_ids.discard(worker_id)
        self._forget_registration(worker_id, keep_logs=False)
        if worker.launched:
            self._save_launched(self._launched_specs())
        return worker

    # -- reload ------------------------------------------------------------------------------

    async def reload(self) -> dict[str, Any]:
        """Re-read the config file and reconcile; a bad file changes nothing (ConfigError)."""
        if not self.config_path:
            raise ConfigError("the gateway was started without a config file; nothing to reload")
        return await self._finish(self._reload())

    async def _reload(self) -> dict[str, Any]:
        assert self.config_path is not None
        async with self._ops_lock:
            # The stamp of what is read, taken before reading: a file still being written (an
            # editor truncates, then writes) may be read half-way; its final content then has a
            # newer stamp, and the watcher applies it. A stamp taken after applying marked that
            # final content as seen, and the half-read one stayed applied.
            stamp = _stamp(self.config_path)
            new = load_config(self.config_path)
            summary = await self._apply(new)
            self._config_stamp = stamp
            return summary

    async def apply(self, new: GatewayConfig) -> dict[str, Any]:
        """Apply a config (already loaded) as a reload would."""

        async def locked() -> dict[str, Any]:
            async with self._ops_lock:
                return await self._apply(new)

        return await self._finish(locked())

    async def _apply(self, new: GatewayConfig) -> dict[str, Any]:
        if self._apply_settings is not None:
            self._apply_settings(new)  # may raise ConfigError before anything changed
        if self._auth is not None:
            self._auth.configure(new.auth)
        desired = {spec.worker_id: spec for spec in new.managed_workers}
        current = {wid: w.spec for wid, w in self._supervisor.workers.items() if not w.launched}
        plan = plan_reconcile(current, desired)
        for wid in plan.stop + plan.restart:
            await self._remove_managed(wid)
        self.config = new
        if self.gateway_url is not None:
            for wid in plan.restart + plan.start:
                if wid in self._supervisor.workers:  # a launched worker took this id meanwhile
                    continue
                self._add_managed(desired[wid], launched=False)
        self.reloads += 1
        summary = {"started": list(plan.start), "stopped": list(plan.stop), "restarted": list(plan.restart), "routes": len(new.routes)}
        log.info("config applied: %s", summary)
        return summary

    async def _watch_config_forever(self) -> None:
        assert self.config_path is not None
        while True:
            await asyncio.sleep(CONFIG_POLL_S)
            stamp = _stamp(self.config_path)
            if stamp is None or stamp == self._config_stamp:
                continue
            self._config_stamp = stamp
            try:
                await self.reload()
            except ConfigError as exc:
                log.error("config change not applied, the running config stays: %s", exc.message)
            except Exception:
                log.exception("config reload failed; the running config stays")

    # -- views ---------------------------------------------------------------------------------

    def worker_views(self) -> list[dict[str, Any]]:
        return worker_views(self._registry, self._table, self._supervisor.workers.values(), self._clock())

    def worker_view(self, worker_id: str) -> dict[str, Any]:
        """One worker, with a managed one's spec and last lines; NotFound otherwise."""
        for view in self.worker_views():
            if view["worker_id"] == worker_id:
                managed = self._supervisor.workers.get(worker_id)
                if managed is not None:
                    view["spec"] = managed.snapshot()["spec"]
                    view["last_lines"] = list(managed.last_lines)[-50:]
                return view
        raise NotFound(f"no worker {worker_id!r}", code="worker_not_found")

    def managed_ids(self) -> list[str]:
        return sorted(self._supervisor.workers)

    def cluster_status(self) -> dict[str, Any]:
        return cluster_status(
            self.worker_views(), self._table, self._supervisor.gpu_ids_in_use(),
            gateway={"uptime_s": round(time.time() - self.started_at, 1), "reloads": self.reloads, "config": self.config_path},
        )  # fmt: skip

    def metric_samples(self) -> Iterable[tuple[str, str, str, dict[str, str], float]]:
        """Scrape-time gauges for the gateway's /metrics (see ichat.gateway.metrics)."""
        return metric_samples(self.worker_views(), self._registry.all(), self._supervisor.workers.values(), self._clock())


def _stamp(path: str) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_size)

