"""The control plane in process: heartbeats feed the routing table, a fake clock drives expiry,
tokens guard registration and the admin API. The upstream is an in-process fake worker."""

from __future__ import annotations

from urllib.parse import urlparse

from ichat.gateway.admin import CONTROL_KEY


def beat_for(fake, *, worker_id="w1", instance="i1", state="ready", interval=2.0, model="m", **extra):
    url = urlparse(fake.api_base)
    body = {
        "worker_id": worker_id, "instance_id": instance, "model_name": model, "backend": "vllm",
        "host": url.hostname, "port": url.port, "state": state, "heartbeat_interval": interval,
        "load": {"running": 0, "waiting": 0},
    }  # fmt: skip
    body.update(extra)
    return body


def chat(model="m"):
    return {"model": model, "messages": [{"role": "user", "content": "hi"}]}


async def test_heartbeat_registers_and_the_worker_serves(gateway, fake_upstream):
    fake = await fake_upstream("w1")
    client = await gateway({})
    assert (await client.post("/v1/chat/completions", json=chat())).status == 404
    resp = await client.post("/v1/workers/heartbeat", json=beat_for(fake))
    assert resp.status == 200 and (await resp.json())["routable"] is True
    resp = await client.post("/v1/chat/completions", json=chat())
    assert resp.status == 200 and fake.hits == 1
    models = await (await client.get("/v1/models")).json()
    assert [m["id"] for m in models["data"]] == ["m"]


async def test_loading_worker_means_503_with_retry_after(gateway, fake_upstream):
    fake = await fake_upstream("w1")
    client = await gateway({})
    await client.post("/v1/workers/heartbeat", json=beat_for(fake, state="loading"))
    resp = await client.post("/v1/chat/completions", json=chat())
    assert resp.status == 503 and "Retry-After" in resp.headers
    assert (await resp.json())["error"]["code"] == "no_healthy_endpoint"
    await client.post("/v1/workers/heartbeat", json=beat_for(fake, state="ready"))
    assert (await client.post("/v1/chat/completions", json=chat())).status == 200


async def test_missed_beats_take_it_out_and_a_beat_brings_it_back(gateway, fake_upstream, clock):
    fake = await fake_upstream("w1")
    client = await gateway({})
    control = client.app[CONTROL_KEY]
    await client.post("/v1/workers/heartbeat", json=beat_for(fake, interval=2.0))
    clock.now += 6.5  # more than 3 intervals
    control.tick()
    assert (await client.post("/v1/chat/completions", json=chat())).status == 503
    views = await (await client.get("/v1/admin/workers")).json()
    assert views["data"][0]["state"] == "unhealthy" and views["data"][0]["routable"] is False
    await client.post("/v1/workers/heartbeat", json=beat_for(fake, interval=2.0))
    assert (await client.post("/v1/chat/completions", json=chat())).status == 200


async def test_eviction_forgets_the_worker(gateway, fake_upstream, clock):
    fake = await fake_upstream("w1")
    client = await gateway({"registry": {"evict_after_s": 30}})
    await client.post("/v1/workers/heartbeat", json=beat_for(fake))
    clock.now += 31
    client.app[CONTROL_KEY].tick()
    assert (await client.get("/v1/admin/workers/w1")).status == 404
    assert (await client.post("/v1/chat/completions", json=chat())).status == 404


async def test_two_registered_workers_share_a_model(gateway, fake_upstream):
    a, b = await fake_upstream("a"), await fake_upstream("b")
    client = await gateway({"routing": {"policy": "round_robin"}})
    await client.post("/v1/workers/heartbeat", json=beat_for(a, worker_id="wa"))
    await client.post("/v1/workers/heartbeat", json=beat_for(b, worker_id="wb"))
    for _ in range(10):
        assert (await client.post("/v1/chat/completions", json=chat())).status == 200
    assert (a.hits, b.hits) == (5, 5)


async def test_old_instance_cannot_deregister_its_successor(gateway, fake_upstream):
    fake = await fake_upstream("w1")
    client = await gateway({})
    await client.post("/v1/workers/heartbeat", json=beat_for(fake, instance="old"))
    await client.post("/v1/workers/heartbeat", json=beat_for(fake, instance="new"))
    resp = await client.post("/v1/workers/deregister", json={"worker_id": "w1", "instance_id": "old"})
    assert (await resp.json())["removed"] is False
    assert (await client.post("/v1/chat/completions", json=chat())).status == 200
    resp = await client.post("/v1/workers/deregister", json={"worker_id": "w1", "instance_id": "new"})
    assert (await resp.json())["removed"] is True
    assert (await client.post("/v1/chat/completions", json=chat())).status == 404


async def test_bad_heartbeat_is_400_naming_the_field(gateway, fake_upstream):
    fake = await fake_upstream("w1")
    client = await gateway({})
    resp = await client.post("/v1/workers/heartbeat", json=beat_for(fake, state="napping"))
    assert resp.status == 400 and (await resp.json())["error"]["param"] == "state"
    assert (await client.post("/v1/workers/heartbeat", data=b"{nope")).status == 400


async def test_worker_token_and_admin_key(gateway, fake_upstream):
    fake = await fake_upstream("w1")
    client = await gateway({"auth": {"api_keys": ["client"], "admin_key": "admin", "worker_token": "cluster"}})
    assert (await client.post("/v1/workers/heartbeat", json=beat_for(fake))).status == 401
    bad = await client.post("/v1/workers/heartbeat", json=beat_for(fake), headers={"Authorization": "Bearer client"})
    assert bad.status == 401
    ok = await client.post("/v1/workers/heartbeat", json=beat_for(fake), headers={"Authorization": "Bearer cluster"})
    assert ok.status == 200
    assert (await client.get("/v1/admin/workers")).status == 401
    assert (await client.get("/v1/admin/workers", headers={"Authorization": "Bearer client"})).status == 401
    assert (await client.get("/v1/admin/workers", headers={"Authorization": "Bearer admin"})).status == 200
    assert (await client.get("/v1/logs/stream", headers={"Authorization": "Bearer client"})).status == 401
    resp = await client.post("/v1/chat/completions", json=chat(), headers={"Authorization": "Bearer client"})
    assert resp.status == 200
    assert (await client.get("/health")).status == 200


async def test_client_keys_open_the_admin_api_only_when_the_config_says_so(gateway):
    client = await gateway({"auth": {"api_keys": ["client"], "admin_key": "admin"}})
    assert (await client.get("/v1/admin/cluster/status", headers={"Authorization": "Bearer client"})).status == 401
    client = await gateway({"auth": {"api_keys": ["client"], "admin_key": "admin", "allow_client_keys_for_admin": True}})
    assert (await client.get("/v1/admin/cluster/status", headers={"Authorization": "Bearer client"})).status == 200
    assert (await client.get("/v1/admin/cluster/status", headers={"Authorization": "Bearer admin"})).status == 200


async def test_admin_views_and_errors(gateway, fake_upstream):
    fake = await fake_upstream("w1")
    client = await gateway({})
    await client.post("/v1/workers/heartbeat", json=beat_for(fake, gpus=[{"index": 0, "uuid": "GPU-x"}]))
    status = await (await client.get("/v1/admin/cluster/status")).json()
    assert status["workers"]["by_state"] == {"ready": 1}
    assert status["models"] == {"m": {"replicas": 1, "routable": 1}}
    assert status["gpus_by_worker"] == {"w1": [{"index": 0, "uuid": "GPU-x"}]}
    version = await (await client.get("/v1/admin/cluster/version")).json()
    assert "vllm" in version["engines"] and version["version"]
    detail = await (await client.get("/v1/admin/workers/w1")).json()
    assert detail["source"] == "worker" and detail["address"].startswith("http://")
    assert (await client.get("/v1/admin/workers/nope")).status == 404
    resp = await client.delete("/v1/admin/workers/w1")
    assert resp.status == 200 and "not started by the gateway" in (await resp.json())["message"]
    assert (await client.delete("/v1/admin/workers/w1")).status == 404


async def test_launch_validates_before_starting_anything(gateway):
    client = await gateway({})
    resp = await client.post("/v1/admin/workers/launch", json={"model_name": "m", "model_path": "/x", "port": "eighty"})
    assert resp.status == 422
    error = (await resp.json())["error"]
    assert "port" in error["message"] and error["code"] == "invalid_worker_spec"
    resp = await client.post("/v1/admin/workers/launch", json={"model_name": "m", "port": 8001})
    assert resp.status == 422 and "model_path" in (await resp.json())["error"]["message"]
    assert (await client.post("/v1/admin/workers/launch", json=[1])).status == 422
    assert client.app[CONTROL_KEY].managed_ids() == []


async def test_reload_without_a_config_file_is_refused(gateway):
    client = await gateway({})
    resp = await client.post("/v1/admin/config/reload")
    assert resp.status == 422 and "config" in (await resp.json())["error"]["message"]


async def test_external_load_steers_least_inflight(gateway, fake_upstream):
    a, b = await fake_upstream("a"), await fake_upstream("b")
    client = await gateway({})
    await client.post("/v1/workers/heartbeat", json=beat_for(a, worker_id="wa", load={"running": 4, "waiting": 2}))
    await client.post("/v1/workers/heartbeat", json=beat_for(b, worker_id="wb"))
    for _ in range(5):
        await client.post("/v1/chat/completions", json=chat())
    assert (a.hits, b.hits) == (0, 5)


async def test_gateway_metrics_show_workers_by_state_and_heartbeat_age(gateway, fake_upstream, clock):
    from prometheus_client.parser import text_string_to_metric_families

    fake = await fake_upstream("w1")
    client = await gateway({})
    await client.post("/v1/workers/heartbeat", json=beat_for(fake))
    clock.now += 1.5
    samples = {}
    for family in text_string_to_metric_families(await (await client.get("/metrics")).text()):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    assert samples[("ichat_gateway_workers", (("state", "ready"),))] == 1
    assert samples[("ichat_gateway_worker_heartbeat_age_seconds", (("model", "m"), ("worker", "w1")))] == 1.5


async def test_applied_config_changes_routes_policies_and_timeouts(gateway, fake_upstream):
    from ichat.config import GatewayConfig
    from ichat.gateway.app import PROXY_KEY

    a, b = await fake_upstream("a"), await fake_upstream("b")
    client = await gateway({"routes": [{"model_name": "old", "api_base": a.api_base}]})
    new = GatewayConfig.from_dict(
        {
            "routes": [{"model_name": "new", "api_base": b.api_base}],
            "routing": {"policy": "round_robin", "retries": 0, "timeouts": {"connect_s": 1, "first_byte_s": 7, "total_s": 0}},
        },
        source="new.yaml",
        environ={},
    )
    summary = await client.app[CONTROL_KEY].apply(new)
    assert summary["routes"] == 1
    assert (await client.post("/v1/chat/completions", json=chat("old"))).status == 404
    assert (await client.post("/v1/chat/completions", json=chat("new"))).status == 200 and b.hits == 1
    proxy = client.app[PROXY_KEY]
    assert (proxy.retries, proxy.upstreams.read_timeout, proxy.upstreams.total_timeout) == (0, 7, None)
    assert proxy.timeout.sock_read == 7
