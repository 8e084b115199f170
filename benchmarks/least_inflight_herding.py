"""least_inflight under a closed loop, against round robin, on engine-like fake upstreams.

    python benchmarks/least_inflight_herding.py [--requests 640] [--concurrency 32] [--rounds 2] [--sweep]

Issue 17 measured ``least_inflight`` at 2.2-2.7x round robin's TTFT p50 on an H200 at equal hit
rate and split. This reproduces the mechanism without an engine or a GPU: two
``batching_upstream.py`` processes (a continuous-batching scheduler in real time: fixed step time
plus prefill time per token, chunked prefill, ~47 % prefix hits), the real gateway in front of
them (static routes, so no reported load is involved), and a closed-loop client (fixed
concurrency, 64 output tokens each, a new request the moment one ends), as ``vllm bench serve``
drives a server. Routers, switched by config reload, in rotating order:
``round_robin``, ``least_inflight`` with ``prefill_weight: 0`` (the policy before the fix) and
``least_inflight`` (the fix). Reported: TTFT p50/p90 (to the first token), the split, and the
upstreams' own trace of arrivals: how many new requests each admitting step took in (mean, and
the share of steps that took in 4 or more). Herding shows as bigger arrival groups.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import httpx

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from tests.gateway_proc import GatewayProc, write_yaml  # noqa: E402
from tests.procs import Proc, free_port, wait_until  # noqa: E402

ROUTERS = {
    "round_robin": {"policy": "round_robin"},
    "least_inflight_plain": {"policy": "least_inflight", "least_inflight": {"prefill_weight": 0}},
    "least_inflight": {"policy": "least_inflight"},
}
#: --sweep: the fix's two settings around their defaults (weight 4, window 0.2 s)
SWEEP = {
    "li_window_0.05": {"policy": "least_inflight", "least_inflight": {"prefill_weight": 4, "prefill_window_s": 0.05}},
    "li_weight_2": {"policy": "least_inflight", "least_inflight": {"prefill_weight": 2, "prefill_window_s": 0.2}},
    "li_weight_8_window_0.5": {"policy": "least_inflight", "least_inflight": {"prefill_weight": 8, "prefill_window_s": 0.5}},
}


async def closed_loop(url: str, bodies: list[dict[str, Any]], concurrency: int) -> list[float]:
    """Send ``bodies`` (streamed chat requests) from ``concurrency`` clients, each sending its
    next the moment its last ends, as ``vllm bench serve`` does; each one's TTFT (to the first
    token), in seconds."""
    todo = iter(bodies)
    ttfts: list[float] = []

    async def client(session: aiohttp.ClientSession) -> None:
        for body in todo:
            t0 = time.perf_counter()
            ttft = None
            async with session.post(url, json=body) as resp:
                resp.raise_for_status()
                async for line in resp.content:
                    if ttft is None and line.startswith(b"data: {"):
                        ttft = time.perf_counter() - t0
            ttfts.append(ttft if ttft is not None else float("nan"))

    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=300)) as session:
        await asyncio.gather(*(client(session) for _ in range(concurrency)))
    return ttfts


@contextlib.contextmanager
def stand_in_cluster(tmp: Path, upstream_argv: list[str]) -> Iterator[tuple[GatewayProc, list[int]]]:
    """Two ``batching_upstream.py`` processes (flags ``upstream_argv``) behind a real gateway with
    static routes, up and answering: (gateway, the upstreams' ports); all stopped on exit."""
    ports = [free_port(), free_port()]
    procs: list[Proc] = []
    try:
        for i, port in enumerate(ports):
            argv = [sys.executable, str(HERE / "batching_upstream.py"), "--port", str(port), "--seed", str(i), *upstream_argv]
            procs.append(Proc(argv, tmp / f"up{i}.log"))
        routes = [{"model_name": "m", "api_base": f"http://127.0.0.1:{port}/v1"} for port in ports]
        gateway = GatewayProc(tmp, {"routes": routes, "routing": {"policy": "round_robin"}})
        procs.append(gateway)
        for port in ports:
            wait_until(lambda port=port: httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200, 30, what="upstream")
        gateway.wait_up()
        yield gateway, ports
    finally:
        for proc in reversed(procs):
            proc.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=640)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--output-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--upstream-args", default="", help="flags for batching_upstream.py")
    parser.add_argument("--sweep", action="store_true", help="also other values of the fix's settings")
    args = parser.parse_args()
    if args.sweep:
        ROUTERS.update(SWEEP)
    results: dict[str, list[dict]] = {name: [] for name in ROUTERS}
    with tempfile.TemporaryDirectory(prefix="ichat-herding-") as tmp_name:
        tmp = Path(tmp_name)
        with stand_in_cluster(tmp, args.upstream_args.split()) as (gateway, ports):
            names = list(ROUTERS)
            for round_no in range(args.rounds):
                order = names[round_no % len(names):] + names[: round_no % len(names)]
                for name in order:
                    write_yaml(gateway.config_path, dict(gateway.config, routing=ROUTERS[name]))
                    httpx.post(gateway.base_url + "/v1/admin/config/reload", timeout=30).raise_for_status()
                    for p in ports:
                        httpx.get(f"http://127.0.0.1:{p}/stats", timeout=5)  # reset
                    t0 = time.perf_counter()
                    body = {"model": "m", "messages": [{"role": "user", "content": "x"}], "max_tokens": args.output_tokens, "stream": True}
                    ttfts = asyncio.run(closed_loop(gateway.base_url + "/v1/chat/completions", [body] * args.requests, args.concurrency))
                    elapsed = time.perf_counter() - t0
                    admitted = [httpx.get(f"http://127.0.0.1:{p}/stats", timeout=5).json()["admitted_per_step"] for p in ports]
                    groups = [g for a in admitted for g in a]
                    ttfts.sort()
                    r = {
                        "p50": statistics.median(ttfts) * 1000,
                        "p90": ttfts[int(0.9 * len(ttfts))] * 1000,
                        "split": [sum(a) for a in admitted],
                        "group_mean": statistics.fmean(groups),
                        "groups_4plus": sum(g >= 4 for g in groups) / len(groups),
                        "req_s": len(ttfts) / elapsed,
                    }
                    results[name].append(r)
                    print(f"round {round_no} {name:<22} TTFT p50 {r['p50']:.0f} ms p90 {r['p90']:.0f} ms, split {r['split']}, "
                          f"arrivals per admitting step {r['group_mean']:.2f} (>= 4: {r['groups_4plus']:.0%}), {r['req_s']:.1f} req/s", flush=True)
    print(f"\n{'router':<22}{'TTFT p50 ms':>12}{'p90':>8}{'arrivals/step':>15}{'>=4':>7}{'req/s':>8}")
    for name, rs in results.items():
        med = lambda k: statistics.median(r[k] for r in rs)  # noqa: E731
        print(f"{name:<22}{med('p50'):>12.0f}{med('p90'):>8.0f}{med('group_mean'):>15.2f}{med('groups_4plus'):>7.0%}{med('req_s'):>8.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
