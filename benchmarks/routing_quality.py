"""Routing quality on real engines: prefix-cache hit rate, TTFT and throughput per router.

    python benchmarks/routing_quality.py [--replicas 2] [--kv-tokens 4096] [--rounds 1]
        [--routers round_robin,least_inflight,least_inflight_plain,cache_aware,sglang_cache_aware]
        [--workloads tenants,prefix_repetition] [--json out.json] [--trace trace.json]
    make bench-routing          # the small CPU configuration

One run starts one gateway (``python -m ichat.gateway``, auth off, loopback only) and
``--replicas`` real vLLM workers of SmolLM2 (``python -m ichat.worker``) that register with it
by heartbeat, each with a small KV cache (``--kv-cache-memory-bytes``, with
``VLLM_CPU_KVCACHE_SPACE`` unset: it would override the flag), sized so that all tenants' prompts
fit across the replicas but not in one. The routers take turns in front of the same replicas:
iChat's policies are switched by rewriting the config and ``POST /v1/admin/config/reload`` (the
hot-reload path); the peer, PyPI ``sglang-router`` with its ``cache_aware`` policy, runs beside
the gateway against the same workers (``benchmarks/.venv-router``, installed on first use, or
this interpreter when it has ``sglang_router``). Every router run uses prompts of its own (a
seed per run) so that no router inherits another's cached prefixes; the order of routers
rotates from round to round.

Workloads:

* ``tenants``: T tenants, each with a long system prompt, and C conversations per tenant of K
  turns that grow (each turn adds the previous answer and a new question); ``--concurrency``
  conversations at a time, each one's turns in order. Streamed chat completions, TTFT to the
  first content token.
* ``prefix_repetition``: vLLM's own benchmark client (``vllm.benchmarks.serve``, imported: the
  ``vllm`` console script fails under vllm-cpu), ``--dataset-name prefix_repetition``, against
  ``/v1/completions``.

Reported per router: the engines' own prefix-cache hit rate (the growth of
``vllm:prefix_cache_hits`` over ``vllm:prefix_cache_queries``, summed over replicas), TTFT
p50/p90/p99, output tokens/s, the split of requests over the replicas, and the mean
instantaneous imbalance of in-flight requests (sampled from ``/v1/admin/workers`` every 100 ms;
``--trace`` writes the samples, with each worker's reported load, as JSON).

Needs the machine-wide engine lock when other engines may run (``/work/tools/engine-lock`` on
the shared development machine); wall time on 2 CPU cores: a few minutes.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import httpx
from prometheus_client.parser import text_string_to_metric_families

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(HERE))

from tests.gateway_proc import GatewayProc, write_yaml  # noqa: E402
from tests.procs import Proc, WorkerProc, free_port, smollm2_path, wait_until  # noqa: E402

MODEL = "smollm2"
#: bf16 KV bytes per token of SmolLM2-135M (30 layers x 3 KV heads x 64 x 2 x 2 bytes)
KV_BYTES_PER_TOKEN = 23040
PEER = "sglang_cache_aware"
#: router name -> (iChat policy, extra routing settings); anything else is a policy name
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    # least_inflight as it was before issue 17: in-flight counting without the prefill weight
    "least_inflight_plain": ("least_inflight", {"least_inflight": {"prefill_weight": 0}}),
}
WORDS = (
    "account balance policy refund invoice shipment warranty customer service ticket priority escalation "
    "contract renewal discount region compliance audit privacy record storage backup schedule holiday "
    "support hours response template greeting closing signature product catalogue price tier bundle"
).split()


# -- processes ---------------------------------------------------------------------------------


def start_cluster(tmp: Path, replicas: int, kv_tokens: int, heartbeat_s: float, max_model_len: int, args):
    gateway = GatewayProc(tmp, {"routing": {"policy": "round_robin"}, "logs": {"ring_lines": 200}})
    gateway.wait_up()
    workers = []
    kv_flags = ["--kv-cache-memory-bytes", str(kv_tokens * KV_BYTES_PER_TOKEN)] if kv_tokens else []
    extra = args.worker_args.split()
    for i in range(replicas):
        workers.append(
            WorkerProc(
                tmp, args.model_path or smollm2_path(), MODEL,
                "--worker-id", f"replica-{i}", "--gateway-address", gateway.base_url,
                "--heartbeat-interval", str(heartbeat_s), "--no-log-streaming",
                "--max-model-len", str(max_model_len), *kv_flags, "--enable-prefix-caching", *extra,
                # One core per replica on vLLM's CPU backend: two engines spinning on the same
                # cores stall each other for seconds, which swamps what routing changes.
                env={"VLLM_CPU_KVCACHE_SPACE": None, **(cpu_binding(i) if args.cpu_bind else {})},
            )
        )  # fmt: skip
    for worker in workers:
        worker.wait_ready(timeout=400)
    gateway.wait_routable(MODEL, replicas, timeout=60)
    return gateway, workers


def cpu_binding(replica: int) -> dict[str, str]:
    """``VLLM_CPU_OMP_THREADS_BIND`` for replica ``replica`` (a core of its own, round robin)."""
    cores = sorted(os.sched_getaffinity(0))
    return {"VLLM_CPU_OMP_THREADS_BIND": str(cores[replica % len(cores)])}


def set_policy(gateway: GatewayProc, policy: str, extra: dict[str, Any] | None = None) -> None:
    config = dict(gateway.config)
    config["routing"] = {"policy": policy, **(extra or {})}
    write_yaml(gateway.config_path, config)
    resp = httpx.post(gateway.base_url + "/v1/admin/config/reload", timeout=30)
    resp.raise_for_status()


def start_peer(tmp: Path, workers: list[WorkerProc]) -> tuple[Proc | None, str]:
    """sglang-router (cache_aware, its defaults) in front of the same workers."""
    python: str | None = None
    try:
        import sglang_router  # noqa: F401

        python = sys.executable
    except ImportError:
        from gateway_overhead import router_python

        found, why = router_python(install=True)
        if found is None:
            return None, f"sglang-router unavailable: {why}"
        python = str(found)
    port = free_port()
    argv = [
        python, "-m", "sglang_router.launch_router", "--worker-urls", *[w.base_url for w in workers],
        "--policy", "cache_aware", "--host", "127.0.0.1", "--port", str(port),
        "--prometheus-port", str(free_port()), "--prometheus-host", "127.0.0.1", "--log-level", "warn",
    ]  # fmt: skip
    proc = Proc(argv, tmp / "sglang-router.log")
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: httpx.get(url + "/health", timeout=2).status_code == 200, 60, what="sglang-router /health")
    except TimeoutError as exc:
        proc.stop()
        return None, f"sglang-router did not start: {exc}"
    proc.base_url = url  # type: ignore[attr-defined]
    return proc, "ok"


# -- engine counters ---------------------------------------------------------------------------


def scrape(worker: WorkerProc) -> dict[str, float]:
    text = httpx.get(worker.base_url + "/metrics", timeout=10).text
    out = {"hits": 0.0, "queries": 0.0, "requests": 0.0}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "vllm:prefix_cache_hits_total":
                out["hits"] += sample.value
            elif sample.name == "vllm:prefix_cache_queries_total":
                out["queries"] += sample.value
            elif sample.name == "ichat_worker_requests_total" and sample.labels.get("route") in ("chat_completions", "completions"):
                out["requests"] += sample.value
    return out


class Sampler:
    """In-flight requests per worker (gateway's view) and reported load, every ``every`` s."""

    def __init__(self, gateway: GatewayProc, every: float = 0.1) -> None:
        self.gateway = gateway
        self.every = every
        self.samples: list[dict[str, Any]] = []
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        async with aiohttp.ClientSession() as session:
            t0 = time.monotonic()
            while True:
                try:
                    async with session.get(self.gateway.base_url + "/v1/admin/workers") as resp:
                        data = (await resp.json())["data"]
                    self.samples.append(
                        {
                            "t": round(time.monotonic() - t0, 3),
                            "workers": {
                                w["worker_id"]: {
                                    "inflight": w["inflight_via_gateway"],
                                    "reported": (w["load"].get("running") or 0) + (w["load"].get("waiting") or 0),
                                    "beat_age": w["heartbeat_age_s"],
                                }
                                for w in data
                            },
                        }
                    )
                except (aiohttp.ClientError, KeyError, ValueError):
                    pass
                await asyncio.sleep(self.every)

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def mean_imbalance(self) -> float | None:
        gaps = []
        for s in self.samples:
            loads = [w["inflight"] for w in s["workers"].values()]
            if len(loads) >= 2 and sum(loads):
                gaps.append(max(loads) - min(loads))
        return statistics.fmean(gaps) if gaps else None


# -- workloads ---------------------------------------------------------------------------------


def tenant_prompt(rng: random.Random, tenant: int, words: int, tag: str) -> str:
    body = " ".join(rng.choice(WORDS) for _ in range(words))
    return f"You are the support assistant of tenant {tenant} ({tag}). Its handbook follows. {body}"


async def stream_chat(session: aiohttp.ClientSession, url: str, body: dict[str, Any]) -> dict[str, Any]:
    t0 = time.perf_counter()
    ttft = None
    text: list[str] = []
    tokens = 0
    async with session.post(url + "/v1/chat/completions", json=body) as resp:
        if resp.status != 200:
            return {"ok": False, "status": resp.status, "error": (await resp.text())[:200]}
        async for raw in resp.content:
            line = raw.strip()
            if not line.startswith(b"data: ") or line == b"data: [DONE]":
                continue
            event = json.loads(line[6:])
            for choice in event.get("choices") or ():
                piece = (choice.get("delta") or {}).get("content")
                if piece:
                    if ttft is None:
                        ttft = time.perf_counter() - t0
                    text.append(piece)
            usage = event.get("usage")
            if usage:
                tokens = usage.get("completion_tokens") or tokens
    return {"ok": ttft is not None, "ttft": ttft, "latency": time.perf_counter() - t0, "tokens": tokens, "text": "".join(text)}


async def run_tenants(url: str, args: argparse.Namespace, seed: int) -> dict[str, Any]:
    rng = random.Random(seed)
    tag = f"run {seed}"
    systems = [tenant_prompt(rng, t, args.tenant_words, tag) for t in range(args.tenants)]
    conversations = [(t, c) for t in range(args.tenants) for c in range(args.conversations)]
    rng.shuffle(conversations)
    results: list[dict[str, Any]] = []
    sem = asyncio.Semaphore(args.concurrency)

    async def conversation(session: aiohttp.ClientSession, tenant: int, index: int) -> None:
        async with sem:
            messages = [{"role": "system", "content": systems[tenant]}]
            for turn in range(args.turns):
                messages.append({"role": "user", "content": f"Customer {index} question {turn}: " + " ".join(rng.choice(WORDS) for _ in range(12))})
                body = {
                    "model": MODEL, "messages": messages, "max_tokens": args.output_tokens, "temperature": 0,
                    "stream": True, "stream_options": {"include_usage": True}, "user": f"tenant-{tenant}-conv-{index}",
                }  # fmt: skip
                result = await stream_chat(session, url, body)
                results.append(result)
                if not result["ok"]:
                    return
                messages.append({"role": "assistant", "content": result["text"]})

    t0 = time.perf_counter()
    timeout = aiohttp.ClientTimeout(total=600)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        await asyncio.gather(*(conversation(session, t, c) for t, c in conversations))
    elapsed = time.perf_counter() - t0
    ok = [r for r in results if r["ok"]]
    ttfts = sorted(r["ttft"] * 1000 for r in ok)
    return {
        "requests": len(results),
        "failed": len(results) - len(ok),
        "ttft_ms": percentiles(ttfts),
        "output_tok_s": sum(r["tokens"] for r in ok) / elapsed,
        "seconds": elapsed,
    }


async def run_prefix_repetition(url: str, args: argparse.Namespace, seed: int) -> dict[str, Any]:
    from vllm.benchmarks.serve import add_cli_args, main_async
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = FlexibleArgumentParser()
    add_cli_args(parser)
    model = args.model_path or smollm2_path()
    bench_args = parser.parse_args(
        [
            "--backend", "openai", "--base-url", url, "--endpoint", "/v1/completions",
            "--model", model, "--served-model-name", MODEL, "--tokenizer", model,
            "--dataset-name", "prefix_repetition",
            "--prefix-repetition-prefix-len", str(args.prefix_len),
            "--prefix-repetition-suffix-len", str(args.suffix_len),
            "--prefix-repetition-num-prefixes", str(args.num_prefixes),
            "--prefix-repetition-output-len", str(args.output_tokens),
            "--num-prompts", str(args.num_prompts), "--max-concurrency", str(args.concurrency),
            "--seed", str(seed), "--percentile-metrics", "ttft", "--metric-percentiles", "50,90,99",
            "--disable-tqdm",
        ]
    )  # fmt: skip
    result = await main_async(bench_args)
    return {
        "requests": result.get("completed", 0) + result.get("failed", 0),
        "failed": result.get("failed", 0),
        "ttft_ms": {"p50": result.get("p50_ttft_ms"), "p90": result.get("p90_ttft_ms"), "p99": result.get("p99_ttft_ms")},
        "output_tok_s": result.get("output_throughput"),
        "seconds": result.get("duration"),
    }


def percentiles(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"p50": None, "p90": None, "p99": None}
    pick = lambda q: values[min(len(values) - 1, int(q * len(values)))]  # noqa: E731
    return {"p50": statistics.median(values), "p90": pick(0.9), "p99": pick(0.99)}


WORKLOADS = {"tenants": run_tenants, "prefix_repetition": run_prefix_repetition}


# -- the run -----------------------------------------------------------------------------------


def decisions(gateway: GatewayProc) -> dict[str, float]:
    """cache_aware's decisions so far, by outcome (hit, miss, imbalance)."""
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(httpx.get(gateway.base_url + "/metrics", timeout=10).text):
        for sample in family.samples:
            if sample.name == "ichat_routing_prefix_decisions_total":
                out[sample.labels["outcome"]] = out.get(sample.labels["outcome"], 0) + sample.value
    return out


async def measure(router: str, url: str, workload: str, args, workers, gateway, seed: int) -> dict[str, Any]:
    before = [scrape(w) for w in workers]
    decided = decisions(gateway)
    sampler = Sampler(gateway)
    sampler.start()
    try:
        result = await WORKLOADS[workload](url, args, seed)
    finally:
        await sampler.stop()
    after = [scrape(w) for w in workers]
    result["decisions"] = {k: int(v - decided.get(k, 0)) for k, v in decisions(gateway).items() if v - decided.get(k, 0)}
    hits = sum(a["hits"] - b["hits"] for a, b in zip(after, before))
    queries = sum(a["queries"] - b["queries"] for a, b in zip(after, before))
    result["hit_rate"] = hits / queries if queries else None
    result["split"] = [int(a["requests"] - b["requests"]) for a, b in zip(after, before)]
    result["inflight_imbalance"] = sampler.mean_imbalance() if router != PEER else None
    result["router"], result["workload"], result["seed"] = router, workload, seed
    result["trace"] = sampler.samples
    return result


def table(results: list[dict[str, Any]]) -> str:
    lines = []
    for workload in dict.fromkeys(r["workload"] for r in results):
        lines.append(f"\n{workload}")
        lines.append(
            f"{'router':<20}{'hit rate':>9}{'TTFT p50':>10}{'p90':>8}{'p99':>8}{'out tok/s':>11}{'split':>12}{'imbal.':>8}{'fail':>6}"
        )
        for r in (r for r in results if r["workload"] == workload):
            t = r["ttft_ms"]
            fmt = lambda v, spec: format(v, spec) if v is not None else "-"  # noqa: E731
            lines.append(
                f"{r['router']:<20}{fmt(r['hit_rate'], '.3f'):>9}{fmt(t['p50'], '.0f'):>10}{fmt(t['p90'], '.0f'):>8}"
                f"{fmt(t['p99'], '.0f'):>8}{fmt(r['output_tok_s'], '.1f'):>11}{'/'.join(map(str, r['split'])):>12}"
                f"{fmt(r['inflight_imbalance'], '.2f'):>8}{r['failed']:>6}"
            )
    return "\n".join(lines)


async def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    routers = args.routers.split(",")
    workloads = args.workloads.split(",")
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="ichat-routing-") as tmp_name, contextlib.ExitStack() as stack:
        tmp = Path(tmp_name)
        t0 = time.monotonic()
        gateway, workers = start_cluster(tmp, args.replicas, args.kv_tokens, args.heartbeat, args.max_model_len, args)
        stack.callback(gateway.stop)
        for w in workers:
            stack.callback(w.stop)
        print(f"cluster ready in {time.monotonic() - t0:.0f} s", flush=True)
        peer = None
        if PEER in routers:
            peer, why = start_peer(tmp, workers)
            if peer is None:
                print(f"skipping {PEER}: {why}", flush=True)
                routers.remove(PEER)
            else:
                stack.callback(peer.stop)
        seed = args.seed
        for round_no in range(args.rounds):
            order = routers[round_no % len(routers) :] + routers[: round_no % len(routers)]
            if round_no % 2:
                order.reverse()
            for workload in workloads:
                for router in order:
                    seed += 1
                    if router == PEER:
                        url = peer.base_url  # type: ignore[union-attr]
                    else:
                        policy, extra = VARIANTS.get(router, (router, {}))
                        set_policy(gateway, policy, extra)
                        url = gateway.base_url
                    t1 = time.monotonic()
                    result = await measure(router, url, workload, args, workers, gateway, seed)
                    result["round"] = round_no
                    results.append(result)
                    print(
                        f"round {round_no} {workload:<18} {router:<20} hit {result['hit_rate'] or 0:.3f} "
                        f"TTFT p50 {result['ttft_ms']['p50'] or 0:.0f} ms, {result['output_tok_s'] or 0:.1f} tok/s, "
                        f"split {result['split']}, {result['decisions'] or ''} {time.monotonic() - t1:.0f} s",
                        flush=True,
                    )
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--model-path", help="SmolLM2 checkpoint directory (default: the one `make models` builds)")
    parser.add_argument("--kv-tokens", type=int, default=4096, help="KV cache per replica, in tokens (0: engine default)")
    parser.add_argument(
        "--worker-args", default="", help="more engine flags for every worker, e.g. on a GPU: "
        "'--gpu-memory-utilization 0.4 --num-gpu-blocks-override 3000' (with --kv-tokens 0 --no-cpu-bind)"
    )
    parser.add_argument("--cpu-bind", action=argparse.BooleanOptionalAction, default=True, help="one core per replica")
    parser.add_argument("--max-model-len", type=int, default=2048)
    parser.add_argument("--heartbeat", type=float, default=2.0, help="workers' heartbeat interval (s)")
    parser.add_argument("--routers", default=",".join(("round_robin", "least_inflight", "cache_aware", PEER)))
    parser.add_argument("--workloads", default="tenants,prefix_repetition")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--seed", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--output-tokens", type=int, default=16)
    tenants = parser.add_argument_group("tenants workload")
    tenants.add_argument("--tenants", type=int, default=6)
    tenants.add_argument("--tenant-words", type=int, default=400, help="system prompt length, in words")
    tenants.add_argument("--conversations", type=int, default=2, help="per tenant")
    tenants.add_argument("--turns", type=int, default=3)
    prefix = parser.add_argument_group("prefix_repetition workload (vLLM's client)")
    prefix.add_argument("--prefix-len", type=int, default=512)
    prefix.add_argument("--suffix-len", type=int, default=64)
    prefix.add_argument("--num-prefixes", type=int, default=6)
    prefix.add_argument("--num-prompts", type=int, default=48)
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--trace", type=Path, help="write the in-flight/reported-load samples here")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    t0 = time.monotonic()
    results = asyncio.run(run(args))
    print(table(results))
    print(f"\nwall time {time.monotonic() - t0:.0f} s")
    if args.trace:
        args.trace.write_text(json.dumps([{k: r[k] for k in ("router", "workload", "round", "trace")} for r in results]))
    if args.json:
        args.json.write_text(json.dumps([{k: v for k, v in r.items() if k != "trace"} for r in results], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
