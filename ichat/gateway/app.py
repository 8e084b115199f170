"""``build_app(config) -> web.Application``: the gateway's routes, middlewares and lifecycle.

Everything long-lived hangs off the app under the typed keys below; the control plane, admin API,
metrics and log collector add themselves with their own ``cleanup_ctx`` and reach the routing
table and the client session through them. Nothing lives at module level.

    TABLE_KEY   RoutingTable        model -> endpoints; static routes are put in here
    DATA_PLANE_KEY DataPlane        table, upstream client, relay, model lists; reconfigure(config)
    PROXY_KEY   Proxy               the relay handler (the data plane's)
    CLIENT_KEY  aiohttp.ClientSession  the process's one client session (exists while the app runs)
    CONTROL_KEY ControlPlane        registry, managed workers, reloads (ichat.gateway.control)
    METRICS_KEY GatewayMetrics      counters behind GET /metrics; ``add_source`` adds series (ichat.gateway.metrics)
    LOGS_KEY    LogCollector        workers' logs and /v1/logs/stream (ichat.gateway.logs)
"""

from __future__ import annotations

import logging
import random
import time
from pathlib import Path
from collections.abc import AsyncIterator, Callable

import aiohttp
from aiohttp import web

from ichat.config import GatewayConfig
from ichat.gateway.admin import CONTROL_KEY
from ichat.gateway.admin import add_routes as add_admin_routes
from ichat.gateway.auth import Authenticator
from ichat.gateway.childkeys import ChildKeys
from ichat.gateway.console import setup_console
from ichat.gateway.control import ControlPlane
from ichat.gateway.logs import setup_logs
from ichat.gateway.dataplane import DataPlane
from ichat.gateway.metrics import METRICS_KEY, metrics_handler
from ichat.gateway.proxy import Proxy
from ichat.gateway.statefile import default_state_dir
from ichat.httperrors import error_middleware
from ichat.routing.table import RoutingTable

log = logging.getLogger(__name__)

Clock = Callable[[], float]

TABLE_KEY = web.AppKey("ichat_routing_table", RoutingTable)
DATA_PLANE_KEY = web.AppKey("ichat_data_plane", DataPlane)
PROXY_KEY = web.AppKey("ichat_proxy", Proxy)
CLIENT_KEY = web.AppKey("ichat_client_session", aiohttp.ClientSession)


def build_app(
    config: GatewayConfig,
    *,
    clock: Clock = time.monotonic,
    rng: random.Random | None = None,
    config_path: str | None = None,
) -> web.Application:
    """The gateway app. ``clock`` and ``rng`` are injectable for tests; policies and static
    routes are checked here, so a bad name fails before the first request. ``config_path`` is
    watched and re-read on change or on ``POST /v1/admin/config/reload``."""
    rng = rng if rng is not None else random.Random()
    data_plane = DataPlane(config, clock=clock, rng=rng)
    table, metrics = data_plane.table, data_plane.metrics

    state_dir = Path(config.state_dir) if config.state_dir else default_state_dir()
    child_keys = ChildKeys(state_dir)
    auth = Authenticator(config.auth, clock=clock, child_verifier=child_keys.verify)
    metrics.add_source(table.policy_samples)  # cache_aware's hits, matched ratio, index size

    def apply_settings(new: GatewayConfig) -> None:
        """Data-plane settings of a reloaded config (managed workers are the control plane's)."""
        data_plane.reconfigure(new)
        if (new.server_settings.host, new.server_settings.port) != (config.server_settings.host, config.server_settings.port):
            log.warning("server_settings.host/port changes need a gateway restart")

    app = web.Application(
        # aiohttp refuses larger bodies itself; the proxy also checks Content-Length up front.
        client_max_size=config.routing.max_body_bytes,
        middlewares=[error_middleware("gateway", log), auth.middleware()],
    )
    app[TABLE_KEY] = table
    app[DATA_PLANE_KEY] = data_plane
    app[PROXY_KEY] = data_plane.proxy
    app[METRICS_KEY] = metrics
    app.cleanup_ctx.append(client_session)
    collector = setup_logs(app, config, CLIENT_KEY)  # after the session it uses
    control = ControlPlane(
        config, table, clock=clock, config_path=config_path, apply_settings=apply_settings,
        authenticator=auth, collector=collector, child_keys=child_keys, session=lambda: app.get(CLIENT_KEY),
    )  # fmt: skip
    app[CONTROL_KEY] = control
    metrics.add_source(control.metric_samples)  # workers by state, heartbeat age, restarts
    app.cleanup_ctx.append(control_plane)

    router = app.router
    data_plane.add_routes(router)
    router.add_get("/health", health)
    router.add_get("/metrics", metrics_handler)
    add_admin_routes(app)
    setup_console(app, admin_open=lambda: not auth.required_keys("/v1/admin/"))  # /ui
    return app


async def control_plane(app: web.Application) -> AsyncIterator[None]:
    """Registry loops and managed workers live exactly as long as the app."""
    control = app[CONTROL_KEY]
    await control.start()
    try:
        yield
    finally:
        await control.close()


async def client_session(app: web.Application) -> AsyncIterator[None]:
    """The process's one client session, for the app's lifetime (owned by the data plane; the
    control plane and the log collector use it too)."""
    data_plane = app[DATA_PLANE_KEY]
    app[CLIENT_KEY] = data_plane.open_session()
    try:
        yield
    finally:
        await data_plane.close()


async def health(request: web.Request) -> web.Response:
    return web.Response(body=b'{"status":"ok"}', content_type="application/json")
