"""Control-plane HTTP routes: worker registration and the admin API.

    POST   /v1/workers/heartbeat          upsert (first beat registers)      worker token
    POST   /v1/workers/deregister         a worker leaving cleanly            worker token
    GET    /v1/admin/workers              every worker, managed or registered admin key
    GET    /v1/admin/workers/{id}         one worker, with its last log lines
    POST   /v1/admin/workers/launch       start a managed worker (persisted)
    DELETE /v1/admin/workers/{id}         stop a managed one / deregister a registered one
    GET    /v1/admin/cluster/status       uptime, counts by state, replicas per model, GPUs
    GET    /v1/admin/cluster/version
    POST   /v1/admin/config/reload        re-read the config file and reconcile
"""

from __future__ import annotations

import platform
from typing import Any

import orjson
from aiohttp import web

from ichat import __version__
from ichat.engines import installed_engines
from ichat.errors import ConfigError, InvalidRequest, NotFound, UnprocessableEntity
from ichat.gateway.control import ControlPlane
from ichat.gateway.registry import parse_heartbeat

CONTROL_KEY = web.AppKey("ichat_control", ControlPlane)


def _json(body: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(body), status=status, content_type="application/json")


async def _body(request: web.Request) -> Any:
    raw = await request.read()
    try:
        return orjson.loads(raw) if raw else {}
    except orjson.JSONDecodeError as exc:
        raise InvalidRequest(f"request body is not valid JSON: {exc}") from exc


async def heartbeat(request: web.Request) -> web.Response:
    control = request.app[CONTROL_KEY]
    record = control.handle_beat(parse_heartbeat(await _body(request)))
    return _json({"status": "ok", "worker_id": record.worker_id, "routable": control.table.get(record.worker_id).routable})


async def deregister(request: web.Request) -> web.Response:
    body = await _body(request)
    if not isinstance(body, dict) or not isinstance(body.get("worker_id"), str):
        raise InvalidRequest("deregister needs a 'worker_id'", param="worker_id")
    record = request.app[CONTROL_KEY].deregister(body["worker_id"], body.get("instance_id"))
    return _json({"status": "ok", "removed": record is not None})


async def list_workers(request: web.Request) -> web.Response:
    return _json({"object": "list", "data": request.app[CONTROL_KEY].worker_views()})


def _find(control: ControlPlane, worker_id: str) -> dict[str, Any]:
    for view in control.worker_views():
        if view["worker_id"] == worker_id:
            return view
    raise NotFound(f"no worker {worker_id!r}", code="worker_not_found")


async def get_worker(request: web.Request) -> web.Response:
    control = request.app[CONTROL_KEY]
    view = _find(control, request.match_info["worker_id"])
    managed = control.supervisor.workers.get(view["worker_id"])
    if managed is not None:
        view["spec"] = managed.snapshot()["spec"]
        view["last_lines"] = list(managed.last_lines)[-50:]
    return _json(view)


async def launch_worker(request: web.Request) -> web.Response:
    control = request.app[CONTROL_KEY]
    body = await _body(request)
    if not isinstance(body, dict):
        raise UnprocessableEntity("launch needs a JSON object with the fields of a managed_workers entry")
    worker = await control.launch(body)
    return _json({"worker_id": worker.worker_id, "state": worker.state, "launched": True}, status=201)


async def delete_worker(request: web.Request) -> web.Response:
    control = request.app[CONTROL_KEY]
    worker_id = request.match_info["worker_id"]
    if worker_id in control.supervisor.workers:
        worker = await control.remove_managed(worker_id)
        note = "stopped and removed"
        if worker is not None and not worker.launched:
            note += "; it is in the config file, so a reload starts it again unless you remove it there"
        return _json({"worker_id": worker_id, "removed": True, "managed": True, "message": note})
    if control.registry.get(worker_id) is not None:
        control.deregister(worker_id)
        if control.collector is not None:
            control.collector.forget(worker_id)
        return _json(
            {
                "worker_id": worker_id,
                "removed": True,
                "managed": False,
                "message": "deregistered; this worker was not started by the gateway, so it is still running "
                "and registers again with its next heartbeat unless you stop it",
            }
        )
    raise NotFound(f"no worker {worker_id!r}", code="worker_not_found")


async def cluster_status(request: web.Request) -> web.Response:
    return _json(request.app[CONTROL_KEY].cluster_status())


async def cluster_version(request: web.Request) -> web.Response:
    return _json({"version": __version__, "python": platform.python_version(), "engines": installed_engines()})


async def reload_config(request: web.Request) -> web.Response:
    try:
        summary = await request.app[CONTROL_KEY].reload()
    except ConfigError as exc:
        raise UnprocessableEntity(f"config not applied, the running config stays: {exc.message}", code="invalid_config") from exc
    return _json({"status": "applied", **summary})


def add_routes(app: web.Application) -> None:
    router = app.router
    router.add_post("/v1/workers/heartbeat", heartbeat)
    router.add_post("/v1/workers/deregister", deregister)
    router.add_get("/v1/admin/workers", list_workers)
    router.add_post("/v1/admin/workers/launch", launch_worker)
    router.add_get("/v1/admin/workers/{worker_id}", get_worker)
    router.add_delete("/v1/admin/workers/{worker_id}", delete_worker)
    router.add_get("/v1/admin/cluster/status", cluster_status)
    router.add_get("/v1/admin/cluster/version", cluster_version)
    router.add_post("/v1/admin/config/reload", reload_config)
