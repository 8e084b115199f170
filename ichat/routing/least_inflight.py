"""Send the request where the least work is queued; ties broken at random.

Load = requests this gateway has in flight to the endpoint + the load the endpoint last reported
beyond this gateway's own requests (from heartbeats; see ichat.gateway.registry.external_load)
+ ``prefill_weight`` x the requests dispatched to it in the last ``prefill_window_s`` seconds
(at most as many as are still in flight), divided by the endpoint's weight. The random tie break keeps several gateways (or a burst
arriving at an idle pool) from all picking the first.

Why recent dispatches weigh more (issue 17's least_inflight anomaly): a request still in
prefill costs its endpoint far more than one that is decoding, and plain in-flight counting
cannot tell them apart. Under a closed loop of clients (a benchmark's fixed concurrency, or
agents that send their next call when the last ends), every finished request frees a slot on
the endpoint that finished it, and plain least-in-flight sends the replacement right back
there: each endpoint's arrivals become its own completions. Requests that were admitted
together (and, with similar output lengths, finish together) come back together, so a whole
group of prefills lands on one endpoint at once while the other only decodes, and every
member of the group waits for the others' prefills: TTFT grows with the group's size.
Round robin splits each group over the pool. Counting a just-dispatched request as
``1 + prefill_weight`` until its prefill is likely done spreads such a group as round robin
would, and still steers by load once the group is decoding. The window is a time because the
gateway never sees where prefill ends (a stream's head comes back before its first token); it
should cover the engines' time to first token under load (0.2 s by default; at 0.05 s, shorter
than that, the fix did nothing in ``benchmarks/least_inflight_herding.py``).

:class:`DispatchLoad` is shared with the policies that fall back to "least loaded"
(cache_aware, session_affinity). Pure: the clock is injected.
"""

from __future__ import annotations

import random
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

from ichat.config import LeastInflightSettings
from ichat.routing.policy import RequestInfo
from ichat.routing.table import Endpoint

#: dispatch times kept per endpoint (bounds the count of recent dispatches, and the memory)
_RECENT_MAX = 256


def load(ep: Endpoint) -> float:
    """In flight from here plus reported from elsewhere, per weight (no recent-dispatch term)."""
    return (ep.inflight + ep.reported_load) / ep.weight


class DispatchLoad:
    """Load as the policies compare it: :func:`load` plus recent dispatches, weighted."""

    def __init__(self, clock: Callable[[], float] = time.monotonic, settings: Any = None) -> None:
        self.clock = clock
        self.settings = settings if settings is not None else LeastInflightSettings()
        self._recent: dict[str, deque[float]] = {}

    def configure(self, settings: Any) -> None:
        ours = getattr(settings, "least_inflight", None)
        if ours is not None:
            self.settings = ours

    def dispatched(self, ep: Endpoint, now: float) -> None:
        if not self.settings.prefill_weight:
            return
        recent = self._recent.get(ep.id)
        if recent is None:
            if len(self._recent) > 64:  # ids of departed endpoints: keep the map bounded
                self._recent = {k: v for k, v in self._recent.items() if v and v[-1] > now - self.settings.prefill_window_s}
            recent = self._recent[ep.id] = deque(maxlen=_RECENT_MAX)
        recent.append(now)

    def recent(self, ep: Endpoint, now: float) -> int:
        """Dispatches to ``ep`` within the window (amortised O(1): expired ones are dropped)."""
        recent = self._recent.get(ep.id)
        if not recent:
            return 0
        since = now - self.settings.prefill_window_s
        while recent and recent[0] <= since:
            recent.popleft()
        return len(recent)

    def of(self, ep: Endpoint, now: float) -> float:
        inflight = ep.inflight
        # At most the requests still in flight count as in prefill: one that already finished
        # (a short answer, a sequential client) costs nothing any more.
        pending = min(self.recent(ep, now), inflight) if inflight else 0
        return (inflight + ep.reported_load + self.settings.prefill_weight * pending) / ep.weight

    def forget(self, endpoint_id: str) -> None:
        self._recent.pop(endpoint_id, None)

    def least_loaded(self, candidates: Sequence[Endpoint], rng: random.Random, now: float) -> Endpoint:
        if len(candidates) == 1:
            return candidates[0]
        best: list[Endpoint] = []
        best_load = float("inf")
        for ep in candidates:
            ep_load = self.of(ep, now)
            if ep_load < best_load:
                best_load = ep_load
                best = [ep]
            elif ep_load == best_load:
                best.append(ep)
        return best[0] if len(best) == 1 else best[rng.randrange(len(best))]


class LeastInflight:
    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.load = DispatchLoad(clock)

    def configure(self, settings: Any) -> None:
        self.load.configure(settings)

    def forget(self, endpoint_id: str) -> None:
        self.load.forget(endpoint_id)

    def select(self, candidates: Sequence[Endpoint], request: RequestInfo, rng: random.Random) -> Endpoint:
        load = self.load
        now = load.clock()
        chosen = load.least_loaded(candidates, rng, now)
        load.dispatched(chosen, now)
        return chosen
