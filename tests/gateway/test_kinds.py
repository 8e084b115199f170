"""Model kinds at the gateway: heartbeats carry them, the model list and the unknown-model 404
show them, and an image chat request of 10 MB is relayed whole within ``routing.max_body_mb``.
The upstreams are in-process fake workers (the real ones are in tests/e2e/test_kinds.py)."""

from __future__ import annotations

import base64
import hashlib
import os

import orjson

from ichat.protocol import parse_heartbeat
from ichat.routing.table import Endpoint, RoutingTable

from .test_control import beat_for


async def test_kinds_from_heartbeats_show_in_models_and_in_the_unknown_model_404(gateway, fake_upstream):
    chat_worker, pooling_worker = await fake_upstream("c"), await fake_upstream("p")
    client = await gateway({})
    await client.post("/v1/workers/heartbeat", json=beat_for(chat_worker, worker_id="wc", model="smol", kinds=["completions", "chat_completions"]))
    await client.post("/v1/workers/heartbeat", json=beat_for(pooling_worker, worker_id="wp", model="mini", kinds=["embeddings", "rerank", "score"]))
    cards = {m["id"]: m for m in (await (await client.get("/v1/models")).json())["data"]}
    assert cards["smol"]["kinds"] == ["chat_completions", "completions"]
    assert cards["mini"]["kinds"] == ["embeddings", "rerank", "score"]
    assert (await (await client.get("/v1/models/mini")).json())["kinds"] == ["embeddings", "rerank", "score"]

    resp = await client.post("/v1/rerank", json={"model": "nope", "query": "q", "documents": ["d"]})
    assert resp.status == 404
    message = (await resp.json())["error"]["message"]
    assert "mini (embeddings, rerank, score)" in message and "smol (chat_completions, completions)" in message

    views = {v["worker_id"]: v for v in (await (await client.get("/v1/admin/workers")).json())["data"]}
    assert views["wp"]["kinds"] == ["embeddings", "rerank", "score"]


async def test_a_worker_that_reports_no_kinds_still_registers(gateway, fake_upstream):
    fake = await fake_upstream("w")
    client = await gateway({})
    assert (await client.post("/v1/workers/heartbeat", json=beat_for(fake))).status == 200
    card = (await (await client.get("/v1/models")).json())["data"][0]
    assert card["kinds"] == []
    resp = await client.post("/v1/chat/completions", json={"model": "other"})
    assert "Available models: m." in (await resp.json())["error"]["message"]


async def test_bad_kinds_in_a_heartbeat_are_a_400(gateway, fake_upstream):
    fake = await fake_upstream("w")
    client = await gateway({})
    for bad in ("chat", [1], ["x" * 65], [f"k{i}" for i in range(33)]):
        resp = await client.post("/v1/workers/heartbeat", json=beat_for(fake, kinds=bad))
        assert resp.status == 400 and (await resp.json())["error"]["param"] == "kinds", bad


def test_parse_heartbeat_dedupes_and_sorts_kinds():
    body = {
        "worker_id": "w", "instance_id": "i", "model_name": "m", "host": "127.0.0.1", "port": 1,
        "state": "ready", "heartbeat_interval": 1, "kinds": ["score", "rerank", "score"],
    }  # fmt: skip
    assert parse_heartbeat(body).kinds == ("rerank", "score")


def test_table_merges_kinds_of_a_model():
    table = RoutingTable("round_robin")
    table.upsert(Endpoint("a", "m", "http://h:1/v1", kinds=("chat_completions",)))
    table.upsert(Endpoint("b", "m", "http://h:2/v1", kinds=("chat_completions", "image_input"), routable=False))
    assert table.kinds("m") == ["chat_completions", "image_input"]
    assert table.kinds("m", routable_only=True) == ["chat_completions"]
    assert table.kinds("unknown") == []


async def test_a_10_mb_image_data_url_is_relayed_whole_within_max_body_mb(gateway, fake_upstream):
    fake = await fake_upstream("vlm", "json")
    client = await gateway({"routes": [{"model_name": "vlm", "api_base": fake.api_base}], "routing": {"max_body_mb": 16}})
    image = base64.b64encode(os.urandom(7_900_000)).decode()  # 10.5 MB of base64
    body = orjson.dumps(
        {
            "model": "vlm",
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "What is in this image?"},
                        {"type": "image_url", "image_url": {"url": "data:image/png;base64," + image}},
                    ],
                }
            ],
        }
    )
    assert len(body) > 10 * 2**20
    resp = await client.post("/v1/chat/completions", data=body, headers={"Content-Type": "application/json"})
    assert resp.status == 200
    answer = await resp.json()
    assert answer["size"] == len(body) and answer["sha256"] == hashlib.sha256(body).hexdigest()

    small = await gateway({"routes": [{"model_name": "vlm", "api_base": fake.api_base}], "routing": {"max_body_mb": 8}})
    resp = await small.post("/v1/chat/completions", data=body, headers={"Content-Type": "application/json"})
    assert resp.status == 413 and (await resp.json())["error"]["code"] == "request_too_large"
    assert len(fake.requests) == 1
