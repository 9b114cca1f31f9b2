"""Framing a request from the bytes peeked at, without reading them: pure functions.

The master never reads a request it hands over: it peeks at the first bytes
waiting on a connection and decides from them alone what the connection
speaks, what kind of request is waiting, for which expert, how long it is, and
whether it must be refused.  Those decisions are here, free of sockets, so that
they can be tested as tables of valid and invalid inputs (tests/test_framing.py);
:mod:`expertd.intake` does the peeking.

State owned here: none.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any, NamedTuple

from expertd import http, protocol
from expertd.errors import BadRequest, FrameTooLarge, RemoteError
from expertd.firefly import ROUTES as FIREFLY_ROUTES

MSGPACK, HTTP = "msgpack", "http"

# Read by the master itself: open to every caller unless public_status = no.  Every other control
# kind (RELOAD, STOP, SCALE, any added later) needs control_uids / control_gids.
READ_KINDS = frozenset({protocol.STATUS, protocol.LIST})
MASTER_KINDS = protocol.CONTROL_KINDS | {protocol.LIST}  # answered by the master, never a worker
BAD_MAGIC = ("bad frame magic: this socket speaks the expertd protocol (expertd --help-topic protocol) and HTTP "
             "(expertd --help-topic http)")


class Frame(NamedTuple):
    """What a msgpack request's header (and the start of its body) say."""

    kind: int
    request_id: int | None  # None when the header itself is unreadable
    expert: str | None  # a CALL's or MAP's expert, read from the start of its body (a hint: the worker decodes it)
    size: int  # of the whole frame, header included
    error: RemoteError | None  # why it is refused, if it is


def sniff(head: bytes) -> str | None:
    """What a connection's first bytes (at least one) say it speaks: MSGPACK, HTTP, "" if they cannot
    tell yet, or None if they are neither (the connection is refused with BAD_MAGIC)."""
    if protocol.MAGIC.startswith(head[:2]):
        return MSGPACK
    if http.looks_like_http(head):
        return HTTP
    if len(head) < 4 and http.could_be_http(head):
        return ""
    return None


def undecided(head: bytes) -> bool:
    """Whether a connection's first bytes (maybe none yet) do not yet say which protocol it speaks."""
    return not head or (len(head) < 4 and not protocol.MAGIC.startswith(head[:2]) and http.could_be_http(head))


def frame_of(head: bytes, max_frame: int) -> Frame:
    """Frame a msgpack request from its first bytes (at least a header's worth)."""
    magic, version, kind, request_id, length = _HEADER_FROM(head)
    if magic != protocol.MAGIC or version != protocol.VERSION:
        try:
            protocol.parse_header(head[: protocol.HEADER_SIZE])  # (says which is wrong)
        except protocol.ProtocolError as exc:
            return _frame((0, None, None, 0, BadRequest(str(exc))))
    if kind == _CALL and head[_BODY_AT : _BODY_AT + 1] == b"\x93" and len(head) > _BODY_AT + 1 and (
            0xA0 <= head[_BODY_AT + 1] <= 0xBF):
        # What every client sends, [fixstr, args, kwargs], read here: named_hint reads it the same way, and
        # every other encoding, at three more calls a request.
        end = _BODY_AT + 2 + (head[_BODY_AT + 1] & 0x1F)
        try:
            expert = head[_BODY_AT + 2 : end].decode("utf-8") if len(head) >= end else None
        except UnicodeDecodeError:
            expert = None
    else:
        expert = protocol.named_hint(kind, head[_BODY_AT:])
    error: RemoteError | None = None
    if kind not in protocol.REQUEST_KINDS:
        error = BadRequest(f"unknown request kind 0x{kind:02x}; see expertd --help-topic protocol")
    elif length > max_frame:
        error = FrameTooLarge(f"request body of {length} bytes exceeds max_frame ({max_frame} bytes)")
    return _frame((kind, request_id, expert, protocol.HEADER_SIZE + length, error))


_HEADER_FROM = protocol.HEADER.unpack_from
_BODY_AT, _CALL = protocol.HEADER_SIZE, protocol.CALL
_frame = partial(tuple.__new__, Frame)  # (Frame(...) runs a Python __new__: once per request, it shows)


def http_refusal(request: http.Head, *, tcp: bool, token: str, experts: dict | set,
                 max_frame: int, plan: Callable[[str], object] | None = None,
                 public_health: bool = False, firefly: Any = None, raw: bytes = b"") -> http.HttpRefusal | None:
    """Whether an HTTP request, by its head alone, is refused (and how): admission, route, body.

    ``plan`` (:meth:`expertd.config.Config.plan`) checks a pipeline's target
    (``POST /pipeline/NAME``, ``POST /opinion/a,b``): unknown names are 404s.
    ``firefly`` (:class:`expertd.firefly.Routes`, with firefly_routes) refuses Firefly's routes its own way
    (``raw``: the request's first bytes, where its refusal finds the Origin for CORS).
    (A quarantined expert is refused too, by the caller: that depends on the time.)
    """
    if firefly is not None and request.route in FIREFLY_ROUTES:
        return firefly.refusal(request, tcp=tcp, token=token, experts=experts, max_body=max_frame, raw=raw)
    try:
        http.admit(request, tcp=tcp, token=token, public_health=public_health)
        http.check_route(request, experts, max_frame, plan)
    except http.HttpRefusal as refusal:
        return refusal
    if request.route not in http.WORKER_ROUTES and request.body_size:
        return http.HttpRefusal(400, "bad_request", f"{request.method} /{request.route} takes no body")
    return None


def refusal_reply(error: RemoteError, head: bytes) -> bytes:
    """``error`` as a reply in the protocol ``head`` (a connection's first bytes) shows: msgpack (request
    id 0, the daemon's own) unless they are HTTP's.  ``error.request_id`` goes with it (X-Request-Id)."""
    if http.looks_like_http(head):
        return http.error_response(None, error, request_id=error.request_id)[0]
    return protocol.encode_error(0, error)
