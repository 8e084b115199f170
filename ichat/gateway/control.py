"""The control plane's shell: heartbeats in, routing table out, managed workers, reloads.

    heartbeat ─► WorkerRegistry (pure) ─► RoutingTable endpoint (routable or not) ─► proxy
                      ▲    │
      /health probes ─┘    └─► Supervisor.observe (managed: ready / unhealthy / hung)
    config file / admin ─► apply(): routes, policies, keys, managed workers reconciled

Background loops (tasks owned by the app, cancelled on shutdown): a fast tick that applies the
clock to the registry (missed beats take a worker out of rotation within a tick), a /health
prober, and a config-file watcher. Workers launched through the admin API are persisted in
``<state_dir>/launched-workers.json`` (atomic replace) and relaunched, or adopted, on restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import aiohttp
import attrs
import orjson

from ichat.config import GatewayConfig, ManagedWorkerSpec, load_config, structure_managed_worker
from ichat.errors import ConfigError, UnprocessableEntity
from ichat.gateway.registry import Heartbeat, WorkerRecord, WorkerRegistry, external_load
from ichat.gateway.supervisor import RUNNING_STATES, ManagedWorker, Supervisor
from ichat.routing.table import Endpoint, RoutingTable

log = logging.getLogger("ichat.gateway.control")

TICK_S = 0.25
CONFIG_POLL_S = 1.0
STATE_FILE = "launched-workers.json"


def default_state_dir() -> Path:
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return Path(base) / "ichat"


class ControlPlane:
    def __init__(
        self,
        config: GatewayConfig,
        table: RoutingTable,
        *,
        clock: Callable[[], float] = time.monotonic,
        config_path: str | None = None,
        apply_settings: Callable[[GatewayConfig], None] | None = None,
    ) -> None:
        self.config = config
        self.table = table
        self.clock = clock
        self.config_path = config_path
        #: applies routes/policies/keys of a new config to the data plane (set by build_app)
        self.apply_settings = apply_settings
        self.registry = WorkerRegistry(config.registry)
        self.supervisor = Supervisor(self._make_worker)
        self.collector: Any = None  # the log collector, when the app has one
        self.gateway_url: str | None = None
        self.started_at = time.time()
        self.state_dir = Path(config.state_dir) if config.state_dir else default_state_dir()
        self.reloads = 0
        self._session: aiohttp.ClientSession | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._config_stamp: tuple[int, int] | None = None
        self._reload_lock = asyncio.Lock()

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.config.registry.probe_timeout_s))
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
        for spec in self._load_launched():
            if spec.worker_id not in self.supervisor.workers:
                self._add_managed(spec, launched=True)

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self.supervisor.stop_all()
        if self._session is not None:
            await self._session.close()

    # -- registry ----------------------------------------------------------------------------

    def handle_beat(self, beat: Heartbeat) -> WorkerRecord:
        upserted = self.registry.upsert(beat, self.clock())
        record = upserted.record
        if upserted.event != "updated":
            log.info("worker %s %s: model %s at %s (%s)", record.worker_id, upserted.event, record.model_name, record.base_url, record.reported_state)
        self._sync(record, self.clock())
        if self.collector is not None and record.log_streaming:
            self.collector.watch(record.worker_id, record.base_url)
        return record

    def deregister(self, worker_id: str, instance_id: str | None = None) -> WorkerRecord | None:
        record = self.registry.get(worker_id)
        if record is None or (instance_id and record.instance_id != instance_id):
            return None  # an older instance saying goodbye must not remove its successor
        self.registry.remove(worker_id)
        self.table.remove(worker_id)
        if self.collector is not None:
            # its logs stay readable (a stopped worker is when they matter) until it is deleted
            self.collector.unwatch(worker_id)
        log.info("worker %s deregistered", worker_id)
        return record

    def _routable(self, record: WorkerRecord, now: float) -> bool:
        if not self.registry.is_routable(record, now):
            return False
        managed = self.supervisor.workers.get(record.worker_id)
        if managed is None:
            return True
        # a managed process that exited is out at once, before its missed beats would tell;
        # and the record of a process that is gone does not vouch for its replacement
        return managed.state in RUNNING_STATES and (record.pid is None or record.pid == managed.pid)

    def _sync(self, record: WorkerRecord, now: float) -> None:
        current = self.table.get(record.worker_id)
        self.table.upsert(
            Endpoint(
                id=record.worker_id,
                model_name=record.model_name,
                api_base=record.api_base,
                backend=record.backend,
                source=record.source,
                reported_load=external_load(record.reported_load(), current.inflight if current else 0),
                routable=self._routable(record, now),
                kinds=record.kinds,
            )
        )

    def tick(self) -> None:
        """Apply the clock: routability, evictions, and the supervisor's view of its workers."""
        now = self.clock()
        for record in self.registry.expired(now):
            log.warning("worker %s evicted: no heartbeat for %.0fs", record.worker_id, record.heartbeat_age(now))
            self.registry.remove(record.worker_id)
            self.table.remove(record.worker_id)
            if self.collector is not None and record.worker_id not in self.supervisor.workers:
                self.collector.forget(record.worker_id)
        for record in self.registry.all():
            endpoint = self.table.get(record.worker_id)
            routable = self._routable(record, now)
            if endpoint is not None and endpoint.routable != routable:
                endpoint.routable = routable
                log.warning("worker %s %s", record.worker_id, "back in rotation" if routable else f"out of rotation ({self.registry.status(record, now)})")
        for worker in self.supervisor.workers.values():
            record = self.registry.get(worker.worker_id)
            was = worker.state
            if record is None:
                worker.observe(None, now)
            else:
                worker.observe(self.registry.status(record, now), now, registered_pid=record.pid)
            if worker.state == "ready" and was != "ready":
                self._announce_ready(worker)

    def _announce_ready(self, worker: ManagedWorker) -> None:
        key = " -H 'Authorization: Bearer $KEY'" if self.config.auth.api_keys else ""
        log.info(
            "model %r is ready (worker %s). Try:\n  curl %s/v1/chat/completions -H 'Content-Type: application/json'%s "
            "-d '{\"model\": \"%s\", \"messages\": [{\"role\": \"user\", \"content\": \"What is the capital of France?\"}]}'",
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
        assert self._session is not None
        try:
            async with self._session.get(record.base_url + "/health") as resp:
                ok = resp.status == 200
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError):
            ok = False
        if self.registry.get(record.worker_id) is record:  # not replaced meanwhile
            self.registry.record_probe(record.worker_id, ok)

    async def _probe_forever(self) -> None:
        while True:
            await asyncio.sleep(self.config.registry.probe_interval_s)
            # only workers that claim to serve: a loading engine answers 503 by design
            targets = [r for r in self.registry.all() if r.reported_state == "ready"]
            await asyncio.gather(*(self._probe_one(r) for r in targets), return_exceptions=True)

    # -- managed workers ---------------------------------------------------------------------

    def _make_worker(self, spec: ManagedWorkerSpec, launched: bool) -> ManagedWorker:
        assert self.gateway_url is not None, "start_managed() sets the gateway URL first"

        def on_line(worker_id: str, stream: str, line: str) -> None:
            if self.collector is not None:
                self.collector.console(worker_id).append(stream, line, time.time())

        return ManagedWorker(
            spec,
            gateway_url=self.gateway_url,
            settings=self.config.supervisor,
            worker_token=self.config.auth.worker_token,
            on_line=on_line,
            launched=launched,
        )

    def _add_managed(self, spec: ManagedWorkerSpec, *, launched: bool) -> ManagedWorker:
        self.registry.managed_ids.add(spec.worker_id)
        return self.supervisor.add(spec, launched=launched)

    def _check_free(self, spec: ManagedWorkerSpec) -> None:
        if spec.worker_id in self.supervisor.workers:
            raise UnprocessableEntity(f"a managed worker {spec.worker_id} already exists", code="worker_exists")
        for other in self.supervisor.workers.values():
            if other.spec.port == spec.port and other.spec.host == spec.host:
                raise UnprocessableEntity(f"port {spec.port} is taken by managed worker {other.worker_id}", code="port_in_use", param="port")

    async def launch(self, body: Any) -> ManagedWorker:
        try:
            spec = structure_managed_worker(body, "launch")
        except ConfigError as exc:
            raise UnprocessableEntity(exc.message, code="invalid_worker_spec") from exc
        self._check_free(spec)
        worker = self._add_managed(spec, launched=True)
        self._save_launched()
        return worker

    async def remove_managed(self, worker_id: str) -> ManagedWorker | None:
        worker = await self.supervisor.remove(worker_id)
        if worker is None:
            return None
        self.registry.managed_ids.discard(worker_id)
        self.registry.remove(worker_id)
        self.table.remove(worker_id)
        if self.collector is not None:
            self.collector.forget(worker_id)
        if worker.launched:
            self._save_launched()
        return worker

    def _state_file(self) -> Path:
        return self.state_dir / STATE_FILE

    def _save_launched(self) -> None:
        specs = [attrs.asdict(w.spec) for w in self.supervisor.workers.values() if w.launched]
        self.state_dir.mkdir(parents=True, exist_ok=True)
        tmp = self._state_file().with_suffix(".tmp")
        tmp.write_bytes(orjson.dumps({"launched_workers": specs}, option=orjson.OPT_INDENT_2))
        os.replace(tmp, self._state_file())  # atomic: a crash leaves the old file or the new one

    def _load_launched(self) -> list[ManagedWorkerSpec]:
        path = self._state_file()
        if not path.is_file():
            return []
        try:
            data = orjson.loads(path.read_bytes())
            specs = [_spec_from_dict(d, f"{path}: launched_workers[{i}]") for i, d in enumerate(data["launched_workers"])]
        except (ValueError, KeyError, TypeError, ConfigError) as exc:
            log.error("ignoring unreadable state file %s: %s", path, exc)
            return []
        log.info("relaunching %d worker(s) recorded in %s", len(specs), path)
        return specs

    # -- reload ------------------------------------------------------------------------------

    async def reload(self) -> dict[str, Any]:
        """Re-read the config file and reconcile; a bad file changes nothing (ConfigError)."""
        if not self.config_path:
            raise ConfigError("the gateway was started without a config file; nothing to reload")
        async with self._reload_lock:
            new = load_config(self.config_path)
            summary = await self.apply(new)
            self._config_stamp = _stamp(self.config_path)
            return summary

    async def apply(self, new: GatewayConfig) -> dict[str, Any]:
        if self.apply_settings is not None:
            self.apply_settings(new)  # may raise ConfigError before anything changed
        desired = {spec.worker_id: spec for spec in new.managed_workers}
        current = {wid: w for wid, w in self.supervisor.workers.items() if not w.launched}
        stopped = [wid for wid in current if wid not in desired]
        changed = [wid for wid, spec in desired.items() if wid in current and current[wid].spec != spec]
        started = [wid for wid in desired if wid not in current]
        for wid in stopped + changed:
            await self.remove_managed(wid)
        self.config = new
        if self.gateway_url is not None:
            for wid in changed + started:
                if wid in self.supervisor.workers:  # a launched worker took this id meanwhile
                    continue
                self._add_managed(desired[wid], launched=False)
        self.reloads += 1
        summary = {"started": started, "stopped": stopped, "restarted": changed, "routes": len(new.routes)}
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
        now = self.clock()
        views: dict[str, dict[str, Any]] = {}
        for record in self.registry.all():
            endpoint = self.table.get(record.worker_id)
            views[record.worker_id] = {
                "worker_id": record.worker_id,
                "source": record.source,
                "model_name": record.model_name,
                "backend": record.backend,
                "address": record.base_url,
                "state": self.registry.status(record, now),
                "routable": bool(endpoint and endpoint.routable),
                "reported_state": record.reported_state,
                "heartbeat_age_s": round(record.heartbeat_age(now), 2),
                "heartbeat_interval_s": record.heartbeat_interval,
                "load": record.load,
                "inflight_via_gateway": endpoint.inflight if endpoint else 0,
                "gpus": record.gpus,
                "version": record.version,
                "model_path": record.model_path,
                "instance_id": record.instance_id,
                "pid": record.pid,
                "error": record.error,
                "kinds": list(record.kinds),
                "restarts": 0,
                "registered": True,
            }
        for worker in self.supervisor.workers.values():
            view = views.setdefault(
                worker.worker_id,
                {
                    "worker_id": worker.worker_id,
                    "source": "managed",
                    "model_name": worker.spec.model_name,
                    "backend": worker.spec.backend,
                    "address": f"http://{worker.spec.host}:{worker.spec.port}",
                    "state": worker.state,
                    "routable": False,
                    "heartbeat_age_s": None,
                    "registered": False,
                    "gpus": [],
                },
            )
            if worker.state not in ("ready",) and view.get("state") in ("ready", None):
                view["state"] = worker.state
            view.update(
                pid=worker.pid,
                managed_state=worker.state,
                restarts=worker.restarts,
                last_exit=worker.last_exit,
                gpu_ids=list(worker.spec.gpu_ids),
                launched=worker.launched,
                adopted=worker.adopted,
                message=worker.message,
            )
        return sorted(views.values(), key=lambda v: v["worker_id"])

    def cluster_status(self) -> dict[str, Any]:
        views = self.worker_views()
        by_state: dict[str, int] = {}
        for view in views:
            by_state[view["state"]] = by_state.get(view["state"], 0) + 1
        models = {}
        for name in self.table.models():
            endpoints = self.table.endpoints(name)
            models[name] = {"replicas": len(endpoints), "routable": sum(1 for e in endpoints if e.routable)}
        return {
            "gateway": {"uptime_s": round(time.time() - self.started_at, 1), "reloads": self.reloads, "config": self.config_path},
            "workers": {"total": len(views), "by_state": by_state},
            "models": models,
            "gpu_ids_in_use": self.supervisor.gpu_ids_in_use(),
            "gpus_by_worker": {v["worker_id"]: v.get("gpus", []) for v in views if v.get("gpus")},
        }

    def metric_samples(self) -> Iterable[tuple[str, str, str, dict[str, str], float]]:
        """Scrape-time gauges for the gateway's /metrics (see ichat.gateway.metrics)."""
        now = self.clock()
        counts: dict[str, int] = {}
        for view in self.worker_views():
            counts[view["state"]] = counts.get(view["state"], 0) + 1
        for state, count in sorted(counts.items()):
            yield ("ichat_gateway_workers", "Workers by state", "gauge", {"state": state}, float(count))
        for record in self.registry.all():
            yield (
                "ichat_gateway_worker_heartbeat_age_seconds", "Seconds since the worker's last heartbeat", "gauge",
                {"worker": record.worker_id, "model": record.model_name}, record.heartbeat_age(now),
            )  # fmt: skip
        for worker in self.supervisor.workers.values():
            yield (
                "ichat_gateway_managed_worker_restarts", "Restarts of a managed worker", "counter",
                {"worker": worker.worker_id}, float(worker.restarts),
            )  # fmt: skip


def _stamp(path: str) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_size)


def _spec_from_dict(data: dict[str, Any], where: str) -> ManagedWorkerSpec:
    # attrs.asdict folded engine flags into "engine_flags": unfold them for the structurer
    data = dict(data)
    flags = data.pop("engine_flags", {}) or {}
    data.update(flags)
    return structure_managed_worker(data, where)

