"""Call-path benchmark: what one call costs through expertd, against the floors.

    python bench/calls.py [--quick]

Starts a daemon on the shipped example experts (2 workers) in a temporary
directory and measures, interleaved in one run (A B A B ...) so that the
shared machine's noise hits every method alike:

* sequential round trip of ``square`` through ``expertd.client`` — against a
  one-process msgpack server on the same kind of socket (the transport floor:
  what any design pays without a master/worker split);
* throughput with 4 client processes against 2 workers;
* a one-shot ``expertctl call square n=2`` from the shell — against
  ``python -c pass`` (the interpreter floor);
* ``python -X importtime -c 'import expertd.client'``.

Prints a Markdown table of medians with their spread (min–max over rounds).
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
sys.path.insert(0, str(ROOT))

from expertd import protocol  # noqa: E402
from expertd.client import Client  # noqa: E402


def _floor_server(path: str, ready) -> None:
    """One process, one thread: read a frame, square, reply. The transport floor."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen()
    ready.set()
    conn, _ = listener.accept()
    try:
        while True:
            _kind, request_id, body = protocol.read_frame(conn, 1 << 20)
            _name, args, _kwargs = protocol.decode_call(body)
            conn.sendall(protocol.encode_frame(protocol.RESULT, request_id, protocol.pack(args[0] * args[0])))
    except Exception:
        conn.close()


def _per_call_us(client: Client, calls: int) -> float:
    started = time.perf_counter()
    for i in range(calls):
        client.call("square", i)
    return (time.perf_counter() - started) / calls * 1e6


def _throughput_worker(path: str, seconds: float, out) -> None:
    client = Client(path)
    count = 0
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        client.call("square", count)
        count += 1
    out.put(count)


def _throughput(path: str, processes: int, seconds: float) -> float:
    queue = multiprocessing.Queue()
    procs = [multiprocessing.Process(target=_throughput_worker, args=(path, seconds, queue)) for _ in range(processes)]
    for proc in procs:
        proc.start()
    total = sum(queue.get() for _ in procs)
    for proc in procs:
        proc.join()
    return total / seconds


def _wall_ms(argv: list[str], env: dict | None = None) -> float:
    started = time.perf_counter()
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, env=env)
    return (time.perf_counter() - started) * 1000


def _import_ms() -> float:
    done = subprocess.run([sys.executable, "-X", "importtime", "-c", "import expertd.client"],
                          capture_output=True, text=True, check=True)
    line = [ln for ln in done.stderr.splitlines() if ln.rstrip().endswith("| expertd.client")][-1]
    return int(re.split(r"\|", line)[1]) / 1000


def _summary(values: list[float], unit: str, digits: int = 1) -> str:
    return f"{statistics.median(values):.{digits}f} {unit} ({min(values):.{digits}f}–{max(values):.{digits}f})"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds (about 20 s)")
    options = parser.parse_args()
    rounds, calls, oneshots, seconds = (3, 1000, 10, 1.0) if options.quick else (7, 3000, 30, 3.0)

    workdir = Path(tempfile.mkdtemp(prefix="xdb-", dir="/tmp"))
    sock = str(workdir / "expertd.sock")
    floor_sock = str(workdir / "floor.sock")
    log = open(workdir / "expertd.log", "wb")
    daemon = subprocess.Popen([sys.executable, "-m", "expertd", "--config", str(ROOT / "etc" / "expertd.conf"),
                               "--socket", sock, "--workers", "2", "--log-level", "warning"], stdout=log, stderr=log)
    try:
        client = Client(sock)
        deadline = time.monotonic() + 60
        while True:
            try:
                client.ping()
                break
            except Exception:
                if time.monotonic() > deadline or daemon.poll() is not None:
                    raise SystemExit("expertd did not start; see " + str(workdir / "expertd.log")) from None
                time.sleep(0.05)
        ready = multiprocessing.Event()
        floor_server = multiprocessing.Process(target=_floor_server, args=(floor_sock, ready), daemon=True)
        floor_server.start()
        ready.wait(10)
        floor = Client(floor_sock)

        # Warm both paths before measuring.
        _per_call_us(client, 300)
        _per_call_us(floor, 300)
        expertd_us, floor_us = [], []
        for _ in range(rounds):
            expertd_us.append(_per_call_us(client, calls))
            floor_us.append(_per_call_us(floor, calls))

        throughput = [_throughput(sock, 4, seconds) for _ in range(max(1, rounds // 2))]

        env = {**os.environ, "EXPERTD_SOCKET": sock}
        ctl = [str(BIN / "expertctl"), "call", "square", "n=2"]
        ctl_ms, pass_ms = [], []
        _wall_ms(ctl, env)
        for _ in range(oneshots):
            ctl_ms.append(_wall_ms(ctl, env))
            pass_ms.append(_wall_ms([sys.executable, "-c", "pass"]))
        import_ms = [_import_ms() for _ in range(5)]
    finally:
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(30)
        log.close()
        shutil.rmtree(workdir, ignore_errors=True)

    ratio = statistics.median(expertd_us) / statistics.median(floor_us)
    print(f"# expertd call path — {time.strftime('%Y-%m-%d')}, {os.cpu_count()} cores, Python {sys.version.split()[0]}")
    print()
    print("| measure | median (min–max) |")
    print("| --- | --- |")
    print(f"| round trip via expertd (`client.call('square', i)`, sequential) | {_summary(expertd_us, 'µs')} |")
    print(f"| round trip, one-process msgpack server (transport floor) | {_summary(floor_us, 'µs')} |")
    print(f"| expertd / floor | {ratio:.2f}× |")
    print(f"| throughput, 4 client processes, 2 workers | {_summary(throughput, 'calls/s', 0)} |")
    print(f"| one-shot `expertctl call square n=2` wall time | {_summary(ctl_ms, 'ms')} |")
    print(f"| `python -c pass` wall time (floor) | {_summary(pass_ms, 'ms')} |")
    print(f"| `import expertd.client` (-X importtime, cumulative) | {_summary(import_ms, 'ms')} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
