"""Cost of the routing policies per request, and cache_aware's index memory bound.

    python benchmarks/routing_policy_cost.py [--requests 20000] [--rounds 5] [--distinct 1000000] [--json out.json]

Two measurements, in one process, no sockets:

1. Time per ``select`` for a chat request of about 8 KB of prompt (a 6 KB tenant system prompt
   shared by many requests plus a 2 KB question of its own), over a pool of 8 endpoints whose
   index already holds 64 tenants, for cache_aware, session_affinity, least_inflight and
   round_robin (the baseline, measured in the same run, in turns with the others). Only the
   policy: the body is parsed beforehand, as the proxy has parsed it already.
2. Memory: ``--distinct`` distinct prompts (1 KB each) through cache_aware on 4 endpoints with
   the default bound; the number of index entries must stay at or under the bound and the
   memory the index holds (tracemalloc) under the bytes stated in the README.

Prints a table; exits 1 with ``--strict`` when a target is missed (50 µs per request, bound).
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import statistics
import sys
import time
import tracemalloc
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ichat.config import CacheAwareSettings, RoutingSettings  # noqa: E402
from ichat.routing import Endpoint, RequestInfo  # noqa: E402
from ichat.protocol import MAX_PREFIX_REPORT_BLOCKS  # noqa: E402
from ichat.routing.cache_aware import CacheAware  # noqa: E402
from ichat.routing.cachereport import CachedPrefixes  # noqa: E402
from ichat.routing.least_inflight import LeastInflight  # noqa: E402
from ichat.routing.round_robin import RoundRobin  # noqa: E402
from ichat.routing.session import SessionAffinity  # noqa: E402

TARGET_US = 50.0
#: bytes per index entry the README states (CPython 3.11, 64-bit)
STATED_BYTES_PER_ENTRY = 100


def chat_body(tenant: int, question: str) -> dict:
    system = f"You are the assistant of tenant {tenant}. Follow the house rules below. " + "Rule: be precise. " * 340
    return {
        "model": "m",
        "messages": [{"role": "system", "content": system[:6144]}, {"role": "user", "content": question}],
        "user": f"user-{tenant}",
    }


def time_policy(policy, eps, requests: list[RequestInfo], rng: random.Random) -> list[float]:
    samples = []
    for request in requests:
        t0 = time.perf_counter_ns()
        ep = policy.select(eps, request, rng)
        samples.append((time.perf_counter_ns() - t0) / 1000)
        ep.inflight = (ep.inflight + 1) % 8  # some movement of load
    return samples


def cost(n: int, rounds: int) -> dict:
    """Each policy is timed over the same ``n`` requests, in ``rounds`` slices taken in turn
    (policy A's slice 1, B's slice 1, ..., A's slice 2, ...), so that a noisy neighbour slows
    every policy alike; the ratio to round robin is the figure to compare across machines."""
    rng = random.Random(0)
    warm = n // 4  # these teach the index the tenants; they are not timed
    requests = []
    for i in range(warm + n):
        tenant = rng.randrange(64)
        question = f"Question {i}: " + "".join(rng.choice("abcdefghij ") for _ in range(2048))
        requests.append(RequestInfo("m", "/v1/chat/completions", 8192, body=chat_body(tenant, question)))
    print(f"prompt size: {len(chat_body(0, requests[0].body['messages'][1]['content'])['messages'][0]['content']) + 2048} chars")
    policies = {
        "round_robin": RoundRobin(),
        "least_inflight": LeastInflight(),
        "session_affinity": SessionAffinity(),
        "cache_aware": CacheAware(),
        "cache_aware_precise": CacheAware(),
    }
    endpoints = {}
    for name, policy in policies.items():
        pool = [Endpoint(id=f"worker-{i}", model_name="m", api_base=f"http://10.0.0.{i}:8000/v1") for i in range(8)]  # a load of its own
        configure = getattr(policy, "configure", None)
        precise = name == "cache_aware_precise"
        if configure:
            configure(RoutingSettings(cache_aware=CacheAwareSettings(precise=True)) if precise else RoutingSettings())
        time_policy(policy, pool, requests[:warm], rng)
        if precise:  # each endpoint reports what it was sent: the engines' view of the same prompts
            for ep in pool:
                ep.cached_prefixes = CachedPrefixes()
                sent = list(policy.index._lru[ep.id].current)[-MAX_PREFIX_REPORT_BLOCKS:]
                ep.cached_prefixes.apply(ep.id, {"seq": 0, "full": True, "added": sent})
        endpoints[name] = pool
    samples: dict[str, list[float]] = {name: [] for name in policies}
    bounds = [warm + n * r // rounds for r in range(rounds + 1)]
    for lo, hi in zip(bounds, bounds[1:]):
        for name, policy in policies.items():
            gc.collect()
            samples[name] += time_policy(policy, endpoints[name], requests[lo:hi], rng)
    results = {}
    baseline = statistics.median(samples["round_robin"])
    for name, policy in policies.items():
        ours = sorted(samples[name])
        results[name] = {
            "p50_us": statistics.median(ours),
            "p99_us": ours[int(len(ours) * 0.99)],
            "mean_us": statistics.fmean(ours),
            "p50_vs_round_robin": statistics.median(ours) / baseline,
        }
        if isinstance(policy, CacheAware):
            results[name]["hits"] = policy.decisions["hit"]
    return results


def memory(distinct: int) -> dict:
    settings = RoutingSettings()
    policy = CacheAware()
    policy.configure(settings)
    eps = [Endpoint(id=f"worker-{i}", model_name="m", api_base=f"http://10.0.0.{i}:8000/v1") for i in range(4)]
    rng = random.Random(1)
    filler = "x" * 1000
    gc.collect()
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    peak_entries = 0
    t0 = time.perf_counter()
    for i in range(distinct):
        body = {"messages": [{"role": "user", "content": f"{i:08d}{filler}"}]}
        policy.select(eps, RequestInfo("m", "/v1/chat/completions", 0, body=body), rng)
        if i % 50_000 == 0:
            peak_entries = max(peak_entries, len(policy.index))
    elapsed = time.perf_counter() - t0
    peak_entries = max(peak_entries, len(policy.index))
    gc.collect()
    held, peak = tracemalloc.get_traced_memory()
    held -= base
    peak -= base  # the most the index (and one request's transient objects) ever held
    tracemalloc.stop()
    bound_entries = settings.cache_aware.max_blocks_per_endpoint * len(eps)
    return {
        "distinct_prompts": distinct,
        "entries": len(policy.index),
        "peak_entries": peak_entries,
        "bound_entries": bound_entries,
        "bytes_held": held,
        "bytes_peak": peak,
        "bytes_per_entry": held / max(1, len(policy.index)),
        "stated_bound_bytes": bound_entries * STATED_BYTES_PER_ENTRY,
        "seconds": elapsed,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=20000)
    parser.add_argument("--distinct", type=int, default=1_000_000)
    parser.add_argument("--rounds", type=int, default=5, help="slices each policy's timing is taken in, in turn")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--strict", action="store_true")
    args = parser.parse_args()
    results = {"cost": cost(args.requests, args.rounds), "memory": memory(args.distinct)}
    print(f"{'policy':<20}{'p50 µs':>10}{'p99 µs':>10}{'mean µs':>10}{'p50 / rr':>10}")
    for name, r in results["cost"].items():
        print(f"{name:<20}{r['p50_us']:>10.1f}{r['p99_us']:>10.1f}{r['mean_us']:>10.1f}{r['p50_vs_round_robin']:>10.1f}")
    m = results["memory"]
    print(
        f"index after {m['distinct_prompts']:,} distinct prompts: {m['entries']:,} entries (peak {m['peak_entries']:,}, "
        f"bound {m['bound_entries']:,}), {m['bytes_held'] / 2**20:.1f} MiB held = {m['bytes_per_entry']:.0f} B/entry, peak {m['bytes_peak'] / 2**20:.1f} MiB "
        f"(stated bound {m['stated_bound_bytes'] / 2**20:.1f} MiB); {m['seconds']:.1f} s"
    )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    ok = (
        results["cost"]["cache_aware"]["p50_us"] <= TARGET_US
        and results["cost"]["cache_aware_precise"]["p50_us"] <= TARGET_US
        and m["peak_entries"] <= m["bound_entries"]
        and m["bytes_peak"] <= m["stated_bound_bytes"]
    )
    print("targets:", "met" if ok else "MISSED")
    return 0 if ok or not args.strict else 1


if __name__ == "__main__":
    sys.exit(main())
