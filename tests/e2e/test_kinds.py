"""Other model kinds end to end: a real gateway, real workers on real models, real HTTP.

- Rerank and score on all-MiniLM-L6-v2 (the session's shared MiniLM engine, behind the gateway
  as a static route): order and values checked against cosine similarity of mean-pooled
  embeddings computed here, independently, with transformers on the same model directory.
- Speech to text on whisper tiny.en (converted by ``make models`` from a CTranslate2 model): a
  WAV synthesized offline by espeak-ng, transcribed through the gateway with the OpenAI SDK's
  ``client.audio.transcriptions.create``. The worker registers itself with heartbeats, so the
  gateway's model list and its 404 show the kinds it reports.

Two engines serve the whole module (MiniLM shared with the rest of the session, Whisper here).
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import httpx
import openai
import pytest

from tests.gateway_proc import GatewayProc
from tests.procs import WorkerProc, minilm_path, models_dir, wait_until

QUERY = "A cat sits on the mat"
DOCUMENTS = [
    "Stock markets fell sharply today",
    "A kitten rests on a rug",
    "The weather is sunny and warm",
    "A cat is sleeping on a carpet",
]
#: what espeak-ng says, and the words a correct transcription must contain
SPEECH = "Hello world. This is a test of speech recognition."
SPEECH_WORDS = ("hello", "world", "test", "speech", "recognition")
ENGINE_START_S = 300


def whisper_path() -> str:
    path = models_dir() / "whisper-tiny-en"
    assert (path / "config.json").is_file(), f"{path} missing: run `make models`"
    return str(path)


def reference_cosines(query: str, documents: list[str]) -> list[float]:
    """cosine(query, document) as sentence-transformers computes it for this model: mean
    pooling over the attention mask, then normalization (the model's modules.json), here with
    plain transformers and torch, independent of vLLM."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    model = AutoModel.from_pretrained(minilm_path()).eval()
    batch = tokenizer([query, *documents], padding=True, truncation=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
    pooled = torch.nn.functional.normalize(pooled, dim=-1)
    return (pooled[1:] @ pooled[0]).tolist()


@pytest.fixture(scope="module")
def gateway(e2e_tmp, minilm_worker):
    proc = GatewayProc(
        e2e_tmp,
        {"routes": [{"model_name": "minilm", "api_base": minilm_worker.base_url + "/v1"}]},
        name="gateway-kinds",
    )
    try:
        proc.wait_up()
        yield proc
    finally:
        proc.stop()


@pytest.fixture(scope="module")
def whisper_worker(e2e_tmp, gateway):
    proc = WorkerProc(
        e2e_tmp, whisper_path(), "whisper",
        "--gateway-address", gateway.base_url, "--heartbeat-interval", "1", "--worker-id", "whisper-1",
    )  # fmt: skip
    try:
        proc.wait_ready(ENGINE_START_S)
        gateway.wait_routable("whisper", 1, 10)
        yield proc
    finally:
        proc.stop()


@pytest.fixture(scope="module")
def speech_wav(e2e_tmp) -> Path:
    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng is not installed (scripts/setup_system.sh installs it): no speech to transcribe")
    path = e2e_tmp / "speech.wav"
    subprocess.run(["espeak-ng", "-v", "en-us", "-s", "130", "-w", str(path), SPEECH], check=True, timeout=60)
    return path


def sdk(gateway: GatewayProc) -> openai.OpenAI:
    return openai.OpenAI(base_url=gateway.base_url + "/v1", api_key="unused", timeout=120, max_retries=0)


# -- rerank and score on MiniLM ------------------------------------------------------------------


def test_rerank_through_the_gateway_matches_reference_cosines(gateway):
    expected = reference_cosines(QUERY, DOCUMENTS)
    resp = httpx.post(
        gateway.base_url + "/v1/rerank",
        json={"model": "minilm", "query": QUERY, "documents": DOCUMENTS},
        timeout=60,
    )
    assert resp.status_code == 200, resp.text
    results = resp.json()["results"]
    assert [r["index"] for r in results] == sorted(range(len(DOCUMENTS)), key=lambda i: -expected[i])
    for r in results:
        assert r["relevance_score"] == pytest.approx(expected[r["index"]], abs=2e-3)
        assert r["document"]["text"] == DOCUMENTS[r["index"]]
    # the two cat sentences first, far above the unrelated ones
    assert {results[0]["index"], results[1]["index"]} == {1, 3}
    assert results[1]["relevance_score"] > results[2]["relevance_score"] + 0.2

    top = httpx.post(
        gateway.base_url + "/v1/rerank",
        json={"model": "minilm", "query": QUERY, "documents": DOCUMENTS, "top_n": 2},
        timeout=60,
    ).json()["results"]
    assert [r["index"] for r in top] == [r["index"] for r in results[:2]]


def test_score_through_the_gateway_matches_reference_cosines(gateway):
    expected = reference_cosines(QUERY, DOCUMENTS)
    resp = httpx.post(
        gateway.base_url + "/v1/score",
        json={"model": "minilm", "text_1": QUERY, "text_2": DOCUMENTS},
        timeout=60,
    )
    assert resp.status_code == 200, resp.text
    data = sorted(resp.json()["data"], key=lambda d: d["index"])
    assert [d["score"] for d in data] == pytest.approx(expected, abs=2e-3)


def test_minilm_reports_its_kinds_and_refuses_chat_naming_them(gateway, minilm_worker):
    card = httpx.get(minilm_worker.base_url + "/v1/models", timeout=10).json()["data"][0]
    assert card["kinds"] == ["embeddings", "rerank", "score"]
    with pytest.raises(openai.NotFoundError) as err:
        sdk(gateway).chat.completions.create(model="minilm", messages=[{"role": "user", "content": "hi"}])
    message = err.value.body["message"]
    assert "/v1/embeddings, /v1/rerank, /v1/score" in message


def test_bad_rerank_request_is_a_400(gateway):
    resp = httpx.post(gateway.base_url + "/v1/rerank", json={"model": "minilm", "query": QUERY}, timeout=60)
    assert resp.status_code == 400 and resp.json()["error"]["message"]


# -- speech to text on whisper tiny.en ----------------------------------------------------------


def test_transcription_through_the_gateway_finds_the_spoken_words(gateway, whisper_worker, speech_wav):
    client = sdk(gateway)
    with open(speech_wav, "rb") as audio:
        transcript = client.audio.transcriptions.create(model="whisper", file=audio)
    words = transcript.text.lower()
    missing = [w for w in SPEECH_WORDS if w not in words]
    assert not missing, f"transcript {transcript.text!r} lacks {missing}"


def test_streamed_transcription_carries_the_same_words(gateway, whisper_worker, speech_wav):
    # vLLM streams its own chunk shape (choices[].delta.content), so read the SSE here
    files = {"file": ("speech.wav", speech_wav.read_bytes(), "audio/wav")}
    pieces = []
    with httpx.stream(
        "POST", gateway.base_url + "/v1/audio/transcriptions", data={"model": "whisper", "stream": "true"}, files=files, timeout=120
    ) as resp:
        assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/event-stream")
        for line in resp.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                chunk = json.loads(line[len("data: ") :])
                pieces.extend(c["delta"].get("content") or "" for c in chunk["choices"])
    text = "".join(pieces).lower()
    missing = [w for w in SPEECH_WORDS if w not in text]
    assert not missing, f"streamed transcript {text!r} lacks {missing}"


def test_gateway_lists_whisper_kinds_and_names_them_in_its_404(gateway, whisper_worker):
    cards = {m["id"]: m for m in httpx.get(gateway.base_url + "/v1/models", timeout=10).json()["data"]}
    # English-only Whisper: transcription yes, translation (into English, from other languages) no
    assert cards["whisper"]["kinds"] == ["audio_transcriptions"]
    resp = httpx.post(gateway.base_url + "/v1/score", json={"model": "whispr", "text_1": "a", "text_2": "b"}, timeout=10)
    assert resp.status_code == 404
    assert "whisper (audio_transcriptions)" in resp.json()["error"]["message"]


def test_translation_and_bad_audio_are_openai_errors(gateway, whisper_worker):
    files = {"file": ("speech.wav", b"RIFF\x00\x00\x00\x00WAVEnot really audio", "audio/wav")}
    resp = httpx.post(gateway.base_url + "/v1/audio/translations", data={"model": "whisper"}, files=files, timeout=60)
    assert resp.status_code == 404 and "/v1/audio/transcriptions" in resp.json()["error"]["message"]
    resp = httpx.post(gateway.base_url + "/v1/audio/transcriptions", data={"model": "whisper"}, files=files, timeout=60)
    assert resp.status_code == 400 and resp.json()["error"]["message"]
    wait_until(lambda: httpx.get(whisper_worker.base_url + "/health", timeout=5).status_code == 200, 10, what="worker healthy")


def test_audio_over_vllms_file_size_limit_is_a_400(gateway, whisper_worker):
    # 26 MB: under the gateway's 32 MB body limit and the worker's 64 MB, over vLLM's 25 MB
    # VLLM_MAX_AUDIO_CLIP_FILESIZE_MB, which the worker applies as vLLM's own route does
    files = {"file": ("long.wav", b"\0" * (26 * 2**20), "audio/wav")}
    resp = httpx.post(gateway.base_url + "/v1/audio/transcriptions", data={"model": "whisper"}, files=files, timeout=60)
    assert resp.status_code == 400 and "file size" in resp.json()["error"]["message"]
