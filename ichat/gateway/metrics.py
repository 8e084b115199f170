"""The gateway's metrics, served as Prometheus text at ``GET /metrics``.

One :class:`GatewayMetrics` per app (``app[METRICS_KEY]``), with its own ``CollectorRegistry``;
nothing is global. The data plane records into plain ints and small bucket arrays (a dict
update or two per request, no locks: the gateway is one event loop), and prometheus_client's
metric families are built from them only when ``/metrics`` is scraped, by one custom
collector. prometheus-async is not used: its aiohttp handler serves only the process-global
registry, and its decorators would add a wrapper per request to the hot path.

Series (labels are model names, endpoint ids and fixed words only, so cardinality is bounded
by the configured models and the fleet):

    ichat_gateway_requests_total{model,endpoint,status}      answers given to clients
    ichat_gateway_request_duration_seconds{model}           histogram, request in -> last byte out
    ichat_gateway_time_to_first_byte_seconds{model}         histogram, request in -> upstream's head
    ichat_gateway_inflight_requests{model,endpoint}         gauge, read from the routing table
    ichat_gateway_retries_total{model}                      attempts beyond the first
    ichat_gateway_ejections_total{model,endpoint}           circuit breaker openings
    ichat_gateway_upstream_errors_total{model,endpoint,kind}
        kind: connect, timeout, reset, status_502, status_503, broken_stream, unhealthy
    ichat_gateway_stream_migrations_total{model}            streams continued on another replica
    ichat_gateway_circuit_breaker_state{model,endpoint}     gauge: 0 closed, 1 open, 2 half-open

``status`` is the HTTP status the client got, 499 when the client went away first. A request
naming a model the gateway does not serve is counted as ``model="__unknown__"`` (so bogus
names cannot mint series); one that never reached an endpoint has ``endpoint="none"``.
When an endpoint leaves the routing table, its series are dropped at the next scrape.

Other modules add their own series with :meth:`GatewayMetrics.add_source`: a function called
at every scrape that returns ``(name, help, kind, labels, value)`` tuples, ``kind`` being
"gauge" or "counter" (a counter's name ends in ``_total``). For example the worker registry::

    def worker_series():
        for state, n in registry.count_by_state().items():
            yield ("ichat_gateway_workers", "Workers by state.", "gauge", {"state": state}, n)
        for w in registry.workers():
            yield ("ichat_gateway_heartbeat_age_seconds", "Seconds since the last heartbeat.",
                   "gauge", {"worker": w.id}, now() - w.last_heartbeat)

    app[METRICS_KEY].add_source(worker_series)

A source that raises is logged and skipped; the rest of the scrape still answers.
"""

from __future__ import annotations

import logging
from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator, Mapping

from aiohttp import web
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import Metric

from ichat.routing.table import BREAKER_STATE_VALUES, RoutingTable

log = logging.getLogger(__name__)

UNKNOWN_MODEL = "__unknown__"
NO_ENDPOINT = "none"
#: the status recorded when the client went away before its answer was complete
CLIENT_CLOSED = 499

#: seconds; LLM requests run from milliseconds (embeddings, cached) to minutes (long generations)
DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)
#: seconds; the first byte is the upstream's response head (a queued or prefilling engine is slow)
TTFB_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)

Sample = tuple[str, str, str, Mapping[str, str], float]
Source = Callable[[], Iterable[Sample]]


class Histogram:
    """Bucket counts and a sum; cumulative only when exported."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last one is +Inf
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value

    def cumulative(self) -> Iterator[tuple[str, int]]:
        total = 0
        for bound, count in zip((*map(_float_label, self.bounds), "+Inf"), self.counts):
            total += count
            yield bound, total


def _float_label(value: float) -> str:
    return repr(float(value))


class GatewayMetrics:
    def __init__(self, table: RoutingTable | None = None, clock: Callable[[], float] | None = None) -> None:
        self.table = table
        #: the routing table's clock (breaker states are read against it at scrape time)
        self.clock = clock
        self.registry = CollectorRegistry(auto_describe=False)
        self._requests: dict[tuple[str, str, int], int] = {}
        self._duration: dict[str, Histogram] = {}
        self._ttfb: dict[str, Histogram] = {}
        self._retries: dict[str, int] = {}
        self._ejections: dict[tuple[str, str], int] = {}
        self._upstream_errors: dict[tuple[str, str, str], int] = {}
        self._migrations: dict[str, int] = {}
        self._sources: list[Source] = []
        self.registry.register(_Collector(self))

    # -- the data plane records (cheap: called per request) -----------------------------------

    def request_done(self, model: str, endpoint: str, status: int, duration: float, ttfb: float | None) -> None:
        key = (model, endpoint, status)
        requests = self._requests
        requests[key] = requests.get(key, 0) + 1
        histogram = self._duration.get(model)
        if histogram is None:
            histogram = self._duration[model] = Histogram(DURATION_BUCKETS)
        histogram.observe(duration)
        if ttfb is not None:
            histogram = self._ttfb.get(model)
            if histogram is None:
                histogram = self._ttfb[model] = Histogram(TTFB_BUCKETS)
            histogram.observe(ttfb)

    def retried(self, model: str) -> None:
        self._retries[model] = self._retries.get(model, 0) + 1

    def ejected(self, model: str, endpoint: str) -> None:
        key = (model, endpoint)
        self._ejections[key] = self._ejections.get(key, 0) + 1

    def migrated(self, model: str) -> None:
        self._migrations[model] = self._migrations.get(model, 0) + 1

    def upstream_error(self, model: str, endpoint: str, kind: str) -> None:
        key = (model, endpoint, kind)
        self._upstream_errors[key] = self._upstream_errors.get(key, 0) + 1

    # -- lifecycle of series ------------------------------------------------------------------

    def forget_endpoint(self, endpoint: str) -> None:
        """Drop every series labelled with ``endpoint`` (it left the fleet)."""
        for series in (self._requests, self._ejections, self._upstream_errors):
            for key in [k for k in series if k[1] == endpoint]:
                del series[key]

    def add_source(self, source: Source) -> None:
        """Call ``source()`` at every scrape and export what it yields (see the module doc)."""
        self._sources.append(source)

    # -- scrape -------------------------------------------------------------------------------

    def render(self, accept: str | None = None) -> tuple[bytes, str]:
        """The exposition for an ``Accept`` header: (body, content type)."""
        encoder, content_type = choose_encoder(accept or "")
        return encoder(self.registry), content_type

    def _prune(self) -> None:
        if self.table is None:
            return
        known = {ep.id for ep in self.table.endpoints()}
        known.add(NO_ENDPOINT)
        gone = {k[1] for k in self._requests} | {k[1] for k in self._ejections} | {k[1] for k in self._upstream_errors}
        for endpoint in gone - known:
            self.forget_endpoint(endpoint)

    def collect(self) -> Iterator[Metric]:
        self._prune()
        family = Metric("ichat_gateway_requests", "Requests answered, by model, endpoint and HTTP status.", "counter")
        for (model, endpoint, status), n in sorted(self._requests.items()):
            family.add_sample(
                "ichat_gateway_requests_total", {"model": model, "endpoint": endpoint, "status": str(status)}, n
            )
        yield family
        yield _histogram_family(
            "ichat_gateway_request_duration_seconds", "Seconds from a request's arrival to its last byte.", self._duration
        )
        yield _histogram_family(
            "ichat_gateway_time_to_first_byte_seconds",
            "Seconds from a request's arrival to the upstream's response head.",
            self._ttfb,
        )
        family = Metric("ichat_gateway_inflight_requests", "Requests in flight, by model and endpoint.", "gauge")
        if self.table is not None:
            for ep in self.table.endpoints():
                family.add_sample(
                    "ichat_gateway_inflight_requests", {"model": ep.model_name, "endpoint": ep.id}, ep.inflight
                )
        yield family
        family = Metric(
            "ichat_gateway_circuit_breaker_state", "Circuit breaker of each endpoint: 0 closed, 1 open, 2 half-open.", "gauge"
        )
        if self.table is not None and self.clock is not None:
            now = self.clock()
            for ep in self.table.endpoints():
                state = BREAKER_STATE_VALUES[ep.breaker.state(now)]
                family.add_sample("ichat_gateway_circuit_breaker_state", {"model": ep.model_name, "endpoint": ep.id}, state)
        yield family
        family = Metric("ichat_gateway_stream_migrations", "Streams continued on another replica.", "counter")
        for model, n in sorted(self._migrations.items()):
            family.add_sample("ichat_gateway_stream_migrations_total", {"model": model}, n)
        yield family
        family = Metric("ichat_gateway_retries", "Attempts on another endpoint after a failure.", "counter")
        for model, n in sorted(self._retries.items()):
            family.add_sample("ichat_gateway_retries_total", {"model": model}, n)
        yield family
        family = Metric("ichat_gateway_ejections", "Endpoints ejected by the circuit breaker.", "counter")
        for (model, endpoint), n in sorted(self._ejections.items()):
            family.add_sample("ichat_gateway_ejections_total", {"model": model, "endpoint": endpoint}, n)
        yield family
        family = Metric("ichat_gateway_upstream_errors", "Upstream failures, by kind.", "counter")
        for (model, endpoint, kind), n in sorted(self._upstream_errors.items()):
            family.add_sample(
                "ichat_gateway_upstream_errors_total", {"model": model, "endpoint": endpoint, "kind": kind}, n
            )
        yield family
        yield from self._collect_sources()

    def _collect_sources(self) -> Iterator[Metric]:
        families: dict[str, Metric] = {}
        for source in self._sources:
            try:
                samples = list(source())
            except Exception:
                log.exception("metrics source %r failed; its series are left out of this scrape", source)
                continue
            for name, help_text, kind, labels, value in samples:
                if kind not in ("gauge", "counter"):
                    log.warning("metrics source %r: %s has kind %r, not gauge or counter", source, name, kind)
                    continue
                family_name = name[: -len("_total")] if kind == "counter" and name.endswith("_total") else name
                family = families.get(family_name)
                if family is None:
                    family = families[family_name] = Metric(family_name, help_text, kind)
                sample_name = family_name + "_total" if kind == "counter" else family_name
                family.add_sample(sample_name, dict(labels), float(value))
        yield from families.values()


class _Collector:
    def __init__(self, metrics: GatewayMetrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterator[Metric]:
        return self._metrics.collect()


def _histogram_family(name: str, help_text: str, histograms: dict[str, Histogram]) -> Metric:
    family = Metric(name, help_text, "histogram")
    for model, histogram in sorted(histograms.items()):
        count = 0
        for bound, count in histogram.cumulative():
            family.add_sample(name + "_bucket", {"model": model, "le": bound}, count)
        family.add_sample(name + "_count", {"model": model}, count)
        family.add_sample(name + "_sum", {"model": model}, histogram.sum)
    return family


METRICS_KEY = web.AppKey("ichat_metrics", GatewayMetrics)


async def metrics_handler(request: web.Request) -> web.Response:
    """``GET /metrics``"""
    body, content_type = request.app[METRICS_KEY].render(request.headers.get("Accept"))
    return web.Response(body=body, headers={"Content-Type": content_type})
