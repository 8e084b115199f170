"""The worker's routes for other model kinds, in process, with a recording fake engine.

The fake stands in for the engine because what is checked here is the worker's part: which
routes reach the engine (only the kinds the engine reports), how a multipart upload is read and
bounded, how image input is refused for a text-only model, and where kinds are reported. The
real engine on real models is in tests/e2e/test_kinds.py.
"""

from __future__ import annotations

import orjson
import pytest
from aiohttp import FormData

from ichat.engines.base import (
    CHAT,
    EMBEDDINGS,
    IMAGE_INPUT,
    RERANK,
    SCORE,
    TRANSCRIPTIONS,
    EngineLoad,
    EngineSpec,
    JSONResult,
    UploadedFile,
    engine_kinds,
)
from ichat.logs.hub import LogHub
from ichat.worker.app import READY, WorkerState, build_app, has_image_parts
from ichat.worker.cli import parse_worker_args
from ichat.worker.heartbeat import build_payload

IMAGE_MESSAGE = [
    {
        "role": "user",
        "content": [
            {"type": "text", "text": "What is in this image?"},
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}},
        ],
    }
]


class RecordingFakeEngine:
    """Not an engine: answers every request with what it was given, and reports ``kinds``."""

    def __init__(self, kinds: set[str]) -> None:
        self.spec = EngineSpec("fake", "/models/fake", ("fake",), None, ())
        self._kinds = frozenset(kinds)
        self.calls: list[tuple[str, dict]] = []

    def supported_routes(self) -> frozenset[str]:
        return self._kinds - {IMAGE_INPUT}

    def kinds(self) -> frozenset[str]:
        return self._kinds

    async def handle(self, route, body, ctx):
        self.calls.append((route, body))
        shown = {k: (f"<file {v.filename} {v.content_type} {len(v.data)}>" if isinstance(v, UploadedFile) else v) for k, v in body.items()}
        return JSONResult(200, orjson.dumps({"route": route, "body": shown}))

    async def models(self):
        return [{"id": "fake", "object": "model"}]

    async def load(self):
        return EngineLoad()

    def metrics_text(self) -> bytes:
        return b""

    async def check_health(self) -> None:
        return None

    async def shutdown(self) -> None:
        return None


async def worker_client(aiohttp_client, kinds, **app_kwargs):
    options, _, _ = parse_worker_args(["--backend", "stub", "--model", "m", "-n", "fake"])
    engine = RecordingFakeEngine(kinds)
    state = WorkerState(options, spec=engine.spec, engine=engine, phase=READY)
    client = await aiohttp_client(build_app(state, LogHub(10), gpu_inventory=lambda: [], **app_kwargs))
    return client, engine, state


async def test_a_route_the_model_does_not_serve_is_a_404_naming_what_it_serves(aiohttp_client):
    client, engine, _ = await worker_client(aiohttp_client, {EMBEDDINGS, RERANK, SCORE})
    resp = await client.post("/v1/chat/completions", json={"model": "fake", "messages": []})
    assert resp.status == 404
    error = (await resp.json())["error"]
    assert error["code"] == "unsupported_route"
    assert "/v1/chat/completions" in error["message"]
    assert "/v1/embeddings, /v1/rerank, /v1/score" in error["message"]
    assert engine.calls == []
    resp = await client.post("/v1/audio/transcriptions", data=b"x")
    assert resp.status == 404 and engine.calls == []


async def test_rerank_and_score_reach_the_engine_as_json(aiohttp_client):
    client, engine, _ = await worker_client(aiohttp_client, {EMBEDDINGS, RERANK, SCORE})
    body = {"model": "fake", "query": "q", "documents": ["a", "b"]}
    resp = await client.post("/v1/rerank", json=body)
    assert resp.status == 200 and (await resp.json())["route"] == RERANK
    resp = await client.post("/v1/score", json={"model": "fake", "text_1": "a", "text_2": ["b"]})
    assert resp.status == 200 and (await resp.json())["route"] == SCORE
    assert [c[0] for c in engine.calls] == [RERANK, SCORE]
    assert engine.calls[0][1] == body


async def test_transcription_form_reaches_the_engine_with_the_file(aiohttp_client):
    client, engine, _ = await worker_client(aiohttp_client, {TRANSCRIPTIONS})
    form = FormData()
    form.add_field("model", "fake")
    form.add_field("language", "en")
    form.add_field("timestamp_granularities[]", "word")
    form.add_field("timestamp_granularities[]", "segment")
    form.add_field("file", b"RIFF....WAVEfmt ", filename="speech.wav", content_type="audio/wav")
    resp = await client.post("/v1/audio/transcriptions", data=form)
    assert resp.status == 200, await resp.text()
    route, body = engine.calls[0]
    assert route == TRANSCRIPTIONS
    assert body["model"] == "fake" and body["language"] == "en"
    assert body["timestamp_granularities[]"] == ["word", "segment"]
    upload = body["file"]
    assert isinstance(upload, UploadedFile)
    assert (upload.filename, upload.content_type, upload.data) == ("speech.wav", "audio/wav", b"RIFF....WAVEfmt ")


async def test_transcription_needs_a_multipart_body_with_one_file(aiohttp_client):
    client, engine, _ = await worker_client(aiohttp_client, {TRANSCRIPTIONS})
    resp = await client.post("/v1/audio/transcriptions", json={"model": "fake"})
    assert resp.status == 400 and "multipart/form-data" in (await resp.json())["error"]["message"]
    form = FormData()
    form.add_field("file", b"a", filename="a.wav", content_type="audio/wav")
    form.add_field("file2", b"b", filename="b.wav", content_type="audio/wav")
    resp = await client.post("/v1/audio/transcriptions", data=form)
    assert resp.status == 400 and "more than one file" in (await resp.json())["error"]["message"]
    assert engine.calls == []


async def test_an_upload_over_the_body_limit_is_a_413(aiohttp_client):
    client, engine, _ = await worker_client(aiohttp_client, {TRANSCRIPTIONS}, max_body_bytes=64 * 1024)
    form = FormData()
    form.add_field("model", "fake")
    form.add_field("file", b"\0" * (200 * 1024), filename="big.wav", content_type="audio/wav")
    resp = await client.post("/v1/audio/transcriptions", data=form)
    assert resp.status == 413
    assert (await resp.json())["error"]["type"]
    # a chunked upload carries no Content-Length: the bound is counted while reading
    async def chunks():
        boundary = b"--xyz"
        yield boundary + b'\r\nContent-Disposition: form-data; name="file"; filename="big.wav"\r\nContent-Type: audio/wav\r\n\r\n'
        for _ in range(20):
            yield b"\0" * 16 * 1024
        yield b"\r\n" + boundary + b"--\r\n"

    resp = await client.post(
        "/v1/audio/transcriptions", data=chunks(), headers={"Content-Type": "multipart/form-data; boundary=xyz"}
    )
    assert resp.status == 413
    assert engine.calls == []


async def test_an_oversized_form_field_is_refused(aiohttp_client):
    client, engine, _ = await worker_client(aiohttp_client, {TRANSCRIPTIONS})
    form = FormData()
    form.add_field("prompt", "x" * (65 * 1024))
    form.add_field("file", b"a", filename="a.wav", content_type="audio/wav")
    resp = await client.post("/v1/audio/transcriptions", data=form)
    assert resp.status == 400 and (await resp.json())["error"]["param"] == "prompt"
    assert engine.calls == []


async def test_image_input_to_a_text_only_model_is_a_400_naming_what_it_serves(aiohttp_client):
    client, engine, _ = await worker_client(aiohttp_client, {CHAT})
    resp = await client.post("/v1/chat/completions", json={"model": "fake", "messages": IMAGE_MESSAGE})
    assert resp.status == 400
    error = (await resp.json())["error"]
    assert error["code"] == "unsupported_input" and "image input" in error["message"]
    assert "/v1/chat/completions" in error["message"]
    assert engine.calls == []
    text_only = [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]
    assert (await client.post("/v1/chat/completions", json={"model": "fake", "messages": text_only})).status == 200


async def test_image_input_reaches_a_model_that_takes_images(aiohttp_client):
    client, engine, _ = await worker_client(aiohttp_client, {CHAT, IMAGE_INPUT})
    resp = await client.post("/v1/chat/completions", json={"model": "fake", "messages": IMAGE_MESSAGE})
    assert resp.status == 200 and engine.calls[0][1]["messages"] == IMAGE_MESSAGE


@pytest.mark.parametrize(
    "messages, expected",
    [
        (IMAGE_MESSAGE, True),
        ([{"role": "user", "content": "plain text"}], False),
        ([{"role": "user", "content": [{"type": "input_image", "image_url": "data:..."}]}], True),
        ("not a list", False),
        ([None, 3, {"content": [None, "x"]}], False),
    ],
)
def test_has_image_parts(messages, expected):
    assert has_image_parts({"messages": messages}) is expected


async def test_models_info_and_heartbeat_report_kinds(aiohttp_client):
    client, engine, state = await worker_client(aiohttp_client, {CHAT, IMAGE_INPUT})
    cards = (await (await client.get("/v1/models")).json())["data"]
    assert cards[0]["kinds"] == [CHAT, IMAGE_INPUT]
    assert (await (await client.get("/info")).json())["kinds"] == [CHAT, IMAGE_INPUT]
    assert (await build_payload(state))["kinds"] == [CHAT, IMAGE_INPUT]


def test_engine_kinds_falls_back_to_routes_for_engines_without_kinds():
    class RoutesOnly:
        def supported_routes(self):
            return frozenset({CHAT})

    assert engine_kinds(RoutesOnly()) == {CHAT}
    assert engine_kinds(RecordingFakeEngine({CHAT, IMAGE_INPUT})) == {CHAT, IMAGE_INPUT}


class RecordedWhisperPrompt:
    """Stands in for vLLM 0.32's Whisper class: its prompt format, copied from
    ``WhisperForConditionalGeneration.get_generation_prompt`` (the e2e test runs the real one)."""

    supports_explicit_language_detection = True

    @classmethod
    def get_generation_prompt(cls, p):
        if p.language is None:
            raise ValueError("Language must be specified when creating the Whisper prompt")
        text = (f"<|prev|>{p.request_prompt}" if p.request_prompt else "") + (
            f"<|startoftranscript|><|{p.language}|><|{p.task_type}|><|notimestamps|>"
        )
        return {"encoder_prompt": {"prompt": ""}, "decoder_prompt": {"prompt": text}}


def test_english_only_whisper_prompt_has_no_language_or_task_token():
    import types

    from ichat.engines.vllm import english_only_whisper

    adapted = english_only_whisper(RecordedWhisperPrompt)
    params = types.SimpleNamespace(language=None, task_type="transcribe", request_prompt="")
    assert adapted.get_generation_prompt(params)["decoder_prompt"]["prompt"] == "<|startoftranscript|><|notimestamps|>"
    params = types.SimpleNamespace(language="en", task_type="transcribe", request_prompt="earlier words")
    assert (
        adapted.get_generation_prompt(params)["decoder_prompt"]["prompt"]
        == "<|startofprev|>earlier words<|startoftranscript|><|notimestamps|>"
    )
    assert adapted.supports_explicit_language_detection is False
    assert RecordedWhisperPrompt.supports_explicit_language_detection is True  # the original is untouched
