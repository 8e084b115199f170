"""Multi-host pieces without processes: a managed worker's Ray cluster address, and the engine
watch that turns a dead rank into an ``error`` report."""

from __future__ import annotations

import asyncio

import pytest

from ichat.config import GatewayConfig, ManagedWorkerSpec, SupervisorSettings
from ichat.errors import ConfigError
from ichat.gateway import supervisor as sv
from ichat.worker.app import DRAINING, ERROR, LOADING, READY, WorkerState
from ichat.worker.cli import parse_worker_args
from ichat.worker.enginewatch import watch_engine


def managed(**extra):
    entry = {"model_name": "big", "model_path": "/models/big", "port": 8001, "gpu_ids": [0, 1], **extra}
    return GatewayConfig.from_dict({"managed_workers": [entry]}).managed_workers[0]


def test_ray_address_reaches_the_worker_as_ray_address_env_and_not_as_an_engine_flag(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    spec = managed(ray_address="10.0.0.1:6379", distributed_executor_backend="ray", pipeline_parallel_size=2)
    assert spec.ray_address == "10.0.0.1:6379"
    worker = sv.ManagedWorker(spec, gateway_url="http://127.0.0.1:4000", settings=SupervisorSettings())
    env = worker._env()
    assert env["RAY_ADDRESS"] == "10.0.0.1:6379"
    assert env["CUDA_VISIBLE_DEVICES"] == "0,1"  # gpu_ids: the head host's GPUs
    argv = worker._argv()
    assert "--ray-address" not in argv and "10.0.0.1:6379" not in argv
    assert argv[argv.index("--distributed-executor-backend") + 1] == "ray"
    assert argv[argv.index("--pipeline-parallel-size") + 1] == "2"

    plain = sv.ManagedWorker(managed(), gateway_url="x", settings=SupervisorSettings())
    assert "RAY_ADDRESS" not in plain._env()
    assert sv.spec_digest(spec) != sv.spec_digest(managed())  # a changed cluster restarts the worker on reload


@pytest.mark.parametrize("address", ["auto", "ray-head:6379", "ray://10.0.0.1:10001"])
def test_ray_address_forms_ray_accepts(address):
    assert managed(ray_address=address).ray_address == address


@pytest.mark.parametrize("address", ["", "10.0.0.1", "http://10.0.0.1:6379", "a b:1", "head:6379\n", 6379])
def test_bad_ray_address_is_a_config_error_naming_the_key(address):
    with pytest.raises(ConfigError, match=r"managed_workers\[0\]\.ray_address"):
        managed(ray_address=address)


# -- the engine watch --------------------------------------------------------------------------


class DyingEngine:
    """Stands in for an engine whose health check starts failing (a rank died); no model."""

    def __init__(self, fail_after: int, exc: Exception | None = None, hang: bool = False) -> None:
        self.calls = 0
        self.fail_after = fail_after
        self.exc = exc or RuntimeError("EngineCore encountered an issue")
        self.hang = hang

    async def check_health(self) -> None:
        self.calls += 1
        if self.calls > self.fail_after:
            if self.hang:
                await asyncio.Event().wait()
            raise self.exc


def state_with(engine, phase=READY) -> WorkerState:
    options, _argv, _help = parse_worker_args(["--port", "1"])
    state = WorkerState(options)
    state.engine, state.phase = engine, phase
    return state


async def no_wait(_s: float) -> None:
    await asyncio.sleep(0)


async def test_watch_reports_the_first_failed_check_once():
    engine = DyingEngine(fail_after=3, exc=RuntimeError("Ray actor on node 10.0.0.2 died"))
    state = state_with(engine)
    reasons: list[str] = []
    await asyncio.wait_for(watch_engine(state, reasons.append, sleep=no_wait), 5)
    assert engine.calls == 4
    assert reasons == ["engine health check failed: RuntimeError: Ray actor on node 10.0.0.2 died"]


async def test_watch_counts_a_hung_check_as_dead():
    state = state_with(DyingEngine(fail_after=0, hang=True))
    reasons: list[str] = []
    await asyncio.wait_for(watch_engine(state, reasons.append, timeout=0.05, sleep=no_wait), 5)
    assert reasons == ["engine health check did not answer within 0s"]


async def test_watch_also_acts_when_health_probe_saw_the_death_first():
    state = state_with(DyingEngine(fail_after=0), phase=ERROR)
    reasons: list[str] = []
    await asyncio.wait_for(watch_engine(state, reasons.append, sleep=no_wait), 5)
    assert len(reasons) == 1


@pytest.mark.parametrize("phase", [LOADING, DRAINING])
async def test_watch_leaves_loading_and_draining_workers_alone(phase):
    engine = DyingEngine(fail_after=0)
    state = state_with(engine, phase=phase)
    reasons: list[str] = []
    task = asyncio.create_task(watch_engine(state, reasons.append, sleep=no_wait))
    for _ in range(50):
        await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert engine.calls == 0 and reasons == []


async def test_watch_does_not_report_a_drain_that_began_during_the_check():
    state = state_with(None)

    class DrainsWhileChecked(DyingEngine):
        async def check_health(self) -> None:
            state.phase = DRAINING  # SIGTERM arrived while the check ran
            await super().check_health()

    engine = DrainsWhileChecked(fail_after=0)
    state.engine = engine
    reasons: list[str] = []
    task = asyncio.create_task(watch_engine(state, reasons.append, sleep=no_wait))
    for _ in range(50):
        await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert engine.calls == 1 and reasons == []
