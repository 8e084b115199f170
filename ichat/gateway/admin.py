"""Control-plane HTTP routes: worker registration and the admin API.

    POST   /v1/workers/heartbeat          upsert (first beat registers)      worker token / child secret
    POST   /v1/workers/deregister         a worker leaving (its instance id)  worker token / child secret
    GET    /v1/admin/workers              every worker, managed or registered admin key
    GET    /v1/admin/workers/{id}         one worker, with its last log lines
    POST   /v1/admin/workers/launch       start a managed worker (persisted)
    DELETE /v1/admin/workers/{id}         stop a managed one / deregister a registered one
    GET    /v1/admin/cluster/status       uptime, counts by state, replicas per model, GPUs
    GET    /v1/admin/cluster/version
    POST   /v1/admin/config/reload        re-read the config file and reconcile

Handlers only translate HTTP to the control plane's verbs and back; launch, delete and reload
finish even if the client leaves (the control plane shields them). Who may call which route is
decided before a handler runs (ichat.gateway.auth); the principal it found is at
``request[PRINCIPAL]``.
"""

from __future__ import annotations

import platform
from typing import Any

import orjson
from aiohttp import web

from ichat import __version__
from ichat.engines import installed_engines
from ichat.errors import ConfigError, InvalidRequest, PayloadTooLarge, UnprocessableEntity
from ichat.gateway.auth import PRINCIPAL
from ichat.gateway.control import ControlPlane
from ichat.protocol import MAX_HEARTBEAT_BYTES, parse_heartbeat

CONTROL_KEY = web.AppKey("ichat_control", ControlPlane)
#: admin bodies are small specs; nothing here needs the data plane's large limit
MAX_ADMIN_BODY_BYTES = 256 * 1024


def _json(body: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(body), status=status, content_type="application/json")


async def _body(request: web.Request, limit: int = MAX_ADMIN_BODY_BYTES) -> Any:
    """The JSON body, read up to ``limit`` bytes (413 beyond it)."""
    if request.content_length is not None and request.content_length > limit:
        raise PayloadTooLarge(f"body is larger than {limit} bytes")
    chunks, size = [], 0
    while chunk := await request.content.read(65536):
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"body is larger than {limit} bytes")
        chunks.append(chunk)
    raw = b"".join(chunks)
    try:
        return orjson.loads(raw) if raw else {}
    except orjson.JSONDecodeError as exc:
        raise InvalidRequest(f"request body is not valid JSON: {exc}") from exc


async def heartbeat(request: web.Request) -> web.Response:
    control = request.app[CONTROL_KEY]
    beat = parse_heartbeat(await _body(request, MAX_HEARTBEAT_BYTES))
    record = control.beat(beat, request[PRINCIPAL])
    return _json({"status": "ok", "worker_id": record.worker_id, "routable": control.routable(record.worker_id)})


async def deregister(request: web.Request) -> web.Response:
    body = await _body(request, MAX_HEARTBEAT_BYTES)
    if not isinstance(body, dict) or not isinstance(body.get("worker_id"), str):
        raise InvalidRequest("deregister needs a 'worker_id'", param="worker_id")
    if not isinstance(body.get("instance_id"), str) or not body["instance_id"]:
        raise InvalidRequest("deregister needs the 'instance_id' of the registered instance", param="instance_id")
    removed = request.app[CONTROL_KEY].deregister(body["worker_id"], body["instance_id"], request[PRINCIPAL])
    return _json({"status": "ok", "removed": removed})


async def list_workers(request: web.Request) -> web.Response:
    return _json({"object": "list", "data": request.app[CONTROL_KEY].worker_views()})


async def get_worker(request: web.Request) -> web.Response:
    return _json(request.app[CONTROL_KEY].worker_view(request.match_info["worker_id"]))


async def launch_worker(request: web.Request) -> web.Response:
    body = await _body(request)
    if not isinstance(body, dict):
        raise UnprocessableEntity("launch needs a JSON object with the fields of a managed_workers entry")
    return _json(await request.app[CONTROL_KEY].launch(body), status=201)


async def delete_worker(request: web.Request) -> web.Response:
    return _json(await request.app[CONTROL_KEY].remove(request.match_info["worker_id"]))


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
