"""Precise cache_aware routing, in process: the worker's tracker of its engine's prefix cache,
the heartbeat field and header that carry it, the gateway's copy, and the policy using it."""

from __future__ import annotations

import random

import pytest

from ichat.config import CacheAwareSettings, LeastInflightSettings, RoutingSettings
from ichat.errors import InvalidRequest
from ichat.protocol import (
    MAX_PREFIX_HEADER_BLOCKS,
    MAX_PREFIX_REPORT_BLOCKS,
    PREFIX_BLOCKS_HEADER,
    parse_heartbeat,
    parse_prefix_header,
    prefix_header,
)
from ichat.routing import Endpoint, RequestInfo
from ichat.routing.cache_aware import CacheAware, PrefixIndex, _precise_depths
from ichat.routing.cachereport import CachedPrefixes
from ichat.routing.prompt import block_hashes, prompt_of, prompt_units
from ichat.worker.prefixcache import PrefixCacheTracker, token_chain

BS = 4  # engine block size in tokens, small so that tests read easily


class EngineCache:
    """Stands in for vLLM's block pool: stores whole blocks of a prompt with hashes of its own
    (unrelated to ours, as the real engine's are), and evicts them."""

    def __init__(self, tracker: PrefixCacheTracker) -> None:
        self.tracker = tracker
        self.hash_of: dict[tuple[int, ...], str] = {}

    def store(self, tokens: list[int]) -> None:
        parent = None
        for start in range(0, len(tokens) // BS * BS, BS):
            prefix = tuple(tokens[: start + BS])
            h = self.hash_of.setdefault(prefix, f"engine-{len(self.hash_of)}")
            self.tracker.stored([h], parent, tokens[start : start + BS], BS)
            parent = h

    def evict_from(self, tokens: list[int], block: int) -> None:
        """Evict the prompt's blocks from index ``block`` on."""
        hashes = [self.hash_of[tuple(tokens[: (b + 1) * BS])] for b in range(block, len(tokens) // BS)]
        self.tracker.removed(hashes)


def gateway_blocks(text: str, block_chars: int = 16) -> tuple[float, list[int]]:
    return prompt_units(text, block_chars), block_hashes(text, block_chars)


# -- the worker's tracker ----------------------------------------------------------------------


def test_a_prompt_counts_as_held_from_dispatch_then_as_the_engine_says():
    tracker = PrefixCacheTracker(BS)
    engine = EngineCache(tracker)
    text = "x" * 64  # 4 gateway blocks of 16 characters
    units, hashes = gateway_blocks(text)
    tokens = list(range(100, 132))  # 32 tokens: 8 engine blocks, 8 tokens per gateway block
    tracker.observe_prompt((units, hashes), tokens)
    # given to the engine, not stored yet: held (a queued request must not look like a miss)
    assert tracker.held() == set(hashes[:3])  # the last gateway block ends in the last token block's margin
    engine.store(tokens)
    assert tracker.held() == set(hashes[:3])
    engine.evict_from(tokens, 6)  # the engine keeps token blocks 0..5 (tokens 0..23)
    assert tracker.held() == set(hashes[:2])
    engine.evict_from(tokens, 0)
    assert tracker.held() == set()


def test_margin_places_block_ends_late_so_held_means_held():
    tracker = PrefixCacheTracker(BS)
    engine = EngineCache(tracker)
    units, hashes = gateway_blocks("y" * 64)
    tokens = list(range(32))
    tracker.observe_prompt((units, hashes), tokens)
    engine.store(tokens)
    # gateway block 1 ends at token 16 exactly; placed late (the margin), it needs token block 5
    engine.evict_from(tokens, 5)
    assert tracker.held() == {hashes[0]}


def test_a_prompt_never_stored_stops_counting_after_some_reports():
    tracker = PrefixCacheTracker(BS, pending_reports=3)
    units, hashes = gateway_blocks("z" * 64)
    tracker.observe_prompt((units, hashes), list(range(32)))
    assert tracker.report()["added"]
    for _ in range(3):
        tracker.report()
    report = tracker.report()
    assert tracker.held() == set() and set(report["removed"]) == set(hashes[:3])


def test_reports_are_deltas_between_whole_ones_and_whole_after_resync():
    tracker = PrefixCacheTracker(BS, full_every=4)
    engine = EngineCache(tracker)
    first = tracker.report()
    assert first == {"seq": 0, "full": True, "added": [], "removed": []}
    units, hashes = gateway_blocks("a" * 64)
    tokens = list(range(32))
    tracker.observe_prompt((units, hashes), tokens)
    engine.store(tokens)
    delta = tracker.report()
    assert delta["full"] is False and delta["added"] == sorted(hashes[:3]) and delta["removed"] == []
    engine.evict_from(tokens, 0)
    delta = tracker.report()
    assert delta["seq"] == 2 and delta["added"] == [] and delta["removed"] == sorted(hashes[:3])
    tracker.resync()
    assert tracker.report()["full"] is True
    assert tracker.report()["full"] is True  # seq 4: every full_every-th report is whole


def test_events_of_chains_never_seen_and_of_other_block_sizes_are_ignored():
    tracker = PrefixCacheTracker(BS)
    tracker.stored(["b"], "unknown-parent", [1, 2, 3, 4], BS)
    assert tracker.engine_blocks == 0
    tracker.stored(["a"], None, [1, 2, 3, 4], BS)
    tracker.stored(["c"], None, list(range(8)), 8)  # another KV group's size, once blocks are known
    assert tracker.engine_blocks == 1
    tracker.cleared()
    assert tracker.engine_blocks == 0


def test_tracker_is_bounded():
    tracker = PrefixCacheTracker(BS, max_gateway_blocks=8, max_engine_blocks=16)
    engine = EngineCache(tracker)
    for p in range(10):
        tokens = [p * 1000 + i for i in range(32)]
        units, hashes = gateway_blocks(chr(65 + p) * 64)
        tracker.observe_prompt((units, hashes), tokens)
        engine.store(tokens)
        assert len(tracker._gateway) <= 8 and tracker.engine_blocks <= 16
    assert len(tracker.report()["added"]) <= 8


def test_token_chain_keys_agree_with_event_keys():
    tracker = PrefixCacheTracker(BS)
    EngineCache(tracker).store(list(range(12)))
    assert set(tracker._resident) == set(token_chain(list(range(12)), BS, 3))


# -- header and heartbeat field -----------------------------------------------------------------


def test_prefix_header_round_trip_and_bounds():
    hashes = [-(1 << 63), 0, (1 << 63) - 1]
    assert parse_prefix_header(prefix_header(3.5, hashes).decode()) == (3.5, hashes)
    many = list(range(MAX_PREFIX_HEADER_BLOCKS + 10))
    assert parse_prefix_header(prefix_header(200.0, many).decode())[1] == many[:MAX_PREFIX_HEADER_BLOCKS]
    for bad in (None, "", "x;1", "1.0;", "1.0;a,b", "nan;1", "-1;1", f"1;{1 << 64}", "1;" + ",".join(["1"] * 200)):
        assert parse_prefix_header(bad) is None, bad
    packed = prefix_header(2.0, [1, -1]).decode()
    assert packed == "2.00;x" + "0100000000000000" + "ff" * 8  # 16 hex digits a hash, little-endian
    for bad in ("1;x", "1;x0100", "1;x" + "01" * 7 + " 0", "1;x" + "zz" * 8, "1;x" + "00" * 8 * 129, "nan;x" + "00" * 8):
        assert parse_prefix_header(bad) is None, bad
    # the decimal form, from gateways before the packed one, still parses
    assert parse_prefix_header("3.50;-9223372036854775808,0,9223372036854775807") == (3.5, hashes)


def beat(**extra):
    return {
        "worker_id": "w1", "instance_id": "i1", "model_name": "m", "host": "127.0.0.1", "port": 8001,
        "state": "ready", "heartbeat_interval": 5, **extra,
    }  # fmt: skip


def test_heartbeat_prefix_cache_field_is_validated():
    ok = parse_heartbeat(beat(prefix_cache={"seq": 3, "full": False, "added": [1, -2], "removed": [5]}))
    assert ok.prefix_cache["added"] == [1, -2]
    assert parse_heartbeat(beat()).prefix_cache is None
    bad = [
        {"seq": -1, "full": True},
        {"seq": 1, "full": "yes"},
        {"seq": 1, "full": True, "added": "1,2"},
        {"seq": 1, "full": True, "added": [True]},
        {"seq": 1, "full": True, "added": [1 << 64]},
        {"seq": 1, "full": True, "added": list(range(MAX_PREFIX_REPORT_BLOCKS)), "removed": [1]},
        [1, 2],
    ]
    for report in bad:
        with pytest.raises(InvalidRequest) as info:
            parse_heartbeat(beat(prefix_cache=report))
        assert info.value.param == "prefix_cache", report


# -- the gateway's copy ------------------------------------------------------------------------


def test_gateway_copy_applies_deltas_in_order_and_waits_for_a_whole_report_after_a_gap():
    copy = CachedPrefixes()
    copy.apply("i1", {"seq": 0, "full": False, "added": [1]})
    assert not copy.synced and copy.depth([1]) == 0  # a delta before any whole report
    copy.apply("i1", {"seq": 1, "full": True, "added": [1, 2]})
    assert copy.depth([1, 2, 3]) == 2
    copy.apply("i1", {"seq": 2, "full": False, "added": [3], "removed": [1]})
    assert copy.depth([1, 2, 3]) == 0 and copy.depth([2, 3]) == 2
    copy.apply("i1", {"seq": 2, "full": False, "added": [9]})  # the same beat again: ignored
    assert 9 not in copy.blocks and copy.synced
    copy.apply("i1", {"seq": 4, "full": False, "added": [7]})  # seq 3 lost
    assert not copy.synced and len(copy) == 0
    copy.apply("i1", {"seq": 5, "full": True, "added": [7]})
    assert copy.synced and copy.depth([7]) == 1
    copy.apply("i2", {"seq": 6, "full": False, "added": [8]})  # a restarted worker's delta
    assert not copy.synced


# -- the policy --------------------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def precise_policy(clock: Clock, **settings) -> CacheAware:
    p = CacheAware(clock=clock)
    p.configure(
        RoutingSettings(
            cache_aware=CacheAwareSettings(precise=True, **settings), least_inflight=LeastInflightSettings(prefill_weight=0)
        )
    )
    return p


def chat(system: str, question: str) -> RequestInfo:
    body = {"model": "m", "messages": [{"role": "system", "content": system}, {"role": "user", "content": question}]}
    return RequestInfo("m", "/v1/chat/completions", 0, body=body)


SYSTEM = "You are the assistant of tenant A. " * 40


def report_all(ep: Endpoint, hashes: list[int], seq: int = 0) -> None:
    if ep.cached_prefixes is None:
        ep.cached_prefixes = CachedPrefixes()
    ep.cached_prefixes.apply(ep.id, {"seq": seq, "full": True, "added": hashes})


def test_precise_mode_sends_the_blocks_and_trusts_the_engines_report():
    clock, rng = Clock(), random.Random(0)
    p = precise_policy(clock, precise_grace_s=2.0)
    eps = [Endpoint(id=f"e{i}", model_name="m", api_base=f"http://h{i}:8000/v1") for i in range(2)]
    for ep in eps:
        report_all(ep, [])
    first = chat(SYSTEM, "q1")
    home = p.select(eps, first, rng)
    (name, value), = first.upstream_headers
    assert name.decode() == PREFIX_BLOCKS_HEADER
    units, hashes = parse_prefix_header(value.decode())
    prompt = prompt_of(first.body, 256 * 256)
    assert hashes == block_hashes(prompt, 256)[:MAX_PREFIX_HEADER_BLOCKS]
    other = eps[1] if home is eps[0] else eps[0]
    # within the grace, the dispatch counts although no report says so yet
    clock.now += 1.0
    home.inflight = 1  # busier, within the imbalance gate
    assert p.select(eps, chat(SYSTEM, "q2"), rng) is home
    # past the grace, the engine's report decides: it evicted the prefix; the other one has it
    clock.now += 5.0
    report_all(other, hashes[:4], seq=1)
    assert p.select(eps, chat(SYSTEM, "q3"), rng) is other
    assert p.decisions["hit"] == 2


def _precise_depth(ep: Endpoint, hashes: list[int], index: PrefixIndex, now: float, grace: float) -> int:
    return _precise_depths([ep], hashes, index, now, grace)[0]


def test_precise_depth_is_the_deeper_of_the_report_and_the_dispatches_within_the_grace():
    ep = Endpoint(id="e0", model_name="m", api_base="http://h0:8000/v1")
    index = PrefixIndex(max_blocks=1000, ttl_s=600.0)
    hashes = [11, 12, 13, 14, 15, 16, 17, 18]
    index.learn(ep.id, hashes[:6], now=100.0)
    report_all(ep, hashes[:3])
    assert _precise_depth(ep, hashes, index, now=101.0, grace=2.0) == 6  # sent, not reported yet
    assert _precise_depth(ep, hashes, index, now=105.0, grace=2.0) == 3  # past the grace: the report
    assert _precise_depth(ep, hashes, index, now=101.0, grace=0.0) == 3  # no grace: the report only
    report_all(ep, hashes, seq=1)
    assert _precise_depth(ep, hashes, index, now=101.0, grace=2.0) == 8  # the report deeper than the index
    report_all(ep, [], seq=2)
    assert _precise_depth(ep, hashes, index, now=101.0, grace=2.0) == 6
    assert _precise_depth(ep, [99, *hashes], index, now=101.0, grace=2.0) == 0  # another prompt


def test_precise_mode_falls_back_to_the_index_for_endpoints_that_do_not_report():
    clock, rng = Clock(), random.Random(0)
    p = precise_policy(clock)
    eps = [Endpoint(id=f"e{i}", model_name="m", api_base=f"http://h{i}:8000/v1") for i in range(2)]
    home = p.select(eps, chat(SYSTEM, "q1"), rng)
    clock.now += 100.0  # long past the grace: only the approximate index remembers
    home.inflight = 1
    assert p.select(eps, chat(SYSTEM, "q2"), rng) is home


def test_approximate_mode_adds_no_header():
    p = CacheAware(clock=Clock())
    request = chat(SYSTEM, "q1")
    p.select([Endpoint(id="e0", model_name="m", api_base="http://h:8000/v1")], request, random.Random(0))
    assert request.upstream_headers is None


def test_depths_of_a_pool_in_one_call_equal_the_definition_endpoint_by_endpoint():
    """The inlined loops (``PrefixIndex.depths``, ``_precise_depths``) against the definition,
    on random pools: reporting and silent endpoints, reports and dispatches of different ages
    and depths, with and without a grace."""
    rng = random.Random(7)
    chains = [[rng.getrandbits(63) for _ in range(12)] for _ in range(4)]

    def reference(ep: Endpoint, hashes: list[int], index: PrefixIndex, now: float, grace: float) -> int:
        reported = ep.cached_prefixes
        if reported is None or not reported.synced:
            return index.depth(ep.id, hashes, now)
        depth = 0
        while depth < len(hashes) and hashes[depth] in reported.blocks:
            depth += 1
        if not grace:
            return depth
        return max(depth, index.depth(ep.id, hashes, now, grace))

    checked = deeper_by_grace = 0
    for trial in range(300):
        index = PrefixIndex(max_blocks=rng.choice([8, 64, 1000]), ttl_s=rng.choice([5.0, 600.0]))
        eps = [Endpoint(id=f"e{i}", model_name="m", api_base=f"http://h{i}:8000/v1") for i in range(5)]
        for ep in eps:
            for _ in range(rng.randrange(4)):
                chain = rng.choice(chains)
                index.learn(ep.id, chain[: rng.randrange(1, 13)], now=100.0 + rng.uniform(0, 10))
            if rng.random() < 0.7:
                chain = rng.choice(chains)
                report_all(ep, chain[: rng.randrange(0, 13)])
        hashes = rng.choice(chains)[: rng.randrange(1, 13)]
        now, grace = 110.0 + rng.uniform(0, 3), rng.choice([0.0, 1.0, 3.0, 20.0])
        expected = [reference(ep, hashes, index, now, grace) for ep in eps]
        assert _precise_depths(eps, hashes, index, now, grace) == expected, trial
        assert index.depths([ep.id for ep in eps], hashes, now) == [index.depth(ep.id, hashes, now) for ep in eps]
        checked += sum(1 for d in expected if d)
        deeper_by_grace += sum(
            1 for ep, d in zip(eps, expected) if ep.cached_prefixes is not None and d > ep.cached_prefixes.depth(hashes)
        )
    assert checked > 300 and deeper_by_grace > 20  # the draws reach the interesting cases
