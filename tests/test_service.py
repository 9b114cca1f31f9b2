"""Running as a service: sd_notify, socket activation, daemon mode, reload, scaling, status."""

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest

from expertd.client import Client

from conftest import BIN, ROOT, TEST_EXPERTS, run_expertd, wait_until, write_config


def _messages(sock: socket.socket, until: str, timeout: float = 60) -> list[str]:
    """Collect sd_notify datagrams until one contains ``until``."""
    got = []
    deadline = time.monotonic() + timeout
    sock.settimeout(0.2)
    while time.monotonic() < deadline:
        try:
            got.append(sock.recv(4096).decode())
        except TimeoutError:
            continue
        if until in got[-1]:
            return got
    raise AssertionError(f"no {until!r} among {got}")


def test_the_status_line_is_not_sent_per_request(make_daemon, short_dir):
    # STATUS counts requests served; sent on every loop it would cost the service manager a
    # message per request.
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(short_dir / "notify"))
    daemon = make_daemon({"add": "testexperts:add"}, workers=1, linger="0",
                         env={"NOTIFY_SOCKET": str(short_dir / "notify")})
    _messages(notify, "READY=1")
    first, second = daemon.client(), daemon.client()  # two connections: every call goes through the master
    started = time.monotonic()
    for i in range(300):
        assert (first if i % 2 else second).call("add", i, 1) == i + 1
    elapsed = time.monotonic() - started
    notify.settimeout(0.05)
    lines = []
    while True:
        try:
            lines.append(notify.recv(4096).decode())
        except TimeoutError:
            break
    status_lines = [line for line in lines if "STATUS=" in line]
    assert len(status_lines) <= elapsed + 2, status_lines


def test_notify_ready_reloading_stopping_in_order(make_daemon, short_dir):
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(short_dir / "notify"))
    daemon = make_daemon({"add": "testexperts:add"}, workers=2, start=False,
                         env={"NOTIFY_SOCKET": str(short_dir / "notify")})
    daemon.start(wait=False)
    before_ready = _messages(notify, "READY=1")
    # READY=1 comes only once every worker exists and is ready.
    assert len(daemon.worker_pids()) == 2
    assert daemon.log.count(" ready in ") == 2
    assert not any("READY=1" in m for m in before_ready[:-1])
    assert f"MAINPID={daemon.proc.pid}" in before_ready[-1]
    assert wait_until(lambda: daemon.client().call("add", 1, 1) == 2)
    status_lines = _messages(notify, "STATUS=2 workers ready")
    assert any(re.search(r"\b\d+ requests? served", m) for m in status_lines)  # ("1 request served")

    daemon.send_signal(signal.SIGHUP)
    around_reload = _messages(notify, "READY=1")
    assert any("RELOADING=1" in m for m in around_reload)
    first_reloading = next(i for i, m in enumerate(around_reload) if "RELOADING=1" in m)
    assert first_reloading < len(around_reload) - 1  # READY=1 after it

    daemon.send_signal(signal.SIGTERM)
    assert any("STOPPING=1" in m for m in _messages(notify, "STOPPING=1"))
    assert daemon.proc.wait(30) == 0


def test_watchdog_pings(make_daemon, short_dir):
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(short_dir / "wd"))
    make_daemon({"add": "testexperts:add"}, workers=1,
                env={"NOTIFY_SOCKET": str(short_dir / "wd"), "WATCHDOG_USEC": "400000"})
    started = time.monotonic()
    pings = 0
    while pings < 3:
        if "WATCHDOG=1" in _messages(notify, "WATCHDOG=1", timeout=5)[-1]:
            pings += 1
    assert time.monotonic() - started < 3


def test_socket_activation_serves_on_the_inherited_socket(short_dir):
    path = short_dir / "activated.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(16)
    config = write_config(short_dir, {"add": "testexperts:add"})
    log = open(short_dir / "activated.log", "wb")

    def hand_over():
        os.dup2(listener.fileno(), 3)
        os.environ["LISTEN_FDS"] = "1"
        os.environ["LISTEN_PID"] = str(os.getpid())

    proc = subprocess.Popen([sys.executable, "-m", "expertd", "--config", str(config), "--workers", "1",
                             "--socket", str(short_dir / "unused.sock")],
                            stdout=log, stderr=log, preexec_fn=hand_over, pass_fds=(3,))
    try:
        assert wait_until(lambda: "expertd ready" in (short_dir / "activated.log").read_text(), timeout=60)
        assert Client(str(path)).call("add", 2, 3) == 5
        assert not (short_dir / "unused.sock").exists()
        logged = (short_dir / "activated.log").read_text()
        assert "serving the socket activated on" in logged
        assert (f"using the socket passed by systemd (LISTEN_FDS), {path}, instead of socket = "
                f"{short_dir / 'unused.sock'}") in logged
        # Only the master holds the listening socket: expert code in a worker or in the generation's
        # parent cannot accept a connection past the master's checks.
        listening = os.readlink(f"/proc/{proc.pid}/fd/3")
        for child in psutil.Process(proc.pid).children(recursive=True):
            held = {os.readlink(f"/proc/{child.pid}/fd/{fd}") for fd in os.listdir(f"/proc/{child.pid}/fd")}
            assert listening not in held, child.cmdline()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
        assert path.exists()  # systemd's socket file: not ours to remove
    finally:
        if proc.poll() is None:
            proc.kill()


def _daemon_mode(short_dir, *extra):
    config = write_config(short_dir, {"add": "testexperts:add"})
    return subprocess.run(
        [str(BIN / "expertd"), "--config", str(config), "--socket", str(short_dir / "dm.sock"), "--workers", "1",
         "--daemon", "--pidfile", str(short_dir / "expertd.pid"), "--log-file", str(short_dir / "expertd.log"),
         *extra],
        capture_output=True, text=True, timeout=120,
    )


def test_daemon_mode_pidfile_and_log_rotation(short_dir):
    pidfile = short_dir / "expertd.pid"
    pidfile.write_text("999999\n")  # stale: replaced
    done = _daemon_mode(short_dir)
    assert done.returncode == 0, done.stderr
    pid = int(pidfile.read_text())
    try:
        assert Client(str(short_dir / "dm.sock")).call("add", 1, 2) == 3
        with open(f"/proc/{pid}/cmdline", "rb") as cmdline:
            assert cmdline.read().startswith(b"expertd: master [")
        assert os.getsid(pid) != os.getsid(0)  # detached into a session of its own
        assert pid not in {child.pid for child in psutil.Process().children(recursive=True)}
        again = _daemon_mode(short_dir)
        assert again.returncode == 1 and f"already running with pid {pid}" in again.stderr

        log = short_dir / "expertd.log"
        os.rename(log, short_dir / "expertd.log.1")
        os.kill(pid, signal.SIGUSR1)
        assert wait_until(lambda: log.exists() and "log files reopened" in log.read_text())

        # The generation's parent follows too: the workers it forks later log to the new file.
        def logs_of_the_generation_parent() -> set[str]:
            return {f.path for child in psutil.Process(pid).children()
                    if " ".join(child.cmdline()).startswith("expertd: generation") for f in child.open_files()}

        assert wait_until(lambda: str(log) in logs_of_the_generation_parent())
        assert str(short_dir / "expertd.log.1") not in logs_of_the_generation_parent()
    finally:
        os.kill(pid, signal.SIGTERM)
    assert wait_until(lambda: not pidfile.exists(), timeout=30)
    assert wait_until(lambda: not Path(f"/proc/{pid}").exists(), timeout=30)
    assert not (short_dir / "dm.sock").exists()


def test_daemon_mode_reports_a_failed_start(short_dir):
    config = write_config(short_dir, {"x": "badhooks:worker_fails"})
    done = subprocess.run([str(BIN / "expertd"), "--config", str(config), "--socket", str(short_dir / "f.sock"),
                           "--daemon", "--log-file", str(short_dir / "f.log")],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 3  # as in the foreground: a hook failed
    # The reason itself, one line, on the launcher's terminal (not "see its log file").
    assert done.stderr == ("expertd: worker 1: [expert:x] after_fork hook badhooks._fail_in_worker failed: "
                           f"RuntimeError: cannot build model in worker (at {TEST_EXPERTS}/badhooks.py:13)\n")


VERSIONED = '''
from expertd import expert

MARK = {mark!r}
_state = {{}}


def _load():
    _state["model"] = MARK + "-model"


@expert(before_fork=_load)
def version():
    return [MARK, _state["model"]]
'''


def _versioned_daemon(make_daemon, short_dir, mark="v1"):
    code = short_dir / "code"
    code.mkdir(exist_ok=True)
    (code / "versioned.py").write_text(VERSIONED.format(mark=mark))
    return make_daemon({"version": "versioned:version", "add": "testexperts:add"}, workers=2,
                       pythonpath=f"{code} {ROOT / 'tests' / 'experts'}")


def test_hup_serves_new_code_with_zero_failed_calls(make_daemon, short_dir):
    daemon = _versioned_daemon(make_daemon, short_dir)
    old_workers = daemon.worker_pids()
    results, errors, stop = [], [], threading.Event()

    def loop():
        client = daemon.client(timeout=30)
        while not stop.is_set():
            try:
                results.append(client.call("version")[0])
            except Exception as exc:
                errors.append(exc)

    callers = [threading.Thread(target=loop) for _ in range(3)]
    for caller in callers:
        caller.start()
    time.sleep(0.5)
    (short_dir / "code" / "versioned.py").write_text(VERSIONED.format(mark="v2-new"))
    daemon.send_signal(signal.SIGHUP)
    assert wait_until(lambda: results[-1:] == ["v2-new"], timeout=30)
    time.sleep(0.5)
    stop.set()
    for caller in callers:
        caller.join(30)
    assert errors == []
    assert results[0] == "v1" and results[-1] == "v2-new"
    assert daemon.client().call("version") == ["v2-new", "v2-new-model"]  # before_fork hook ran again
    assert wait_until(lambda: not (daemon.worker_pids() & old_workers), timeout=30)
    status = daemon.client().status()
    assert status["generation"] == 2 and status["last_reload"]["ok"] is True
    assert {w["generation"] for w in status["workers"]} == {2}


def test_broken_reload_keeps_the_old_generation_serving(make_daemon, short_dir):
    daemon = _versioned_daemon(make_daemon, short_dir)
    (short_dir / "code" / "versioned.py").write_text("def version(:\n")
    done = daemon.ctl("reload")
    assert done.returncode == 1
    assert "reload failed, generation 1 keeps serving" in done.stderr and "SyntaxError" in done.stderr
    assert daemon.client().call("version")[0] == "v1"
    status = daemon.client().status()
    assert status["generation"] == 1 and status["last_reload"]["ok"] is False

    # A new generation whose workers fail to start is abandoned the same way.
    (short_dir / "code" / "versioned.py").write_text(
        "from expertd import expert\n\ndef _boom():\n    raise RuntimeError('no model here')\n\n"
        "@expert(after_fork=_boom)\ndef version():\n    return ['v3']\n")
    daemon.send_signal(signal.SIGHUP)
    assert wait_until(lambda: "no model here" in json.dumps(daemon.client().status()["last_reload"]), timeout=30)
    assert daemon.client().call("version")[0] == "v1"
    assert daemon.client().status()["generation"] == 1


def test_ttin_ttou_and_expertctl_workers(make_daemon):
    daemon = make_daemon({"add": "testexperts:add"}, workers=2)
    daemon.send_signal(signal.SIGTTIN)
    assert wait_until(lambda: len(daemon.worker_pids()) == 3)
    for count in (2, 1):  # one at a time: two signals sent at once may arrive as one
        daemon.send_signal(signal.SIGTTOU)
        assert wait_until(lambda count=count: len(daemon.worker_pids()) == count)
    assert daemon.ctl("workers", "3").stdout == "workers: 3\n"
    assert wait_until(lambda: len(daemon.worker_pids()) == 3)
    assert daemon.client().status()["workers_wanted"] == 3
    assert daemon.client().call("add", 1, 1) == 2


def test_status_json_lists_every_worker_with_memory(make_daemon):
    daemon = make_daemon({"add": "testexperts:add"}, workers=3)
    client = daemon.client()
    for i in range(30):
        client.call("add", i, 1)
    done = daemon.ctl("status", "--json")
    status = json.loads(done.stdout)
    assert status["pid"] == daemon.proc.pid and status["generation"] == 1
    assert {w["pid"] for w in status["workers"]} == daemon.worker_pids()
    assert sum(w["requests"] for w in status["workers"]) >= 30
    for worker in status["workers"]:
        assert 0 < worker["uss"] < worker["pss"] <= worker["rss"], worker
        assert worker["state"] in ("idle", "busy")
    memory = status["memory"]
    assert memory["shared"] > 0 and memory["private"] > 0
    human = daemon.ctl("status").stdout
    assert "memory: private" in human and "shared" in human
    for pid in daemon.worker_pids():
        assert str(pid) in human


def test_expertctl_stop(make_daemon):
    daemon = make_daemon({"add": "testexperts:add"}, workers=1)
    assert daemon.ctl("stop").returncode == 0
    assert daemon.proc.wait(30) == 0
    assert not daemon.socket.exists()


def test_process_titles(make_daemon):
    daemon = make_daemon({"add": "testexperts:add"}, workers=1)
    daemon.client().call("add", 1, 1)
    with open(f"/proc/{daemon.proc.pid}/cmdline", "rb") as cmdline:
        assert cmdline.read().startswith(f"expertd: master [{daemon.config}]".encode())
    (worker,) = daemon.worker_pids()
    with open(f"/proc/{worker}/cmdline", "rb") as cmdline:
        assert cmdline.read().startswith(b"expertd: worker 1 [ready, ")


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_systemd_units_verify(tmp_path):
    for name in ("expertd.service", "expertd.socket"):
        text = (ROOT / "systemd" / name).read_text()
        (tmp_path / name).write_text(text.replace("/opt/expertd/venv/bin/", f"{BIN}/"))
    done = subprocess.run(["systemd-analyze", "verify", str(tmp_path / "expertd.service"),
                           str(tmp_path / "expertd.socket")], capture_output=True, text=True, timeout=60)
    problems = [line for line in done.stderr.splitlines() if "expertd" in line]
    assert done.returncode == 0 and problems == [], done.stderr


def test_run_expertd_help_mentions_daemon_mode():
    done = run_expertd("--help")
    assert "--daemon" in done.stdout and "--pidfile" in done.stdout and "--log-file" in done.stdout


# ---------------------------------------------------------------- regressions from review
def test_control_requests_leave_the_connection_usable(make_daemon):
    daemon = make_daemon({"add": "testexperts:add"}, workers=1)
    client = daemon.client(pool_size=1)
    assert client.status()["pid"] == daemon.proc.pid
    assert client.call("add", 1, 2) == 3  # the same pooled connection, nothing left over
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(str(daemon.socket))
    from expertd import protocol

    sock.sendall(protocol.encode_frame(protocol.STATUS, 1, b"") * 3 + protocol.encode_call(4, "add", [2, 2], {}))
    replies = [protocol.read_frame(sock, 1 << 20, time.monotonic() + 10)[:2] for _ in range(4)]
    assert replies == [(protocol.RESULT, 1)] * 3 + [(protocol.RESULT, 4)]
    assert daemon.proc.poll() is None


def test_daemon_mode_relative_pidfile_and_files_opened_by_experts(short_dir):
    config = write_config(short_dir, {"read_open_file": "testexperts:read_open_file"})
    done = subprocess.run([str(BIN / "expertd"), "--config", str(config), "--socket", str(short_dir / "r.sock"),
                           "--workers", "1", "--daemon", "--pidfile", "rel.pid", "--log-file", "r.log"],
                          capture_output=True, text=True, timeout=120, cwd=str(short_dir))
    assert done.returncode == 0, done.stderr
    pid = int((short_dir / "rel.pid").read_text())
    try:
        assert Client(str(short_dir / "r.sock")).call("read_open_file") == '"""Experts used by the test-suite: ' \
            "each one exercises a path through the daemon.\"\"\""
    finally:
        os.kill(pid, signal.SIGTERM)
    assert wait_until(lambda: not (short_dir / "rel.pid").exists(), timeout=30)


def test_scaling_down_during_a_reload_does_not_abort_it(make_daemon, short_dir):
    daemon = _versioned_daemon(make_daemon, short_dir)
    (short_dir / "code" / "versioned.py").write_text(VERSIONED.format(mark="v2-scaled"))
    daemon.send_signal(signal.SIGHUP)
    time.sleep(0.05)
    daemon.send_signal(signal.SIGTTOU)
    assert wait_until(lambda: daemon.client().status()["generation"] == 2 and
                      daemon.client().status()["last_reload"] is not None, timeout=30)
    assert daemon.client().status()["last_reload"]["ok"] is True
    assert wait_until(lambda: len(daemon.worker_pids()) == 1, timeout=30)
    assert daemon.client().call("version")[0] == "v2-scaled"


def test_a_failed_reload_is_retried_with_fresh_modules(make_daemon, short_dir):
    code = short_dir / "code"
    code.mkdir()
    (code / "helper.py").write_text("WORD = 'one'\n")
    (code / "uses_helper.py").write_text("import helper\n\ndef word():\n    return helper.WORD\n")
    daemon = make_daemon({"word": "uses_helper:word"}, workers=1, pythonpath=str(code))
    assert daemon.client().call("word") == "one"
    (code / "helper.py").write_text("WORD = (\n")  # broken
    assert daemon.ctl("reload").returncode == 1
    (code / "helper.py").write_text("WORD = 'two, fixed'\n")
    assert daemon.ctl("reload").returncode == 0
    assert wait_until(lambda: daemon.client().call("word") == "two, fixed", timeout=30)


def test_graceful_stop_finishes_replies_the_master_is_writing(make_daemon):
    daemon = make_daemon({"blob": "testexperts:blob"}, workers=1)
    from expertd import protocol

    slow = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    slow.connect(str(daemon.socket))
    slow.sendall(protocol.encode_call(1, "blob", [5 * 2**20], {}))
    time.sleep(0.5)  # the worker handed the unsent part to the master by now
    daemon.send_signal(signal.SIGTERM)
    kind, request_id, body = protocol.read_frame(slow, 8 * 2**20, time.monotonic() + 20)
    assert (kind, request_id, len(protocol.unpack(body))) == (protocol.RESULT, 1, 5 * 2**20)
    assert daemon.proc.wait(30) == 0


def test_hup_during_start_up_is_ignored_and_the_daemon_still_starts(make_daemon):
    daemon = make_daemon({"slow_boot": "testexperts:slow_boot"}, workers=1, start=False)
    daemon.start(wait=False)
    assert wait_until(lambda: daemon.worker_pids(), timeout=30)
    daemon.send_signal(signal.SIGHUP)
    daemon.wait_ready()
    assert daemon.client().call("slow_boot") == "up"
    assert "reload requested before the daemon finished starting" in daemon.log
