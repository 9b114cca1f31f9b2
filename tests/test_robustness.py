"""Under load, faults and hostile input: keep serving, lose nothing, let no one in."""

import os
import socket
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest

from expertd import cli, protocol
from expertd.client import Client
from expertd.errors import (
    AccessDenied,
    BadRequest,
    BadResult,
    ExpertFailed,
    Quarantined,
    RequestTimeout,
    WorkerLost,
)

from conftest import ROOT, Daemon, raw_connection, run_expertd, wait_until, write_config
from users import as_user, needs_root

sys.path.insert(0, str(ROOT / "bench"))
from soak import run_load


# ---------------------------------------------------------------- timeouts
def test_stuck_expert_times_out_and_its_worker_is_replaced(make_daemon):
    experts = {"slow": {"function": "testexperts:slow", "timeout": "1s"}, "add": "testexperts:add"}
    daemon = make_daemon(experts, workers=1)
    before = daemon.worker_pids()
    client = daemon.client(timeout=30)
    started = time.monotonic()
    with pytest.raises(RequestTimeout) as caught:
        client.call("slow", 30)
    assert time.monotonic() - started < 2.0  # timeout + 1 s
    assert "within its 1s timeout" in str(caught.value)
    after = daemon.wait_workers(1, exclude=before)
    assert after.isdisjoint(before)
    assert client.call("add", 1, 1) == 2
    assert "exceeded the 1s timeout of slow" in daemon.log
    assert "respawning with backoff" not in daemon.log  # a timeout kill is not a crash


def test_worker_whose_master_was_killed_keeps_the_call_timeout_and_exits(make_daemon):
    daemon = make_daemon({"slow": {"function": "testexperts:slow", "timeout": "3s"}}, workers=1)
    worker = psutil.Process(next(iter(daemon.worker_pids())))
    sock = raw_connection(daemon, timeout=30)
    try:
        started = time.monotonic()
        sock.sendall(protocol.encode_call(1, "slow", [25], {}))
        time.sleep(0.5)  # the worker is in the call
        daemon.proc.kill()  # nobody left to enforce the timeout but the worker itself
        daemon.proc.wait()
        assert sock.recv(65536) == b""  # closed, never a late reply
        assert time.monotonic() - started < 5.0  # the 3 s timeout, give or take the machine
        assert wait_until(lambda: not worker.is_running() or worker.status() == psutil.STATUS_ZOMBIE, 2.0)
    finally:
        sock.close()
        if worker.is_running():
            worker.kill()


def test_default_timeout_applies_to_every_expert(make_daemon):
    daemon = make_daemon({"slow": "testexperts:slow"}, workers=1, timeout="500ms")
    started = time.monotonic()
    with pytest.raises(RequestTimeout):
        daemon.client().call("slow", 10)
    assert time.monotonic() - started < 1.5
    assert isinstance(daemon.client().call("slow", 0.01), int)


def test_client_read_timeout(make_daemon):
    daemon = make_daemon({"slow": "testexperts:slow"}, workers=1)
    with pytest.raises(RequestTimeout):
        daemon.client(timeout=0.3).call("slow", 2)


# ---------------------------------------------------------------- recycling
def test_max_requests_recycles_workers_without_failed_calls(make_daemon):
    daemon = make_daemon({"pid": "testexperts:pid"}, workers=2, max_requests=20, max_requests_jitter=5)
    client = daemon.client(retries=0)
    pids = [client.call("pid") for _ in range(200)]  # any failure raises
    assert len(set(pids)) >= 200 // 25
    for pid in set(pids):  # no worker served more than its limit
        assert pids.count(pid) <= 25
    assert daemon.log.count("retiring after") >= 6
    assert "respawning with backoff" not in daemon.log


def test_leaking_expert_is_recycled_at_its_memory_limit(make_daemon):
    daemon = make_daemon({"leak": "testexperts:leak"}, workers=1, max_memory="96M")
    client = daemon.client(retries=0)
    pids = [client.call("leak", 8) for _ in range(40)]  # 320 MiB leaked in all: needs recycling
    assert len(set(pids)) >= 3
    assert "max_memory (private memory" in daemon.log
    for pid in daemon.worker_pids():
        assert pid not in pids[:-1] or pid == pids[-1]


# ---------------------------------------------------------------- crashes
@pytest.mark.parametrize("quarantine_after", [3, 0])
def test_expert_that_kills_every_worker_does_not_make_the_master_spin(make_daemon, quarantine_after):
    daemon = make_daemon({"kill_worker": "testexperts:kill_worker", "add": "testexperts:add"}, workers=2,
                         quarantine_after=quarantine_after)
    stop = time.monotonic() + 3

    def hammer():
        client = daemon.client(retries=0, timeout=30)
        while time.monotonic() < stop:
            try:
                client.call("kill_worker")
            except (WorkerLost, Quarantined):
                pass

    threads = [threading.Thread(target=hammer) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    spawned = daemon.log.count(" ready in ")
    assert spawned < 80, f"{spawned} workers started in 3 s"
    if quarantine_after:  # the expert is held back, and only it: no daemon-wide backoff
        assert daemon.log.count("(quarantine)") == 1 and "respawning with backoff" not in daemon.log
    else:
        assert daemon.log.count("respawning with backoff") == 1  # logged once per burst
    assert daemon.proc.poll() is None
    client = daemon.client(timeout=30)
    assert client.call("add", 2, 3) == 5  # serving again once the poison stops


def _add_latencies(daemon: Daemon, seconds: float) -> list[float]:
    client = daemon.client(retries=0, timeout=30)
    latencies = []
    stop = time.monotonic() + seconds
    while time.monotonic() < stop:
        started = time.monotonic()
        assert client.call("add", 2, 3) == 5  # every call answers
        latencies.append(time.monotonic() - started)
    return sorted(latencies)


def test_an_expert_that_keeps_killing_workers_is_quarantined_not_everyone(make_daemon, capsys):
    daemon = make_daemon({"kill_worker": "testexperts:kill_worker", "add": "testexperts:add"}, workers=2)
    alone = _add_latencies(daemon, 2)  # the same calls with nobody crashing workers
    outcomes: list[str] = []
    stop = time.monotonic() + 3

    def crasher() -> None:
        client = daemon.client(retries=0, timeout=30)
        while time.monotonic() < stop:
            try:
                client.call("kill_worker")
            except (WorkerLost, Quarantined) as exc:
                outcomes.append(exc.code if exc.code == "worker_lost" or "kill_worker is quarantined for" in str(exc)
                                else str(exc))

    threads = [threading.Thread(target=crasher) for _ in range(4)]  # enough to kill every worker at once
    for thread in threads:
        thread.start()
    beside = _add_latencies(daemon, 3)
    for thread in threads:
        thread.join(60)
    mean_alone, mean_beside = sum(alone) / len(alone), sum(beside) / len(beside)
    # The crashers' refused calls cost the master and the CPUs something, so not quite as fast as alone;
    # held back with everyone (a respawn backoff), add took 0.5-1 s a call here.
    assert mean_beside < 20 * mean_alone + 0.02, f"add took {mean_beside * 1000:.2f} ms on average beside " \
        f"the crashers, {mean_alone * 1000:.2f} ms alone"
    # Its calls killed workers until the quarantine (and those already in a worker then), then were refused:
    assert set(outcomes) == {"worker_lost", "quarantined"}, set(outcomes)
    assert 3 <= outcomes.count("worker_lost") <= 3 + 2 and outcomes.count("quarantined") > 100, outcomes[:10]
    assert "respawning with backoff" not in daemon.log  # nobody else was held back
    assert daemon.log.count("refusing calls to it for 30s (quarantine)") == 1
    assert cli.main(["--socket", str(daemon.socket), "status"]) == 0  # (this tree's expertctl, in-process)
    shown = capsys.readouterr().out
    assert "quarantined: kill_worker (its calls kept killing workers) until " in shown, shown
    http = raw_connection(daemon)  # over HTTP too
    http.sendall(b"POST /call/kill_worker HTTP/1.1\r\nHost: localhost\r\nContent-Length: 2\r\n\r\n[]")
    reply = http.recv(65536)
    assert reply.startswith(b"HTTP/1.1 503 ") and b'"quarantined"' in reply and b"Retry-After: " in reply


def test_a_quarantine_ends_and_a_repeat_soon_after_lasts_twice_as_long(make_daemon):
    daemon = make_daemon({"kill_worker": "testexperts:kill_worker", "add": "testexperts:add"}, workers=1,
                         quarantine_after=2, quarantine_time="2s")
    client = daemon.client(retries=0, timeout=30)
    for _ in range(2):
        with pytest.raises(WorkerLost):
            client.call("kill_worker")
    with pytest.raises(Quarantined) as caught:
        client.call("kill_worker")
    assert "kill_worker is quarantined for 2s more" in str(caught.value)
    assert client.call("add", 1, 1) == 2  # only that expert is refused
    time.sleep(2.1)
    for _ in range(2):  # served again, and killing its worker again: quarantined again, for longer
        with pytest.raises(WorkerLost):
            client.call("kill_worker")
    with pytest.raises(Quarantined) as caught:
        client.call("kill_worker")
    assert "kill_worker is quarantined for 4s more" in str(caught.value)
    assert "expert kill_worker: quarantine over" in daemon.log
    assert "refusing calls to it for 2s (quarantine)" in daemon.log
    assert "refusing calls to it for 4s (quarantine)" in daemon.log


def test_crashes_in_calls_a_lingering_worker_served_count_and_quarantine_stops_lingering(make_daemon):
    daemon = make_daemon({"kill_worker": "testexperts:kill_worker", "add": "testexperts:add"}, workers=2,
                         linger="2s", quarantine_after=2)
    client = daemon.client(retries=0, timeout=30)
    for _ in range(2):
        assert client.call("add", 1, 1) == 2  # the worker keeps the connection for its next call ...
        with pytest.raises(WorkerLost):
            client.call("kill_worker")  # ... and dies serving this one without the master's hand-over
    assert wait_until(lambda: "(quarantine)" in daemon.log)
    for _ in range(3):  # the master sees every call now, lingering or not
        assert client.call("add", 1, 1) == 2
        with pytest.raises(Quarantined):
            client.call("kill_worker")


def test_bad_exception_and_bad_result_do_not_kill_the_worker(daemon):
    client = daemon.client(retries=0)
    before = daemon.worker_pids()
    with pytest.raises(ExpertFailed) as caught:
        client.call("unprintable")
    assert "_Unprintable" in str(caught.value)
    with pytest.raises(BadResult) as caught:
        client.call("bad_array")
    assert "tolist failed" in str(caught.value)
    assert daemon.worker_pids() == before


def test_worker_crash_before_ready_stops_start_up(short_dir):
    config = write_config(short_dir, {"x": "badhooks:segfaults_on_boot"})
    started = time.monotonic()
    done = run_expertd("--config", str(config), "--socket", str(short_dir / "x.sock"), timeout=60)
    assert done.returncode == 3
    assert "was killed by SIGSEGV before it was ready" in done.stderr
    assert time.monotonic() - started < 20


def test_stale_pool_of_several_connections_recovers(make_daemon):
    daemon = make_daemon({"add": "testexperts:add", "slow": "testexperts:slow"}, workers=2)
    client = daemon.client()
    threads = [threading.Thread(target=client.call, args=("slow", 0.2)) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(client._pool) == 3
    assert daemon.stop() == 0
    daemon.start()
    assert client.call("add", 1, 2) == 3


# ---------------------------------------------------------------- input limits
def test_nesting_and_argument_limits(make_daemon):
    daemon = make_daemon({"echo": "testexperts:echo"}, workers=1, max_depth=8, max_args=4)
    client = daemon.client()
    deep = value = []
    for _ in range(7):
        value.append([])
        value = value[0]
    assert client.call("echo", deep)["args"] == [deep]  # 8 levels: allowed
    with pytest.raises(BadRequest) as caught:
        client.call("echo", [deep])
    assert "max_depth" in str(caught.value)
    with pytest.raises(BadRequest) as caught:
        client.call("echo", 1, 2, 3, d=4, e=5)
    assert "max_args" in str(caught.value)
    assert client.call("echo", 1, 2, c=3, d=4) == {"args": [1, 2], "kwargs": {"c": 3, "d": 4}}


def test_array_bomb_is_refused_cheaply(make_daemon):
    daemon = make_daemon({"echo": "testexperts:echo"}, workers=1, max_frame="4M")
    body = b"\x93\xa4echo\x91" + b"\xdd" + (3_000_000).to_bytes(4, "big") + b"\x90" * 3_000_000 + b"\x80"
    sock = raw_connection(daemon)
    sock.sendall(protocol.encode_frame(protocol.CALL, 9, body))
    kind, request_id, reply = protocol.read_frame(sock, 1 << 20, time.monotonic() + 10)
    assert (kind, request_id) == (protocol.ERROR, 9)
    assert "arrays and maps" in protocol.unpack(reply)["message"]
    assert daemon.client().call("echo", 1) == {"args": [1], "kwargs": {}}


def _call_unknown_experts(daemon: Daemon, first: int, count: int, distinct: bool = True) -> None:
    """``count`` calls to experts that do not exist, each named afresh (or all one name), pipelined."""
    sock = raw_connection(daemon, timeout=30)
    batch = 200
    for start in range(first, first + count, batch):
        sock.sendall(b"".join(protocol.encode_call(n, f"no-such-expert-{n if distinct else 0:08d}", [], {})
                              for n in range(start, start + batch)))
        for n in range(start, start + batch):
            kind, request_id, body = protocol.read_frame(sock, 1 << 20, time.monotonic() + 30)
            assert (kind, request_id) == (protocol.ERROR, n)
            assert protocol.unpack(body)["code"] == "unknown_expert"
    sock.close()


def test_calls_to_many_distinct_unknown_experts_do_not_grow_the_master(make_daemon):
    # No lingering: every call passes the master, which is where per-expert state lived.
    daemon = make_daemon({"add": "testexperts:add"}, workers=1, linger="0")
    master = psutil.Process(daemon.proc.pid)
    _call_unknown_experts(daemon, 0, 5_000)  # the master's own caches and free lists settle
    before = master.memory_full_info().uss
    # As many calls to one unknown name: what the calls cost the master in any case (the
    # counters it keeps per request, say).
    _call_unknown_experts(daemon, 5_000, 25_000, distinct=False)
    middle = master.memory_full_info().uss
    _call_unknown_experts(daemon, 30_000, 25_000)
    after = master.memory_full_info().uss
    extra = (after - middle) - (middle - before)
    assert extra < 2**20, f"25k distinct unknown names cost the master {extra / 2**20:.1f} MiB more than one name"
    conn = raw_connection(daemon)
    conn.sendall(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\n\r\n")
    metrics = b""
    while b"expertd_build_info" not in metrics:
        metrics += conn.recv(65536)
    assert b"no-such-expert" not in metrics
    assert b'expertd_errors_total{expert="(unknown)",code="unknown_expert"} 55000' in metrics
    assert daemon.client().call("add", 1, 2) == 3


def test_request_written_in_small_pieces_is_served(make_daemon):
    daemon = make_daemon({"echo": "testexperts:echo"}, workers=1)
    frame = protocol.encode_call(5, "echo", [b"z" * 40_000], {})
    sock = raw_connection(daemon)
    for start in range(0, len(frame), 256):
        sock.send(frame[start : start + 256])
    kind, request_id, reply = protocol.read_frame(sock, 1 << 20, time.monotonic() + 10)
    assert (kind, request_id) == (protocol.RESULT, 5)
    assert protocol.unpack(reply)["args"] == [b"z" * 40_000]


def test_twenty_stalled_connections_do_not_delay_a_normal_call(make_daemon):
    daemon = make_daemon({"add": "testexperts:add"}, workers=2, read_timeout="30s")
    stalled = []
    for i in range(20):
        sock = raw_connection(daemon)
        frame = protocol.encode_call(i, "add", [1, 2], {})
        sock.sendall(frame[: 5 + i % 10] if i % 2 else frame[:-1])  # half headers and half bodies
        stalled.append(sock)
    client = daemon.client()
    started = time.monotonic()
    assert [client.call("add", i, 1) for i in range(10)] == [i + 1 for i in range(10)]
    assert time.monotonic() - started < 1.0


def test_client_that_does_not_read_its_reply_does_not_pin_a_worker(make_daemon):
    daemon = make_daemon({"blob": "testexperts:blob", "add": "testexperts:add"}, workers=1)
    hog = raw_connection(daemon)
    hog.sendall(protocol.encode_call(1, "blob", [8 * 2**20], {}))  # 8 MiB reply, never read
    time.sleep(0.5)
    started = time.monotonic()
    assert daemon.client().call("add", 1, 1) == 2
    assert time.monotonic() - started < 1.0
    # and the hog still gets its whole reply when it finally reads
    kind, request_id, body = protocol.read_frame(hog, 16 * 2**20, time.monotonic() + 10)
    assert (kind, request_id, len(protocol.unpack(body))) == (protocol.RESULT, 1, 8 * 2**20)


def test_idle_connections_are_closed_after_idle_timeout_and_clients_reconnect(make_daemon):
    daemon = make_daemon({"add": "testexperts:add"}, workers=1, idle_timeout="500ms")
    client = daemon.client()
    assert client.call("add", 1, 1) == 2
    sock = raw_connection(daemon)
    time.sleep(1.5)
    assert sock.recv(10) == b""  # the daemon closed the idle connection
    assert client.call("add", 2, 2) == 4  # the pooled connection was stale: retried transparently


# ---------------------------------------------------------------- load and chaos
def test_load_sixteen_clients_two_workers_every_answer_checked(make_daemon):
    daemon = make_daemon({"add": "testexperts:add"}, workers=2)
    counts = run_load(str(daemon.socket), clients=16, seconds=4)
    assert counts.sent > 1000
    assert (counts.failed, counts.wrong) == (0, 0), counts.summary()
    assert counts.answered == counts.sent


def test_chaos_with_retries_no_failure_reaches_the_caller(make_daemon):
    daemon = make_daemon({"add": "testexperts:add"}, workers=2)
    counts = run_load(str(daemon.socket), clients=16, seconds=6, retries=1, chaos_master_pid=daemon.proc.pid)
    assert counts.kills >= 15
    assert (counts.failed, counts.wrong) == (0, 0), counts.summary()
    assert daemon.proc.poll() is None


def test_chaos_without_retries_every_failure_is_clean_and_retryable(make_daemon):
    daemon = make_daemon({"add": "testexperts:add"}, workers=2)
    counts = run_load(str(daemon.socket), clients=16, seconds=4, retries=0, chaos_master_pid=daemon.proc.pid)
    assert counts.kills >= 10 and counts.wrong == 0
    assert set(counts.failures) <= {"worker_lost"}, counts.summary()
    assert counts.answered + counts.failed == counts.sent


# ---------------------------------------------------------------- access


def _call_as(uid: int, socket_path: str, over_http: bool = False) -> str:
    """Call add as ``uid`` (msgpack, or HTTP) in a forked child; returns what happened."""
    def call() -> str:
        try:
            if over_http:
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                sock.settimeout(10)
                sock.connect(socket_path)
                sock.sendall(b"POST /call/add HTTP/1.1\r\nHost: x\r\nContent-Length: 6\r\n\r\n[1, 1]")
                return sock.recv(65536).decode(errors="replace")
            return f"ok {Client(socket_path, retries=0).call('add', 1, 1)}"
        except AccessDenied as exc:
            return f"denied {exc}"

    return as_user(uid, uid, call)


@needs_root
def test_peer_not_on_the_allow_list_is_refused(make_daemon, short_dir):
    os.chmod(short_dir, 0o755)
    daemon = make_daemon({"add": "testexperts:add"}, workers=1, socket_mode="0666", allow_uids="4242")
    assert _call_as(4242, str(daemon.socket)) == "ok 2"
    refused = _call_as(4343, str(daemon.socket))
    assert refused.startswith("denied uid 4343 may not use this expertd")
    refused = _call_as(4343, str(daemon.socket), over_http=True)  # refused in the protocol it speaks
    assert refused.startswith("HTTP/1.1 403 ") and '"access_denied"' in refused
    assert _call_as(4242, str(daemon.socket), over_http=True).startswith("HTTP/1.1 200 ")
    assert wait_until(lambda: "refused a connection from uid 4343" in daemon.log)
    assert daemon.client().call("add", 2, 2) == 4  # root is always allowed


@needs_root
def test_socket_mode_keeps_other_users_out(make_daemon, short_dir):
    os.chmod(short_dir, 0o755)
    daemon = make_daemon({"add": "testexperts:add"}, workers=1)  # default 0660, root's group
    assert _call_as(4242, str(daemon.socket)).startswith("error ConnectError: permission denied")


@needs_root
def test_socket_group(short_dir):
    os.chmod(short_dir, 0o755)
    config = write_config(short_dir, {"add": "testexperts:add"}, socket_group="4545")
    daemon = Daemon(config, Path(short_dir) / "g.sock", workers=1)
    try:
        daemon.start()
        assert daemon.socket.stat().st_gid == 4545
    finally:
        daemon.kill()
