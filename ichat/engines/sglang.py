"""SGLang engine plugin: an in-process ``sglang.Engine`` behind SGLang's own OpenAI serving layer.

Flags arrive with vLLM's names (iChat's standard); :func:`ichat.engines.args.to_sglang` translates
them and SGLang's real parser (``ServerArgs.add_cli_args`` / ``from_cli_args``) reads the result,
so a wrong value fails with SGLang's own message. ``--enable-metrics`` is always added: vLLM always
keeps engine metrics, and the worker's ``/metrics`` appends them.

Requests are served by SGLang's ``OpenAIServingChat`` / ``OpenAIServingCompletion`` /
``OpenAIServingEmbedding`` (templating, tools, reasoning, logprobs as SGLang does them); only its
FastAPI app is replaced by the worker's aiohttp routes. Bodies are validated into SGLang's request
models, results converted: a pydantic response -> JSON as SGLang's server writes it
(``model_dump_json(by_alias=True)``), an error response -> the same status with an OpenAI-shaped
``{"error": {...}}`` body, a Starlette ``StreamingResponse`` -> its ``body_iterator`` relayed.

Threading. SGLang's tokenizer manager binds its zmq sockets, locks and the task that reads the
detokenizer's results to the loop it first runs on, and when that loop is the main thread's it
installs its own SIGTERM handler there (which would replace the worker's graceful drain). So the
engine lives on its own thread and loop (:class:`EngineLoop`): it is built there, every serving
call and every stream step runs there, and the worker's loop only awaits the results.

Versions. SGLang 0.5.16 (the last release on torch 2.11, the GPU image's) through 0.5.23 are
supported; they keep the entry points above in the same places except the ``--config`` file
merger, and :data:`API_LOCATIONS` is the one place that knows where each lives (newest first).
The translation tests run against both versions' real parsers.

``sglang`` is imported only in ``parse_args`` and ``start``: without it installed the plugin still
lists, and ``--backend sglang`` fails at startup with :data:`INSTALL_HINT`. The request path takes
its serving objects as arguments, so tests drive it with a recorded fake instead of a GPU.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib
import importlib.metadata
import importlib.util
import logging
import os
import re
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Mapping
from typing import Any, TypeVar

import attrs
import orjson

from ichat.engines.args import to_sglang
from ichat.engines.base import (
    CHAT,
    COMPLETIONS,
    EMBEDDINGS,
    EngineLoad,
    EngineSpec,
    JSONResult,
    RequestContext,
    Result,
    StreamResult,
)
from ichat.errors import ConfigError, EngineUnavailable, IChatError, InvalidRequest, NotFound, error_body, to_json_bytes

log = logging.getLogger("ichat.engines.sglang")

INSTALL_HINT = (
    'SGLang is not installed in this environment: on a CUDA machine, pip install "sglang[all]" '
    "(ideally in its own venv: its torch pin differs from vLLM's; there is no CPU build on PyPI), "
    "or run this worker with --backend vllm"
)

#: Flags the plugin always gives SGLang, before the translated ones.
PLUGIN_FLAGS = ("--enable-metrics",)

T = TypeVar("T")


#: The SGLang releases this plugin was checked against (oldest, newest); others get a warning.
SUPPORTED_VERSIONS = ("0.5.16", "0.5.23")

#: Where each SGLang entry point lives, newest SGLang first; the first importable one wins.
API_LOCATIONS: dict[str, list[tuple[str, str]]] = {
    "ServerArgs": [("sglang.srt.server_args", "ServerArgs")],  # 0.5.16, 0.5.23
    "ConfigArgumentMerger": [
        ("sglang.srt.utils.server_args_config_parser", "ConfigArgumentMerger"),  # 0.5.23
        ("sglang.srt.server_args_config_parser", "ConfigArgumentMerger"),  # 0.5.16
    ],
    "Engine": [("sglang.srt.entrypoints.engine", "Engine")],  # 0.5.16, 0.5.23 (also `sglang.Engine`)
    "ChatCompletionRequest": [("sglang.srt.entrypoints.openai.protocol", "ChatCompletionRequest")],
    "CompletionRequest": [("sglang.srt.entrypoints.openai.protocol", "CompletionRequest")],
    "EmbeddingRequest": [("sglang.srt.entrypoints.openai.protocol", "EmbeddingRequest")],
    "OpenAIServingChat": [("sglang.srt.entrypoints.openai.serving_chat", "OpenAIServingChat")],
    "OpenAIServingCompletion": [("sglang.srt.entrypoints.openai.serving_completions", "OpenAIServingCompletion")],
    "OpenAIServingEmbedding": [("sglang.srt.entrypoints.openai.serving_embedding", "OpenAIServingEmbedding")],
}


def sglang_api(name: str) -> Any:
    """The entry point ``name`` of the installed SGLang (see :data:`API_LOCATIONS`)."""
    errors = []
    for module_name, attr in API_LOCATIONS[name]:
        try:
            return getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as exc:
            errors.append(f"{module_name}.{attr}: {exc}")
    raise ImportError(f"SGLang {sglang_version()} has no {name} where this plugin looks: " + "; ".join(errors))


def sglang_version() -> str:
    try:
        return importlib.metadata.version("sglang")
    except importlib.metadata.PackageNotFoundError:
        return getattr(importlib.import_module("sglang.version"), "__version__", "unknown")


def _version_key(version: str) -> tuple[int, ...]:
    return tuple(int(p) for p in re.findall(r"\d+", version.split("+")[0])[:3])


def _import_server_args() -> Any:
    """SGLang's ``ServerArgs``, or EngineUnavailable saying how to install SGLang."""
    if importlib.util.find_spec("sglang") is None:
        raise EngineUnavailable(INSTALL_HINT)
    try:
        server_args = sglang_api("ServerArgs")
    except ImportError as exc:
        raise EngineUnavailable(f"SGLang is installed but cannot be imported ({exc}); reinstall it") from exc
    version = sglang_version()
    low, high = SUPPORTED_VERSIONS
    with contextlib.suppress(ValueError):
        if not _version_key(low) <= _version_key(version) <= _version_key(high):
            log.warning("SGLang %s is outside the versions this plugin was checked with (%s to %s)", version, low, high)
    return server_args


@attrs.frozen
class SGLangArgs:
    """``EngineSpec.engine_args`` for SGLang: the parsed ``ServerArgs`` and how they came about."""

    server_args: Any
    argv: tuple[str, ...]  # what SGLang's parser read
    warnings: tuple[str, ...]  # from the translation, logged again at start (when logs are captured)


class SGLangEngineFactory:
    name = "sglang"

    def build_parser(self) -> tuple[argparse.ArgumentParser, Any]:
        ServerArgs = _import_server_args()
        parser = argparse.ArgumentParser(
            prog="python -m ichat.worker --backend sglang",
            usage="%(prog)s --model PATH [engine flags...]  (all of them: --help)",
            description="SGLang engine flags: vLLM's names are translated (see README, SGLang backend), SGLang's own pass through.",
        )
        ServerArgs.add_cli_args(parser)
        return parser, ServerArgs

    def parse_args(self, argv: list[str], *, served_model_name: list[str] | None = None) -> EngineSpec:
        parser, ServerArgs = self.build_parser()
        try:
            translation = to_sglang(argv)
        except ConfigError as exc:
            parser.error(exc.message)
        names = list(served_model_name or [])
        if len(names) > 1:
            parser.error(f"SGLang serves a model under one name; got {len(names)}: {' '.join(names)}")
        sglang_argv = [*PLUGIN_FLAGS, *translation.argv, *(["--served-model-name", names[0]] if names else [])]
        if "--config" in sglang_argv:  # SGLang's YAML config file, merged as `sglang serve` does
            sglang_argv = sglang_api("ConfigArgumentMerger")(parser).merge_config_with_args(sglang_argv)
        ns = parser.parse_args(sglang_argv)
        if not ns.model_path:
            parser.error("--model is required (a local model directory or a model id)")
        # As in sglang.srt.server_args.prepare_server_args: some model overrides respect an explicit choice.
        ns._radix_eviction_policy_explicitly_set = any(
            a.split("=")[0] == "--radix-eviction-policy" for a in sglang_argv
        )
        server_args = ServerArgs.from_cli_args(ns)
        for warning in translation.warnings:
            log.warning("%s", warning)
        return EngineSpec(
            backend=self.name,
            model_path=server_args.model_path,
            served_model_names=(server_args.served_model_name or server_args.model_path,),
            engine_args=SGLangArgs(server_args, tuple(sglang_argv), tuple(translation.warnings)),
            canonical_args=tuple(argv),
        )

    async def start(self, spec: EngineSpec) -> SGLangEngine:
        args: SGLangArgs = spec.engine_args
        for warning in args.warnings:
            log.warning("%s", warning)
        loop = EngineLoop()
        try:
            engine = await loop.call(_build_engine, args.server_args)
            serving = await loop.call(_build_serving, engine)
        except BaseException:
            await asyncio.to_thread(loop.stop)
            raise
        tm = engine.tokenizer_manager
        log.info("SGLang engine ready: %s (served as %s)", spec.model_path, tm.served_model_name)
        return SGLangEngine(spec, loop=loop, tokenizer_manager=tm, engine=engine, **serving)


def _build_engine(server_args: Any) -> Any:
    """Runs on the engine thread, its loop current: the tokenizer manager binds to that loop."""
    return sglang_api("Engine")(server_args=server_args)


def _build_serving(engine: Any) -> dict[str, Any]:
    tm, templates = engine.tokenizer_manager, engine.template_manager
    if tm.is_generation:
        servings = {
            CHAT: sglang_api("OpenAIServingChat")(tm, templates),
            COMPLETIONS: sglang_api("OpenAIServingCompletion")(tm, templates),
        }
    else:
        servings = {EMBEDDINGS: sglang_api("OpenAIServingEmbedding")(tm, templates)}
    request_models = {
        CHAT: sglang_api("ChatCompletionRequest"),
        COMPLETIONS: sglang_api("CompletionRequest"),
        EMBEDDINGS: sglang_api("EmbeddingRequest"),
    }
    return {"servings": servings, "request_models": request_models}


class EngineLoop:
    """A thread running the event loop SGLang's tokenizer manager lives on.

    ``run(coro)`` runs a coroutine there and is awaited from any other loop; cancelling the
    awaiting task cancels the coroutine on the engine loop too (``run_coroutine_threadsafe``).
    """

    def __init__(self, name: str = "sglang-engine") -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run_forever, name=name, daemon=True)
        self._thread.start()

    def _run_forever(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def run(self, coro: Coroutine[Any, Any, T]) -> Awaitable[T]:
        return asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coro, self.loop))

    def call(self, fn: Callable[..., T], *args: Any) -> Awaitable[T]:
        """Run a plain callable on the engine thread, inside its running loop."""

        async def invoke() -> T:
            return fn(*args)

        return self.run(invoke())

    def submit(self, coro: Coroutine[Any, Any, Any]) -> None:
        """Fire and forget (cleanup paths that cannot await); dropped once the loop has stopped."""
        if not self.is_alive():
            coro.close()
            return
        asyncio.run_coroutine_threadsafe(coro, self.loop)

    def is_alive(self) -> bool:
        return self._thread.is_alive() and self.loop.is_running()

    def stop(self, timeout: float = 10.0) -> None:
        """Cancel what still runs there (SGLang's receive loop, open streams), then end the thread."""
        if self.is_alive():
            with contextlib.suppress(Exception):
                asyncio.run_coroutine_threadsafe(self._cancel_all(), self.loop).result(timeout)
            self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout)
        if not self._thread.is_alive() and not self.loop.is_closed():
            self.loop.close()

    async def _cancel_all(self) -> None:
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self.loop.shutdown_asyncgens()


class _Headers(dict[str, str]):
    """Request headers as SGLang reads them (``headers.get("x-...")``, ``"traceparent" in headers``):
    a plain copy (it is read on another thread) with lower-case keys, looked up case-insensitively."""

    def get(self, key: str, default: Any = None) -> Any:  # type: ignore[override]
        return super().get(key.lower(), default)

    def __getitem__(self, key: str) -> str:
        return super().__getitem__(key.lower())

    def __contains__(self, key: object) -> bool:
        return super().__contains__(key.lower() if isinstance(key, str) else key)


@attrs.frozen
class RawRequest:
    """What SGLang's serving layer reads of the HTTP request: ``headers`` and ``await is_disconnected()``.

    It is read on the engine loop; the disconnect check runs on the worker's loop, which owns the
    connection.
    """

    headers: _Headers
    _ctx: RequestContext
    _worker_loop: asyncio.AbstractEventLoop

    @classmethod
    def from_context(cls, ctx: RequestContext, worker_loop: asyncio.AbstractEventLoop) -> RawRequest:
        return cls(_Headers({k.lower(): v for k, v in ctx.headers.items()}), ctx, worker_loop)

    async def is_disconnected(self) -> bool:
        future = asyncio.run_coroutine_threadsafe(self._ctx.is_disconnected(), self._worker_loop)
        return await asyncio.wrap_future(future)


class SGLangEngine:
    """The worker's view of one SGLang engine. ``servings`` maps a route to an object with
    ``async handle_request(request, raw_request)``; ``request_models`` a route to its pydantic class."""

    def __init__(
        self,
        spec: EngineSpec,
        *,
        loop: EngineLoop,
        tokenizer_manager: Any,
        servings: Mapping[str, Any],
        request_models: Mapping[str, Any],
        engine: Any = None,
    ) -> None:
        self.spec = spec
        self._loop = loop
        self._tm = tokenizer_manager
        self._servings = dict(servings)
        self._request_models = dict(request_models)
        self._engine = engine

    def supported_routes(self) -> frozenset[str]:
        return frozenset(self._servings)

    async def handle(self, route: str, body: dict[str, Any], ctx: RequestContext) -> Result:
        from pydantic import ValidationError

        serving = self._servings.get(route)
        if serving is None:
            return _error_result(NotFound(f"route {route} is not served by this model", code="unsupported_route"))
        try:
            request = self._request_models[route].model_validate(body)
        except ValidationError as exc:
            return _error_result(InvalidRequest(_summarize_validation(exc)))
        if getattr(request, "rid", None) is None:
            request.rid = ctx.request_id  # so an abort can name it (a batch expands it to rid_0, rid_1, ...)
        raw = RawRequest.from_context(ctx, asyncio.get_running_loop())
        try:
            result = await self._loop.run(serving.handle_request(request, raw))
        except Exception as exc:  # SGLang turns what it expects into error responses itself
            log.exception("SGLang failed on a %s request", route)
            raise IChatError(f"SGLang engine error: {type(exc).__name__}: {exc}") from exc
        return self._to_result(result, request.rid if isinstance(request.rid, str) else None)

    def _to_result(self, result: Any, rid: str | None) -> Result:
        iterator = getattr(result, "body_iterator", None)
        if iterator is not None:  # starlette StreamingResponse
            stream = _Stream(self._loop, iterator, self._tm, rid)
            return StreamResult(chunks=stream.chunks(), abort=stream.abort)
        if hasattr(result, "status_code") and hasattr(result, "body"):  # starlette Response: SGLang's errors
            return JSONResult(result.status_code, _openai_error_body(result.status_code, bytes(result.body)))
        if getattr(result, "object", None) == "error":  # an ErrorResponse model (older SGLang)
            return JSONResult(
                int(result.code), orjson.dumps(error_body(result.message, result.type, result.code, result.param))
            )
        if hasattr(result, "model_dump_json"):
            return JSONResult(200, result.model_dump_json(by_alias=True).encode())
        raise IChatError(f"unexpected SGLang result {type(result).__name__}")

    async def models(self) -> list[dict[str, Any]]:
        tm = self._tm
        created = int(time.time())
        name = tm.served_model_name
        cards = [_model_card(name, name, None, tm.model_config.context_len, created)]
        registry = getattr(tm, "lora_registry", None)
        if registry is not None:
            for ref in registry.get_all_adapters().values():
                cards.append(_model_card(ref.lora_name, ref.lora_path, name, None, created))
        return cards

    async def load(self) -> EngineLoad:
        snapshots = await self._loop.run(self._tm.get_loads())
        if not snapshots:
            return EngineLoad()
        return EngineLoad(
            running=sum(s.num_running_reqs for s in snapshots),
            waiting=sum(s.num_waiting_reqs for s in snapshots),
            kv_cache_usage=sum(s.token_usage for s in snapshots) / len(snapshots),
        )

    def metrics_text(self) -> bytes:
        """SGLang's scheduler processes write their metrics to PROMETHEUS_MULTIPROC_DIR (set by
        ``sglang.Engine`` with --enable-metrics); the tokenizer manager's live in this process."""
        from prometheus_client import REGISTRY, CollectorRegistry, generate_latest, multiprocess

        text = generate_latest(REGISTRY)
        if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)
            text += generate_latest(registry)
        return text

    async def check_health(self) -> None:
        if not self._loop.is_alive():
            raise IChatError("the SGLang engine loop has stopped")
        if getattr(self._tm, "gracefully_exit", False):
            raise IChatError("the SGLang engine is shutting down")

    async def shutdown(self) -> None:
        if self._engine is not None:
            await asyncio.to_thread(self._engine.shutdown)  # blocks until its processes are gone
        await asyncio.to_thread(self._loop.stop)


class _Stream:
    """One streaming answer: SGLang's ``body_iterator`` is stepped on the engine loop and each chunk
    handed to the worker's loop. Closing it early (abort, or the relay dropped) closes SGLang's
    generators there, which aborts the request in SGLang; ``abort`` also names the rid to SGLang."""

    def __init__(self, loop: EngineLoop, iterator: AsyncIterator[Any], tokenizer_manager: Any, rid: str | None) -> None:
        self._loop = loop
        self._iterator = iterator
        self._tm = tokenizer_manager
        self._rid = rid
        self._open = True

    async def chunks(self) -> AsyncIterator[bytes]:
        try:
            while self._open:
                try:
                    chunk = await self._loop.run(_anext(self._iterator))
                except StopAsyncIteration:
                    self._open = False
                    return
                yield chunk.encode() if isinstance(chunk, str) else bytes(chunk)
        finally:
            if self._open:  # dropped before the end without an abort (cannot await here)
                self._open = False
                self._loop.submit(_aclose(self._iterator))

    async def abort(self) -> None:
        if self._open:
            self._open = False
            with contextlib.suppress(Exception):
                await self._loop.run(_aclose(self._iterator))
        if self._rid is not None:
            with contextlib.suppress(Exception):
                await self._loop.call(self._tm.abort_request, self._rid)


async def _anext(iterator: AsyncIterator[T]) -> T:
    return await iterator.__anext__()


async def _aclose(iterator: Any) -> None:
    aclose = getattr(iterator, "aclose", None)
    if aclose is not None:
        await aclose()


def _model_card(id_: str, root: str | None, parent: str | None, max_len: int | None, created: int) -> dict[str, Any]:
    """SGLang's ``ModelCard`` fields, as its /v1/models writes them."""
    return {
        "id": id_,
        "object": "model",
        "created": created,
        "owned_by": "sglang",
        "root": root,
        "parent": parent,
        "max_model_len": max_len,
    }


def _openai_error_body(status: int, body: bytes) -> bytes:
    """SGLang writes errors flat (``{"object": "error", "message", "type", "code"}``); clients of
    iChat get OpenAI's ``{"error": {...}}`` from every engine."""
    if status < 400:
        return body
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        return orjson.dumps(error_body(body.decode(errors="replace"), "engine_error", status))
    if isinstance(data, dict) and data.get("object") == "error" and "message" in data:
        return orjson.dumps(
            error_body(data["message"], data.get("type", "engine_error"), data.get("code", status), data.get("param"))
        )
    return body


def _summarize_validation(exc: Any) -> str:
    parts = []
    for err in exc.errors()[:5]:
        where = ".".join(str(p) for p in err.get("loc", ()))
        parts.append(f"{where}: {err.get('msg')}" if where else str(err.get("msg")))
    return "invalid request: " + "; ".join(parts)


def _error_result(err: IChatError) -> JSONResult:
    return JSONResult(err.status, to_json_bytes(err))
