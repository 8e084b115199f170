"""The routing core, without sockets: policies, the table and its circuit breaker."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from ichat.errors import ConfigError
from ichat.routing import Endpoint, RequestInfo, RoutingTable, available_policies, load_policy
from ichat.routing.least_inflight import LeastInflight
from ichat.routing.round_robin import RoundRobin

REQUEST = RequestInfo("m", "/v1/chat/completions", 10)


def endpoints(n: int, model: str = "m", **kwargs) -> list[Endpoint]:
    return [Endpoint(id=f"e{i}", model_name=model, api_base=f"http://h{i}:8000/v1", **kwargs) for i in range(n)]


def picks(policy, candidates, n, seed=0) -> list[str]:
    rng = random.Random(seed)
    return [policy.select(candidates, REQUEST, rng).id for _ in range(n)]


# -- policies ---------------------------------------------------------------------------------


def test_policies_are_registered_by_name():
    assert {"round_robin", "least_inflight"} <= set(available_policies())
    assert isinstance(load_policy("round_robin"), RoundRobin)
    assert isinstance(load_policy("least_inflight"), LeastInflight)
    with pytest.raises(ConfigError, match=r"'nope'.*least_inflight, round_robin"):
        load_policy("nope")


def test_round_robin_rotates_exactly():
    eps = endpoints(3)
    assert picks(RoundRobin(), eps, 9) == ["e0", "e1", "e2"] * 3


def test_round_robin_honours_weights_smoothly():
    eps = endpoints(2)
    eps[0].weight = 3.0
    got = picks(RoundRobin(), eps, 8)
    assert Counter(got) == {"e0": 6, "e1": 2}
    assert got[:4].count("e1") == 1  # spread out, not bunched


def test_round_robin_copes_with_a_changing_pool():
    policy, eps = RoundRobin(), endpoints(3)
    picks(policy, eps, 4)
    assert Counter(picks(policy, eps[1:], 10)) == {"e1": 5, "e2": 5}
    for i in range(100):  # churn: departed ids must not pile up
        policy.select([Endpoint(id=f"w{i}", model_name="m", api_base="http://x/v1")], REQUEST, random.Random(0))
    assert len(policy._score) < 20


class SteppingClock:
    """Each reading one second later: requests spaced wider than the prefill window."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        self.now += 1.0
        return self.now


def spaced() -> LeastInflight:
    return LeastInflight(clock=SteppingClock())


def test_least_inflight_prefers_the_idle_endpoint():
    eps = endpoints(3)
    eps[0].inflight, eps[1].inflight, eps[2].inflight = 2, 0, 1
    assert set(picks(spaced(), eps, 20)) == {"e1"}
    eps[1].reported_load = 5  # what the worker says counts too
    assert set(picks(spaced(), eps, 20)) == {"e2"}


def test_least_inflight_breaks_ties_at_random_but_reproducibly():
    eps = endpoints(3)
    eps[2].inflight = 1
    got = picks(LeastInflight(), eps, 1000, seed=7)
    counts = Counter(got)
    assert set(counts) == {"e0", "e1"} and 400 < counts["e0"] < 600
    assert got == picks(LeastInflight(), eps, 1000, seed=7)
    assert got != picks(LeastInflight(), eps, 1000, seed=8)


def test_least_inflight_divides_load_by_weight():
    eps = endpoints(2)
    eps[0].weight, eps[0].inflight, eps[1].inflight = 4.0, 3, 1
    assert picks(spaced(), eps, 5) == ["e0"] * 5


class StillClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def dispatch(policy, eps, n, rng) -> list[str]:
    """n requests arriving at once; the proxy counts each in flight as soon as it is picked."""
    got = []
    for _ in range(n):
        ep = policy.select(eps, REQUEST, rng)
        ep.inflight += 1
        got.append(ep.id)
    return got


def test_least_inflight_splits_a_burst_of_replacements():
    # Issue 17: under a closed loop, a group of requests admitted together finishes together on
    # one endpoint (here e0: 8 of its 16 just ended). Plain in-flight counting sent all 8
    # replacements back to e0, so 8 prefills queued on e0 while e1 only decoded; recent
    # dispatches still in flight now count as prefills and the group is shared out.
    clock, rng = StillClock(), random.Random(3)
    policy, eps = LeastInflight(clock=clock), endpoints(2)
    eps[0].inflight, eps[1].inflight = 8, 16
    got = Counter(dispatch(policy, eps, 8, rng))
    assert 3 <= got["e1"] <= 5, got  # plain least-in-flight: {"e0": 8}

    clock.now += 1.0  # past the window: prefills done, those requests decode like the rest
    eps[0].inflight, eps[1].inflight = 9, 15
    assert dispatch(policy, eps, 3, rng) == ["e0", "e0", "e0"]


def test_least_inflight_without_the_prefill_weight_is_plain_counting():
    from ichat.config import LeastInflightSettings, RoutingSettings

    policy, eps, rng = LeastInflight(clock=StillClock()), endpoints(2), random.Random(4)
    policy.configure(RoutingSettings(least_inflight=LeastInflightSettings(prefill_weight=0)))
    eps[0].inflight, eps[1].inflight = 8, 16
    assert dispatch(policy, eps, 8, rng) == ["e0"] * 8


# -- endpoint ---------------------------------------------------------------------------------


def test_endpoint_urls_and_authorization():
    ep = Endpoint(id="x", model_name="m", api_base="http://10.0.0.5:8000/v1/", api_key="sk")
    assert str(ep.url("/v1/chat/completions")) == "http://10.0.0.5:8000/v1/chat/completions"
    assert ep.url("/v1/chat/completions") is ep.url("/v1/chat/completions")  # built once
    assert str(ep.url("/v1/audio/a%20b", "x=1")) == "http://10.0.0.5:8000/v1/audio/a%20b?x=1"
    assert ep.authorization == "Bearer sk"
    assert Endpoint(id="y", model_name="m", api_base="http://h/v1").authorization is None


# -- table ------------------------------------------------------------------------------------


def test_membership():
    table = RoutingTable()
    a, b = endpoints(2)
    c = Endpoint(id="c", model_name="other", api_base="http://c/v1")
    for ep in (a, b, c):
        table.upsert(ep)
    assert table.models() == ["m", "other"] and table.has_model("m") and not table.has_model("zz")
    assert table.get("e1") is b and list(table.endpoints("m")) == [a, b]

    assert table.remove("c") is c and table.models() == ["m"] and table.remove("c") is None
    assert table.candidates("other", 0) == []


def test_upsert_updates_in_place_and_keeps_live_state():
    table = RoutingTable()
    stored = table.upsert(Endpoint(id="w1", model_name="m", api_base="http://a/v1"))
    stored.inflight, stored.failures = 3, 1

    again = table.upsert(Endpoint(id="w1", model_name="m", api_base="http://b/v1", api_key="k", reported_load=4, routable=False))

    assert again is stored
    assert (stored.api_base, stored.authorization, stored.reported_load, stored.routable) == ("http://b/v1", "Bearer k", 4, False)
    assert (stored.inflight, stored.failures) == (3, 1)
    assert str(stored.url("/v1/x")) == "http://b/v1/x"  # cached URLs follow the new base

    table.upsert(Endpoint(id="w1", model_name="n", api_base="http://b/v1"))  # renamed model
    assert table.models() == ["n"] and list(table.endpoints("n")) == [stored]


def test_candidates_skip_unroutable_endpoints():
    table = RoutingTable()
    a, b = endpoints(2)
    table.upsert(a)
    table.upsert(b)
    b.routable = False
    assert table.candidates("m", 0) == [a]


def test_circuit_breaker_ejects_and_probes_back():
    table = RoutingTable(failures_to_eject=3, cooldown_s=10)
    a, b = endpoints(2)
    table.upsert(a)
    table.upsert(b)

    assert not table.record_failure(a, now=100) and not table.record_failure(a, now=101)
    assert table.candidates("m", 101) == [a, b]  # two failures: still in
    assert table.record_failure(a, now=102)  # third: out for the cool-down
    assert table.candidates("m", 111.9) == [b]
    assert table.retry_after("m", 110.5) == 2

    assert table.candidates("m", 112) == [a, b]  # half-open: offered again
    a.inflight = 1
    assert table.candidates("m", 112) == [b]  # ... to one probe at a time
    a.inflight = 0

    assert table.record_failure(a, now=112)  # the probe failed: out again at once
    assert table.candidates("m", 121) == [b]
    table.record_success(a)  # a probe succeeded: closed
    assert a.failures == 0 and table.candidates("m", 121) == [a, b]


def test_success_resets_the_failure_count():
    table = RoutingTable(failures_to_eject=2)
    [a] = endpoints(1)
    table.upsert(a)
    table.record_failure(a, 0)
    table.record_success(a)
    assert not table.record_failure(a, 0)


def test_policy_per_model_and_one_instance_per_pool():
    table = RoutingTable("least_inflight", {"rr": "round_robin"})
    assert isinstance(table.policy_for("rr"), RoundRobin)
    assert isinstance(table.policy_for("m"), LeastInflight)
    assert table.policy_for("rr") is table.policy_for("rr")


def test_unknown_policy_fails_when_the_table_is_built():
    with pytest.raises(ConfigError, match="registered policies"):
        RoutingTable("nope")
