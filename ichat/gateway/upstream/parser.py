"""A sans-IO HTTP/1.1 response parser: bytes in, a head and body pieces out; no sockets, no loop.

It only frames (RFC 9112): the status line and headers, then a body delimited by
``Content-Length``, by ``chunked`` coding, or by the connection's close; interim answers
(``1xx`` other than 101) are skipped; a bodiless answer (to HEAD, 204, 304) ends at its head.
What it cannot frame safely is a :class:`~ichat.gateway.upstream.errors.ProtocolError`:
a malformed status or header line, a bare CR, LF or NUL in the head, conflicting or non-numeric ``Content-Length``, a transfer
coding other than ``chunked``, bad chunk framing, a head over ``MAX_HEAD``. Trailers are dropped.

Use: ``parser.start(target, method_head)`` before each answer (``target`` receives the head's
fields: any object with the attributes of :class:`ResponseHead`), then ``feed(data)`` as bytes
arrive and ``feed_eof()`` when the peer closes. The three callbacks given at construction are
called as the answer goes: ``on_head()`` once the head is in ``target``, ``on_body(bytes)`` per
piece of body, ``on_complete()`` at its end. ``reusable`` says whether the connection may carry
another request afterwards (keep-alive, and nothing left over).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ichat.gateway.upstream.errors import ProtocolError

#: an answer's head (status line and headers) larger than this is refused
MAX_HEAD = 64 * 1024
#: a chunk-size or trailer line longer than this is refused
MAX_FRAMING_LINE = 4096

_HEX_DIGITS = b"0123456789abcdefABCDEF"

# States
IDLE, HEAD, LENGTH, CHUNK_SIZE, CHUNK_DATA, CHUNK_END, TRAILERS, UNTIL_CLOSE, DONE = range(9)


class ResponseHead:
    """The fields the parser fills in from an answer's head."""

    __slots__ = ("status", "reason", "headers", "content_length", "content_type", "chunked", "keep_alive")

    def __init__(self) -> None:
        self.status = 0
        self.reason = ""
        #: (name, value) pairs as received, hop-by-hop ones included
        self.headers: list[tuple[bytes, bytes]] = []
        self.content_length: int | None = None
        #: the Content-Type header, lower-cased (b"" when absent)
        self.content_type = b""
        self.chunked = False
        self.keep_alive = True


class ResponseParser:
    __slots__ = ("state", "reusable", "_target", "_buf", "_remaining", "_method_head", "_on_head", "_on_body", "_on_complete")

    def __init__(
        self, on_head: Callable[[], None], on_body: Callable[[bytes], None], on_complete: Callable[[], None]
    ) -> None:
        self.state = IDLE
        #: False once the connection must not carry another request
        self.reusable = True
        self._target: Any = None
        self._buf = b""
        self._remaining = 0  # body bytes (Content-Length) or chunk bytes still to come
        self._method_head = False
        self._on_head = on_head
        self._on_body = on_body
        self._on_complete = on_complete

    def start(self, target: Any, method_head: bool = False) -> None:
        """Expect a new answer, its head going into ``target``."""
        self._target = target
        self._method_head = method_head
        self._buf = b""
        self.state = HEAD

    def feed(self, data: bytes) -> None:
        """Bytes received. Raises ProtocolError; bytes after a complete answer mark the
        connection not reusable."""
        state = self.state
        if state == HEAD:
            data = self._parse_head(data)
            if not data:
                return
            state = self.state
        if state == LENGTH:
            remaining = self._remaining
            if len(data) < remaining:
                self._remaining = remaining - len(data)
                self._on_body(data)
                return
            if len(data) > remaining:
                # The answer is whole; what follows it is garbage: never reuse this connection.
                data = data[:remaining]
                self.reusable = False
            self._on_body(data)
            self._complete()
        elif state == UNTIL_CLOSE:
            self._on_body(data)
        elif state in (IDLE, DONE):
            self.reusable = False  # bytes nobody asked for: the peer is out of step with us
        else:
            self._parse_chunks(data)

    def feed_eof(self) -> bool:
        """The peer closed. True when that ended the answer (read-until-close bodies)."""
        self.reusable = False
        if self.state == UNTIL_CLOSE:
            self._complete()
            return True
        return False

    def _complete(self) -> None:
        self.state = DONE
        self._on_complete()

    # -- the head --------------------------------------------------------------------------------

    def _parse_head(self, data: bytes) -> bytes:
        buf = self._buf + data if self._buf else data
        target = self._target
        while True:
            end = buf.find(b"\r\n\r\n")
            if end < 0 or end > MAX_HEAD:
                if len(buf) > MAX_HEAD:
                    raise ProtocolError("upstream response head is too large")
                self._buf = buf
                return b""
            self._buf = b""
            parse_head(buf[:end], target)
            buf = buf[end + 4 :]
            if 100 <= target.status < 200 and target.status != 101:
                continue  # an interim answer (100 Continue, 103 Early Hints): the real one follows
            break
        if target.status == 101:
            raise ProtocolError("upstream switched protocols")
        if not target.keep_alive:
            self.reusable = False
        if self._method_head or target.status in (204, 304):
            self.state = DONE
        elif target.chunked:
            self.state = CHUNK_SIZE
        elif target.content_length is not None:
            self._remaining = target.content_length
            self.state = LENGTH if self._remaining else DONE
        else:
            self.state = UNTIL_CLOSE
            self.reusable = False
        self._on_head()
        if self.state == DONE:
            if buf:
                raise ProtocolError("upstream sent bytes after a bodiless answer")
            self._on_complete()
        return buf

    # -- chunked bodies --------------------------------------------------------------------------

    def _parse_chunks(self, data: bytes) -> None:
        # Hot for streams: one pass, chunk data sliced out and handed on once per read.
        buf = self._buf + data if self._buf else data
        self._buf = b""
        pos, end = 0, len(buf)
        state = self.state
        remaining = self._remaining
        parts = []
        while pos < end:
            if state == CHUNK_DATA:
                if remaining >= end - pos:  # this read ends inside the chunk (or at its end)
                    parts.append(buf[pos:] if pos else buf)
                    remaining -= end - pos
                    pos = end
                    if remaining:
                        break
                else:
                    parts.append(buf[pos : pos + remaining])
                    pos += remaining
                    remaining = 0
                state = CHUNK_END
            elif state == CHUNK_END:
                if end - pos < 2:
                    self._buf = buf[pos:]
                    break
                if not buf.startswith(b"\r\n", pos):
                    raise ProtocolError("upstream chunk data overran its size")
                pos += 2
                state = CHUNK_SIZE
            else:
                line_end = buf.find(b"\r\n", pos)
                if line_end < 0:
                    if end - pos > MAX_FRAMING_LINE:
                        raise ProtocolError("upstream chunk framing line is too long")
                    self._buf = buf[pos:]
                    break
                if state == CHUNK_SIZE:
                    semicolon = buf.find(b";", pos, line_end)  # a chunk extension: ignored
                    size_text = buf[pos:line_end] if semicolon < 0 else buf[pos:semicolon].rstrip(b" \t")
                    pos = line_end + 2
                    if not size_text or size_text.strip(_HEX_DIGITS):
                        raise ProtocolError("upstream sent a bad chunk size")
                    remaining = int(size_text, 16)
                    state = CHUNK_DATA if remaining else TRAILERS
                else:  # TRAILERS: lines until an empty one; trailers are dropped
                    empty = line_end == pos
                    pos = line_end + 2
                    if empty:
                        if pos != end:
                            self.reusable = False  # bytes after a whole answer: never reuse
                        if parts:
                            self._on_body(parts[0] if len(parts) == 1 else b"".join(parts))
                        self._complete()
                        return
        self.state = state
        self._remaining = remaining
        if parts:
            self._on_body(parts[0] if len(parts) == 1 else b"".join(parts))


_CONTENT_LENGTH, _TRANSFER_ENCODING, _CONNECTION, _CONTENT_TYPE = 1, 2, 3, 4
#: the headers the parser acts on (looked up once per header line)
_FRAMING = {
    b"content-length": _CONTENT_LENGTH,
    b"transfer-encoding": _TRANSFER_ENCODING,
    b"connection": _CONNECTION,
    b"content-type": _CONTENT_TYPE,
}


def parse_head(head: bytes, target: Any) -> None:
    """Parse a status line and header lines (without the final blank line) into ``target``."""
    unbroken = head.replace(b"\r\n", b"")
    if b"\n" in unbroken or b"\r" in unbroken or b"\x00" in unbroken:
        # A bare CR or LF ends a line for some parsers and not for others: the classic way to
        # split one answer into two (RFC 9112 §2.2). NUL has no place in a head either.
        raise ProtocolError("upstream sent a bare CR, LF or NUL in its response head")
    lines = head.split(b"\r\n")
    status_line = lines[0]
    version = status_line[:8]
    code = status_line[9:12]
    if (
        (version != b"HTTP/1.1" and version != b"HTTP/1.0")
        or status_line[8:9] != b" "
        or not code.isdigit()
        or status_line[12:13] not in (b" ", b"")
    ):
        raise ProtocolError("upstream did not answer with HTTP/1.x")
    target.status = int(code)
    target.reason = status_line[13:].decode("latin-1")
    keep_alive = version == b"HTTP/1.1"
    length: int | None = None
    chunked = False
    content_type = b""
    headers = []
    framing = _FRAMING.get
    del lines[0]
    for line in lines:
        name, sep, value = line.partition(b":")
        # No name, whitespace before the colon, or an obsolete folded line: RFC 9112 §5.
        if not sep or name[-1:] in b" \t" or line[0] in b" \t":
            raise ProtocolError("upstream sent a malformed header line")
        value = value.strip(b" \t")
        headers.append((name, value))
        kind = framing(name.lower())
        if kind is None:
            continue
        if kind == _CONTENT_LENGTH:
            if not value.isdigit() or (length is not None and int(value) != length):
                raise ProtocolError("upstream sent a bad Content-Length")
            length = int(value)
        elif kind == _CONTENT_TYPE:
            content_type = value.lower()
        elif kind == _TRANSFER_ENCODING:
            if value.lower().rsplit(b",", 1)[-1].strip() != b"chunked":
                raise ProtocolError("upstream sent a transfer coding other than chunked")
            chunked = True
        else:  # Connection
            tokens = {t.strip() for t in value.lower().split(b",")}
            if b"close" in tokens:
                keep_alive = False
            elif b"keep-alive" in tokens:
                keep_alive = True
    if chunked:
        length = None  # RFC 9112 §6.3: Transfer-Encoding wins over Content-Length
    target.headers = headers
    target.content_length = length
    target.content_type = content_type
    target.chunked = chunked
    target.keep_alive = keep_alive
