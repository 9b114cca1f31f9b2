"""Where each call's CPU and context switches go, per process, for two or more trees, interleaved.

    python bench/ab_processes.py TREE_OR_REF [TREE_OR_REF ...] [--workers 1] [--rounds 3] [--seconds 3]

For each round and each tree (a git ref, or a directory holding an exported
tree, as bench/ab.py takes), starts that tree's daemon on the example
``square`` expert, lets 16 clients call it for ``--seconds``, and prints per
call: calls/s, the clients' CPU, and for the master and each worker its CPU
(µs), voluntary and involuntary context switches.  Then the medians per tree.

It says *why* two trees differ where bench/ab.py says *that* they do: a
process that sleeps more per call (voluntary switches) while the machine has
idle CPU is waiting on another one.  Pin it to a CPU set with taskset to
mimic a smaller machine (``taskset -c 2,3 python bench/ab_processes.py …``).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
import ab  # (bench/ab.py: export, start, load)


def _snapshot(process: psutil.Process) -> tuple[float, int, int]:
    cpu, switches = process.cpu_times(), process.num_ctx_switches()
    return cpu.user + cpu.system, switches.voluntary, switches.involuntary


def measure(tree: Path, directory: Path, workers: int, seconds: float) -> dict[str, float]:
    proc, sock = ab.start(tree, directory, workers)
    try:
        time.sleep(0.5)
        processes = {"master": psutil.Process(proc.pid)}
        # (the generation's parent is a child too: it does nothing per call, and shows 0)
        processes.update({f"child{i}": child for i, child in enumerate(processes["master"].children())})
        before = {name: _snapshot(process) for name, process in processes.items()}
        result = ab.load(sock, 16, seconds)
        after = {name: _snapshot(process) for name, process in processes.items()}
    finally:
        proc.terminate()
        proc.wait(60)
    calls = max(1, result["calls"])
    row = {"calls/s": result["throughput"], "clients µs": result["client_user_us"] + result["client_sys_us"]}
    for name in before:
        cpu, voluntary, involuntary = (a - b for a, b in zip(after[name], before[name], strict=True))
        if cpu == 0 and voluntary == 0:
            continue
        row[f"{name} µs"] = cpu / calls * 1e6
        row[f"{name} vcs"] = voluntary / calls
        row[f"{name} ics"] = involuntary / calls
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("trees", nargs="+")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=3.0)
    options = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="xd-abp-", dir="/tmp") as scratch:
        directory = Path(scratch)
        trees = {ref: ab.export(ref, directory) for ref in options.trees}
        rows: dict[str, list[dict[str, float]]] = {ref: [] for ref in trees}
        for round_number in range(options.rounds):
            for ref, tree in trees.items():
                rows[ref].append(measure(tree, directory, options.workers, options.seconds))
                shown = {key: round(value, 2) for key, value in rows[ref][-1].items()}
                print(f"round {round_number + 1} {ref}: {shown}", file=sys.stderr, flush=True)
    for ref, measured in rows.items():
        keys = [key for key in measured[0] if all(key in row for row in measured)]
        print(ref, {key: round(statistics.median(row[key] for row in measured), 2) for key in keys})
    return 0


if __name__ == "__main__":
    sys.exit(main())
