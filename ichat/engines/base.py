"""The contract an engine plugin implements.

A plugin is an ``ichat.engines`` entry point naming an :class:`EngineFactory`. The worker core
knows only this module: it hands the factory the flags it did not consume, gets back an
:class:`EngineSpec` (parsed by the engine's own parser, so a wrong flag fails with the engine's
own message), then starts an :class:`Engine` and routes OpenAI requests to it.

Requests reach the engine as the parsed JSON body (for multipart routes: the form's fields,
the file as an :class:`UploadedFile`) plus a :class:`RequestContext`; answers come
back as a :class:`JSONResult` (status + ready bytes) or a :class:`StreamResult` (ready SSE
chunks). The worker never re-encodes what the engine produced.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any, Protocol, runtime_checkable

import attrs

#: OpenAI routes a worker serves; the engine says which of them its model supports.
CHAT = "chat_completions"
COMPLETIONS = "completions"
EMBEDDINGS = "embeddings"
RERANK = "rerank"
SCORE = "score"
TRANSCRIPTIONS = "audio_transcriptions"
TRANSLATIONS = "audio_translations"
ROUTES = (CHAT, COMPLETIONS, EMBEDDINGS, RERANK, SCORE, TRANSCRIPTIONS, TRANSLATIONS)

#: The path of each route on a worker (and on the gateway, which relays them as they are).
ROUTE_PATHS: dict[str, str] = {
    CHAT: "/v1/chat/completions",
    COMPLETIONS: "/v1/completions",
    EMBEDDINGS: "/v1/embeddings",
    RERANK: "/v1/rerank",
    SCORE: "/v1/score",
    TRANSCRIPTIONS: "/v1/audio/transcriptions",
    TRANSLATIONS: "/v1/audio/translations",
}
#: Routes whose body is multipart/form-data (an uploaded file) rather than JSON.
MULTIPART_ROUTES = frozenset({TRANSCRIPTIONS, TRANSLATIONS})

#: A kind that is not a route of its own: chat messages may carry images (``image_url`` parts).
IMAGE_INPUT = "image_input"
#: Every kind a worker may report: its routes, plus what its chat route accepts besides text.
KINDS = (*ROUTES, IMAGE_INPUT)


def engine_kinds(engine: Any) -> frozenset[str]:
    """What ``engine`` serves: its own ``kinds()`` when it has one (routes plus input kinds such
    as :data:`IMAGE_INPUT`), else its routes. Plugins written before kinds existed keep working."""
    kinds = getattr(engine, "kinds", None)
    return frozenset(kinds()) if callable(kinds) else frozenset(engine.supported_routes())


@attrs.frozen
class UploadedFile:
    """A file part of a multipart request (audio for the transcription routes), already read
    whole by the worker within its body limit."""

    filename: str
    content_type: str
    data: bytes = attrs.field(repr=lambda d: f"<{len(d)} bytes>")


@attrs.frozen
class JSONResult:
    status: int
    body: bytes


@attrs.frozen
class StreamResult:
    """SSE chunks exactly as they go on the wire (``data: ...\\n\\n``).

    ``abort`` stops the engine's work for this request; the worker calls it when the client
    goes away before the stream ends.
    """

    chunks: AsyncIterator[bytes]
    abort: Callable[[], Awaitable[None]]


Result = JSONResult | StreamResult


@attrs.frozen
class RequestContext:
    """What an engine may read of the HTTP request, without seeing aiohttp."""

    headers: Mapping[str, str]
    request_id: str
    is_disconnected: Callable[[], Awaitable[bool]]


@attrs.frozen
class EngineSpec:
    """A parsed engine configuration.

    ``model_path`` and ``served_model_names`` are lifted out so the worker can report them;
    ``engine_args`` is the engine's own parsed namespace, opaque to the core; ``canonical_args``
    is the flag list as given (vLLM names), kept for heartbeats and restarts.
    """

    backend: str
    model_path: str
    served_model_names: tuple[str, ...]
    engine_args: Any
    canonical_args: tuple[str, ...]
    #: report the engine's prefix cache to the gateway (``--report-prefix-cache``): the engine
    #: then has a ``prefix_cache`` attribute, an ``ichat.worker.prefixcache.PrefixCacheTracker``
    report_prefix_cache: bool = False


@attrs.frozen
class EngineLoad:
    running: int = 0
    waiting: int = 0
    kv_cache_usage: float | None = None


@runtime_checkable
class Engine(Protocol):
    spec: EngineSpec

    def supported_routes(self) -> frozenset[str]: ...

    # Optional: ``def kinds(self) -> frozenset[str]`` -- the routes plus input kinds such as
    # IMAGE_INPUT; read through :func:`engine_kinds`, which falls back to the routes.

    async def handle(self, route: str, body: dict[str, Any], ctx: RequestContext) -> Result: ...

    async def models(self) -> list[dict[str, Any]]:
        """OpenAI model cards (``{"id", "object": "model", ...}``) this engine serves."""
        ...

    async def load(self) -> EngineLoad: ...

    def metrics_text(self) -> bytes:
        """The engine's own Prometheus exposition, appended to the worker's /metrics."""
        ...

    async def check_health(self) -> None:
        """Raise if the engine cannot serve (dead engine core, ...)."""
        ...

    async def shutdown(self) -> None: ...


class EngineFactory(Protocol):
    name: str

    def parse_args(self, argv: list[str], *, served_model_name: str | None) -> EngineSpec:
        """Parse engine flags with the engine's own parser (SystemExit with its message if wrong)."""
        ...

    async def start(self, spec: EngineSpec) -> Engine: ...
