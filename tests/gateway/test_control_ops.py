"""Admin operations that change what runs: they finish even if the client leaves, and the state
file always matches. Managed processes are replaced by an in-memory stand-in here (the process
side is tests/e2e); the control plane, the HTTP layer and the state file are the real ones."""

from __future__ import annotations

import asyncio
import os

import orjson
import pytest

from ichat.config import ManagedWorkerSpec
from ichat.gateway import supervisor as sv
from ichat.gateway.admin import CONTROL_KEY
from ichat.gateway.control import ReconcilePlan, plan_reconcile
from ichat.gateway.statefile import STATE_FILE

from .fakes import FakeClock


@pytest.fixture
def no_processes(monkeypatch):
    """ManagedWorker without a process: start() marks it starting, stop() takes 0.3 s."""
    stopped: list[str] = []

    def start(self):
        self._set(sv.STARTING)

    async def stop(self):
        await asyncio.sleep(0.3)
        self._set(sv.STOPPING)
        self._set(sv.STOPPED)
        stopped.append(self.worker_id)

    monkeypatch.setattr(sv.ManagedWorker, "start", start)
    monkeypatch.setattr(sv.ManagedWorker, "stop", stop)
    return stopped


def spec_body(port=8001, name="m"):
    return {"model_name": name, "model_path": "/nonexistent", "port": port}


def launched_in_file(tmp_path):
    path = tmp_path / "state" / STATE_FILE
    return [w["model_name"] for w in orjson.loads(path.read_bytes())["launched_workers"]] if path.exists() else []


async def started(client):
    control = client.app[CONTROL_KEY]
    await control.start_managed("http://127.0.0.1:1")
    return control


async def test_delete_finishes_when_the_client_leaves_halfway(gateway, no_processes, tmp_path):
    """Before: a client that disconnected during DELETE cancelled the handler halfway: the worker
    was removed but not stopped, and the state file still listed it."""
    client = await gateway({})
    control = await started(client)
    assert (await client.post("/v1/admin/workers/launch", json=spec_body())).status == 201
    assert launched_in_file(tmp_path) == ["m"]
    with pytest.raises(asyncio.TimeoutError):
        await asyncio.wait_for(client.delete("/v1/admin/workers/managed-m-8001"), timeout=0.05)
    deadline = asyncio.get_running_loop().time() + 5
    while launched_in_file(tmp_path):
        assert asyncio.get_running_loop().time() < deadline, "the delete did not finish"
        await asyncio.sleep(0.05)
    assert no_processes == ["managed-m-8001"]
    assert control.managed_ids() == []


async def managed_from_file(gateway, tmp_path, config: dict):
    """A gateway whose control plane reads ``config`` from a file (gw.yaml) and runs its managed
    workers (in-memory stand-ins): (control, config path)."""
    from tests.gateway_proc import write_yaml

    config_path = tmp_path / "gw.yaml"
    write_yaml(config_path, config)
    client = await gateway(config)
    control = client.app[CONTROL_KEY]
    control.config_path = str(config_path)
    await control.start_managed("http://127.0.0.1:1")
    return client, control, config_path


async def test_reload_finishes_when_the_client_leaves_halfway(gateway, no_processes, tmp_path):
    from tests.gateway_proc import write_yaml

    old = {"state_dir": str(tmp_path / "state"), "managed_workers": [spec_body(8001, "a")]}
    client, control, config_path = await managed_from_file(gateway, tmp_path, old)
    write_yaml(config_path, {**old, "managed_workers": [spec_body(8001, "a") | {"max_model_len": 64}]})
    with pytest.raises(asyncio.TimeoutError):
        await asyncio.wait_for(client.post("/v1/admin/config/reload"), timeout=0.05)
    deadline = asyncio.get_running_loop().time() + 5
    while control.reloads == 0:
        assert asyncio.get_running_loop().time() < deadline, "the reload did not finish"
        await asyncio.sleep(0.05)
    # the changed worker was stopped and started again, not left stopped
    assert control.managed_ids() == ["managed-a-8001"]
    assert control.worker_view("managed-a-8001")["spec"]["engine_flags"] == {"max_model_len": 64}


async def test_launch_is_recorded_before_it_starts_or_not_at_all(gateway, no_processes, tmp_path, monkeypatch):
    client = await gateway({})
    control = await started(client)
    seen = []
    monkeypatch.setattr(sv.ManagedWorker, "start", lambda self: seen.append(launched_in_file(tmp_path)))
    assert (await client.post("/v1/admin/workers/launch", json=spec_body(8001, "a"))).status == 201
    assert seen == [["a"]]  # already in the file when the process started

    def fail(self):
        raise OSError("cannot fork")

    monkeypatch.setattr(sv.ManagedWorker, "start", fail)
    resp = await client.post("/v1/admin/workers/launch", json=spec_body(8002, "b"))
    assert resp.status == 500
    assert launched_in_file(tmp_path) == ["a"]  # rolled back
    assert control.managed_ids() == ["managed-a-8001"]


async def test_launch_refused_when_the_state_cannot_be_written(gateway, no_processes, tmp_path):
    blocker = tmp_path / "blocker"
    blocker.write_text("a file where the state directory should be")
    client = await gateway({"state_dir": str(blocker / "state")})
    control = await started(client)
    resp = await client.post("/v1/admin/workers/launch", json=spec_body())
    assert resp.status == 503 and (await resp.json())["error"]["code"] == "state_not_saved"
    assert control.managed_ids() == []


def test_plan_reconcile():
    a, b, c = (ManagedWorkerSpec(model_name=n, model_path="/p", port=p) for n, p in (("a", 1), ("b", 2), ("c", 3)))
    b2 = ManagedWorkerSpec(model_name="b", model_path="/other", port=2)
    plan = plan_reconcile({"a": a, "b": b}, {"b": b2, "c": c})
    assert plan == ReconcilePlan(stop=("a",), restart=("b",), start=("c",))
    assert plan_reconcile({"a": a}, {"a": a}) == ReconcilePlan((), (), ())


async def test_managed_workers_run_on_the_control_planes_clock(gateway, no_processes):
    """Before: ManagedWorker was built without the control plane's clock, so its state_since
    (real monotonic time) and the tick's now (the injected clock) came from different clocks."""
    clock_now = 5_000_000.0
    client = await gateway({"supervisor": {"hung_restart_s": 10}})
    clock = client.app[CONTROL_KEY]._clock
    assert isinstance(clock, FakeClock)
    clock.now = clock_now
    control = await started(client)
    await client.post("/v1/admin/workers/launch", json=spec_body())
    view = control.worker_view("managed-m-8001")
    assert view["state"] == "starting"
    snapshot = control._supervisor.workers["managed-m-8001"].snapshot()
    assert snapshot["state_for_s"] == 0.0
    clock.now += 3
    assert control._supervisor.workers["managed-m-8001"].snapshot()["state_for_s"] == 3.0




async def test_an_impostor_on_a_managed_port_is_not_adopted(aiohttp_server):
    """Before: whatever answered /info on the port with the right worker id and spec digest was
    adopted, and the pid it named was later killpg'ed: here that pid is this test's own."""
    import os

    import aiohttp
    from aiohttp import web

    from ichat.config import SupervisorSettings

    async def info(request):
        return web.json_response({"worker_id": worker.worker_id, "spec_digest": worker.digest, "pid": os.getpid(), "proof": "0" * 64})

    app = web.Application()
    app.router.add_get("/info", info)
    server = await aiohttp_server(app)
    spec = ManagedWorkerSpec(model_name="m", model_path="/p", port=server.port)
    async with aiohttp.ClientSession() as session:
        worker = sv.ManagedWorker(spec, gateway_url="x", settings=SupervisorSettings(), child_secret="s", session=lambda: session)
        assert await worker._adopt() is False
    assert worker.pid is None and not worker.adopted


async def test_a_config_finished_while_a_reload_applies_its_first_half_is_applied_next(
    gateway, no_processes, tmp_path, monkeypatch
):
    """An editor (or a test's write_yaml) truncates the file, then writes it. The watcher read it
    empty, stopped every managed worker, and then recorded the stamp of the finished file, so the
    finished file was never applied (seen in CI: a config edit waited 5 minutes for a worker)."""
    from ichat.gateway import control as control_module
    from tests.gateway_proc import write_yaml

    full = {"state_dir": str(tmp_path / "state"), "managed_workers": [spec_body(8001, "a")]}
    _, control, config_path = await managed_from_file(gateway, tmp_path, full)
    real_load = control_module.load_config

    def read_then_finish_the_write(path):
        loaded = real_load(path)  # the file is empty: the writer has only truncated it so far
        write_yaml(config_path, full)
        stat = config_path.stat()
        os.utime(config_path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))  # a newer mtime
        return loaded

    config_path.write_text("")
    monkeypatch.setattr(control_module, "load_config", read_then_finish_the_write)
    summary = await control.reload()
    assert summary["stopped"] == ["managed-a-8001"]  # the half-written file was applied
    monkeypatch.setattr(control_module, "load_config", real_load)
    monkeypatch.setattr(control_module, "CONFIG_POLL_S", 0.01)
    watcher = asyncio.create_task(control._watch_config_forever())
    try:
        deadline = asyncio.get_running_loop().time() + 5
        while control.managed_ids() != ["managed-a-8001"]:
            assert asyncio.get_running_loop().time() < deadline, "the finished config was never applied"
            await asyncio.sleep(0.02)
    finally:
        watcher.cancel()
