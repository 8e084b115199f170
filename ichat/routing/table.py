"""The routing table: model name -> pool of endpoints, with each endpoint's live state.

Static routes are put in at startup; the control plane (``ichat.gateway.control``) upserts and
removes workers, flips ``routable``, and calls :meth:`RoutingTable.declare_unhealthy` when the
registry finds a worker hung or gone, which tells the table's lost-listeners (the proxy wakes the
requests waiting on it). The proxy asks for ``candidates(model, now)``, lets the model's policy
pick one, and reports the outcome with ``record_success`` / ``record_failure``, which drive the
endpoint's :class:`CircuitBreaker`:

    closed --N consecutive failures--> open (ejected until now + cooldown)
    open --cooldown passed--> half-open: offered again, but only while no request is in flight
    half-open --success--> closed          half-open --failure--> open again

Pure: ``now`` is passed in (monotonic seconds), nothing here sleeps, awaits or does I/O.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import attrs
from yarl import URL

from ichat.routing.cachereport import CachedPrefixes
from ichat.routing.policy import Policy, load_policy

_URL_CACHE_SIZE = 64

CLOSED, OPEN, HALF_OPEN = "closed", "open", "half_open"
#: each state's number in the ``ichat_gateway_circuit_breaker_state`` gauge
BREAKER_STATE_VALUES = {CLOSED: 0, OPEN: 1, HALF_OPEN: 2}


@attrs.define(slots=True)
class CircuitBreaker:
    """One endpoint's circuit breaker: consecutive failures open it for a cool-down, after
    which it lets requests through again, one at a time, until one succeeds (closed) or fails
    (open again). Pure: time is an argument."""

    failures_to_open: int = 3
    cooldown_s: float = 10.0
    #: consecutive failures (connect errors, resets, 502/503)
    failures: int = 0
    #: monotonic seconds until which it stays open; 0 = not open
    open_until: float = 0.0

    def state(self, now: float) -> str:
        if self.open_until > now:
            return OPEN
        return HALF_OPEN if self.failures >= self.failures_to_open else CLOSED

    def allows(self, now: float, inflight: int = 0) -> bool:
        """Whether a request may go through now, given the endpoint's requests in flight
        (half-open: one probe at a time, the others wait for its verdict)."""
        if self.open_until > now:
            return False
        return not (self.failures >= self.failures_to_open and inflight > 0)

    def on_success(self) -> None:
        self.failures = 0
        self.open_until = 0.0

    def on_failure(self, now: float) -> bool:
        """Count a failure; True when this one opens the breaker."""
        self.failures += 1
        if self.failures >= self.failures_to_open:
            self.open_until = now + self.cooldown_s
            return True
        return False

    @property
    def tripped(self) -> bool:
        """Anything to reset on success (cheap test on the hot path)."""
        return bool(self.failures or self.open_until)


@attrs.define(slots=True, eq=False)
class Endpoint:
    """One upstream serving one model. Mutable: the table and the proxy update it in place."""

    #: a worker id, or ``route:<model>:<n>`` for the n-th static route of a model
    id: str
    model_name: str
    #: OpenAI base URL (normally ending in ``/v1``); the client path after ``/v1`` is appended
    api_base: str = attrs.field(converter=lambda s: s.rstrip("/"))
    api_key: str | None = None
    weight: float = 1.0
    #: what serves it: "vllm", "sglang", or "openai" for an external OpenAI-compatible server
    backend: str = "openai"
    #: "route" (static config), "worker" (registered itself) or "managed" (started by the gateway)
    source: str = "route"
    #: requests this gateway has in flight to it
    inflight: int = 0
    #: running + waiting requests the endpoint last reported (heartbeats), less the ones this
    #: gateway had in flight to it then: load from elsewhere
    reported_load: int = 0
    #: set by the registry (healthy and ready); static routes start routable
    routable: bool = True
    breaker: CircuitBreaker = attrs.field(factory=CircuitBreaker, repr=False)
    #: what it serves (routes, plus input kinds such as image_input), as its worker reports;
    #: empty for static routes and workers that do not report it
    kinds: tuple[str, ...] = ()
    #: the prompt blocks its engine reports holding (workers started with --report-prefix-cache)
    cached_prefixes: CachedPrefixes | None = attrs.field(default=None, repr=False)
    _auth: str | None = attrs.field(default=None, init=False, repr=False)
    _urls: dict[str, URL] = attrs.field(factory=dict, init=False, repr=False)

    def __attrs_post_init__(self) -> None:
        self._refresh()

    def _refresh(self) -> None:
        self._auth = f"Bearer {self.api_key}" if self.api_key else None
        self._urls = {}

    @property
    def authorization(self) -> str | None:
        """The ``Authorization`` header value for this upstream, built once."""
        return self._auth

    def url(self, raw_v1_path: str, raw_query: str = "") -> URL:
        """Upstream URL for a client path (already percent-encoded, starting with ``/v1``)."""
        if raw_query:
            return URL(f"{self.api_base}{raw_v1_path[3:]}?{raw_query}", encoded=True)
        url = self._urls.get(raw_v1_path)
        if url is None:
            if len(self._urls) >= _URL_CACHE_SIZE:  # /v1/audio/{tail} paths are client-chosen
                self._urls.clear()
            url = self._urls[raw_v1_path] = URL(self.api_base + raw_v1_path[3:], encoded=True)
        return url

    def is_ejected(self, now: float) -> bool:
        return self.breaker.open_until > now

    @property
    def failures(self) -> int:
        """Consecutive failures its breaker counted."""
        return self.breaker.failures

    @failures.setter
    def failures(self, value: int) -> None:
        self.breaker.failures = value

    @property
    def ejected_until(self) -> float:
        """Monotonic seconds until which its breaker is open; 0 = not open."""
        return self.breaker.open_until


class RoutingTable:
    def __init__(
        self,
        default_policy: str = "cache_aware",
        per_model: Mapping[str, str] | None = None,
        *,
        failures_to_eject: int = 3,
        cooldown_s: float = 10.0,
        policy_loader: Callable[[str], Policy] = load_policy,
        policy_settings: Any = None,
    ) -> None:
        self._default_policy = default_policy
        #: the gateway's routing settings, handed to policies that have ``configure``
        self._policy_settings = policy_settings
        self._per_model = dict(per_model or {})
        self._failures_to_eject = failures_to_eject
        self._cooldown_s = cooldown_s
        self._load_policy = policy_loader
        self._endpoints: dict[str, Endpoint] = {}
        self._pools: dict[str, list[Endpoint]] = {}
        self._policies: dict[str, Policy] = {}
        self._lost_listeners: list[Callable[[Endpoint], None]] = []
        #: model -> the name its policy instance was made from
        self._policy_names: dict[str, str] = {}
        # Fail at startup, not on the first request, if a policy name is wrong.
        for name in {default_policy, *self._per_model.values()}:
            policy_loader(name)

    def configure(
        self,
        default_policy: str,
        per_model: Mapping[str, str],
        *,
        failures_to_eject: int,
        cooldown_s: float,
        policy_settings: Any = None,
    ) -> None:
        """Apply new routing settings (config reload); endpoints and their live state stay."""
        for name in {default_policy, *per_model.values()}:
            self._load_policy(name)
        self._default_policy = default_policy
        self._per_model = dict(per_model)
        self._failures_to_eject = failures_to_eject
        self._cooldown_s = cooldown_s
        if policy_settings is not None:
            self._policy_settings = policy_settings
        # A model whose policy name is unchanged keeps its instance (a prefix index, round
        # robin's position) with the new settings; the others are re-created on next use.
        for model, policy in list(self._policies.items()):
            if self._policy_names.get(model) != self._policy_name(model):
                del self._policies[model]
            else:
                self._configure_policy(policy)
        for endpoint in self._endpoints.values():
            endpoint.breaker.failures_to_open = failures_to_eject
            endpoint.breaker.cooldown_s = cooldown_s

    def add_lost_listener(self, listener: Callable[[Endpoint], None]) -> None:
        """Call ``listener(endpoint)`` when an endpoint is declared unhealthy."""
        self._lost_listeners.append(listener)

    def declare_unhealthy(self, endpoint_id: str) -> None:
        """The control plane found this worker hung or unreachable: out of rotation, and
        whoever waits on it is told now (not when its own timeouts would fire)."""
        endpoint = self._endpoints.get(endpoint_id)
        if endpoint is None:
            return
        endpoint.routable = False
        for listener in self._lost_listeners:
            listener(endpoint)


    # -- membership ----------------------------------------------------------------------------

    def upsert(self, endpoint: Endpoint) -> Endpoint:
        """Add ``endpoint``, or update the one with its id in place and return the stored one.

        Updating in place keeps the live counters (in flight, failures) that running requests
        and the circuit breaker hold on to.
        """
        current = self._endpoints.get(endpoint.id)
        if current is None:
            endpoint.breaker.failures_to_open = self._failures_to_eject
            endpoint.breaker.cooldown_s = self._cooldown_s
            self._endpoints[endpoint.id] = endpoint
            self._pools.setdefault(endpoint.model_name, []).append(endpoint)
            return endpoint
        if current.model_name != endpoint.model_name:
            self._leave_pool(current)
            current.model_name = endpoint.model_name
            self._pools.setdefault(current.model_name, []).append(current)
        current.api_base = endpoint.api_base
        current.api_key = endpoint.api_key
        current.weight = endpoint.weight
        current.backend = endpoint.backend
        current.source = endpoint.source
        current.reported_load = endpoint.reported_load
        current.routable = endpoint.routable
        current.kinds = endpoint.kinds
        current._refresh()
        return current

    def remove(self, endpoint_id: str) -> Endpoint | None:
        endpoint = self._endpoints.pop(endpoint_id, None)
        if endpoint is not None:
            self._leave_pool(endpoint)
        return endpoint

    def _leave_pool(self, endpoint: Endpoint) -> None:
        pool = self._pools[endpoint.model_name]
        pool.remove(endpoint)
        forget = getattr(self._policies.get(endpoint.model_name), "forget", None)
        if forget is not None:
            forget(endpoint.id)  # its prefix index entries, its sessions: nothing stays behind
        if not pool:
            del self._pools[endpoint.model_name]
            self._policies.pop(endpoint.model_name, None)

    def get(self, endpoint_id: str) -> Endpoint | None:
        return self._endpoints.get(endpoint_id)

    def endpoints(self, model: str | None = None) -> Sequence[Endpoint]:
        """Every endpoint of ``model`` (or of all models), routable or not."""
        if model is None:
            return list(self._endpoints.values())
        return self._pools.get(model, ())

    def models(self) -> list[str]:
        """Model names with at least one endpoint, sorted."""
        return sorted(self._pools)

    def has_model(self, model: str) -> bool:
        return model in self._pools

    def kinds(self, model: str, routable_only: bool = False) -> list[str]:
        """What the endpoints of ``model`` report serving, merged and sorted."""
        return sorted({k for ep in self._pools.get(model, ()) if ep.routable or not routable_only for k in ep.kinds})

    # -- routing -------------------------------------------------------------------------------

    def candidates(self, model: str, now: float) -> list[Endpoint]:
        """Endpoints that may take a request now: routable, and not ejected; an endpoint whose
        cool-down has passed is offered again as a single half-open probe."""
        pool = self._pools.get(model)
        if not pool:
            return []
        return [ep for ep in pool if ep.routable and ep.breaker.allows(now, ep.inflight)]

    def policy_for(self, model: str) -> Policy:
        policy = self._policies.get(model)
        if policy is None:
            name = self._policy_names[model] = self._policy_name(model)
            policy = self._policies[model] = self._load_policy(name)
            self._configure_policy(policy)
        return policy

    def _policy_name(self, model: str) -> str:
        return self._per_model.get(model, self._default_policy)

    def _configure_policy(self, policy: Policy) -> None:
        configure = getattr(policy, "configure", None)
        if configure is not None and self._policy_settings is not None:
            configure(self._policy_settings)

    def policy_samples(self) -> Iterator[tuple[str, str, str, dict[str, str], float]]:
        """Metrics of the policies that keep some (a source for GatewayMetrics.add_source)."""
        for model, policy in list(self._policies.items()):
            samples = getattr(policy, "samples", None)
            if samples is None:
                continue
            for name, help_text, kind, labels, value in samples():
                yield name, help_text, kind, {"model": model, **labels}, value

    def retry_after(self, model: str, now: float) -> int:
        """Seconds until an ejected endpoint of ``model`` is probed again (at least 1)."""
        waits = [ep.ejected_until - now for ep in self._pools.get(model, ()) if ep.routable and ep.ejected_until > now]
        return max(1, math.ceil(min(waits))) if waits else 1

    # -- outcomes (circuit breaker) ------------------------------------------------------------

    def record_success(self, endpoint: Endpoint) -> None:
        endpoint.breaker.on_success()

    def record_failure(self, endpoint: Endpoint, now: float) -> bool:
        """Count a failure; returns True when this failure ejects the endpoint."""
        return endpoint.breaker.on_failure(now)
