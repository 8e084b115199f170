"""The worker's HTTP surface in process, with the stub engine: GPU series in /metrics, health states."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from ichat.engines.stub import StubEngineFactory
from ichat.logs.hub import LogHub
from ichat.worker.app import READY, WorkerState, build_app
from ichat.worker.cli import parse_worker_args

GPU = {"index": 1, "uuid": "GPU-abc", "name": "NVIDIA H100", "memory_used_mib": 1024, "memory_total_mib": 81559, "utilization_pct": 50}


def samples(text: str) -> dict:
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


async def make_app(gpus):
    options, engine_argv, _ = parse_worker_args(["--backend", "stub", "--model", "m", "-n", "m"])
    factory = StubEngineFactory()
    spec = factory.parse_args(engine_argv, served_model_name=options.served_model_name)
    state = WorkerState(options, spec=spec)
    return state, factory, spec, build_app(state, LogHub(100), gpu_inventory=lambda: gpus)


async def test_metrics_carry_the_gpu_inventory(aiohttp_client):
    state, factory, spec, app = await make_app([GPU])
    client = await aiohttp_client(app)
    got = samples(await (await client.get("/metrics")).text())
    labels = (("index", "1"), ("name", "NVIDIA H100"), ("uuid", "GPU-abc"))
    assert got[("ichat_worker_gpu_memory_used_bytes", labels)] == 1024 * 2**20
    assert got[("ichat_worker_gpu_memory_total_bytes", labels)] == 81559 * 2**20
    assert got[("ichat_worker_gpu_utilization_ratio", labels)] == 0.5


async def test_no_gpu_means_no_gpu_series_and_loading_is_503(aiohttp_client):
    state, factory, spec, app = await make_app([])
    client = await aiohttp_client(app)
    text = await (await client.get("/metrics")).text()
    assert "ichat_worker_gpu_memory_used_bytes{" not in text
    resp = await client.get("/health")
    assert resp.status == 503 and (await resp.json())["status"] == "loading"
    resp = await client.post("/v1/chat/completions", json={"model": "m", "messages": []})
    assert resp.status == 503 and (await resp.json())["error"]["code"] == "model_loading"
    state.engine, state.phase = await factory.start(spec), READY
    try:
        assert (await client.get("/health")).status == 200
        resp = await client.post("/v1/chat/completions", json={"model": "m", "messages": []})
        assert resp.status == 200 and "stub answer" in (await resp.text())
    finally:
        await state.engine.shutdown()


async def test_info_answers_an_adoption_challenge_with_a_proof_never_the_secret(aiohttp_client):
    import os

    from ichat.protocol import child_proof

    state, _factory, _spec, app = await make_app([])
    state.child_secret = "the-secret"
    client = await aiohttp_client(app)
    info = await (await client.get("/info", params={"challenge": "abc"})).json()
    assert info["proof"] == child_proof("the-secret", "abc", os.getpid(), state.options.port)
    assert "the-secret" not in str(info)
    assert "proof" not in await (await client.get("/info")).json()


async def test_heartbeats_carry_the_childs_secret_instead_of_the_token():
    from ichat.worker.heartbeat import HeartbeatAgent, build_payload

    state, _factory, _spec, _app = await make_app([])
    agent = HeartbeatAgent(state)
    assert agent._headers() == {}
    state.child_secret = "s3"
    assert agent._headers() == {"Authorization": "Bearer s3", "X-IChat-Worker-Id": state.options.worker_id}
    payload = await build_payload(state)
    assert payload["worker_id"] == state.options.worker_id and "s3" not in str(payload)
