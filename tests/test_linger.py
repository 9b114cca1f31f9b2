"""The lingering fast path: a worker keeps a connection for its next request while nobody else waits."""

import os
import signal
import time

import pytest

from expertd.errors import RequestTimeout

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
    assert client.call("add", 5, 5) == 10  # the master took the connection back


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
