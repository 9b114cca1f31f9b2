"""The wire protocol: frames, msgpack bodies and their limits (spec: docs/protocol.md).

A frame is a fixed 12-byte header followed by a msgpack body::

    magic "XD" | version u8 | kind u8 | request id u32 | body length u32   (big-endian)

The header carries what the daemon must know without decoding the body: the
master checks magic, version and length (against ``max_frame``) by peeking at
the header alone, and can answer any request id with an error frame even when
the worker that was serving it died.

This module is shared by client and server, so it imports only the standard
library and msgpack.
"""

from __future__ import annotations

import socket
import struct
import time

import msgpack

from expertd.errors import BadRequest, ConnectionLost, ProtocolError, RequestTimeout

TYPE_CHECKING = False  # typing costs milliseconds to import; annotations here are strings
if TYPE_CHECKING:
    from typing import Any

MAGIC = b"XD"
VERSION = 1
HEADER = struct.Struct("!2sBBII")
HEADER_SIZE = HEADER.size
MAX_REQUEST_ID = 0xFFFFFFFF

# Request kinds (client -> daemon).
CALL = 0x01
PING = 0x02
LIST = 0x03
REQUEST_KINDS = frozenset({CALL, PING, LIST})
# Reply kinds (daemon -> client).
RESULT = 0x80
ERROR = 0x81

DEFAULT_SOCKET = "/run/expertd/expertd.sock"
SOCKET_ENV = "EXPERTD_SOCKET"
DEFAULT_MAX_FRAME = 16 * 1024 * 1024

_HTTP_METHODS = (b"GET ", b"POST", b"PUT ", b"HEAD", b"DELE", b"OPTI", b"PATC", b"CONN", b"TRAC", b"PRI ")
HTTP_REFUSAL = (
    b"HTTP/1.0 400 Bad Request\r\nContent-Type: text/plain\r\nConnection: close\r\n\r\n"
    b"This is an expertd socket: it speaks length-prefixed msgpack (docs/protocol.md), not HTTP.\n"
)


def pack_header(kind: int, request_id: int, body_length: int) -> bytes:
    return HEADER.pack(MAGIC, VERSION, kind, request_id, body_length)


def parse_header(header: bytes) -> tuple[int, int, int]:
    """Check a 12-byte header's magic and version; return ``(kind, request_id, body_length)``."""
    magic, version, kind, request_id, length = HEADER.unpack(header)
    if magic != MAGIC:
        raise ProtocolError(f"bad frame magic {magic!r}: the peer does not speak the expertd protocol")
    if version != VERSION:
        raise ProtocolError(f"protocol version {version} is not supported; this side speaks version {VERSION}")
    return kind, request_id, length


def looks_like_http(prefix: bytes) -> bool:
    """Whether a connection opened with an HTTP request line (a common mistake)."""
    return prefix[:4] in _HTTP_METHODS


def _refuse_ext(code: int, data: bytes) -> Any:
    raise ValueError(f"msgpack extension type {code} is not accepted")


def unpack(body: bytes | bytearray | memoryview) -> Any:
    """Decode a body safely: no extension types, str/bytes map keys only, sizes bounded by the body."""
    return msgpack.unpackb(body, raw=False, strict_map_key=True, use_list=True, ext_hook=_refuse_ext)


def _to_builtin(value: Any) -> Any:
    # numpy scalars and arrays (and anything array-like) expose tolist(); experts
    # commonly return them, and converting here keeps numpy out of this module.
    tolist = getattr(value, "tolist", None)
    if callable(tolist):
        return tolist()
    if isinstance(value, (set, frozenset)):
        return list(value)
    raise TypeError(f"values of type {type(value).__module__}.{type(value).__qualname__} cannot be sent")


def pack(value: Any) -> bytes:
    """Encode a body: bytes stay bytes, tuples become lists, numpy values become lists/numbers."""
    return msgpack.packb(value, use_bin_type=True, default=_to_builtin)


def encode_frame(kind: int, request_id: int, body: bytes) -> bytes:
    return pack_header(kind, request_id, len(body)) + body


def encode_call(request_id: int, expert: str, args: list | tuple, kwargs: dict) -> bytes:
    return encode_frame(CALL, request_id, pack([expert, list(args), kwargs]))


def decode_call(body: bytes | bytearray) -> tuple[str, list, dict]:
    """Decode and check a CALL body: ``[expert, args, kwargs]``."""
    try:
        value = unpack(body)
    except (ValueError, TypeError) as exc:
        raise BadRequest(f"request body is not valid msgpack: {exc}") from None
    if not (isinstance(value, list) and len(value) == 3):
        raise BadRequest("a call body must be the array [expert, args, kwargs]")
    expert, args, kwargs = value
    if not isinstance(expert, str):
        raise BadRequest(f"expert name must be a string, not {type(expert).__name__}")
    if not isinstance(args, list):
        raise BadRequest(f"args must be an array, not {type(args).__name__}")
    if not isinstance(kwargs, dict) or not all(isinstance(k, str) for k in kwargs):
        raise BadRequest("kwargs must be a map with string keys")
    return expert, args, kwargs


def recv_exact(sock: socket.socket, size: int, deadline: float | None = None) -> bytearray:
    """Read exactly ``size`` bytes, before ``deadline`` (a time.monotonic() value) if given."""
    buf = bytearray(size)
    view = memoryview(buf)
    got = 0
    while got < size:
        if deadline is not None:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise RequestTimeout(f"timed out after reading {got} of {size} bytes")
            sock.settimeout(remaining)
        try:
            n = sock.recv_into(view[got:], size - got)
        except TimeoutError:
            raise RequestTimeout(f"timed out after reading {got} of {size} bytes") from None
        if n == 0:
            raise ConnectionLost(f"connection closed after {got} of {size} bytes", received=got)
        got += n
    return buf


def read_frame(sock: socket.socket, max_body: int, deadline: float | None = None) -> tuple[int, int, bytearray]:
    """Read one frame; return ``(kind, request_id, body)``."""
    kind, request_id, length = parse_header(bytes(recv_exact(sock, HEADER_SIZE, deadline)))
    if length > max_body:
        raise ProtocolError(f"frame body of {length} bytes exceeds the limit of {max_body} bytes")
    body = recv_exact(sock, length, deadline) if length else bytearray()
    return kind, request_id, body
