"""Worker supervision and stopping: real fork, real signals."""

import os
import signal
import socket
import threading
import time

import pytest

from expertd.errors import WorkerLost

from conftest import Daemon, run_expertd, wait_until, write_config


def test_killed_worker_is_replaced_and_calls_go_on(daemon):
    client = daemon.client()
    before = daemon.worker_pids()
    assert len(before) == 2
    victim = next(iter(before))
    os.kill(victim, signal.SIGKILL)
    after = daemon.wait_workers(2, exclude={victim})
    assert victim not in after
    assert [client.call("add", i, i) for i in range(20)] == [2 * i for i in range(20)]
    assert "was killed by SIGKILL" in daemon.log


def test_worker_lost_mid_request_is_reported_not_hung(daemon):
    client = daemon.client(retries=0, timeout=10)
    with pytest.raises(WorkerLost) as caught:
        client.call("kill_worker")
    assert caught.value.code == "worker_lost" and caught.value.retryable
    daemon.wait_workers(2, exclude=set())
    assert client.call("add", 1, 2) == 3


def test_client_retries_once_after_a_lost_worker(daemon, short_dir):
    # kill_worker kills every worker it reaches: with retry on, the client sends
    # it twice and then reports the loss; a pure expert would have succeeded.
    client = daemon.client(retries=1, timeout=10)
    with pytest.raises(WorkerLost):
        client.call("kill_worker")
    wait_until(lambda: daemon.log.count("while serving request") >= 2)
    assert daemon.log.count("while serving request") == 2


def test_sigterm_exits_zero_and_removes_the_socket(daemon):
    workers = daemon.worker_pids()
    assert daemon.socket.exists()
    assert daemon.stop(signal.SIGTERM) == 0
    assert not daemon.socket.exists()
    assert wait_until(lambda: not any(_alive(pid) for pid in workers))


def test_sigint_stops_like_sigterm(daemon):
    assert daemon.stop(signal.SIGINT) == 0
    assert not daemon.socket.exists()


def test_in_flight_requests_finish_during_graceful_stop(daemon):
    client = daemon.client(timeout=20)
    results = []
    caller = threading.Thread(target=lambda: results.append(client.call("slow", 1.5)))
    caller.start()
    time.sleep(0.3)  # the call is in a worker by now
    started = time.monotonic()
    daemon.send_signal(signal.SIGTERM)
    assert wait_until(lambda: not daemon.socket.exists(), timeout=2)  # stops accepting at once
    caller.join(10)
    assert results and isinstance(results[0], int)  # the slow call got its answer
    assert daemon.proc.wait(10) == 0
    assert time.monotonic() - started >= 1.0


def test_graceful_timeout_bounds_the_stop(make_daemon):
    daemon = make_daemon(graceful_timeout="1s")
    client = daemon.client(timeout=30, retries=0)
    errors = []

    def call():
        try:
            client.call("slow", 20)
        except Exception as exc:
            errors.append(exc)

    caller = threading.Thread(target=call)
    caller.start()
    time.sleep(0.5)
    started = time.monotonic()
    assert daemon.stop(signal.SIGTERM) == 0
    assert time.monotonic() - started < 6
    caller.join(10)
    assert errors and getattr(errors[0], "code", None) == "shutting_down"


def test_stale_socket_file_is_replaced(short_dir):
    path = short_dir / "stale.sock"
    dead = socket.socket(socket.AF_UNIX)
    dead.bind(str(path))
    dead.close()  # bound, never listening: what a crashed daemon leaves
    assert path.exists()
    daemon = Daemon(write_config(short_dir), path)
    try:
        daemon.start()
        assert daemon.client().call("add", 1, 1) == 2
    finally:
        daemon.kill()


def test_live_socket_is_refused(daemon):
    done = run_expertd("--config", str(daemon.config), "--socket", str(daemon.socket))
    assert done.returncode == 1
    assert "another daemon is listening on" in done.stderr and done.stderr.count("\n") == 1
    assert daemon.client().call("add", 2, 2) == 4  # the running daemon is untouched


def test_non_socket_file_at_socket_path_is_refused(short_dir):
    path = short_dir / "file.sock"
    path.write_text("precious")
    done = run_expertd("--config", str(write_config(short_dir)), "--socket", str(path))
    assert done.returncode == 1 and "exists and is not a socket" in done.stderr
    assert path.read_text() == "precious"


def test_socket_mode_and_directory(short_dir):
    path = short_dir / "sub" / "dir" / "x.sock"
    daemon = Daemon(write_config(short_dir, socket_mode="0600"), path)
    try:
        daemon.start()
        assert (path.stat().st_mode & 0o777) == 0o600
        assert (path.parent.stat().st_mode & 0o777) == 0o755
    finally:
        daemon.kill()


def test_broken_after_fork_hook_stops_start_up(short_dir):
    config = write_config(short_dir, {"worker_fails": "badhooks:worker_fails"})
    done = run_expertd("--config", str(config), "--socket", str(short_dir / "x.sock"), "--workers", "2")
    assert done.returncode == 3
    assert "cannot build model in worker" in done.stderr
    assert not (short_dir / "x.sock").exists()


def test_worker_crash_loop_backs_off(make_daemon, short_dir):
    flag = short_dir / "broken"
    daemon = make_daemon({"flaky_boot": "badhooks:flaky_boot"}, workers=1, env={"EXPERTD_TEST_FLAG": str(flag)})
    flag.touch()  # from now on every new worker fails in after_fork
    os.kill(next(iter(daemon.worker_pids())), signal.SIGKILL)
    time.sleep(3)
    respawns = daemon.log.count("broken on respawn")
    # With backoff (0.1, 0.2, 0.4, 0.8, 1.6 s ...) three seconds allow about five attempts, not hundreds.
    assert 2 <= respawns <= 8, daemon.log
    assert daemon.log.count("respawning with backoff") == 1  # logged once per burst
    assert daemon.proc.poll() is None  # the master keeps running
    flag.unlink()
    daemon.wait_workers(1, timeout=15)
    assert daemon.client().call("flaky_boot", 5) == 5


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True

