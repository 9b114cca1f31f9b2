"""What an operator relies on: checks that check, reload and stop that wait, --daemon's traps, tokens.

Real daemons, real sockets: ``expertd --check`` forks its trial worker,
``expertctl`` waits on a real reload or stop, ``--daemon`` really detaches,
and the HTTP token is read from a real file and the environment.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest

from expertd.daemon_mode import launcher_outcome
from expertd.errors import ConfigError
from expertd.tokens import resolve_token

from conftest import ROOT, run_expertd, wait_until, write_config

# The code under test is this checkout's, whatever the virtualenv's scripts point at.
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}
TOKEN = "first-token-0123456789"
NEW_TOKEN = "second-token-0123456789"

OPS_EXPERTS = '''
import os, time
from expertd import expert

_model = {}

def _load():
    # A model file named relative to the directory the daemon was started in.
    with open(os.environ.get("OPS_MODEL", "data/model.txt")) as handle:
        _model["text"] = handle.read().strip()
    if os.path.exists("broken"):
        raise RuntimeError("the model file is corrupt")
    delay = os.environ.get("OPS_BOOT_DELAY") or (open("delay").read() if os.path.exists("delay") else "0")
    time.sleep(float(delay))

@expert(after_fork=_load, example={"text": "a review"})
def model(doc):
    return {"model": _model["text"], "length": len(doc["text"])}

@expert(example=3)
def wrong_example(doc):
    return doc["text"]

def slow(seconds):
    time.sleep(seconds)
    return seconds

def add(a, b):
    return a + b
'''


@pytest.fixture
def ops(short_dir):
    """A directory with the experts' module and their model file (data/model.txt)."""
    (short_dir / "opsexperts.py").write_text(OPS_EXPERTS)
    (short_dir / "data").mkdir()
    (short_dir / "data" / "model.txt").write_text("model-v1\n")
    return short_dir


def _config(directory: Path, experts: dict[str, str], **settings: object) -> Path:
    settings.setdefault("pythonpath", str(directory))
    return write_config(directory, experts, **settings)


def _expertd(*args: str, cwd: Path, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "expertd", *args], cwd=cwd, env={**ENV, **(env or {})},
                          capture_output=True, text=True, timeout=timeout)


def _ctl(socket_path: Path, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "expertd.cli", "--socket", str(socket_path), *args], env=ENV,
                          capture_output=True, text=True, timeout=timeout)


class _Foreground:
    """An expertd in the foreground, started in ``cwd``, logging to a file."""

    def __init__(self, directory: Path, config: Path, workers: int = 1, env: dict | None = None) -> None:
        self.socket = directory / "ops.sock"
        self.log_path = directory / "ops.log"
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "expertd", "--config", str(config), "--socket", str(self.socket),
             "--workers", str(workers)], cwd=directory, env={**ENV, **(env or {})},
            stdout=self._log, stderr=subprocess.STDOUT)
        assert wait_until(lambda: "expertd ready" in self.log or self.proc.poll() is not None, timeout=60), self.log
        assert self.proc.poll() is None, self.log

    @property
    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def close(self) -> None:
        if self.proc.poll() is None:
            for child in psutil.Process(self.proc.pid).children(recursive=True):
                child.kill()
            self.proc.kill()
        self.proc.wait()
        self._log.close()


@pytest.fixture
def foreground():
    started: list[_Foreground] = []

    def start(*args: object, **kwargs: object) -> _Foreground:
        started.append(_Foreground(*args, **kwargs))
        return started[-1]

    yield start
    for daemon in started:
        daemon.close()


# ------------------------------------------------------------------------------------------- --check
def test_check_fails_on_a_typo_in_an_after_fork_hooks_model_path(ops):
    config = _config(ops, {"model": "opsexperts:model"})
    done = _expertd("--config", str(config), "--check", cwd=ops, env={"OPS_MODEL": "data/modle.txt"})
    assert done.returncode == 3, done.stdout + done.stderr
    assert done.stderr.count("\n") == 1 and done.stderr.startswith(f"expertd: {config}: trial worker: ")
    assert "[expert:model] after_fork hook opsexperts._load failed: FileNotFoundError" in done.stderr
    assert "data/modle.txt" in done.stderr and "OK" not in done.stdout


def test_check_runs_the_hooks_and_a_call_with_the_example_and_says_what_it_checked(ops):
    config = _config(ops, {"model": "opsexperts:model", "add": "opsexperts:add"})
    done = _expertd("--config", str(config), "--check", cwd=ops)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == f"expertd: {config}: OK, 2 experts: add, model"
    assert "expertd: trial worker: 0 models loaded, 1 after_fork hook ran" in lines
    assert any(line.startswith("expertd: trial calls with their examples: model (") for line in lines)
    assert "expertd: no example to call (@expert(example=...)): add" in lines


def test_check_fails_when_the_trial_call_with_the_example_raises(ops):
    config = _config(ops, {"wrong": "opsexperts:wrong_example"})
    done = _expertd("--config", str(config), "--check", cwd=ops)
    assert done.returncode == 3
    assert done.stderr.count("\n") == 1
    assert "[expert:wrong] trial call with its example failed: TypeError" in done.stderr
    assert "opsexperts.py" in done.stderr  # where it failed


def test_check_kills_a_trial_worker_whose_hooks_hang_after_boot_timeout(ops):
    config = _config(ops, {"model": "opsexperts:model"}, boot_timeout="1s")
    began = time.monotonic()
    done = _expertd("--config", str(config), "--check", cwd=ops, env={"OPS_BOOT_DELAY": "60"})
    assert done.returncode == 3 and "longer than boot_timeout (1s)" in done.stderr
    assert time.monotonic() - began < 30


# ------------------------------------------------------------------------------------------ reload/stop
def test_expertctl_reload_waits_until_the_new_workers_serve(ops, foreground):
    config = _config(ops, {"model": "opsexperts:model"})
    daemon = foreground(ops, config, workers=2, env={"OPS_BOOT_DELAY": "1"})
    (ops / "data" / "model.txt").write_text("model-v2\n")
    done = _ctl(daemon.socket, "reload")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "reloaded: generation 2 serving"
    state = json.loads(_ctl(daemon.socket, "status", "--json").stdout)
    assert not state["reloading"] and state["last_reload"]["ok"] and state["last_reload"]["reload"] == 1
    # Every worker is of the new generation: the reload was over when expertctl returned.
    assert {w["generation"] for w in state["workers"] if w["state"] != "retiring"} == {2}


def test_expertctl_reload_exits_1_with_the_reason_when_the_new_workers_fail(ops, foreground):
    config = _config(ops, {"model": "opsexperts:model"})
    daemon = foreground(ops, config)
    (ops / "broken").write_text("")
    done = _ctl(daemon.socket, "reload")
    assert done.returncode == 1
    assert "reload failed, generation 1 keeps serving" in done.stderr and "the model file is corrupt" in done.stderr
    assert done.stderr.count("\n") == 1
    no_wait = _ctl(daemon.socket, "reload", "--no-wait")  # the old behaviour: back once the experts loaded
    assert no_wait.returncode == 0 and "its workers are starting" in no_wait.stdout


def test_expertctl_reload_exits_4_when_the_workers_are_not_ready_within_its_timeout(ops, foreground):
    config = _config(ops, {"model": "opsexperts:model"})
    daemon = foreground(ops, config)
    (ops / "delay").write_text("30")  # the new generation's workers take 30s to boot
    began = time.monotonic()
    done = _ctl(daemon.socket, "reload", "--timeout", "1")
    assert done.returncode == 4 and "not all ready within --timeout (1s)" in done.stderr
    assert time.monotonic() - began < 15


def test_expertctl_stop_returns_once_the_daemon_has_exited(ops, foreground):
    config = _config(ops, {"slow": "opsexperts:slow"})
    daemon = foreground(ops, config)
    caller = threading.Thread(target=_ctl, args=(daemon.socket, "call", "slow", "1.5"))
    caller.start()
    time.sleep(0.3)  # in flight: the graceful stop lets it finish first
    began = time.monotonic()
    done = _ctl(daemon.socket, "stop")
    caller.join()
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"stopped expertd (master pid {daemon.proc.pid})"
    assert time.monotonic() - began > 0.8  # it waited for the request in flight
    assert daemon.proc.poll() == 0  # exited (expertctl saw a zombie; this reaps it)


def test_expertctl_stop_exits_4_when_the_daemon_outlives_its_timeout(ops, foreground):
    config = _config(ops, {"slow": "opsexperts:slow"})
    daemon = foreground(ops, config)
    caller = threading.Thread(target=_ctl, args=(daemon.socket, "call", "slow", "3"))
    caller.start()
    time.sleep(0.3)
    done = _ctl(daemon.socket, "stop", "--timeout", "0.5")
    assert done.returncode == 4 and "still running after --timeout (0.5s)" in done.stderr
    caller.join()
    assert daemon.proc.wait(30) == 0


# --------------------------------------------------------------------------------------------- --daemon
def test_daemon_mode_keeps_the_working_directory_and_logs_beside_the_socket(ops):
    config = _config(ops, {"model": "opsexperts:model"})
    run = ops / "run"
    pidfile = ops / "ops.pid"
    # Started from ops/: the hook opens data/model.txt relative to it, as it does in the foreground.
    done = _expertd("--config", str(config), "--socket", str(run / "d.sock"), "--workers", "1", "--daemon",
                    "--pidfile", str(pidfile), cwd=ops)
    assert done.returncode == 0, done.stderr
    pid = int(pidfile.read_text())
    try:
        assert os.readlink(f"/proc/{pid}/cwd") == str(ops)
        call = _ctl(run / "d.sock", "call", "model", '{"text": "abc"}')
        assert call.returncode == 0 and '"model": "model-v1"' in call.stdout, call.stderr
        # No --log-file: the log is expertd.log in the socket's directory, not lost.
        assert "expertd ready" in (run / "expertd.log").read_text()
    finally:
        os.kill(pid, signal.SIGTERM)
    assert wait_until(lambda: not Path(f"/proc/{pid}").exists(), timeout=30)


def test_daemon_mode_prints_why_the_start_failed_on_the_launchers_terminal(ops):
    config = _config(ops, {"model": "opsexperts:model"})
    (ops / "broken").write_text("")
    done = _expertd("--config", str(config), "--socket", str(ops / "run" / "f.sock"), "--workers", "1",
                    "--daemon", cwd=ops)
    assert done.returncode == 3  # as in the foreground: an expert's hook failed
    assert done.stderr.count("\n") == 1, done.stderr
    assert "after_fork hook opsexperts._load failed: RuntimeError: the model file is corrupt" in done.stderr
    assert "see its log" not in done.stderr
    assert "the model file is corrupt" in (ops / "run" / "expertd.log").read_text()


@pytest.mark.parametrize("word, log_path, outcome", [
    ("ready", "/run/x/expertd.log", (0, "")),
    ("3 worker 1: [expert:x] after_fork hook m.f failed: OSError", None,
     (3, "worker 1: [expert:x] after_fork hook m.f failed: OSError")),
    ("1 cannot bind", None, (1, "cannot bind")),
    ("0 the daemon stopped before it was ready", None, (1, "the daemon stopped before it was ready")),
    ("", "/run/x/expertd.log", (1, "the daemon exited before it was ready; see its log, /run/x/expertd.log")),
    ("", None, (1, "the daemon exited before it was ready")),
    ("garbled", None, (1, "the daemon exited before it was ready")),
])
def test_what_the_launcher_prints_and_exits_with(word, log_path, outcome):
    assert launcher_outcome(word, log_path) == outcome


# ---------------------------------------------------------------------------------------------- tokens
def _http(port: int, method: str, path: str, token: str | None = None) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    conn.request(method, path, body=b"[1, 2]" if method == "POST" else None, headers=headers)
    status = conn.getresponse().status
    conn.close()
    return status


def _port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_a_rotated_token_file_takes_effect_on_reload(ops, foreground):
    port = _port()
    (ops / "token").write_text(TOKEN + "\n")
    config = _config(ops, {"add": "opsexperts:add"}, http_listen=f"127.0.0.1:{port}", token_file="token")
    daemon = foreground(ops, config)
    assert _http(port, "POST", "/call/add", TOKEN) == 200
    assert _http(port, "POST", "/call/add", NEW_TOKEN) == 401
    (ops / "token").write_text(NEW_TOKEN + "\n")
    done = _ctl(daemon.socket, "reload")
    assert done.returncode == 0, done.stderr
    assert _http(port, "POST", "/call/add", NEW_TOKEN) == 200
    assert _http(port, "POST", "/call/add", TOKEN) == 401
    # A token file that cannot be read fails the reload and keeps the token in force.
    (ops / "token").unlink()
    failed = _ctl(daemon.socket, "reload")
    assert failed.returncode == 1 and "token_file = token: cannot read" in failed.stderr
    assert _http(port, "POST", "/call/add", NEW_TOKEN) == 200


def test_the_token_can_come_from_the_environment(ops, foreground):
    port = _port()
    config = _config(ops, {"add": "opsexperts:add"}, http_listen=f"127.0.0.1:{port}")
    foreground(ops, config, env={"EXPERTD_TOKEN": TOKEN})
    assert _http(port, "POST", "/call/add") == 401
    assert _http(port, "POST", "/call/add", TOKEN) == 200


def test_public_health_serves_health_and_metrics_without_the_token_and_nothing_else(ops, foreground):
    port = _port()
    config = _config(ops, {"add": "opsexperts:add"}, http_listen=f"127.0.0.1:{port}", token=TOKEN,
                     public_health="yes", public_status="no")
    foreground(ops, config)
    assert _http(port, "GET", "/health") == 200
    assert _http(port, "HEAD", "/health") == 200  # (HEAD works wherever GET does: docs/http.md)
    assert _http(port, "GET", "/metrics") == 200
    assert _http(port, "GET", "/experts") == 401
    assert _http(port, "POST", "/call/add") == 401
    assert _http(port, "POST", "/call/add", TOKEN) == 200


def test_without_public_health_health_needs_the_token(ops, foreground):
    port = _port()
    config = _config(ops, {"add": "opsexperts:add"}, http_listen=f"127.0.0.1:{port}", token=TOKEN)
    foreground(ops, config)
    assert _http(port, "GET", "/health") == 401
    assert _http(port, "GET", "/health", TOKEN) == 200


def test_an_unreadable_token_file_stops_start_up_with_one_line(short_dir):
    config = write_config(short_dir, {"add": "testexperts:add"}, token_file="missing-token")
    done = run_expertd("--config", str(config), "--socket", str(short_dir / "t.sock"))
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1
    assert f"token_file = missing-token: cannot read {short_dir}/missing-token: No such file" in done.stderr


def test_a_token_file_that_is_a_fifo_stops_start_up_at_once_with_one_line(short_dir):
    os.mkfifo(short_dir / "token-fifo")  # (opened without O_NONBLOCK, it would wait for a writer forever)
    config = write_config(short_dir, {"add": "testexperts:add"}, token_file="token-fifo")
    done = run_expertd("--config", str(config), "--socket", str(short_dir / "t.sock"), timeout=30)
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and "is not a regular file" in done.stderr, done.stderr


@pytest.mark.parametrize("token, token_file, environ, files, outcome", [
    ("", "", {}, {}, ""),
    ("", "", {"EXPERTD_TOKEN": TOKEN}, {}, TOKEN),
    (NEW_TOKEN, "", {"EXPERTD_TOKEN": TOKEN}, {}, NEW_TOKEN),  # the config's own wins over the environment
    ("", "tok", {"EXPERTD_TOKEN": TOKEN}, {"tok": f"  {NEW_TOKEN}\n"}, NEW_TOKEN),
    ("", "credential:api", {"CREDENTIALS_DIRECTORY": "{dir}/creds"}, {"creds/api": TOKEN}, TOKEN),
    ("", "credential:api", {}, {}, "ConfigError: $CREDENTIALS_DIRECTORY is not set"),
    (TOKEN, "tok", {}, {"tok": TOKEN}, "ConfigError: token and token_file are both set"),
    ("", "tok", {}, {"tok": "short"}, "ConfigError: a token needs at least 16"),
    ("", "tok", {}, {"tok": "\n"}, "ConfigError: should hold the token alone"),
    ("", "", {"EXPERTD_TOKEN": "short"}, {}, "ConfigError: environment EXPERTD_TOKEN: a token needs"),
])
def test_where_the_token_comes_from(tmp_path, token, token_file, environ, files, outcome):
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text(text)
    environ = {key: value.replace("{dir}", str(tmp_path)) for key, value in environ.items()}
    try:
        found = resolve_token(token, token_file, "x.conf: [expertd]", str(tmp_path), environ)
    except ConfigError as exc:
        assert outcome.startswith("ConfigError: ") and outcome.removeprefix("ConfigError: ") in str(exc)
        assert "\n" not in str(exc) and str(exc).startswith(("x.conf: [expertd]", "environment EXPERTD_TOKEN"))
        return
    assert found == outcome
