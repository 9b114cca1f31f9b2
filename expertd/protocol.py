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

import _thread  # (not threading: the client must stay cheap to import)
import struct
import time

import msgpack

from expertd.errors import BadRequest, ConnectionLost, ProtocolError, RemoteError, RequestTimeout, error_from_wire

TYPE_CHECKING = False  # typing costs milliseconds to import; annotations here are strings
if TYPE_CHECKING:
    import socket
    from typing import Any

MAGIC = b"XD"
VERSION = 1
HEADER = struct.Struct("!2sBBII")
HEADER_SIZE = HEADER.size
MAX_REQUEST_ID = 0xFFFFFFFF
MAX_BODY = 0xFFFFFFFF  # the header's length field is 32 bits

# Request kinds (client -> daemon).
CALL = 0x01
PING = 0x02
LIST = 0x03
MAP = 0x04  # many items for one expert: [expert, items] -> one outcome per item (docs/protocol.md, "MAP")
# A document through experts in stages: [target, document(, options)] -> the document with their
# opinions and errors (docs/protocol.md, "PIPELINE").
PIPELINE = 0x05
# Control requests, answered by the master itself (expertctl status, reload, stop, workers N).
STATUS = 0x10
RELOAD = 0x11
STOP = 0x12
SCALE = 0x13
CONTROL_KINDS = frozenset({STATUS, RELOAD, STOP, SCALE})
REQUEST_KINDS = frozenset({CALL, PING, LIST, MAP, PIPELINE}) | CONTROL_KINDS
# Each request kind's name, as the daemon's messages say it ("uid 1000 may not send STOP").
KIND_NAMES = {CALL: "CALL", PING: "PING", LIST: "LIST", MAP: "MAP", PIPELINE: "PIPELINE", STATUS: "STATUS",
              RELOAD: "RELOAD", STOP: "STOP", SCALE: "SCALE"}
# What the logs name a request that names no expert (the access log's target, a debug line): "(ping)", "(stop)"...
KIND_LABELS = {kind: f"({name.lower()})" for kind, name in KIND_NAMES.items()}
# Reply kinds (daemon -> client).
RESULT = 0x80
ERROR = 0x81

DEFAULT_SOCKET = "/run/expertd/expertd.sock"
SOCKET_ENV = "EXPERTD_SOCKET"
DEFAULT_MAX_FRAME = 16 * 1024 * 1024
# The most items one MAP carries: each item is a call, and its outcome is held until the reply is sent.
MAX_MAP_ITEMS = 65536
# A MAP reply's entries: [ITEM_OK, result] or [ITEM_FAILED, error] (the error as an ERROR body carries it).
ITEM_OK, ITEM_FAILED = 0, 1

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


def _refuse_ext(code: int, data: bytes) -> Any:
    raise ValueError(f"msgpack extension type {code} is not accepted")


# An empty array costs one byte on the wire and ~60 bytes decoded; bounding the
# number of containers bounds that amplification (a 16 MiB frame of empty arrays
# would otherwise cost a worker over a gigabyte).
MAX_CONTAINERS = 1_000_000


_unpackb = msgpack.unpackb


def unpack(body: bytes | bytearray | memoryview) -> Any:
    """Decode a body safely: no extension types, str/bytes map keys only, sizes and container count bounded."""
    if len(body) <= MAX_CONTAINERS:  # every container takes at least a byte: too short to exceed the bound
        # (raw=False, strict_map_key=True and use_list=True are msgpack 1.x's defaults: passing
        # them costs a keyword parse per call.)
        return _unpackb(body, ext_hook=_refuse_ext)
    count = 0

    def counted(container: Any) -> Any:
        nonlocal count
        count += 1
        if count > MAX_CONTAINERS:
            raise ValueError(f"more than {MAX_CONTAINERS} arrays and maps")
        return container

    return msgpack.unpackb(body, raw=False, strict_map_key=True, use_list=True, ext_hook=_refuse_ext,
                           list_hook=counted, object_hook=counted)


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
    local = _per_thread
    packer = getattr(local, "packer", _NONE_YET)
    if packer is None:  # in use further up this thread's stack (a tolist() that packs): not re-entrant
        return msgpack.packb(value, use_bin_type=True, default=_to_builtin)
    if packer is _NONE_YET:
        packer = msgpack.Packer(use_bin_type=True, default=_to_builtin)
    local.packer = None
    try:
        data = packer.pack(value)
    except BaseException:
        local.packer = packer  # (a Packer resets its buffer when packing fails)
        raise
    # A Packer keeps its largest buffer: after a big body, start afresh rather than hold it.
    local.packer = packer if len(data) <= _PACKER_KEEPS else _NONE_YET
    return data


# A Packer per thread: msgpack.packb builds a new one on every call, which costs more than
# packing a small body, and one Packer must not be used by two threads at once.
_per_thread = _thread._local()
_NONE_YET = object()
_PACKER_KEEPS = 1 << 20


def encode_frame(kind: int, request_id: int, body: bytes) -> bytes:
    return pack_header(kind, request_id, len(body)) + body


def encode_error(request_id: int, error: RemoteError) -> bytes:
    """An ERROR frame carrying ``error``."""
    return encode_frame(ERROR, request_id, pack(error.to_wire()))


def queued_bytes(fd: int) -> int:
    """How many bytes wait unread in a socket (FIONREAD); server side only."""
    import fcntl  # imported here: clients never need it, and they must stay cheap to import
    import termios

    return struct.unpack("i", fcntl.ioctl(fd, termios.FIONREAD, b"\0\0\0\0"))[0]


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
    if not isinstance(kwargs, dict) or (kwargs and not all(isinstance(k, str) for k in kwargs)):
        raise BadRequest("kwargs must be a map with string keys")
    return expert, args, kwargs


def encode_map(request_id: int, expert: str, items: list | tuple) -> bytes:
    return encode_frame(MAP, request_id, pack([expert, list(items)]))


def decode_map(body: bytes | bytearray | memoryview) -> tuple[str, list]:
    """Decode and check a MAP body: ``[expert, items]``, at most MAX_MAP_ITEMS items."""
    try:
        value = unpack(body)
    except (ValueError, TypeError) as exc:
        raise BadRequest(f"request body is not valid msgpack: {exc}") from None
    if not (isinstance(value, list) and len(value) == 2):
        raise BadRequest("a map body must be the array [expert, items]")
    expert, items = value
    if not isinstance(expert, str):
        raise BadRequest(f"expert name must be a string, not {type(expert).__name__}")
    if not isinstance(items, list):
        raise BadRequest(f"items must be an array, not {type(items).__name__}", expert=expert)
    if len(items) > MAX_MAP_ITEMS:
        raise BadRequest(f"{len(items)} items in one map; the limit is {MAX_MAP_ITEMS}: send them in several maps",
                         expert=expert)
    return expert, items


def encode_pipeline(request_id: int, target: str, document: dict, options: dict | None = None) -> bytes:
    body = [target, document, options] if options else [target, document]
    return encode_frame(PIPELINE, request_id, pack(body))


def decode_pipeline(body: bytes | bytearray | memoryview) -> tuple[str, dict, dict]:
    """Decode and check a PIPELINE body: ``[target, document]`` or ``[target, document, options]``."""
    try:
        value = unpack(body)
    except (ValueError, TypeError) as exc:
        raise BadRequest(f"request body is not valid msgpack: {exc}") from None
    if not (isinstance(value, list) and len(value) in (2, 3)):
        raise BadRequest("a pipeline body must be the array [target, document] or [target, document, options]")
    target, document = value[0], value[1]
    options = value[2] if len(value) == 3 else {}
    if not isinstance(target, str):
        raise BadRequest(f"a pipeline's target must be a string (experts and pipelines, e.g. 'a,b+c'), "
                         f"not {type(target).__name__}")
    if not isinstance(document, dict):
        raise BadRequest(f"a pipeline's document must be a map (a JSON object), not {type(document).__name__}",
                         expert=target)
    if "opinions" in document or "errors" in document:  # (a new document has neither: two tests, not the loop)
        for key in ("opinions", "errors"):
            if key in document and not isinstance(document[key], dict):
                raise BadRequest(f"the document's {key!r} is a {type(document[key]).__name__}, not a map; "
                                 f"the pipeline adds to it", expert=target)
    if not isinstance(options, dict):
        raise BadRequest(f"a pipeline's options must be a map, not {type(options).__name__}", expert=target)
    return target, document, options


def map_outcomes(reply: list) -> list:
    """A MAP reply's body as one result or :class:`RemoteError` per item, in order (the client's side)."""
    if not isinstance(reply, list):
        raise ProtocolError(f"a map reply must be an array, not {type(reply).__name__}")
    outcomes = []
    for entry in reply:
        if not (isinstance(entry, list) and len(entry) == 2 and entry[0] in (ITEM_OK, ITEM_FAILED)):
            raise ProtocolError("a map reply's entries must be [0, result] or [1, error]")
        outcomes.append(entry[1] if entry[0] == ITEM_OK else error_from_wire(entry[1]))
    return outcomes


_STR_SIZES = {0xD9: 1, 0xDA: 2, 0xDB: 4}  # msgpack str 8/16/32: bytes of the length that follows
# The ways msgpack may open an array of 3 (a CALL body) and of 2 (a MAP body): fixarray, array 16, array 32.
CALL_HEADS = (b"\x93", b"\xdc\x00\x03", b"\xdd\x00\x00\x00\x03")
MAP_HEADS = (b"\x92", b"\xdc\x00\x02", b"\xdd\x00\x00\x00\x02")


def expert_name_hint(body_prefix: bytes, heads: tuple[bytes, bytes, bytes] = CALL_HEADS) -> str | None:
    """The expert named by a CALL body (a MAP's: ``heads=MAP_HEADS``), read from its first bytes without decoding
    the rest.

    The master uses it to apply the expert's timeout; None when the prefix is
    too short or not the expected ``[str, ...]`` shape (the worker will say why).
    """
    # Every encoding msgpack allows for [str, ...] of 3 (or 2) is read, not only the usual one: a name the
    # master cannot see would escape its per-expert timeout and quarantine.
    fix, short, long = heads
    if body_prefix[:1] == fix:  # fixarray
        at = 1
    elif body_prefix[:3] == short:  # array 16
        at = 3
    elif body_prefix[:5] == long:  # array 32
        at = 5
    else:
        return None
    if len(body_prefix) <= at:
        return None
    marker = body_prefix[at]
    if 0xA0 <= marker <= 0xBF:  # fixstr
        start, length = at + 1, marker & 0x1F
    elif marker in _STR_SIZES and len(body_prefix) >= at + 1 + _STR_SIZES[marker]:  # str 8, 16, 32
        size = _STR_SIZES[marker]
        start, length = at + 1 + size, int.from_bytes(body_prefix[at + 1 : at + 1 + size], "big")
    else:
        return None
    raw = body_prefix[start : start + length]
    if len(raw) < length:
        return None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return None


def target_hint(body_prefix: bytes) -> str | None:
    """The target a PIPELINE body names (an array of 2, or of 3 with options), like :func:`expert_name_hint`."""
    return expert_name_hint(body_prefix, MAP_HEADS) or expert_name_hint(body_prefix, CALL_HEADS)


def named_hint(kind: int, body_prefix: bytes) -> str | None:
    """What a request of ``kind`` names (an expert, or a pipeline's target) from its body's first bytes."""
    if kind == CALL:
        return expert_name_hint(body_prefix)
    if kind == MAP:  # many calls of one expert: its timeout and quarantine apply as to a call
        return expert_name_hint(body_prefix, MAP_HEADS)
    if kind == PIPELINE:  # experts and pipelines: the plan's timeout applies
        return target_hint(body_prefix)
    return None


# Bytes that can open a msgpack array or map: fixmap, fixarray, map16/32, array16/32.
_CONTAINER_MARKERS = bytes(range(0x80, 0xA0)) + b"\xdc\xdd\xde\xdf"
# A translation table that makes each of them 1 and every other byte 0: counting the 1s after translating is
# cheaper than deleting the others (which builds a table of its own on every call) and measuring what is left.
_MARKER_TABLE = bytes(1 if b in _CONTAINER_MARKERS else 0 for b in range(256))


def check_shape(args: list, kwargs: dict, max_args: int, max_depth: int, body: bytes | bytearray = b"",
                json: bool = False) -> None:
    """Refuse calls with too many arguments or too deeply nested values (BadRequest).

    Nesting cannot be deeper than the number of bytes in ``body`` (msgpack, or
    JSON with ``json``) that could open a container, so most requests are
    cleared by C-speed counts rather than a walk (a model's row of 2,048
    numbers in JSON: a walk of ~0.5 ms).
    """
    if len(args) + len(kwargs) > max_args:
        raise BadRequest(f"{len(args) + len(kwargs)} arguments given; the limit is {max_args} (max_args)")
    # (A memoryview is copied by tobytes: cheaper than bytes().)
    if body and (len(body) < max_depth or (body.count(b"[") + body.count(b"{") if json else (
            body.tobytes() if body.__class__ is memoryview else body).translate(_MARKER_TABLE).count(1)) < max_depth):
        return
    level, depth = [v for v in (*args, *kwargs.values()) if isinstance(v, (list, dict))], 1
    while level:  # breadth first: one list of the containers at each depth
        if depth > max_depth:
            raise BadRequest(f"arguments nest deeper than {max_depth} levels (max_depth)")
        level = [
            child
            for value in level
            for child in (value.values() if isinstance(value, dict) else value)
            if isinstance(child, (list, dict))
        ]
        depth += 1


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
        except (TimeoutError, BlockingIOError):  # BlockingIOError: SO_RCVTIMEO expired
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
