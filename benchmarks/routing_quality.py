"""Routing quality on real engines: prefix-cache hit rate, TTFT and throughput per router.

    python benchmarks/routing_quality.py [--replicas 2] [--kv-tokens 4096] [--rounds 1]
        [--routers round_robin,least_inflight,least_inflight_plain,cache_aware,cache_aware_precise,
                   sglang_cache_aware,sglang_round_robin]
        [--workloads tenants,prefix_repetition,long_prefix] [--json out.json] [--trace trace.json]
        [--preset gpu] [--out DIR] [--deadline EPOCH_S] [--pidfile FILE]
    make bench-routing          # the small CPU configuration

``--preset gpu`` is issue 17's GPU setup: two replicas on one GPU (``--gpu-memory-utilization
0.4``, ``--num-gpu-blocks-override 3000``, CUDA graphs on, started one after the other so that
each one's memory profile sees the other's share taken), ``ignore_eos`` so that every request
decodes its full length, and each workload at the issue's size (``PRESETS``). ``--out DIR``
rewrites results.json, table.md and trace.json after every run, so that a run cut short still
leaves what it measured; ``--deadline`` skips the runs that would end past it.

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
* ``long_prefix``: the same client with fewer, longer prefixes (issue 17's second workload, where
  affinity that unbalances the replicas costs more than the cache saves).

Reported per router: the engines' own prefix-cache hit rate (the growth of
``vllm:prefix_cache_hits`` over ``vllm:prefix_cache_queries``, summed over replicas), TTFT
p50/p90/p99, output tokens/s, the split of requests over the replicas, and the mean
instantaneous imbalance of in-flight requests (sampled from ``/v1/admin/workers`` every 100 ms;
``--trace`` writes the samples, with each worker's reported load, as JSON).

Run it alone: other engines on the same cores (a test run, say) skew every figure. Wall time on 2
CPU cores: a few minutes (the CPU configuration); on one H100, 291–529 s per call (``--preset gpu``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
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
#: the peer's routers (PyPI sglang-router in front of the same workers) -> its --policy
PEERS = {"sglang_cache_aware": "cache_aware", "sglang_round_robin": "round_robin"}
#: router name -> (iChat policy, extra routing settings); anything else is a policy name
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    # least_inflight as it was before issue 17: in-flight counting without the prefill weight
    "least_inflight_plain": ("least_inflight", {"least_inflight": {"prefill_weight": 0}}),
    # scores by the blocks the engines report holding (workers run --report-prefix-cache)
    "cache_aware_precise": ("cache_aware", {"cache_aware": {"precise": True}}),
}
ALL_ROUTERS = ("round_robin", "least_inflight", "least_inflight_plain", "cache_aware", "cache_aware_precise", *PEERS)
#: per preset, per workload: the options that workload runs with (others from the command line)
PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    "cpu": {
        "long_prefix": {"num_prefixes": 3, "prefix_len": 1536, "suffix_len": 64, "num_prompts": 24},
    },
    "gpu": {
        "prefix_repetition": {
            "num_prefixes": 40, "prefix_len": 2048, "suffix_len": 128, "output_tokens": 64,
            "num_prompts": 800, "concurrency": 32,
        },
        "long_prefix": {
            "num_prefixes": 12, "prefix_len": 6144, "suffix_len": 128, "output_tokens": 32,
            "num_prompts": 360, "concurrency": 16,
        },
        # 24 tenants x ~2,400-token system prompts: 57,600 tokens of prefixes against 48,000
        # cached tokens per replica (3,000 blocks of 16): they fit across two, not in one.
        "tenants": {
            "tenants": 24, "tenant_words": 2400, "conversations": 8, "turns": 4, "output_tokens": 128,
            "concurrency": 32,
        },
    },
}  # fmt: skip
GPU_DEFAULTS = {
    "kv_tokens": 0, "cpu_bind": False, "max_model_len": 8192, "enforce_eager": False, "ignore_eos": True,
    "sequential_start": True,
    "worker_args": "--gpu-memory-utilization 0.4 --num-gpu-blocks-override 3000",
    "routers": ",".join(ALL_ROUTERS), "workloads": "prefix_repetition,long_prefix,tenants",
}  # fmt: skip
WORDS = (
    "account balance policy refund invoice shipment warranty customer service ticket priority escalation "
    "contract renewal discount region compliance audit privacy record storage backup schedule holiday "
    "support hours response template greeting closing signature product catalogue price tier bundle"
).split()


# -- processes ---------------------------------------------------------------------------------


def start_cluster(tmp: Path, replicas: int, kv_tokens: int, heartbeat_s: float, max_model_len: int, args, procs: list[Proc]):
    """One gateway and ``replicas`` workers; each is appended to ``procs`` as it starts."""
    gateway = GatewayProc(tmp, {"routing": {"policy": "round_robin"}, "logs": {"ring_lines": 200}})
    procs.append(gateway)
    gateway.wait_up()
    workers: list[WorkerProc] = []
    kv_flags = ["--kv-cache-memory-bytes", str(kv_tokens * KV_BYTES_PER_TOKEN)] if kv_tokens else []
    extra = args.worker_args.split()
    if args.renderer_threads:
        extra += ["--renderer-num-workers", str(args.renderer_threads)]
    # precise mode needs the engines' KV-cache events; every replica reports, whichever router
    # runs, so that all routers pay the same (small) cost
    if any(router_settings(r)[1].get("cache_aware", {}).get("precise") for r in args.routers.split(",") if r not in PEERS):
        extra.append("--report-prefix-cache")
    for i in range(replicas):
        workers.append(
            WorkerProc(
                tmp, args.model_path or smollm2_path(), MODEL,
                "--worker-id", f"replica-{i}", "--gateway-address", gateway.base_url,
                "--heartbeat-interval", str(heartbeat_s), "--no-log-streaming",
                "--max-model-len", str(max_model_len), *kv_flags, "--enable-prefix-caching", *extra,
                # One core per replica on vLLM's CPU backend: two engines spinning on the same
                # cores stall each other for seconds, which swamps what routing changes.
                env={
                    "VLLM_CPU_KVCACHE_SPACE": None, **(cpu_binding(i) if args.cpu_bind else {}),
                    **(traceable_env() if args.profile else {}),
                },
                enforce_eager=args.enforce_eager,
            )
        )  # fmt: skip
        procs.append(workers[-1])
        write_pids(args, procs)
        if args.sequential_start:
            workers[-1].wait_ready(timeout=600)
    for worker in workers:
        worker.wait_ready(timeout=600)
    gateway.wait_routable(MODEL, replicas, timeout=60)
    return gateway, workers


def router_settings(router: str) -> tuple[str, dict[str, Any]]:
    """(policy, routing settings) for an iChat router name: a policy, a ``VARIANTS`` name, or
    either with settings of the policy appended, e.g. ``cache_aware+balance_abs=8``."""
    name, *pairs = router.split("+")
    policy, extra = VARIANTS.get(name, (name, {}))
    extra = {key: dict(value) if isinstance(value, dict) else value for key, value in extra.items()}
    for pair in pairs:
        key, _, value = pair.partition("=")
        extra.setdefault(policy, {})[key] = json.loads(value)
    return policy, extra


def traceable_env() -> dict[str, str]:
    """A worker's environment for ``--profile``: its processes let py-spy attach (``ptracer/``)."""
    return {"PYTHONPATH": os.pathsep.join(filter(None, (str(HERE / "ptracer"), os.environ.get("PYTHONPATH"))))}


class Profiler:
    """``py-spy record`` of every replica (the worker's process and its engine core) during one
    run: raw collapsed stacks, active samples only, one file per replica under ``out``."""

    def __init__(self, pyspy: str, workers: list[WorkerProc], out: Path, label: str, rate: int = 100) -> None:
        self.recorders: list[subprocess.Popen[bytes]] = []
        out.mkdir(parents=True, exist_ok=True)
        for i, worker in enumerate(workers):
            argv = [
                pyspy, "record", "-p", str(worker.popen.pid), "--subprocesses", "--nonblocking", "-r", str(rate),
                "-f", "raw", "-o", str(out / f"pyspy-{label}-replica{i}.txt"),
            ]  # fmt: skip
            with open(out / f"pyspy-{label}-replica{i}.log", "wb") as log:
                self.recorders.append(subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True))

    def stop(self) -> None:
        """SIGINT makes py-spy write what it recorded; it gets 20 s to do so."""
        for rec in self.recorders:
            if rec.poll() is None:
                rec.send_signal(signal.SIGINT)
        for rec in self.recorders:
            try:
                rec.wait(timeout=20)
            except subprocess.TimeoutExpired:
                rec.kill()
                rec.wait()


def write_pids(args: argparse.Namespace, procs: list[Proc]) -> None:
    """Every process group started so far, for a later cleanup (``--pidfile``)."""
    if args.pidfile:
        args.pidfile.write_text("".join(f"{p.pid}\n" for p in procs))


def cpu_binding(replica: int) -> dict[str, str]:
    """``VLLM_CPU_OMP_THREADS_BIND`` for replica ``replica`` (a core of its own, round robin)."""
    cores = sorted(os.sched_getaffinity(0))
    return {"VLLM_CPU_OMP_THREADS_BIND": str(cores[replica % len(cores)])}


def set_policy(gateway: GatewayProc, policy: str, extra: dict[str, Any] | None = None) -> None:
    """The policy and its settings, by config reload, through round_robin first: a policy whose
    name is unchanged keeps its instance over a reload (the hot-reload contract), and each run
    must start with an empty index (the engines' caches are reset too)."""
    for routing in ({"policy": "round_robin"}, {"policy": policy, **(extra or {})}):
        write_yaml(gateway.config_path, dict(gateway.config, routing=routing))
        resp = httpx.post(gateway.base_url + "/v1/admin/config/reload", timeout=30)
        resp.raise_for_status()


def start_peer(tmp: Path, workers: list[WorkerProc], policy: str) -> tuple[Proc | None, str]:
    """sglang-router (``policy``, its other settings at their defaults) in front of the same workers."""
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
        "--policy", policy, "--host", "127.0.0.1", "--port", str(port),
        "--prometheus-port", str(free_port()), "--prometheus-host", "127.0.0.1", "--log-level", "warn",
    ]  # fmt: skip
    proc = Proc(argv, tmp / f"sglang-router-{policy}.log")
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: httpx.get(url + "/health", timeout=2).status_code == 200, 60, what="sglang-router /health")
    except TimeoutError as exc:
        proc.stop()
        return None, f"sglang-router did not start: {exc}"
    proc.base_url = url  # type: ignore[attr-defined]
    return proc, "ok"


# -- engine counters ---------------------------------------------------------------------------


#: the engine's latency histograms whose means ``measure`` reports per replica (name -> key):
#: with the client's TTFT they say where a request's time goes (before the engine, waiting
#: in its scheduler, in prefill, between tokens)
ENGINE_HISTOGRAMS = {
    "vllm:time_to_first_token_seconds": "engine_ttft",
    "vllm:request_queue_time_seconds": "queue",
    "vllm:request_prefill_time_seconds": "prefill",
    "vllm:inter_token_latency_seconds": "itl",
    "vllm:e2e_request_latency_seconds": "e2e",
}


def scrape(worker: WorkerProc) -> dict[str, float]:
    text = httpx.get(worker.base_url + "/metrics", timeout=10).text
    out = {"hits": 0.0, "queries": 0.0, "requests": 0.0}
    for family in text_string_to_metric_families(text):
        key = ENGINE_HISTOGRAMS.get(family.name)
        for sample in family.samples:
            if key and sample.name.endswith(("_sum", "_count")):
                field = f"{key}_{sample.name.rsplit('_', 1)[1]}"
                out[field] = out.get(field, 0.0) + sample.value
            elif sample.name == "vllm:prefix_cache_hits_total":
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
                if args.ignore_eos:
                    body["ignore_eos"] = True  # vLLM's extension: every answer its full length
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

    try:
        from vllm.utils.argparse_utils import FlexibleArgumentParser
    except ImportError:  # vLLM 0.26
        from vllm.utils import FlexibleArgumentParser

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
            "--disable-tqdm", *(["--ignore-eos"] if args.ignore_eos else []),
        ]
    )  # fmt: skip
    result = await main_async(bench_args)
    return {
        "requests": result.get("completed", 0) + result.get("failed", 0),
        "failed": result.get("failed", 0),
        "ttft_ms": {
            "p50": result.get("p50_ttft_ms"), "p90": result.get("p90_ttft_ms"), "p99": result.get("p99_ttft_ms"),
            "mean": result.get("mean_ttft_ms"),
        },
        "output_tok_s": result.get("output_throughput"),
        "seconds": result.get("duration"),
    }


def percentiles(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"p50": None, "p90": None, "p99": None, "mean": None}
    pick = lambda q: values[min(len(values) - 1, int(q * len(values)))]  # noqa: E731
    return {"p50": statistics.median(values), "p90": pick(0.9), "p99": pick(0.99), "mean": statistics.fmean(values)}


WORKLOADS = {"tenants": run_tenants, "prefix_repetition": run_prefix_repetition, "long_prefix": run_prefix_repetition}


def workload_args(args: argparse.Namespace, workload: str) -> argparse.Namespace:
    """``args`` with ``workload``'s preset sizes applied (where the command line left the default)."""
    merged = argparse.Namespace(**vars(args))
    for key, value in PRESETS[args.preset].get(workload, {}).items():
        if key not in args.explicit:
            setattr(merged, key, value)
    return merged


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
        result = await WORKLOADS[workload](url, workload_args(args, workload), seed)
    finally:
        await sampler.stop()
    after = [scrape(w) for w in workers]
    result["decisions"] = {k: int(v - decided.get(k, 0)) for k, v in decisions(gateway).items() if v - decided.get(k, 0)}
    hits = sum(a["hits"] - b["hits"] for a, b in zip(after, before))
    queries = sum(a["queries"] - b["queries"] for a, b in zip(after, before))
    result["hit_rate"] = hits / queries if queries else None
    result["split"] = [int(a["requests"] - b["requests"]) for a, b in zip(after, before)]
    result["engine_ms"] = [engine_means(b, a) for b, a in zip(before, after)]
    result["inflight_imbalance"] = sampler.mean_imbalance() if router not in PEERS else None
    # what the workers last reported of their engines' caches (precise mode's input; None when off)
    result["reported_blocks"] = [w.get("prefix_cache_blocks") for w in gateway.workers().values()]
    result["router"], result["workload"], result["seed"] = router, workload, seed
    result["trace"] = sampler.samples
    return result


def engine_means(before: dict[str, float], after: dict[str, float]) -> dict[str, float | None]:
    """Per replica, the mean of each of ``ENGINE_HISTOGRAMS`` over the run (ms), and its count."""
    out: dict[str, float | None] = {}
    for key in ENGINE_HISTOGRAMS.values():
        n = after.get(f"{key}_count", 0.0) - before.get(f"{key}_count", 0.0)
        total = after.get(f"{key}_sum", 0.0) - before.get(f"{key}_sum", 0.0)
        out[key] = round(1000 * total / n, 2) if n else None
        if key == "engine_ttft":
            out["n"] = int(n)
    return out


def table(results: list[dict[str, Any]]) -> str:
    lines = []
    fmt = lambda v, spec: format(v, spec) if v is not None else "-"  # noqa: E731
    for workload in dict.fromkeys(r["workload"] for r in results):
        lines.append(f"\n{workload}")
        lines.append(
            f"{'router':<21}{'round':>6}{'hit rate':>9}{'TTFT p50':>10}{'p90':>8}{'p99':>8}{'out tok/s':>11}"
            f"{'split':>12}{'imbal.':>8}{'fail':>6}"
        )
        for r in sorted((r for r in results if r["workload"] == workload), key=lambda r: (r["router"], r["round"])):
            t = r["ttft_ms"]
            lines.append(
                f"{r['router']:<21}{r['round']:>6}{fmt(r['hit_rate'], '.3f'):>9}{fmt(t['p50'], '.0f'):>10}"
                f"{fmt(t['p90'], '.0f'):>8}{fmt(t['p99'], '.0f'):>8}{fmt(r['output_tok_s'], '.1f'):>11}"
                f"{'/'.join(map(str, r['split'])):>12}{fmt(r['inflight_imbalance'], '.2f'):>8}{r['failed']:>6}"
            )
    return "\n".join(lines)


def write_out(args: argparse.Namespace, results: list[dict[str, Any]]) -> None:
    """results.json, table.md and trace.json under ``--out`` (rewritten after every run)."""
    if not args.out:
        return
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps([{k: v for k, v in r.items() if k != "trace"} for r in results], indent=1))
    (args.out / "table.md").write_text(table(results) + "\n")
    (args.out / "trace.json").write_text(json.dumps([{k: r[k] for k in ("router", "workload", "round", "trace")} for r in results]))


def write_logs(args: argparse.Namespace, procs: list[Proc]) -> None:
    """The last lines of every process's log, in one file under ``--out``."""
    if not args.out:
        return
    args.out.mkdir(parents=True, exist_ok=True)
    with open(args.out / "logs.txt", "w") as out:
        for proc in procs:
            with contextlib.suppress(OSError):
                out.write(f"==== {proc.log_path.name}\n{proc.log_text()[-20000:]}\n")


async def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    routers = args.routers.split(",")
    workloads = args.workloads.split(",")
    results: list[dict[str, Any]] = []
    procs: list[Proc] = []
    with tempfile.TemporaryDirectory(prefix="ichat-routing-") as tmp_name, contextlib.ExitStack() as stack:
        tmp = Path(tmp_name)
        stack.callback(lambda: write_logs(args, procs))
        # whatever started is stopped (last first), also when a replica fails to start
        stack.callback(lambda: [proc.stop() for proc in reversed(procs)])
        t0 = time.monotonic()
        gateway, workers = start_cluster(tmp, args.replicas, args.kv_tokens, args.heartbeat, args.max_model_len, args, procs)
        print(f"cluster ready in {time.monotonic() - t0:.0f} s", flush=True)
        peers: dict[str, Proc] = {}
        for router in [r for r in routers if r in PEERS]:
            peer, why = start_peer(tmp, workers, PEERS[router])
            if peer is None:
                print(f"skipping {router}: {why}", flush=True)
                routers.remove(router)
                continue
            peers[router] = peer
            procs.append(peer)
            write_pids(args, procs)
        seed = args.seed
        took: dict[str, float] = {}  # workload -> the longest run so far (s)
        profiled: set[tuple[str, str]] = set()  # (router, workload) runs recorded by py-spy
        for round_no in range(args.rounds):
            order = routers[round_no % len(routers) :] + routers[: round_no % len(routers)]
            if round_no % 2:
                order.reverse()
            for workload in workloads:
                for router in order:
                    seed += 1
                    if args.deadline and time.time() + 1.3 * took.get(workload, 30.0) + 15 > args.deadline:
                        print(f"round {round_no} {workload} {router}: skipped, it would end past the deadline", flush=True)
                        continue
                    if router in peers:
                        url = peers[router].base_url  # type: ignore[attr-defined]
                    else:
                        policy, extra = router_settings(router)
                        set_policy(gateway, policy, extra)
                        url = gateway.base_url
                    t1 = time.monotonic()
                    profiler = None
                    if router in args.profile and (router, workload) not in profiled:
                        profiled.add((router, workload))
                        label = f"{workload}-{router}".replace("+", "_").replace("=", "")
                        profiler = Profiler(args.pyspy, workers, args.out or Path("."), label)
                    try:
                        result = await measure(router, url, workload, args, workers, gateway, seed)
                    finally:
                        if profiler is not None:
                            profiler.stop()
                    took[workload] = max(took.get(workload, 0.0), time.monotonic() - t1)
                    result["round"] = round_no
                    results.append(result)
                    write_out(args, results)
                    print(
                        f"round {round_no} {workload:<18} {router:<20} hit {result['hit_rate'] or 0:.3f} "
                        f"TTFT p50 {result['ttft_ms']['p50'] or 0:.0f} ms, {result['output_tok_s'] or 0:.1f} tok/s, "
                        f"split {result['split']}, {result['decisions'] or ''} {time.monotonic() - t1:.0f} s",
                        flush=True,
                    )
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu", help="gpu: issue 17's GPU setup and sizes")
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--model-path", help="SmolLM2 checkpoint directory (default: the one `make models` builds)")
    parser.add_argument("--kv-tokens", type=int, default=4096, help="KV cache per replica, in tokens (0: engine default)")
    parser.add_argument(
        "--worker-args", default="", help="more engine flags for every worker, e.g. on a GPU: "
        "'--gpu-memory-utilization 0.4 --num-gpu-blocks-override 3000' (with --kv-tokens 0 --no-cpu-bind)"
    )
    parser.add_argument("--cpu-bind", action=argparse.BooleanOptionalAction, default=True, help="one core per replica")
    parser.add_argument("--enforce-eager", action=argparse.BooleanOptionalAction, default=True, help="no CUDA graphs")
    parser.add_argument("--ignore-eos", action=argparse.BooleanOptionalAction, default=False, help="full-length answers")
    parser.add_argument("--sequential-start", action=argparse.BooleanOptionalAction, default=False)
    parser.add_argument("--max-model-len", type=int, default=2048)
    parser.add_argument("--heartbeat", type=float, default=2.0, help="workers' heartbeat interval (s)")
    parser.add_argument("--routers", default=",".join(("round_robin", "least_inflight", "cache_aware", "sglang_cache_aware")))
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
    prefix = parser.add_argument_group("prefix_repetition and long_prefix workloads (vLLM's client)")
    prefix.add_argument("--prefix-len", type=int, default=512)
    prefix.add_argument("--suffix-len", type=int, default=64)
    prefix.add_argument("--num-prefixes", type=int, default=6)
    prefix.add_argument("--num-prompts", type=int, default=48)
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--trace", type=Path, help="write the in-flight/reported-load samples here")
    parser.add_argument("--out", type=Path, help="results.json, table.md, trace.json, logs.txt here, kept current")
    parser.add_argument("--deadline", type=float, help="epoch seconds: runs that would end later are skipped")
    parser.add_argument(
        "--renderer-threads", type=int, default=0,
        help="vLLM's --renderer-num-workers for every worker (0: the worker's default; runs 1-10 on the GPU ran with 1)",
    )  # fmt: skip
    parser.add_argument("--pidfile", type=Path, help="write the started process groups' pids here")
    parser.add_argument(
        "--profile", default="", help="routers (comma-separated) whose first run per workload py-spy records, per replica"
    )
    parser.add_argument("--pyspy", default=shutil.which("py-spy") or "py-spy", help="the py-spy binary for --profile")
    args = parser.parse_args()
    args.profile = set(filter(None, args.profile.split(",")))
    given = {token.split("=")[0] for token in sys.argv[1:] if token.startswith("--")}
    args.explicit = {
        a.dest for a in parser._actions if any(o in given or o.replace("--", "--no-", 1) in given for o in a.option_strings)
    }
    if args.preset == "gpu":
        for key, value in GPU_DEFAULTS.items():
            if key not in args.explicit:
                setattr(args, key, value)
    unknown = [r for r in args.routers.split(",") if r.split("+")[0] not in (*ALL_ROUTERS, "session_affinity")]
    unknown += [w for w in args.workloads.split(",") if w not in WORKLOADS]
    if unknown:
        parser.error(f"unknown router or workload: {', '.join(unknown)}")
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
