"""The lingering fast path: a worker keeps a connection for its next request while nobody else waits."""

import os
import signal
import socket
import threading
import time

import msgpack
import pytest

from expertd import protocol
from expertd.errors import RequestTimeout

from conftest import metrics_samples, raw_connection, wait_until

EXPERTS = {"add": "testexperts:add", "pid": "testexperts:pid",
           "slow": {"function": "testexperts:slow", "timeout": "1s"}}


def test_sequential_calls_are_served_and_counted(make_daemon):
    daemon = make_daemon(EXPERTS, workers=2, linger="1s")
    client = daemon.client(pool_size=1)
    assert [client.call("add", i, 1) for i in range(300)] == [i + 1 for i in range(300)]
    pids = {client.call("pid") for _ in range(20)}
    assert len(pids) == 1  # one worker kept the connection
    status = daemon.client().status()
    assert sum(w["requests"] for w in status["workers"]) >= 320


def test_a_lingering_worker_is_reclaimed_for_another_connection(make_daemon):
    daemon = make_daemon(EXPERTS, workers=1, linger="5s")
    first, second = daemon.client(), daemon.client()
    assert first.call("add", 1, 1) == 2  # the only worker now lingers on first's connection
    started = time.monotonic()
    assert second.call("add", 2, 2) == 4
    assert time.monotonic() - started < 0.5  # reclaimed at once, not after the 5 s linger
    assert first.call("add", 3, 3) == 6


def test_timeout_applies_to_requests_served_while_lingering(make_daemon):
    daemon = make_daemon(EXPERTS, workers=1, linger="5s")
    client = daemon.client(timeout=30)
    before = daemon.worker_pids()
    assert client.call("add", 1, 1) == 2  # the worker lingers; the next call goes straight to it
    started = time.monotonic()
    with pytest.raises(RequestTimeout):
        client.call("slow", 30)
    assert time.monotonic() - started < 2.5
    daemon.wait_workers(1, exclude=before)
    assert client.call("add", 2, 2) == 4


def test_a_worker_killed_while_lingering_costs_the_client_nothing(make_daemon):
    daemon = make_daemon(EXPERTS, workers=2, linger="10s")
    client = daemon.client(pool_size=1, retries=0)
    worker = client.call("pid")
    os.kill(worker, signal.SIGKILL)
    assert daemon.wait_workers(2, exclude={worker})
    # The worker read its connection directly, so the master cannot know whether it died with a
    # request just taken out of the socket: it closes the connection, and the pooled
    # connection's end is retried on a new one.
    assert client.call("add", 5, 5) == 10


def test_a_connection_whose_lingering_worker_dies_is_closed_not_left_waiting(make_daemon):
    daemon = make_daemon(EXPERTS, workers=2, linger="10s")
    sock = raw_connection(daemon, timeout=10)
    sock.sendall(_call(1, "pid"))
    kind, request_id, worker = _reply(sock)
    assert (kind, request_id) == (protocol.RESULT, 1)
    os.kill(worker, signal.SIGKILL)
    assert sock.recv(16) == b""  # closed at once: a client never waits for a reply that cannot come
    assert daemon.client().call("add", 1, 2) == 3


def test_graceful_stop_reclaims_lingering_workers(make_daemon):
    daemon = make_daemon(EXPERTS, workers=2, linger="30s")
    client = daemon.client()
    assert client.call("add", 1, 1) == 2
    started = time.monotonic()
    assert daemon.stop() == 0
    assert time.monotonic() - started < 5


def test_linger_off(make_daemon):
    daemon = make_daemon(EXPERTS, workers=2, linger="0")
    client = daemon.client(pool_size=1)
    assert len({client.call("pid") for _ in range(40)}) == 2  # handed back after every request


def test_usr2_to_the_master_is_ignored(make_daemon):
    daemon = make_daemon(EXPERTS, workers=1)
    daemon.send_signal(signal.SIGUSR2)  # the master's word to its workers; a stray one must not kill it
    time.sleep(0.2)
    assert daemon.proc.poll() is None and daemon.client().call("add", 1, 1) == 2


def test_a_large_reply_does_not_end_lingering(make_daemon):
    daemon = make_daemon({**EXPERTS, "echo": "testexperts:echo"}, workers=2, linger="1s")
    client = daemon.client(pool_size=1)
    assert client.call("add", 1, 1) == 2
    conn = client._pool[0]
    big = "x" * 2_000_000  # more than the socket holds: the worker waits for the client to drain it
    for _ in range(3):
        assert client.call("echo", big)["args"] == [big]
        assert client.call("add", 2, 2) == 4
    assert client._pool == [conn]  # the same connection throughout: never dropped
    assert len({client.call("pid") for _ in range(10)}) == 1


def _call(request_id: int, expert: str, *args: object) -> bytes:
    return protocol.encode_frame(protocol.CALL, request_id, msgpack.packb([expert, list(args), {}]))


def _reply(sock) -> tuple[int, int, object]:
    kind, request_id, body = protocol.read_frame(sock, 1 << 30)
    return kind, request_id, msgpack.unpackb(body)


def test_requests_sent_together_are_all_answered_in_order(make_daemon):
    # A lingering worker reads what the socket holds: several requests at once, and a control
    # request among them, which is the master's.  Each is answered once, in order.
    daemon = make_daemon(EXPERTS, workers=2, linger="5s")
    sock = raw_connection(daemon)
    sock.sendall(_call(1, "add", 1, 1))
    assert _reply(sock) == (protocol.RESULT, 1, 2)  # its worker lingers on the connection now
    for _ in range(3):
        sock.sendall(_call(2, "add", 2, 2) + _call(3, "add", 3, 3) + protocol.encode_frame(protocol.STATUS, 4, b"")
                     + _call(5, "add", 5, 5) + _call(6, "add", 6, 6)[:7])
        assert _reply(sock) == (protocol.RESULT, 2, 4)
        assert _reply(sock) == (protocol.RESULT, 3, 6)
        kind, request_id, status = _reply(sock)
        assert (kind, request_id) == (protocol.RESULT, 4) and status["workers"]
        assert _reply(sock) == (protocol.RESULT, 5, 10)
        sock.sendall(_call(6, "add", 6, 6)[7:])  # the rest of a request begun in the same write
        assert _reply(sock) == (protocol.RESULT, 6, 12)


def test_a_request_arriving_in_pieces_on_a_lingering_connection(make_daemon):
    daemon = make_daemon(EXPERTS, workers=1, linger="5s")
    sock = raw_connection(daemon)
    sock.sendall(_call(1, "add", 1, 1))
    assert _reply(sock) == (protocol.RESULT, 1, 2)
    frame = _call(2, "add", 20, 22)
    for cut in (3, 12, 15):  # in the header, at its end, in the body
        sock.sendall(frame[:cut])
        time.sleep(0.1)
        sock.sendall(frame[cut:])
        assert _reply(sock) == (protocol.RESULT, 2, 42)
    assert daemon.client().call("add", 1, 1) == 2  # and the only worker is free for others


def test_a_large_request_on_a_lingering_connection(make_daemon):
    daemon = make_daemon({**EXPERTS, "echo": "testexperts:echo"}, workers=2, linger="5s")
    client = daemon.client(pool_size=1)
    assert client.call("add", 1, 1) == 2
    for size in (70_000, 300_000, 3_000_000):  # more than one read of the worker's, more than the socket holds
        text = "y" * size
        assert client.call("echo", text)["args"] == [text]
        assert client.call("add", 2, 2) == 4


@pytest.mark.parametrize("linger", ["0", "5s"])
def test_requests_sent_before_the_client_ends_its_input_are_all_answered(make_daemon, linger):
    # A worker may have read them all; what it hands back is still answered after end of file.
    daemon = make_daemon(EXPERTS, workers=2, linger=linger)
    sock = raw_connection(daemon)
    sock.sendall(_call(1, "add", 1, 1))
    assert _reply(sock) == (protocol.RESULT, 1, 2)
    sock.sendall(_call(2, "add", 2, 2) + _call(3, "add", 3, 3) + protocol.encode_frame(protocol.STATUS, 4, b"")
                 + _call(5, "add", 5, 5))
    sock.shutdown(socket.SHUT_WR)
    assert _reply(sock) == (protocol.RESULT, 2, 4)
    assert _reply(sock) == (protocol.RESULT, 3, 6)
    assert _reply(sock)[:2] == (protocol.RESULT, 4)
    assert _reply(sock) == (protocol.RESULT, 5, 10)
    assert sock.recv(16) == b""  # then closed


# ---------------------------------------------------------------- more clients than workers
# With every worker busy, the master hands each busy worker its next connection ahead, to be
# served the moment the one in hand is reported.

def _in_thread(function, *args):
    result: dict = {}

    def run():
        try:
            result["value"] = function(*args)
        except Exception as exc:  # the test inspects it
            result["error"] = exc

    thread = threading.Thread(target=run)
    thread.start()
    return thread, result


def test_many_clients_on_one_worker_all_get_their_own_answers(make_daemon):
    daemon = make_daemon(EXPERTS, workers=1, linger="5ms")
    clients = [daemon.client(retries=0) for _ in range(6)]

    def calls(client, base):
        return [client.call("add", base, i) for i in range(300)]

    threads = [_in_thread(calls, client, 1000 * n) for n, client in enumerate(clients)]
    for thread, _result in threads:
        thread.join(60)
    for n, (_thread, result) in enumerate(threads):
        assert result.get("value") == [1000 * n + i for i in range(300)], result.get("error")
    assert daemon.client().status()["workers"][0]["requests"] >= 1800


def _hand_ahead_behind_slow(daemon, seconds: float, quick: int = 1):
    """Get the only worker busy with slow(seconds) and ``quick`` pid() calls handed ahead to it.

    Returns the raw connections (slow's, then the pid calls', request ids 1, 2, ...), replies
    unread.  The requests are sent at once, slow's first, so that the others arrive while the
    first has only just begun (only then are they handed ahead).
    """
    def all_ahead() -> bool:
        return (daemon.client().status()["workers"][0]["handed_ahead"]
                and metrics_samples(daemon)["expertd_queued_requests"] == 0)

    for _attempt in range(20):
        warm = daemon.client()
        for _ in range(60):  # slow(0) is quick: the master learns that slow's calls are short
            warm.call("slow", 0)
        conns = [raw_connection(daemon) for _ in range(1 + quick)]
        conns[0].sendall(_call(1, "slow", seconds))
        for number, conn in enumerate(conns[1:], 2):
            conn.sendall(_call(number, "pid"))
        if wait_until(all_ahead, timeout=0.3):
            return conns
        for conn in conns:
            _reply(conn)  # (too late to be handed ahead: it was queued; again)
    raise AssertionError("the master never handed a connection ahead")


def test_a_connection_handed_ahead_to_a_worker_that_dies_is_served_by_another(make_daemon):
    daemon = make_daemon(EXPERTS, workers=1, linger="0")
    busy_worker = daemon.client().call("pid")
    slow, quick = _hand_ahead_behind_slow(daemon, 0.9)  # (slow's timeout is 1 s)
    os.kill(busy_worker, signal.SIGKILL)
    kind, _request_id, error = _reply(slow)
    assert kind == protocol.ERROR and error["code"] == "worker_lost"
    kind, _request_id, served_by = _reply(quick)
    assert kind == protocol.RESULT and served_by != busy_worker  # never reached: its replacement served it


def test_a_connection_handed_ahead_to_a_stopping_worker_is_served_by_another(make_daemon):
    daemon = make_daemon(EXPERTS, workers=1, linger="0")
    busy_worker = daemon.client().call("pid")
    slow, quick = _hand_ahead_behind_slow(daemon, 0.9)
    os.kill(busy_worker, signal.SIGTERM)  # it finishes the call in hand, then exits without the next
    assert _reply(slow) == (protocol.RESULT, 1, busy_worker)
    kind, _request_id, served_by = _reply(quick)
    assert kind == protocol.RESULT and served_by != busy_worker
    assert "while serving" not in daemon.log


def test_every_connection_handed_ahead_to_a_stopping_worker_is_served_by_another(make_daemon):
    # Two wait in its channel: both go back to the queue, neither is lost.
    daemon = make_daemon(EXPERTS, workers=1, linger="0")
    busy_worker = daemon.client().call("pid")
    slow, quick, also = _hand_ahead_behind_slow(daemon, 0.9, quick=2)
    os.kill(busy_worker, signal.SIGTERM)
    assert _reply(slow) == (protocol.RESULT, 1, busy_worker)
    for conn, request_id in ((quick, 2), (also, 3)):
        kind, answered_id, served_by = _reply(conn)
        assert (kind, answered_id) == (protocol.RESULT, request_id) and served_by != busy_worker
    assert "while serving" not in daemon.log
