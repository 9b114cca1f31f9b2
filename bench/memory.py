"""Memory and start-up benchmark: prefork workers against independent processes.

    python bench/memory.py [--workers 2 4] [--independent 5]

For each worker count, starts expertd on the shipped config (sentiment model
included), waits until every worker is ready, makes a few calls, and reads
from the log each worker's fork-to-ready time and its USS/PSS/RSS after
warm-up (measured by the worker itself with psutil), then sums PSS over the
master and its workers with psutil, and splits each worker's private memory
into dirty pages and clean pages of mapped files (see _private_split).  Then starts N independent processes that
each import TensorFlow and build the same model (bench/standalone_expert.py)
and sums their PSS.  The groups run one after another, so that pages shared
between groups cannot hide in the figures.  PSS (proportional set size)
charges each shared page to its sharers in equal parts, so a group's summed
PSS is the memory the group really costs.
"""

from __future__ import annotations

import argparse
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from expertd.client import Client  # noqa: E402

MIB = 2**20
_READY = re.compile(r"worker (\d+) \(pid (\d+)\) ready in ([\d.]+)s")
_MEMORY = re.compile(
    r"worker (\d+) \(pid (\d+)\) memory after warm-up: USS ([\d.]+) MiB, PSS ([\d.]+) MiB, RSS ([\d.]+)"
)


def _private_split(pid: int) -> tuple[float, float]:
    """(private memory less clean file pages, private clean file pages) MiB of a process, from /proc/PID/smaps.

    USS is their sum.  Clean file-backed
    pages are library code and read-only data in the page cache: one copy
    however many processes map them.  They count as "private" only while one
    process alone maps them, as TensorFlow's runtime code does in a lone
    worker (the master never runs it).
    """
    private = clean_file = 0
    file_backed = False
    with open(f"/proc/{pid}/smaps") as smaps:
        for line in smaps:
            if re.match(r"^[0-9a-f]+-[0-9a-f]+ ", line):
                fields = line.split()
                file_backed = len(fields) > 5 and fields[5].startswith("/")
            elif line.startswith("Private_Dirty:") or (line.startswith("Private_Clean:") and not file_backed):
                private += int(line.split()[1])
            elif line.startswith("Private_Clean:"):
                clean_file += int(line.split()[1])
    return private / 1024, clean_file / 1024


def _group_pss(pids: list[int]) -> tuple[float, float]:
    """Summed PSS and USS of the processes, in MiB."""
    pss = uss = 0
    for pid in pids:
        info = psutil.Process(pid).memory_full_info()
        pss += info.pss
        uss += info.uss
    return pss / MIB, uss / MIB


def measure_expertd(workers: int, workdir: Path) -> dict:
    sock = str(workdir / f"bench{workers}.sock")
    log_path = workdir / f"expertd{workers}.log"
    started = time.monotonic()
    with open(log_path, "wb") as log:
        daemon = subprocess.Popen([sys.executable, "-m", "expertd", "--config", str(ROOT / "etc" / "expertd.conf"),
                                   "--socket", sock, "--workers", str(workers)], stdout=log, stderr=log)
    try:
        while "expertd ready" not in log_path.read_text():
            if daemon.poll() is not None or time.monotonic() - started > 120:
                raise SystemExit(f"expertd failed to start:\n{log_path.read_text()}")
            time.sleep(0.05)
        ready_after = time.monotonic() - started
        client = Client(sock)
        for _ in range(50):  # every worker has served by now
            client.opinion("sentiment", {"text": "the room was lovely and the staff friendly"})
        while len(_MEMORY.findall(log_path.read_text())) < workers:
            time.sleep(0.05)
        text = log_path.read_text()
        master = psutil.Process(daemon.pid)
        pids = [daemon.pid] + [child.pid for child in master.children()]
        total_pss, total_uss = _group_pss(pids)
        master_info = master.memory_full_info()
        splits = [_private_split(child.pid) for child in master.children()  # the workers, not the generation's parent
                  if not " ".join(child.cmdline()).startswith("expertd: generation")]
        return {
            "worker_private_own": [own for own, _clean in splits],
            "worker_private_clean_files": [clean for _own, clean in splits],
            "workers": workers,
            "daemon_ready_s": ready_after,
            "fork_to_ready_s": [float(m[2]) for m in _READY.findall(text)],
            "worker_uss": [float(m[2]) for m in _MEMORY.findall(text)],
            "worker_pss": [float(m[3]) for m in _MEMORY.findall(text)],
            "worker_rss": [float(m[4]) for m in _MEMORY.findall(text)],
            "master_rss": master_info.rss / MIB,
            "master_uss": master_info.uss / MIB,
            "total_pss": total_pss,
            "total_uss": total_uss,
        }
    finally:
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(60)


def measure_independent(count: int) -> dict:
    started = time.monotonic()
    procs = [subprocess.Popen([sys.executable, str(ROOT / "bench" / "standalone_expert.py")],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
             for _ in range(count)]
    try:
        for proc in procs:
            if proc.stdout.readline().strip() != b"ready":
                raise SystemExit("an independent expert process failed to start")
        ready_after = time.monotonic() - started
        total_pss, total_uss = _group_pss([proc.pid for proc in procs])
        rss = [psutil.Process(proc.pid).memory_info().rss / MIB for proc in procs]
        return {"count": count, "ready_s": ready_after, "total_pss": total_pss, "total_uss": total_uss, "rss": rss}
    finally:
        for proc in procs:
            proc.stdin.close()
            proc.wait(30)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--independent", type=int, default=5)
    options = parser.parse_args()

    weights = (ROOT / "examples" / "sentiment" / "sentiment.keras").stat().st_size / MIB
    workdir = Path(tempfile.mkdtemp(prefix="xdm-", dir="/tmp"))
    try:
        runs = [measure_expertd(workers, workdir) for workers in options.workers]
        independent = measure_independent(options.independent)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    print(f"# expertd memory — {time.strftime('%Y-%m-%d')}, {psutil.cpu_count()} cores, "
          f"sentiment.keras {weights * 1024:.0f} KiB")
    print()
    print("| daemon | fork→ready per worker (s) | worker USS (MiB) | worker PSS (MiB) | worker RSS (MiB) "
          "| master RSS / USS (MiB) | master+workers PSS (MiB) |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for run in runs:
        print(f"| expertd, {run['workers']} workers | {_list(run['fork_to_ready_s'], 2)} | {_list(run['worker_uss'])} "
              f"| {_list(run['worker_pss'])} | {_list(run['worker_rss'])} "
              f"| {run['master_rss']:.0f} / {run['master_uss']:.0f} | {run['total_pss']:.0f} |")
    print(f"| {independent['count']} independent processes | ready together after {independent['ready_s']:.1f} s "
          f"| | | {_list(independent['rss'], 0)} | | {independent['total_pss']:.0f} |")
    print()
    target_uss = 40 + 1.5 * weights
    for run in runs:
        worst_uss = max(run["worker_uss"])
        worst_ready = max(run["fork_to_ready_s"])
        print(f"- {run['workers']} workers: worst worker USS {worst_uss:.1f} MiB vs target ≤ {target_uss:.1f} MiB "
              f"({'met' if worst_uss <= target_uss else 'NOT met'}); worst fork→ready {worst_ready:.2f} s vs ≤ 0.5 s "
              f"({'met' if worst_ready <= 0.5 else 'NOT met'})")
    for run in runs:
        if run["workers"] + 1 == independent["count"]:
            ratio = run["total_pss"] / independent["total_pss"]
            print(f"- master + {run['workers']} workers: {run['total_pss']:.0f} MiB PSS vs "
                  f"{independent['count']} independent processes: {independent['total_pss']:.0f} MiB PSS "
                  f"= {ratio:.2f}× (target < 0.5×: {'met' if ratio < 0.5 else 'NOT met'})")
    return 0


def _list(values: list[float], digits: int = 1) -> str:
    return ", ".join(f"{v:.{digits}f}" for v in values) + (f" (median {statistics.median(values):.{digits}f})"
                                                          if len(values) > 2 else "")


if __name__ == "__main__":
    sys.exit(main())
