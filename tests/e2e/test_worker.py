"""The worker on the real SmolLM2 model through an in-process vLLM engine, OpenAI SDK as client.

One engine serves this whole module; the last test drains and stops it with SIGTERM.
"""

from __future__ import annotations

import json
import math
import signal
import time

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.procs import WorkerProc, smollm2_path, wait_until

QUESTION = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]


@pytest.fixture(scope="module")
def worker(e2e_tmp):
    proc = WorkerProc(e2e_tmp, smollm2_path(), "smollm2", "--max-model-len", "2048")
    try:
        proc.wait_ready()
        yield proc
    finally:
        proc.stop()


@pytest.fixture(scope="module")
def client(worker):
    return openai.OpenAI(base_url=worker.base_url + "/v1", api_key="unused", timeout=60, max_retries=0)


def metric_samples(base_url: str) -> dict[tuple[str, tuple], float]:
    text = httpx.get(base_url + "/metrics", timeout=10).text
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def test_health_flipped_from_503_to_200_during_startup(worker):
    assert 503 in worker.health_seen, worker.health_seen
    assert worker.health_seen[-1] == 200
    first_ok = worker.health_seen.index(200)
    assert all(s == 503 for s in worker.health_seen[:first_ok])
    assert httpx.get(worker.base_url + "/health").json() == {"status": "ok"}


def test_greedy_chat_answers_paris(client):
    answer = client.chat.completions.create(model="smollm2", messages=QUESTION, temperature=0, max_tokens=20)
    assert "Paris" in answer.choices[0].message.content
    assert answer.usage.completion_tokens > 0


def test_streaming_matches_non_streaming_at_temperature_0(client):
    whole = client.chat.completions.create(model="smollm2", messages=QUESTION, temperature=0, max_tokens=24)
    stream = client.chat.completions.create(
        model="smollm2", messages=QUESTION, temperature=0, max_tokens=24, stream=True
    )
    pieces = [chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices]
    assert len(pieces) > 2
    assert "".join(pieces) == whole.choices[0].message.content


def test_completions_and_models(client):
    completion = client.completions.create(model="smollm2", prompt="The capital of France is", temperature=0, max_tokens=5)
    assert completion.choices[0].text.strip()
    models = client.models.list()
    assert [m.id for m in models.data] == ["smollm2"]


def test_embeddings_similar_pair_is_closer(minilm_worker):
    client = openai.OpenAI(base_url=minilm_worker.base_url + "/v1", api_key="unused", timeout=60, max_retries=0)
    texts = ["A cat sits on the mat", "A kitten rests on a rug", "Stock markets fell sharply"]
    vectors = [d.embedding for d in client.embeddings.create(model="minilm", input=texts).data]
    assert all(len(v) == 384 for v in vectors)

    def cosine(a, b):
        return sum(x * y for x, y in zip(a, b)) / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))

    assert cosine(vectors[0], vectors[1]) > cosine(vectors[0], vectors[2]) + 0.2


@pytest.mark.parametrize(
    ("body", "status", "needle"),
    [
        (b"{not json", 400, "not valid JSON"),
        (b"[1, 2]", 400, "JSON object"),
        (json.dumps({"model": "smollm2"}).encode(), 400, "messages"),
        (json.dumps({"model": "smollm2", "messages": "hello"}).encode(), 400, "messages"),
        (json.dumps({"model": "smollm2", "messages": QUESTION, "max_tokens": "many"}).encode(), 400, "max_tokens"),
        (json.dumps({"model": "no-such-model", "messages": QUESTION}).encode(), 404, "no-such-model"),
    ],
)
def test_bad_input_gets_openai_error_and_worker_stays_up(worker, body, status, needle):
    resp = httpx.post(worker.base_url + "/v1/chat/completions", content=body, timeout=30)
    assert resp.status_code == status
    error = resp.json()["error"]
    assert needle in error["message"]
    assert {"message", "type", "code"} <= error.keys()
    assert httpx.get(worker.base_url + "/health").status_code == 200


def test_unknown_route_is_openai_404(worker):
    resp = httpx.get(worker.base_url + "/v1/nope")
    assert resp.status_code == 404 and "error" in resp.json()


def test_metrics_parse_and_count_requests(worker, client):
    key = ("ichat_worker_requests_total", (("route", "completions"), ("status", "200")))
    before = metric_samples(worker.base_url).get(key, 0.0)
    for _ in range(3):
        client.completions.create(model="smollm2", prompt="Hello", max_tokens=2)
    samples = metric_samples(worker.base_url)
    assert samples[key] == before + 3
    assert any(name.startswith("vllm:") for name, _ in samples), "the engine's own metrics are exposed too"


def read_events(lines, count: int, deadline: float | None = None) -> list[dict]:
    """Read ``count`` log events from an iterator of SSE lines (keep-alives arrive every 15 s)."""
    events, current = [], {}
    for line in lines:
        if deadline is not None and time.monotonic() > deadline:
            return events
        if line.startswith("data: "):
            current["data"] = json.loads(line[6:])
        elif line.startswith("event: "):
            current["event"] = line[7:]
        elif line == "" and current:
            if current.get("event") == "log":
                events.append(current["data"])
            current = {}
            if len(events) >= count:
                return events
    return events


def test_logs_include_engine_subprocess_lines(worker):
    resp = httpx.get(worker.base_url + "/logs/stream", params={"tail": 100000, "follow": "false"}, timeout=30)
    lines = [json.loads(l[6:]) for l in resp.text.splitlines() if l.startswith("data: ")]
    assert any("(EngineCore" in l["line"] for l in lines), "lines printed by vLLM's EngineCore subprocess"
    assert any("iChat worker ready" in l["line"] for l in lines)
    ids = [l["id"] for l in lines]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)


def test_logs_backlog_then_live_lines_in_order(worker):
    with httpx.stream("GET", worker.base_url + "/logs/stream", params={"tail": 3}, timeout=60) as resp:
        lines = resp.iter_lines()
        backlog = read_events(lines, 3)
        for i in range(2):  # vLLM logs an error line for each request naming an unknown model
            httpx.post(worker.base_url + "/v1/chat/completions", json={"model": f"ghost-{i}", "messages": QUESTION}, timeout=30)
        live = []
        deadline = time.monotonic() + 30
        while not any("ghost-1" in event["line"] for event in live):
            assert time.monotonic() < deadline, f"no live line about ghost-1 in {live}"
            live += read_events(lines, 1, deadline)
    events = backlog + live
    ids = [event["id"] for event in events]
    assert ids == list(range(ids[0], ids[0] + len(ids))), "consecutive ids: nothing lost or repeated"
    ghost_lines = [e["line"] for e in live if "ghost-" in e["line"]]
    assert "ghost-0" in ghost_lines[0] and any("ghost-1" in l for l in ghost_lines)


def test_aborted_stream_leaves_no_running_request(worker):
    engine_gauge = ("ichat_worker_engine_unfinished_requests", ())
    inflight_gauge = ("ichat_worker_requests_inflight", (("route", "completions"),))
    body = {"model": "smollm2", "prompt": "Count: one, two,", "max_tokens": 1500, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", worker.base_url + "/v1/completions", json=body, timeout=60) as resp:
        chunks = resp.iter_lines()
        for _ in range(5):
            next(chunks)
        assert metric_samples(worker.base_url)[engine_gauge] == 1
    # the client closed the connection mid-stream: the engine drops the request and the
    # worker's handler ends (a handler left behind would count as in flight for ever)
    wait_until(lambda: metric_samples(worker.base_url)[engine_gauge] == 0, timeout=10, what="engine request aborted")
    wait_until(lambda: metric_samples(worker.base_url)[inflight_gauge] == 0, timeout=10, what="handler ended")
    assert httpx.get(worker.base_url + "/health").status_code == 200


def test_sigterm_drains_in_flight_request_then_exits_0(worker):
    """Last in this module: it stops the shared worker.

    The request streams, so it is in flight for certain when the signal is sent: its first token
    has arrived and 255 have not. (Polling a gauge for a short request raced a fast engine.)"""
    body = {
        "model": "smollm2", "prompt": "Once upon a time", "max_tokens": 256, "ignore_eos": True,
        "stream": True, "stream_options": {"include_usage": True},
    }  # fmt: skip
    with httpx.stream("POST", worker.base_url + "/v1/completions", json=body, timeout=120) as resp:
        assert resp.status_code == 200
        events = (line.removeprefix("data: ") for line in resp.iter_lines() if line.startswith("data: "))
        first = next(events)
        assert first != "[DONE]"
        worker.popen.send_signal(signal.SIGTERM)
        rest = list(events)
    assert rest[-1] == "[DONE]", "the stream ends properly, not cut by the shutdown"
    assert json.loads(rest[-2])["usage"]["completion_tokens"] == 256
    assert worker.popen.wait(60) == 0
