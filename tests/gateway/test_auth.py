"""Who may call what, in process: the three route classes, loopback-only without a credential,
no client-key fallback into the admin API, worker-token rotation, managed children's secrets.

The gateway's test server listens on 127.0.0.1, so "another host" is simulated here by making
the authenticator see a non-loopback peer (``remote`` fixture); tests/e2e/test_security.py
does the same from a real network namespace."""

from __future__ import annotations

import pytest

from ichat.config import GatewayConfig
from ichat.gateway import auth as auth_module
from ichat.gateway.admin import CONTROL_KEY
from ichat.gateway.auth import ADMIN, CLIENT, OPEN, WORKER, describe_access, is_loopback, route_class

from .test_control import beat_for, chat


@pytest.fixture
def remote(monkeypatch):
    """Requests look as if they came from 10.9.8.7 (another host)."""
    monkeypatch.setattr(auth_module, "peer_host", lambda request: "10.9.8.7")


def bearer(key):
    return {"Authorization": f"Bearer {key}"}


@pytest.mark.parametrize(
    ("path", "cls"),
    [
        ("/v1/chat/completions", CLIENT), ("/v1/models/{name}", CLIENT), ("/v1", CLIENT),
        ("/v1/admin/workers/{worker_id}", ADMIN), ("/v1/logs/stream", ADMIN), ("/ui", ADMIN), ("/ui/x", ADMIN),
        ("/v1/workers/heartbeat", WORKER), ("/health", OPEN), ("/metrics", OPEN), ("/v1admin", OPEN),
    ],
)  # fmt: skip
def test_route_classes(path, cls):
    assert route_class(path) == cls


@pytest.mark.parametrize(
    ("host", "loopback"),
    [("127.0.0.1", True), ("127.8.0.1", True), ("::1", True), ("::ffff:127.0.0.1", True), ("10.0.0.1", False),
     ("localhost", False), ("", False), (None, False), ("0x7f.1", False)],
)  # fmt: skip
def test_loopback_means_an_ip_literal_of_loopback(host, loopback):
    assert is_loopback(host) is loopback


async def test_nothing_configured_serves_loopback(gateway, fake_upstream):
    fake = await fake_upstream("a")
    client = await gateway({"routes": [{"model_name": "m", "api_base": fake.api_base}]})
    assert (await client.post("/v1/chat/completions", json=chat())).status == 200
    assert (await client.get("/v1/admin/workers")).status == 200
    assert (await client.post("/v1/workers/heartbeat", json=beat_for(fake))).status == 200


@pytest.mark.parametrize(
    ("method", "path", "setting"),
    [
        ("POST", "/v1/chat/completions", "auth.api_keys"),
        ("GET", "/v1/models", "auth.api_keys"),
        ("GET", "/v1/admin/workers", "auth.admin_key"),
        ("POST", "/v1/admin/workers/launch", "auth.admin_key"),
        ("GET", "/v1/logs/stream", "auth.admin_key"),
        ("POST", "/v1/workers/heartbeat", "auth.worker_token"),
    ],
)
async def test_other_hosts_get_403_naming_the_setting(gateway, remote, method, path, setting):
    client = await gateway({})
    resp = await client.request(method, path, json={})
    assert resp.status == 403
    error = (await resp.json())["error"]
    assert error["param"] == setting and setting in error["message"]
    assert error["type"] == "permission_error" and error["code"] == "loopback_only"
    assert (await client.get("/health")).status == 200
    assert (await client.get("/metrics")).status == 200


async def test_percent_encoded_admin_path_is_still_the_admin_class(gateway, remote):
    client = await gateway({"auth": {"api_keys": ["client"]}})
    resp = await client.get("/v1/%61dmin/workers", headers=bearer("client"))
    assert resp.status == 403


async def test_client_key_never_opens_the_admin_api_from_another_host(gateway, fake_upstream, remote):
    """The issue's measurement: with only auth.api_keys set, a client key launched a worker
    (201) and listed workers (200) from another host."""
    fake = await fake_upstream("a")
    client = await gateway({"auth": {"api_keys": ["client"]}, "routes": [{"model_name": "m", "api_base": fake.api_base}]})
    assert (await client.post("/v1/chat/completions", json=chat(), headers=bearer("client"))).status == 200
    assert (await client.post("/v1/chat/completions", json=chat())).status == 401
    body = {"model_name": "x", "model_path": "/nonexistent", "port": 1}
    launch = await client.post("/v1/admin/workers/launch", json=body, headers=bearer("client"))
    assert launch.status == 403 and (await launch.json())["error"]["param"] == "auth.admin_key"
    assert (await client.get("/v1/admin/workers", headers=bearer("client"))).status == 403
    assert client.app[CONTROL_KEY].managed_ids() == []


async def test_registration_without_token_from_another_host_is_refused(gateway, fake_upstream, remote):
    """The issue's measurement: registration without any token was accepted (200) from another host."""
    fake = await fake_upstream("a")
    client = await gateway({})
    resp = await client.post("/v1/workers/heartbeat", json=beat_for(fake))
    assert resp.status == 403 and (await resp.json())["error"]["param"] == "auth.worker_token"
    assert client.app[CONTROL_KEY].worker_views() == []


async def test_configured_credentials_are_needed_from_loopback_too(gateway, fake_upstream):
    fake = await fake_upstream("a")
    client = await gateway({"auth": {"api_keys": ["c"], "admin_key": "a", "worker_token": "w"}})
    assert (await client.post("/v1/chat/completions", json=chat())).status == 401
    assert (await client.get("/v1/admin/workers")).status == 401
    assert (await client.post("/v1/workers/heartbeat", json=beat_for(fake))).status == 401
    assert (await client.post("/v1/workers/heartbeat", json=beat_for(fake), headers=bearer("w"))).status == 200


async def test_with_a_token_other_hosts_register(gateway, fake_upstream, remote):
    fake = await fake_upstream("a")
    client = await gateway({"auth": {"worker_token": "w"}})
    resp = await client.post("/v1/workers/heartbeat", json=beat_for(fake), headers=bearer("w"))
    assert resp.status == 200


async def test_rotated_worker_token_keeps_the_old_one_for_the_grace_only(gateway, fake_upstream, clock):
    fake = await fake_upstream("a")
    client = await gateway({"auth": {"worker_token": "old", "worker_token_grace_s": 60}})
    control = client.app[CONTROL_KEY]
    new = GatewayConfig.from_dict({"auth": {"worker_token": "new", "worker_token_grace_s": 60}}, environ={})
    await control.apply(new)
    assert (await client.post("/v1/workers/heartbeat", json=beat_for(fake), headers=bearer("new"))).status == 200
    assert (await client.post("/v1/workers/heartbeat", json=beat_for(fake), headers=bearer("old"))).status == 200
    clock.now += 61
    assert (await client.post("/v1/workers/heartbeat", json=beat_for(fake), headers=bearer("old"))).status == 401
    assert (await client.post("/v1/workers/heartbeat", json=beat_for(fake), headers=bearer("new"))).status == 200


def test_startup_block_says_who_reaches_what():
    from ichat.config import AuthSettings

    nothing = "\n".join(describe_access(AuthSettings(), "0.0.0.0"))
    assert nothing.count("loopback clients only") == 3
    assert "auth.api_keys" in nothing and "auth.admin_key" in nothing and "auth.worker_token" in nothing
    keyed = "\n".join(describe_access(AuthSettings(api_keys=("k",), worker_token="t"), "0.0.0.0"))
    assert "clients with one of 1 key(s)" in keyed and "client keys no longer open the admin API" in keyed
    assert "workers with auth.worker_token" in keyed


# -- a registry no peer can hijack ------------------------------------------------------------


async def test_a_heartbeat_cannot_take_a_static_routes_id(gateway, fake_upstream):
    """The issue's measurement: a beat claiming a static route's id took its traffic (0 of 20
    answered)."""
    good, bad = await fake_upstream("good"), await fake_upstream("bad", "status", status=500)
    client = await gateway({"routes": [{"model_name": "m", "api_base": good.api_base}]})
    for worker_id in ("route:m:0", "route:other:3"):
        resp = await client.post("/v1/workers/heartbeat", json=beat_for(bad, worker_id=worker_id))
        assert resp.status == 403 and (await resp.json())["error"]["code"] == "worker_id_reserved"
    for _ in range(20):
        assert (await client.post("/v1/chat/completions", json=chat())).status == 200
    assert good.hits == 20 and bad.hits == 0


async def test_a_heartbeat_cannot_take_a_managed_id_without_the_childs_secret(gateway, fake_upstream):
    fake = await fake_upstream("a")
    client = await gateway({"auth": {"worker_token": "w"}})
    resp = await client.post("/v1/workers/heartbeat", json=beat_for(fake, worker_id="managed-m-8001"), headers=bearer("w"))
    assert resp.status == 403 and (await resp.json())["error"]["code"] == "worker_id_reserved"
    keys = client.app[CONTROL_KEY]._child_keys
    child = {"Authorization": f"Bearer {keys.secret_for('managed-m-8001')}", "X-IChat-Worker-Id": "managed-m-8001"}
    assert (await client.post("/v1/workers/heartbeat", json=beat_for(fake, worker_id="managed-m-8001"), headers=child)).status == 200
    # a child speaks for itself only, and another id's secret is no secret of this one
    assert (await client.post("/v1/workers/heartbeat", json=beat_for(fake, worker_id="managed-m-8002"), headers=child)).status == 403
    wrong = {**child, "X-IChat-Worker-Id": "managed-m-8002"}
    assert (await client.post("/v1/workers/heartbeat", json=beat_for(fake, worker_id="managed-m-8002"), headers=wrong)).status == 401
    # nor can a token holder remove it
    gone = {"worker_id": "managed-m-8001", "instance_id": "i1"}
    assert (await client.post("/v1/workers/deregister", json=gone, headers=bearer("w"))).status == 403


async def test_deregistration_needs_the_instance_id(gateway, fake_upstream):
    fake = await fake_upstream("a")
    client = await gateway({})
    await client.post("/v1/workers/heartbeat", json=beat_for(fake))
    resp = await client.post("/v1/workers/deregister", json={"worker_id": "w1"})
    assert resp.status == 400 and (await resp.json())["error"]["param"] == "instance_id"
    assert (await client.post("/v1/chat/completions", json=chat())).status == 200


@pytest.mark.parametrize(
    "host",
    ["127.0.0.1@evil.example", "evil.example/x", "http://127.0.0.1", "127.0.0.1:80", "[::1]", "a b", "evil.example#",
     "", "x" * 300, "127.0.0.1\r\nHost: x"],
)  # fmt: skip
async def test_a_registered_address_is_a_plain_host(gateway, fake_upstream, host):
    fake = await fake_upstream("a")
    client = await gateway({})
    resp = await client.post("/v1/workers/heartbeat", json=beat_for(fake, host=host))
    assert resp.status == 400 and (await resp.json())["error"]["param"] == "host"


async def test_without_a_token_only_loopback_addresses_register(gateway, fake_upstream):
    fake = await fake_upstream("a")
    client = await gateway({})
    resp = await client.post("/v1/workers/heartbeat", json=beat_for(fake, host="10.1.1.1"))
    assert resp.status == 403 and (await resp.json())["error"]["param"] == "auth.worker_token"
    for host in ("127.0.0.1", "localhost"):
        assert (await client.post("/v1/workers/heartbeat", json=beat_for(fake, host=host))).status == 200
    client = await gateway({"auth": {"worker_token": "w"}})
    resp = await client.post("/v1/workers/heartbeat", json=beat_for(fake, host="10.1.1.1"), headers=bearer("w"))
    assert resp.status == 200


async def test_the_registry_is_bounded(gateway, fake_upstream):
    fake = await fake_upstream("a")
    client = await gateway({"limits": {"max_workers": 3}})
    for i in range(3):
        assert (await client.post("/v1/workers/heartbeat", json=beat_for(fake, worker_id=f"w{i}"))).status == 200
    resp = await client.post("/v1/workers/heartbeat", json=beat_for(fake, worker_id="w9"))
    assert resp.status == 503 and (await resp.json())["error"]["code"] == "registry_full"
    assert "Retry-After" in resp.headers
    assert (await client.post("/v1/workers/heartbeat", json=beat_for(fake, worker_id="w1"))).status == 200


async def test_a_hostile_heartbeat_is_a_400_never_a_500(gateway, fake_upstream):
    fake = await fake_upstream("a")
    client = await gateway({})
    for patch in ({"load": {"running": "lots"}}, {"load": {"running": -1}}, {"gpus": "all"}, {"pid": "x"},
                  {"heartbeat_interval": 1e308}, {"engine_args": [1, 2]}, {"load": {"x": {"nested": 1}}}):  # fmt: skip
        resp = await client.post("/v1/workers/heartbeat", json=beat_for(fake, **patch))
        assert resp.status == 400, patch
    resp = await client.post("/v1/workers/heartbeat", json=beat_for(fake, junk="x" * 70_000))
    assert resp.status == 413
    client.app[CONTROL_KEY].tick()
    assert (await client.get("/v1/admin/workers")).status == 200
