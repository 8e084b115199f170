"""Other model kinds end to end: a real gateway, real workers on real models, real HTTP.

- Rerank and score on all-MiniLM-L6-v2 (the session's shared MiniLM engine, behind the gateway
  as a static route): order and values checked against cosine similarity of mean-pooled
  embeddings computed here, independently, with transformers on the same model directory.
- Speech to text on whisper tiny.en (converted by ``make models`` from a CTranslate2 model): a
  WAV synthesized offline by espeak-ng, transcribed through the gateway with the OpenAI SDK's
  ``client.audio.transcriptions.create``. The worker registers itself with heartbeats, so the
  gateway's model list and its 404 show the kinds it reports.
- Image input on ``llava-smollm2-random-vision``, a PLUMBING model built by ``make models``:
  SmolLM2's real weights behind a random CLIP vision tower (112 px, patch 14: 64 image tokens).
  What it says about an image means nothing; what is checked is the path: PNG data URLs through
  the gateway to vLLM's image processor and encoder, the 64 placeholder tokens in the usage,
  OpenAI-shaped 400s for broken images, and a ~10 MB image relayed whole.

Three engines serve the whole module (MiniLM shared with the rest of the session, Whisper and
the vision plumbing model here).
"""

from __future__ import annotations

import base64
import io
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
#: the vision plumbing model (random vision weights), served under its directory's name
VISION = "llava-smollm2-random-vision"
#: (112 / 14)^2 patches, CLIP's CLS token dropped by the "default" feature selection
IMAGE_TOKENS = 64
IMAGE_QUESTION = "What shapes are in this image?"


def whisper_path() -> str:
    path = models_dir() / "whisper-tiny-en"
    assert (path / "config.json").is_file(), f"{path} missing: run `make models`"
    return str(path)


def vision_path() -> str:
    path = models_dir() / VISION
    assert (path / "processor_config.json").is_file(), f"{path} missing: run `make models`"
    return str(path)


def png_data_url(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode()


def shapes_png(variant: int = 0) -> bytes:
    """A small PNG drawn here: a few coloured shapes on white (``variant`` moves and recolours them)."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (200, 150), "white")
    draw = ImageDraw.Draw(image)
    colours = [("red", "blue", "green"), ("black", "yellow", "purple")][variant % 2]
    shift = 30 * variant
    draw.rectangle((15 + shift, 20, 75 + shift, 80), fill=colours[0])
    draw.ellipse((100, 30 + shift // 2, 180, 110 + shift // 2), fill=colours[1])
    draw.polygon([(40, 140), (90, 90), (140, 140)], fill=colours[2])
    out = io.BytesIO()
    image.save(out, "PNG")
    return out.getvalue()


def noisy_png(min_bytes: int) -> bytes:
    """A PNG of random pixels (incompressible), at least ``min_bytes`` long."""
    import numpy as np
    from PIL import Image

    side = int((min_bytes / 3) ** 0.5) + 16
    pixels = np.random.default_rng(0).integers(0, 256, size=(side, side, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, "PNG", compress_level=1)
    assert out.tell() >= min_bytes
    return out.getvalue()


def image_chat(client: openai.OpenAI, *image_urls: str, **kwargs):
    content = [{"type": "image_url", "image_url": {"url": url}} for url in image_urls]
    content.append({"type": "text", "text": IMAGE_QUESTION})
    return client.chat.completions.create(
        model=VISION, messages=[{"role": "user", "content": content}], max_tokens=2, temperature=0, **kwargs
    )


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
        {
            "routes": [{"model_name": "minilm", "api_base": minilm_worker.base_url + "/v1"}],
            # the ~10 MB image data URL below must fit (32 is also the default; said here for that test)
            "routing": {"max_body_mb": 32},
        },
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
def vision_worker(e2e_tmp, gateway):
    # --model-impl transformers: vLLM's native llava module imports its pixtral module, which
    # imports transformers' Pixtral image processor, which needs torchvision; PyPI's torchvision
    # for this CPU torch is built against CUDA ("operator torchvision::nms does not exist"), so
    # setup_venv.sh uninstalls it and `import vllm.model_executor.models.llava` fails. The
    # Transformers modeling backend runs transformers' own Llava with the PIL image processor.
    # Should vLLM's native llava ever load without torchvision, prefer it (drop this flag).
    proc = WorkerProc(
        e2e_tmp, vision_path(), VISION, "--model-impl", "transformers",
        "--gateway-address", gateway.base_url, "--heartbeat-interval", "1", "--worker-id", "vision-1",
    )  # fmt: skip
    try:
        proc.wait_ready(ENGINE_START_S)
        gateway.wait_routable(VISION, 1, 10)
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


# -- image input on the vision plumbing model (random vision weights) -----------------------------


def test_image_chat_through_the_gateway_adds_exactly_64_prompt_tokens(gateway, vision_worker):
    client = sdk(gateway)
    with_image = image_chat(client, png_data_url(shapes_png(0)), logprobs=True)
    without = client.chat.completions.create(
        model=VISION,
        messages=[{"role": "user", "content": [{"type": "text", "text": IMAGE_QUESTION}]}],
        max_tokens=2,
        temperature=0,
    )
    assert with_image.choices[0].message.content and without.choices[0].message.content
    assert with_image.usage.prompt_tokens - without.usage.prompt_tokens == IMAGE_TOKENS
    # the pixels reach the language model: another picture, same token count, another first-token
    # distribution (the vision weights are random, so only "different" means anything)
    other = image_chat(client, png_data_url(shapes_png(1)), logprobs=True)
    assert other.usage.prompt_tokens == with_image.usage.prompt_tokens
    first, other_first = with_image.choices[0].logprobs.content[0], other.choices[0].logprobs.content[0]
    assert (first.token, first.logprob) != (other_first.token, other_first.logprob)


def test_gateway_lists_the_vision_models_kinds_with_image_input(gateway, vision_worker):
    expected = ["chat_completions", "completions", "image_input"]
    cards = {m["id"]: m for m in httpx.get(gateway.base_url + "/v1/models", timeout=10).json()["data"]}
    assert cards[VISION]["kinds"] == expected
    worker_card = httpx.get(vision_worker.base_url + "/v1/models", timeout=10).json()["data"][0]
    assert worker_card["kinds"] == expected


@pytest.mark.parametrize(
    ("url", "said"),
    [
        ("data:image/png;base64,!!!this is not base64!!!", "base64"),
        (png_data_url(b"plain text, not an image at all"), "image"),
    ],
    ids=["bad-base64", "not-an-image"],
)
def test_broken_images_are_openai_400s_and_the_worker_keeps_serving(gateway, vision_worker, url, said):
    body = {
        "model": VISION,
        "max_tokens": 4,
        "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "hi"}]}],
    }
    resp = httpx.post(gateway.base_url + "/v1/chat/completions", json=body, timeout=60)
    assert resp.status_code == 400, resp.text
    error = resp.json()["error"]
    assert said in error["message"] and "type" in error  # the engine's own verdict on the image
    with pytest.raises(openai.BadRequestError):  # the SDK reads it as the OpenAI error it is
        sdk(gateway).chat.completions.create(**body)
    assert vision_worker.alive()
    answer = image_chat(sdk(gateway), png_data_url(shapes_png(0)))
    assert answer.choices[0].message.content
    assert httpx.get(vision_worker.base_url + "/health", timeout=5).status_code == 200


def test_a_10_mb_image_data_url_is_relayed_whole_and_answered(gateway, vision_worker):
    png = noisy_png(int(7.6 * 2**20))  # ~10.1 MB once base64-encoded, under max_body_mb: 32
    body = {
        "model": VISION,
        "max_tokens": 2,
        "temperature": 0,
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": png_data_url(png)}},
                    {"type": "text", "text": IMAGE_QUESTION},
                ],
            }
        ],
    }
    raw = json.dumps(body).encode()
    assert len(raw) > 10 * 2**20
    resp = httpx.post(
        gateway.base_url + "/v1/chat/completions", content=raw, headers={"Content-Type": "application/json"}, timeout=120
    )
    assert resp.status_code == 200, resp.text[:2000]
    # a PNG cut short would not decode (a 400): the engine saw every byte, and made 64 tokens of it
    small = image_chat(sdk(gateway), png_data_url(shapes_png(0)))
    assert resp.json()["usage"]["prompt_tokens"] == small.usage.prompt_tokens
