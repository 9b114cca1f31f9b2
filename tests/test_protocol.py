"""Hostile and malformed input on the socket: errors or closed connections, never a dead daemon."""

import socket
import struct
import time

import msgpack
import pytest

from expertd import protocol
from expertd.errors import ConnectionLost, FrameTooLarge

from conftest import raw_connection


def _read_reply(sock):
    kind, request_id, body = protocol.read_frame(sock, 1 << 20, time.monotonic() + 5)
    return kind, request_id, protocol.unpack(body)


def _read_all(sock) -> bytes:
    chunks = []
    while True:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            break
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks)


def _still_serving(daemon):
    assert daemon.client().call("add", 40, 2) == 42
    assert daemon.proc.poll() is None


def test_raw_frame_round_trip(daemon):
    sock = raw_connection(daemon)
    sock.sendall(protocol.encode_call(99, "fib", [5], {}))
    assert _read_reply(sock) == (protocol.RESULT, 99, 8)
    sock.sendall(protocol.encode_frame(protocol.PING, 100, b""))
    kind, request_id, info = _read_reply(sock)
    assert (kind, request_id) == (protocol.RESULT, 100) and info["pid"] in daemon.worker_pids()


def test_pipelined_requests_are_answered_in_order(daemon):
    sock = raw_connection(daemon)
    sock.sendall(b"".join(protocol.encode_call(i, "add", [i, 1], {}) for i in range(1, 21)))
    assert [_read_reply(sock) for _ in range(20)] == [(protocol.RESULT, i, i + 1) for i in range(1, 21)]


def test_garbage_bytes_get_an_error_and_close(daemon):
    sock = raw_connection(daemon)
    sock.sendall(b"\x00\x01\x02garbage that is not a frame at all")
    data = _read_all(sock)
    kind, _, _length = protocol.parse_header(data[: protocol.HEADER_SIZE])
    assert kind == protocol.ERROR
    assert protocol.unpack(data[protocol.HEADER_SIZE:])["code"] == "bad_request"
    _still_serving(daemon)


def test_huge_length_header_is_refused_before_reading(daemon):
    sock = raw_connection(daemon)
    sock.sendall(protocol.pack_header(protocol.CALL, 5, 0xFFFFFFF0))  # 4 GiB promised, nothing sent
    kind, request_id, error = _read_reply(sock)
    assert (kind, request_id, error["code"]) == (protocol.ERROR, 5, "frame_too_large")
    assert _read_all(sock) == b""  # then closed
    _still_serving(daemon)


def test_client_reports_frame_too_large(make_daemon):
    daemon = make_daemon(max_frame="64K")
    with pytest.raises(FrameTooLarge):
        daemon.client().call("echo", b"x" * 200_000)
    assert daemon.client().call("echo", b"x" * 1000)["args"] == [b"x" * 1000]


def test_http_on_the_msgpack_socket_gets_an_http_answer(daemon):
    sock = raw_connection(daemon)
    sock.sendall(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
    reply = _read_all(sock)
    assert reply.startswith(b"HTTP/1.1 404 Not Found") and b'"not_found"' in reply
    _still_serving(daemon)


def test_neither_msgpack_nor_http_is_refused(daemon):
    sock = raw_connection(daemon)
    sock.sendall(b"\x00\x01hello")
    kind, _request_id, error = _read_reply(sock)
    assert kind == protocol.ERROR and "expertd --help-topic http" in error["message"]
    _still_serving(daemon)


def test_wrong_version_and_kind(daemon):
    sock = raw_connection(daemon)
    sock.sendall(struct.pack("!2sBBII", b"XD", 9, protocol.CALL, 1, 0))
    kind, _, error = _read_reply(sock)
    assert kind == protocol.ERROR and "version 9" in error["message"]
    sock = raw_connection(daemon)
    sock.sendall(protocol.pack_header(0x42, 3, 0))
    kind, request_id, error = _read_reply(sock)
    assert (kind, request_id) == (protocol.ERROR, 3) and "unknown request kind" in error["message"]
    _still_serving(daemon)


@pytest.mark.parametrize(
    "body, expected",
    [
        (b"\xc1", "not valid msgpack"),
        (msgpack.packb({"expert": "fib"}), "must be the array"),
        (msgpack.packb([5, [], {}]), "expert name must be a string"),
        (msgpack.packb(["fib", 5, {}]), "args must be an array"),
        (msgpack.packb(["fib", [], []]), "kwargs must be a map"),
        (msgpack.packb(["fib", [msgpack.ExtType(5, b"x")], {}]), "extension type 5"),
        (b"\x93\xa3fib\x91\x05\x81\x01\x02", "not allowed for map key"),
        (b"\x91" * 5000 + b"\x01", "not valid msgpack"),
    ],
)
def test_malformed_bodies_get_bad_request_and_the_connection_survives(daemon, body, expected):
    sock = raw_connection(daemon)
    sock.sendall(protocol.encode_frame(protocol.CALL, 11, body))
    kind, request_id, error = _read_reply(sock)
    assert (kind, request_id, error["code"]) == (protocol.ERROR, 11, "bad_request")
    assert expected in error["message"]
    sock.sendall(protocol.encode_call(12, "add", [1, 1], {}))
    assert _read_reply(sock) == (protocol.RESULT, 12, 2)


def test_half_frame_then_silence_is_dropped_after_read_timeout(make_daemon):
    daemon = make_daemon(read_timeout="1s", workers=1)
    stalled = raw_connection(daemon)
    stalled.sendall(protocol.encode_call(1, "fib", [5], {})[:7])
    body_stalled = raw_connection(daemon)
    body_stalled.sendall(protocol.encode_call(2, "fib", [5], {})[:-2])
    start = time.monotonic()
    assert daemon.client().call("add", 1, 1) == 2  # the one worker is not pinned
    assert time.monotonic() - start < 0.5
    stalled.settimeout(5)
    assert _read_all(stalled) == b""  # closed by the daemon
    assert _read_all(body_stalled) == b""
    assert time.monotonic() - start < 4


def test_client_disconnecting_mid_request_does_not_hurt(daemon):
    for _ in range(20):
        sock = raw_connection(daemon)
        sock.sendall(protocol.encode_call(1, "slow", [0.01], {}))
        sock.close()
    _still_serving(daemon)


def test_reading_a_closed_connection_raises_connection_lost():
    left, right = socket.socketpair()
    right.sendall(b"XD")
    right.close()
    with pytest.raises(ConnectionLost) as caught:
        protocol.read_frame(left, 100)
    assert caught.value.received == 2


def test_pack_is_safe_when_a_tolist_packs_too():
    class Packs:
        def tolist(self):
            return {"inner": protocol.pack([1, 2, 3])}

    assert protocol.unpack(protocol.pack(["a", Packs(), {"k": 1}])) == ["a", {"inner": b"\x93\x01\x02\x03"}, {"k": 1}]
    assert protocol.unpack(protocol.pack({"after": True})) == {"after": True}


@pytest.mark.parametrize("body, name", [
    (msgpack.packb(["add", [1, 2], {}]), "add"),  # what the client sends
    (b"\x93\xd9\x05hello" + msgpack.packb([]) + msgpack.packb({}), "hello"),  # str 8
    (bytes.fromhex("dc0003da0006") + b"square" + bytes.fromhex("910380"), "square"),  # array 16, str 16
    (bytes.fromhex("dd00000003db00000003") + b"abc" + bytes.fromhex("9080"), "abc"),  # array 32, str 32
    (b"\x92\xa3add\x90", None),  # not three elements: the worker refuses it
    (b"\x93\xc4\x03add\x90\x80", None),  # bin, not str
    (b"\x93\xda\x00", None),  # cut short
    (b"\x93\xa2\xff\xfe\x90\x80", None),  # not UTF-8
])
def test_the_master_reads_the_expert_name_in_every_encoding_msgpack_allows(body, name):
    # A name the master cannot read would escape the expert's own timeout and its quarantine.
    assert protocol.expert_name_hint(body) == name
    if name is not None:
        assert protocol.decode_call(body)[0] == name
