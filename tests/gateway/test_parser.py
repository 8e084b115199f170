"""The upstream response parser without sockets: bytes in, head and body pieces out.

Examples first (framing cut at every byte, interim answers, bodiless answers, read-until-close,
what is refused), then generated answers (hypothesis), split at random points: a well-formed one
comes out as it went in; a mutated one is either refused with a ProtocolError or framed, never
anything else (no other exception, no answer completed twice).
"""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ichat.gateway.upstream import ProtocolError, ResponseHead, ResponseParser
from ichat.gateway.upstream.parser import MAX_HEAD


class Recorder:
    """Drives a ResponseParser and records what it reports."""

    def __init__(self, method_head: bool = False) -> None:
        self.head = ResponseHead()
        self.heads = 0
        self.body = b""
        self.complete = 0
        self.parser = ResponseParser(self._on_head, self._on_body, self._on_complete)
        self.parser.start(self.head, method_head)

    def _on_head(self) -> None:
        self.heads += 1

    def _on_body(self, data: bytes) -> None:
        self.body += data

    def _on_complete(self) -> None:
        self.complete += 1

    def feed(self, *pieces: bytes) -> Recorder:
        for piece in pieces:
            self.parser.feed(piece)
        return self


def split_everywhere(wire: bytes) -> list[list[bytes]]:
    return [[wire]] + [[wire[:i], wire[i:]] for i in range(1, len(wire))] + [[bytes([b]) for b in wire]]


LENGTH = b"HTTP/1.1 200 OK\r\nContent-Type: Application/JSON\r\nContent-Length: 5\r\nX-A: 1\r\n\r\nhello"
CHUNKED = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3;ext=1\r\nabc\r\n0A\r\n0123456789\r\n0\r\nTrailer: x\r\n\r\n"


@pytest.mark.parametrize("wire", [LENGTH, CHUNKED], ids=["content-length", "chunked"])
def test_answer_framed_the_same_however_it_is_split(wire: bytes):
    for pieces in split_everywhere(wire):
        rec = Recorder().feed(*pieces)
        assert (rec.heads, rec.complete, rec.parser.reusable) == (1, 1, True), pieces
        assert rec.body == (b"hello" if wire is LENGTH else b"abc0123456789")
    rec = Recorder().feed(LENGTH)
    assert rec.head.status == 200 and rec.head.content_type == b"application/json" and rec.head.content_length == 5
    assert (b"X-A", b"1") in rec.head.headers


def test_interim_answers_are_skipped_and_bodiless_answers_end_at_their_head():
    rec = Recorder().feed(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early\r\nLink: x\r\n\r\n" + LENGTH)
    assert rec.head.status == 200 and rec.body == b"hello" and rec.heads == 1
    for status in (204, 304):
        rec = Recorder().feed(b"HTTP/1.1 %d X\r\nContent-Length: 9\r\n\r\n" % status)
        assert rec.complete == 1 and rec.body == b""
    rec = Recorder(method_head=True).feed(b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\n")
    assert rec.complete == 1 and rec.body == b""


def test_read_until_close_ends_at_eof_and_is_never_reused():
    rec = Recorder().feed(b"HTTP/1.0 200 OK\r\n\r\nsome", b" body")
    assert rec.complete == 0 and rec.body == b"some body"
    assert rec.parser.feed_eof() and rec.complete == 1 and not rec.parser.reusable


def test_connection_close_and_leftover_bytes_forbid_reuse():
    assert not Recorder().feed(LENGTH.replace(b"X-A: 1", b"Connection: close")).parser.reusable
    for extra in (b"HTTP/1.1 200 OK\r\n", b"garbage"):
        rec = Recorder().feed(LENGTH + extra)
        assert rec.body == b"hello" and rec.complete == 1 and not rec.parser.reusable
    rec = Recorder().feed(b"HTTP/1.1 204 No Content\r\n\r\nextra")
    assert rec.complete == 1 and not rec.parser.reusable


def test_a_keep_alive_connection_parses_one_answer_after_another():
    rec = Recorder().feed(LENGTH)
    for wire in (CHUNKED, LENGTH):
        rec.body, rec.head = b"", ResponseHead()
        rec.parser.start(rec.head)
        rec.feed(wire)
        assert rec.parser.reusable and rec.head.status == 200
    assert rec.complete == 3 and rec.body == b"hello"


@pytest.mark.parametrize(
    "wire",
    [
        b"HTTP/2 200 OK\r\n\r\n",
        b"HTTP/1.1 20x OK\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nNo colon here\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nName : v\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nA: b\r\n folded\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: -5\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n",
        b"HTTP/1.1 101 Switching\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabcd\r\n",
        b"HTTP/1.1 200 OK\r\nX: " + b"a" * MAX_HEAD,
        b"HTTP/1.1 200 OK\r\nX: a\nContent-Length: 0\r\nContent-Length: 5\r\n\r\nhello",  # bare LF
        b"HTTP/1.1 200 OK\r\nX: a\rContent-Length: 0\r\n\r\n",  # bare CR
        b"HTTP/1.1 200 OK\r\nX\x00: a\r\nContent-Length: 0\r\n\r\n",
        b"HTTP/1.1 200 O\x00K\r\nContent-Length: 0\r\n\r\n",
    ],
)
def test_what_cannot_be_framed_safely_is_refused(wire: bytes):
    with pytest.raises(ProtocolError):
        Recorder().feed(wire)


# -- generated answers ----------------------------------------------------------------------------


def run_ours(pieces: list[bytes]) -> Recorder | None:
    rec = Recorder()
    try:
        rec.feed(*pieces)
    except ProtocolError:
        return None
    return rec


TOKEN = st.text(alphabet="abcdefghijklmnopqrstuvwxyz-XYZ", min_size=1, max_size=12).map(str.encode)
VALUE = st.binary(min_size=0, max_size=20).map(lambda b: bytes(c for c in b if 0x21 <= c <= 0x7E))


@st.composite
def answers(draw: Any) -> tuple[bytes, int, list[tuple[bytes, bytes]], bytes]:
    status = draw(st.sampled_from([200, 201, 400, 404, 429, 500, 502, 503]))
    headers = draw(st.lists(st.tuples(TOKEN, VALUE), max_size=5))
    headers = [(n, v) for n, v in headers if n.lower() not in (b"content-length", b"transfer-encoding", b"connection")]
    body = draw(st.binary(max_size=300))
    head = b"HTTP/1.1 %d X\r\n" % status + b"".join(n + b": " + v + b"\r\n" for n, v in headers)
    if draw(st.booleans()):
        return head + b"Content-Length: %d\r\n\r\n" % len(body) + body, status, headers + [(b"Content-Length", b"%d" % len(body))], body
    cuts = sorted(draw(st.lists(st.integers(0, len(body)), max_size=4)))
    pieces = [body[a:b] for a, b in zip([0, *cuts], [*cuts, len(body)]) if b > a]
    chunks = b"".join(b"%x;x=%d\r\n%s\r\n" % (len(p), i, p) for i, p in enumerate(pieces))
    wire = head + b"Transfer-Encoding: chunked\r\n\r\n" + chunks + b"0\r\nTrailer-X: 1\r\n\r\n"
    return wire, status, headers + [(b"Transfer-Encoding", b"chunked")], body


@st.composite
def mutated(draw: Any) -> bytes:
    wire = bytearray(draw(answers())[0])
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["flip", "insert", "delete"]))
        at = draw(st.integers(0, max(0, len(wire) - 1)))
        byte = draw(st.sampled_from(list(b"\r\n :;0aZ\t\x00-+")))
        if kind == "flip" and wire:
            wire[at] = byte
        elif kind == "insert":
            wire.insert(at, byte)
        elif wire:
            del wire[at]
    return bytes(wire)


def cut(wire: bytes, points: list[int]) -> list[bytes]:
    points = sorted({p % (len(wire) + 1) for p in points})
    return [wire[a:b] for a, b in zip([0, *points], [*points, len(wire)]) if b > a]


FUZZ = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True)


@FUZZ
@given(answers(), st.lists(st.integers(0, 10_000), max_size=6))
def test_well_formed_answers_come_out_as_they_went_in(answer: Any, points: list[int]):
    wire, status, headers, body = answer
    rec = run_ours(cut(wire, points))
    assert rec is not None
    assert (rec.head.status, rec.head.headers, rec.body, rec.complete, rec.parser.reusable) == (status, headers, body, 1, True)


@FUZZ
@given(mutated(), st.lists(st.integers(0, 10_000), max_size=6))
def test_mutated_answers_are_refused_or_framed_never_anything_else(wire: bytes, points: list[int]):
    rec = run_ours(cut(wire, points))  # any exception but ProtocolError fails the test
    if rec is not None:
        assert rec.complete <= 1 and rec.heads <= 1
        if rec.complete:
            start = wire.lstrip(b"\r\n")  # empty lines before an answer are ignored (RFC 9112 §2.2)
            head = start[: start.find(b"\r\n\r\n")]
            unbroken = head.replace(b"\r\n", b"")
            assert b"\x00" not in head and b"\n" not in unbroken and b"\r" not in unbroken
