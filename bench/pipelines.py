"""Pipelines: many experts on one document in one round trip, against one call per expert.

    python bench/pipelines.py              # make bench-pipelines (and make bench), about 2 minutes
    python bench/pipelines.py --quick      # fewer, shorter rounds
    python bench/pipelines.py --old REF    # today's CLI from another commit (default: the one before pipelines)

Each daemon is this Python's ``expertd`` on a config written to a temporary
directory, with the experts of bench/pipeline_experts.py.  Every figure is a
median over rounds that alternate between the ways compared, in one run.

1. **Round trip** (2 workers): one client on a plain socket, sequential
   requests on one document: one expert's CALL; three cheap experts as three
   CALLs (what ``expertctl opinion a b c`` did); the same three as one
   PIPELINE request (``a,b,c``).  Target: the pipeline at most 1.3x one call.
2. **A stage of three ~20 ms CPU experts** (3 workers, otherwise idle):
   ``a+b+c`` (one stage: its experts may run on idle workers at once) against
   one of them alone and against ``a,b,c`` (three stages, run one after the
   other).  Target: close to the longest, not the sum.  The distinct worker
   pids in the answers show whether the stage was shared.
3. **``expertctl opinion a b c --lines``** over 10,000 documents (2 workers):
   this tree's CLI (one PIPELINE request per document, several in flight)
   against the CLI of ``--old`` (one call per expert per document, 4
   threads), on the same daemon; every output line is checked equal.
   Target: at least 2x the documents/s.

Writes the report (markdown, also printed) to --output, default
BENCHMARKS-pipelines.md at the repository root.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack, contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(BENCH))

import psutil  # noqa: E402
from models import Daemon, median, verdict  # noqa: E402

from expertd import protocol  # noqa: E402

PYTHON = sys.executable
OLD_REF = "8f75b9f"  # main before pipelines landed
CHEAP = ("language", "length", "shout")
HEAVY = ("heavy_a", "heavy_b", "heavy_c")
WAITING = ("wait_a", "wait_b", "wait_c")  # 20 ms each without CPU: as if every expert had a core of its own
DOCUMENT = {"id": 1, "text": "Hello there, is le monde OK today?"}


def write_config(directory: Path, workers: int) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    lines = ["[expertd]", f"socket = {directory / 'expertd.sock'}", f"workers = {workers}",
             f"pythonpath = {BENCH}", "preload ="]
    for name in (*CHEAP, *HEAVY, *WAITING):
        lines += ["", f"[expert:{name}]", f"function = pipeline_experts:{name}"]
    path = directory / "expertd.conf"
    path.write_text("\n".join(lines) + "\n")
    return path


@contextmanager
def running(directory: Path, workers: int):
    daemon = Daemon(write_config(directory, workers), timeout=120)
    try:
        yield daemon
    finally:
        daemon.client.close()
        daemon.stop()


class Raw:
    """One connection speaking the protocol by hand: the same client code for every way compared."""

    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(path)

    def ask(self, frame: bytes) -> object:
        self.sock.sendall(frame)
        kind, _request_id, body = protocol.read_frame(self.sock, 1 << 30)
        value = protocol.unpack(body)
        if kind != protocol.RESULT:
            raise RuntimeError(f"error reply: {value}")
        return value

    def close(self) -> None:
        self.sock.close()


def latencies(function, count: int) -> list[float]:
    times = []
    for _ in range(count):
        started = time.perf_counter()
        function()
        times.append(time.perf_counter() - started)
    return times


def round_trip(sock: str, rounds: int, count: int) -> dict:
    raw = Raw(sock)
    one = protocol.encode_call(1, CHEAP[0], [DOCUMENT], {})
    calls = [protocol.encode_call(1, name, [DOCUMENT], {}) for name in CHEAP]
    pipeline = protocol.encode_pipeline(1, ",".join(CHEAP), DOCUMENT)
    answer = raw.ask(pipeline)
    assert set(answer["opinions"]) == set(CHEAP), answer  # type: ignore[index]
    ways = {
        "one call": lambda: raw.ask(one),
        "three calls": lambda: [raw.ask(frame) for frame in calls],
        "one pipeline request": lambda: raw.ask(pipeline),
    }
    for way in ways.values():
        latencies(way, count // 4)  # warm-up
    medians: dict[str, list[float]] = {name: [] for name in ways}
    for _ in range(rounds):
        for name, way in ways.items():
            medians[name].append(median(latencies(way, count)))
    raw.close()
    return {name: median(values) for name, values in medians.items()} | {"rounds": rounds, "count": count}


def stage(sock: str, rounds: int, count: int, experts: tuple[str, ...] = HEAVY) -> dict:
    raw = Raw(sock)
    ways = {
        "one expert": protocol.encode_call(1, experts[0], [DOCUMENT], {}),
        "one stage a+b+c": protocol.encode_pipeline(1, "+".join(experts), DOCUMENT),
        "three stages a,b,c": protocol.encode_pipeline(1, ",".join(experts), DOCUMENT),
    }
    pids: set[int] = set()

    def ask_stage() -> None:
        pids.update(raw.ask(ways["one stage a+b+c"])["opinions"].values())  # type: ignore[index]

    for frame in ways.values():
        for _ in range(5):
            raw.ask(frame)  # warm-up: each worker learns what the experts cost
    medians: dict[str, list[float]] = {name: [] for name in ways}
    for _ in range(rounds):
        for name, frame in ways.items():
            function = ask_stage if name == "one stage a+b+c" else (lambda frame=frame: raw.ask(frame))
            medians[name].append(median(latencies(function, count)))
    raw.close()
    return ({name: median(values) for name, values in medians.items()}
            | {"rounds": rounds, "count": count, "stage_pids": len(pids)})


def export_tree(ref: str, directory: Path) -> Path:
    tree = directory / f"tree-{ref}"
    tree.mkdir()
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", ref, "expertd"], capture_output=True, check=True)
    subprocess.run(["tar", "-x", "-C", str(tree)], input=archive.stdout, check=True)
    return tree


def cli_command(tree: Path, sock: str, *args: str) -> list[str]:
    code = f"import sys; sys.path.insert(0, {str(tree)!r}); from expertd.cli import main; sys.exit(main())"
    return [PYTHON, "-c", code, "--socket", sock, *args]


def lines(sock: str, old_tree: Path, documents: int, rounds: int, directory: Path) -> dict:
    source = directory / "documents.jsonl"
    with open(source, "w") as out:
        for n in range(documents):
            out.write(json.dumps({"n": n, "text": f"Document {n}: le texte est ICI" if n % 3 else f"plain {n}"}) + "\n")
    commands = {
        "today (one call per expert)": cli_command(old_tree, sock, "opinion", *CHEAP, "--lines"),
        "pipeline (one request per document)": cli_command(ROOT, sock, "opinion", *CHEAP, "--lines"),
    }
    rates: dict[str, list[float]] = {name: [] for name in commands}
    outputs: dict[str, list[str]] = {}
    for _ in range(rounds):
        for name, command in commands.items():
            with open(source) as stdin:
                started = time.perf_counter()
                done = subprocess.run(command, stdin=stdin, capture_output=True, text=True, timeout=900)
                elapsed = time.perf_counter() - started
            if done.returncode != 0:
                raise RuntimeError(f"{name}: exit {done.returncode}: {done.stderr[-2000:]}")
            rates[name].append(documents / elapsed)
            outputs[name] = done.stdout.splitlines()
    first, second = outputs.values()
    differ = sum(json.loads(a) != json.loads(b) for a, b in zip(first, second, strict=True))
    return {name: median(values) for name, values in rates.items()} | {
        "rounds": rounds, "documents": documents, "differ": differ, "each": rates}


def others_cpu(seconds: float = 1.0) -> float:
    """CPU seconds per second used by the machine meanwhile (a measure of its noise)."""
    before = psutil.cpu_times()
    time.sleep(seconds)
    after = psutil.cpu_times()
    return round((after.user + after.system - before.user - before.system) / seconds, 2)


def markdown(data: dict) -> str:
    rt, st, ln = data["round_trip"], data["stage"], data["lines"]
    us = 1e6
    ratio_rt = rt["one pipeline request"] / rt["one call"]
    ratio_st = st["one stage a+b+c"] / st["one expert"]
    ratio_ln = ln["pipeline (one request per document)"] / ln["today (one call per expert)"]
    out = [
        "# Pipelines: many experts on one document in one round trip",
        "",
        f"`python bench/pipelines.py{' --quick' if data['quick'] else ''}` (`make bench-pipelines`) on "
        f"{data['machine']}; Python {data['python']}; others' CPU before the run {data['others_cpu']} s/s. "
        "Medians over rounds alternating between the ways compared, in one run.",
        "",
        "## 1. Round trip: three cheap experts on one document (2 workers, one client)",
        "",
        "| way | latency (median) | / one call |",
        "|---|---|---|",
    ]
    for name in ("one call", "three calls", "one pipeline request"):
        out.append(f"| {name} | {rt[name] * us:.1f} µs | {rt[name] / rt['one call']:.2f}× |")
    out += ["", f"Target: the pipeline request ≤ 1.3× one call: **{ratio_rt:.2f}×**, {verdict(ratio_rt <= 1.3)}. "
            f"({rt['rounds']} rounds of {rt['count']} sequential requests.)", "",
            "## 2. A stage of three ~20 ms CPU experts (3 workers on this machine's cores, otherwise idle)", "",
            "| way | latency (median) | / one expert |", "|---|---|---|"]
    for name in ("one expert", "one stage a+b+c", "three stages a,b,c"):
        out.append(f"| {name} | {st[name] * 1000:.1f} ms | {st[name] / st['one expert']:.2f}× |")
    out += ["", f"The stage ran on {st['stage_pids']} distinct workers. Its latency is **{ratio_st:.2f}×** the "
            f"longest expert's and {st['one stage a+b+c'] / st['three stages a,b,c']:.2f}× the sum's. "
            f"On {data['cpus']} cores, three 20 ms experts need at least "
            f"{max(1.0, 3 / data['cpus']):.2f}× one expert's time whatever the daemon does.", "",
            "The same with experts that wait 20 ms instead of computing, which is what a machine with a core "
            "per expert would show:", "", "| way | latency (median) | / one expert |", "|---|---|---|"]
    sw = data["stage_waiting"]
    for name in ("one expert", "one stage a+b+c", "three stages a,b,c"):
        out.append(f"| {name} | {sw[name] * 1000:.1f} ms | {sw[name] / sw['one expert']:.2f}× |")
    out += ["", f"On {sw['stage_pids']} distinct workers: **{sw['one stage a+b+c'] / sw['one expert']:.2f}×** the "
            "longest expert's latency.", "",
            "## 3. `expertctl opinion a b c --lines` over "
            f"{ln['documents']:,} documents (2 workers)", "",
            "| CLI | documents/s (median) |", "|---|---|"]
    for name in ("today (one call per expert)", "pipeline (one request per document)"):
        out.append(f"| {name} | {ln[name]:,.0f} |")
    out += ["", f"Ratio **{ratio_ln:.2f}×** (target ≥ 2×: {verdict(ratio_ln >= 2)}); every output line equal: "
            f"{verdict(ln['differ'] == 0)} ({ln['differ']} differ). Today's CLI is `--old {data['old']}`'s, run "
            "against the same daemon.", ""]
    return "\n".join(out)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer, shorter rounds")
    parser.add_argument("--old", default=OLD_REF, help="the commit whose CLI is today's (default %(default)s)")
    parser.add_argument("--documents", type=int, default=10_000)
    parser.add_argument("--output", default=str(ROOT / "BENCHMARKS-pipelines.md"))
    options = parser.parse_args()
    rounds, count = (3, 300) if options.quick else (7, 1000)
    data = {"quick": options.quick, "old": options.old, "python": platform.python_version(),
            "machine": f"{platform.machine()}, {os.cpu_count()} CPUs", "cpus": os.cpu_count() or 1,
            "others_cpu": others_cpu()}
    with tempfile.TemporaryDirectory(prefix="expertd-bench-") as scratch, ExitStack():
        directory = Path(scratch)
        old_tree = export_tree(options.old, directory)
        with running(directory / "two", 2) as daemon:
            print("round trip ...", file=sys.stderr)
            data["round_trip"] = round_trip(daemon.sock, rounds, count)
            print("--lines ...", file=sys.stderr)
            data["lines"] = lines(daemon.sock, old_tree, options.documents, 2 if options.quick else 3, directory)
        with running(directory / "three", 3) as daemon:
            print("stage ...", file=sys.stderr)
            data["stage"] = stage(daemon.sock, rounds, count // 20)
            data["stage_waiting"] = stage(daemon.sock, rounds, count // 20, WAITING)
    report = markdown(data)
    print(report)
    Path(options.output).write_text(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
