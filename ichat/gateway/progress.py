"""Progress where a person waits: while the gateway starts its managed workers, one line per
state change and per engine loading step, then a ready block with a curl line and an SDK example.

    supervisor states (polled) ─┐
    console hub of each managed ├─► StartupReport (pure: what to print) ─► write(line)
    worker (engine's own lines) ┘

Only the steps that tell how far loading has come are printed (vLLM's "Loading weights took",
"init engine ... took", the KV cache size, the worker's "ready" line, errors), not the engine's
whole log: that stays with ``ichat logs WORKER``. After the ready block, later state changes
(a crash, a restart) still get one line each.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import sys
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from typing import Any

from aiohttp import web

log = logging.getLogger("ichat.gateway.progress")

POLL_S = 0.25
PREFIX = "ichat ▸ "

# vLLM's lines as its subprocesses print them: "(EngineCore pid=12) INFO 12-01 04:40:00 [core.py:99] text"
_VLLM_PREFIX = re.compile(r"^(?:\(\w+ pid=\d+\)\s+)?(?:DEBUG|INFO|WARNING|ERROR|CRITICAL)\s+\d\d-\d\d \d\d:\d\d:\d\d(?:\.\d+)?\s+\[[^\]]*\]\s+")
# Python logging as the worker formats it: "2026-12-01 04:40:00,123 INFO ichat.worker: text"
_LOGGING_PREFIX = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ (?:DEBUG|INFO|WARNING|ERROR|CRITICAL) [\w.]+: ")
_LOADING_STEPS = re.compile(
    r"Resolved architecture|Using max model len|Starting to load model|Loading weights took|Model loading took"
    r"|Loading safetensors checkpoint shards:\s+100%|KV cache size|Maximum concurrency|init engine .* took"
    r"|engine ready|listening on|iChat worker ready|Traceback|Error:|ERROR|CRITICAL"
)
_MAX_LINE = 200
_BAR_TAIL = re.compile(r"\s*\[[^\]]*\]\s*$")


def loading_step(line: str) -> str | None:
    """Pure: the short form of an engine log line that marks a loading step, or None."""
    if not _LOADING_STEPS.search(line):
        return None
    text = _LOGGING_PREFIX.sub("", _VLLM_PREFIX.sub("", line.strip()))
    return text if len(text) <= _MAX_LINE else text[: _MAX_LINE - 1] + "…"


class StartupReport:
    """Pure: snapshots of the managed workers in, lines to print out."""

    def __init__(self, waiting_for: Iterable[str]) -> None:
        self.waiting_for = set(waiting_for)
        self.states: dict[str, str] = {}
        self.last_step: dict[str, str] = {}
        self.done = not self.waiting_for

    def states_seen(self, snapshots: Iterable[Mapping[str, Any]], elapsed_s: float) -> list[str]:
        lines = []
        for snap in snapshots:
            worker_id, state = snap["worker_id"], snap["managed_state"]
            if self.states.get(worker_id) == state:
                continue
            self.states[worker_id] = state
            detail = []
            if state == "starting" and snap.get("pid"):
                detail.append(f"pid {snap['pid']}")
            if state == "ready":
                detail.append(f"after {elapsed_s:.1f}s")
            if snap.get("message") and state not in ("ready", "starting"):
                detail.append(str(snap["message"]))
            lines.append(f"{worker_id}: {state}" + (f" ({'; '.join(detail)})" if detail else ""))
        return lines

    def engine_line(self, worker_id: str | None, line: str) -> str | None:
        """A loading step of a worker that is still starting, or None."""
        if worker_id is None or self.states.get(worker_id) not in (None, "starting"):
            return None
        step = loading_step(line)
        if step is None:
            return None
        # a progress bar prints its last state more than once, its rate ("[00:00, 5.7it/s]") varying
        key = _BAR_TAIL.sub("", step)
        if self.last_step.get(worker_id) == key:
            return None
        self.last_step[worker_id] = key
        return f"{worker_id}: {step}"

    def finished(self) -> bool:
        """True once, when every worker waited for is ready or has given up."""
        if self.done:
            return False
        if all(self.states.get(w) in ("ready", "failed") for w in self.waiting_for):
            self.done = True
            return True
        return False


def ready_block(gateway_url: str, models: Iterable[str], *, api_key_needed: bool, failed: Iterable[str] = ()) -> list[str]:
    """Pure: what to print once the gateway serves: a curl line and an SDK example."""
    models = sorted(models)
    failed = sorted(failed)
    lines = []
    if failed:
        lines.append(f"not started: {', '.join(failed)} (see `ichat logs WORKER --source console`)")
    if not models:
        lines.append(f"gateway at {gateway_url}: no model is served yet (`ichat launch --help` starts one)")
        return lines
    model = models[0]
    auth = " -H \"Authorization: Bearer $ICHAT_API_KEY\"" if api_key_needed else ""
    key = 'os.environ["ICHAT_API_KEY"]' if api_key_needed else '"unused"'
    lines += [
        f"ready: {', '.join(models)} at {gateway_url}/v1 (console: {gateway_url}/ui, status: `ichat status`)",
        f"  curl {gateway_url}/v1/chat/completions -H 'Content-Type: application/json'{auth} \\",
        f"    -d '{{\"model\": \"{model}\", \"messages\": [{{\"role\": \"user\", \"content\": \"What is the capital of France? Answer in one word.\"}}]}}'",
        f"  python -c 'import os; from openai import OpenAI; c = OpenAI(base_url=\"{gateway_url}/v1\", api_key={key}); "
        f"print(c.chat.completions.create(model=\"{model}\", messages=[{{\"role\": \"user\", \"content\": \"Hi\"}}]).choices[0].message.content)'",
    ]
    return lines


async def report(
    app: web.Application, gateway_url: str, write: Callable[[str], None], clock: Callable[[], float]
) -> None:
    """Print progress for the app's managed workers until cancelled."""
    from ichat.gateway.admin import CONTROL_KEY  # the app's keys; imported late to stay a leaf module
    from ichat.gateway.logs import LOGS_KEY

    control = app[CONTROL_KEY]
    consoles = app[LOGS_KEY].consoles
    started = clock()
    # the control plane's own views (what the admin API serves), not the supervisor's internals
    progress = StartupReport(control.managed_ids())
    sub = consoles.subscribe()
    try:
        while True:
            managed = [v for v in control.worker_views() if v.get("managed_state")]
            for line in progress.states_seen(managed, clock() - started):
                write(PREFIX + line)
            _, lines = sub.take()
            for log_line in lines:
                text = progress.engine_line(log_line.worker_id, log_line.text)
                if text:
                    write(PREFIX + text)
            if progress.finished():
                failed = [w for w in progress.waiting_for if progress.states.get(w) == "failed"]
                models = control.cluster_status().get("models") or {}
                for text in ready_block(gateway_url, models, api_key_needed=bool(control.config.auth.api_keys), failed=failed):
                    write(text if text.startswith("  ") else PREFIX + text)  # commands stay copyable
            await sub.wait(POLL_S)
            await asyncio.sleep(0.05)  # batch a burst of lines into one pass
    finally:
        consoles.unsubscribe(sub)


def _print(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


@contextlib.asynccontextmanager
async def show_progress(
    app: web.Application, gateway_url: str, *, write: Callable[[str], None] = _print,
    clock: Callable[[], float] | None = None,
) -> AsyncIterator[None]:
    """Print start-up progress while the body runs (the gateway's serve loop)."""
    loop = asyncio.get_running_loop()

    async def guarded() -> None:
        try:
            await report(app, gateway_url, write, clock or loop.time)
        except Exception:  # progress lines are a courtesy: a bug here must not stop the gateway
            log.exception("start-up progress reporting failed; the gateway runs on without it")

    task = asyncio.create_task(guarded(), name="startup-progress")
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
