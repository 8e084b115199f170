"""The wire protocol: one Heartbeat both sides agree on, bounded, tolerant of new fields."""

from __future__ import annotations

import pytest

from ichat.errors import InvalidRequest
from ichat.protocol import Heartbeat, child_proof, parse_heartbeat, plain_host, unstructure

BEAT = {
    "worker_id": "w1", "instance_id": "i1", "model_name": "Qwen/Qwen2-7B", "host": "10.0.0.5", "port": 8001,
    "state": "ready", "heartbeat_interval": 3,
}  # fmt: skip


def test_round_trip_through_the_wire():
    beat = Heartbeat(**{**BEAT, "heartbeat_interval": 3.0}, engine_args=("--x",), gpus=({"index": 0},), load={"running": 1})
    assert parse_heartbeat(unstructure(beat)) == beat


def test_unknown_fields_are_ignored_so_workers_can_add_some():
    assert parse_heartbeat({**BEAT, "accelerators": ["tpu"], "kv_cache": {"blocks": 3}}) == parse_heartbeat(BEAT)


def test_null_optional_fields_mean_their_default():
    assert parse_heartbeat({**BEAT, "pid": None, "gpus": None}).gpus == ()


@pytest.mark.parametrize(
    ("patch", "param"),
    [({"port": 0}, "port"), ({"port": "1"}, "port"), ({"state": "asleep"}, "state"), ({"worker_id": "a/b"}, "worker_id"),
     ({"instance_id": "x" * 200}, "instance_id"), ({"gpus": [{"k": "v"}] * 65}, "gpus"), ({"load": {"waiting": 1.5}}, "load"),
     ({"engine_args": ["a"] * 600}, "engine_args"), ({"model_name": "a\nb"}, "model_name"), ({"pid": -3}, "pid"),
     ({"log_streaming": "yes"}, "log_streaming"), ({"heartbeat_interval": True}, "heartbeat_interval")],
)  # fmt: skip
def test_every_field_is_checked_and_named(patch, param):
    with pytest.raises(InvalidRequest) as info:
        parse_heartbeat({**BEAT, **patch})
    assert info.value.param == param


@pytest.mark.parametrize(
    ("host", "ok"),
    [("10.0.0.5", True), ("::1", True), ("fe80::1", True), ("gpu-7.cluster.local", True), ("localhost", True),
     ("a.b.", True), ("", False), ("h:80", False), ("user@h", False), ("h/x", False), ("[::1]", False), ("-h", False),
     ("h..x", False), ("1.2.3", False), ("h x", False), ("x" * 254, False)],
)  # fmt: skip
def test_plain_host(host, ok):
    assert plain_host(host) is ok


def test_a_proof_binds_secret_challenge_pid_and_port():
    proof = child_proof("s", "c", 10, 8001)
    assert proof == child_proof("s", "c", 10, 8001)
    assert len({proof, child_proof("t", "c", 10, 8001), child_proof("s", "d", 10, 8001),
                child_proof("s", "c", 11, 8001), child_proof("s", "c", 10, 8002)}) == 5  # fmt: skip


def test_kinds_are_optional_bounded_and_sorted():
    assert parse_heartbeat(BEAT).kinds == ()
    assert parse_heartbeat({**BEAT, "kinds": ["score", "rerank", "score"]}).kinds == ("rerank", "score")
    for bad in ("chat", [1], ["x" * 65], [f"k{i}" for i in range(33)]):
        with pytest.raises(InvalidRequest) as info:
            parse_heartbeat({**BEAT, "kinds": bad})
        assert info.value.param == "kinds", bad
