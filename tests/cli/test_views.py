"""ichat.cli.views: the pure part of the command (tables, engine flags)."""

from __future__ import annotations

import pytest

from ichat.cli.views import engine_flags, model_rows, status_text, worker_rows, workers_table


def test_engine_flags_follow_vllm_command_line_conventions():
    assert engine_flags(["--max-model-len", "2048", "--enforce-eager", "--dtype=bfloat16", "--seed", "-1"]) == {
        "max_model_len": "2048", "enforce_eager": True, "dtype": "bfloat16", "seed": "-1",
    }  # fmt: skip
    assert engine_flags(["--lora-modules", "a=/x", "--lora-modules", "b=/y", "--no-enable-prefix-caching"]) == {
        "lora_modules": ["a=/x", "b=/y"], "no_enable_prefix_caching": True,
    }  # fmt: skip
    assert engine_flags([]) == {}
    with pytest.raises(ValueError, match="expected an engine flag"):
        engine_flags(["2048"])


def test_worker_rows():
    registered = {
        "worker_id": "w1", "state": "ready", "model_name": "m", "backend": "vllm", "address": "http://h:1",
        "gpus": [{"index": 0}, {"index": 3}], "load": {"running": 2, "waiting": 5}, "heartbeat_age_s": 75.0, "restarts": 0,
    }  # fmt: skip
    managed = {
        "worker_id": "w2", "state": "unhealthy", "managed_state": "backing_off", "model_name": "m", "backend": "stub",
        "address": "http://h:2", "gpus": [], "gpu_ids": [1], "heartbeat_age_s": None, "restarts": 2,
    }  # fmt: skip
    assert worker_rows([registered, managed]) == [
        ["w1", "ready", "m", "vllm", "http://h:1", "0,3", "2 run / 5 wait", "1m ago", "0"],
        ["w2", "unhealthy (backing_off)", "m", "stub", "http://h:2", "1", "-", "-", "2"],
    ]
    lines = workers_table([registered]).splitlines()
    assert lines[0].startswith("WORKER  STATE  MODEL") and lines[1].startswith("w1      ready  m")
    assert workers_table([]) == "no workers"


def test_model_rows_name_the_workers_or_a_static_route():
    status = {"models": {"b": {"replicas": 1, "routable": 0}, "a": {"replicas": 2, "routable": 2}}}
    views = [{"worker_id": "w1", "model_name": "a"}, {"worker_id": "w2", "model_name": "a"}]
    assert model_rows(status, views) == [["a", "2", "2", "w1,w2"], ["b", "1", "0", "(static route)"]]


def test_status_text_names_the_gpus_given_to_managed_workers():
    status = {
        "gateway": {"uptime_s": 3725.0, "reloads": 2}, "workers": {"total": 1, "by_state": {"ready": 1}},
        "models": {}, "gpu_ids_in_use": {"managed-m-8001": [0, 1]},
    }  # fmt: skip
    lines = status_text(status, [], "http://gw:4000").splitlines()
    assert lines[:3] == [
        "gateway  http://gw:4000  up 1h02m, 2 reload(s)",
        "workers  1: 1 ready",
        "gpus     managed-m-8001: 0,1",
    ]
