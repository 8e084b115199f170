"""The worker's HTTP surface: OpenAI routes delegated to the engine plugin, plus control routes.

    POST /v1/chat/completions, /v1/completions, /v1/embeddings,
         /v1/rerank, /v1/score                                   -> engine.handle(...) (JSON)
    POST /v1/audio/transcriptions, /v1/audio/translations        -> engine.handle(...) (multipart)
    GET  /v1/models                                              -> engine.models(), each with "kinds"

Only what the loaded model serves is routed to the engine (its ``kinds``: the routes, plus
``image_input`` when chat takes images); anything else is answered here, naming what it serves.
    GET  /health        200 {"status": "ok"} once the engine serves; 503 {"status": "loading"|"error"|"draining"}
    GET  /metrics       Prometheus text: the worker's request metrics, then the engine's own
    GET  /logs/stream   SSE of captured log lines (see ichat.logs.sse)
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import time
import uuid
from collections.abc import Callable
from typing import Any

import attrs
import orjson
from aiohttp import BodyPartReader, web
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from ichat import __version__
from ichat.engines.base import (
    CHAT,
    IMAGE_INPUT,
    MULTIPART_ROUTES,
    ROUTE_PATHS,
    ROUTES,
    Engine,
    JSONResult,
    RequestContext,
    UploadedFile,
    engine_kinds,
)
from ichat.errors import (
    InvalidRequest,
    NotFound,
    PayloadTooLarge,
    ServiceUnavailable,
)
from ichat.httperrors import error_middleware, json_response
from ichat.logs.hub import LogHub
from ichat.logs.sse import end_streams_on_shutdown, stream_hubs
# the worker's phases are the reported states of the wire protocol (LOADING is the first)
from ichat.protocol import CHALLENGE_PARAM, DRAINING, ERROR, LOADING, READY, WORKER_SECRET_ENV, child_proof
from ichat.worker.cli import WorkerOptions
from ichat.worker.gpus import gpu_inventory

log = logging.getLogger("ichat.worker")

MAX_BODY_BYTES = 64 * 1024 * 1024
#: bounds on a multipart form (audio upload): the fields besides the file are small
MAX_FORM_FIELDS = 64
MAX_FORM_FIELD_BYTES = 64 * 1024


@attrs.define
class WorkerState:
    """What the worker is doing now; the engine appears once it has started."""

    options: WorkerOptions
    spec: Any = None  # the parsed EngineSpec, known before the engine starts
    phase: str = LOADING
    engine: Engine | None = None
    error: str | None = None
    instance_id: str = attrs.field(factory=lambda: uuid.uuid4().hex)
    started_at: float = attrs.field(factory=time.time)
    inflight: int = 0
    #: set when this worker is a managed child of a gateway (see ichat.protocol): it proves that
    #: with its heartbeats and when a restarted gateway asks before adopting it
    child_secret: str | None = None


def take_child_secret() -> str | None:
    """The secret the gateway's supervisor handed this process, removed from the environment so
    that the engine's subprocesses do not inherit it."""
    return os.environ.pop(WORKER_SECRET_ENV, None) or None


class WorkerMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "ichat_worker_requests", "Requests served by this worker", ["route", "status"], registry=self.registry
        )
        self.duration = Histogram(
            "ichat_worker_request_duration_seconds",
            "Time from request to the last byte of the answer",
            ["route"],
            registry=self.registry,
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300),
        )
        self.inflight = Gauge("ichat_worker_requests_inflight", "Requests in progress", ["route"], registry=self.registry)
        self.engine_unfinished = Gauge(
            "ichat_worker_engine_unfinished_requests",
            "Requests the engine still tracks (running or waiting); 0 after every request finished or was aborted",
            registry=self.registry,
        )
        self.up = Gauge("ichat_worker_ready", "1 when the engine serves", registry=self.registry)
        gpu_labels = ["index", "uuid", "name"]
        self.gpu_memory_used = Gauge(
            "ichat_worker_gpu_memory_used_bytes", "Memory in use on a GPU this worker sees (NVML)", gpu_labels, registry=self.registry
        )
        self.gpu_memory_total = Gauge(
            "ichat_worker_gpu_memory_total_bytes", "Memory of a GPU this worker sees (NVML)", gpu_labels, registry=self.registry
        )
        self.gpu_utilization = Gauge(
            "ichat_worker_gpu_utilization_ratio", "Compute utilization of a GPU this worker sees (NVML)", gpu_labels, registry=self.registry
        )

    def set_gpus(self, gpus: list[dict[str, Any]]) -> None:
        """Replace the GPU series with the current inventory (no GPUs: no series)."""
        for gauge in (self.gpu_memory_used, self.gpu_memory_total, self.gpu_utilization):
            gauge.clear()
        for gpu in gpus:
            labels = (str(gpu["index"]), gpu["uuid"], gpu["name"])
            self.gpu_memory_used.labels(*labels).set(gpu["memory_used_mib"] * 2**20)
            self.gpu_memory_total.labels(*labels).set(gpu["memory_total_mib"] * 2**20)
            if gpu.get("utilization_pct") is not None:
                self.gpu_utilization.labels(*labels).set(gpu["utilization_pct"] / 100)


WORKER_STATE = web.AppKey("worker_state", WorkerState)
WORKER_METRICS = web.AppKey("worker_metrics", WorkerMetrics)
LOG_HUB = web.AppKey("log_hub", LogHub)
GPU_INVENTORY: web.AppKey[Callable[[], list[dict[str, Any]]]] = web.AppKey("gpu_inventory")


def _ready_engine(state: WorkerState) -> Engine:
    if state.phase == READY and state.engine is not None:
        return state.engine
    if state.phase == DRAINING:
        raise ServiceUnavailable("worker is draining for shutdown", code="worker_draining")
    if state.phase == ERROR:
        raise ServiceUnavailable(f"engine failed: {state.error}", code="engine_error", retry_after_s=30)
    raise ServiceUnavailable("model is still loading", code="model_loading", retry_after_s=5)


async def handle_openai(route: str, request: web.Request) -> web.StreamResponse:
    state = request.app[WORKER_STATE]
    metrics = request.app[WORKER_METRICS]
    engine = _ready_engine(state)
    kinds = engine_kinds(engine)
    if route not in kinds:
        raise NotFound(
            f"The model '{_model_name(state)}' does not serve {request.path}; {served_summary(kinds)}.",
            code="unsupported_route",
        )
    if route in MULTIPART_ROUTES:
        body = await read_form(request)
    else:
        raw = await request.read()
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            raise InvalidRequest(f"request body is not valid JSON: {exc}") from exc
        if not isinstance(body, dict):
            raise InvalidRequest("request body must be a JSON object")
        if route == CHAT and IMAGE_INPUT not in kinds and has_image_parts(body):
            raise InvalidRequest(
                f"The model '{_model_name(state)}' does not take image input; {served_summary(kinds)}.",
                param="messages",
                code="unsupported_input",
            )

    # The gateway always sends an id of its own making (unguessable); a client's own id comes
    # beside it as a correlation id, for log lines only, never the engine's key.
    request_id = request.headers.get("X-Request-Id") or uuid.uuid4().hex
    correlation = _correlation(request.headers.get("X-Ichat-Correlation-Id"))

    async def is_disconnected() -> bool:
        transport = request.transport
        return transport is None or transport.is_closing()

    ctx = RequestContext(headers=request.headers, request_id=request_id, is_disconnected=is_disconnected)
    started = time.monotonic()
    status = 499  # client closed: what is recorded when the request is cancelled midway
    state.inflight += 1
    metrics.inflight.labels(route).inc()
    try:
        result = await engine.handle(route, body, ctx)
        if isinstance(result, JSONResult):
            status = result.status
            return web.Response(
                status=result.status,
                body=result.body,
                content_type="application/json",
                headers={"X-Request-Id": request_id},
            )
        response = web.StreamResponse(
            status=200,
            headers={
                "Content-Type": "text/event-stream",
                "Cache-Control": "no-cache",
                "X-Request-Id": request_id,
            },
        )
        try:
            await response.prepare(request)
            async for chunk in result.chunks:
                await response.write(chunk)
            await response.write_eof()
        except BaseException:
            # Client gone (reset on write, or the handler cancelled on disconnect): stop the
            # engine's work for this request now rather than when the generator is collected.
            await result.abort()
            raise
        status = 200
        return response
    finally:
        state.inflight -= 1
        elapsed = time.monotonic() - started
        metrics.inflight.labels(route).dec()
        metrics.requests.labels(route, str(status)).inc()
        metrics.duration.labels(route).observe(elapsed)
        log.info(
            "request %s%s %s -> %d in %.3fs",
            request_id, f" (correlation {correlation})" if correlation else "", request.path, status, elapsed,
        )  # fmt: skip


def _correlation(value: str | None) -> str | None:
    """A client's correlation id as the gateway passed it: printable ASCII, bounded."""
    if not value:
        return None
    cleaned = "".join(c for c in value[:200] if "!" <= c <= "~")
    return cleaned or None


def served_summary(kinds: frozenset[str]) -> str:
    """Pure: how error messages say what a worker serves."""
    paths = [ROUTE_PATHS[r] for r in ROUTES if r in kinds]
    extra = " (with image input)" if IMAGE_INPUT in kinds else ""
    return f"this worker serves: {', '.join(paths) or 'nothing'}{extra}"


def has_image_parts(body: dict[str, Any]) -> bool:
    """Pure: whether a chat request's messages carry an image part."""
    messages = body.get("messages")
    if not isinstance(messages, list):
        return False
    for message in messages:
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, list):
            for part in content:
                if isinstance(part, dict) and (part.get("type") in ("image_url", "input_image", "image") or "image_url" in part):
                    return True
    return False


async def read_form(request: web.Request) -> dict[str, Any]:
    """A multipart/form-data body as a dict: text fields as strings (a repeated field, or one
    named ``x[]``, as a list), the one file part as an :class:`UploadedFile`. The whole body is
    bounded by the app's ``client_max_size``; fields and their count are bounded here."""
    if request.content_length is not None and request.content_length > request.client_max_size:
        raise PayloadTooLarge(f"request body is larger than the worker's limit of {request.client_max_size / 2**20:g} MB")
    if not request.content_type.startswith("multipart/form-data"):
        raise InvalidRequest("this route takes a multipart/form-data body (the audio as a 'file' part)")
    try:
        reader = await request.multipart()
        form: dict[str, Any] = {}
        count = 0
        while (part := await reader.next()) is not None:
            count += 1
            if count > MAX_FORM_FIELDS:
                raise InvalidRequest(f"the form has more than {MAX_FORM_FIELDS} parts")
            if not isinstance(part, BodyPartReader) or not part.name:
                raise InvalidRequest("every form part must be a named field")
            if part.filename is not None:
                if any(isinstance(v, UploadedFile) for v in form.values()):
                    raise InvalidRequest("the form carries more than one file")
                form[part.name] = UploadedFile(
                    filename=part.filename,
                    content_type=part.headers.get("Content-Type", "application/octet-stream"),
                    data=await _read_part(part, request.client_max_size),
                )
                continue
            raw = await _read_part(part, MAX_FORM_FIELD_BYTES)
            value = raw.decode(part.get_charset(default="utf-8"), errors="replace")
            if part.name in form or part.name.endswith("[]"):
                previous = form.get(part.name, [])
                form[part.name] = [*(previous if isinstance(previous, list) else [previous]), value]
            else:
                form[part.name] = value
    except (ValueError, AssertionError, LookupError) as exc:  # malformed multipart framing
        raise InvalidRequest(f"the multipart form could not be read: {exc}") from exc
    return form


async def _read_part(part: BodyPartReader, limit: int) -> bytes:
    """A part's bytes, refusing more than ``limit``. aiohttp's own body limit does not apply
    to a streamed multipart read, so the bound is counted here."""
    chunks, total = [], 0
    while chunk := await part.read_chunk():
        total += len(chunk)
        if total > limit:
            if part.filename is not None:
                raise PayloadTooLarge(f"the uploaded file is larger than the worker's limit of {limit / 2**20:g} MB")
            raise InvalidRequest(f"form field {part.name!r} is longer than {limit} bytes", param=part.name)
        chunks.append(chunk)
    return part.decode(b"".join(chunks))


def _model_name(state: WorkerState) -> str:
    spec = getattr(state.engine, "spec", None) or state.spec
    return (state.options.served_model_name or [spec.model_path if spec else "?"])[0]


async def handle_models(request: web.Request) -> web.Response:
    engine = _ready_engine(request.app[WORKER_STATE])
    kinds = sorted(engine_kinds(engine))
    cards = [{**card, "kinds": kinds} for card in await engine.models()]
    return json_response({"object": "list", "data": cards})


async def handle_health(request: web.Request) -> web.Response:
    state = request.app[WORKER_STATE]
    if state.phase == READY and state.engine is not None:
        try:
            await state.engine.check_health()
        except Exception as exc:  # a dead engine core: report, and let the supervisor decide
            state.phase, state.error = ERROR, f"engine health check failed: {exc}"
            log.error("%s", state.error)
    if state.phase == READY:
        return json_response({"status": "ok"})
    body = {"status": state.phase}
    if state.error:
        body["error"] = state.error
    return json_response(body, 503, headers={"Retry-After": "5"})


async def handle_metrics(request: web.Request) -> web.Response:
    state = request.app[WORKER_STATE]
    metrics = request.app[WORKER_METRICS]
    metrics.up.set(1 if state.phase == READY else 0)
    metrics.set_gpus(await asyncio.to_thread(request.app[GPU_INVENTORY]))  # NVML calls block
    engine_text = b""
    if state.engine is not None:
        unfinished = getattr(state.engine, "unfinished_requests", None)
        if unfinished is not None:
            metrics.engine_unfinished.set(unfinished())
        engine_text = state.engine.metrics_text()
    body = generate_latest(metrics.registry) + engine_text
    return web.Response(body=body, headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"})


async def handle_logs(request: web.Request) -> web.StreamResponse:
    if not request.app[WORKER_STATE].options.log_streaming:
        raise NotFound("log streaming is off for this worker (--no-log-streaming)", code="log_streaming_off")
    return await stream_hubs(request, [request.app[LOG_HUB]])


async def handle_info(request: web.Request) -> web.Response:
    """Worker metadata, the same fields a heartbeat carries; with ``?challenge=``, a managed
    child's proof that it is one (never the secret itself)."""
    state = request.app[WORKER_STATE]
    info = describe(state)
    challenge = request.query.get(CHALLENGE_PARAM)
    if challenge and state.child_secret and len(challenge) <= 128:
        # a restarted gateway asking before it adopts this process (ichat.gateway.supervisor)
        info["proof"] = child_proof(state.child_secret, challenge, info["pid"], state.options.port)
    return json_response(info)


def describe(state: WorkerState) -> dict[str, Any]:
    options = state.options
    engine = state.engine
    spec = getattr(engine, "spec", None) or state.spec
    return {
        "worker_id": options.worker_id,
        "instance_id": state.instance_id,
        "backend": options.backend,
        "model_name": (options.served_model_name or [spec.model_path if spec else None])[0],
        "state": state.phase,
        "host": options.dial_host,
        "port": options.port,
        "version": __version__,
        "inflight": state.inflight,
        "pid": os.getpid(),
        "model_path": spec.model_path if spec else None,
        # what the model serves (routes, plus input kinds): known once the engine is up
        "kinds": sorted(engine_kinds(engine)) if engine is not None else [],
        # set by the gateway's supervisor; lets a restarted gateway adopt this worker safely
        "spec_digest": os.environ.get("ICHAT_SPEC_DIGEST"),
    }


def build_app(
    state: WorkerState,
    hub: LogHub,
    gpu_inventory: Callable[[], list[dict[str, Any]]] = gpu_inventory,
    *,
    max_body_bytes: int = MAX_BODY_BYTES,
) -> web.Application:
    app = web.Application(middlewares=[error_middleware("worker", log)], client_max_size=max_body_bytes)
    app[GPU_INVENTORY] = gpu_inventory
    app[WORKER_STATE] = state
    app[WORKER_METRICS] = WorkerMetrics()
    app[LOG_HUB] = hub
    for route in ROUTES:
        app.router.add_post(ROUTE_PATHS[route], functools.partial(handle_openai, route))
    app.router.add_get("/v1/models", handle_models)
    app.router.add_get("/health", handle_health)
    app.router.add_get("/metrics", handle_metrics)
    app.router.add_get("/logs/stream", handle_logs)
    app.router.add_get("/info", handle_info)
    # Log streams never end on their own: without this, SIGTERM would wait out the whole drain
    # timeout for the gateway's open log connection.
    end_streams_on_shutdown(app)
    return app
