"""cache_aware against round_robin on two real SmolLM2 replicas with small KV caches.

A real gateway and two real vLLM workers that register by heartbeat; the OpenAI SDK as client.
Each replica's KV cache holds about 1,400 tokens (11 blocks of 128 on vLLM's CPU backend): five
tenants' prompts (~390 tokens, three whole blocks each: 15 blocks) fit across the two replicas
but not in one. Requests cycle through the tenants in turn.
round_robin sends every tenant to both replicas in alternation (5 is odd), so each replica
cycles through all five prompts and its LRU prefix cache keeps evicting what comes next;
cache_aware keeps each tenant on one replica, where its prompt stays cached. The engines' own
counters (``vllm:prefix_cache_hits`` / ``queries``) decide. The policy is switched by a config
reload, with fresh prompts for each phase so that no phase inherits the other's cache.

The workers report their engines' prefix caches (``--report-prefix-cache``, from vLLM's KV-cache
events), so cache_aware's precise mode is measured on the same replicas, and checked to see an
eviction that the gateway did not cause.
"""

from __future__ import annotations

import random
import time

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.gateway_proc import GatewayProc, write_yaml
from tests.procs import WorkerProc, smollm2_path

MODEL = "smollm2"
KV_TOKENS = 1536  # vLLM's CPU backend keeps 11 blocks of 128 tokens of it
MAX_MODEL_LEN = 1024
#: SmolLM2-135M in float32 (30 layers x 3 KV heads x 64 x 2 x 4 bytes). float32, not the
#: checkpoint's bf16: on CPUs without AVX-512 vLLM's oneDNN bf16 matmul is unavailable and its
#: fallback took ~10 s per uncached 450-token prompt, against ~1 s in float32; only hit rates
#: are compared here, so the numerics do not matter
KV_BYTES_PER_TOKEN = 46080
TENANTS = 5
REQUESTS_PER_TENANT = 4
WORDS = "invoice refund shipment warranty ticket contract renewal audit privacy backup schedule catalogue bundle tier".split()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("routing-quality")
    gateway = GatewayProc(tmp, {"routing": {"policy": "round_robin"}})
    workers: list[WorkerProc] = []
    try:
        gateway.wait_up()
        for i in range(2):
            workers.append(
                WorkerProc(
                    tmp, smollm2_path(), MODEL,
                    "--worker-id", f"replica-{i}", "--gateway-address", gateway.base_url, "--heartbeat-interval", "2",
                    "--no-log-streaming", "--max-model-len", str(MAX_MODEL_LEN),
                    "--kv-cache-memory-bytes", str(KV_TOKENS * KV_BYTES_PER_TOKEN), "--enable-prefix-caching",
                    "--dtype", "float32",
                    "--report-prefix-cache",
                    env={"VLLM_CPU_KVCACHE_SPACE": None},  # it would override --kv-cache-memory-bytes
                )
            )  # fmt: skip
        for worker in workers:
            worker.wait_ready(timeout=300)
        gateway.wait_routable(MODEL, 2, timeout=60)
        yield gateway, workers
    finally:
        for worker in workers:
            worker.stop()
        gateway.stop()


def prefix_counters(workers: list[WorkerProc]) -> tuple[float, float]:
    hits = queries = 0.0
    for worker in workers:
        for family in text_string_to_metric_families(httpx.get(worker.base_url + "/metrics", timeout=10).text):
            for sample in family.samples:
                if sample.name == "vllm:prefix_cache_hits_total":
                    hits += sample.value
                elif sample.name == "vllm:prefix_cache_queries_total":
                    queries += sample.value
    return hits, queries


def set_routing(gateway: GatewayProc, policy: str, **settings) -> None:
    config = dict(gateway.config, routing={"policy": policy, **settings})
    write_yaml(gateway.config_path, config)
    httpx.post(gateway.base_url + "/v1/admin/config/reload", timeout=30).raise_for_status()


def tenant_systems(seed: int, tenants: int = TENANTS) -> list[str]:
    rng = random.Random(seed)
    return [
        f"You are the assistant of tenant {t} (phase {seed}). Handbook: " + " ".join(rng.choice(WORDS) for _ in range(360))
        for t in range(tenants)
    ]


def run_phase(gateway: GatewayProc, workers: list[WorkerProc], policy: str, seed: int, **settings) -> float:
    set_routing(gateway, policy, **settings)
    systems = tenant_systems(seed)
    client = openai.OpenAI(base_url=gateway.base_url + "/v1", api_key="unused", timeout=120, max_retries=0)
    before = prefix_counters(workers)
    for i in range(TENANTS * REQUESTS_PER_TENANT):
        tenant = i % TENANTS
        answer = client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "system", "content": systems[tenant]}, {"role": "user", "content": f"Question {i}?"}],
            max_tokens=2,
            temperature=0,
        )
        assert answer.choices[0].message.content is not None
    after = prefix_counters(workers)
    return (after[0] - before[0]) / (after[1] - before[1])


def test_cache_aware_beats_round_robin_on_the_engines_hit_rate(cluster):
    gateway, workers = cluster
    round_robin = run_phase(gateway, workers, "round_robin", seed=1)
    cache_aware = run_phase(gateway, workers, "cache_aware", seed=2)
    precise = run_phase(gateway, workers, "cache_aware", seed=3, cache_aware={"precise": True})
    print(f"engine prefix-cache hit rate: round_robin {round_robin:.3f}, cache_aware {cache_aware:.3f}, precise {precise:.3f}")
    assert cache_aware >= 0.5, cache_aware
    assert cache_aware >= 2 * round_robin, (cache_aware, round_robin)
    assert precise >= 0.5 and precise >= 2 * round_robin, (precise, round_robin)
    metrics = httpx.get(gateway.base_url + "/metrics", timeout=10).text
    assert 'ichat_routing_prefix_decisions_total{model="smollm2",outcome="hit"}' in metrics


def reported_blocks(gateway: GatewayProc) -> dict[str, int | None]:
    data = httpx.get(gateway.base_url + "/v1/admin/workers", timeout=10).json()["data"]
    return {w["worker_id"]: w["prefix_cache_blocks"] for w in data}


def wait_for(condition, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.2)


def decision_counts(gateway: GatewayProc) -> dict[str, float]:
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(httpx.get(gateway.base_url + "/metrics", timeout=10).text):
        for sample in family.samples:
            if sample.name == "ichat_routing_prefix_decisions_total":
                out[sample.labels["outcome"]] = sample.value
    return out


def test_precise_mode_sees_an_eviction_the_gateway_did_not_cause(cluster):
    """A tenant's prefix is sent to one replica; then traffic that bypasses the gateway evicts it
    there. The worker's report drops it, and precise cache_aware treats the tenant's next
    request as a miss (load decides) instead of a hit on a replica that no longer holds it,
    which is all the approximate index could say."""
    gateway, workers = cluster
    set_routing(gateway, "cache_aware", cache_aware={"precise": True, "precise_grace_s": 0.5})
    by_id = {f"replica-{i}": w for i, w in enumerate(workers)}
    start = reported_blocks(gateway)
    system = tenant_systems(seed=4, tenants=1)[0]
    client = openai.OpenAI(base_url=gateway.base_url + "/v1", api_key="unused", timeout=120, max_retries=0)
    ask = lambda c, q: c.chat.completions.create(  # noqa: E731
        model=MODEL, messages=[{"role": "system", "content": system}, {"role": "user", "content": q}], max_tokens=2, temperature=0
    )
    ask(client, "First question?")
    grown = wait_for(
        lambda: [w for w, n in reported_blocks(gateway).items() if (n or 0) > (start.get(w) or 0)],
        30, "a replica to report the tenant's prefix",
    )  # fmt: skip
    home_id = grown[0]
    home = by_id[home_id]
    held = reported_blocks(gateway)[home_id]

    # Other tenants' prompts straight at that replica (not through the gateway) fill its cache.
    direct = openai.OpenAI(base_url=home.base_url + "/v1", api_key="unused", timeout=120, max_retries=0)
    for other in tenant_systems(seed=5, tenants=6):
        direct.chat.completions.create(
            model=MODEL, messages=[{"role": "system", "content": other}, {"role": "user", "content": "Hi?"}], max_tokens=1
        )
    wait_for(lambda: (reported_blocks(gateway)[home_id] or 0) < held, 30, "the eviction to be reported")

    before = decision_counts(gateway)
    ask(client, "Second question?")
    after = decision_counts(gateway)
    assert after.get("miss", 0) == before.get("miss", 0) + 1, (before, after)
    assert after.get("hit", 0) == before.get("hit", 0), (before, after)
