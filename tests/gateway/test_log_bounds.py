"""What a worker's log stream can make the gateway hold: bounded events, lines and dead workers."""

from __future__ import annotations

import orjson
import pytest

from ichat.gateway.logs import MAX_LINE_CHARS, LogCollector, _parse_line
from ichat.logs.sse import SSEParser


def test_an_event_that_never_ends_is_refused_not_buffered():
    """Before: the parser's event buffer had no cap: data lines without the closing blank line
    grew it without end."""
    parser = SSEParser(max_line_bytes=1024, max_event_bytes=10_000)
    with pytest.raises(ValueError, match="event larger"):
        for _ in range(1000):
            parser.feed(b"data: " + b"x" * 100 + b"\n")


def test_events_under_the_cap_still_parse_after_a_big_one():
    parser = SSEParser(max_event_bytes=10_000)
    events = parser.feed(b"data: " + b"x" * 9000 + b"\n\n" + b"data: " + b"y" * 9000 + b"\n\n")
    assert [len(e.data) for e in events] == [9000, 9000]


def test_a_huge_log_line_is_cut():
    data = orjson.dumps({"id": 1, "ts": 0.0, "stream": "stdout" * 50, "line": "z" * (MAX_LINE_CHARS * 3)}).decode()
    line_id, _ts, stream, text, _level = _parse_line(data)
    assert line_id == 1 and len(stream) <= 32
    assert len(text) < MAX_LINE_CHARS + 100 and text.endswith("more characters cut]")


async def test_dead_workers_logs_are_kept_within_a_bound():
    """Before: every worker that ever registered kept its hubs after it left."""
    collector = LogCollector(100, keep_dead=3)
    for i in range(10):
        collector.watch(f"w{i}", f"http://127.0.0.1:{10000 + i}")  # not started: no task runs
        collector.console(f"w{i}").append("stdout", f"line of w{i}", 0.0)
        collector.unwatch(f"w{i}")
    assert collector.worker_ids() == ["w7", "w8", "w9"]
    collector.watch("w7", "http://127.0.0.1:10007")  # back: no longer dead
    collector.unwatch("w8")
    collector.watch("wa", "http://127.0.0.1:10010")
    collector.unwatch("wa")
    assert collector.worker_ids() == ["w7", "w8", "w9", "wa"]  # three dead, one followed
    collector.unwatch("w7")  # a fourth dead one: the longest dead (w9) goes
    assert collector.worker_ids() == ["w7", "w8", "wa"]
    assert collector.console_hub("w9") is None and collector.console_hub("w8") is not None
    await collector.close()
