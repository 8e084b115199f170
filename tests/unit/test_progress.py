"""Start-up progress lines (ichat.gateway.progress): pure parts."""

from __future__ import annotations

from ichat.gateway.progress import StartupReport, loading_step, ready_block


def test_loading_steps_are_picked_and_shortened():
    vllm = "(EngineCore pid=4242) INFO 12-01 04:40:00 [default_loader.py:502] Loading weights took 0.35 seconds"
    assert loading_step(vllm) == "Loading weights took 0.35 seconds"
    ours = "2026-12-01 04:46:03,982 INFO ichat.worker: iChat worker ready: model smollm2 at http://127.0.0.1:8001/v1"
    assert loading_step(ours) == "iChat worker ready: model smollm2 at http://127.0.0.1:8001/v1"
    assert loading_step("INFO 12-01 04:40:01 [core.py:99] init engine (profile, create kv cache, warmup model) took 4.20 s")
    assert loading_step("(EngineCore pid=1) INFO 12-01 04:40:00 [x.py:1] CPU KV cache size: 19,200 tokens") == "CPU KV cache size: 19,200 tokens"
    assert loading_step("stub engine line 7") is None
    assert loading_step("INFO 12-01 04:40:00 [x.py:1] Chunked prefill is enabled") is None
    assert len(loading_step("ERROR " + "x" * 500)) == 200


def snap(worker_id: str, state: str, **extra):
    return {"worker_id": worker_id, "managed_state": state, **extra}


def test_state_changes_are_one_line_each_and_ready_comes_once():
    report = StartupReport(["a", "b"])
    assert report.states_seen([snap("a", "starting", pid=10), snap("b", "starting")], 0.1) == ["a: starting (pid 10)", "b: starting"]
    assert report.states_seen([snap("a", "starting", pid=10), snap("b", "starting")], 0.2) == []
    assert report.engine_line("a", "INFO 12-01 04:40:00 [x.py:1] Loading weights took 1.00 seconds") == "a: Loading weights took 1.00 seconds"
    bar = "Loading safetensors checkpoint shards: 100% Completed | 1/1 [00:00<00:00,  5.75it/s]"
    assert report.engine_line("a", bar) == "a: " + bar
    assert report.engine_line("a", bar.replace("5.75", "5.72")) is None  # printed twice by the engine, shown once
    assert report.states_seen([snap("a", "ready"), snap("b", "crashed", message="exited: 1")], 30.0) == ["a: ready (after 30.0s)", "b: crashed (exited: 1)"]
    assert report.engine_line("a", "INFO 12-01 04:40:00 [x.py:1] Loading weights took 1.00 seconds") is None  # a is up
    assert not report.finished()
    report.states_seen([snap("b", "failed", message="crash loop")], 40.0)
    assert report.finished() and not report.finished()


def test_no_managed_workers_is_finished_at_once_without_a_block():
    report = StartupReport([])
    assert report.done and not report.finished()


def test_ready_block_has_a_curl_line_and_an_sdk_example():
    lines = ready_block("http://127.0.0.1:4000", ["smollm2"], api_key_needed=False)
    assert lines[0].startswith("ready: smollm2 at http://127.0.0.1:4000/v1")
    text = "\n".join(lines)
    assert "curl http://127.0.0.1:4000/v1/chat/completions" in text and '"model": "smollm2"' in text
    assert 'OpenAI(base_url="http://127.0.0.1:4000/v1", api_key="unused")' in text
    keyed = "\n".join(ready_block("http://h:1", ["m"], api_key_needed=True, failed=["w"]))
    assert "Bearer $ICHAT_API_KEY" in keyed and 'os.environ["ICHAT_API_KEY"]' in keyed and "not started: w" in keyed
    assert ready_block("http://h:1", [], api_key_needed=False) == ["gateway at http://h:1: no model is served yet (`ichat launch --help` starts one)"]
