"""The data plane of one gateway app, assembled: routing table, upstream client, relay, model lists.

    DataPlane
    ├── table      RoutingTable       model -> endpoints, each with its CircuitBreaker (ichat.routing.table)
    ├── upstreams  UpstreamClient     keep-alive pools for http:// upstreams (ichat.gateway.upstream)
    ├── session    aiohttp.ClientSession  the process's one client session: the https:// fallback,
    │                                 and what the control plane and log collector use (while running)
    ├── proxy      Proxy              relay and retries, stream migration (ichat.gateway.proxy)
    ├── models     ModelList          GET /v1/models (ichat.gateway.models)
    └── metrics    GatewayMetrics     what the relay counts (ichat.gateway.metrics)

:meth:`DataPlane.reconfigure` applies a reloaded config's data-plane settings in one call: the
table's policies, breaker settings and static routes, the relay's retries, timeouts, migration
and client-key forwarding, and the new timeouts of every upstream pool, those already open too.
"""

from __future__ import annotations

import random
from collections.abc import Callable

import aiohttp
from aiohttp import web

from ichat.config import GatewayConfig, RouteSpec
from ichat.gateway.metrics import GatewayMetrics
from ichat.gateway.models import ModelList
from ichat.gateway.proxy import Proxy
from ichat.gateway.upstream import UpstreamClient
from ichat.routing.table import Endpoint, RoutingTable

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


class DataPlane:
    def __init__(self, config: GatewayConfig, *, clock: Callable[[], float], rng: random.Random) -> None:
        routing = config.routing
        self.table = RoutingTable(
            routing.policy,
            routing.per_model,
            failures_to_eject=routing.circuit_breaker.failures,
            cooldown_s=routing.circuit_breaker.cooldown_s,
            policy_settings=routing,
        )
        for endpoint in static_endpoints(config.routes):
            self.table.upsert(endpoint)
        self.metrics = GatewayMetrics(self.table, clock)
        t = routing.timeouts
        self.upstreams = UpstreamClient(connect_timeout=t.connect_s, read_timeout=t.first_byte_s, total_timeout=t.total_s or None)
        self.proxy = Proxy(
            self.table,
            routing,
            upstreams=self.upstreams,
            rng=rng,
            clock=clock,
            forward_client_auth=not config.auth.enabled,
            metrics=self.metrics,
        )
        self.models = ModelList(self.table, self.proxy.unknown_model_message)
        self.session: aiohttp.ClientSession | None = None

    def reconfigure(self, config: GatewayConfig) -> None:
        """A reloaded config's data-plane settings; requests in flight keep their own."""
        routing = config.routing
        breaker = routing.circuit_breaker
        table = self.table
        table.configure(
            routing.policy, routing.per_model, failures_to_eject=breaker.failures, cooldown_s=breaker.cooldown_s,
            policy_settings=routing,
        )  # fmt: skip
        for endpoint in [e for e in table.endpoints() if e.source == "route"]:
            table.remove(endpoint.id)
        for endpoint in static_endpoints(config.routes):
            table.upsert(endpoint)
        self.proxy.configure(routing)
        self.proxy.forward_client_auth = not config.auth.enabled
        t = routing.timeouts
        self.upstreams.configure(connect_timeout=t.connect_s, read_timeout=t.first_byte_s, total_timeout=t.total_s or None)

    def add_routes(self, router: web.UrlDispatcher) -> None:
        for path in PROXIED_ROUTES:
            router.add_post(path, self.proxy.handle)
        router.add_get("/v1/models", self.models.list_models)
        # Model names may contain slashes (``Qwen/Qwen2-7B-Instruct``).
        router.add_get("/v1/models/{name:.+}", self.models.get_model)

    def open_session(self) -> aiohttp.ClientSession:
        """The process's client session (call with the loop running); per-request timeouts."""
        connector = aiohttp.TCPConnector(
            limit=0,  # no pool cap: the workers' own queues decide how much runs at once
            limit_per_host=0,
            ttl_dns_cache=300,
            keepalive_timeout=self.upstreams.keepalive_s,
        )
        self.session = self.proxy.session = aiohttp.ClientSession(
            connector=connector,
            timeout=self.proxy.timeout,
            # Relay bytes as they are: a gzip answer stays gzip for the client that asked for it.
            auto_decompress=False,
            # Send only what the client sent; invented defaults (Accept-Encoding: gzip) would
            # change what the upstream answers.
            skip_auto_headers=("Accept-Encoding", "User-Agent", "Content-Type"),
            # A shared jar would carry one client's upstream cookies to the next client.
            cookie_jar=aiohttp.DummyCookieJar(),
            trust_env=False,
        )
        return self.session

    async def close(self) -> None:
        self.proxy.session = None
        self.proxy.close()  # the small client's keep-alive connections
        if self.session is not None:
            await self.session.close()
            self.session = None


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
