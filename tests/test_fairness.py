"""One client cannot starve the others, delay the master's signals or blow up its memory (issue #13)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time

import psutil
import pytest

from expertd import protocol
from expertd.client import Client
from expertd.errors import ConnectionLost, Overloaded

from conftest import ROOT, raw_connection, wait_until
from users import as_user, local_user, needs_root

# A client in a process of its own (so that it does not share the test's GIL): connects to the
# socket in argv[1] and runs until killed (or 15 s, so that a failing test cannot hang).
_HEALTH_FLOOD = """
import socket, sys, threading, time
sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
sock.connect(sys.argv[1])
def drain():
    while sock.recv(1 << 20):
        pass
threading.Thread(target=drain, daemon=True).start()
chunk = b"GET /health HTTP/1.1\\r\\nHost: x\\r\\n\\r\\n" * 2000
print("flooding", flush=True)
end = time.monotonic() + 15
while time.monotonic() < end:
    sock.sendall(chunk)
"""

_STATUS_LOOP = """
import sys, time
from expertd.client import Client
client = Client(sys.argv[1], timeout=60)
client.status()
print("looping", flush=True)
end = time.monotonic() + 15
while time.monotonic() < end:
    client.status()
"""


def _start_client(script: str, daemon) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", script, str(daemon.socket)], cwd=ROOT,
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline()  # connected, and at it
    return proc


def _stop_clients(procs: list[subprocess.Popen]) -> None:
    for proc in procs:
        proc.kill()
        proc.wait()


# ---------------------------------------------------------------- fair turns (item 2)
def test_a_pipelined_health_flood_delays_neither_other_calls_nor_sigterm(make_daemon):
    daemon = make_daemon({"add": "testexperts:add"}, workers=1)
    flood = _start_client(_HEALTH_FLOOD, daemon)
    try:
        time.sleep(0.5)
        for attempt in range(3):  # each on a fresh connection: accepting it is the master's work too
            started = time.monotonic()
            assert Client(str(daemon.socket), timeout=30, retries=0).call("add", attempt, 1) == attempt + 1
            assert time.monotonic() - started < 1.0  # before fair turns: until the flood stopped (~15 s)
        started = time.monotonic()
        assert daemon.stop(signal.SIGTERM, timeout=30) == 0
        assert time.monotonic() - started < 3.0
    finally:
        _stop_clients([flood])


def test_clients_looping_status_leave_the_master_free_for_calls(make_daemon):
    daemon = make_daemon({"add": "testexperts:add"}, workers=2)
    loops = [_start_client(_STATUS_LOOP, daemon) for _ in range(2)]
    try:
        calls = 0
        end = time.monotonic() + 2.0
        while time.monotonic() < end:
            with Client(str(daemon.socket), timeout=30, retries=0) as client:  # a fresh connection each time
                assert client.call("add", calls, 1) == calls + 1
            calls += 1
        # Before the status memory cache: about 8 a second (the master read every process's
        # memory for each STATUS); thousands a second on an idle machine.
        assert calls >= 100, f"{calls} calls in 2 s"
    finally:
        _stop_clients(loops)


# ---------------------------------------------------------------- gathering budget (item 7)
def test_stalled_partial_requests_give_way_to_a_large_call_that_is_arriving(make_daemon):
    # max_frame 1M: the master gathers at most 4 MiB of requests arriving in pieces.
    daemon = make_daemon({"echo": "testexperts:echo"}, workers=1, max_frame="1M", read_timeout="30s")
    stalled = []
    for i in range(4):  # 3.56 MB held, each request 10 kB short of whole, then nothing more
        sock = raw_connection(daemon)
        sock.sendall(protocol.encode_call(i + 1, "echo", [b"s" * 900_000], {})[:-10_000])
        stalled.append(sock)
    time.sleep(1.0)
    started = time.monotonic()
    payload = b"z" * 800_000  # more than a socket holds: gathered too, and past the budget
    assert daemon.client(timeout=30, retries=0).call("echo", payload) == {"args": [payload], "kwargs": {}}
    assert time.monotonic() - started < 2.0
    # The longest stalled request gave its room up, with a one-line reason; the others wait on.
    kind, request_id, body = protocol.read_frame(stalled[0], 1 << 20, time.monotonic() + 10)
    error = protocol.unpack(body)
    assert (kind, request_id, error["code"]) == (protocol.ERROR, 1, "overloaded")
    assert "request stalled for" in error["message"]
    assert "its request stalled for" in daemon.log
    stalled[3].sendall(protocol.encode_call(4, "echo", [b"s" * 900_000], {})[-10_000:])
    kind, request_id, body = protocol.read_frame(stalled[3], 2 << 20, time.monotonic() + 10)
    assert (kind, request_id, protocol.unpack(body)["args"]) == (protocol.RESULT, 4, [b"s" * 900_000])


def test_a_burst_of_large_requests_past_the_budget_refuses_the_newest(make_daemon):
    # All of them arriving (none stalled): the request that finds no room is refused, as before.
    daemon = make_daemon({"echo": "testexperts:echo"}, workers=1, max_frame="1M", read_timeout="30s")
    held = []
    for i in range(4):
        sock = raw_connection(daemon)
        sock.sendall(protocol.encode_call(i + 1, "echo", [b"s" * 900_000], {})[:-10_000])
        held.append(sock)
    with pytest.raises(Overloaded) as caught:
        daemon.client(timeout=30, retries=0).call("echo", b"z" * 800_000)
    assert "arriving slowly" in str(caught.value)
    for i, sock in enumerate(held):  # nobody was evicted: they had just sent
        sock.sendall(protocol.encode_call(i + 1, "echo", [b"s" * 900_000], {})[-10_000:])
        kind, _request_id, _body = protocol.read_frame(sock, 2 << 20, time.monotonic() + 10)
        assert kind == protocol.RESULT


# ---------------------------------------------------------------- replies held for slow readers (item 6)
def _call_without_reading(daemon, request_id: int, size: int) -> socket.socket:
    sock = raw_connection(daemon)
    sock.sendall(protocol.encode_call(request_id, "blob", [size], {}))
    return sock


def _read_whole_reply(sock: socket.socket) -> int | None:
    """The size of the blob in the reply, or None if the daemon closed the connection before its end."""
    try:
        kind, _request_id, body = protocol.read_frame(sock, 64 * 2**20, time.monotonic() + 10)
    except ConnectionLost:
        return None
    assert kind == protocol.RESULT
    return len(protocol.unpack(body))


def test_clients_that_never_read_cannot_grow_the_master_past_max_reply_buffer(make_daemon):
    daemon = make_daemon({"blob": "testexperts:blob", "add": "testexperts:add"}, workers=1,
                         max_reply_buffer="20M")
    master = psutil.Process(daemon.proc.pid)
    assert daemon.client().call("add", 1, 1) == 2
    before = master.memory_info().rss
    hogs = []
    for i in range(6):  # 6 replies of 8 MiB, none read: 48 MiB held before the limit
        hogs.append(_call_without_reading(daemon, i + 1, 8 * 2**20))
        time.sleep(0.2)  # (in this order)
    assert wait_until(lambda: daemon.log.count("would take the master past max_reply_buffer (") == 4)
    grown = master.memory_info().rss - before
    assert grown < 32 * 2**20, f"the master grew by {grown / 2**20:.0f} MiB"
    started = time.monotonic()
    assert daemon.client().call("add", 2, 2) == 4  # everyone else is served meanwhile
    assert time.monotonic() - started < 1.0
    # The first two fit and arrive whole; the rest were cut off.
    assert [_read_whole_reply(sock) for sock in hogs] == [8 * 2**20] * 2 + [None] * 4


def test_a_reply_over_the_per_connection_limit_is_dropped_for_a_slow_reader(make_daemon):
    daemon = make_daemon({"blob": "testexperts:blob"}, workers=1, max_reply_buffer_per_connection="4M")
    big = _call_without_reading(daemon, 1, 8 * 2**20)
    small = _call_without_reading(daemon, 2, 3 * 2**20)
    assert wait_until(lambda: "would take the master past max_reply_buffer_per_connection" in daemon.log)
    time.sleep(0.3)
    assert _read_whole_reply(big) is None
    assert _read_whole_reply(small) == 3 * 2**20
    assert daemon.client().call("blob", 2**20) == b"\x01" * 2**20


def test_an_idle_worker_does_not_keep_the_reply_it_handed_to_the_master(make_daemon):
    daemon = make_daemon({"blob": "testexperts:blob", "add": "testexperts:add"}, workers=1)
    (worker,) = (psutil.Process(pid) for pid in daemon.worker_pids())
    master = psutil.Process(daemon.proc.pid)
    assert daemon.client().call("add", 1, 1) == 2
    before, master_before = worker.memory_info().rss, master.memory_info().rss
    hog = _call_without_reading(daemon, 1, 48 * 2**20)
    assert wait_until(lambda: master.memory_info().rss - master_before > 32 * 2**20)  # the master holds the reply
    # Handed to the master, the reply is the master's to write: the worker, idle now, lets it go.
    assert wait_until(lambda: worker.memory_info().rss - before < 16 * 2**20, timeout=3), \
        f"the idle worker holds {(worker.memory_info().rss - before) / 2**20:.0f} MiB more"
    assert _read_whole_reply(hog) == 48 * 2**20  # the master has it all


# ---------------------------------------------------------------- one user's share (items 6 and 7, per uid)
def _as_alice_in_background(short_dir, action) -> threading.Thread:
    os.chmod(short_dir, 0o755)
    uid, gid = local_user("xd-alice")
    thread = threading.Thread(target=as_user, args=(uid, gid, action), daemon=True)
    thread.start()
    return thread


@needs_root
def test_a_user_trickling_partial_requests_cannot_keep_another_user_from_the_gathering_budget(make_daemon, short_dir):
    daemon = make_daemon({"echo": "testexperts:echo"}, workers=1, max_frame="1M", read_timeout="30s",
                         socket_mode="0666")

    def alice() -> str:  # 4 requests of 0.9 MB, each 10 kB short, kept arriving a byte at a time: never stalled
        socks = []
        for i in range(4):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.connect(str(daemon.socket))
            sock.sendall(protocol.encode_call(i + 1, "echo", [b"s" * 900_000], {})[:-10_000])
            socks.append(sock)
        end = time.monotonic() + 5
        while time.monotonic() < end:
            for sock in socks:
                try:
                    sock.send(b"s")
                except OSError:
                    pass
            time.sleep(0.05)
        return "done"

    thread = _as_alice_in_background(short_dir, alice)
    time.sleep(1.0)  # alice holds 3.56 MB of the 4 MiB budget, and keeps sending
    payload = b"z" * 800_000  # gathered too: more than a socket holds
    started = time.monotonic()
    assert daemon.client(timeout=30, retries=0).call("echo", payload) == {"args": [payload], "kwargs": {}}
    assert time.monotonic() - started < 3.0
    assert "holds more than half of it while the gathering budget" in daemon.log
    thread.join(10)


@needs_root
def test_a_user_whose_replies_pile_up_cannot_keep_another_user_from_max_reply_buffer(make_daemon, short_dir):
    daemon = make_daemon({"blob": "testexperts:blob"}, workers=1, max_reply_buffer="40M", socket_mode="0666")

    def alice() -> str:  # three 15 MiB replies she never reads: 30 MiB held, the third refused
        socks = []
        for i in range(3):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.connect(str(daemon.socket))
            sock.sendall(protocol.encode_call(i + 1, "blob", [15 * 2**20], {}))
            socks.append(sock)
            time.sleep(0.2)
        time.sleep(5)
        return "done"

    thread = _as_alice_in_background(short_dir, alice)
    assert wait_until(lambda: daemon.log.count("would take the master past") >= 1)
    mine = _call_without_reading(daemon, 7, 15 * 2**20)  # 45 MiB in all: alice, over her half, gives way
    assert wait_until(lambda: "holds more than half of max_reply_buffer" in daemon.log)
    assert _read_whole_reply(mine) == 15 * 2**20
    thread.join(10)
