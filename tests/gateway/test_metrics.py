"""``GET /metrics``: counts match the requests made, per model and status, through fake upstreams."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from aiohttp.test_utils import TestClient
from prometheus_client.parser import text_string_to_metric_families

from ichat.gateway.app import TABLE_KEY
from ichat.gateway.metrics import METRICS_KEY, GatewayMetrics

from .fakes import MakeGateway, MakeUpstream
from .test_proxy import CHAT, dead_api_base, eventually, routes

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


async def scrape(client: TestClient) -> tuple[str, Samples]:
    resp = await client.get("/metrics")
    assert resp.status == 200 and resp.headers["Content-Type"].startswith("text/plain")
    text = await resp.text()
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return text, samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def total(samples: Samples, name: str, **labels: str) -> float:
    """Sum over every series of ``name`` whose labels include ``labels``."""
    want = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and want <= ls)


async def test_requests_are_counted_per_model_endpoint_and_status(fake_upstream: MakeUpstream, gateway: MakeGateway):
    good = await fake_upstream("good")
    limited = await fake_upstream("limited", "status", status=429)
    client = await gateway({"routes": routes("alpha", good) + routes("beta", limited)})

    for _ in range(5):
        assert (await client.post(CHAT, json={"model": "alpha"})).status == 200
    for _ in range(3):
        assert (await client.post(CHAT, json={"model": "beta"})).status == 429
    for bogus in ("gamma", "delta", "gamma", "x" * 200):
        assert (await client.post(CHAT, json={"model": bogus})).status == 404
    assert (await client.post(CHAT, data=b"{not json")).status == 400

    text, samples = await scrape(client)
    requests = "ichat_gateway_requests_total"
    assert value(samples, requests, model="alpha", endpoint="route:alpha:0", status="200") == 5
    assert value(samples, requests, model="beta", endpoint="route:beta:0", status="429") == 3
    assert value(samples, requests, model="__unknown__", endpoint="none", status="404") == 4
    assert value(samples, requests, model="__unknown__", endpoint="none", status="400") == 1
    assert total(samples, requests) == 13  # nothing else counted
    assert "gamma" not in text and "delta" not in text and "xxxx" not in text  # bogus names mint no series

    duration = "ichat_gateway_request_duration_seconds"
    assert value(samples, duration + "_count", model="alpha") == 5
    assert value(samples, duration + "_bucket", model="alpha", le="+Inf") == 5
    assert value(samples, duration + "_count", model="__unknown__") == 5
    assert 0 < value(samples, duration + "_sum", model="alpha") < 5
    ttfb = "ichat_gateway_time_to_first_byte_seconds"
    assert value(samples, ttfb + "_count", model="alpha") == 5 and value(samples, ttfb + "_count", model="beta") == 3
    assert value(samples, ttfb + "_count", model="__unknown__") == 0  # never reached an upstream


async def test_retries_ejections_and_upstream_errors(fake_upstream: MakeUpstream, gateway: MakeGateway):
    flaky = await fake_upstream("flaky", "status", status=503)
    good = await fake_upstream("good")
    client = await gateway(
        {
            "routes": routes("m", flaky, good) + routes("gone", dead_api_base()),
            "routing": {"policy": "round_robin", "circuit_breaker": {"failures": 2, "cooldown_s": 60}},
        }
    )
    for _ in range(4):  # flaky is tried on requests 1 and 3 (retried on good), then ejected
        assert (await client.post(CHAT, json={"model": "m"})).status == 200
    assert (await client.post(CHAT, json={"model": "gone"})).status == 502

    _, samples = await scrape(client)
    assert value(samples, "ichat_gateway_retries_total", model="m") == 2
    assert value(samples, "ichat_gateway_ejections_total", model="m", endpoint="route:m:0") == 1
    errors = "ichat_gateway_upstream_errors_total"
    assert value(samples, errors, model="m", endpoint="route:m:0", kind="status_503") == 2
    assert value(samples, errors, model="gone", endpoint="route:gone:0", kind="connect") == 1
    assert value(samples, "ichat_gateway_requests_total", model="m", endpoint="route:m:1", status="200") == 4
    assert value(samples, "ichat_gateway_requests_total", model="gone", endpoint="route:gone:0", status="502") == 1


async def test_broken_stream_and_client_gone(fake_upstream: MakeUpstream, gateway: MakeGateway):
    dying = await fake_upstream("dying", "die_mid_stream")
    slow = await fake_upstream("slow", "stream", chunks=500, delay=0.05)
    client = await gateway({"routes": routes("d", dying) + routes("s", slow)})

    resp = await client.post(CHAT, json={"model": "d", "stream": True})
    await asyncio.wait_for(resp.read(), 5)

    resp = await client.post(CHAT, json={"model": "s", "stream": True})
    await resp.content.readany()
    _, samples = await scrape(client)
    assert value(samples, "ichat_gateway_inflight_requests", model="s", endpoint="route:s:0") == 1
    resp.close()  # the client goes away mid-stream
    await asyncio.wait_for(slow.aborted.wait(), 2)
    endpoint = client.app[TABLE_KEY].get("route:s:0")
    await eventually(lambda: endpoint.inflight == 0)

    _, samples = await scrape(client)
    errors = "ichat_gateway_upstream_errors_total"
    assert value(samples, errors, model="d", endpoint="route:d:0", kind="broken_stream") == 1
    assert value(samples, "ichat_gateway_requests_total", model="d", endpoint="route:d:0", status="200") == 1
    assert value(samples, "ichat_gateway_requests_total", model="s", endpoint="route:s:0", status="499") == 1
    assert value(samples, "ichat_gateway_inflight_requests", model="s", endpoint="route:s:0") == 0


async def test_series_of_a_removed_endpoint_go_away(fake_upstream: MakeUpstream, gateway: MakeGateway):
    a = await fake_upstream("a")
    client = await gateway({"routes": routes("m", a, a)})
    for _ in range(4):
        await client.post(CHAT, json={"model": "m"})
    _, samples = await scrape(client)
    assert total(samples, "ichat_gateway_requests_total", endpoint="route:m:1") > 0

    client.app[TABLE_KEY].remove("route:m:1")
    text, samples = await scrape(client)
    assert "route:m:1" not in text
    assert total(samples, "ichat_gateway_requests_total", model="m") < 4  # route:m:0's share stays


async def test_sources_add_series_at_scrape_time(gateway: MakeGateway):
    client = await gateway({})
    metrics = client.app[METRICS_KEY]
    workers = {"ready": 2, "starting": 1}

    def registry_source() -> Any:
        for state, n in workers.items():
            yield ("ichat_gateway_workers", "Workers by state.", "gauge", {"state": state}, n)
        yield ("ichat_gateway_worker_restarts_total", "Managed-worker restarts.", "counter", {"worker": "w1"}, 3)

    def broken_source() -> Any:
        raise RuntimeError("boom")

    metrics.add_source(broken_source)
    metrics.add_source(registry_source)
    _, samples = await scrape(client)
    assert value(samples, "ichat_gateway_workers", state="ready") == 2
    assert value(samples, "ichat_gateway_worker_restarts_total", worker="w1") == 3

    workers["ready"] = 5  # read again at every scrape
    _, samples = await scrape(client)
    assert value(samples, "ichat_gateway_workers", state="ready") == 5


async def test_metrics_stay_open_when_auth_is_on(gateway: MakeGateway):
    client = await gateway({"auth": {"api_keys": ["k"]}})
    assert (await client.get("/metrics")).status == 200
    assert (await client.get("/v1/models")).status == 401


def test_apps_do_not_share_metrics():
    one, two = GatewayMetrics(), GatewayMetrics()
    one.request_done("m", "e", 200, 0.1, 0.05)
    assert one.registry is not two.registry
    assert b'model="m"' in one.render()[0] and b'model="m"' not in two.render()[0]


@pytest.mark.parametrize("accept", ["application/openmetrics-text; version=1.0.0", None])
def test_render_negotiates_the_format(accept: str | None):
    metrics = GatewayMetrics()
    metrics.request_done("m", "e", 200, 0.1, None)
    body, content_type = metrics.render(accept)
    assert (content_type.startswith("application/openmetrics-text")) is (accept is not None)
    assert b"ichat_gateway_requests_total" in body
