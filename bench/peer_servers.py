"""The servers bench/peers.py compares: how each is installed, started, stopped, reloaded and weighed.

- expertd: ``expertd --config FILE`` with the model as a model expert (``model = PATH``; batching off is
  ``max_batch = 1``, on is the default), ``http_listen`` on 127.0.0.1 and its Unix socket, the trivial
  ``square`` beside it.  Its model cache is shared by every start of a run: the run's first start
  prepares the model (cold), later ones load the prepared files (warm).
- The peers: ``bench/peers/NAME/serve.py`` run by the Python of their own virtualenv,
  ``bench/.venv-peer-NAME`` (made here from ``bench/peers/NAME/requirements.txt``, pinned), on the
  contract in that directory's serve.py: ``POST /predict`` with raw float32 rows, ``POST /square``,
  ``X-Worker-Pid`` on every model reply, ``ready`` on stdout, SIGHUP to reload, SIGTERM to stop.

Memory is read with psutil from every process of a server (the started process and all its
descendants): USS, PSS and RSS; "model workers" are the processes that ran the model (named by the
daemon's status for expertd, by ``X-Worker-Pid`` for the peers).
"""

from __future__ import annotations

import hashlib
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
PEERS = BENCH / "peers"
MIB = 2**20
sys.path.insert(0, str(ROOT))

from expertd.client import Client  # noqa: E402


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def peer_python(peer: str) -> Path:
    """The peer's virtualenv's Python, made or brought up to date from its requirements.txt (pinned)."""
    venv = BENCH / f".venv-peer-{peer}"
    python = venv / "bin" / "python"
    requirements = PEERS / peer / "requirements.txt"
    stamp = venv / ".installed"
    digest = hashlib.sha256(requirements.read_bytes()).hexdigest()
    if python.exists() and stamp.exists() and stamp.read_text() == digest:
        return python
    print(f"installing {peer} into {venv.relative_to(ROOT)} (bench/peers/{peer}/requirements.txt) ...", flush=True)
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    subprocess.run([str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "-r",
                    str(requirements)], check=True)
    stamp.write_text(digest)
    return python


def installed_versions(python: Path, packages: list[str]) -> dict[str, str]:
    code = ("import importlib.metadata as m, json, sys\n"
            "out = {}\n"
            "for p in sys.argv[1:]:\n"
            "    try: out[p] = m.version(p)\n"
            "    except m.PackageNotFoundError: out[p] = 'not installed'\n"
            "print(json.dumps(out))")
    import json

    done = subprocess.run([str(python), "-c", code, *packages], capture_output=True, text=True, check=True)
    return json.loads(done.stdout)


@dataclass
class Running:
    """A started server: its process, where it answers, and when it did first."""

    system: System
    proc: subprocess.Popen
    url: str
    workers: int
    log_path: Path
    socket: str | None = None
    started: float = 0.0
    first_answer_s: float = 0.0
    seen_pids: set[int] = field(default_factory=set)

    def processes(self) -> list[psutil.Process]:
        try:
            root = psutil.Process(self.proc.pid)
            return [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def model_workers(self) -> list[int]:
        if self.socket is not None:  # expertd: its status names its workers
            with Client(self.socket, timeout=30) as client:
                return sorted(w["pid"] for w in client.status()["workers"])
        return sorted(self.seen_pids)

    def memory(self) -> dict:
        """USS/PSS/RSS (MiB) of each model worker and of the whole server (every process, PSS summed)."""
        workers = set(self.model_workers())
        rows, total_pss, total_uss, count = [], 0.0, 0.0, 0
        for process in self.processes():
            try:
                info = process.memory_full_info()
                name = " ".join(process.cmdline())[:80] or process.name()
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
            count += 1
            total_pss += info.pss / MIB
            total_uss += info.uss / MIB
            if process.pid in workers:
                rows.append({"pid": process.pid, "uss": info.uss / MIB, "pss": info.pss / MIB,
                             "rss": info.rss / MIB, "name": name})
        return {"workers": rows, "total_pss": total_pss, "total_uss": total_uss, "processes": count,
                "model_workers_found": len(rows), "model_workers_expected": self.workers}

    def log_tail(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-3000:]
        except OSError:
            return ""

    def stop(self) -> None:
        """SIGTERM, then SIGKILL for whatever of its process tree (as it was before) outlives the wait."""
        tree = []
        for process in self.processes():
            try:
                tree.append((process, process.create_time()))
            except psutil.NoSuchProcess:
                pass
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(90)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        left = 0
        for process, created in tree:  # (a peer that leaves processes behind would weigh on every later figure)
            try:
                if process.is_running() and process.create_time() == created:
                    process.kill()
                    left += 1
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                pass
        if left:
            print(f"  {self.system.label}: killed {left} of its processes that outlived it", flush=True)


class System:
    """One way of serving the model: a label, how to start it, and what its HTTP calls look like."""

    label: str
    key: str
    http_kind = "raw"            # peer_load kind for the model over HTTP
    square_kinds: tuple[str, ...] = ("square-raw",)
    can_reload = True
    reload_wait = 60.0           # seconds to wait for a new worker's first answer

    def start(self, workdir: Path, workers: int) -> Running:
        raise NotImplementedError

    def reload(self, running: Running) -> None:
        """Every system here reloads on SIGHUP (expertd's, gunicorn's and bench/peers/ray/serve.py's)."""
        running.proc.send_signal(signal.SIGHUP)

    def answering(self, running: Running) -> Running:
        """``running`` once it has answered a model call; stopped if it does not."""
        try:
            self.wait_first_answer(running)
        except BaseException:
            running.stop()
            raise
        return running

    def wait_first_answer(self, running: Running, timeout: float = 600) -> None:
        """Poll until a model call answers 200; record the time from the process's start."""
        import http.client

        body, path, headers = self.probe()
        host, port = running.url.rsplit("/", 1)[-1].split(":")
        while True:
            if running.proc.poll() is not None:
                raise RuntimeError(f"{self.label} exited with status {running.proc.returncode}:\n"
                                   + running.log_tail())
            if time.monotonic() - running.started > timeout:
                raise RuntimeError(f"{self.label} did not answer within {timeout:.0f} s:\n" + running.log_tail())
            try:
                conn = http.client.HTTPConnection(host, int(port), timeout=60)
                conn.request("POST", path, body, headers)
                response = conn.getresponse()
                response.read()
                conn.close()
                if response.status == 200:
                    running.first_answer_s = time.monotonic() - running.started
                    return
            except (OSError, http.client.HTTPException):
                pass
            time.sleep(0.05)

    def probe(self) -> tuple[bytes, str, dict]:
        import numpy as np

        return (np.zeros((1, 2048), np.float32).tobytes(), "/predict", {"Content-Type": "application/octet-stream"})


class Expertd(System):
    http_kind = "binary"  # (raw float32 rows, as the peers take them; JSON is measured beside it)
    square_kinds = ("square-json", "square-socket")

    def __init__(self, batching: bool, model: Path, cache: Path, threads: int = 1) -> None:
        """``threads`` > 1: one model worker with that many threads, whatever count is asked for (the shape
        that makes the largest batches: a batch streams the weights from memory once for all its rows)."""
        self.batching, self.threads = batching, threads
        self.key = ("expertd-batching" if batching else "expertd") + (f"-1x{threads}" if threads > 1 else "")
        self.label = f"expertd, batching {'on' if batching else 'off'}" + (
            f", 1 model worker × {threads} threads" if threads > 1 else "")
        self.model, self.cache = model, cache
        # (JSON for the default shape only, the socket client wherever batching is on: the 30-minute budget)
        self.more_transports = (("json",) if batching and threads == 1 else ()) + (("socket",) if batching else ())

    def config(self, workdir: Path, workers: int, port: int) -> tuple[Path, str]:
        directory = workdir / f"{self.key}-{workers}-{time.monotonic_ns() % 10**8}"
        directory.mkdir(parents=True)
        sock = str(directory / "expertd.sock")
        workers = 1 if self.threads > 1 else workers
        lines = ["[expertd]", f"socket = {sock}", f"workers = {workers}", f"http_listen = 127.0.0.1:{port}",
                 f"model_cache = {self.cache}", f"intra_op_threads = {self.threads}", "inter_op_threads = 1",
                 f"pythonpath = {ROOT / 'examples'}", "log_level = info", "",
                 "[expert:mlp]", f"model = {self.model}", *([] if self.batching else ["max_batch = 1"]), "",
                 "[expert:square]", "function = squares:square"]
        path = directory / "expertd.conf"
        path.write_text("\n".join(lines) + "\n")
        return path, sock

    def start(self, workdir: Path, workers: int) -> Running:
        port = free_port()
        config, sock = self.config(workdir, workers, port)
        log_path = config.with_suffix(".log")
        script = Path(sys.executable).parent / "expertd"
        command = [str(script)] if script.exists() else [sys.executable, "-m", "expertd"]
        with open(log_path, "wb") as log:
            started = time.monotonic()
            proc = subprocess.Popen([*command, "--config", str(config)], stdout=log, stderr=log,
                                    stdin=subprocess.DEVNULL)
        running = Running(self, proc, f"http://127.0.0.1:{port}", 1 if self.threads > 1 else workers, log_path,
                          socket=sock, started=started)
        return self.answering(running)

    def probe(self) -> tuple[bytes, str, dict]:
        return (b'{"inputs": [[' + b",".join([b"0"] * 2048) + b"]]}", "/call/mlp",
                {"Content-Type": "application/json"})


class Peer(System):
    def __init__(self, peer: str, variant: str | None, label: str, model: Path, threads: int = 1) -> None:
        """``threads`` > 1: one model worker with that many threads, whatever count is asked for (as Expertd's)."""
        self.peer, self.variant, self.label, self.model, self.threads = peer, variant, label, model, threads
        self.key = (peer if variant in (None, "default") else f"{peer}-{variant}") + (
            f"-1x{threads}" if threads > 1 else "")
        self.square_kinds = ("square-raw", "square-dirty") if peer == "gunicorn" else ("square-raw",)
        if peer == "gunicorn":  # (its dirty arbiter's reload never completes: bench/peers/gunicorn/serve.py)
            self.reload_wait = 30.0

    def start(self, workdir: Path, workers: int) -> Running:
        python = peer_python(self.peer)
        port = free_port()
        log_path = workdir / f"{self.key}-{workers}-{time.monotonic_ns() % 10**8}.log"
        workers = 1 if self.threads > 1 else workers
        argv = [str(python), str(PEERS / self.peer / "serve.py"), "--port", str(port), "--workers", str(workers),
                "--model", str(self.model), "--threads", str(self.threads),
                *([] if self.variant is None else ["--variant", self.variant])]
        with open(log_path, "wb") as log:
            started = time.monotonic()
            # (stdout: the contract's "ready"/"reloaded" lines; the harness polls instead of reading them)
            proc = subprocess.Popen(argv, stdout=log, stderr=log, stdin=subprocess.DEVNULL, cwd=ROOT,
                                    start_new_session=True)
        running = Running(self, proc, f"http://127.0.0.1:{port}", workers, log_path, started=started)
        return self.answering(running)


def measure_reload(running: Running, seconds: float = 60) -> dict:
    """SIGHUP, then one caller calls until a model worker that was not serving before answers.

    Returns seconds from the signal to that answer (None: none within ``seconds``; gunicorn 27.0.1's dirty
    arbiter never gets there, bench/peers/gunicorn/serve.py says why), and the calls that failed meanwhile.
    The server may be broken afterwards: measure this last.
    """
    import http.client

    import numpy as np

    system = running.system
    before = set(running.model_workers()) if running.socket else set(running.seen_pids)
    failed, calls = 0, 0
    body = np.zeros((1, 2048), np.float32)
    started = time.monotonic()
    system.reload(running)
    if running.socket is not None:  # expertd: its client, and its status for the workers serving
        client = Client(running.socket, timeout=60)
        while time.monotonic() - started < seconds:
            try:
                client.predict("mlp", body)
                calls += 1
                now = {w["pid"] for w in client.status()["workers"] if w.get("requests", 0) > 0}
                if now - before:
                    break
            except Exception:
                failed += 1
                time.sleep(0.01)
        client.close()
    else:
        raw, path, headers = system.probe()
        host, port = running.url.rsplit("/", 1)[-1].split(":")
        conn = http.client.HTTPConnection(host, int(port), timeout=60)
        while time.monotonic() - started < seconds:
            try:
                conn.request("POST", path, raw, headers)
                response = conn.getresponse()
                response.read()
                if response.status != 200:
                    raise RuntimeError(response.status)
                calls += 1
                pid = int(response.getheader("X-Worker-Pid") or 0)
                if pid and pid not in before:
                    running.seen_pids = {pid}
                    break
            except Exception:
                failed += 1
                conn.close()
                conn = http.client.HTTPConnection(host, int(port), timeout=60)
                time.sleep(0.01)
        conn.close()
    elapsed = time.monotonic() - started
    return {"seconds": elapsed if elapsed < seconds else None, "failed": failed, "calls": calls}
