"""A request aiohttp cannot parse is logged as one line, not a traceback (real server, real socket)."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest
from aiohttp import web

from ichat.httperrors import MalformedRequestLogFilter, install_log_filters

#: what an HTTP/2 client with prior knowledge sends first (sglang-router does, to every worker)
HTTP2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x18\x04\x00\x00\x00\x00\x00"


@pytest.fixture
def filtered():
    server_log = logging.getLogger("aiohttp.server")
    before = list(server_log.filters)
    install_log_filters()
    install_log_filters()  # idempotent: one filter, however often it is called
    yield [f for f in server_log.filters if isinstance(f, MalformedRequestLogFilter)]
    server_log.filters[:] = before


async def test_an_http2_preface_is_logged_as_one_warning_line(aiohttp_server: Any, filtered, caplog) -> None:
    assert len(filtered) == 1
    server = await aiohttp_server(web.Application())
    caplog.set_level(logging.DEBUG, logger="aiohttp.server")
    reader, writer = await asyncio.open_connection(server.host, server.port)
    writer.write(HTTP2_PREFACE)
    await writer.drain()
    answer = await asyncio.wait_for(reader.read(), 10)  # aiohttp answers 400 and closes
    writer.close()
    assert answer.split(b" ")[1] == b"400", answer[:80]
    records = [r for r in caplog.records if r.name == "aiohttp.server"]
    assert records, "aiohttp logged nothing for the malformed request"
    for record in records:
        assert record.exc_info is None and record.levelno == logging.WARNING, record
        assert "malformed HTTP request answered with 400" in record.getMessage()
        assert "\n" not in record.getMessage()


def test_other_server_errors_keep_their_traceback() -> None:
    try:
        raise RuntimeError("a real bug")
    except RuntimeError:
        import sys

        record = logging.LogRecord("aiohttp.server", logging.ERROR, __file__, 1, "Error handling request", None, sys.exc_info())
    assert MalformedRequestLogFilter().filter(record) and record.exc_info is not None and record.levelno == logging.ERROR
