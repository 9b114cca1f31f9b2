"""A B A B: the call path of two commits, interleaved in one run on this machine.

    python bench/ab.py REF_A REF_B [--rounds 4] [--seconds 2]

A REF may also be a directory holding an exported tree (``git archive REF | tar -x -C DIR``),
for a machine without the repository's history.

Each commit is exported (git archive) into a temporary directory and served
from there (its own code, this venv).  Every round starts each commit's daemon
in turn, on the example ``square`` expert, and measures with bench/loadgen.py:

* the sequential round trip: one persistent client, 2 workers (median latency);
* calls/s with 16 clients against 1 worker and against 2 workers;
* the master's CPU time per call in the 16-client, 1-worker run (every call
  then passes the master).

Prints the medians over rounds for each commit and the ratio B/A.  Ratios
measured in one run are what to compare on a shared, noisy machine.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from io import BytesIO
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
LOADGEN = ROOT / "bench" / "loadgen.py"


def export(ref: str, into: Path) -> Path:
    """The tree of ``ref`` in ``into``/ref; a directory given as ``ref`` is used as it is.

    (A directory: a tree exported beforehand, for a machine without the repository's history.)
    """
    if Path(ref).is_dir():
        return Path(ref).resolve()
    tree = into / ref.replace("/", "_")
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", ref], check=True, capture_output=True).stdout
    with tarfile.open(fileobj=BytesIO(archive)) as tar:
        tar.extractall(tree, filter="data")
    return tree


def start(tree: Path, directory: Path, workers: int) -> tuple[subprocess.Popen, Path]:
    config = directory / "ab.conf"
    config.write_text(f"[expertd]\npythonpath = {tree / 'examples'}\nlinger = 5ms\n\n"
                      "[expert:square]\nfunction = squares.square\n")
    sock = directory / f"ab-{time.monotonic_ns() % 10**8}.sock"
    log_path = sock.with_suffix(".log")
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "expertd", "--config", str(config), "--socket", str(sock),
                                 "--workers", str(workers)], cwd=str(tree),
                                env={"PYTHONPATH": str(tree), "PATH": "/usr/bin:/bin"}, stdout=log, stderr=log)
    deadline = time.monotonic() + 120
    while "expertd ready" not in log_path.read_text(errors="replace"):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"expertd from {tree} did not start:\n{log_path.read_text()}")
        time.sleep(0.02)
    return proc, sock


def load(sock: Path, clients: int, seconds: float) -> dict:
    done = subprocess.run([sys.executable, str(LOADGEN), "expertd", str(sock), "square", "[3]", "--clients",
                           str(clients), "--seconds", str(seconds)], capture_output=True, text=True, check=True)
    return json.loads(done.stdout)


def measure(tree: Path, directory: Path, seconds: float) -> dict:
    figures = {}
    proc, sock = start(tree, directory, 2)
    try:
        figures["round trip, µs (1 client, 2 workers)"] = load(sock, 1, seconds)["p50_us"]
        figures["calls/s (16 clients, 2 workers)"] = load(sock, 16, seconds)["throughput"]
    finally:
        proc.terminate()
        proc.wait(60)
    proc, sock = start(tree, directory, 1)
    try:
        master = psutil.Process(proc.pid)
        before = sum(master.cpu_times()[:2])
        result = load(sock, 16, seconds)
        figures["calls/s (16 clients, 1 worker)"] = result["throughput"]
        figures["master CPU per call, µs (16 clients, 1 worker)"] = \
            (sum(master.cpu_times()[:2]) - before) / max(1, result["calls"]) * 1e6
    finally:
        proc.terminate()
        proc.wait(60)
    return figures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("a")
    parser.add_argument("b")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=2.0)
    options = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="xd-ab-", dir="/tmp") as scratch:
        directory = Path(scratch)
        trees = {ref: export(ref, directory) for ref in (options.a, options.b)}
        runs: dict[str, list[dict]] = {ref: [] for ref in trees}
        for round_number in range(options.rounds):
            for ref, tree in trees.items():
                runs[ref].append(measure(tree, directory, options.seconds))
                print(f"round {round_number + 1} {ref}: {runs[ref][-1]}", file=sys.stderr, flush=True)
    names = list(runs[options.a][0])
    print(f"| figure (median of {options.rounds} rounds, A B A B) | A {options.a} | B {options.b} | B/A |")
    print("| --- | --- | --- | --- |")
    for name in names:
        a = statistics.median(run[name] for run in runs[options.a])
        b = statistics.median(run[name] for run in runs[options.b])
        print(f"| {name} | {a:,.1f} | {b:,.1f} | {b / a:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
