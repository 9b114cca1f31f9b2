"""The batching policy alone: closed-loop callers of an expert whose batch costs 10 ms + 4 ms per item.

    python bench/batch_policy.py [--clients 16] [--workers 2] [--seconds 5] [--delays 0 2ms 10ms]

The expert (bench/batched_experts.py: fixed_plus_per_item) sleeps instead of
computing, so the figures show how the daemon forms batches, not how busy the
CPU is: calls/s against the ideal (every batch clients/workers calls), p50
and p99 latency, and each call's latency over its own batch's time (the
expert answers with the batch size, so a caller knows it), for each
``batch_delay`` given, interleaved on one daemon.  About 20 s.
"""

from __future__ import annotations

import argparse
import multiprocessing
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
EXPERT = "batched_experts:fixed_plus_per_item"


def batch_seconds(size: int) -> float:
    return 0.010 + 0.004 * size


def _caller(sock: str, expert: str, seconds: float, results: multiprocessing.Queue) -> None:
    from expertd.client import Client

    client = Client(sock)
    client.call(expert, 1)
    calls, end = [], time.monotonic() + seconds
    while time.monotonic() < end:
        started = time.monotonic()
        size = client.call(expert, 1)
        calls.append((time.monotonic() - started, size))
    results.put(calls)


def measure(sock: str, expert: str, clients: int, seconds: float) -> dict:
    results: multiprocessing.Queue = multiprocessing.Queue()
    procs = [multiprocessing.Process(target=_caller, args=(sock, expert, seconds, results)) for _ in range(clients)]
    for proc in procs:
        proc.start()
    calls = [call for _ in procs for call in results.get(timeout=seconds + 60)]
    for proc in procs:
        proc.join()
    latencies = sorted(latency for latency, _size in calls)
    ratios = sorted(latency / batch_seconds(size) for latency, size in calls)

    def pct(values: list[float], q: float) -> float:
        return values[min(len(values) - 1, int(q * len(values)))]

    return {"calls/s": len(calls) / seconds, "p50 ms": pct(latencies, 0.5) * 1000,
            "p99 ms": pct(latencies, 0.99) * 1000, "p99 / own batch": pct(ratios, 0.99),
            "mean batch (per call)": statistics.mean(size for _latency, size in calls), "_calls": calls}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--delays", nargs="+", default=["0", "2ms", "10ms"])
    options = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="xd-policy-", dir="/tmp") as scratch:
        directory = Path(scratch)
        config = directory / "policy.conf"
        sections = "".join(f"\n[expert:d{i}]\nfunction = {EXPERT}\nbatch_delay = {delay}\n"
                           for i, delay in enumerate(options.delays))
        config.write_text(f"[expertd]\npythonpath = {ROOT / 'bench'}\nlinger = 5ms\n{sections}")
        sock = directory / "policy.sock"
        log = directory / "policy.log"
        with open(log, "wb") as out:
            daemon = subprocess.Popen([sys.executable, "-m", "expertd", "--config", str(config), "--socket", str(sock),
                                       "--workers", str(options.workers)], stdout=out, stderr=out)
        try:
            deadline = time.monotonic() + 60
            while "expertd ready" not in log.read_text(errors="replace"):
                if daemon.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit(f"expertd did not start:\n{log.read_text()}")
                time.sleep(0.05)
            share = options.clients / options.workers
            ideal = options.workers * share / batch_seconds(share)
            print(f"{options.clients} callers, {options.workers} workers; ideal: {ideal:.0f} calls/s at "
                  f"{batch_seconds(share) * 1000:.0f} ms")
            print("| batch_delay | calls/s | p50 ms | p99 ms | p99 of latency / own batch's time "
                  "| calls over 1.5 × own + delay | mean batch (per call) |")
            print("| --- | --- | --- | --- | --- | --- | --- |")
            for i, delay in enumerate(options.delays):
                figures = measure(str(sock), f"d{i}", options.clients, options.seconds)
                seconds = {"0": 0.0}.get(delay, float(delay.removesuffix("ms")) / 1000 if delay.endswith("ms")
                                         else float(delay))
                over = sum(1 for latency, size in figures["_calls"] if latency > 1.5 * batch_seconds(size) + seconds)
                print(f"| {delay} | {figures['calls/s']:.0f} | {figures['p50 ms']:.1f} | {figures['p99 ms']:.1f} "
                      f"| {figures['p99 / own batch']:.2f} | {over / len(figures['_calls']) * 100:.1f} % "
                      f"| {figures['mean batch (per call)']:.1f} |")
        finally:
            daemon.terminate()
            daemon.wait(60)
    return 0


if __name__ == "__main__":
    sys.exit(main())
