"""Where cache_aware puts new prefixes, on engine-like fake upstreams with a prefix cache.

    python benchmarks/prefix_placement.py [--workloads long_prefix,prefix_repetition] [--rounds 2]
        [--routers round_robin,cache_aware,cache_aware+spread_new_prefixes=true,...] [--json out.json]

The GPU run (README "Routing quality (GPU)") found that ``cache_aware`` placed a new prefix on
the least loaded replica, so under closed-loop load 8 of 12 long prefixes could land on one
replica and stay there; ``spread_new_prefixes`` places it by index size instead, and it has not
run on a GPU yet. This measures the placement without an engine or a GPU: two
``batching_upstream.py`` processes (continuous batching in real time, chunked prefill) with
``--prefix-cache-tokens``, an LRU of whole prefixes whose KV fits in that many tokens (the
GPU run's 3,000 blocks of 16 tokens), the real gateway in front (static routes; its policy
switched by config reload, through round_robin, so that each run starts with an empty index:
``routing_quality.set_policy``),
and a closed-loop client that sends the workloads of the GPU run:

* ``long_prefix``: 12 prefixes of 6,144 tokens, 128-token suffixes, 360 prompts at concurrency
  16, 32 output tokens (the cache holds 7 prefixes a replica: all fit on two, not on one);
* ``prefix_repetition``: 40 prefixes of 2,048 tokens, 128-token suffixes, 800 prompts at
  concurrency 32, 64 output tokens (23 a replica).

Prompts pick their prefix at random, as vLLM's ``prefix_repetition`` dataset shuffles them; the
upstreams' caches are emptied before each run. Text is 4 characters a token, so the gateway
hashes as many blocks as it would for real prompts. Reported: the upstreams' prefix hit rate,
TTFT p50/p90, requests per second, the split of requests and of distinct prefixes. A stand-in
for an engine's timing (``--upstream-args``: step 8 ms, 12 µs a prefilled token), so read the
figures as a comparison of placements, not as an engine's latency.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from least_inflight_herding import closed_loop, stand_in_cluster  # noqa: E402
from routing_quality import router_settings, set_policy  # noqa: E402

CHARS_PER_TOKEN = 4
CACHE_TOKENS = 3000 * 16
WORKLOADS: dict[str, dict[str, int]] = {
    "long_prefix": {"prefixes": 12, "prefix_tokens": 6144, "suffix_tokens": 128, "prompts": 360, "concurrency": 16, "output_tokens": 32},
    "prefix_repetition": {"prefixes": 40, "prefix_tokens": 2048, "suffix_tokens": 128, "prompts": 800, "concurrency": 32, "output_tokens": 64},
}
DEFAULT_ROUTERS = (
    "round_robin,least_inflight,cache_aware,cache_aware+spread_new_prefixes=true,"
    "cache_aware+balance_abs=32,cache_aware+balance_abs=32+spread_new_prefixes=true"
)


def prompts(workload: dict[str, int], seed: int) -> list[dict[str, Any]]:
    """The chat body of each prompt, in the order sent."""
    rng = random.Random(seed)
    prefix_chars = workload["prefix_tokens"] * CHARS_PER_TOKEN
    prefixes = [f"run {seed} prefix {k}: " + "".join(rng.choice("abcdefgh ") for _ in range(prefix_chars)) for k in range(workload["prefixes"])]
    chosen = [k % workload["prefixes"] for k in range(workload["prompts"])]
    rng.shuffle(chosen)
    suffix_chars = workload["suffix_tokens"] * CHARS_PER_TOKEN
    return [
        {
            "model": "m",
            "messages": [{"role": "system", "content": prefixes[k][:prefix_chars]}, {"role": "user", "content": f"q{i} " + "x" * suffix_chars}],
            "max_tokens": workload["output_tokens"],
            "stream": True,
        }
        for i, k in enumerate(chosen)
    ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workloads", default="long_prefix,prefix_repetition")
    parser.add_argument("--routers", default=DEFAULT_ROUTERS)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--seed", type=int, default=2000)
    parser.add_argument("--upstream-args", default="--step-ms 8 --prefill-us-per-token 12 --budget 8192")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    routers = args.routers.split(",")
    workloads = args.workloads.split(",")
    results: list[dict[str, Any]] = []
    seed = args.seed
    with tempfile.TemporaryDirectory(prefix="ichat-placement-") as tmp_name:
        for workload_name in workloads:
            w = WORKLOADS[workload_name]
            upstream_argv = [
                "--prompt-tokens", str(w["prefix_tokens"] + w["suffix_tokens"]), "--cached-tokens", str(w["prefix_tokens"]),
                "--prefix-cache-tokens", str(CACHE_TOKENS), *args.upstream_args.split(),
            ]  # fmt: skip
            with stand_in_cluster(Path(tmp_name), upstream_argv) as (gateway, ports):
                for round_no in range(args.rounds):
                    order = routers[round_no % len(routers) :] + routers[: round_no % len(routers)]
                    if round_no % 2:
                        order.reverse()
                    for router in order:
                        seed += 1
                        set_policy(gateway, *router_settings(router))
                        for p in ports:
                            httpx.get(f"http://127.0.0.1:{p}/stats", params={"reset_cache": 1}, timeout=5)
                        t0 = time.perf_counter()
                        ttfts = asyncio.run(
                            closed_loop(gateway.base_url + "/v1/chat/completions", prompts(w, seed), w["concurrency"])
                        )
                        elapsed = time.perf_counter() - t0
                        counts = [httpx.get(f"http://127.0.0.1:{p}/stats", timeout=5).json() for p in ports]
                        ttfts.sort()
                        r = {
                            "workload": workload_name, "router": router, "round": round_no, "seed": seed,
                            "hit_rate": sum(c["hits"] for c in counts) / max(1, sum(c["queries"] for c in counts)),
                            "ttft_p50_ms": statistics.median(ttfts) * 1000,
                            "ttft_p90_ms": ttfts[int(0.9 * len(ttfts))] * 1000,
                            "req_s": len(ttfts) / elapsed,
                            "split": sorted((c["queries"] for c in counts), reverse=True),
                            "prefixes_split": sorted((c["distinct_prefixes"] for c in counts), reverse=True),
                        }  # fmt: skip
                        results.append(r)
                        print(
                            f"round {round_no} {workload_name} {router:<48} hit {r['hit_rate']:.2f}  TTFT p50 {r['ttft_p50_ms']:.0f} "
                            f"p90 {r['ttft_p90_ms']:.0f} ms  {r['req_s']:.1f} req/s  split {r['split']}  prefixes {r['prefixes_split']}",
                            flush=True,
                        )
                        if args.json:
                            args.json.write_text(json.dumps(results, indent=1))
    print(f"\n{'workload':<18}{'router':<50}{'hit':>6}{'p50 ms':>8}{'p90 ms':>8}{'req/s':>7}  split (requests; prefixes)")
    for workload_name in workloads:
        for router in routers:
            rs = [r for r in results if r["workload"] == workload_name and r["router"] == router]
            if not rs:
                continue
            fmt = lambda k: "/".join(f"{r[k]:.0f}" if k != "hit_rate" else f"{r[k]:.2f}" for r in rs)  # noqa: E731
            splits = " ".join(f"{r['split']};{r['prefixes_split']}" for r in rs)
            print(f"{workload_name:<18}{router:<50}{fmt('hit_rate'):>6} {fmt('ttft_p50_ms'):>8}{fmt('ttft_p90_ms'):>8}{fmt('req_s'):>7}  {splits}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
