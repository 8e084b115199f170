"""The worker registry: who is out there, and may a request go to it now.

Workers register themselves with heartbeats (an upsert carrying their full metadata, see
ichat.protocol); managed workers are started by the supervisor and register the same way.
The pure core below decides, from beats, health probes and the clock it is given:

    admitted  = the beat may claim its id: never a static route's, a managed worker's only with
                that child's secret, an address on loopback only when no worker token is set,
                and a new id only while the registry has room (see ``admit``)
    routable  = reported state "ready"  and  last beat within missed_heartbeats x its own interval
                and  fewer than probe_failures consecutive failed /health probes
    unhealthy = reported ready, but beats missed or probes failing (out of rotation at once)
    evicted   = no beat for evict_after_s (forgotten; its logs go with it)

A beat with a new instance id (the worker restarted) replaces the old entry: its failure
counts reset and it is routable again as soon as it says "ready".

Pure: every method takes ``now`` (monotonic seconds); nothing here awaits or does I/O.
"""

from __future__ import annotations

from collections.abc import Container
from typing import Any

import attrs

from ichat.config import RegistrySettings
from ichat.errors import PermissionDenied, ServiceUnavailable
from ichat.gateway.auth import Principal, is_loopback
from ichat.protocol import LOADING, MANAGED_PREFIX, READY, STATIC_ROUTE_PREFIX, UNHEALTHY, Heartbeat


@attrs.define
class WorkerRecord:
    """A registered worker: its last beat, and what the gateway observed about it."""

    beat: Heartbeat
    #: "worker" (registered itself) or "managed" (started by this gateway)
    source: str
    last_beat: float
    first_seen: float
    probe_failures: int = 0
    beats: int = 0

    # The beat's fields, read often enough to name.
    worker_id = property(lambda self: self.beat.worker_id)
    instance_id = property(lambda self: self.beat.instance_id)
    model_name = property(lambda self: self.beat.model_name)
    backend = property(lambda self: self.beat.backend)
    host = property(lambda self: self.beat.host)
    port = property(lambda self: self.beat.port)
    reported_state = property(lambda self: self.beat.state)
    heartbeat_interval = property(lambda self: self.beat.heartbeat_interval)
    log_streaming = property(lambda self: self.beat.log_streaming)
    pid = property(lambda self: self.beat.pid)
    kinds = property(lambda self: self.beat.kinds)

    @property
    def base_url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    @property
    def api_base(self) -> str:
        return self.base_url + "/v1"

    def heartbeat_age(self, now: float) -> float:
        return max(0.0, now - self.last_beat)

    def reported_load(self) -> int:
        load = self.beat.load
        return int(load.get("running") or 0) + int(load.get("waiting") or 0)


def external_load(reported: int, inflight_here: int) -> int:
    """Pure: the part of a worker's reported load (running + waiting) that did not come from
    this gateway. The worker counts our own in-flight requests too; adding its number to ours
    would count them twice and, until the next beat, push traffic away from a replica that is
    merely busy with our requests."""
    return max(0, reported - inflight_here)


def admit_claim(worker_id: str, principal: Principal, managed_ids: Container[str], static_ids: Container[str]) -> None:
    """Pure: may this caller speak for ``worker_id`` (heartbeat or deregistration)?
    PermissionDenied says why not."""
    if worker_id.startswith(STATIC_ROUTE_PREFIX) or worker_id in static_ids:
        raise PermissionDenied(f"worker id {worker_id!r} is reserved for static routes", code="worker_id_reserved", param="worker_id")
    if principal.kind == "child":
        if principal.worker_id != worker_id:
            raise PermissionDenied("a managed worker may only speak for itself", code="worker_id_mismatch", param="worker_id")
        return
    if worker_id.startswith(MANAGED_PREFIX) or worker_id in managed_ids:
        raise PermissionDenied(
            f"worker id {worker_id!r} belongs to a worker this gateway manages; only that process may use it",
            code="worker_id_reserved",
            param="worker_id",
        )


def admit_address(beat: Heartbeat, principal: Principal) -> None:
    """Pure: with no worker token configured (a loopback caller), only loopback addresses:
    otherwise any local process could point the gateway's traffic at any host."""
    if principal.kind == "loopback" and not (is_loopback(beat.host) or beat.host.lower() in ("localhost", "localhost.")):
        raise PermissionDenied(
            f"without a worker token only loopback addresses may register (got host {beat.host!r}): "
            "set auth.worker_token in the gateway config and start the worker with --worker-token",
            code="loopback_only",
            param="auth.worker_token",
        )


@attrs.frozen
class Upserted:
    record: WorkerRecord
    #: "registered" (new id), "replaced" (new instance of a known id) or "updated"
    event: str


class WorkerRegistry:
    def __init__(self, settings: RegistrySettings, managed_ids: frozenset[str] = frozenset(), *, max_workers: int = 1024) -> None:
        self.settings = settings
        self.max_workers = max_workers
        self._workers: dict[str, WorkerRecord] = {}
        #: ids the supervisor owns; their records are tagged "managed"
        self.managed_ids = set(managed_ids)

    def __len__(self) -> int:
        return len(self._workers)

    def get(self, worker_id: str) -> WorkerRecord | None:
        return self._workers.get(worker_id)

    def all(self) -> list[WorkerRecord]:
        return list(self._workers.values())

    def upsert(self, beat: Heartbeat, now: float) -> Upserted:
        existing = self._workers.get(beat.worker_id)
        source = "managed" if beat.worker_id in self.managed_ids else "worker"
        if existing is None and len(self._workers) >= self.max_workers and beat.worker_id not in self.managed_ids:
            raise ServiceUnavailable(
                f"the registry holds {self.max_workers} workers (limits.max_workers); a new one can join "
                "when another leaves or is evicted",
                retry_after_s=max(1, int(self.settings.evict_after_s)),
                code="registry_full",
            )
        if existing is None or existing.instance_id != beat.instance_id:
            record = WorkerRecord(
                beat=beat,
                source=source,
                last_beat=now,
                first_seen=now if existing is None else existing.first_seen,
            )
            event = "registered" if existing is None else "replaced"
            self._workers[beat.worker_id] = record
        else:
            record, event = existing, "updated"
        record.beat = beat
        record.source = source
        record.last_beat = now
        record.beats += 1
        return Upserted(record, event)

    def remove(self, worker_id: str) -> WorkerRecord | None:
        return self._workers.pop(worker_id, None)

    def record_probe(self, worker_id: str, ok: bool) -> WorkerRecord | None:
        record = self._workers.get(worker_id)
        if record is not None:
            record.probe_failures = 0 if ok else record.probe_failures + 1
        return record

    # -- derived state ---------------------------------------------------------------------------

    def beats_missed(self, record: WorkerRecord, now: float) -> bool:
        return record.heartbeat_age(now) > self.settings.missed_heartbeats * record.heartbeat_interval

    def probes_failing(self, record: WorkerRecord) -> bool:
        return record.probe_failures >= self.settings.probe_failures

    def status(self, record: WorkerRecord, now: float) -> str:
        """One word for people and metrics: loading, ready, unhealthy, draining, error."""
        if record.reported_state == READY:
            return UNHEALTHY if self.beats_missed(record, now) or self.probes_failing(record) else READY
        if record.reported_state == LOADING and self.beats_missed(record, now):
            return UNHEALTHY
        return record.reported_state

    def is_routable(self, record: WorkerRecord, now: float) -> bool:
        return self.status(record, now) == READY

    def expired(self, now: float) -> list[WorkerRecord]:
        """Records with no beat for ``evict_after_s``: the caller removes them."""
        limit = self.settings.evict_after_s
        return [r for r in self._workers.values() if r.heartbeat_age(now) > limit]


def record_view(record: WorkerRecord) -> dict[str, Any]:
    """The beat's fields an admin view shows."""
    beat = record.beat
    return {
        "load": dict(beat.load),
        "gpus": [dict(g) for g in beat.gpus],
        "version": beat.version,
        "model_path": beat.model_path,
        "instance_id": beat.instance_id,
        "pid": beat.pid,
        "error": beat.error,
        "kinds": list(beat.kinds),
    }
