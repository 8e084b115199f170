"""``build_app(config) -> web.Application``: the gateway's routes, middlewares and lifecycle.

Everything long-lived hangs off the app under the typed keys below, so later modules (registry,
admin API, metrics) add themselves with their own ``cleanup_ctx`` and reach the routing table,
the client session and the clock through them. Nothing lives at module level.

    CONFIG_KEY  GatewayConfig       the loaded configuration
    TABLE_KEY   RoutingTable        model -> endpoints; static routes are put in here
    RNG_KEY     random.Random       the policies' random source (seedable in tests)
    CLOCK_KEY   () -> float         monotonic seconds (injectable in tests)
    AUTH_KEY    Authenticator       who may call which route class (ichat.gateway.auth)
    PROXY_KEY   Proxy               the data-plane handlers
    CLIENT_KEY  aiohttp.ClientSession  the one upstream session (exists while the app runs)
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

from ichat.config import GatewayConfig, RouteSpec
from ichat.gateway.admin import CONTROL_KEY
from ichat.gateway.admin import add_routes as add_admin_routes
from ichat.gateway.auth import Authenticator
from ichat.gateway.childkeys import ChildKeys
from ichat.gateway.console import setup_console
from ichat.gateway.control import ControlPlane
from ichat.gateway.logs import setup_logs
from ichat.gateway.metrics import METRICS_KEY, GatewayMetrics, metrics_handler
from ichat.gateway.proxy import Proxy
from ichat.gateway.statefile import default_state_dir
from ichat.httperrors import error_middleware
from ichat.routing.table import Endpoint, RoutingTable

log = logging.getLogger(__name__)

Clock = Callable[[], float]

CONFIG_KEY = web.AppKey("ichat_config", GatewayConfig)
TABLE_KEY = web.AppKey("ichat_routing_table", RoutingTable)
RNG_KEY = web.AppKey("ichat_rng", random.Random)
CLOCK_KEY: web.AppKey[Clock] = web.AppKey("ichat_clock")
AUTH_KEY = web.AppKey("ichat_auth", Authenticator)
PROXY_KEY = web.AppKey("ichat_proxy", Proxy)
CLIENT_KEY = web.AppKey("ichat_client_session", aiohttp.ClientSession)

#: POST routes relayed by the body's ``model``
PROXIED_ROUTES = (
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/embeddings",
    "/v1/rerank",
    "/v1/score",
    "/v1/responses",
    "/v1/audio/{tail:.*}",
)
#: keep-alive connections to upstreams are reused for this long when idle (seconds)
UPSTREAM_KEEPALIVE_S = 60.0


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
    routing = config.routing
    table = RoutingTable(
        routing.policy,
        routing.per_model,
        failures_to_eject=routing.circuit_breaker.failures,
        cooldown_s=routing.circuit_breaker.cooldown_s,
        policy_settings=routing,
    )
    for endpoint in static_endpoints(config.routes):
        table.upsert(endpoint)
    rng = rng if rng is not None else random.Random()

    state_dir = Path(config.state_dir) if config.state_dir else default_state_dir()
    child_keys = ChildKeys(state_dir)
    auth = Authenticator(config.auth, clock=clock, child_verifier=child_keys.verify)
    metrics = GatewayMetrics(table)
    metrics.add_source(table.policy_samples)  # cache_aware's hits, matched ratio, index size
    proxy = Proxy(table, routing, rng=rng, clock=clock, forward_client_auth=not config.auth.enabled, metrics=metrics)

    def apply_settings(new: GatewayConfig) -> None:
        """Data-plane settings of a reloaded config (managed workers are the control plane's)."""
        r = new.routing
        table.configure(
            r.policy, r.per_model, failures_to_eject=r.circuit_breaker.failures, cooldown_s=r.circuit_breaker.cooldown_s,
            policy_settings=r,
        )
        for endpoint in [e for e in table.endpoints() if e.source == "route"]:
            table.remove(endpoint.id)
        for endpoint in static_endpoints(new.routes):
            table.upsert(endpoint)
        proxy.retries = r.retries
        proxy.apply_timeouts(r.timeouts)
        proxy.forward_client_auth = not new.auth.enabled
        if (new.server_settings.host, new.server_settings.port) != (config.server_settings.host, config.server_settings.port):
            log.warning("server_settings.host/port changes need a gateway restart")

    app = web.Application(
        # aiohttp refuses larger bodies itself; the proxy also checks Content-Length up front.
        client_max_size=routing.max_body_bytes,
        middlewares=[error_middleware("gateway", log), auth.middleware()],
    )
    app[CONFIG_KEY] = config
    app[TABLE_KEY] = table
    app[RNG_KEY] = rng
    app[CLOCK_KEY] = clock
    app[AUTH_KEY] = auth
    app[PROXY_KEY] = proxy
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
    for path in PROXIED_ROUTES:
        router.add_post(path, proxy.handle)
    router.add_get("/v1/models", proxy.list_models)
    # Model names may contain slashes (``Qwen/Qwen2-7B-Instruct``).
    router.add_get("/v1/models/{name:.+}", proxy.get_model)
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


def static_endpoints(routes: tuple[RouteSpec, ...]) -> list[Endpoint]:
    """Endpoints for ``routes``, numbered per model: ``route:<model>:<n>``."""
    counts: dict[str, int] = {}
    endpoints = []
    for route in routes:
        n = counts.get(route.model_name, 0)
        counts[route.model_name] = n + 1
        endpoints.append(
            Endpoint(
                id=f"route:{route.model_name}:{n}",
                model_name=route.model_name,
                api_base=route.api_base,
                api_key=route.api_key,
                weight=route.weight,
                backend="openai",
                source="route",
            )
        )
    return endpoints


async def client_session(app: web.Application) -> AsyncIterator[None]:
    """The one upstream session, for the app's lifetime."""
    proxy = app[PROXY_KEY]
    connector = aiohttp.TCPConnector(
        limit=0,  # no pool cap: the workers' own queues decide how much runs at once
        limit_per_host=0,
        ttl_dns_cache=300,
        keepalive_timeout=UPSTREAM_KEEPALIVE_S,
    )
    session = aiohttp.ClientSession(
        connector=connector,
        timeout=proxy.timeout,
        # Relay bytes as they are: a gzip answer stays gzip for the client that asked for it.
        auto_decompress=False,
        # Send only what the client sent; invented defaults (Accept-Encoding: gzip) would change
        # what the upstream answers.
        skip_auto_headers=("Accept-Encoding", "User-Agent", "Content-Type"),
        # A shared jar would carry one client's upstream cookies to the next client.
        cookie_jar=aiohttp.DummyCookieJar(),
        trust_env=False,
    )
    app[CLIENT_KEY] = session
    proxy.session = session
    try:
        yield
    finally:
        proxy.session = None
        proxy.close()  # the proxy's own keep-alive connections (ichat.gateway.upstream)
        await session.close()


async def health(request: web.Request) -> web.Response:
    return web.Response(body=b'{"status":"ok"}', content_type="application/json")
