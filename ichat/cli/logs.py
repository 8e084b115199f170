"""``ichat logs``: read /v1/logs/stream over SSE; with ``--follow``, keep reading across dropped
connections.

One worker's stream is resumable by id: after a drop the next request sends ``Last-Event-ID``
with the last id printed, so nothing is lost or printed twice while the gateway still holds it.
The all-workers stream has no resumable id (its ids are per worker, carried in each line), so
a reconnect asks for a backlog again and skips every line at or below the last id printed for
its worker. A new ``X-Log-Epoch`` means the gateway restarted and its ids began again: the
cursor is dropped, and the new backlog printed.
"""

from __future__ import annotations

import asyncio
import random
import sys
from collections.abc import Callable
from typing import Any, TextIO
from urllib.parse import quote

import aiohttp
import orjson

from ichat.cli.client import CliError, GatewayClient, Unreachable
from ichat.logs.sse import EPOCH_HEADER, KEEPALIVE_S, SSEParser

#: seconds without a byte (the gateway sends a keep-alive every KEEPALIVE_S) before the link
#: counts as dead and is reopened
READ_IDLE_S = 3 * KEEPALIVE_S
FIRST_RETRY_S = 0.25
MAX_RETRY_S = 5.0
#: backlog asked for when the all-workers stream reconnects (lines already printed are skipped)
RESYNC_TAIL = 1000


class LogFollower:
    """Prints log events; keeps the cursors a reconnect needs. I/O is in :meth:`run`."""

    def __init__(
        self, client: GatewayClient, worker: str | None, *, tail: int, follow: bool, source: str,
        out: TextIO = sys.stdout, err: TextIO = sys.stderr, rng: random.Random | None = None,
        sleep: Callable[[float], Any] = asyncio.sleep,
    ) -> None:
        self.client = client
        self.worker = worker
        self.tail = tail
        self.follow = follow
        self.source = source
        self.out = out
        self.err = err
        self.rng = rng or random.Random()
        self.sleep = sleep
        self.cursor: int | None = None  # one worker: last id printed
        self.seen: dict[str, int] = {}  # all workers: last id printed per worker
        self.epoch: str | None = None
        self.connects = 0

    def _request(self) -> tuple[str, dict[str, str], dict[str, str]]:
        params = {"source": self.source}
        if not self.follow:
            params["follow"] = "false"
        headers: dict[str, str] = {}
        if self.worker is not None:
            path = "/v1/logs/stream/" + quote(self.worker, safe="")
            if self.cursor is not None:
                headers["Last-Event-ID"] = str(self.cursor)
            else:
                params["tail"] = str(self.tail)
        else:
            path = "/v1/logs/stream"
            params["tail"] = str(self.tail if not self.seen else RESYNC_TAIL)
        return path, params, headers

    def _print(self, data: str) -> None:
        try:
            line = orjson.loads(data)
            text, line_id, worker_id = str(line["line"]), int(line["id"]), str(line.get("worker_id") or "")
        except (ValueError, KeyError, TypeError):
            print(f"ichat: malformed log event: {data[:200]}", file=self.err)
            return
        if self.worker is not None:
            if self.cursor is not None and line_id <= self.cursor:
                return
            self.cursor = line_id
            print(text, file=self.out, flush=True)
        else:
            if line_id <= self.seen.get(worker_id, 0):
                return
            self.seen[worker_id] = line_id
            print(f"[{worker_id}] {text}", file=self.out, flush=True)

    async def _read_once(self) -> None:
        path, params, headers = self._request()
        async with self.client.stream("GET", path, params=params, headers=headers, what="logs") as resp:
            epoch = resp.headers.get(EPOCH_HEADER)
            if epoch is not None and self.epoch is not None and epoch != self.epoch:
                print("ichat: the gateway's log ids started over (it restarted); reading from its backlog", file=self.err)
                self.epoch, self.cursor, self.seen = epoch, None, {}
                return  # reconnect without the stale cursor
            self.epoch = epoch if epoch is not None else self.epoch
            self.connects += 1
            parser = SSEParser()
            while True:
                chunk = await asyncio.wait_for(resp.content.readany(), READ_IDLE_S)
                if not chunk:
                    return
                for event in parser.feed(chunk):
                    if event.event == "log":
                        self._print(event.data)
                    elif event.event == "dropped":
                        print(f"ichat: lines dropped (this reader fell behind): {event.data}", file=self.err, flush=True)

    async def run(self) -> int:
        failures = 0
        while True:
            connects_before = self.connects
            try:
                await self._read_once()
                if not self.follow:
                    return 0
                reason = "the gateway ended the stream"
            except Unreachable as exc:
                # unreachable from the start: a wrong address, say so; later: wait for it to come back
                if self.connects == 0 or not self.follow:
                    raise
                reason = exc.message
            except CliError:
                raise  # refused (401/403) or gone (404): retrying would not change the answer
            except BrokenPipeError:
                raise  # our reader went away (`| head`), not the gateway
            except (aiohttp.ClientError, asyncio.TimeoutError, OSError, ValueError) as exc:
                if not self.follow:
                    raise CliError(f"logs: the stream broke: {exc or type(exc).__name__}") from exc
                reason = str(exc) or type(exc).__name__
            # a link that came back resets the backoff
            failures = 1 if self.connects > connects_before else failures + 1
            delay = min(MAX_RETRY_S, FIRST_RETRY_S * 2 ** (failures - 1)) * self.rng.uniform(0.5, 1.0)
            if failures == 1 or failures % 10 == 0:
                print(f"ichat: log stream lost ({reason}); reconnecting", file=self.err, flush=True)
            await self.sleep(delay)
