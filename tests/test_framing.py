"""Framing a request from the bytes peeked at (expertd.framing): tables of valid and invalid inputs, no sockets."""

import json

import msgpack
import pytest

from expertd import framing, http, protocol
from expertd.errors import AccessDenied, BadRequest, FrameTooLarge, Overloaded, Quarantined
from expertd.framing import HTTP, MSGPACK

MAX_FRAME = 1 << 20
EXPERTS = {"square": {"name": "square"}, "fib": {"name": "fib"}}


def _call(expert, request_id=7, args=(3,)):
    return protocol.encode_frame(protocol.CALL, request_id, msgpack.packb([expert, list(args), {}]))


# ---------------------------------------------------------------------------------------- sniff / undecided
@pytest.mark.parametrize(
    "head, speaks",
    [
        # The msgpack protocol's magic "XD", whole or begun.
        (b"X", MSGPACK),
        (b"XD", MSGPACK),
        (b"XD\x01", MSGPACK),
        (b"XD\x01\x01\x00\x00\x00\x07", MSGPACK),
        (_call("square"), MSGPACK),
        # HTTP request lines.
        (b"GET ", HTTP),
        (b"GET /health HTTP/1.1\r\n", HTTP),
        (b"POST /call/square HTTP/1.1\r\n", HTTP),
        (b"PUT /x HTTP/1.1\r\n", HTTP),
        (b"HEAD /health HTTP/1.1\r\n", HTTP),
        (b"DELETE /x HTTP/1.1\r\n", HTTP),
        (b"OPTIONS * HTTP/1.1\r\n", HTTP),
        (b"PATCH /x HTTP/1.1\r\n", HTTP),
        (b"CONNECT a:1 HTTP/1.1\r\n", HTTP),
        (b"TRACE / HTTP/1.1\r\n", HTTP),
        (b"PRI * HTTP/2.0\r\n", HTTP),
        # One to three bytes that may still grow into a request line: not decided yet.
        (b"G", ""),
        (b"GE", ""),
        (b"GET", ""),
        (b"P", ""),
        (b"PO", ""),
        (b"POS", ""),
        (b"PA", ""),
        (b"PR", ""),
        (b"H", ""),
        (b"DEL", ""),
        (b"O", ""),
        (b"C", ""),
        (b"T", ""),
        # Neither: refused with BAD_MAGIC.
        (b"XZ", None),
        (b"X\x00", None),
        (b"GETX", None),
        (b"GET/", None),
        (b"get ", None),  # methods are case-sensitive
        (b"g", None),
        (b"PX", None),
        (b"\x00", None),
        (b"\x00\x01\x02garbage", None),
        (b"\x16\x03\x01\x02\x00", None),  # a TLS ClientHello
        (b"SSH-2.0-OpenSSH", None),
        (b'{"expert": "square"}', None),
        (b"\x93\xa6square", None),  # a msgpack body without a frame header
        (b"\xff", None),
        (b" GET", None),
    ],
)
def test_a_connection_is_told_apart_by_its_first_bytes(head, speaks):
    assert framing.sniff(head) == speaks


@pytest.mark.parametrize(
    "head, waiting",
    [
        (b"", True),  # nothing yet
        (b"G", True),
        (b"GE", True),
        (b"GET", True),
        (b"P", True),
        (b"PRI", True),
        (b"GET ", False),  # HTTP
        (b"X", False),  # msgpack from the first byte
        (b"XD", False),
        (b"XZ", False),  # refused
        (b"Z", False),
        (b"GETX", False),
        (b"\x00", False),
    ],
)
def test_a_refused_peer_waits_only_while_its_first_bytes_do_not_say_its_protocol(head, waiting):
    assert framing.undecided(head) is waiting


def test_undecided_is_exactly_when_sniff_cannot_tell_yet():
    # Every one- and two-byte prefix, and every three-byte prefix of an HTTP method.
    heads = [bytes([a]) for a in range(256)] + [bytes([a, b]) for a in range(256) for b in range(256)]
    heads += [method[:3] for method in (b"GET", b"POST", b"PUT", b"HEAD", b"DELE", b"OPTI", b"PATC", b"CONN",
                                        b"TRAC", b"PRI ")]
    disagree = [head for head in heads if framing.undecided(head) != (framing.sniff(head) == "")]
    assert disagree == []


# ---------------------------------------------------------------------------------------- frame_of
def _str8(name: str) -> bytes:
    raw = name.encode()
    return b"\xd9" + bytes([len(raw)]) + raw


def _str16(name: str) -> bytes:
    raw = name.encode()
    return b"\xda" + len(raw).to_bytes(2, "big") + raw


def _str32(name: str) -> bytes:
    raw = name.encode()
    return b"\xdb" + len(raw).to_bytes(4, "big") + raw


_REST = msgpack.packb([3]) + msgpack.packb({})
LONG_NAME = "a" * 40  # msgpack packs 32..255 bytes as str 8
LONGER_NAME = "b" * 300  # ... and 256..65535 as str 16


@pytest.mark.parametrize(
    "body, expert",
    [
        (msgpack.packb(["square", [3], {}]), "square"),  # fixarray, fixstr: what every client sends
        (msgpack.packb([LONG_NAME, [3], {}]), LONG_NAME),  # str 8
        (msgpack.packb([LONGER_NAME, [3], {}]), LONGER_NAME),  # str 16
        (b"\x93" + _str8("square") + _REST, "square"),  # a short name in a longer encoding than needed
        (b"\x93" + _str16("square") + _REST, "square"),
        (b"\x93" + _str32("square") + _REST, "square"),
        (b"\xdc\x00\x03" + msgpack.packb("square") + _REST, "square"),  # array 16
        (b"\xdd\x00\x00\x00\x03" + msgpack.packb("square") + _REST, "square"),  # array 32
        (b"\xdd\x00\x00\x00\x03" + _str16("fib") + _REST, "fib"),
        (msgpack.packb(["caf\u00e9", [3], {}]), "caf\u00e9"),  # UTF-8
        (msgpack.packb(["", [], {}]), ""),
        # Not the shape [str, args, kwargs]: no hint (the worker decodes it and says why).
        (msgpack.packb([1, [3], {}]), None),
        (msgpack.packb([b"square", [3], {}]), None),  # bin, not str
        (msgpack.packb(["square", [3]]), None),  # an array of 2
        (msgpack.packb({"expert": "square"}), None),
        (msgpack.packb("square"), None),
        (b"\x93\xa6squ", None),  # the name cut short
        (b"\x93\xd9", None),  # a str 8 without its length
        (b"\x93\xda\x00", None),  # a str 16 with half its length
        (b"\x93", None),
        (b"\x93\xa2\xff\xfe" + _REST, None),  # not UTF-8
        (b"", None),
    ],
)
def test_a_call_names_its_expert_in_every_msgpack_encoding(body, expert):
    head = protocol.encode_frame(protocol.CALL, 41, body)
    frame = framing.frame_of(head, MAX_FRAME)
    assert frame == framing.Frame(protocol.CALL, 41, expert, protocol.HEADER_SIZE + len(body), None)


def test_the_expert_is_read_from_the_bytes_peeked_at_without_the_rest_of_the_body():
    whole = _call("square", request_id=5, args=[list(range(1000))])
    peeked = whole[: protocol.HEADER_SIZE + 8]  # header, fixarray, fixstr "square"
    frame = framing.frame_of(peeked, MAX_FRAME)
    assert (frame.expert, frame.size, frame.error) == ("square", len(whole), None)
    cut = framing.frame_of(whole[: protocol.HEADER_SIZE + 5], MAX_FRAME)  # the name not all peeked yet
    assert (cut.expert, cut.size, cut.error) == (None, len(whole), None)


@pytest.mark.parametrize(
    "kind",
    [protocol.PING, protocol.LIST, protocol.STATUS, protocol.RELOAD, protocol.STOP, protocol.SCALE],
)
def test_requests_other_than_calls_are_framed_with_no_expert(kind):
    body = msgpack.packb(["square", [3], {}])  # even a body that looks like a call names no expert here
    frame = framing.frame_of(protocol.encode_frame(kind, 12, body), MAX_FRAME)
    assert frame == framing.Frame(kind, 12, None, protocol.HEADER_SIZE + len(body), None)


@pytest.mark.parametrize("kind", [protocol.STATUS, protocol.LIST])
def test_status_and_list_with_no_body_are_a_header_alone(kind):
    frame = framing.frame_of(protocol.pack_header(kind, 3, 0), MAX_FRAME)
    assert frame == framing.Frame(kind, 3, None, protocol.HEADER_SIZE, None)
    assert kind in framing.READ_KINDS and kind in framing.MASTER_KINDS


@pytest.mark.parametrize("kind", [protocol.RELOAD, protocol.STOP, protocol.SCALE])
def test_control_kinds_are_the_masters_and_need_more_than_read_access(kind):
    assert kind in framing.MASTER_KINDS and kind not in framing.READ_KINDS
    assert kind in protocol.KIND_NAMES


@pytest.mark.parametrize("kind", [0x00, 0x06, 0x0F, 0x14, 0x42, protocol.RESULT, protocol.ERROR, 0xFF])
def test_an_unknown_request_kind_is_refused_with_its_request_id(kind):
    frame = framing.frame_of(protocol.encode_frame(kind, 99, b"\x90"), MAX_FRAME)
    assert frame.kind == kind and frame.request_id == 99 and frame.expert is None
    assert type(frame.error) is BadRequest
    assert f"unknown request kind 0x{kind:02x}" in frame.error.message


@pytest.mark.parametrize(
    "head, message",
    [
        (b"XY\x01\x01" + bytes(8), "bad frame magic"),
        (b"\x00\x01\x02garbage, long", "bad frame magic"),
        (b"GET / HTTP/1.1\r\n", "bad frame magic"),
        (b"XD\x02\x01" + bytes(8), "protocol version 2 is not supported"),
        (b"XD\x00\x01" + bytes(8), "protocol version 0 is not supported"),
        (b"XD\xff\x01" + bytes(8), "protocol version 255 is not supported"),
    ],
)
def test_an_unreadable_header_is_refused_with_no_request_id(head, message):
    frame = framing.frame_of(head, MAX_FRAME)
    assert frame.request_id is None and frame.expert is None and frame.size == 0
    assert type(frame.error) is BadRequest
    assert message in frame.error.message


@pytest.mark.parametrize("length", [MAX_FRAME + 1, 2 * MAX_FRAME, protocol.MAX_BODY])
def test_a_frame_larger_than_max_frame_is_refused_before_it_is_read(length):
    header = protocol.pack_header(protocol.CALL, 1234, length)  # the header alone: no body sent yet
    frame = framing.frame_of(header + b"\x93\xa6square", MAX_FRAME)
    assert type(frame.error) is FrameTooLarge
    assert frame.request_id == 1234  # the error reply goes to that request
    assert frame.size == protocol.HEADER_SIZE + length
    assert frame.error.message == f"request body of {length} bytes exceeds max_frame ({MAX_FRAME} bytes)"


@pytest.mark.parametrize("kind", [protocol.CALL, protocol.STATUS, protocol.PING])
def test_a_frame_of_exactly_max_frame_is_accepted(kind):
    frame = framing.frame_of(protocol.pack_header(kind, 1, MAX_FRAME), MAX_FRAME)
    assert frame.error is None and frame.size == protocol.HEADER_SIZE + MAX_FRAME


def test_an_unknown_kind_is_reported_before_its_size():
    frame = framing.frame_of(protocol.pack_header(0x42, 8, MAX_FRAME + 1), MAX_FRAME)
    assert type(frame.error) is BadRequest and "unknown request kind" in frame.error.message


# ---------------------------------------------------------------------------------------- http_refusal
def _head(text: str) -> http.Head:
    head = http.scan_head(text.replace("\n", "\r\n").encode() + b"\r\n")
    assert head is not None
    return head


def _refusal(text: str, *, tcp=False, token="", experts=EXPERTS, max_frame=MAX_FRAME):
    return framing.http_refusal(_head(text), tcp=tcp, token=token, experts=experts, max_frame=max_frame)


GET_HEALTH = "GET /health HTTP/1.1\nHost: localhost\n"
CALL_SQUARE = "POST /call/square HTTP/1.1\nHost: localhost\nContent-Length: 3\n"


@pytest.mark.parametrize(
    "text, tcp, token",
    [
        (GET_HEALTH, False, ""),
        (GET_HEALTH, False, "secret"),  # the Unix socket needs no token: its file mode guards it
        (GET_HEALTH + "Authorization: Bearer secret\n", True, "secret"),
        (GET_HEALTH + "Authorization: bearer secret\n", True, "secret"),  # the scheme is case-insensitive
        ("GET /health HTTP/1.1\nHost: 127.0.0.1:8000\n", True, ""),  # tokenless: loopback hosts only
        ("GET /health HTTP/1.1\nHost: [::1]:8000\n", True, ""),
        ("GET /health HTTP/1.1\nHost: LOCALHOST\n", True, ""),
        ("GET /health HTTP/1.0\n", True, ""),  # no Host at all
        ("HEAD /health HTTP/1.1\n", False, ""),
        ("GET /experts HTTP/1.1\n", False, ""),
        ("GET /metrics?x=1 HTTP/1.1\n", False, ""),
        (CALL_SQUARE, False, ""),
        (CALL_SQUARE + "Authorization: Bearer secret\n", True, "secret"),
        ("POST /opinion/fib HTTP/1.1\nContent-Length: 2\n", False, ""),
        ("POST /call/square HTTP/1.1\n", False, ""),  # no body: the worker says what is missing
        (f"POST /call/square HTTP/1.1\nContent-Length: {MAX_FRAME}\n", False, ""),
        ("POST /call/%73quare HTTP/1.1\nContent-Length: 2\n", False, ""),  # percent-encoded
    ],
)
def test_a_request_that_may_be_served_is_not_refused(text, tcp, token):
    assert _refusal(text, tcp=tcp, token=token) is None


@pytest.mark.parametrize(
    "text, tcp, token, status, code, close",
    [
        # http_listen with a token: every request must carry it (and learns nothing of routes without it).
        (GET_HEALTH, True, "secret", 401, "unauthorized", True),
        (GET_HEALTH + "Authorization: Bearer wrong\n", True, "secret", 401, "unauthorized", True),
        (GET_HEALTH + "Authorization: Basic secret\n", True, "secret", 401, "unauthorized", True),
        (GET_HEALTH + "Authorization: Bearer secret2\n", True, "secret", 401, "unauthorized", True),
        ("GET /nowhere HTTP/1.1\n", True, "secret", 401, "unauthorized", True),
        ("POST /call/nosuch HTTP/1.1\nContent-Length: 2\n", True, "secret", 401, "unauthorized", True),
        # http_listen without a token: only local host names (DNS rebinding).
        ("GET /health HTTP/1.1\nHost: evil.example\n", True, "", 403, "forbidden_host", True),
        ("GET /health HTTP/1.1\nHost: localhost.evil.example\n", True, "", 403, "forbidden_host", True),
        ("GET /health HTTP/1.1\nHost: 127.0.0.1.evil.example\n", True, "", 403, "forbidden_host", True),
        # Routes.
        ("GET /nowhere HTTP/1.1\n", False, "", 404, "not_found", False),
        ("GET / HTTP/1.1\n", False, "", 404, "not_found", False),
        ("POST /call/ HTTP/1.1\nContent-Length: 2\n", False, "", 404, "not_found", False),
        ("POST /call/square/extra HTTP/1.1\nContent-Length: 2\n", False, "", 404, "not_found", False),
        ("POST /call/nosuch HTTP/1.1\nContent-Length: 2\n", False, "", 404, "unknown_expert", False),
        ("POST /opinion/nosuch HTTP/1.1\nContent-Length: 2\n", False, "", 404, "unknown_expert", False),
        # Methods.
        ("GET /call/square HTTP/1.1\n", False, "", 405, "method_not_allowed", False),
        ("PUT /call/square HTTP/1.1\nContent-Length: 2\n", False, "", 405, "method_not_allowed", False),
        ("POST /health HTTP/1.1\nContent-Length: 2\n", False, "", 405, "method_not_allowed", False),
        ("DELETE /experts HTTP/1.1\n", False, "", 405, "method_not_allowed", False),
        ("OPTIONS /metrics HTTP/1.1\n", False, "", 405, "method_not_allowed", False),
        # A body where none is taken.
        ("GET /health HTTP/1.1\nContent-Length: 5\n", False, "", 400, "bad_request", False),
        ("HEAD /experts HTTP/1.1\nContent-Length: 1\n", False, "", 400, "bad_request", False),
        # A body over max_frame: refused before it is read, and the connection closed.
        (f"POST /call/square HTTP/1.1\nContent-Length: {MAX_FRAME + 1}\n", False, "", 413, "frame_too_large", True),
        (f"GET /health HTTP/1.1\nContent-Length: {MAX_FRAME + 1}\n", False, "", 413, "frame_too_large", True),
    ],
)
def test_a_request_is_refused_by_its_head_alone(text, tcp, token, status, code, close):
    refusal = _refusal(text, tcp=tcp, token=token)
    assert isinstance(refusal, http.HttpRefusal)
    assert (refusal.status, refusal.code, refusal.close) == (status, code, close)


def test_a_missing_token_is_asked_for_with_www_authenticate():
    refusal = _refusal(GET_HEALTH, tcp=True, token="secret")
    assert ("WWW-Authenticate", 'Bearer realm="expertd"') in refusal.headers


@pytest.mark.parametrize(
    "text, allow",
    [("GET /call/square HTTP/1.1\n", "POST"), ("POST /health HTTP/1.1\nContent-Length: 2\n", "GET, HEAD")],
)
def test_a_wrong_method_is_told_the_allowed_ones(text, allow):
    refusal = _refusal(text)
    assert refusal.status == 405 and ("Allow", allow) in refusal.headers


@pytest.mark.parametrize("experts", [EXPERTS, set(EXPERTS)])
def test_an_unknown_expert_is_told_the_known_ones(experts):
    refusal = _refusal("POST /call/sqaure HTTP/1.1\nContent-Length: 2\n", experts=experts)
    assert refusal.code == "unknown_expert"
    assert "'sqaure'" in refusal.message and "known experts: fib, square" in refusal.message


def test_with_no_experts_served_every_call_is_an_unknown_expert():
    refusal = _refusal(CALL_SQUARE, experts={})
    assert refusal.code == "unknown_expert" and "known experts: none" in refusal.message


def test_a_body_on_a_get_route_is_named_in_the_refusal():
    refusal = _refusal("GET /health HTTP/1.1\nContent-Length: 5\n")
    assert refusal.message == "GET /health takes no body"


# ---------------------------------------------------------------------------------------- refusal_reply
def _http_reply(reply: bytes):
    head, _, body = reply.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:])
    return lines[0], headers, json.loads(body)


@pytest.mark.parametrize(
    "error, status_line, retry_after",
    [
        (AccessDenied("uid 1001 may not connect"), "HTTP/1.1 403 Forbidden", None),
        (Overloaded("too many connections"), "HTTP/1.1 503 Service Unavailable", "1"),
        (BadRequest(framing.BAD_MAGIC), "HTTP/1.1 400 Bad Request", None),
        (FrameTooLarge("too big"), "HTTP/1.1 413 Content Too Large", None),
        (Quarantined("square is quarantined", expert="square"), "HTTP/1.1 503 Service Unavailable", None),
    ],
)
@pytest.mark.parametrize("head", [b"GET /health HTTP/1.1\r\n", b"POST", b"DELETE /x"])
def test_a_refusal_to_an_http_client_is_an_http_response_that_closes(error, status_line, retry_after, head):
    reply = framing.refusal_reply(error, head)
    first, headers, body = _http_reply(reply)
    assert first == status_line
    assert headers["Connection"] == "close" and headers["Content-Type"] == http.JSON_TYPE
    assert int(headers["Content-Length"]) == len(reply.partition(b"\r\n\r\n")[2])
    assert headers.get("Retry-After") == retry_after
    assert body["error"]["code"] == error.code and body["error"]["message"] == error.message


@pytest.mark.parametrize(
    "head",
    [b"XD\x01\x01", b"X", b"", b"\x00garbage", b"GE", b"get / HTTP/1.1"],  # msgpack, or not HTTP (yet)
)
def test_a_refusal_to_anyone_else_is_a_msgpack_error_frame_with_request_id_0(head):
    error = AccessDenied("uid 1001 may not connect")
    reply = framing.refusal_reply(error, head)
    kind, request_id, length = protocol.parse_header(reply[: protocol.HEADER_SIZE])
    assert (kind, request_id, length) == (protocol.ERROR, 0, len(reply) - protocol.HEADER_SIZE)
    body = protocol.unpack(reply[protocol.HEADER_SIZE:])
    assert body["code"] == "access_denied" and body["message"] == "uid 1001 may not connect"
