"""Prefix-cache-aware routing: send a prompt where its prefix was sent before, unless that
endpoint is overloaded.

Engines keep the KV cache of recent prompts (vLLM's automatic prefix caching, SGLang's radix
cache); a request whose prefix an engine still holds skips that part of the prefill. This
policy keeps, per model (one instance per pool), an *approximate* index of which endpoint was
recently given which prompt prefix, learned from its own dispatches (no engine is asked):

* The prompt (``ichat.routing.prompt``) is cut into fixed-size blocks with chained hashes.
* Each endpoint has an LRU of block hashes -> last use, bounded to ``max_blocks_per_endpoint``
  entries and ``ttl_s`` seconds. A dispatch touches the prompt's blocks deepest first, so a
  prefix's first blocks are the most recent and eviction takes the tails (as a radix cache
  would). An endpoint that leaves the pool loses its entries (``forget``).
* Matching walks each candidate's LRU from the first block until a miss: the matched depth.

Choice, for each request:

1. ``ratio`` = longest matched depth / prompt length (in blocks). At or above
   ``match_threshold``: the matched endpoints (the deepest; the least loaded of those);
   otherwise the least loaded endpoint of the pool (never "the one with the smallest index",
   which feeds a death spiral: sglang#14305).
2. Imbalance gate: when the chosen endpoint's load exceeds the pool's least loaded one by more
   than ``balance_abs`` requests and by more than ``balance_rel`` times, the least loaded one
   takes the request instead. Its index then learns the prefix too, so a hot prefix ends up on
   more than one endpoint rather than bouncing between them.
3. The chosen endpoint's index learns the prompt's blocks.

Load is what :func:`ichat.routing.least_inflight.load` says: this gateway's in-flight requests
(counted from dispatch, not from the first byte of the answer) plus the load the endpoint
reports from elsewhere, per weight.

Memory bound: at most ``max_blocks_per_endpoint`` entries per endpoint, each an OrderedDict
slot holding a 64-bit int hash (about 100 bytes all told on CPython 3.11, measured by
``benchmarks/routing_policy_cost.py``): 16,384 entries, about 1.6 MB per endpoint at the
defaults. Cost per request: one pass over at most ``max_prompt_blocks`` blocks to hash, one
walk per candidate until its first miss, one touch per block of the chosen endpoint.

Pure: the clock is injected (``clock``), randomness comes in through ``select``'s ``rng``.
"""

from __future__ import annotations

import random
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from ichat.config import CacheAwareSettings
from ichat.routing.least_inflight import least_loaded, load
from ichat.routing.policy import RequestInfo
from ichat.routing.prompt import block_hashes, prompt_of, prompt_units
from ichat.routing.table import Endpoint

HIT, MISS, OVERRIDDEN = "hit", "miss", "imbalance"


class PrefixIndex:
    """Per endpoint: an LRU of block hashes -> time of last use, bounded in size and age."""

    def __init__(self, max_blocks: int, ttl_s: float) -> None:
        self.max_blocks = max_blocks
        self.ttl_s = ttl_s
        self._lru: dict[str, OrderedDict[int, float]] = {}

    def depth(self, endpoint_id: str, hashes: Sequence[int], now: float) -> int:
        """How many leading blocks of ``hashes`` the endpoint holds, fresh."""
        lru = self._lru.get(endpoint_id)
        if not lru:
            return 0
        oldest = now - self.ttl_s
        get = lru.get
        n = 0
        for h in hashes:
            seen = get(h)
            if seen is None or seen < oldest:
                break
            n += 1
        return n

    def learn(self, endpoint_id: str, hashes: Sequence[int], now: float) -> None:
        lru = self._lru.get(endpoint_id)
        if lru is None:
            lru = self._lru[endpoint_id] = OrderedDict()
        move = lru.move_to_end
        for h in reversed(hashes):  # deepest first: the prefix ends up most recent
            lru[h] = now
            move(h)
        self._trim(lru, now)

    def _trim(self, lru: OrderedDict[int, float], now: float) -> None:
        over = len(lru) - self.max_blocks
        while over > 0:
            lru.popitem(last=False)
            over -= 1
        oldest = now - self.ttl_s
        while lru:
            h, seen = next(iter(lru.items()))
            if seen >= oldest:
                break
            del lru[h]

    def forget(self, endpoint_id: str) -> None:
        self._lru.pop(endpoint_id, None)

    def retain(self, endpoint_ids: set[str]) -> None:
        for endpoint_id in [e for e in self._lru if e not in endpoint_ids]:
            del self._lru[endpoint_id]

    def resize(self, max_blocks: int, ttl_s: float, now: float) -> None:
        self.max_blocks, self.ttl_s = max_blocks, ttl_s
        for lru in self._lru.values():
            self._trim(lru, now)

    def sizes(self) -> dict[str, int]:
        return {endpoint_id: len(lru) for endpoint_id, lru in self._lru.items()}

    def __len__(self) -> int:
        return sum(len(lru) for lru in self._lru.values())


class CacheAware:
    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self.settings = CacheAwareSettings()
        self.index = PrefixIndex(self.settings.max_blocks_per_endpoint, self.settings.ttl_s)
        #: decisions by outcome (hit, miss, imbalance), and matched / compared prompt blocks
        self.decisions = {HIT: 0, MISS: 0, OVERRIDDEN: 0}
        self.matched_blocks = 0.0
        self.prompt_blocks = 0.0

    def configure(self, settings: Any) -> None:
        """Take ``routing.cache_aware`` from the gateway's routing settings (a reload keeps the index)."""
        ours = getattr(settings, "cache_aware", None)
        if ours is None:
            return
        self.settings = ours
        self.index.resize(ours.max_blocks_per_endpoint, ours.ttl_s, self._clock())

    def forget(self, endpoint_id: str) -> None:
        self.index.forget(endpoint_id)

    def select(self, candidates: Sequence[Endpoint], request: RequestInfo, rng: random.Random) -> Endpoint:
        s = self.settings
        prompt = prompt_of(request.body, s.block_chars * s.max_prompt_blocks)
        if prompt is None:
            return least_loaded(candidates, rng)
        hashes = block_hashes(prompt, s.block_chars)
        if not hashes:  # shorter than one block: nothing an engine could reuse
            return least_loaded(candidates, rng)
        now = self._clock()
        index = self.index
        if len(index._lru) > 2 * len(candidates) + 16:
            # ids that left without a forget() (a renamed model): keep the index bounded
            index.retain({ep.id for ep in candidates})

        best_depth = 0
        matched: list[Endpoint] = []
        for ep in candidates:
            d = index.depth(ep.id, hashes, now)
            if d > best_depth:
                best_depth, matched = d, [ep]
            elif d == best_depth and d:
                matched.append(ep)
        units = prompt_units(prompt, s.block_chars)
        self.prompt_blocks += units
        self.matched_blocks += best_depth

        if matched and best_depth / units >= s.match_threshold:
            chosen = least_loaded(matched, rng)
            coolest = least_loaded(candidates, rng)
            if coolest is not chosen and _imbalanced(load(chosen), load(coolest), s.balance_abs, s.balance_rel):
                chosen, outcome = coolest, OVERRIDDEN
            else:
                outcome = HIT
        else:
            chosen, outcome = least_loaded(candidates, rng), MISS
        self.decisions[outcome] += 1
        index.learn(chosen.id, hashes, now)
        return chosen

    def samples(self) -> Iterator[tuple[str, str, str, dict[str, str], float]]:
        for outcome, n in self.decisions.items():
            yield (
                "ichat_routing_prefix_decisions_total",
                "cache_aware decisions: hit (longest prefix match), miss (below the threshold: least loaded), "
                "imbalance (a match overridden by the imbalance gate).",
                "counter",
                {"outcome": outcome},
                n,
            )
        yield (
            "ichat_routing_prefix_matched_blocks_total",
            "Prompt blocks found in the chosen-by-match endpoint's index (divide by prompt_blocks for the matched ratio).",
            "counter",
            {},
            self.matched_blocks,
        )
        yield ("ichat_routing_prefix_prompt_blocks_total", "Prompt blocks compared by cache_aware.", "counter", {}, self.prompt_blocks)
        for endpoint_id, n in self.index.sizes().items():
            yield (
                "ichat_routing_prefix_index_blocks",
                "Entries (prompt blocks) in cache_aware's index, by endpoint.",
                "gauge",
                {"endpoint": endpoint_id},
                n,
            )


def _imbalanced(chosen: float, least: float, abs_threshold: float, rel_threshold: float) -> bool:
    return chosen - least > abs_threshold and chosen > least * rel_threshold
