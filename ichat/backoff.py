"""One backoff rule for every retry loop: exponential, capped, with optional jitter.

Used by the worker's heartbeat retries, the gateway's log-stream reconnects and the
supervisor's restarts, so that all three read (and are tuned) the same way.
"""

from __future__ import annotations

import random


def exponential(attempt: int, *, first: float, cap: float, rng: random.Random | None = None) -> float:
    """Pure: seconds to wait before try ``attempt`` + 1, after ``attempt`` (>= 1) failures in a row:
    ``first * 2**(attempt - 1)``, at most ``cap``; with ``rng``, scaled by a jitter in [50%, 100%]
    so that a fleet does not retry in lockstep."""
    base = min(cap, first * 2 ** (max(1, attempt) - 1))
    return base * rng.uniform(0.5, 1.0) if rng is not None else base
