"""A bounded ring buffer of log lines with monotonically increasing ids, and live subscribers.

Pure of I/O: the caller feeds lines (with the time) and reads backlogs; subscribers get a
bounded buffer each, so a slow reader loses lines (and is told how many) instead of slowing the
writer or the other readers. Everything here runs on the event loop's thread: reading a backlog
and subscribing without an ``await`` in between sees every line exactly once.

    LogHub        one source's lines (a worker's captured output, or the gateway's mirror of it)
    HubGroup      several hubs read as one (all workers); follows hubs added later
    Subscription  one reader's bounded buffer, fed by one hub or by every hub of a group
"""

from __future__ import annotations

import asyncio
import heapq
import re
import uuid
from collections import deque
from collections.abc import Iterable

import attrs

# vLLM: "INFO 11-25 07:40:00 [file.py:12] ..." (optionally after "(EngineCore pid=1) ");
# Python logging default: "WARNING:name:..."; ours: "... INFO ichat.worker: ...".
_LEVEL = re.compile(r"\b(DEBUG|INFO|WARNING|WARN|ERROR|CRITICAL|FATAL)\b")


def parse_level(text: str) -> str | None:
    match = _LEVEL.search(text, 0, 64)
    if match is None:
        return None
    level = match.group(1)
    return {"WARN": "WARNING", "FATAL": "CRITICAL"}.get(level, level)


@attrs.frozen
class LogLine:
    id: int
    ts: float
    stream: str
    text: str
    level: str | None = None
    worker_id: str | None = None

    def to_dict(self) -> dict[str, object]:
        return {
            "id": self.id,
            "ts": self.ts,
            "stream": self.stream,
            "level": self.level,
            "worker_id": self.worker_id,
            "line": self.text,
        }


class Subscription:
    """Lines waiting for one reader, at most ``maxsize``.

    When the buffer is full the oldest line goes and ``dropped`` counts it, so :meth:`take`
    returns how many lines were lost right before the lines it returns (the reader can put its
    marker exactly where the hole is) and a reader that catches up sees the newest lines.
    """

    def __init__(self, maxsize: int = 1000) -> None:
        if maxsize < 1:
            raise ValueError("a subscription holds at least one line")
        self.maxsize = maxsize
        self.dropped = 0
        #: set by :meth:`close`: the reader should finish (its server is shutting down)
        self.closed = False
        self._lines: deque[LogLine] = deque()
        self._ready = asyncio.Event()

    def offer(self, line: LogLine) -> None:
        if len(self._lines) >= self.maxsize:
            self._lines.popleft()
            self.dropped += 1
        self._lines.append(line)
        self._ready.set()

    def pending(self) -> int:
        return len(self._lines)

    def take(self) -> tuple[int, list[LogLine]]:
        """(lines lost since the last take, the lines waiting); empties the buffer."""
        dropped, lines = self.dropped, list(self._lines)
        self.dropped = 0
        self._lines.clear()
        self._ready.clear()
        return dropped, lines

    def close(self) -> None:
        self.closed = True
        self._ready.set()

    async def wait(self, timeout: float | None = None) -> bool:
        """Wait until something can be taken (or the subscription closed); False when
        ``timeout`` passed first."""
        if self._lines or self.dropped or self.closed:
            return True
        try:
            await asyncio.wait_for(self._ready.wait(), timeout)
        except asyncio.TimeoutError:
            return False
        return True


class LogHub:
    def __init__(self, capacity: int = 10_000, *, worker_id: str | None = None) -> None:
        self._lines: deque[LogLine] = deque(maxlen=capacity)
        self._next_id = 1
        self._subscribers: set[Subscription] = set()
        self.worker_id = worker_id
        #: names this hub's id sequence: a reader resuming by id against another epoch (the
        #: worker restarted, ids began again at 1) must start over instead
        self.epoch = uuid.uuid4().hex

    @property
    def last_id(self) -> int:
        return self._next_id - 1

    @property
    def readers(self) -> int:
        """Subscriptions this hub feeds."""
        return len(self._subscribers)

    def append(self, stream: str, text: str, now: float, *, level: str | None = None, line_id: int | None = None) -> LogLine:
        """Add one line. ``line_id`` keeps the source's id (the gateway mirrors a worker's ids)."""
        if line_id is None:
            line_id = self._next_id
        if line_id < self._next_id:
            raise ValueError(f"line id {line_id} is not after {self.last_id}")
        line = LogLine(
            id=line_id,
            ts=now,
            stream=stream,
            text=text,
            level=level if level is not None else parse_level(text),
            worker_id=self.worker_id,
        )
        self._next_id = line_id + 1
        self._lines.append(line)
        for sub in self._subscribers:
            sub.offer(line)
        return line

    def backlog(self, *, after_id: int | None = None, tail: int | None = None) -> list[LogLine]:
        lines = list(self._lines)
        if after_id is not None:
            lines = [line for line in lines if line.id > after_id]
        if tail is not None:
            lines = lines[-tail:] if tail > 0 else []
        return lines

    def subscribe(self, maxsize: int = 1000) -> Subscription:
        sub = Subscription(maxsize)
        self.attach(sub)
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        self._subscribers.discard(sub)

    def close_readers(self) -> None:
        """End every reader's stream (the hub is going away)."""
        for sub in self._subscribers:
            sub.close()

    def attach(self, sub: Subscription) -> None:
        """Feed an existing subscription too (one reader following several hubs)."""
        self._subscribers.add(sub)

    detach = unsubscribe


class HubGroup:
    """Several hubs read as one: interleaved backlogs, and subscriptions that follow every
    member, including hubs added after the subscription. Lines keep their hub's ids, which
    mean nothing across hubs, so a group cannot be resumed by id."""

    def __init__(self, hubs: Iterable[LogHub] = ()) -> None:
        self._hubs: list[LogHub] = list(hubs)
        self._subscribers: set[Subscription] = set()

    @property
    def hubs(self) -> list[LogHub]:
        return list(self._hubs)

    def add(self, hub: LogHub) -> None:
        if any(member is hub for member in self._hubs):
            return
        self._hubs.append(hub)
        for sub in self._subscribers:
            hub.attach(sub)

    def remove(self, hub: LogHub) -> None:
        self._hubs = [member for member in self._hubs if member is not hub]
        for sub in self._subscribers:
            hub.detach(sub)

    def backlog(self, *, after_id: int | None = None, tail: int | None = None) -> list[LogLine]:
        """The last ``tail`` lines of all members together, oldest first (by timestamp)."""
        if after_id is not None:
            raise ValueError("a group of hubs cannot be resumed by id")
        per_hub = [hub.backlog(tail=tail) for hub in self._hubs]
        lines = list(heapq.merge(*per_hub, key=lambda line: line.ts))
        if tail is not None:
            lines = lines[-tail:] if tail > 0 else []
        return lines

    def subscribe(self, maxsize: int = 1000) -> Subscription:
        sub = Subscription(maxsize)
        self._subscribers.add(sub)
        for hub in self._hubs:
            hub.attach(sub)
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        self._subscribers.discard(sub)
        for hub in self._hubs:
            hub.detach(sub)
