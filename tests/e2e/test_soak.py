"""Soak: concurrent streams through a real gateway process against the fake upstream
(benchmarks/soak.py does the work and the checks; see its docstring for what is measured).

The short run is in ``make test``; the one the issue asks for (1,000 concurrent streams for two
minutes) is marked ``slow`` and runs in ``make test-slow``.
"""

from __future__ import annotations

import sys

import pytest

from tests.procs import REPO

sys.path.insert(0, str(REPO / "benchmarks"))

import soak  # noqa: E402


def run(tmp_path, streams: int, duration: float, warmup: float, settle: float) -> dict:
    report = soak.soak(streams, duration, chunks=16, interval=0.25, warmup=warmup, settle=settle, workdir=tmp_path)
    print("\n" + soak.summary(report))
    return report


def test_soak_short(tmp_path):
    report = run(tmp_path, streams=200, duration=15, warmup=5, settle=5)
    assert soak.check(report) == []


@pytest.mark.slow
def test_soak_1000_streams_for_two_minutes(tmp_path):
    report = run(tmp_path, streams=1000, duration=120, warmup=10, settle=15)
    assert soak.check(report) == []
    assert report["completed"] >= 10 * report["streams"]  # each connection streamed again and again
