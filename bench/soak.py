"""Load, chaos and soak: many concurrent clients, every answer checked, workers killed at random.

    python bench/soak.py [--seconds 300] [--clients 16] [--workers 2] [--chaos] [--retries 1]

Starts expertd (test experts, N workers) unless --socket names a running one,
then runs C client *processes* for the given time.  Each client calls
``add(base, n)`` with its own base and a counter, so every answer can be
checked against its own request.  With --chaos a random worker is SIGKILLed
every 100–300 ms.  Prints sent / answered / failed / wrong counts, the
failures by type, and the kills; exits non-zero if any answer was wrong or
lost (a failure that reached the caller counts as lost).

The same engine (:func:`run_load`) drives the CI load and chaos tests with a
few seconds and the soak (``make soak``) with minutes.
"""

from __future__ import annotations

import argparse
import collections
import multiprocessing
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from expertd.client import Client  # noqa: E402
from expertd.errors import ExpertdError  # noqa: E402


@dataclass
class Counts:
    sent: int = 0
    answered: int = 0
    failed: int = 0
    wrong: int = 0
    kills: int = 0
    failures: collections.Counter = field(default_factory=collections.Counter)
    examples: list = field(default_factory=list)

    def add(self, other: dict) -> None:
        self.sent += other["sent"]
        self.answered += other["answered"]
        self.failed += other["failed"]
        self.wrong += other["wrong"]
        self.failures.update(other["failures"])
        self.examples += other["examples"][: max(0, 5 - len(self.examples))]

    def summary(self) -> str:
        kinds = ", ".join(f"{k}: {v}" for k, v in sorted(self.failures.items())) or "none"
        examples = "".join(f"\n  e.g. {example}" for example in self.examples)
        return (f"sent {self.sent}, answered {self.answered}, failed {self.failed}, wrong {self.wrong}, "
                f"workers killed {self.kills}; failures by type: {kinds}{examples}")


def _client_loop(socket_path: str, client_number: int, seconds: float, retries: int, results) -> None:
    client = Client(socket_path, retries=retries, timeout=30)
    counts = {"sent": 0, "answered": 0, "failed": 0, "wrong": 0, "failures": collections.Counter(), "examples": []}
    base = client_number * 10_000_000
    deadline = time.monotonic() + seconds
    n = 0
    while time.monotonic() < deadline:
        n += 1
        counts["sent"] += 1
        try:
            answer = client.call("add", base, n)
        except ExpertdError as exc:
            counts["failed"] += 1
            counts["failures"][getattr(exc, "code", type(exc).__name__)] += 1
            if len(counts["examples"]) < 3:
                counts["examples"].append(f"{type(exc).__name__}: {exc}")
            continue
        counts["answered"] += 1
        if answer != base + n:
            counts["wrong"] += 1
    results.put(counts)


def _chaos(master_pid: int, stop: threading.Event, counts: Counts, low: float = 0.1, high: float = 0.3) -> None:
    import psutil

    rng = random.Random(0)
    while not stop.wait(rng.uniform(low, high)):
        try:
            workers = [child for child in psutil.Process(master_pid).children()
                       if not " ".join(child.cmdline()).startswith("expertd: generation")]  # (its parent)
        except psutil.Error:
            return
        if workers:
            try:
                os.kill(rng.choice(workers).pid, signal.SIGKILL)
                counts.kills += 1
            except ProcessLookupError:
                pass


def run_load(socket_path: str, clients: int, seconds: float, retries: int = 1,
             chaos_master_pid: int | None = None) -> Counts:
    """Run ``clients`` client processes for ``seconds``; optionally kill workers of ``chaos_master_pid``."""
    context = multiprocessing.get_context("fork")
    results = context.Queue()
    procs = [context.Process(target=_client_loop, args=(socket_path, i + 1, seconds, retries, results))
             for i in range(clients)]
    counts = Counts()
    stop = threading.Event()
    chaos = None
    for proc in procs:
        proc.start()
    if chaos_master_pid is not None:
        chaos = threading.Thread(target=_chaos, args=(chaos_master_pid, stop, counts), daemon=True)
        chaos.start()
    try:
        for _ in procs:
            counts.add(results.get(timeout=seconds + 120))
    finally:
        stop.set()
        if chaos is not None:
            chaos.join()
        for proc in procs:
            proc.join(10)
    return counts


def start_daemon(workdir: Path, workers: int, log_level: str = "warning") -> tuple[subprocess.Popen, str]:
    config = workdir / "soak.conf"
    config.write_text(
        "[expertd]\n"
        f"pythonpath = {ROOT / 'tests' / 'experts'}\n"
        "[expert:add]\nfunction = testexperts:add\n"
    )
    sock = str(workdir / "soak.sock")
    log = open(workdir / "expertd.log", "wb")
    daemon = subprocess.Popen([sys.executable, "-m", "expertd", "--config", str(config), "--socket", sock,
                               "--workers", str(workers), "--log-level", log_level], stdout=log, stderr=log)
    deadline = time.monotonic() + 60
    while True:
        try:
            Client(sock).ping()
            return daemon, sock
        except ExpertdError:
            if daemon.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"expertd did not start; see {workdir / 'expertd.log'}") from None
            time.sleep(0.05)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=300)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--chaos", action="store_true", help="SIGKILL a random worker every 100-300 ms")
    parser.add_argument("--retries", type=int, default=1, help="client retries after a lost worker")
    options = parser.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="xds-", dir="/tmp"))
    daemon, sock = start_daemon(workdir, options.workers)
    try:
        print(f"soak: {options.clients} clients, {options.workers} workers, {options.seconds:.0f}s, "
              f"chaos {'on' if options.chaos else 'off'}, client retries {options.retries}", flush=True)
        counts = run_load(sock, options.clients, options.seconds, options.retries,
                          daemon.pid if options.chaos else None)
        alive = daemon.poll() is None
    finally:
        daemon.send_signal(signal.SIGTERM)
        status = daemon.wait(60)
        if os.environ.get("SOAK_KEEP"):
            print(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    print(counts.summary())
    print(f"throughput {counts.answered / options.seconds:.0f} calls/s; daemon alive to the end: {alive}; "
          f"exit status after SIGTERM: {status}")
    lost = counts.sent - counts.answered
    return 0 if alive and status == 0 and counts.wrong == 0 and lost == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
