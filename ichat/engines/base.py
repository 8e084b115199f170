"""The contract an engine plugin implements.

A plugin is an ``ichat.engines`` entry point naming an :class:`EngineFactory`. The worker core
knows only this module: it hands the factory the flags it did not consume, gets back an
:class:`EngineSpec` (parsed by the engine's own parser, so a wrong flag fails with the engine's
own message), then starts an :class:`Engine` and routes OpenAI requests to it.

Requests reach the engine as the parsed JSON body plus a :class:`RequestContext`; answers come
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
ROUTES = (CHAT, COMPLETIONS, EMBEDDINGS)


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


@attrs.frozen
class EngineLoad:
    running: int = 0
    waiting: int = 0
    kv_cache_usage: float | None = None


@runtime_checkable
class Engine(Protocol):
    spec: EngineSpec

    def supported_routes(self) -> frozenset[str]: ...

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

    def install_hint(self) -> str:
        """How to install this engine; shown when it is missing."""
        ...

    def parse_args(self, argv: list[str], *, served_model_name: str | None) -> EngineSpec:
        """Parse engine flags with the engine's own parser (SystemExit with its message if wrong)."""
        ...

    async def start(self, spec: EngineSpec) -> Engine: ...
