"""Session affinity: requests of one session go to one endpoint, through consistent hashing
with bounded load.

The session key is the request's ``X-Session-Id`` header (``routing.session_affinity.header``)
or else its body's ``user`` field (``body_field``); a request without one goes to the least
loaded endpoint. Every endpoint gets a score per key, ``hash(key, endpoint id)`` (rendezvous
hashing, weighted), and the key's endpoints are tried best score first: so when an endpoint
leaves, only the sessions it held move (each to its next choice), and a new endpoint takes over
only the sessions that now score best on it. No table of sessions is kept: nothing to bound,
and every gateway (or a restarted one) maps a key the same way (the hash is keyed by nothing
random).

Bounded load (Mirrokni, Thorup, Zadimoghaddam, "Consistent Hashing with Bounded Loads"): an
endpoint takes the request only while its load plus this request stays within
``load_factor`` times the pool's average load (per weight, rounded up); a hot endpoint spills
its sessions' new requests to their next choice instead of queueing them.

Pure: the clock (for the load of requests without a key) is injected; no I/O.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from hashlib import blake2b
from typing import Any

from ichat.config import SessionAffinitySettings
from ichat.routing.least_inflight import DispatchLoad
from ichat.routing.policy import RequestInfo
from ichat.routing.table import Endpoint

#: longer keys are cut: a key identifies, it need not be long
MAX_KEY_CHARS = 256
_TWO_64 = float(2**64)


def session_key(request: RequestInfo, header: str, body_field: str) -> str | None:
    """The request's session key, or None. Bounded to MAX_KEY_CHARS characters."""
    key = request.session_key
    if not key and header and request.headers is not None:
        key = request.headers.get(header)
    if not key and body_field and isinstance(request.body, Mapping):
        value = request.body.get(body_field)
        key = value if isinstance(value, str) else None
    return key[:MAX_KEY_CHARS] if key else None


def score(key: str, endpoint: Endpoint) -> float:
    """Weighted rendezvous score of ``endpoint`` for ``key`` (higher wins)."""
    digest = blake2b(f"{key}\x00{endpoint.id}".encode("utf-8", "surrogatepass"), digest_size=8).digest()
    u = (int.from_bytes(digest, "big") + 0.5) / _TWO_64  # in (0, 1)
    return -endpoint.weight / math.log(u)


def ranked(key: str, candidates: Sequence[Endpoint]) -> list[Endpoint]:
    """The key's endpoints, first choice first."""
    return sorted(candidates, key=lambda ep: score(key, ep), reverse=True)


def bounded_choice(key: str, candidates: Sequence[Endpoint], load_factor: float) -> tuple[Endpoint, bool]:
    """The key's first endpoint whose load stays within the bound; (endpoint, spilled)."""
    if len(candidates) == 1:
        return candidates[0], False
    total = sum(ep.inflight + ep.reported_load for ep in candidates) + 1  # + this request
    weights = sum(ep.weight for ep in candidates)
    order = ranked(key, candidates)
    for ep in order:
        capacity = math.ceil(load_factor * total * ep.weight / weights)
        if ep.inflight + ep.reported_load + 1 <= capacity:
            return ep, ep is not order[0]
    return order[0], False  # unreachable with load_factor >= 1; kept total for safety


class SessionAffinity:
    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.load = DispatchLoad(clock)
        self.settings = SessionAffinitySettings()
        #: requests by outcome: home (the key's first choice), spilled (bounded load), no_key
        self.decisions = {"home": 0, "spilled": 0, "no_key": 0}

    def configure(self, settings: Any) -> None:
        self.load.configure(settings)
        ours = getattr(settings, "session_affinity", None)
        if ours is not None:
            self.settings = ours

    def select(self, candidates: Sequence[Endpoint], request: RequestInfo, rng: random.Random) -> Endpoint:
        s = self.settings
        key = session_key(request, s.header, s.body_field)
        now = self.load.clock()
        if key is None:
            self.decisions["no_key"] += 1
            chosen = self.load.least_loaded(candidates, rng, now)
        else:
            chosen, spilled = bounded_choice(key, candidates, s.load_factor)
            self.decisions["spilled" if spilled else "home"] += 1
        self.load.dispatched(chosen, now)
        return chosen

    def forget(self, endpoint_id: str) -> None:
        self.load.forget(endpoint_id)

    def samples(self) -> Iterator[tuple[str, str, str, dict[str, str], float]]:
        for outcome, n in self.decisions.items():
            yield (
                "ichat_routing_session_decisions_total",
                "session_affinity decisions: home (the session's endpoint), spilled (bounded load: its next one), no_key.",
                "counter",
                {"outcome": outcome},
                n,
            )
