"""The SGLang plugin without SGLang: failing fast when it is missing, and its request path.

SGLang cannot run on these machines (no CPU build on PyPI), so the engine is replaced by a
**recorded fake**: serving objects that answer what SGLang 0.5.23's ``OpenAIServingChat`` answers
(the JSON below was produced by its own ``protocol`` classes) and record how they were called. The
plugin's code around them is real: the engine thread and loop, request validation, the raw-request
bridge, result conversion, stream relay and abort, and the worker's HTTP app in front.
"""

from __future__ import annotations

import asyncio
import importlib.util
import subprocess
import sys
import threading
from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest
from pydantic import BaseModel, ConfigDict
from starlette.responses import JSONResponse, StreamingResponse

from ichat.engines import load_engine_factory
from ichat.engines import sglang as plugin
from ichat.engines.base import CHAT, COMPLETIONS, EMBEDDINGS, EngineSpec, JSONResult, RequestContext, StreamResult
from ichat.errors import EngineUnavailable

# Recorded from SGLang 0.5.23: ChatCompletionResponse(...).model_dump_json(by_alias=True), and
# ChatCompletionStreamResponse(...).model_dump_json() as its stream writes each chunk.
RECORDED_COMPLETION = orjson.loads(
    b'{"id":"chatcmpl-r1","object":"chat.completion","created":1764000000,"model":"smol","choices":[{"index":0,'
    b'"message":{"role":"assistant","content":"The capital of France is Paris.","reasoning_content":null},'
    b'"logprobs":null,"finish_reason":"stop","matched_stop":null}],"usage":{"prompt_tokens":14,"total_tokens":22,'
    b'"completion_tokens":8,"prompt_tokens_details":null,"reasoning_tokens":0,"completion_tokens_details":null},'
    b'"metadata":null}'
)
RECORDED_STREAM = [
    'data: {"id":"chatcmpl-r1","object":"chat.completion.chunk","created":1764000000,"model":"smol",'
    '"choices":[{"index":0,"delta":{"role":"assistant","content":"Paris","reasoning_content":null},'
    '"logprobs":null,"finish_reason":null,"matched_stop":null}],"usage":null}\n\n',
    "data: [DONE]\n\n",
]
# SGLang 0.5.23's create_error_response: ORJSONResponse(ErrorResponse(...).model_dump(), status_code)
RECORDED_ERROR = {
    "object": "error",
    "message": "max_tokens must be positive",
    "type": "BadRequestError",
    "param": None,
    "code": 400,
}


class RecordedChatRequest(BaseModel):
    """The fields of SGLang's ChatCompletionRequest this path touches (the real one has ~80)."""

    model: str
    messages: list[dict[str, Any]]
    stream: bool = False
    max_tokens: int | None = None
    rid: str | list[str] | None = None


class RecordedResponse(BaseModel):
    model_config = ConfigDict(extra="allow")


class RecordedFakeServing:
    """Stands in for OpenAIServingChat: answers as SGLang 0.5.23 does, records each call."""

    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []
        self.stream_steps: list[str] = []  # thread of each stream step, then how the stream ended
        self.hold_stream = False  # a stream that stops after its first chunk, as a slow generation does

    async def handle_request(self, request: RecordedChatRequest, raw_request: Any) -> Any:
        self.calls.append(
            {
                "thread": threading.current_thread().name,
                "rid": request.rid,
                "trace": raw_request.headers.get("X-Trace-Id"),
                "disconnected": await raw_request.is_disconnected(),
            }
        )
        if request.max_tokens is not None and request.max_tokens <= 0:
            return JSONResponse(RECORDED_ERROR, status_code=400)
        if request.stream:
            return StreamingResponse(self._stream(), media_type="text/event-stream")
        return RecordedResponse.model_validate(RECORDED_COMPLETION)

    async def _stream(self) -> AsyncIterator[str]:
        try:
            for chunk in RECORDED_STREAM:
                self.stream_steps.append(threading.current_thread().name)
                yield chunk
                if self.hold_stream:
                    await asyncio.Event().wait()
            self.stream_steps.append("finished")
        except (GeneratorExit, asyncio.CancelledError) as exc:
            self.stream_steps.append(type(exc).__name__)
            raise


class RecordedFakeTokenizerManager:
    """What the plugin reads of SGLang's TokenizerManager."""

    served_model_name = "smol"
    gracefully_exit = False

    class model_config:  # mirrors the attribute's name
        context_len = 8192

    class _Snapshot:
        def __init__(self, running: int, waiting: int, usage: float) -> None:
            self.num_running_reqs, self.num_waiting_reqs, self.token_usage = running, waiting, usage

    def __init__(self) -> None:
        self.aborted: list[tuple[str, str]] = []

    def abort_request(self, rid: str = "", abort_all: bool = False) -> None:
        self.aborted.append((rid, threading.current_thread().name))

    async def get_loads(self) -> list[Any]:
        return [self._Snapshot(2, 1, 0.25), self._Snapshot(1, 0, 0.75)]


SPEC = EngineSpec(
    backend="sglang", model_path="/models/smol", served_model_names=("smol",), engine_args=None, canonical_args=()
)


@pytest.fixture
async def fake() -> AsyncIterator[tuple[plugin.SGLangEngine, RecordedFakeServing, RecordedFakeTokenizerManager]]:
    loop = plugin.EngineLoop(name="sglang-engine-test")
    serving, tm = RecordedFakeServing(), RecordedFakeTokenizerManager()
    engine = plugin.SGLangEngine(
        SPEC, loop=loop, tokenizer_manager=tm, servings={CHAT: serving}, request_models={CHAT: RecordedChatRequest}
    )
    yield engine, serving, tm
    await engine.shutdown()


def context(request_id: str = "req-1", *, disconnected: bool = False) -> RequestContext:
    async def is_disconnected() -> bool:
        assert threading.current_thread() is threading.main_thread(), "asked on the worker's loop"
        return disconnected

    return RequestContext(headers={"x-trace-id": "t-42"}, request_id=request_id, is_disconnected=is_disconnected)


CHAT_BODY = {"model": "smol", "messages": [{"role": "user", "content": "What is the capital of France?"}]}


# --- SGLang missing --------------------------------------------------------------------------


def test_sglang_is_absent_from_this_venv() -> None:
    assert importlib.util.find_spec("sglang") is None, "these tests need a venv without SGLang"


def test_worker_fails_fast_without_sglang() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "ichat.worker", "--backend", "sglang", "--model", "/x"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert 'pip install "sglang[all]"' in proc.stderr
    assert proc.stderr.startswith("ichat.worker: error: SGLang is not installed"), proc.stderr
    assert "Traceback" not in proc.stderr


def test_listing_the_plugin_does_not_import_sglang() -> None:
    factory = load_engine_factory("sglang")
    assert factory.name == "sglang" and "sglang" not in sys.modules
    with pytest.raises(EngineUnavailable, match=r'pip install "sglang\[all\]"'):
        factory.parse_args(["--model", "/x"], served_model_name=None)


def test_a_broken_sglang_install_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    def import_module(name: str) -> Any:
        raise ModuleNotFoundError("No module named 'torch'", name="torch")

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(  # SGLang is "installed", but its imports fail
        plugin.importlib.util, "find_spec", lambda name, *a: object() if name == "sglang" else real_find_spec(name, *a)
    )
    monkeypatch.setattr(plugin.importlib, "import_module", import_module)
    with pytest.raises(EngineUnavailable, match="installed but cannot be imported"):
        plugin.SGLangEngineFactory().parse_args(["--model", "/x"])


@pytest.mark.parametrize(
    ("version", "warns"),
    [("0.5.16", False), ("0.5.20", False), ("0.5.23", False), ("0.5.15", True), ("0.5.24", True), ("0.6.0rc1", True)],
)
def test_sglang_outside_the_checked_versions_is_used_with_a_warning(
    version: str, warns: bool, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        plugin.importlib.util, "find_spec", lambda name, *a: object() if name == "sglang" else real_find_spec(name, *a)
    )

    class ServerArgs:  # what the entry-point table resolves to; its contents do not matter here
        pass

    monkeypatch.setattr(plugin, "sglang_api", lambda name: ServerArgs)
    monkeypatch.setattr(plugin, "sglang_version", lambda: version)
    with caplog.at_level("WARNING", logger="ichat.engines.sglang"):
        assert plugin._import_server_args() is ServerArgs
    warned = [r.getMessage() for r in caplog.records if "outside the versions" in r.getMessage()]
    assert bool(warned) is warns, warned
    if warns:
        assert version in warned[0] and "0.5.16 to 0.5.23" in warned[0]


def test_a_missing_entry_point_names_the_version_and_every_place_tried(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(plugin.API_LOCATIONS, "Nowhere", [("ichat.no_such_module", "X"), ("ichat.errors", "NoSuchName")])
    monkeypatch.setattr(plugin, "sglang_version", lambda: "0.5.16")
    with pytest.raises(ImportError) as info:
        plugin.sglang_api("Nowhere")
    message = str(info.value)
    assert "SGLang 0.5.16 has no Nowhere" in message
    assert "ichat.no_such_module.X" in message and "ichat.errors.NoSuchName" in message


# --- the request path, up to the engine call --------------------------------------------------


async def test_chat_runs_on_the_engine_loop_and_returns_sglangs_json(fake: Any) -> None:
    engine, serving, _ = fake
    result = await engine.handle(CHAT, CHAT_BODY, context("req-1"))
    assert isinstance(result, JSONResult) and result.status == 200
    assert orjson.loads(result.body) == RECORDED_COMPLETION
    assert serving.calls == [{"thread": "sglang-engine-test", "rid": "req-1", "trace": "t-42", "disconnected": False}]


async def test_a_client_rid_is_kept(fake: Any) -> None:
    engine, serving, _ = fake
    await engine.handle(CHAT, {**CHAT_BODY, "rid": "mine"}, context("req-2", disconnected=True))
    assert serving.calls[0]["rid"] == "mine" and serving.calls[0]["disconnected"] is True


async def test_an_invalid_body_is_a_400_before_the_engine(fake: Any) -> None:
    engine, serving, _ = fake
    result = await engine.handle(CHAT, {"model": "smol"}, context())
    assert result.status == 400
    error = orjson.loads(result.body)["error"]
    assert error["type"] == "invalid_request_error" and "messages: Field required" in error["message"]
    assert serving.calls == []


async def test_sglangs_error_response_gets_the_openai_shape(fake: Any) -> None:
    engine, _, _ = fake
    result = await engine.handle(CHAT, {**CHAT_BODY, "max_tokens": 0}, context())
    assert result.status == 400
    assert orjson.loads(result.body) == {
        "error": {"message": "max_tokens must be positive", "type": "BadRequestError", "code": 400, "param": None}
    }


async def test_a_route_the_model_does_not_serve(fake: Any) -> None:
    engine, _, _ = fake
    assert engine.supported_routes() == frozenset({CHAT})
    result = await engine.handle(EMBEDDINGS, {"input": "x"}, context())
    assert result.status == 404 and orjson.loads(result.body)["error"]["code"] == "unsupported_route"


async def test_a_stream_relays_sglangs_chunks(fake: Any) -> None:
    engine, serving, tm = fake
    result = await engine.handle(CHAT, {**CHAT_BODY, "stream": True}, context("req-s"))
    assert isinstance(result, StreamResult)
    chunks = [chunk async for chunk in result.chunks]
    assert chunks == [c.encode() for c in RECORDED_STREAM]
    assert serving.stream_steps == ["sglang-engine-test", "sglang-engine-test", "finished"]
    assert tm.aborted == []


async def test_abort_closes_the_stream_and_aborts_the_rid(fake: Any) -> None:
    engine, serving, tm = fake
    serving.hold_stream = True
    result = await engine.handle(CHAT, {**CHAT_BODY, "stream": True}, context("req-a"))
    assert isinstance(result, StreamResult)
    assert await anext(result.chunks) == RECORDED_STREAM[0].encode()
    await result.abort()
    assert serving.stream_steps == ["sglang-engine-test", "GeneratorExit"]
    assert tm.aborted == [("req-a", "sglang-engine-test")]


async def test_a_client_gone_mid_wait_cancels_the_engine_side(fake: Any) -> None:
    engine, serving, tm = fake
    serving.hold_stream = True
    result = await engine.handle(CHAT, {**CHAT_BODY, "stream": True}, context("req-c"))
    assert isinstance(result, StreamResult)
    await anext(result.chunks)
    waiting = asyncio.create_task(anext(result.chunks))  # parked until the engine yields again
    await asyncio.sleep(0.05)
    waiting.cancel()  # what aiohttp does to the handler when the client disconnects
    with pytest.raises(asyncio.CancelledError):
        await waiting
    await result.abort()
    for _ in range(100):
        if serving.stream_steps[-1] != "sglang-engine-test":
            break
        await asyncio.sleep(0.01)
    assert serving.stream_steps == ["sglang-engine-test", "CancelledError"]
    assert tm.aborted == [("req-c", "sglang-engine-test")]


async def test_models_load_and_health(fake: Any) -> None:
    engine, _, _ = fake
    cards = await engine.models()
    assert [(c["id"], c["object"], c["owned_by"], c["max_model_len"]) for c in cards] == [
        ("smol", "model", "sglang", 8192)
    ]
    load = await engine.load()
    assert (load.running, load.waiting, load.kv_cache_usage) == (3, 1, 0.5)
    await engine.check_health()
    await engine.shutdown()
    with pytest.raises(Exception, match="loop has stopped"):
        await engine.check_health()


# --- behind the worker's HTTP app -------------------------------------------------------------


async def test_through_the_worker_app(fake: Any, aiohttp_client: Any) -> None:
    from ichat.logs.hub import LogHub
    from ichat.worker.app import READY, WorkerState, build_app
    from ichat.worker.cli import parse_worker_args

    engine, serving, _ = fake
    options, _, _ = parse_worker_args(["--backend", "sglang", "--served-model-name", "smol"])
    state = WorkerState(options, phase=READY, engine=engine)
    client = await aiohttp_client(build_app(state, LogHub(100)))

    resp = await client.post(
        "/v1/chat/completions", json=CHAT_BODY, headers={"X-Request-Id": "http-1", "X-Trace-Id": "t-42"}
    )
    assert (
        resp.status == 200
        and (await resp.json())["choices"][0]["message"]["content"] == "The capital of France is Paris."
    )
    resp = await client.post("/v1/chat/completions", json={**CHAT_BODY, "stream": True})
    assert resp.status == 200 and resp.headers["Content-Type"] == "text/event-stream"
    assert await resp.text() == "".join(RECORDED_STREAM)
    resp = await client.post("/v1/completions", json={"model": "smol", "prompt": "x"})
    assert resp.status == 404
    resp = await client.get("/v1/models")
    assert [m["id"] for m in (await resp.json())["data"]] == ["smol"]
    assert [c["rid"] for c in serving.calls] == ["http-1", serving.calls[1]["rid"]] and serving.calls[0][
        "trace"
    ] == "t-42"
    assert COMPLETIONS not in engine.supported_routes()
