"""The Python each side runs per call, without the sockets: where the round trip's time goes.

    python hotpath.py        (prints one JSON object: nanoseconds per call, by piece)

Each figure is the best of several timeit runs in one warm process, with a
socket that takes and gives bytes without a system call, so it is a lower
bound: in a real round trip each process wakes with cold caches and runs the
same code slower.  It answers one question about the sequential round trip:
how much of expertd's time above the raw-socket floor is its own Python, and
which part of it.  "floor" rows are the raw-socket floor's loops
(bench/floor_server.py, bench/loadgen.py), timed the same way.
"""

from __future__ import annotations

import json
import os
import socket
import struct
import sys
import tempfile
import time
import timeit
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import msgpack

from expertd import protocol
from expertd.client import Client
from expertd.config import load_config
from expertd.loader import load_experts
from expertd.metrics import Metrics
from expertd.scoreboard import Scoreboard
from expertd.worker import Worker, _pack_result

CALLS = 50_000
PIPELINE = ("language", "length", "shout")  # bench/pipeline_experts.py's cheap three (bench/pipelines.py's round trip)
DOCUMENT = {"id": 1, "text": "Hello there, is le monde OK today?"}


def best_ns(function, number: int = CALLS, repeat: int = 7) -> float:
    return min(timeit.repeat(function, number=number, repeat=repeat)) / number * 1e9


class _Socket:
    """Takes whatever is sent; answers each request with a RESULT frame for its id (no system call)."""

    def __init__(self) -> None:
        self.request_id = 0

    def send(self, data: bytes, flags: int = 0) -> int:
        return len(data)

    def sendall(self, data: bytes) -> None:
        self.request_id = protocol.HEADER.unpack_from(data)[3]

    def recv(self, size: int) -> bytes:
        return protocol.encode_frame(protocol.RESULT, self.request_id, b"\x09")

    def close(self) -> None:
        pass


def _worker() -> Worker:
    directory = Path(tempfile.mkdtemp(prefix="xd-hotpath-"))
    (directory / "hot_square.py").write_text("def square(n):\n    return n * n\n")
    experts = "".join(f"\n[expert:{name}]\nfunction = pipeline_experts:{name}\n" for name in PIPELINE)
    (directory / "hot.conf").write_text(f"[expertd]\npythonpath = {directory}\n    {Path(__file__).parent}\n\n"
                                        f"[expert:square]\nfunction = hot_square:square\n{experts}")
    config = load_config(str(directory / "hot.conf"))
    experts = load_experts(config)
    channel, _other_end = socket.socketpair()
    scoreboard = Scoreboard(4)
    return Worker(1, config, experts, channel, scoreboard, 1, Metrics(4, experts).recorder(1))


def measure() -> dict[str, float]:
    worker = _worker()
    conn = _Socket()
    body = memoryview(bytearray(msgpack.packb(["square", [3], {}])))
    frame = bytes(protocol.encode_frame(protocol.CALL, 7, bytes(body)))

    def worker_request() -> None:
        # What the lingering loop runs for one call once its bytes are read.
        protocol.HEADER.unpack_from(frame)
        worker._answer(conn, protocol.CALL, 7, body)
        worker._after_request()
        worker._may_linger()

    call_body = memoryview(bytearray(msgpack.packb([PIPELINE[0], [DOCUMENT], {}])))
    pipeline_body = memoryview(bytearray(msgpack.packb([",".join(PIPELINE), DOCUMENT])))

    def worker_request_of(kind: int, request_body: memoryview):
        def request() -> None:
            worker._answer(conn, kind, 7, request_body)
            worker._after_request()
            worker._may_linger()
        return request

    board, recorder = worker.board, worker.recorder

    def scoreboard_writes() -> None:
        board.begin(1.0, 30.0, 7, "square")
        board.writing()
        board.end()
        board.served(5)

    def floor_server_request() -> None:
        data = frame  # (the floor's frame has a 4-byte header; the work is the same)
        (_length,) = struct.unpack_from("!I", data, 8)
        _name, args, _kwargs = msgpack.unpackb(data[12:])
        reply = msgpack.packb(args[0] * args[0])
        conn.send(struct.pack("!I", len(reply)) + reply)

    client = Client("/nonexistent")
    client._pool.append(_Socket())
    floor_socket = _Socket()
    reply = struct.pack("!I", 1) + b"\x09"

    def floor_client_call() -> int:
        request = msgpack.packb(["square", [3], {}])
        floor_socket.send(struct.pack("!I", len(request)) + request)
        (_length,) = struct.unpack_from("!I", reply)
        return msgpack.unpackb(reply[4:])

    return {
        "worker: one call, all of it": best_ns(worker_request),
        "worker: decode and check the call": best_ns(lambda: protocol.decode_call(body)),
        "worker: one call of a document expert (language)": best_ns(worker_request_of(protocol.CALL, call_body)),
        "worker: one pipeline request of three (language,length,shout)":
            best_ns(worker_request_of(protocol.PIPELINE, pipeline_body)),
        "worker: scoreboard writes (timeouts, lost-request answers)": best_ns(scoreboard_writes),
        "worker: metrics (counters, histogram)": best_ns(lambda: recorder.record("square", "ok", 3e-6)),
        "worker: pack the result": best_ns(lambda: _pack_result("square", 9)),
        "worker: clocks (3 readings)": best_ns(lambda: (time.monotonic(), time.monotonic(), time.monotonic())),
        "floor server: one call": best_ns(floor_server_request),
        "client: one call (Client.call)": best_ns(lambda: client.call("square", 3)),
        "floor client: one call": best_ns(floor_client_call),
    }


def main() -> int:
    os.environ.setdefault("EXPERTD_LOG_LEVEL", "warning")
    print(json.dumps(measure()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
