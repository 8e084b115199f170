"""What the admin API and /metrics show about workers: pure functions of the control plane's
state (registry records, routing endpoints, managed workers) and the time ``now``.

A worker may be registered (it beats), managed (the supervisor runs it), or both; its view
merges the two, the supervisor's state winning while the process is not ready.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

from ichat.gateway.registry import WorkerRecord, WorkerRegistry, record_view
from ichat.gateway.supervisor import ManagedWorker
from ichat.protocol import READY
from ichat.routing.table import Endpoint, RoutingTable

Sample = tuple[str, str, str, dict[str, str], float]


def worker_views(registry: WorkerRegistry, table: RoutingTable, managed: Iterable[ManagedWorker], now: float) -> list[dict[str, Any]]:
    views: dict[str, dict[str, Any]] = {}
    for record in registry.all():
        endpoint = table.get(record.worker_id)
        views[record.worker_id] = {
            "worker_id": record.worker_id,
            "source": record.source,
            "model_name": record.model_name,
            "backend": record.backend,
            "address": record.base_url,
            "state": registry.status(record, now),
            "routable": bool(endpoint and endpoint.routable),
            "reported_state": record.reported_state,
            "heartbeat_age_s": round(record.heartbeat_age(now), 2),
            "heartbeat_interval_s": record.heartbeat_interval,
            "beats": record.beats,
            "inflight_via_gateway": endpoint.inflight if endpoint else 0,
            # prompt blocks its engine reports holding (None: it does not report, or not in sync)
            "prefix_cache_blocks": _reported_blocks(endpoint),
            **record_view(record),
            "restarts": 0,
            "registered": True,
        }
    for worker in managed:
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
        if worker.state != READY and view.get("state") in (READY, None):
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


def cluster_status(
    views: list[dict[str, Any]], table: RoutingTable, gpu_ids_in_use: dict[str, list[int]], *, gateway: dict[str, Any]
) -> dict[str, Any]:
    by_state: dict[str, int] = {}
    for view in views:
        by_state[view["state"]] = by_state.get(view["state"], 0) + 1
    models = {}
    for name in table.models():
        endpoints = table.endpoints(name)
        models[name] = {"replicas": len(endpoints), "routable": sum(1 for e in endpoints if e.routable)}
    return {
        "gateway": gateway,
        "workers": {"total": len(views), "by_state": by_state},
        "models": models,
        "gpu_ids_in_use": gpu_ids_in_use,
        "gpus_by_worker": {v["worker_id"]: v.get("gpus", []) for v in views if v.get("gpus")},
    }


def metric_samples(
    views: list[dict[str, Any]], records: Iterable[WorkerRecord], managed: Iterable[ManagedWorker], now: float
) -> Iterator[Sample]:
    """Gauges for the gateway's /metrics: workers by state, heartbeat age, managed restarts."""
    counts: dict[str, int] = {}
    for view in views:
        counts[view["state"]] = counts.get(view["state"], 0) + 1
    for state, count in sorted(counts.items()):
        yield ("ichat_gateway_workers", "Workers by state", "gauge", {"state": state}, float(count))
    for record in records:
        yield (
            "ichat_gateway_worker_heartbeat_age_seconds", "Seconds since the worker's last heartbeat", "gauge",
            {"worker": record.worker_id, "model": record.model_name}, record.heartbeat_age(now),
        )  # fmt: skip
    for worker in managed:
        yield (
            "ichat_gateway_managed_worker_restarts", "Restarts of a managed worker", "counter",
            {"worker": worker.worker_id}, float(worker.restarts),
        )  # fmt: skip


def _reported_blocks(endpoint: Endpoint | None) -> int | None:
    reported = endpoint.cached_prefixes if endpoint is not None else None
    return len(reported) if reported is not None and reported.synced else None
