"""cache_aware and session_affinity, without sockets: injected clock and random source."""

from __future__ import annotations

import random
from collections import Counter

import attrs
import pytest

from ichat.config import CacheAwareSettings, GatewayConfig, LeastInflightSettings, RoutingSettings, SessionAffinitySettings
from ichat.errors import ConfigError
from ichat.routing import Endpoint, RequestInfo, RoutingTable, load_policy
from ichat.routing.cache_aware import CacheAware, PrefixIndex
from ichat.routing.prompt import block_hashes, prompt_of
from ichat.routing.session import SessionAffinity, bounded_choice, ranked, session_key

CHAT = "/v1/chat/completions"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def endpoints(n: int) -> list[Endpoint]:
    return [Endpoint(id=f"e{i}", model_name="m", api_base=f"http://h{i}:8000/v1") for i in range(n)]


def chat(system: str, *turns: str, user: str | None = None) -> RequestInfo:
    messages = [{"role": "system", "content": system}]
    for i, text in enumerate(turns):
        messages.append({"role": "user" if i % 2 == 0 else "assistant", "content": text})
    body = {"model": "m", "messages": messages}
    if user is not None:
        body["user"] = user
    return RequestInfo("m", CHAT, 0, body=body)


def policy(clock: Clock | None = None, prefill_weight: float = 0.0, **settings) -> CacheAware:
    """cache_aware with the given settings; by default without the recent-dispatch weight (these
    tests set in-flight counts by hand, with a clock that stands still)."""
    p = CacheAware(clock=clock or Clock())
    p.configure(
        RoutingSettings(
            cache_aware=CacheAwareSettings(**settings), least_inflight=LeastInflightSettings(prefill_weight=prefill_weight)
        )
    )
    return p


TENANT_A = "You are the assistant of tenant A. " * 40  # ~1.4 KB: 5 blocks of 256
TENANT_B = "Tenant B's long and different system prompt. " * 40


# -- prompts and hashes -----------------------------------------------------------------------


def test_chat_rendering_keeps_the_conversation_prefix():
    first = prompt_of(chat(TENANT_A, "hello").body, 10**6)
    longer = prompt_of(chat(TENANT_A, "hello", "hi! how can I help?", "tell me more").body, 10**6)
    assert isinstance(first, str) and longer.startswith(first)
    # text parts of a content list render like the same text as a string
    parts = {"model": "m", "messages": [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]}
    assert prompt_of(parts, 100) == prompt_of({"messages": [{"role": "user", "content": "ab"}]}, 100)


def test_prompt_forms_and_bounds():
    assert prompt_of({"prompt": "x" * 1000}, 300) == "x" * 300
    assert prompt_of({"prompt": ["first", "second"]}, 100) == "first"
    assert prompt_of({"prompt": list(range(1000))}, 400) == list(range(100))  # 4 chars per id
    assert prompt_of({"prompt": [[1, 2, 3]]}, 400) == [1, 2, 3]
    assert prompt_of({"input": "embed me"}, 100) == "embed me"
    long_chat = {"messages": [{"role": "user", "content": "y" * 5000}] * 100}
    assert len(prompt_of(long_chat, 1000)) == 1000  # rendering stops early
    for junk in (None, [], "str", {"prompt": 5}, {"messages": "x"}, {"prompt": [{"a": 1}]}, {"prompt": []}):
        assert prompt_of(junk, 100) in (None, "")


def test_block_hashes_are_chained():
    a = block_hashes("a" * 64 + "b" * 64 + "c" * 10, 64)
    b = block_hashes("a" * 64 + "b" * 64 + "d" * 64, 64)
    c = block_hashes("z" * 64 + "b" * 64, 64)
    assert len(a) == 2 and a == b[:2]  # only whole blocks; shared prefix, shared hashes
    assert c[1] != a[1]  # the same block after a different prefix hashes differently
    assert block_hashes("short", 64) == []
    tokens = block_hashes(list(range(40)), 64)  # 16 ids per block
    assert len(tokens) == 2 and tokens == block_hashes(list(range(32)) + [99] * 5, 64)
    assert block_hashes([1] * 16 + [{"x": 1}] * 16, 64) == block_hashes([1] * 16, 64)  # unhashable tail


# -- affinity ---------------------------------------------------------------------------------


def test_a_prefix_sticks_to_where_it_was_sent():
    p, eps, rng = policy(), endpoints(3), random.Random(0)
    home_a = p.select(eps, chat(TENANT_A, "q1"), rng)
    home_b = p.select([e for e in eps if e is not home_a], chat(TENANT_B, "q1"), rng)
    for i in range(20):
        home_a.inflight = 2  # busier than the others, but within the gate
        assert p.select(eps, chat(TENANT_A, f"question {i}"), rng) is home_a
        assert p.select(eps, chat(TENANT_B, f"question {i}"), rng) is home_b
    assert p.decisions["hit"] == 40 and p.decisions["miss"] == 2


def test_growing_conversation_follows_its_history():
    p, eps, rng = policy(block_chars=64), endpoints(4), random.Random(1)
    turns = ["hello " * 20]
    home = p.select(eps, chat("short system", *turns), rng)
    for i in range(10):
        turns += [f"answer {i} " * 15, f"follow-up {i} " * 15]
        assert p.select(eps, chat("short system", *turns), rng) is home


def test_a_miss_goes_to_the_least_loaded_not_to_the_smallest_index():
    # Load-based placement (spread_new_prefixes off); with it on, see the two tests at the end.
    p, eps, rng = policy(spread_new_prefixes=False), endpoints(3), random.Random(2)
    eps[0].inflight, eps[1].inflight, eps[2].inflight = 3, 0, 5
    # e1 has the largest index, e0 the smallest: the load decides (sglang#14305's death spiral)
    for i in range(5):
        p.index.learn("e1", block_hashes(f"{i}" * 2000, 256), 1000.0)
    assert p.select(eps, chat("Unseen tenant. " * 100, "q"), rng) is eps[1]
    assert p.decisions["miss"] == 1


@pytest.mark.parametrize("spread", [False, True])
def test_below_the_threshold_the_load_decides_or_the_partial_match_within_the_gate(spread):
    p, eps, rng = policy(match_threshold=0.6, spread_new_prefixes=spread), endpoints(2), random.Random(3)
    shared = "common head " * 30  # ~360 chars: 1 of the ~3.5 blocks below
    p.select(eps, chat(shared + "x" * 700), rng)
    target = p.select(eps, chat(shared + "x" * 700), rng)
    other = eps[1] if target is eps[0] else eps[0]
    target.inflight = 1
    # matched ~0.3 < 0.6: the least loaded; spread_new_prefixes keeps the partial match instead,
    # as its endpoint is within the gate (1 request busier)
    assert p.select(eps, chat(shared + "y" * 700), rng) is (target if spread else other)
    target.inflight = 40  # past the gate: the least loaded either way
    assert p.select(eps, chat(shared + "z" * 700), rng) is other


def test_imbalance_gate_overrides_affinity_and_replicates_the_prefix():
    p, eps, rng = policy(balance_abs=4, balance_rel=1.5), endpoints(2), random.Random(4)
    home = p.select(eps, chat(TENANT_A, "q"), rng)
    other = eps[1] if home is eps[0] else eps[0]
    home.inflight, other.inflight = 9, 4  # 5 more (> 4) and 2.25 times (> 1.5): overloaded
    assert p.select(eps, chat(TENANT_A, "q2"), rng) is other
    assert p.decisions["imbalance"] == 1
    home.inflight, other.inflight = 8, 4  # 4 more: not over the absolute threshold
    assert p.select(eps, chat(TENANT_A, "q3"), rng) in (home, other)
    # both now hold the prefix: equal depth, so the less loaded of the two takes it
    assert p.index.depth(home.id, block_hashes(prompt_of(chat(TENANT_A).body, 10**5), 256), 1000.0) > 0
    assert p.select(eps, chat(TENANT_A, "q4"), rng) is other
    home.inflight, other.inflight = 40, 30  # relative threshold: 40 < 1.5 * 30, so affinity holds
    home.reported_load = 0
    p.index.forget(other.id)
    assert p.select(eps, chat(TENANT_A, "q5"), rng) is home


def test_reported_load_counts_in_the_gate():
    p, eps, rng = policy(balance_abs=8), endpoints(2), random.Random(5)
    home = p.select(eps, chat(TENANT_A, "q"), rng)
    other = eps[1] if home is eps[0] else eps[0]
    home.reported_load = 20  # busy with another gateway's requests
    assert p.select(eps, chat(TENANT_A, "q2"), rng) is other


def test_entries_expire_after_the_ttl():
    clock = Clock()
    p, eps, rng = policy(clock, ttl_s=60), endpoints(2), random.Random(6)
    home = p.select(eps, chat(TENANT_A, "q"), rng)
    other = eps[1] if home is eps[0] else eps[0]
    clock.now += 59
    home.inflight = 1
    assert p.select(eps, chat(TENANT_A, "q"), rng) is home  # touched again: fresh for 60 s more
    clock.now += 61
    assert p.select(eps, chat(TENANT_A, "q"), rng) is other  # expired: a miss, least loaded
    assert p.index.sizes()[home.id] == 0  # and dropped once seen


def test_index_is_bounded_and_keeps_a_prompts_prefix():
    index = PrefixIndex(max_blocks=10, ttl_s=1e9)
    a = block_hashes("a" * 256 * 8, 256)
    for i in range(50):
        index.learn("e", block_hashes(f"other {i} " * 200, 256)[:3], 1.0)
        assert len(index) <= 10
    index.learn("e", a, 2.0)  # 8 blocks, more than a generation (5) holds: its first 5 stay
    assert index.depth("e", a, 2.0) == 5 and len(index) <= 10
    index.learn("e", block_hashes("b" * 256 * 4, 256), 3.0)  # a moves to the older generation
    assert index.depth("e", a, 3.0) == 5
    index.learn("e", block_hashes("c" * 256 * 4, 256), 4.0)  # ... and out
    assert index.depth("e", a, 4.0) == 0 and len(index) <= 10


def test_departed_endpoint_drops_its_entries_and_metrics_show_the_index():
    clock = Clock()
    table = RoutingTable("cache_aware", policy_settings=RoutingSettings(), policy_loader=lambda name: CacheAware(clock))
    for ep in endpoints(2):
        table.upsert(ep)
    p = table.policy_for("m")
    rng = random.Random(7)
    for i in range(4):
        p.select(table.candidates("m", 0), chat(f"tenant {i} " * 100, "q"), rng)
    sizes = p.index.sizes()
    assert sum(sizes.values()) == len(p.index) > 0
    samples = list(table.policy_samples())
    assert ("ichat_routing_prefix_decisions_total", {"model": "m", "outcome": "miss"}, 4) in [(s[0], s[3], s[4]) for s in samples]
    gauge = {s[3]["endpoint"]: s[4] for s in samples if s[0] == "ichat_routing_prefix_index_blocks"}
    assert gauge == sizes
    gone = max(sizes, key=sizes.get)
    table.remove(gone)
    assert gone not in p.index.sizes()


def test_settings_reload_keeps_the_index():
    table = RoutingTable("cache_aware", policy_settings=RoutingSettings())
    for ep in endpoints(2):
        table.upsert(ep)
    p = table.policy_for("m")
    p.select(table.candidates("m", 0), chat(TENANT_A, "q"), random.Random(8))
    before = len(p.index)
    new = RoutingSettings(policy="cache_aware", cache_aware=CacheAwareSettings(match_threshold=0.9, max_blocks_per_endpoint=2))
    table.configure("cache_aware", {}, failures_to_eject=3, cooldown_s=10, policy_settings=new)
    assert table.policy_for("m") is p and p.settings.match_threshold == 0.9
    assert 0 < len(p.index) <= 2 < before  # the new bound applies at once
    table.configure("round_robin", {}, failures_to_eject=3, cooldown_s=10)
    assert table.policy_for("m") is not p  # another policy: a new instance


def test_settings_are_validated_with_their_key():
    with pytest.raises(ConfigError, match=r"routing\.cache_aware\.match_threshold"):
        GatewayConfig.from_dict({"routing": {"cache_aware": {"match_threshold": 1.5}}})
    with pytest.raises(ConfigError, match=r"routing\.session_affinity\.load_factor"):
        GatewayConfig.from_dict({"routing": {"session_affinity": {"load_factor": 0.5}}})
    cfg = GatewayConfig.from_dict({"routing": {"policy": "cache_aware", "cache_aware": {"block_chars": 128}}})
    assert cfg.routing.cache_aware.block_chars == 128


def test_requests_without_a_prompt_go_least_loaded():
    p, eps, rng = policy(), endpoints(2), random.Random(9)
    eps[0].inflight = 1
    for body in (None, {"model": "m"}, {"model": "m", "prompt": "tiny"}):
        assert p.select(eps, RequestInfo("m", CHAT, 0, body=body), rng) is eps[1]
    assert len(p.index) == 0


def test_registered_by_name():
    assert isinstance(load_policy("cache_aware"), CacheAware)
    assert isinstance(load_policy("session_affinity"), SessionAffinity)


# -- session affinity -------------------------------------------------------------------------


def test_session_key_sources():
    headers = {"X-Session-Id": "s-1"}
    assert session_key(RequestInfo("m", CHAT, headers=headers, body={"user": "u"}), "X-Session-Id", "user") == "s-1"
    assert session_key(RequestInfo("m", CHAT, headers={}, body={"user": "u"}), "X-Session-Id", "user") == "u"
    assert session_key(RequestInfo("m", CHAT, body={"user": "u"}), "X-Session-Id", "") is None
    assert session_key(RequestInfo("m", CHAT, body={"user": 5}), "", "user") is None
    assert len(session_key(RequestInfo("m", CHAT, body={"user": "k" * 10000}), "", "user")) == 256


def test_sessions_stick_and_only_the_departed_endpoints_sessions_move():
    eps = endpoints(5)
    keys = [f"session-{i}" for i in range(2000)]
    before = {k: bounded_choice(k, eps, 1.25)[0].id for k in keys}
    assert max(Counter(before.values()).values()) < 2000 * 0.3  # spread over the pool
    survivors = [e for e in eps if e.id != "e2"]
    after = {k: bounded_choice(k, survivors, 1.25)[0].id for k in keys}
    moved = {k for k in keys if before[k] != after[k]}
    assert moved == {k for k in keys if before[k] == "e2"}
    assert all(after[k] == ranked(k, eps)[1].id for k in moved)  # each to its next choice


def test_bounded_load_spills_to_the_next_choice():
    p, eps, rng = SessionAffinity(), endpoints(3), random.Random(10)
    p.configure(RoutingSettings(session_affinity=SessionAffinitySettings(load_factor=1.25)))
    request = RequestInfo("m", CHAT, headers={"X-Session-Id": "hot"})
    home = p.select(eps, request, rng)
    assert all(p.select(eps, request, rng) is home for _ in range(5))
    home.inflight = 10  # average with this request (11/3) x 1.25 -> capacity 5
    spilled = p.select(eps, request, rng)
    assert spilled is ranked("hot", eps)[1] and p.decisions["spilled"] == 1
    eps[0].inflight = eps[1].inflight = eps[2].inflight = 0
    eps[0].inflight = 1
    assert p.select(eps, RequestInfo("m", CHAT), rng) in (eps[1], eps[2])  # no key: least loaded
    assert p.decisions["no_key"] == 1


def test_weights_shift_sessions_proportionally():
    eps = endpoints(2)
    eps[0] = attrs.evolve(eps[0], weight=3.0)
    counts = Counter(ranked(f"k{i}", eps)[0].id for i in range(4000))
    assert 2700 < counts["e0"] < 3300


def test_new_prefixes_spread_evenly_over_a_quiet_pool():
    # Sequential requests (every load 0): new tenants alternate by index size, not at random,
    # so the pool's cache capacity is shared evenly.
    p, eps, rng = policy(), endpoints(2), random.Random(11)
    homes = [p.select(eps, chat(f"Tenant {t} handbook. " * 80, "q"), rng).id for t in range(6)]
    assert Counter(homes) == {"e0": 3, "e1": 3}


def test_a_burst_for_one_prefix_spreads_once_its_home_is_busy_with_prefills():
    # Recent dispatches still in flight count as prefills: a burst of one tenant's requests
    # fills its home up to the gate, then replicates the prefix on the other endpoint.
    clock = Clock()
    p, eps, rng = policy(clock, prefill_weight=2.0, balance_abs=8), endpoints(2), random.Random(12)
    homes = []
    for i in range(12):  # past the gate (8 requests and 1.5x)
        ep = p.select(eps, chat(TENANT_A, f"burst {i}"), rng)
        ep.inflight += 1  # as the proxy does at dispatch
        homes.append(ep.id)
    assert len(set(homes)) == 2 and p.decisions["imbalance"] >= 1
    assert homes[:9] == [homes[0]] * 9  # affinity holds up to the gate


def test_rendering_is_bounded_for_hostile_bodies():
    many_empty = {"messages": [{}] * 200_000}
    assert len(prompt_of(many_empty, 1000)) <= 1000
    many_parts = {"messages": [{"role": "user", "content": [{"type": "text", "text": "ab"}] * 200_000}]}
    assert len(prompt_of(many_parts, 1000)) == 1000


def test_depth_search_agrees_with_a_linear_walk():
    # depth() binary-searches the chain; check it against the plain walk on random traffic of
    # prompts sharing prefixes, with eviction (a small bound) and expiry.
    rng = random.Random(13)
    bases = ["".join(rng.choice("abc") for _ in range(64 * rng.randint(1, 6))) for _ in range(5)]
    prompts = [b + "".join(rng.choice("abc") for _ in range(64 * rng.randint(0, 6))) for b in bases for _ in range(6)]
    index, now = PrefixIndex(max_blocks=40, ttl_s=5), 0.0

    def linear(hashes):
        gens, n = index._lru.get("e"), 0
        for h in hashes:
            seen = gens.current.get(h) if gens else None
            seen = gens.previous.get(h) if gens and seen is None else seen
            if seen is None or seen < now - index.ttl_s:
                break
            n += 1
        return n

    for _ in range(3000):
        now += rng.random()
        if rng.random() < 0.6:
            index.learn("e", block_hashes(rng.choice(prompts), 64), now)
        if rng.random() < 0.1:
            index.expire(now)
        probe = block_hashes(rng.choice(prompts), 64)
        assert index.depth("e", probe, now) == linear(probe)


def _new_prefixes_under_skewed_load(spread: bool) -> Counter:
    """12 new prefixes, each arriving while e0 carries one request fewer than e1 (the
    closed-loop skew of issue 17's long-prefix run, where 8 of 12 prefixes went to one
    replica), with the gate wide open; then 4 more requests of each prefix at equal load."""
    p, eps, rng = policy(spread_new_prefixes=spread, balance_abs=32), endpoints(2), random.Random(21)
    prompt = lambda k, q: chat(f"Prefix {k}. " + "long handbook text " * 80, q)  # noqa: E731
    homes: dict[int, str] = {}
    for k in range(12):
        eps[0].inflight, eps[1].inflight = 3, 4
        homes[k] = p.select(eps, prompt(k, "q"), rng).id
    for k in range(12):
        for turn in range(4):
            eps[0].inflight = eps[1].inflight = 0
            assert p.select(eps, prompt(k, f"t{turn}"), rng).id == homes[k]
    return Counter(homes.values())


def test_new_prefixes_follow_the_load_unless_spread_by_index_size():
    # Load-based placement (spread_new_prefixes off) follows the skew: all 12 on e0. With
    # spread_new_prefixes they split by cache content, 6/6, and affinity keeps each one home.
    assert _new_prefixes_under_skewed_load(spread=False) == {"e0": 12}
    assert _new_prefixes_under_skewed_load(spread=True) == {"e0": 6, "e1": 6}


def test_spread_new_prefixes_never_passes_the_gate():
    clock = Clock()
    for spread, within, past in ((True, "e1", "e0"), (False, "e0", "e0")):
        p, eps, rng = policy(clock, spread_new_prefixes=spread, balance_abs=8), endpoints(2), random.Random(5)
        for k in range(4):  # e0's index holds 4 prefixes, e1's none
            p.index.learn("e0", block_hashes(prompt_of(chat(f"Warm {k}. " + "text " * 300, "q").body, 10**6), 256), clock())
        # within the gate (8 requests and 1.5x): the smaller index takes a new prefix, though busier
        eps[0].inflight, eps[1].inflight = 0, 5
        assert p.select(eps, chat("Brand new prefix. " + "words " * 300, "q"), rng).id == within
        # past the gate: the least loaded, whatever its index
        eps[0].inflight, eps[1].inflight = 0, 20
        assert p.select(eps, chat("Another new prefix. " + "words " * 300, "q"), rng).id == past
        assert p.decisions["miss"] == 2
