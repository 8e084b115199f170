"""The worker registry: who is out there, and may a request go to it now.

Workers register themselves with heartbeats (an upsert carrying their full metadata); managed
workers are started by the supervisor and register the same way. The pure core below decides,
from beats, health probes and the clock it is given:

    routable  = reported state "ready"  and  last beat within missed_heartbeats x its own interval
                and  fewer than probe_failures consecutive failed /health probes
    unhealthy = reported ready, but beats missed or probes failing (out of rotation at once)
    evicted   = no beat for evict_after_s (forgotten; its logs go with it)

A beat with a new instance id (the worker restarted) replaces the old entry: its failure
counts reset and it is routable again as soon as it says "ready".

Pure: every method takes ``now`` (monotonic seconds); nothing here awaits or does I/O.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import attrs

from ichat.config import RegistrySettings
from ichat.errors import InvalidRequest

LOADING, READY, DRAINING = "loading", "ready", "draining"
REPORTED_STATES = frozenset({LOADING, READY, DRAINING, "error"})


@attrs.define
class WorkerRecord:
    worker_id: str
    instance_id: str
    model_name: str
    backend: str
    host: str
    port: int
    #: "worker" (registered itself) or "managed" (started by this gateway)
    source: str
    reported_state: str
    heartbeat_interval: float
    last_beat: float
    first_seen: float
    model_path: str | None = None
    engine_args: list[str] = attrs.Factory(list)
    version: str | None = None
    log_streaming: bool = True
    load: dict[str, Any] = attrs.Factory(dict)
    gpus: list[dict[str, Any]] = attrs.Factory(list)
    pid: int | None = None
    error: str | None = None
    #: what the worker's model serves (routes, plus input kinds); empty when not reported
    kinds: tuple[str, ...] = ()
    probe_failures: int = 0
    beats: int = 0

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
        return int(self.load.get("running") or 0) + int(self.load.get("waiting") or 0)


def external_load(reported: int, inflight_here: int) -> int:
    """Pure: the part of a worker's reported load (running + waiting) that did not come from
    this gateway. The worker counts our own in-flight requests too; adding its number to ours
    would count them twice and, until the next beat, push traffic away from a replica that is
    merely busy with our requests."""
    return max(0, reported - inflight_here)


@attrs.frozen
class Heartbeat:
    """A validated heartbeat body."""

    worker_id: str
    instance_id: str
    model_name: str
    backend: str
    host: str
    port: int
    state: str
    heartbeat_interval: float
    model_path: str | None = None
    engine_args: tuple[str, ...] = ()
    version: str | None = None
    log_streaming: bool = True
    load: Mapping[str, Any] = attrs.Factory(dict)
    gpus: tuple[Mapping[str, Any], ...] = ()
    pid: int | None = None
    error: str | None = None
    kinds: tuple[str, ...] = ()


#: bounds on the optional ``kinds`` list of a heartbeat (names like "audio_transcriptions")
MAX_KINDS = 32
MAX_KIND_LENGTH = 64


def _kinds(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or len(value) > MAX_KINDS:
        raise InvalidRequest(f"heartbeat field 'kinds' must be a list of at most {MAX_KINDS} strings", param="kinds")
    for kind in value:
        if not isinstance(kind, str) or not 0 < len(kind) <= MAX_KIND_LENGTH:
            raise InvalidRequest(f"heartbeat 'kinds' entries must be strings of 1..{MAX_KIND_LENGTH} characters", param="kinds")
    return tuple(sorted(set(value)))


def parse_heartbeat(body: Any) -> Heartbeat:
    """Validate a heartbeat body; InvalidRequest names the field that is wrong."""
    if not isinstance(body, Mapping):
        raise InvalidRequest("heartbeat body must be a JSON object")

    def field(name: str, kind: type | tuple[type, ...], required: bool = True, default: Any = None) -> Any:
        value = body.get(name, default)
        if value is None:
            if required:
                raise InvalidRequest(f"heartbeat field {name!r} is required", param=name)
            return default
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise InvalidRequest(f"heartbeat field {name!r} has the wrong type", param=name)
        return value

    state = field("state", str)
    if state not in REPORTED_STATES:
        raise InvalidRequest(f"heartbeat state must be one of {sorted(REPORTED_STATES)}", param="state")
    port = field("port", int)
    if not 0 < port < 65536:
        raise InvalidRequest("heartbeat port must be 1..65535", param="port")
    interval = float(field("heartbeat_interval", (int, float)))
    if interval <= 0:
        raise InvalidRequest("heartbeat_interval must be > 0", param="heartbeat_interval")
    for name in ("worker_id", "instance_id", "model_name", "host"):
        if not field(name, str):
            raise InvalidRequest(f"heartbeat field {name!r} must not be empty", param=name)
    return Heartbeat(
        worker_id=body["worker_id"],
        instance_id=body["instance_id"],
        model_name=body["model_name"],
        backend=field("backend", str, default="unknown"),
        host=body["host"],
        port=port,
        state=state,
        heartbeat_interval=interval,
        model_path=field("model_path", str, required=False),
        engine_args=tuple(str(a) for a in field("engine_args", list, required=False, default=[])),
        version=field("version", str, required=False),
        log_streaming=bool(field("log_streaming", bool, required=False, default=True)),
        load=field("load", dict, required=False, default={}),
        gpus=tuple(field("gpus", list, required=False, default=[])),
        pid=field("pid", int, required=False),
        error=field("error", str, required=False),
        kinds=_kinds(body.get("kinds")),
    )


@attrs.frozen
class Upserted:
    record: WorkerRecord
    #: "registered" (new id), "replaced" (new instance of a known id) or "updated"
    event: str


class WorkerRegistry:
    def __init__(self, settings: RegistrySettings, managed_ids: frozenset[str] = frozenset()) -> None:
        self.settings = settings
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
        if existing is None or existing.instance_id != beat.instance_id:
            record = WorkerRecord(
                worker_id=beat.worker_id,
                instance_id=beat.instance_id,
                model_name=beat.model_name,
                backend=beat.backend,
                host=beat.host,
                port=beat.port,
                source=source,
                reported_state=beat.state,
                heartbeat_interval=beat.heartbeat_interval,
                last_beat=now,
                first_seen=now if existing is None else existing.first_seen,
            )
            event = "registered" if existing is None else "replaced"
            self._workers[beat.worker_id] = record
        else:
            record, event = existing, "updated"
        record.source = source
        record.model_name = beat.model_name
        record.backend = beat.backend
        record.host, record.port = beat.host, beat.port
        record.reported_state = beat.state
        record.heartbeat_interval = beat.heartbeat_interval
        record.last_beat = now
        record.model_path = beat.model_path
        record.engine_args = list(beat.engine_args)
        record.version = beat.version
        record.log_streaming = beat.log_streaming
        record.load = dict(beat.load)
        record.gpus = [dict(g) for g in beat.gpus]
        record.pid = beat.pid
        record.error = beat.error
        record.kinds = beat.kinds
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
            return "unhealthy" if self.beats_missed(record, now) or self.probes_failing(record) else READY
        if record.reported_state == LOADING and self.beats_missed(record, now):
            return "unhealthy"
        return record.reported_state

    def is_routable(self, record: WorkerRecord, now: float) -> bool:
        return self.status(record, now) == READY

    def expired(self, now: float) -> list[WorkerRecord]:
        """Records with no beat for ``evict_after_s``: the caller removes them."""
        limit = self.settings.evict_after_s
        return [r for r in self._workers.values() if r.heartbeat_age(now) > limit]
