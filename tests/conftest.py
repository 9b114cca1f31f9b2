"""Test harness: a real expertd process on a real socket in a temporary directory."""

from __future__ import annotations

import atexit
import http.client
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest

from expertd import ipc
from expertd.client import Client

ROOT = Path(__file__).resolve().parent.parent
TEST_EXPERTS = Path(__file__).resolve().parent / "experts"
EXAMPLES = ROOT / "examples"
BIN = Path(sys.executable).parent

# One model cache for the whole test session, so that a model is prepared once (tests that are about
# preparing use their own).
MODEL_CACHE = tempfile.mkdtemp(prefix="xd-models-")
atexit.register(shutil.rmtree, MODEL_CACHE, True)

DEFAULT_EXPERTS = {
    "echo": "testexperts:echo",
    "add": "testexperts:add",
    "boom": "testexperts:boom",
    "type_error": "testexperts:type_error",
    "wrapped": "testexperts:wrapped",
    "deep": "testexperts:deep",
    "slow": "testexperts:slow",
    "pid": "testexperts:pid",
    "kill_worker": "testexperts:kill_worker",
    "exit_worker": "testexperts:exit_worker",
    "unsendable": "testexperts:unsendable",
    "document_length": "testexperts:document_length",
    "hooks": "testexperts:hooks",
    "leak": "testexperts:leak",
    "unprintable": "testexperts:unprintable",
    "bad_array": "testexperts:bad_array",
    "blob": "testexperts:blob",
    "read_open_file": "testexperts:read_open_file",
    "fib": "fibs:fib",
    "square": "squares.square",
    "keywords": "keywords:opinion",
}


def write_config(directory: Path, experts: dict[str, str] | None = None, **settings: object) -> Path:
    """Write an expertd.conf; settings go into [expertd] verbatim."""
    settings.setdefault("pythonpath", f"{TEST_EXPERTS} {EXAMPLES}")
    settings.setdefault("model_cache", MODEL_CACHE)  # shared by the session: each model is prepared once
    lines = ["[expertd]"] + [f"{key} = {value}" for key, value in settings.items()]
    for name, spec in (DEFAULT_EXPERTS if experts is None else experts).items():
        keys = spec if isinstance(spec, dict) else {"function": spec}
        section = name if ":" in name else f"expert:{name}"  # ("pipeline:NAME": a pipeline's section)
        lines += [f"[{section}]"] + [f"{key} = {value}" for key, value in keys.items()]
    path = directory / "expertd.conf"
    path.write_text("\n".join(lines) + "\n")
    return path


class Daemon:
    """One expertd master process started with ``python -m expertd``."""

    def __init__(self, config: Path, socket_path: Path, workers: int = 2, env: dict | None = None,
                 preexec_fn: Callable[[], None] | None = None) -> None:
        self.config = config
        self.socket = socket_path
        self.workers = workers
        self.log_path = config.parent / f"{socket_path.stem}.log"
        self.env = {**os.environ, **(env or {})}
        self.preexec_fn = preexec_fn  # run in the child before expertd starts (e.g. to set resource limits)
        self.proc: subprocess.Popen | None = None

    def start(self, wait: bool = True, *extra: str) -> Daemon:
        self._log = open(self.log_path, "ab")
        self._log_start = self._log.tell()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "expertd", "--config", str(self.config), "--socket", str(self.socket),
             "--workers", str(self.workers), *extra],
            stdout=self._log, stderr=subprocess.STDOUT, env=self.env, preexec_fn=self.preexec_fn,
        )
        if wait:
            self.wait_ready()
        return self

    @property
    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"expertd exited with {self.proc.returncode}:\n{self.log}")
            if "expertd ready" in self.log_path.read_bytes()[self._log_start:].decode(errors="replace"):
                return
            time.sleep(0.02)
        raise AssertionError(f"expertd not ready after {timeout}s:\n{self.log}")

    def client(self, **options: object) -> Client:
        return Client(str(self.socket), **options)

    def ctl(self, *args: str, input: str | None = None, timeout: float = 30) -> subprocess.CompletedProcess:
        return subprocess.run(
            [str(BIN / "expertctl"), "--socket", str(self.socket), *args],
            input=input, capture_output=True, text=True, timeout=timeout,
        )

    def worker_pids(self) -> set[int]:
        # By title: the master's other children are its generations' parents (setproctitle is a dependency).
        return {child.pid for child in self._children() if _title(child).startswith("expertd: worker")}

    def generation_parent_pids(self) -> set[int]:
        """The processes that loaded each generation and fork its workers (expertd.generation)."""
        return {child.pid for child in self._children() if _title(child).startswith("expertd: generation")}

    def _children(self) -> list[psutil.Process]:
        return psutil.Process(self.proc.pid).children()

    def wait_workers(self, count: int, exclude: set[int] = frozenset(), timeout: float = 20.0) -> set[int]:
        """Wait until ``count`` workers exist and answer, none of them in ``exclude``."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            pids = self.worker_pids() - set(exclude)
            if len(pids) == count and self.log.count(" ready in ") >= count + len(exclude):
                return pids
            time.sleep(0.05)
        raise AssertionError(f"expected {count} workers, have {self.worker_pids()}:\n{self.log}")

    def send_signal(self, signum: int) -> None:
        self.proc.send_signal(signum)

    def stop(self, signum: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(signum)
        try:
            return self.proc.wait(timeout)
        finally:
            self._log.close()

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            for child in psutil.Process(self.proc.pid).children(recursive=True):
                try:
                    child.kill()
                except psutil.NoSuchProcess:
                    pass  # gone on its own meanwhile (a worker of a generation that retired)
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def short_dir():
    """A directory with a short path: Unix socket paths are limited to 107 bytes."""
    path = Path(tempfile.mkdtemp(prefix="xd-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def make_daemon(short_dir):
    started: list[Daemon] = []

    def factory(experts: dict[str, str] | None = None, workers: int = 2, env: dict | None = None,
                start: bool = True, preexec_fn: Callable[[], None] | None = None, **settings: object) -> Daemon:
        config = write_config(short_dir, experts, **settings)
        daemon = Daemon(config, short_dir / f"d{len(started)}.sock", workers=workers, env=env, preexec_fn=preexec_fn)
        started.append(daemon)
        if start:
            daemon.start()
        return daemon

    yield factory
    for daemon in started:
        daemon.kill()


@pytest.fixture
def daemon(make_daemon) -> Daemon:
    return make_daemon()


def run_expertd(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    """Run expertd to completion (for start-up failures)."""
    return subprocess.run([sys.executable, "-m", "expertd", *args], capture_output=True, text=True, timeout=timeout)


def raw_connection(daemon: Daemon, timeout: float = 10) -> socket.socket:
    """A plain socket connected to the daemon, for speaking the protocol by hand."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    sock.connect(str(daemon.socket))
    return sock


def _title(process: psutil.Process) -> str:
    try:
        return " ".join(process.cmdline())
    except psutil.Error:
        return ""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (for http_listen)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_until(predicate, timeout: float = 10.0, interval: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


class UnixHTTPConnection(http.client.HTTPConnection):
    """http.client over the daemon's Unix socket."""

    def __init__(self, path: str | Path, timeout: float = 10) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = str(path)

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self._path)


@pytest.fixture
def web(daemon):
    """An HTTP connection to the test's daemon, over its Unix socket."""
    conn = UnixHTTPConnection(daemon.socket)
    yield conn
    conn.close()


@pytest.fixture
def channel():
    """A master-worker channel (expertd.ipc), the master's end non-blocking as the master holds it."""
    master_end, worker_end = ipc.channel_pair()
    master_end.setblocking(False)
    yield master_end, worker_end
    master_end.close()
    worker_end.close()


def metrics_samples(daemon: Daemon) -> dict[str, float]:
    """GET /metrics over the daemon's socket: each sample line's name and labels -> its value."""
    conn = UnixHTTPConnection(daemon.socket)
    try:
        conn.request("GET", "/metrics")
        text = conn.getresponse().read().decode()
    finally:
        conn.close()
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
            for line in text.splitlines() if line and not line.startswith("#")}


def open_fds() -> set[int]:
    """The descriptors open in this process (found without opening one, as listing /proc/self/fd would)."""
    found = set()
    for fd in range(4096):
        try:
            os.fstat(fd)
        except OSError:
            continue
        found.add(fd)
    return found


__all__ = ["Daemon", "UnixHTTPConnection", "metrics_samples", "open_fds", "raw_connection", "run_expertd", "wait_until",
           "write_config"]
