"""Reloads that go wrong: a config typo, a hanging import, HUPs in a burst, a lost generation parent.

Each generation's experts load in a process of their own (expertd.generation): whatever a
reload does, the master's loop goes on serving the old generation and says why a reload failed.
"""

from __future__ import annotations

import os
import resource
import signal
import socket
import statistics
import threading
import time
from pathlib import Path

import psutil
import pytest

from expertd.errors import Overloaded

from conftest import ROOT, wait_until

CODE = '''
import os, time
from expertd import expert

MARK = {mark!r}
IMPORTED_IN = os.getpid()
{extra}

@expert
def version():
    return [MARK, IMPORTED_IN]
'''


def _write(code: Path, mark: str, extra: str = "") -> None:
    (code / "versioned.py").write_text(CODE.format(mark=mark, extra=extra))


def _daemon(make_daemon, short_dir: Path, **settings: object):
    code = short_dir / "code"
    code.mkdir(exist_ok=True)
    _write(code, "v1")
    daemon = make_daemon({"version": "versioned:version", "add": "testexperts:add"}, workers=2,
                         pythonpath=f"{code} {ROOT / 'tests' / 'experts'}", **settings)
    return daemon, code


def _calls_while(daemon, during: float) -> list[float]:
    """Durations of add calls made back to back for ``during`` seconds."""
    client, durations = daemon.client(timeout=30), []
    end = time.monotonic() + during
    while time.monotonic() < end:
        began = time.monotonic()
        assert client.call("add", 1, 2) == 3
        durations.append(time.monotonic() - began)
    return durations


def test_a_reload_with_a_config_typo_keeps_the_old_generation_serving_and_says_why(make_daemon, short_dir):
    daemon, _code = _daemon(make_daemon, short_dir)
    config = daemon.config.read_text()
    daemon.config.write_text(config.replace("[expertd]", "[expertd]\nread_timeot = 3s"))
    daemon.send_signal(signal.SIGHUP)
    assert wait_until(lambda: (daemon.client().status()["last_reload"] or {}).get("ok") is False)
    assert daemon.proc.poll() is None and daemon.socket.exists()
    assert "read_timeot" in daemon.client().status()["last_reload"]["error"]
    assert "reload failed; generation 1 keeps serving" in daemon.log and "read_timeot" in daemon.log
    done = daemon.ctl("reload")  # and the same through a RELOAD request, with the reason in its reply
    assert done.returncode == 1 and "read_timeot" in done.stderr
    assert daemon.client().call("add", 1, 2) == 3
    daemon.config.write_text(config)
    assert daemon.ctl("reload").returncode == 0
    assert wait_until(lambda: daemon.client().status()["generation"] == 2)


def test_a_reload_while_the_master_is_out_of_descriptors_fails_cleanly(make_daemon, short_dir):
    daemon, _code = _daemon(make_daemon, short_dir)
    master = psutil.Process(daemon.proc.pid)
    limits = master.rlimit(psutil.RLIMIT_NOFILE)
    held = []
    try:
        master.rlimit(psutil.RLIMIT_NOFILE, (master.num_fds() + 8, limits[1]))
        for _ in range(40):  # more connections than it has descriptors left
            sock = socket.socket(socket.AF_UNIX)
            sock.connect(str(daemon.socket))
            held.append(sock)
        time.sleep(0.5)
        daemon.send_signal(signal.SIGHUP)
        assert wait_until(lambda: "reload failed; generation 1 keeps serving" in daemon.log, timeout=20)
        assert daemon.proc.poll() is None
    finally:
        for sock in held:
            sock.close()
        if daemon.proc.poll() is None:
            master.rlimit(psutil.RLIMIT_NOFILE, limits)

    def answers() -> bool:
        try:
            return daemon.client().call("add", 2, 2) == 4
        except Overloaded:  # (it has not yet seen the 40 connections close: "retry shortly", as it says)
            return False

    assert wait_until(lambda: daemon.proc.poll() is not None or answers())
    assert daemon.proc.poll() is None and daemon.socket.exists()
    assert daemon.ctl("reload").returncode == 0


def test_the_master_never_imports_expert_code(make_daemon, short_dir):
    daemon, _code = _daemon(make_daemon, short_dir)
    _mark, imported_in = daemon.client().call("version")
    assert imported_in != daemon.proc.pid
    assert imported_in in daemon.generation_parent_pids()
    status = daemon.client().status()
    assert [p["pid"] for p in status["generation_parents"]] == [imported_in]


def test_a_reload_whose_import_is_slow_does_not_delay_calls(make_daemon, short_dir):
    daemon, code = _daemon(make_daemon, short_dir)
    quiet = _calls_while(daemon, 1.0)
    _write(code, "v2", "time.sleep(4)")
    daemon.send_signal(signal.SIGHUP)
    during = _calls_while(daemon, 3.0)  # while the new generation imports
    assert max(during) < 1.0, max(during)
    assert statistics.median(during) < max(0.05, 20 * statistics.median(quiet))
    assert wait_until(lambda: daemon.client().call("version")[0] == "v2", timeout=30)


def test_a_reload_whose_import_never_returns_is_abandoned_after_reload_timeout(make_daemon, short_dir):
    daemon, code = _daemon(make_daemon, short_dir, reload_timeout="2s")
    _write(code, "v2", "while True:\n    time.sleep(1)")
    began = time.monotonic()
    done = daemon.ctl("reload")
    assert done.returncode == 1
    assert "reload_timeout" in done.stderr and "generation 1 keeps serving" in done.stderr
    assert 1.5 < time.monotonic() - began < 20
    assert daemon.client().call("version")[0] == "v1"
    assert wait_until(lambda: len(daemon.generation_parent_pids()) == 1)  # the stuck one is gone
    _write(code, "v3")
    assert daemon.ctl("reload").returncode == 0
    assert wait_until(lambda: daemon.client().call("version")[0] == "v3", timeout=30)


def test_hups_during_a_reload_are_remembered_and_the_last_edit_is_served(make_daemon, short_dir):
    daemon, code = _daemon(make_daemon, short_dir)
    _write(code, "v2", "time.sleep(1.5)")
    daemon.send_signal(signal.SIGHUP)
    time.sleep(0.3)
    _write(code, "v3")
    for _ in range(20):  # a burst while v2 loads: they make one more reload, not twenty, and none is lost
        daemon.send_signal(signal.SIGHUP)
        time.sleep(0.01)
    assert wait_until(lambda: daemon.client().call("version")[0] == "v3", timeout=30)
    assert wait_until(lambda: daemon.client().status()["generation"] == 3 and
                      not daemon.client().status()["reloading"], timeout=30)
    time.sleep(0.5)
    assert daemon.client().status()["generation"] == 3


def test_a_killed_generation_parent_is_replaced_and_workers_are_still_replaced(make_daemon, short_dir):
    daemon, _code = _daemon(make_daemon, short_dir)
    (parent,) = daemon.generation_parent_pids()
    os.kill(parent, signal.SIGKILL)
    assert wait_until(lambda: daemon.generation_parent_pids() - {parent}, timeout=30)
    assert wait_until(lambda: daemon.client().status()["generation"] == 2, timeout=30)
    _a_killed_worker_is_replaced(daemon)


def _a_killed_worker_is_replaced(daemon) -> None:
    """Kill one of the serving generation's two workers once they alone serve; see it replaced.

    A generation serves once it has loaded, while the old generation's workers still answer and then
    retire: this goes by the daemon's account of whose worker is whose, not by a count of processes,
    which can catch the two old workers just before the two new ones are forked together."""
    generation = daemon.client().status()["generation"]
    assert wait_until(lambda: _only_generation_ready(daemon, generation, count=2), timeout=30)
    workers = _workers(daemon)[generation]
    killed = next(iter(workers))
    os.kill(killed, signal.SIGKILL)
    assert wait_until(lambda: _only_generation_ready(daemon, generation, count=2) and
                      killed not in _workers(daemon).get(generation, ()), timeout=30)
    assert len(_workers(daemon)[generation] & workers) == 1  # the other worker served on
    assert daemon.client().call("add", 1, 1) == 2


def _workers(daemon) -> dict[object, set[int]]:
    """The pids of the workers status shows, by generation; those starting or retiring under "other"."""
    found: dict[object, set[int]] = {}
    for worker in daemon.client().status()["workers"]:
        key = worker["generation"] if worker["state"] in ("idle", "busy") else "other"
        found.setdefault(key, set()).add(worker["pid"])
    return found


def _only_generation_ready(daemon, generation: int, count: int) -> bool:
    workers = _workers(daemon)
    return set(workers) == {generation} and len(workers[generation]) == count


def test_expertctl_reload_waits_for_the_new_generation_to_serve(make_daemon, short_dir):
    daemon, code = _daemon(make_daemon, short_dir)
    _write(code, "v2", "time.sleep(1)")
    done = daemon.ctl("reload")
    assert done.returncode == 0, done.stderr
    assert done.stdout == "reloaded: generation 2 serving\n"
    assert daemon.client().call("version")[0] == "v2"  # at once: the reload is over when expertctl returns
    _write(code, "v3", "time.sleep(1)")
    done = daemon.ctl("reload", "--no-wait")  # back once the experts loaded, the workers still starting
    assert done.returncode == 0 and "generation 3 loaded" in done.stdout
    assert wait_until(lambda: daemon.client().call("version")[0] == "v3", timeout=30)


def test_a_reload_keeps_serving_during_many_concurrent_callers(make_daemon, short_dir):
    daemon, code = _daemon(make_daemon, short_dir)
    errors, stop = [], threading.Event()

    def loop() -> None:
        client = daemon.client(timeout=30)
        while not stop.is_set():
            try:
                client.call("version")
            except Exception as exc:  # every failure is the finding
                errors.append(repr(exc))

    callers = [threading.Thread(target=loop) for _ in range(4)]
    for caller in callers:
        caller.start()
    for mark in ("v2", "v3"):
        _write(code, mark)
        assert daemon.ctl("reload").returncode == 0
        assert wait_until(lambda mark=mark: daemon.client().call("version")[0] == mark, timeout=30)
    stop.set()
    for caller in callers:
        caller.join(30)
    assert errors == []


def test_a_generation_of_a_thousand_experts_loads_and_is_described(make_daemon):
    # Their descriptions travel from the generation's parent to the master in one message (a memfd).
    experts = {f"add_{i:04d}": "testexperts:add" for i in range(1000)}
    daemon = make_daemon(experts, workers=1)
    described = daemon.client().experts()
    assert len(described) == 1000 and described[0]["name"] == "add_0000"
    assert daemon.client().call("add_0999", 1, 2) == 3


def test_a_lost_generation_parent_whose_replacement_fails_leaves_the_master_idle_and_serving(make_daemon, short_dir):
    daemon, code = _daemon(make_daemon, short_dir)
    (code / "versioned.py").write_text("def version(:\n")  # the replacement cannot load
    (parent,) = daemon.generation_parent_pids()
    os.kill(parent, signal.SIGKILL)
    assert wait_until(lambda: "reload failed; generation 1 keeps serving" in daemon.log, timeout=30)
    lost = next(iter(daemon.worker_pids()))
    os.kill(lost, signal.SIGKILL)  # a worker the master cannot replace for now
    assert wait_until(lambda: lost not in daemon.worker_pids())
    master = psutil.Process(daemon.proc.pid)
    before = sum(master.cpu_times()[:2])
    time.sleep(2)
    assert sum(master.cpu_times()[:2]) - before < 0.5  # waiting, not spinning
    assert daemon.client().call("add", 1, 2) == 3  # the worker still alive serves
    _write(code, "v2")
    daemon.send_signal(signal.SIGHUP)
    assert wait_until(lambda: daemon.client().call("version")[0] == "v2", timeout=30)
    _a_killed_worker_is_replaced(daemon)  # and workers are replaced again


def test_a_generation_parent_that_dies_right_after_loading_never_leaves_the_daemon_stuck(make_daemon, short_dir):
    daemon, code = _daemon(make_daemon, short_dir)
    # The first parent to import this reports its experts loaded and dies moments later (as the OOM
    # killer would have it): before the master reads the report, while its workers start, or after.
    died = short_dir / "died"
    _write(code, "v2", f"import threading\nif not os.path.exists({str(died)!r}):\n"
                       f"    open({str(died)!r}, 'w').close()\n    threading.Timer(0.02, os._exit, (1,)).start()")
    daemon.send_signal(signal.SIGHUP)
    assert wait_until(lambda: died.exists(), timeout=30)
    assert wait_until(lambda: not daemon.client().status()["reloading"] and
                      daemon.client().status()["last_reload"] is not None, timeout=30)
    status = daemon.client().status()
    if status["last_reload"]["ok"]:  # it died once its generation served: a new parent replaced it
        assert daemon.client().call("version")[0] == "v2"
    else:  # it died first: the old generation serves on, and says why
        assert "generation 2's parent" in status["last_reload"]["error"]
        assert daemon.client().call("version")[0] == "v1"
    _write(code, "v3")
    assert daemon.ctl("reload").returncode == 0
    assert wait_until(lambda: daemon.client().call("version")[0] == "v3", timeout=30)
    _a_killed_worker_is_replaced(daemon)


def test_a_reload_while_more_than_a_thousand_descriptors_are_open_starts_its_workers(make_daemon, short_dir):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard < 4096:
        pytest.skip(f"the hard open-file limit ({hard}) leaves no room for 1,100 connections")
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # this test's end of the connections
    try:
        daemon, code = _daemon(make_daemon, short_dir, max_connections=3000, max_connections_per_uid=3000)
        held = [socket.socket(socket.AF_UNIX) for _ in range(1100)]
        for sock in held:
            sock.connect(str(daemon.socket))
        assert wait_until(lambda: daemon.client().status()["connections"] >= 1100)
        _write(code, "v2")  # the new generation's control socket gets a descriptor past 1023
        assert daemon.ctl("reload").returncode == 0
        assert wait_until(lambda: daemon.client().call("version")[0] == "v2", timeout=30)
        _a_killed_worker_is_replaced(daemon)  # by the same parent, descriptors and all
        assert daemon.proc.poll() is None
        for sock in held:
            sock.close()
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
