"""The trust boundary from another host: a real gateway on 0.0.0.0, a client in a network
namespace (tests/netns.py) reaching it over a veth pair, as the issue measured it.

Behind the gateway: a managed worker running the stub engine (a real ``python -m ichat.worker``
child with its own secret; the engine is beside the point here, so it is the stub, named so)
and a static route to a fake OpenAI upstream (tests/gateway/fakes.py, its own process).

Tests run in order and build on each other: first with only ``auth.api_keys`` set (the issue's
setup), then after a reload that sets a worker token and an admin key, then a token rotation,
then a gateway crash and restart that must adopt its child only after it proves itself.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import httpx
import pytest

from tests import netns
from tests.gateway_proc import GatewayProc, write_yaml
from tests.procs import Proc, free_port, wait_until

CLIENT_KEY, ADMIN_KEY = "client-key", "admin-key"
TOKEN, TOKEN2 = "token-one", "token-two"
INTERVAL = 1.0

FAKE_UPSTREAM = """
import sys
from aiohttp import web
from tests.gateway.fakes import FakeUpstream
web.run_app(FakeUpstream("static-route").app(), host="127.0.0.1", port=int(sys.argv[1]), print=None, access_log=None)
"""

#: run inside the namespace: each request of a JSON list, printed back as a JSON list of answers
REMOTE_CLIENT = """
import json, sys, urllib.request, urllib.error
base, requests = sys.argv[1], json.loads(sys.argv[2])
out = []
for r in requests:
    data = json.dumps(r["body"]).encode() if "body" in r else None
    req = urllib.request.Request(base + r["path"], data=data, method=r.get("method", "POST" if data else "GET"),
                                 headers={"Content-Type": "application/json", **r.get("headers", {})})
    try:
        with urllib.request.urlopen(req, timeout=15) as resp:
            out.append({"status": resp.status, "body": resp.read().decode()})
    except urllib.error.HTTPError as err:
        out.append({"status": err.code, "body": err.read().decode()})
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def host():
    reason = netns.unavailable_reason()
    if reason is not None:
        print(f"\nSKIP other-host checks: {reason}", file=sys.stderr)
        pytest.skip(f"network namespaces unavailable: {reason}")
    with netns.NetnsHost("sec") as made:
        yield made


@pytest.fixture(scope="module")
def cluster(host, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("security")
    upstream_port, worker_port = free_port(), free_port()
    upstream = Proc([sys.executable, "-c", FAKE_UPSTREAM, str(upstream_port)], tmp / "upstream.log")
    config = {
        "routes": [{"model_name": "m", "api_base": f"http://127.0.0.1:{upstream_port}/v1"}],
        "managed_workers": [
            {"model_name": "stub-m", "model_path": "stub", "backend": "stub", "port": worker_port, "heartbeat_interval": INTERVAL}
        ],
        "auth": {"api_keys": [CLIENT_KEY]},
        "registry": {"probe_interval_s": 0.5},
    }
    gateway = GatewayProc(tmp, config, host="0.0.0.0")
    try:
        gateway.wait_up()
        wait_until(lambda: httpx.post(f"http://127.0.0.1:{upstream_port}/v1/x", timeout=2).status_code == 200, 20, what="fake upstream")
        yield {"gateway": gateway, "tmp": tmp, "upstream": upstream, "worker_id": f"managed-stub-m-{worker_port}"}
    finally:
        gateway.stop()
        upstream.stop()
        restarted = getattr(test_gateway_crash_adopts_only_its_proven_child, "restarted", None)
        if restarted is not None:
            restarted.stop()


def remote(host: netns.NetnsHost, gateway: GatewayProc, requests: list[dict]) -> list[dict]:
    """Send ``requests`` from the namespace host to the gateway, over the veth pair."""
    result = subprocess.run(
        host.wrap([sys.executable, "-c", REMOTE_CLIENT, f"http://{host.host_ip}:{gateway.port}", json.dumps(requests)]),
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    answers = json.loads(result.stdout)
    for answer in answers:
        try:
            answer["json"] = json.loads(answer["body"])
        except ValueError:
            answer["json"] = None
    return answers


def admin(gateway: GatewayProc, method: str, path: str, key: str | None = None, **kw) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.request(method, gateway.base_url + path, headers=headers, timeout=30, **kw)


def views(gateway: GatewayProc, key: str | None = None) -> dict[str, dict]:
    return {w["worker_id"]: w for w in admin(gateway, "GET", "/v1/admin/workers", key).json()["data"]}


def beat(ns: netns.NetnsHost, worker_id: str, **extra) -> dict:
    body = {
        "worker_id": worker_id, "instance_id": "i1", "model_name": "remote-model", "backend": "fake", "host": ns.ns_ip,
        "port": 9, "state": "loading", "heartbeat_interval": 5,
    }  # fmt: skip
    body.update(extra)
    return body


def chat(model: str, key: str | None = CLIENT_KEY) -> dict:
    request = {"path": "/v1/chat/completions", "body": {"model": model, "messages": [{"role": "user", "content": "hi"}]}}
    if key:
        request["headers"] = {"Authorization": f"Bearer {key}"}
    return request


def test_with_only_client_keys_other_hosts_reach_the_data_plane_only(host, cluster):
    """The issue's setup: only auth.api_keys. Before: registration without a token was
    accepted (200); a client key launched a worker (201) and listed workers (200)."""
    gateway, managed = cluster["gateway"], cluster["worker_id"]
    wait_until(lambda: views(gateway).get(managed, {}).get("routable"), 60, what="managed stub worker routable")
    launch = {"model_name": "x", "model_path": "stub", "backend": "stub", "port": free_port()}
    answers = remote(host, gateway, [
        {"path": "/v1/workers/heartbeat", "body": beat(host, "remote-1")},
        {"path": "/v1/admin/workers/launch", "body": launch, "headers": {"Authorization": f"Bearer {CLIENT_KEY}"}},
        {"path": "/v1/admin/workers", "headers": {"Authorization": f"Bearer {CLIENT_KEY}"}},
        {"path": "/v1/logs/stream?follow=false", "headers": {"Authorization": f"Bearer {CLIENT_KEY}"}},
        chat("m"), chat("m", key=None), chat("stub-m"),
        {"path": "/health"},
    ])  # fmt: skip
    statuses = [a["status"] for a in answers]
    assert statuses == [403, 403, 403, 403, 200, 401, 200, 200], answers
    assert answers[0]["json"]["error"]["param"] == "auth.worker_token"
    assert answers[1]["json"]["error"]["param"] == "auth.admin_key" and "auth.admin_key" in answers[1]["json"]["error"]["message"]
    assert set(views(gateway)) == {managed}  # nothing registered, nothing launched
    # this machine's own operator (loopback) still has the admin API with nothing configured
    assert admin(gateway, "GET", "/v1/admin/cluster/status").status_code == 200
    assert "who can reach what" in gateway.log_text()


def test_a_reload_sets_a_worker_token_and_an_admin_key_without_locking_out_the_managed_worker(host, cluster):
    """Rotating worker_token through a reload: the managed child registers with its own secret,
    so it keeps beating; before, it kept the old token until it crash-looped."""
    gateway, managed = cluster["gateway"], cluster["worker_id"]
    pid = views(gateway)[managed]["pid"]
    config = dict(gateway.config)
    config["auth"] = {"api_keys": [CLIENT_KEY], "admin_key": ADMIN_KEY, "worker_token": TOKEN}
    gateway.config = config
    write_yaml(gateway.config_path, config)
    # The file watcher may apply the change before this POST lands (then the POST, made without
    # the new key, is refused): either way the key is needed from here too once it applies.
    reloaded = admin(gateway, "POST", "/v1/admin/config/reload")  # loopback, before the key applies
    assert reloaded.status_code in (200, 401), reloaded.text
    wait_until(lambda: admin(gateway, "GET", "/v1/admin/workers").status_code == 401, 10, what="the admin key applies")
    assert admin(gateway, "POST", "/v1/admin/config/reload", ADMIN_KEY).status_code == 200
    # several beats later the child is still registered, fresh, routable, and not restarted
    first = views(gateway, ADMIN_KEY)[managed]
    wait_until(lambda: views(gateway, ADMIN_KEY)[managed]["beats"] >= first["beats"] + 3, 30, what="three more beats")
    view = views(gateway, ADMIN_KEY)[managed]
    assert view["routable"] and view["restarts"] == 0 and view["pid"] == pid == first["pid"], view


def test_with_the_token_other_hosts_register_and_no_id_can_be_hijacked(host, cluster):
    gateway, managed = cluster["gateway"], cluster["worker_id"]
    token = {"Authorization": f"Bearer {TOKEN}"}
    instance = views(gateway, ADMIN_KEY)[managed]["instance_id"]
    answers = remote(host, gateway, [
        {"path": "/v1/workers/heartbeat", "body": beat(host, "remote-1"), "headers": token},
        {"path": "/v1/workers/heartbeat", "body": beat(host, "remote-2")},  # no token
        {"path": "/v1/workers/heartbeat", "body": beat(host, "route:m:0", state="ready", model_name="m"), "headers": token},
        {"path": "/v1/workers/heartbeat", "body": beat(host, managed, state="ready", model_name="stub-m"), "headers": token},
        {"path": "/v1/workers/heartbeat", "body": beat(host, managed, state="ready", model_name="stub-m"),
         "headers": {"Authorization": "Bearer guessed", "X-IChat-Worker-Id": managed}},
        {"path": "/v1/workers/deregister", "body": {"worker_id": managed}, "headers": token},
        {"path": "/v1/workers/deregister", "body": {"worker_id": managed, "instance_id": instance}, "headers": token},
        {"path": "/v1/workers/heartbeat", "body": beat(host, "remote-3", host="127.0.0.1@evil.example"), "headers": token},
        {"path": "/v1/admin/workers/launch", "body": {"model_name": "x"}, "headers": {"Authorization": f"Bearer {CLIENT_KEY}"}},
    ])  # fmt: skip
    assert [a["status"] for a in answers] == [200, 401, 403, 403, 401, 400, 403, 400, 401], answers
    # The measurement: after hijack beats, 0 of 20 requests were answered. Now all are,
    # by the static route and by the managed worker.
    answers = remote(host, gateway, [chat("m")] * 20 + [chat("stub-m")] * 20)
    assert [a["status"] for a in answers] == [200] * 40, [a for a in answers if a["status"] != 200][:3]
    assert all(a["json"].get("upstream") == "static-route" for a in answers[:20])
    assert all(a["json"].get("object") == "chat.completion" for a in answers[20:])
    current = views(gateway, ADMIN_KEY)
    assert current[managed]["source"] == "managed" and current[managed]["instance_id"] == instance
    assert current["remote-1"]["address"] == f"http://{host.ns_ip}:9"


def test_a_rotated_token_is_honoured_for_the_grace_then_refused(host, cluster):
    gateway = cluster["gateway"]
    config = dict(gateway.config)
    # long enough for the checks below on a loaded machine (each starts a Python in the namespace)
    config["auth"] = {**config["auth"], "worker_token": TOKEN2, "worker_token_grace_s": 10}
    gateway.config = config
    write_yaml(gateway.config_path, config)
    assert admin(gateway, "POST", "/v1/admin/config/reload", ADMIN_KEY).status_code == 200
    old = {"path": "/v1/workers/heartbeat", "body": beat(host, "remote-1"), "headers": {"Authorization": f"Bearer {TOKEN}"}}
    new = {**old, "headers": {"Authorization": f"Bearer {TOKEN2}"}}
    assert [a["status"] for a in remote(host, gateway, [old, new])] == [200, 200]
    wait_until(lambda: remote(host, gateway, [old])[0]["status"] == 401, 40, interval=0.5, what="old token refused after the grace")
    assert remote(host, gateway, [new])[0]["status"] == 200
    assert views(gateway, ADMIN_KEY)[cluster["worker_id"]]["routable"]


def test_gateway_crash_adopts_only_its_proven_child(host, cluster):
    gateway, managed = cluster["gateway"], cluster["worker_id"]
    before = views(gateway, ADMIN_KEY)[managed]
    gateway.popen.send_signal(signal.SIGKILL)
    gateway.popen.wait(10)
    os.kill(before["pid"], 0)  # the child outlives the gateway
    restarted = GatewayProc(cluster["tmp"], gateway.config, port=gateway.port, name="gateway-2", host="0.0.0.0")
    test_gateway_crash_adopts_only_its_proven_child.restarted = restarted
    restarted.wait_up()
    wait_until(lambda: views(restarted, ADMIN_KEY).get(managed, {}).get("routable"), 30, what="child adopted and routable")
    view = views(restarted, ADMIN_KEY)[managed]
    assert view["adopted"] is True and view["pid"] == before["pid"], view
    assert "it proved it is our child" in restarted.log_text()
    assert remote(host, restarted, [chat("stub-m")])[0]["status"] == 200
