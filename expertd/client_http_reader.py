"""The remote client's HTTP/1.1 reply reader: one reply off a connection, its framing parsed strictly.

State it owns: none beyond one reply's bytes while they are read (:class:`Reader`).

Used by :mod:`expertd.client_http` alone (standard library and :mod:`expertd.errors` only).  The
daemon's replies are simple (Content-Length, no trailers); a proxy's chunked or close-delimited ones
are read too.  Framing is parsed strictly -- Content-Length as ASCII digits and one value, a chunk size
as hex digits, sizes checked before they are read, never Transfer-Encoding beside Content-Length --
because a reply read with a wrong length leaves the next reply on a kept-alive connection answering the
wrong request (response desync): every malformed reply is a ProtocolError, and the caller closes the
connection.  ``Stale``: the peer closed before the first byte of the reply, so the request was not
served and may be sent again.
"""

from __future__ import annotations

from expertd.errors import ConnectionLost, ProtocolError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

_READ = 64 * 1024
_MAX_HEAD = 64 * 1024  # a reply's status line and headers
_MAX_BODY = 1 << 30  # as the socket client's largest reply
_HEX = frozenset(b"0123456789abcdefABCDEF")


class Stale(Exception):
    """The server closed a pooled connection before any byte of the reply: the request was not served."""


class Reply:
    __slots__ = ("body", "headers", "reason", "status", "will_close")

    def __init__(self, status: int, reason: str, headers: dict, body: bytes, will_close: bool) -> None:
        self.status, self.reason, self.headers, self.body, self.will_close = status, reason, headers, body, will_close


class Reader:
    """Bytes of one reply as they arrive; whether any arrived (none: the request was never served)."""

    __slots__ = ("data", "received", "sock")

    def __init__(self, sock: Any) -> None:
        self.sock = sock
        self.data = bytearray()
        self.received = 0

    def fill(self) -> None:
        try:
            chunk = self.sock.recv(_READ)
        except TimeoutError:
            raise
        except OSError as exc:  # (a reset; TLS errors are OSErrors too)
            if not self.received:
                raise Stale(exc.strerror or str(exc)) from None
            raise ConnectionLost(exc.strerror or str(exc), self.received) from None
        if not chunk:
            if not self.received:
                raise Stale("closed with no reply")
            raise ConnectionLost("closed mid-reply", self.received)
        self.received += len(chunk)
        self.data += chunk

    def until(self, mark: bytes, limit: int) -> bytes:
        """The bytes before ``mark`` (consumed with it)."""
        start = 0
        while (end := self.data.find(mark, start)) < 0:
            if len(self.data) > limit:
                raise ProtocolError(f"a line of the reply is longer than {limit} bytes")
            start = max(len(self.data) - len(mark) + 1, 0)
            self.fill()
        found = bytes(self.data[:end])
        del self.data[: end + len(mark)]
        return found

    def exact(self, size: int) -> bytes:
        while len(self.data) < size:
            self.fill()
        found = bytes(self.data[:size])
        del self.data[:size]
        return found


def read_reply(sock: Any, head_only: bool) -> Reply:
    """Read one HTTP/1.x reply (interim 1xx ones skipped); Stale when the peer closed before its first byte."""
    reader = Reader(sock)
    while True:
        lines = reader.until(b"\r\n\r\n", _MAX_HEAD).decode("latin-1").split("\r\n")
        version, _, rest = lines[0].partition(" ")
        code, _, reason = rest.partition(" ")
        if not version.startswith("HTTP/1.") or len(code) != 3 or not (code.isascii() and code.isdigit()):
            raise ProtocolError(f"not an HTTP/1.1 status line: {lines[0]!r:.100}")
        status = int(code)
        if status >= 200:
            break
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, colon, value = line.partition(":")
        if colon:
            name = name.strip().lower()
            if name in headers:  # (a repeated header is one list, RFC 9110 5.3: two Content-Lengths are caught below)
                headers[name] += ", " + value.strip()
            else:
                headers[name] = value.strip()
    connection = headers.get("connection", "").lower()
    will_close = "close" in connection or (version == "HTTP/1.0" and "keep-alive" not in connection)
    # The framing is parsed strictly: a reply read with the wrong length desynchronises a kept-alive connection.
    if head_only or status in (204, 304):
        body = b""
    elif "transfer-encoding" in headers:  # (a proxy's)
        if headers["transfer-encoding"].lower() != "chunked":  # (the client asks for no other coding)
            raise ProtocolError(f"a Transfer-Encoding other than chunked: {headers['transfer-encoding']!r:.60}")
        if "content-length" in headers:  # RFC 9112 6.3: chunked wins, but it "ought to be handled as an error"
            raise ProtocolError("a reply with both Transfer-Encoding and Content-Length: its length is ambiguous")
        parts, total = [], 0
        while size := _chunk_size(reader.until(b"\r\n", _MAX_HEAD)):
            total += size  # (checked before the chunk is read, not after)
            if total > _MAX_BODY:
                raise ProtocolError(f"a chunked reply larger than {_MAX_BODY} bytes")
            parts.append(reader.exact(size))
            if reader.exact(2) != b"\r\n":
                raise ProtocolError(f"a chunk of {size} bytes is not followed by CRLF")
        total = 0
        while line := reader.until(b"\r\n", _MAX_HEAD):  # trailers, up to the empty line
            total += len(line)
            if total > _MAX_HEAD:
                raise ProtocolError(f"trailers longer than {_MAX_HEAD} bytes")
        body = b"".join(parts)
    elif "content-length" in headers:
        size = _content_length(headers["content-length"])
        if size > _MAX_BODY:
            raise ProtocolError(f"a reply of {headers['content-length']:.30} bytes is larger than the client accepts")
        body = reader.exact(size)
    else:  # (HTTP/1.0 style: the body ends when the connection does)
        while len(reader.data) <= _MAX_BODY:
            try:
                reader.fill()
            except ConnectionLost:
                break
        else:
            raise ProtocolError(f"a reply larger than {_MAX_BODY} bytes")
        body, will_close = bytes(reader.data), True
        reader.data.clear()
    if reader.data:  # one request in flight: nothing may follow its reply
        will_close = True
    return Reply(status, reason, headers, body, will_close)


def _content_length(value: str) -> int:
    """A Content-Length: ASCII digits; repeated (``5, 5``: two headers) only with one value."""
    size = value
    if not (value.isdigit() and value.isascii()):  # (not int(): it takes "-1", "+1", "0_1", " 1")
        sizes = {size.strip() for size in value.split(",")}
        size = sizes.pop()
        if sizes or not (size.isdigit() and size.isascii()):
            raise ProtocolError(f"Content-Length {value!r:.60} is not one decimal number")
    return int(size) if len(size) < 20 else _MAX_BODY + 1  # (int() refuses 4300 digits)


def _chunk_size(line: bytes) -> int:
    """A chunk's size line: hex digits, then any extensions after ';' (ignored, as RFC 9112 7.1.1 allows)."""
    digits = line.partition(b";")[0].rstrip(b" \t")
    if not digits or not _HEX.issuperset(digits) or len(digits) > 16:
        raise ProtocolError(f"a chunk size that is not hexadecimal digits: {line!r:.60}")
    return int(digits, 16)
