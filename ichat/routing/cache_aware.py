"""Prefix-cache-aware routing: send a prompt where its prefix was sent before, unless that
endpoint is overloaded.

Engines keep the KV cache of recent prompts (vLLM's automatic prefix caching, SGLang's radix
cache); a request whose prefix an engine still holds skips that part of the prefill. This
policy keeps, per model (one instance per pool), an *approximate* index of which endpoint was
recently given which prompt prefix, learned from its own dispatches (no engine is asked):

* The prompt (``ichat.routing.prompt``) is cut into fixed-size blocks with chained hashes.
* Each endpoint has an approximate LRU of block hashes -> last use (two generations of plain
  dicts: see :class:`_Generations`), bounded to ``max_blocks_per_endpoint`` entries and
  ``ttl_s`` seconds. A dispatch touches all the prompt's blocks, so a shared prefix stays as
  fresh as its most recent use. An endpoint that leaves the pool loses its entries
  (``forget``).
* Matching walks each candidate's LRU from the first block until a miss: the matched depth.

Choice, for each request:

1. ``ratio`` = longest matched depth / prompt length (in blocks). At or above
   ``match_threshold``: the matched endpoints (the deepest; the least loaded of those);
   otherwise the least loaded endpoint of the pool (never "the one with the smallest index",
   which feeds a death spiral: sglang#14305); ties of load go to the deeper partial match,
   then to the smaller index (new prefixes spread evenly over the pool's cache capacity).
   With ``spread_new_prefixes`` (the default), a miss goes instead to the endpoint with the
   deepest partial match, then the smallest index, among those the imbalance gate (below)
   would accept next to the least loaded one: under a closed loop, load-based placement put 8
   of 12 long prefixes on one replica, which affinity then held there (issue 17's GPU run).
2. Imbalance gate: when the chosen endpoint's load exceeds the pool's least loaded one by more
   than ``balance_abs`` requests and by more than ``balance_rel`` times, the least loaded one
   takes the request instead. Its index then learns the prefix too, so a hot prefix ends up on
   more than one endpoint rather than bouncing between them.
3. The chosen endpoint's index learns the prompt's blocks.

Precise mode (``precise: true``): an endpoint whose worker reports its engine's prefix cache
(``--report-prefix-cache``: ``ichat.worker.prefixcache`` on the worker,
``ichat.routing.cachereport`` here) is matched against what its engine says it holds, plus what
was sent to it within ``precise_grace_s`` (not reported yet); the approximate index stays the
fallback for endpoints that do not report. The prompt's block hashes go to the worker with the
request (``X-Ichat-Prefix-Blocks``), so the worker reports in the gateway's hashes and the
gateway needs no tokenizer.

Load is what :class:`ichat.routing.least_inflight.DispatchLoad` says: this gateway's in-flight
requests (counted from dispatch, not from the first byte of the answer), plus the load the
endpoint reports from elsewhere, plus the weight of requests still likely in prefill, per weight.

Memory bound: at most ``max_blocks_per_endpoint`` entries per endpoint, each a dict slot
holding a 64-bit int hash (at most 100 bytes all told on CPython 3.11, measured by
``benchmarks/routing_policy_cost.py``): 16,384 entries, at most 1.6 MB per endpoint at the
defaults. Cost per request: one pass over at most ``max_prompt_blocks`` blocks to hash, one
walk per candidate until its first miss, one touch per block of the chosen endpoint.

Pure: the clock is injected (``clock``), randomness comes in through ``select``'s ``rng``.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from ichat.config import CacheAwareSettings
from ichat.protocol import PREFIX_BLOCKS_HEADER, prefix_header
from ichat.routing.least_inflight import DispatchLoad
from ichat.routing.least_inflight import load as plain_load
from ichat.routing.policy import RequestInfo
from ichat.routing.prompt import block_hashes, prompt_of, prompt_units
from ichat.routing.table import Endpoint

HIT, MISS, OVERRIDDEN = "hit", "miss", "imbalance"
_PREFIX_HEADER = PREFIX_BLOCKS_HEADER.encode()


class _Generations:
    """One endpoint's entries: block hash -> time of last use, in two generations.

    New and touched entries go into ``current``; when it holds half the bound it becomes
    ``previous`` and the old ``previous`` is dropped whole. An approximate LRU (an entry
    survives between half and all of ``max_blocks`` newer insertions) at the cost of a plain
    dict slot per entry, O(1) per operation, and no per-entry bookkeeping."""

    __slots__ = ("current", "previous", "current_last", "previous_last")

    def __init__(self) -> None:
        self.current: dict[int, float] = {}
        self.previous: dict[int, float] = {}
        self.current_last = 0.0  # the newest time in each generation, for the TTL
        self.previous_last = 0.0

    def rotate(self) -> None:
        self.previous, self.previous_last = self.current, self.current_last
        self.current = {}

    def __len__(self) -> int:
        return len(self.current) + len(self.previous)


class PrefixIndex:
    """Per endpoint: which block hashes it was given recently (bounded in entries and age)."""

    def __init__(self, max_blocks: int, ttl_s: float) -> None:
        self.max_blocks = max_blocks
        self.ttl_s = ttl_s
        self._lru: dict[str, _Generations] = {}

    def depth(self, endpoint_id: str, hashes: Sequence[int], now: float, max_age: float | None = None) -> int:
        """How many leading blocks of ``hashes`` the endpoint holds, fresh (used within the TTL,
        or within ``max_age`` seconds when that is shorter).

        A binary search: an endpoint that holds a block holds every block before it (a
        dispatch learns a prompt's blocks together, always from the first, and generations
        drop whole), so "held" is monotone along the chain. A miss costs one probe, a full
        match two, a partial one about log2(blocks)."""
        gens = self._lru.get(endpoint_id)
        if gens is None or not hashes:
            return 0
        oldest = now - (self.ttl_s if max_age is None else min(max_age, self.ttl_s))
        current, previous = gens.current, gens.previous
        if not _held(current, previous, hashes[0], oldest):
            return 0  # the common case, inlined no further: one probe per generation
        n = len(hashes)
        if _held(current, previous, hashes[n - 1], oldest):
            return n
        lo, hi = 1, n - 1  # held(hashes[lo - 1]) and not held(hashes[hi]): the answer is in [lo, hi]
        while lo < hi:
            mid = (lo + hi) // 2
            if _held(current, previous, hashes[mid], oldest):
                lo = mid + 1
            else:
                hi = mid
        return lo

    def depths(self, endpoint_ids: Sequence[str], hashes: Sequence[int], now: float) -> list[int]:
        """``depth`` for each endpoint, in one call: most endpoints of a pool miss at the first
        block, and this settles each of those with one probe per generation, no call."""
        oldest = now - self.ttl_s
        lru = self._lru
        first = hashes[0]
        out = []
        for endpoint_id in endpoint_ids:
            gens = lru.get(endpoint_id)
            if gens is None:
                out.append(0)
                continue
            seen = gens.current.get(first)
            if seen is None:
                seen = gens.previous.get(first)
            out.append(0 if seen is None or seen < oldest else self.depth(endpoint_id, hashes, now))
        return out

    def learn(self, endpoint_id: str, hashes: Sequence[int], now: float) -> None:
        gens = self._lru.get(endpoint_id)
        if gens is None:
            gens = self._lru[endpoint_id] = _Generations()
        half = max(1, self.max_blocks // 2)
        if len(hashes) > half:
            hashes = hashes[:half]  # the prefix is what matters; a bound smaller than a prompt
        if len(gens.current) + len(hashes) > half:
            gens.rotate()
        # One float object shared by the request's entries; fromkeys + update stay in C.
        gens.current.update(dict.fromkeys(hashes, now))
        gens.current_last = now

    def expire(self, now: float) -> None:
        """Drop the generations whose newest entry is past the TTL, on every endpoint."""
        oldest = now - self.ttl_s
        for gens in self._lru.values():
            if gens.previous and gens.previous_last < oldest:
                gens.previous = {}
            if gens.current and gens.current_last < oldest:
                gens.current = {}

    def forget(self, endpoint_id: str) -> None:
        self._lru.pop(endpoint_id, None)

    def retain(self, endpoint_ids: set[str]) -> None:
        for endpoint_id in [e for e in self._lru if e not in endpoint_ids]:
            del self._lru[endpoint_id]

    def resize(self, max_blocks: int, ttl_s: float, now: float) -> None:
        self.max_blocks, self.ttl_s = max_blocks, ttl_s
        half = max(1, max_blocks // 2)
        for gens in self._lru.values():
            if len(gens.current) > half:
                gens.current = dict(list(gens.current.items())[-half:])  # the newest
            if len(gens) > max_blocks:
                gens.previous = {}
        self.expire(now)

    def size_of(self, endpoint_id: str) -> int:
        gens = self._lru.get(endpoint_id)
        return 0 if gens is None else len(gens)

    def sizes(self) -> dict[str, int]:
        return {endpoint_id: len(gens) for endpoint_id, gens in self._lru.items()}

    def __len__(self) -> int:
        return sum(len(gens) for gens in self._lru.values())


class CacheAware:
    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self.load = DispatchLoad(clock)
        self.settings = CacheAwareSettings()
        self.index = PrefixIndex(self.settings.max_blocks_per_endpoint, self.settings.ttl_s)
        #: decisions by outcome (hit, miss, imbalance), and matched / compared prompt blocks
        self.decisions = {HIT: 0, MISS: 0, OVERRIDDEN: 0}
        self.matched_blocks = 0.0
        self.prompt_blocks = 0.0

    def configure(self, settings: Any) -> None:
        """Take ``routing.cache_aware`` from the gateway's routing settings (a reload keeps the index)."""
        self.load.configure(settings)
        ours = getattr(settings, "cache_aware", None)
        if ours is None:
            return
        self.settings = ours
        self.index.resize(ours.max_blocks_per_endpoint, ours.ttl_s, self._clock())

    def forget(self, endpoint_id: str) -> None:
        self.index.forget(endpoint_id)
        self.load.forget(endpoint_id)

    def select(self, candidates: Sequence[Endpoint], request: RequestInfo, rng: random.Random) -> Endpoint:
        s = self.settings
        now = self._clock()
        load = self.load
        prompt = prompt_of(request.body, s.block_chars * s.max_prompt_blocks)
        hashes = block_hashes(prompt, s.block_chars) if prompt is not None else None
        if not hashes:  # no prompt, or shorter than one block: nothing an engine could reuse
            chosen = load.least_loaded(candidates, rng, now)
            load.dispatched(chosen, now)
            return chosen
        index = self.index
        if len(index._lru) > 2 * len(candidates) + 16:
            # ids that left without a forget() (a renamed model): keep the index bounded
            index.retain({ep.id for ep in candidates})
        index.expire(now)

        units = prompt_units(prompt, s.block_chars)
        if s.precise:
            depths = _precise_depths(candidates, hashes, index, now, s.precise_grace_s)
            request.upstream_headers = [(_PREFIX_HEADER, prefix_header(units, hashes))]
        else:
            depths = index.depths([ep.id for ep in candidates], hashes, now)
        best_depth = max(depths)
        self.prompt_blocks += units
        self.matched_blocks += best_depth

        if best_depth and best_depth / units >= s.match_threshold:
            matched = [ep for ep, d in zip(candidates, depths) if d == best_depth]
            if len(matched) == 1:
                chosen = matched[0]
            else:
                chosen = _least_loaded_deepest(
                    matched, [load.of(ep, now) for ep in matched], [best_depth] * len(matched), index, rng
                )
            # The gate compares requests in flight (and reported), not the prefill weight: a
            # burst for one prefix may fill its home up to the gate before it spreads. It cannot
            # fire unless the chosen endpoint is more than balance_abs above the pool's lowest
            # load, so the pool's full ranking is only made then (most hits skip it).
            chosen_load = plain_load(chosen)
            outcome = HIT
            if chosen_load - min(map(plain_load, candidates)) > s.balance_abs:
                coolest = _least_loaded_deepest(candidates, [load.of(ep, now) for ep in candidates], depths, index, rng)
                if coolest is not chosen and _imbalanced(chosen_load, plain_load(coolest), s.balance_abs, s.balance_rel):
                    chosen, outcome = coolest, OVERRIDDEN
        else:
            loads = [load.of(ep, now) for ep in candidates]
            chosen, outcome = _least_loaded_deepest(candidates, loads, depths, index, rng), MISS
            if s.spread_new_prefixes:
                chosen = _smallest_index_within_gate(candidates, loads, depths, chosen, index, s, rng)
        self.decisions[outcome] += 1
        index.learn(chosen.id, hashes, now)
        load.dispatched(chosen, now)
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


def _precise_depths(
    candidates: Sequence[Endpoint], hashes: list[int], index: PrefixIndex, now: float, grace: float
) -> list[int]:
    """Precise mode, for each endpoint: the blocks its engine reports holding, or that were sent
    to it within ``grace`` seconds (not reported yet); the approximate index for an endpoint
    that does not report.

    One loop with the common cases inlined (a report that lacks the first block, an index that
    was not sent it lately): a call per endpoint per step cost about a fifth of the policy."""
    n = len(hashes)
    first = hashes[0]
    lru = index._lru
    oldest = now - min(grace, index.ttl_s)
    out = []
    for ep in candidates:
        reported = ep.cached_prefixes
        if reported is None or not reported.synced:
            out.append(index.depth(ep.id, hashes, now))
            continue
        depth = 0 if first not in reported.blocks else reported.depth(hashes)
        # The index's "held" is monotone along the chain: it can only go deeper than the report
        # if it holds the first block the report lacks, so one probe settles most endpoints.
        gens = lru.get(ep.id) if depth < n and grace else None
        if gens is not None:
            h = hashes[depth]
            seen = gens.current.get(h)
            if seen is None:
                seen = gens.previous.get(h)
            if seen is not None and seen >= oldest:
                depth = max(depth, index.depth(ep.id, hashes, now, grace))
        out.append(depth)
    return out


def _held(current: dict[int, float], previous: dict[int, float], h: int, oldest: float) -> bool:
    seen = current.get(h)
    if seen is None:
        seen = previous.get(h)
    return seen is not None and seen >= oldest


def _least_loaded_deepest(
    candidates: Sequence[Endpoint], loads: list[float], depths: list[int], index: PrefixIndex, rng: random.Random
) -> Endpoint:
    """The least loaded endpoint; among equally loaded ones the deepest match, then the
    smallest index, then at random.

    On a miss (a match below the threshold) the load decides; a tie, common in a quiet pool,
    goes where part of the prompt may still be cached, else where the least is cached, so
    that new prefixes spread evenly over the pool's cache capacity."""
    keys = [(x, -d) for x, d in zip(loads, depths)]
    best_key = min(keys)
    tied = [ep for ep, key in zip(candidates, keys) if key == best_key]
    if len(tied) == 1:
        return tied[0]
    sizes = index.size_of  # only ties need the index sizes
    return _lowest(tied, [(sizes(ep.id),) for ep in tied], rng)


def _smallest_index_within_gate(
    candidates: Sequence[Endpoint], loads: list[float], depths: list[int], coolest: Endpoint, index: PrefixIndex,
    s: CacheAwareSettings, rng: random.Random,
) -> Endpoint:
    """A new prefix's home: of the endpoints the imbalance gate would accept next to the
    least loaded one, the one with the deepest partial match (what it holds is still reused,
    e.g. a conversation whose new turn outgrew the threshold), then the smallest index (the
    least cached, so new prefixes spread by cache content); ties to the less loaded, then at
    random."""
    least = plain_load(coolest)
    accepted = [
        (ep, x, d) for ep, x, d in zip(candidates, loads, depths)
        if ep is coolest or not _imbalanced(plain_load(ep), least, s.balance_abs, s.balance_rel)
    ]  # fmt: skip
    return _lowest([ep for ep, _, _ in accepted], [(-d, index.size_of(ep.id), x) for ep, x, d in accepted], rng)


def _lowest(candidates: Sequence[Endpoint], keys: Sequence[tuple[float, ...]], rng: random.Random) -> Endpoint:
    """The candidate with the lowest key; ties at random."""
    best_key = min(keys)
    best = [ep for ep, key in zip(candidates, keys) if key == best_key]
    return best[0] if len(best) == 1 else best[rng.randrange(len(best))]


def _imbalanced(chosen: float, least: float, abs_threshold: float, rel_threshold: float) -> bool:
    return chosen - least > abs_threshold and chosen > least * rel_threshold
