"""A bounded ring buffer of log lines with monotonically increasing ids, and live subscribers.

Pure of I/O: the caller feeds lines (with the time) and reads backlogs; subscribers get a
bounded queue each, so a slow reader loses lines (and is told how many) instead of slowing the
writer or the other readers.
"""

from __future__ import annotations

import asyncio
import re
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
    """A bounded queue of lines; ``dropped`` counts lines lost since the reader last looked."""

    def __init__(self, maxsize: int) -> None:
        self.queue: asyncio.Queue[LogLine] = asyncio.Queue(maxsize)
        self.dropped = 0

    def offer(self, line: LogLine) -> None:
        try:
            self.queue.put_nowait(line)
        except asyncio.QueueFull:
            self.dropped += 1

    def take_dropped(self) -> int:
        dropped, self.dropped = self.dropped, 0
        return dropped


class LogHub:
    def __init__(self, capacity: int = 10_000, *, worker_id: str | None = None) -> None:
        self._lines: deque[LogLine] = deque(maxlen=capacity)
        self._next_id = 1
        self._subscribers: set[Subscription] = set()
        self.worker_id = worker_id

    @property
    def last_id(self) -> int:
        return self._next_id - 1

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

    def extend(self, lines: Iterable[LogLine]) -> None:
        for line in lines:
            self.append(line.stream, line.text, line.ts, level=line.level, line_id=line.id)

    def backlog(self, *, after_id: int | None = None, tail: int | None = None) -> list[LogLine]:
        lines = list(self._lines)
        if after_id is not None:
            lines = [line for line in lines if line.id > after_id]
        if tail is not None:
            lines = lines[-tail:] if tail > 0 else []
        return lines

    def subscribe(self, maxsize: int = 1000) -> Subscription:
        sub = Subscription(maxsize)
        self._subscribers.add(sub)
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        self._subscribers.discard(sub)
