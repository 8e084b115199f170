"""A real engine on another "host": a vLLM worker (SmolLM2) in a network namespace, registering
with the gateway over its veth pair with the worker token, answering through the gateway with
the OpenAI SDK, cut off and healed.

Here the answers matter (the drills with stub engines are in test_partitions.py and
test_gateway_restart.py): the worker must answer the same before and after the partition, and
while it is cut off, a client of its model gets an immediate 503 with Retry-After, not a wait.
One engine start for the module.
"""

from __future__ import annotations

import time

import openai
import pytest

from tests.cluster import CLIENT_KEY, ClusterGateway, vllm_worker
from tests.procs import smollm2_path, wait_until

INTERVAL = 1.0
ENGINE_START_S = 300
QUESTION = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]
CONNECT_S = 5.0  # the default routing.timeouts.connect_s


@pytest.fixture(scope="module")
def cluster(e2e_tmp, netns_hosts):
    tmp = e2e_tmp / "faults"
    tmp.mkdir()
    gateway = ClusterGateway(tmp, {"registry": {"probe_interval_s": 0.5, "probe_timeout_s": 0.5}}, name="faults-gateway")
    host = netns_hosts("eng")
    procs = [gateway]
    try:
        gateway.wait_up()
        worker = vllm_worker(tmp, gateway, "far-vllm", smollm2_path(), "--max-model-len", "1024", host=host, interval=INTERVAL)
        procs.append(worker)
        worker.wait_ready(ENGINE_START_S)
        wait_until(lambda: gateway.routable("far-vllm"), 2 * INTERVAL + 1, interval=0.1, what="far-vllm routable")
        yield gateway, host, worker
    finally:
        for proc in reversed(procs):
            proc.stop()


def client(gateway: ClusterGateway) -> openai.OpenAI:
    return openai.OpenAI(base_url=gateway.base_url + "/v1", api_key=CLIENT_KEY, timeout=60, max_retries=0)


def ask(gateway: ClusterGateway) -> str:
    answer = client(gateway).chat.completions.create(model="smollm2", messages=QUESTION, temperature=0, max_tokens=20)
    return answer.choices[0].message.content


def test_real_worker_on_another_host_registers_over_the_veth_and_answers(cluster):
    gateway, host, _worker = cluster
    view = gateway.workers()["far-vllm"]
    assert view["address"] == f"http://{host.ns_ip}:{view['address'].rsplit(':', 1)[1]}"
    assert view["backend"] == "vllm"
    assert "Paris" in ask(gateway)
    stream = client(gateway).chat.completions.create(model="smollm2", messages=QUESTION, temperature=0, max_tokens=20, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == ask(gateway)


def test_real_worker_cut_off_fails_fast_and_heals_by_itself(cluster):
    gateway, host, _worker = cluster
    before = ask(gateway)
    cut_at = time.monotonic()
    host.drop_packets("both")
    try:
        wait_until(lambda: not gateway.routable("far-vllm"), 10, interval=0.05, what="far-vllm out of rotation")
        eject_s = time.monotonic() - cut_at
        asked_at = time.monotonic()
        with pytest.raises(openai.APIStatusError) as refused:
            ask(gateway)
        waited_s = time.monotonic() - asked_at
        assert refused.value.status_code == 503
        assert refused.value.response.headers.get("Retry-After")
        assert refused.value.body["code"] == "no_healthy_endpoint"
    finally:
        host.restore_packets()
    restored_at = time.monotonic()
    wait_until(lambda: gateway.routable("far-vllm"), 10, interval=0.05, what="far-vllm back in rotation")
    heal_s = time.monotonic() - restored_at
    print(f"\nreal engine on a namespace host: out in {eject_s:.2f}s, a request meanwhile answered 503 in {waited_s * 1000:.0f} ms, back in {heal_s:.2f}s")
    assert waited_s < CONNECT_S
    assert ask(gateway) == before  # greedy: the same answer as before the cut
