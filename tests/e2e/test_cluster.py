"""The hybrid deployment end to end: a real gateway, managed and hand-started workers on the real
SmolLM2 model (vLLM on CPU), heartbeats, failures, the admin API, reloads and restarts.

One gateway (from conf/quickstart.yaml, ports changed) and its workers serve this whole module;
tests run in order and build on each other, as an operator's session would.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest
from ruamel.yaml import YAML

from tests.gateway_proc import GatewayProc, write_yaml
from tests.procs import REPO, WorkerProc, free_port, minilm_path, smollm2_path, wait_until

INTERVAL = 2.0  # heartbeat interval of every worker here
QUESTION = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]
ENGINE_START_S = 300


def cmdlines() -> dict[int, str]:
    out = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                out[int(entry.name)] = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                pass
    return out


def worker_processes(worker_id: str) -> list[int]:
    return [pid for pid, cmd in cmdlines().items() if "ichat.worker" in cmd and f"--worker-id {worker_id} " in cmd + " "]


def engine_processes_in_group(pgid: int) -> list[int]:
    pids = []
    for pid, cmd in cmdlines().items():
        if "EngineCore" in cmd:
            try:
                if os.getpgid(pid) == pgid:
                    pids.append(pid)
            except ProcessLookupError:
                pass
    return pids


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][:1] != "Z"
    except OSError:
        return False


@pytest.fixture(scope="module")
def tmp(e2e_tmp):
    path = e2e_tmp / "cluster"
    path.mkdir()
    return path


@pytest.fixture(scope="module")
def base_config():
    config = YAML(typ="safe", pure=True).load((REPO / "conf" / "quickstart.yaml").read_text())
    managed = config["managed_workers"][0]
    managed.update(port=free_port(), heartbeat_interval=INTERVAL, model_path=smollm2_path())
    config["registry"] = {"probe_interval_s": 0.5, "probe_failures": 2, "probe_timeout_s": 1.0}
    config["supervisor"] = {"backoff_initial_s": 0.5, "stop_timeout_s": 20}
    return config


@pytest.fixture(scope="module")
def gateway(tmp, base_config):
    proc = GatewayProc(tmp, base_config)
    proc.wait_up()
    yield proc
    if proc.alive():
        proc.stop(60)


@pytest.fixture(scope="module")
def hand_worker(tmp, gateway):
    proc = WorkerProc(
        tmp, smollm2_path(), "smollm2", "--max-model-len", "2048",
        "--gateway-address", gateway.base_url, "--heartbeat-interval", str(INTERVAL), "--worker-id", "hand-1",
    )  # fmt: skip
    yield proc
    proc.stop()


def client(gateway: GatewayProc) -> openai.OpenAI:
    return openai.OpenAI(base_url=gateway.base_url + "/v1", api_key="unused", timeout=60, max_retries=0)


def managed_id(gateway: GatewayProc) -> str:
    return f"managed-smollm2-{gateway.config['managed_workers'][0]['port']}"


def test_quickstart_config_serves_a_chat_completion(gateway):
    gateway.wait_routable("smollm2", 1, ENGINE_START_S)
    answer = client(gateway).chat.completions.create(model="smollm2", messages=QUESTION, temperature=0, max_tokens=20)
    assert "Paris" in answer.choices[0].message.content
    stream = client(gateway).chat.completions.create(
        model="smollm2", messages=QUESTION, temperature=0, max_tokens=20, stream=True
    )
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == answer.choices[0].message.content
    view = gateway.workers()[managed_id(gateway)]
    assert view["source"] == "managed" and view["managed_state"] == "ready"


def test_hand_started_worker_is_routable_within_one_interval_of_ready(gateway, hand_worker):
    hand_worker.wait_ready(ENGINE_START_S)
    ready_at = time.monotonic()
    wait_until(lambda: gateway.workers().get("hand-1", {}).get("routable"), INTERVAL + 1, interval=0.05, what="hand-1 routable")
    assert time.monotonic() - ready_at <= INTERVAL
    assert gateway.workers()["hand-1"]["source"] == "worker"


def worker_request_count(base_url: str) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    total = 0.0
    for family in text_string_to_metric_families(httpx.get(base_url + "/metrics", timeout=10).text):
        for sample in family.samples:
            if sample.name == "ichat_worker_requests_total" and sample.labels.get("route") == "completions":
                total += sample.value
    return total


def test_two_workers_with_one_model_name_share_traffic(gateway, hand_worker):
    managed_url = gateway.workers()[managed_id(gateway)]["address"]
    before = {url: worker_request_count(url) for url in (managed_url, hand_worker.base_url)}
    c = client(gateway)
    # One at a time: two vLLM engines on two cores slow each other down unevenly under
    # concurrency, which would measure the CPU scheduler, not the routing. Idle replicas tie
    # under least_inflight and the tie is broken at random.
    for _ in range(20):
        c.completions.create(model="smollm2", prompt="Hello", max_tokens=4)
    served = {url: worker_request_count(url) - before[url] for url in before}
    assert sum(served.values()) == 20
    assert all(count >= 2 for count in served.values()), (served, {w["worker_id"]: (w["load"], w["inflight_via_gateway"]) for w in gateway.workers().values()})


class Traffic:
    """Requests in a loop from a thread; records (start time, ok) for each."""

    def __init__(self, gateway: GatewayProc) -> None:
        self.c = openai.OpenAI(base_url=gateway.base_url + "/v1", api_key="unused", timeout=30, max_retries=0)
        self.results: list[tuple[float, float, bool, str]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                self.c.completions.create(model="smollm2", prompt="Hi", max_tokens=2)
                self.results.append((started, time.monotonic(), True, ""))
            except Exception as exc:
                self.results.append((started, time.monotonic(), False, repr(exc)))

    def __enter__(self) -> Traffic:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(60)


def test_kill9_of_a_replica_while_requests_flow(gateway, hand_worker):
    wid = managed_id(gateway)
    pid = gateway.workers()[wid]["pid"]
    with Traffic(gateway) as traffic:
        wait_until(lambda: len(traffic.results) >= 5, 30, what="traffic flowing")
        killed_at = time.monotonic()
        os.kill(pid, signal.SIGKILL)
        wait_until(lambda: not gateway.workers()[wid]["routable"], 3 * INTERVAL, interval=0.05, what="out of rotation")
        out_at = time.monotonic()
        wait_until(lambda: len([r for r in traffic.results if r[0] > out_at]) >= 10, 60, what="traffic after the kill")
    removal_s = out_at - killed_at
    print(f"\nkill -9 -> out of rotation in {removal_s:.2f}s (limit {3 * INTERVAL:.0f}s)")
    assert removal_s <= 3 * INTERVAL
    after = [r for r in traffic.results if r[0] > out_at]
    assert all(ok for _, _, ok, _ in after), [r for r in after if not r[2]]
    # the managed replica is restarted by the supervisor and serves again
    wait_until(lambda: gateway.workers()[wid]["routable"], ENGINE_START_S, interval=0.5, what="managed worker restarted")
    view = gateway.workers()[wid]
    assert view["restarts"] == 1
    assert view["last_exit"]["signal"] == "SIGKILL"
    assert not alive(pid)
    answer = httpx.post(view["address"] + "/v1/completions", json={"model": "smollm2", "prompt": "Hi", "max_tokens": 2}, timeout=60)
    assert answer.status_code == 200


def test_sigstopped_worker_is_caught_by_the_health_probe(gateway, hand_worker):
    stopped_at = time.monotonic()
    os.kill(hand_worker.pid, signal.SIGSTOP)
    try:
        # probes every 0.5 s with a 1 s timeout, 2 failures: well before 3 missed beats (6 s)
        wait_until(lambda: not gateway.workers()["hand-1"]["routable"], 3 * INTERVAL, interval=0.05, what="hung worker out")
        caught_s = time.monotonic() - stopped_at
        assert gateway.workers()["hand-1"]["state"] == "unhealthy"
        print(f"\nSIGSTOP -> out of rotation in {caught_s:.2f}s")
        assert caught_s < 3 * INTERVAL
        # traffic still works on the other replica
        assert client(gateway).completions.create(model="smollm2", prompt="Hi", max_tokens=2).choices
    finally:
        os.kill(hand_worker.pid, signal.SIGCONT)
    wait_until(lambda: gateway.workers()["hand-1"]["routable"], 20, what="back in rotation after SIGCONT")


def test_admin_launch(gateway, tmp):
    body = {
        "model_name": "smol-launched", "model_path": smollm2_path(), "port": free_port(),
        "heartbeat_interval": INTERVAL, "enforce_eager": True, "max_model_len": 1024,
    }  # fmt: skip
    resp = httpx.post(gateway.base_url + "/v1/admin/workers/launch", json=body, timeout=30)
    assert resp.status_code == 201, resp.text
    wid = resp.json()["worker_id"]
    assert resp.json()["state"] in ("starting", "stopped")
    bad = httpx.post(gateway.base_url + "/v1/admin/workers/launch", json={**body, "port": "x"}, timeout=30)
    assert bad.status_code == 422 and "port" in bad.json()["error"]["message"]
    dup = httpx.post(gateway.base_url + "/v1/admin/workers/launch", json=body, timeout=30)
    assert dup.status_code == 422
    gateway.wait_routable("smol-launched", 1, ENGINE_START_S)
    answer = client(gateway).completions.create(model="smol-launched", prompt="Paris is", max_tokens=3)
    assert answer.choices[0].text
    state_file = Path(gateway.config["state_dir"]) / "launched-workers.json"
    assert "smol-launched" in state_file.read_text()
    assert gateway.workers()[wid]["launched"] is True


def test_config_edit_adds_a_model_without_gateway_restart(gateway):
    pid_before = gateway.pid
    config = dict(gateway.config)
    config["managed_workers"] = config["managed_workers"] + [
        {"model_name": "minilm", "model_path": minilm_path(), "port": free_port(), "heartbeat_interval": INTERVAL, "enforce_eager": True}
    ]
    gateway.config = config
    write_yaml(gateway.config_path, config)  # the gateway watches the file
    gateway.wait_routable("minilm", 1, ENGINE_START_S)
    embeddings = client(gateway).embeddings.create(model="minilm", input=["hello world"])
    assert len(embeddings.data[0].embedding) == 384
    assert gateway.pid == pid_before and gateway.alive()


def test_broken_config_edit_is_refused_and_nothing_changes(gateway):
    workers_before = {wid: w["instance_id"] for wid, w in gateway.workers().items()}
    good = gateway.config_path.read_text()
    try:
        broken = dict(gateway.config)
        broken["routing"] = {"policy": "no-such-policy"}
        write_yaml(gateway.config_path, broken)
        resp = httpx.post(gateway.base_url + "/v1/admin/config/reload", timeout=30)
        assert resp.status_code == 422
        assert "no-such-policy" in resp.json()["error"]["message"]
        wait_until(lambda: "config change not applied" in gateway.log_text(), 10, what="watcher refused the edit")
        assert {wid: w["instance_id"] for wid, w in gateway.workers().items()} == workers_before
        assert client(gateway).completions.create(model="smollm2", prompt="Hi", max_tokens=2).choices
    finally:
        gateway.config_path.write_text(good)


def test_gateway_kill9_and_restart_adopts_and_reregisters(gateway, hand_worker, tmp):
    views = gateway.workers()
    managed = {wid: v["pid"] for wid, v in views.items() if v["source"] == "managed"}
    assert len(managed) == 3  # quickstart's, the launched one, the one added by the config edit
    gateway.popen.kill()
    gateway.popen.wait(10)
    time.sleep(INTERVAL)  # the workers notice: their beats fail, they keep serving
    for pid in managed.values():
        assert alive(pid)

    restarted = GatewayProc(tmp, gateway.config, port=gateway.port, name="gateway-2")
    restarted.wait_up()
    up_at = time.monotonic()
    try:
        expected = set(views)
        def registered() -> set[str]:
            return {wid for wid, view in restarted.workers().items() if view.get("registered")}

        wait_until(lambda: expected <= registered(), INTERVAL + 1, interval=0.05, what="all workers back")
        back_s = time.monotonic() - up_at
        print(f"\ngateway restart -> {len(expected)} workers back in {back_s:.2f}s")
        assert back_s <= INTERVAL + 0.5
        wait_until(lambda: restarted.workers()["hand-1"]["routable"], INTERVAL * 2, what="hand worker routable")
        now = restarted.workers()
        for wid, pid in managed.items():
            assert now[wid]["adopted"] is True, now[wid]
            assert now[wid]["pid"] == pid
            assert worker_processes(wid) == [pid], f"{wid} duplicated"
            assert len(engine_processes_in_group(pid)) == 1
        assert client(restarted).completions.create(model="smol-launched", prompt="Hi", max_tokens=2).choices
        test_gateway_kill9_and_restart_adopts_and_reregisters.gateway = restarted
    except BaseException:
        restarted.stop()
        raise


def test_admin_delete_stops_launched_and_deregisters_registered():
    gateway = test_gateway_kill9_and_restart_adopts_and_reregisters.gateway
    launched = [w for w in gateway.workers().values() if w.get("launched")][0]
    resp = httpx.delete(f"{gateway.base_url}/v1/admin/workers/{launched['worker_id']}", timeout=60)
    assert resp.status_code == 200 and resp.json()["managed"] is True
    wait_until(lambda: not alive(launched["pid"]), 30, what="launched worker gone")
    assert engine_processes_in_group(launched["pid"]) == []
    assert launched["worker_id"] not in gateway.workers()
    assert "smol-launched" not in (Path(gateway.config["state_dir"]) / "launched-workers.json").read_text()

    resp = httpx.delete(f"{gateway.base_url}/v1/admin/workers/hand-1", timeout=30)
    assert resp.status_code == 200
    assert resp.json()["managed"] is False and "not started by the gateway" in resp.json()["message"]
    assert httpx.delete(f"{gateway.base_url}/v1/admin/workers/nobody", timeout=30).status_code == 404


def test_clean_shutdown_leaves_no_orphans():
    gateway = test_gateway_kill9_and_restart_adopts_and_reregisters.gateway
    managed = {wid: v["pid"] for wid, v in gateway.workers().items() if v["source"] == "managed"}
    assert managed
    gateway.popen.send_signal(signal.SIGTERM)
    assert gateway.popen.wait(90) == 0
    for wid, pid in managed.items():
        assert not alive(pid), wid
        assert engine_processes_in_group(pid) == []
        assert worker_processes(wid) == []
    gateway.stop()
