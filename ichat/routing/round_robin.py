"""Smooth weighted round robin (as nginx does it): with equal weights, plain rotation.

Each pick adds every candidate's weight to its running score, takes the highest score and
subtracts the total from it. Over any window of sum(weights) picks each endpoint is chosen in
proportion to its weight, and picks are spread out rather than bunched.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from ichat.routing.policy import RequestInfo
from ichat.routing.table import Endpoint


class RoundRobin:
    def __init__(self) -> None:
        self._score: dict[str, float] = {}

    def select(self, candidates: Sequence[Endpoint], request: RequestInfo, rng: random.Random) -> Endpoint:
        score = self._score
        if len(score) > 2 * len(candidates) + 16:
            # Endpoints come and go (workers restart with new ids): forget the departed.
            self._score = score = {ep.id: score.get(ep.id, 0.0) for ep in candidates}
        total = 0.0
        best = candidates[0]  # the table never offers an empty pool
        best_score = float("-inf")
        for ep in candidates:
            s = score.get(ep.id, 0.0) + ep.weight
            score[ep.id] = s
            total += ep.weight
            if s > best_score:
                best, best_score = ep, s
        score[best.id] = best_score - total
        return best
