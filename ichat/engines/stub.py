"""The stub engine: a stand-in with no model, for tests of the control plane and hardware checks.

It is named as what it is everywhere it shows (``owned_by: "ichat-stub"``, ``backend: stub``).
It answers OpenAI requests with canned text at once, so tests about routing, registration,
supervision and log transport run in seconds instead of waiting ~35 s for a real engine; and
it starts a child process that prints numbered lines, standing in for an engine's subprocess
(the log-capture path is the same as vLLM's EngineCore). On a GPU machine it reports the CUDA
devices torch sees (``cuda_devices`` in its model card), which is how the GPU-pinning check
verifies what a worker was given. Every real-model test uses vLLM, never this.

Flags: --model NAME, --served-model-name NAME, --stub-log-interval S (child prints a line every
S seconds; 0 = no child), --stub-latency S (delay per request), --stub-chunks N (stream length),
--stub-fail-start (raise while starting, to test crash handling).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time

from collections.abc import AsyncIterator
from typing import Any

import orjson

from ichat.engines.base import CHAT, COMPLETIONS, EMBEDDINGS, EngineLoad, EngineSpec, JSONResult, RequestContext, Result, StreamResult
from ichat.errors import error_body

_CHILD = """
import sys, time
interval = float(sys.argv[1]); n = 0
print("stub engine child started", flush=True)
while True:
    n += 1
    print(f"stub engine line {n}", flush=True)
    time.sleep(interval)
"""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m ichat.worker --backend stub", allow_abbrev=False)
    parser.add_argument("--model", required=True)
    parser.add_argument("--served-model-name", nargs="+", default=None)
    parser.add_argument("--stub-log-interval", type=float, default=0.0)
    parser.add_argument("--stub-latency", type=float, default=0.0)
    parser.add_argument("--stub-chunks", type=int, default=8)
    parser.add_argument("--stub-fail-start", action="store_true")
    return parser


class StubEngineFactory:
    name = "stub"

    def parse_args(self, argv: list[str], *, served_model_name: list[str] | None = None) -> EngineSpec:
        args = _parser().parse_args(argv)
        names = tuple(served_model_name or args.served_model_name or [args.model])
        return EngineSpec(
            backend=self.name, model_path=args.model, served_model_names=names, engine_args=args, canonical_args=tuple(argv)
        )

    async def start(self, spec: EngineSpec) -> StubEngine:
        engine = StubEngine(spec)
        await engine.start()
        return engine


def _cuda_devices() -> list[dict[str, Any]]:
    try:
        import torch
    except ImportError:
        return []
    try:
        if not torch.cuda.is_available():
            return []
        return [
            {"cuda_index": i, "uuid": f"GPU-{torch.cuda.get_device_properties(i).uuid}", "name": torch.cuda.get_device_name(i)}
            for i in range(torch.cuda.device_count())
        ]
    except Exception:
        return []


class StubEngine:
    def __init__(self, spec: EngineSpec) -> None:
        self.spec = spec
        self._args = spec.engine_args
        self._child: asyncio.subprocess.Process | None = None
        self._running = 0
        self.cuda_devices: list[dict[str, Any]] = []

    async def start(self) -> None:
        if self._args.stub_fail_start:
            raise RuntimeError("stub engine asked to fail at start (--stub-fail-start)")
        if self._args.stub_log_interval > 0:
            # Inherits fds 1/2 like a real engine subprocess, so its lines take the same path.
            self._child = await asyncio.create_subprocess_exec(
                sys.executable, "-c", _CHILD, str(self._args.stub_log_interval)
            )
        self.cuda_devices = await asyncio.to_thread(_cuda_devices)
        print(f"stub engine ready; CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r} "
              f"cuda_devices={orjson.dumps(self.cuda_devices).decode()}", flush=True)

    def supported_routes(self) -> frozenset[str]:
        return frozenset({CHAT, COMPLETIONS, EMBEDDINGS})

    async def handle(self, route: str, body: dict[str, Any], ctx: RequestContext) -> Result:
        model = body.get("model")
        if model not in self.spec.served_model_names:
            return JSONResult(404, orjson.dumps(error_body(f"The model `{model}` does not exist.", "NotFoundError", 404, "model")))
        self._running += 1
        try:
            if self._args.stub_latency:
                await asyncio.sleep(self._args.stub_latency)
        finally:
            self._running -= 1
        created = int(time.time())
        rid = f"stub-{ctx.request_id}"
        if route == EMBEDDINGS:
            inputs = body.get("input")
            inputs = inputs if isinstance(inputs, list) else [inputs]
            data = [{"object": "embedding", "index": i, "embedding": [0.0, 1.0, 0.0]} for i in range(len(inputs))]
            return JSONResult(200, orjson.dumps({"object": "list", "data": data, "model": model}))
        text = f"stub answer from {self.spec.served_model_names[0]}"
        if body.get("stream"):
            return StreamResult(chunks=self._stream(route, rid, model, created), abort=self._abort)
        if route == CHAT:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}
            obj = "chat.completion"
        else:
            choice = {"index": 0, "text": text, "finish_reason": "stop"}
            obj = "text_completion"
        usage = {"prompt_tokens": 1, "completion_tokens": 4, "total_tokens": 5}
        return JSONResult(200, orjson.dumps({"id": rid, "object": obj, "created": created, "model": model, "choices": [choice], "usage": usage}))

    async def _stream(self, route: str, rid: str, model: str, created: int) -> AsyncIterator[bytes]:
        for i in range(self._args.stub_chunks):
            if route == CHAT:
                choice = {"index": 0, "delta": {"content": f"tok{i} "}, "finish_reason": None}
                obj = "chat.completion.chunk"
            else:
                choice = {"index": 0, "text": f"tok{i} ", "finish_reason": None}
                obj = "text_completion"
            yield b"data: " + orjson.dumps({"id": rid, "object": obj, "created": created, "model": model, "choices": [choice]}) + b"\n\n"
            if self._args.stub_latency:
                await asyncio.sleep(self._args.stub_latency)
        yield b"data: [DONE]\n\n"

    async def _abort(self) -> None:
        return None

    async def models(self) -> list[dict[str, Any]]:
        return [
            {"id": name, "object": "model", "created": 0, "owned_by": "ichat-stub", "cuda_devices": self.cuda_devices}
            for name in self.spec.served_model_names
        ]

    async def load(self) -> EngineLoad:
        return EngineLoad(running=self._running)

    def metrics_text(self) -> bytes:
        return b""

    async def check_health(self) -> None:
        if self._child is not None and self._child.returncode is not None:
            raise RuntimeError(f"stub engine child exited with {self._child.returncode}")

    async def shutdown(self) -> None:
        if self._child is not None and self._child.returncode is None:
            self._child.terminate()
            await self._child.wait()



