"""Send the request where the least work is queued; ties broken at random.

Load = requests this gateway has in flight to the endpoint + the load the endpoint last reported
beyond this gateway's own requests (from heartbeats; see ichat.gateway.registry.external_load),
divided by the endpoint's weight. The random tie
break keeps several gateways (or a burst arriving at an idle pool) from all picking the first.

:func:`load` and :func:`least_loaded` are shared with the policies that fall back to "least
loaded" (cache_aware on a miss, session_affinity without a key).
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from ichat.routing.policy import RequestInfo
from ichat.routing.table import Endpoint


def load(ep: Endpoint) -> float:
    """What the policies compare: in flight from here plus reported from elsewhere, per weight."""
    return (ep.inflight + ep.reported_load) / ep.weight


def least_loaded(candidates: Sequence[Endpoint], rng: random.Random) -> Endpoint:
    if len(candidates) == 1:
        return candidates[0]
    best: list[Endpoint] = []
    best_load = float("inf")
    for ep in candidates:
        ep_load = (ep.inflight + ep.reported_load) / ep.weight
        if ep_load < best_load:
            best_load = ep_load
            best = [ep]
        elif ep_load == best_load:
            best.append(ep)
    return best[0] if len(best) == 1 else best[rng.randrange(len(best))]


class LeastInflight:
    def select(self, candidates: Sequence[Endpoint], request: RequestInfo, rng: random.Random) -> Endpoint:
        return least_loaded(candidates, rng)
