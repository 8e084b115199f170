"""Bounds on client connections, against a real gateway process (no upstream needed): at most
``limits.max_connections`` at once, and ``limits.header_timeout_s`` to send a request head."""

from __future__ import annotations

import socket
import time

import pytest

from tests.gateway_proc import GatewayProc

CAP = 16


@pytest.fixture(scope="module")
def gateway(tmp_path_factory):
    proc = GatewayProc(tmp_path_factory.mktemp("conn"), {"limits": {"max_connections": CAP, "header_timeout_s": 1.5}})
    try:
        proc.wait_up()
        yield proc
    finally:
        proc.stop()


def connect(gateway: GatewayProc) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", gateway.port), timeout=5)
    return sock


def read_all(sock: socket.socket, deadline_s: float) -> bytes:
    sock.settimeout(deadline_s)
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except (socket.timeout, ConnectionResetError):
        pass
    return data


def health(gateway: GatewayProc) -> bytes:
    with connect(gateway) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        return read_all(sock, 5)


def test_connections_over_the_cap_get_503_and_the_rest_keep_working(gateway):
    held = [connect(gateway) for _ in range(CAP)]
    try:
        # the gateway accepts in arrival order: the extra one comes after all of these
        with connect(gateway) as extra:
            answer = read_all(extra, 5)
        assert answer.startswith(b"HTTP/1.1 503"), answer
        assert b"too_many_connections" in answer and b"Retry-After: 1" in answer
    finally:
        for sock in held:
            sock.close()
    deadline = time.monotonic() + 5
    while b"200 OK" not in health(gateway):
        assert time.monotonic() < deadline, "connections were not freed"
        time.sleep(0.1)


def test_a_client_trickling_its_headers_is_cut_off(gateway):
    """Before: aiohttp's default keep-alive timer (3630 s) let a slowloris peer hold a
    connection for an hour."""
    with connect(gateway) as slow:
        started = time.monotonic()
        closed_after = None
        for byte in b"GET /health HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 200:
            try:
                slow.sendall(bytes([byte]))
            except (BrokenPipeError, ConnectionResetError):
                closed_after = time.monotonic() - started
                break
            slow.settimeout(0.05)
            try:
                if slow.recv(1) == b"":
                    closed_after = time.monotonic() - started
                    break
            except socket.timeout:
                pass
            except ConnectionResetError:
                closed_after = time.monotonic() - started
                break
            assert time.monotonic() - started < 10, "the gateway kept a trickling connection open"
        assert closed_after is not None and closed_after < 6, closed_after  # 1.5 s, plus a loaded machine
    assert b"200 OK" in health(gateway)
