"""Capture everything this process and its children print, at the file-descriptor level.

The engine's own processes (vLLM's EngineCore is a spawned subprocess) inherit fds 1 and 2, so
redirecting those fds into pipes is the one way to see their lines, not only our logging
records. Each pipe is drained by a small reader thread, teed to the original fd (the terminal,
or the gateway's supervisor, still sees everything) and split into lines for the LogHub.

Why threads and not a loop reader: parts of engine start-up block the loop, and an engine
subprocess that fills a pipe nobody drains would block on its next print, deadlocking the
start. The threads only move bytes; lines enter the LogHub on the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import threading
import time
from collections.abc import Callable

from ichat.logs.hub import LogHub

MAX_LINE = 16 * 1024
MAX_PENDING = 100_000  # lines held while the loop is busy; the oldest go first past this


class FdCapture:
    def __init__(self, hub: LogHub, clock: Callable[[], float] = time.time) -> None:
        self._hub = hub
        self._clock = clock
        self._lock = threading.Lock()
        self._pending: list[tuple[str, str, float]] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._drain_scheduled = False
        self._restore: list[tuple[int, int]] = []
        self._threads: list[threading.Thread] = []

    def install(self) -> None:
        """Redirect fds 1 and 2 into pipes. Call first thing, before the engine starts."""
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(OSError, ValueError):  # a closed or broken stream: nothing to flush
                stream.flush()
        for fd, name in ((1, "stdout"), (2, "stderr")):
            saved = os.dup(fd)
            read_end, write_end = os.pipe()
            os.dup2(write_end, fd)
            os.close(write_end)
            os.set_inheritable(saved, False)
            os.set_inheritable(read_end, False)
            self._restore.append((fd, saved))
            thread = threading.Thread(
                target=self._pump, args=(read_end, saved, name), name=f"ichat-capture-{name}", daemon=True
            )
            thread.start()
            self._threads.append(thread)
        # Line-buffer Python's own streams so lines reach the pipe as they are written.
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(AttributeError, OSError, ValueError):  # not a TextIOWrapper, or closed
                stream.reconfigure(line_buffering=True)

    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        """Start delivering lines to the hub on ``loop`` (lines before this are kept)."""
        with self._lock:
            self._loop = loop
        loop.call_soon_threadsafe(self._drain)

    def _pump(self, read_end: int, saved: int, name: str) -> None:
        partial = b""
        while True:
            try:
                data = os.read(read_end, 65536)
            except OSError:
                return
            if not data:
                return
            with contextlib.suppress(OSError):
                os.write(saved, data)
            *lines, partial = (partial + data).split(b"\n")
            if len(partial) > MAX_LINE:
                lines.append(partial)
                partial = b""
            now = self._clock()
            texts = [raw.decode("utf-8", "replace").rstrip("\r") for raw in lines]
            self._push([(name, text, now) for text in texts if text])

    def _push(self, items: list[tuple[str, str, float]]) -> None:
        if not items:
            return
        with self._lock:
            self._pending.extend(items)
            if len(self._pending) > MAX_PENDING:
                del self._pending[: len(self._pending) - MAX_PENDING]
            loop = self._loop if not self._drain_scheduled else None
            if loop is not None:
                self._drain_scheduled = True
        if loop is not None:
            with contextlib.suppress(RuntimeError):  # loop closed at exit
                loop.call_soon_threadsafe(self._drain)

    def _drain(self) -> None:
        with self._lock:
            items, self._pending = self._pending, []
            self._drain_scheduled = False
        for name, text, now in items:
            self._hub.append(name, text, now)

    def uninstall(self, timeout: float = 2.0) -> None:
        """Put the original fds back and let the readers finish the last lines."""
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(OSError, ValueError):  # a closed or broken stream: nothing to flush
                stream.flush()
        for fd, saved in self._restore:
            os.dup2(saved, fd)  # drops our write end; readers see EOF once children are gone
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        for _fd, saved in self._restore:
            with contextlib.suppress(OSError):
                os.close(saved)
        self._restore.clear()
