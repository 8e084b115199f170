"""The schedule and summary of scripts/sglang_gpu/bench.py, the side-by-side GPU benchmark.

The benchmark itself needs a GPU; its plan and its table are pure and are checked here. The first
real run reused one seed per round for every target, so the second of two targets sharing an
engine (the gateway and the worker behind it) got prompts already in that engine's prefix cache.
"""

from __future__ import annotations

import importlib.util
import itertools
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

BENCH = Path(__file__).resolve().parents[2] / "scripts" / "sglang_gpu" / "bench.py"


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("sglang_gpu_bench", BENCH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


TARGETS = ["sglang", "gateway", "worker"]


def test_every_batch_has_prompts_of_its_own(bench: ModuleType) -> None:
    """No two batches share a seed, so no target meets prompts another target left in a shared
    engine's prefix cache (the gateway and its worker are one engine)."""
    batches = list(itertools.chain.from_iterable(bench.plan(5, ["c1", "c64"], TARGETS)))
    seeds = [seed for _, _, seed in batches]
    assert len(batches) == 5 * 2 * 3
    assert len(set(seeds)) == len(seeds)


def test_each_round_measures_every_target_once_per_workload_and_the_first_turn_rotates(bench: ModuleType) -> None:
    rounds = bench.plan(4, ["c1", "c64"], TARGETS)
    for batches in rounds:
        for wl in ("c1", "c64"):
            assert sorted(t for w, t, _ in batches if w == wl) == sorted(TARGETS)
    firsts = [batches[0][1] for batches in rounds]
    assert firsts == ["sglang", "gateway", "worker", "sglang"]


def _row(target: str, concurrency: int, prompts: int, tok_s: float, ttft: float, completed: int | None = None) -> dict[str, Any]:
    return {
        "target": target, "concurrency": concurrency, "prompts": prompts, "output_throughput": tok_s,
        "median_ttft_ms": ttft, "median_tpot_ms": 1.0, "request_throughput": 1.0,
        "completed": prompts if completed is None else completed, "failed": 0,
    }  # fmt: skip


def test_the_table_gives_medians_ratios_to_sglang_and_counts_incomplete_requests(bench: ModuleType) -> None:
    rows = [
        _row("sglang", 64, 512, 10_000, 200.0),
        _row("sglang", 64, 512, 12_000, 220.0),
        _row("sglang", 64, 512, 8_000, 240.0),
        _row("gateway", 64, 512, 11_000, 210.0),
        _row("gateway", 64, 512, 11_500, 205.0, completed=510),
        _row("gateway", 64, 512, 13_000, 190.0),
    ]
    lines = {line.split()[0]: line.split() for line in bench.table(rows).splitlines() if line.startswith("  ")}
    sglang, gateway = lines["sglang"], lines["gateway"]
    assert sglang[3:5] == ["10000", "1.000"]
    assert gateway[1:5] == ["3", "2", "11500", "1.150"]  # batches, failed (2 never completed), tok/s, ratio
    assert gateway[5:7] == ["205.00", "-15.00"]  # TTFT p50 and its difference to SGLang's
