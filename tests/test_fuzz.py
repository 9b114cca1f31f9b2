"""Property-based fuzzing of the wire protocol against a live daemon (hypothesis).

Random bytes and mutations of valid frames are thrown at the socket.  After
each example the daemon must still answer a valid request, and at the end no
worker may have died: bad input gets an error reply or a closed connection,
never a crashed process.
"""

import socket
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from expertd import protocol

from conftest import Daemon, write_config

SAFE_EXPERTS = {"echo": "testexperts:echo", "add": "testexperts:add"}  # they never fail


@pytest.fixture(scope="module")
def fuzz_daemon():
    import tempfile
    from pathlib import Path

    directory = Path(tempfile.mkdtemp(prefix="xdf-", dir="/tmp"))
    # A short read_timeout so that truncated frames are dropped quickly.
    daemon = Daemon(write_config(directory, SAFE_EXPERTS, read_timeout="1s"), directory / "f.sock", workers=2)
    daemon.start()
    daemon.initial_workers = daemon.worker_pids()
    yield daemon
    daemon.kill()


def _send_and_drain(daemon, data: bytes) -> None:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(0.3)
    sock.connect(str(daemon.socket))
    try:
        sock.sendall(data)
        while sock.recv(65536):
            pass
    except (TimeoutError, ConnectionResetError, BrokenPipeError):
        pass
    finally:
        sock.close()


def _assert_serving(daemon) -> None:
    assert daemon.client(timeout=10).call("add", 20, 22) == 42


VALID_FRAMES = [
    protocol.encode_call(1, "add", [1, 2], {}),
    protocol.encode_call(2, "echo", [{"text": "hello", "n": [1, 2, {"x": b"\x00"}]}], {"k": 1.5}),
    protocol.encode_frame(protocol.PING, 3, b""),
    protocol.encode_frame(protocol.LIST, 4, b""),
]


def _mutate(draw, data: bytearray, special) -> bytes:
    """Up to six random edits: flip a byte, truncate, insert bytes, or ``special(draw, data)``."""
    for _ in range(draw(st.integers(1, 6))):
        action = draw(st.sampled_from(["flip", "truncate", "insert", "special"]))
        if action == "flip" and data:
            data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
        elif action == "truncate" and data:
            del data[draw(st.integers(0, len(data) - 1)) :]
        elif action == "insert":
            at = draw(st.integers(0, len(data)))
            data[at:at] = draw(st.binary(min_size=1, max_size=16))
        elif action == "special":
            special(draw, data)
    return bytes(data)


def _new_body(draw, frame: bytearray) -> None:
    if len(frame) >= protocol.HEADER_SIZE:
        body = draw(st.binary(max_size=64))
        frame[protocol.HEADER_SIZE :] = body
        frame[8:12] = len(body).to_bytes(4, "big")


@st.composite
def mutated_frames(draw) -> bytes:
    return _mutate(draw, bytearray(draw(st.sampled_from(VALID_FRAMES))), _new_body)


COMMON = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@COMMON
@given(data=st.binary(max_size=256))
def test_random_bytes(fuzz_daemon, data):
    _send_and_drain(fuzz_daemon, data)
    _assert_serving(fuzz_daemon)


@COMMON
@given(frame=mutated_frames())
def test_mutated_frames(fuzz_daemon, frame):
    _send_and_drain(fuzz_daemon, frame)
    _assert_serving(fuzz_daemon)


@COMMON
@given(body=st.binary(max_size=200))
def test_random_bodies_under_a_valid_header(fuzz_daemon, body):
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(5)
    sock.connect(str(fuzz_daemon.socket))
    sock.sendall(protocol.encode_frame(protocol.CALL, 77, body))
    kind, request_id, reply = protocol.read_frame(sock, 1 << 20, time.monotonic() + 5)
    assert request_id == 77
    if kind == protocol.ERROR:
        assert protocol.unpack(reply)["code"] in ("bad_request", "unknown_expert")
    # The connection is still usable after a bad body.
    sock.sendall(protocol.encode_call(78, "add", [1, 1], {}))
    assert protocol.read_frame(sock, 1 << 20, time.monotonic() + 5)[:2] == (protocol.RESULT, 78)
    sock.close()


VALID_HTTP = [
    b"POST /call/add HTTP/1.1\r\nHost: x\r\nContent-Length: 6\r\n\r\n[1, 2]",
    b"POST /opinion/echo HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 15\r\n\r\n"
    b'{"text": "hey"}',
    b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET /metrics HTTP/1.0\r\n\r\n",
]


def _new_header(draw, request: bytearray) -> None:
    at = request.find(b"\r\n") + 2
    name = draw(st.sampled_from([b"Content-Length", b"Transfer-Encoding", b"Expect", b"Connection", b"Host", b"X"]))
    value = draw(st.binary(max_size=12)).replace(b"\r", b"").replace(b"\n", b"")
    request[at:at] = name + b": " + value + b"\r\n"


@st.composite
def mutated_http(draw) -> bytes:
    return _mutate(draw, bytearray(draw(st.sampled_from(VALID_HTTP))), _new_header)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(request=mutated_http())
def test_mutated_http_requests(fuzz_daemon, request):
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(0.5)
    sock.connect(str(fuzz_daemon.socket))
    reply = b""
    try:
        sock.sendall(request)
        while chunk := sock.recv(65536):
            reply += chunk
    except (TimeoutError, ConnectionResetError, BrokenPipeError):
        pass
    finally:
        sock.close()
    # Whatever came back is HTTP (or an expertd error frame, for bytes that no longer look like HTTP).
    assert not reply or reply.startswith((b"HTTP/1.1 ", protocol.MAGIC))
    _assert_serving(fuzz_daemon)


def test_no_worker_died_from_bad_input(fuzz_daemon):
    # Runs after the property tests in this module (pytest keeps file order).
    assert fuzz_daemon.worker_pids() == fuzz_daemon.initial_workers
    assert "while serving request" not in fuzz_daemon.log
