"""The registry's pure core with a fake clock: routability, expiry, probes, replacement."""

import pytest

from ichat.config import RegistrySettings
from ichat.errors import InvalidRequest
from ichat.gateway.registry import WorkerRegistry, external_load
from ichat.protocol import parse_heartbeat

SETTINGS = RegistrySettings(missed_heartbeats=3, evict_after_s=60, probe_failures=2)


def beat(state="ready", instance="i1", interval=2.0, **extra):
    body = {
        "worker_id": "w1", "instance_id": instance, "model_name": "m", "backend": "vllm",
        "host": "127.0.0.1", "port": 8001, "state": state, "heartbeat_interval": interval,
        "load": {"running": 2, "waiting": 1},
    }  # fmt: skip
    body.update(extra)
    return parse_heartbeat(body)


def test_first_beat_registers_and_ready_is_routable():
    reg = WorkerRegistry(SETTINGS)
    up = reg.upsert(beat(), now=100.0)
    assert up.event == "registered"
    assert reg.is_routable(up.record, 100.0)
    assert up.record.reported_load() == 3
    assert up.record.api_base == "http://127.0.0.1:8001/v1"


def test_loading_and_draining_are_not_routable():
    reg = WorkerRegistry(SETTINGS)
    record = reg.upsert(beat("loading"), 0.0).record
    assert not reg.is_routable(record, 0.0) and reg.status(record, 0.0) == "loading"
    reg.upsert(beat("draining"), 1.0)
    assert not reg.is_routable(record, 1.0) and reg.status(record, 1.0) == "draining"


def test_unhealthy_after_three_missed_intervals_of_its_own_interval():
    reg = WorkerRegistry(SETTINGS)
    record = reg.upsert(beat(interval=2.0), 0.0).record
    assert reg.is_routable(record, 6.0)  # exactly 3 intervals: still in
    assert not reg.is_routable(record, 6.01)
    assert reg.status(record, 6.01) == "unhealthy"
    reg.upsert(beat(interval=2.0), 7.0)  # a beat brings it back
    assert reg.is_routable(record, 7.0)


def test_eviction_after_grace():
    reg = WorkerRegistry(SETTINGS)
    reg.upsert(beat(), 0.0)
    assert reg.expired(60.0) == []
    assert [r.worker_id for r in reg.expired(60.5)] == ["w1"]


def test_failed_probes_take_out_of_rotation_and_success_restores():
    reg = WorkerRegistry(SETTINGS)
    record = reg.upsert(beat(), 0.0).record
    reg.record_probe("w1", ok=False)
    assert reg.is_routable(record, 0.1)  # one failure is tolerated
    reg.record_probe("w1", ok=False)
    assert not reg.is_routable(record, 0.1) and reg.status(record, 0.1) == "unhealthy"
    reg.record_probe("w1", ok=True)
    assert reg.is_routable(record, 0.1)


def test_new_instance_replaces_cleanly():
    reg = WorkerRegistry(SETTINGS)
    first = reg.upsert(beat(instance="a"), 0.0).record
    reg.record_probe("w1", False)
    reg.record_probe("w1", False)
    up = reg.upsert(beat("loading", instance="b"), 5.0)
    assert up.event == "replaced"
    assert up.record is not first and up.record.probe_failures == 0
    assert up.record.first_seen == 0.0
    assert len(reg) == 1


def test_managed_ids_are_tagged():
    reg = WorkerRegistry(SETTINGS, managed_ids=frozenset({"w1"}))
    assert reg.upsert(beat(), 0.0).record.source == "managed"


@pytest.mark.parametrize(
    ("patch", "param"),
    [
        ({"state": "dancing"}, "state"),
        ({"port": 0}, "port"),
        ({"port": "80"}, "port"),
        ({"heartbeat_interval": -1}, "heartbeat_interval"),
        ({"worker_id": ""}, "worker_id"),
        ({"model_name": None}, "model_name"),
    ],
)
def test_bad_heartbeats_name_the_field(patch, param):
    body = {
        "worker_id": "w1", "instance_id": "i", "model_name": "m", "host": "h", "port": 1,
        "state": "ready", "heartbeat_interval": 1,
    }  # fmt: skip
    body.update(patch)
    with pytest.raises(InvalidRequest) as info:
        parse_heartbeat(body)
    assert info.value.param == param


def test_external_load_leaves_out_our_own_requests():
    assert external_load(reported=3, inflight_here=2) == 1
    assert external_load(reported=1, inflight_here=4) == 0  # our requests finished since the beat
    assert external_load(reported=5, inflight_here=0) == 5
