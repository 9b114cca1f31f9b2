"""Instructions a worker runs per request, counted by callgrind: a figure the shared machine's noise cannot move.

    python bench/instructions.py               # this tree: a call, a pipeline request of three cheap experts
    python bench/instructions.py --ref c439e1b # the same, for another commit too (exported to a scratch tree)

Wall-clock timings of a few microseconds swing by a third on a shared
2-core machine (bench/hotpath.py); instruction counts do not.  Each row runs
the worker's own code for one msgpack request (``Worker._answer`` and the
book-keeping after it, as bench/hotpath.py does) N times under
``valgrind --tool=callgrind`` and once with N = 0, and prints the difference
divided by N.  Counts are not time (a cache miss costs more than an add), so
compare them only with each other: before and after a change, or a pipeline
against a call.  Needs valgrind; not part of ``make test`` or ``make bench``.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
REQUESTS = 2000
WAYS = {
    "call: one document expert (language)": ("call", False),
    "pipeline: three cheap experts (language,length,shout), up to the reply": ("pipeline", False),
    "pipeline: the same, with its counting after the reply": ("pipeline", True),
}

# Run in the tree measured (its own expertd, bench/hotpath.py and bench/pipeline_experts.py).
_CHILD = r"""
import os, sys
sys.path[:0] = [os.getcwd(), os.path.join(os.getcwd(), "bench")]
os.environ.setdefault("EXPERTD_LOG_LEVEL", "warning")
import msgpack, socket, tempfile
from pathlib import Path
from expertd import protocol
from expertd.config import load_config
from expertd.loader import load_experts
from expertd.metrics import Metrics
from expertd.scoreboard import Scoreboard
from expertd.worker import Worker
from hotpath import _Socket
kind, counted, count = sys.argv[1], sys.argv[2] == "1", int(sys.argv[3])
directory = Path(tempfile.mkdtemp())
lines = ["[expertd]", "pythonpath = " + os.path.join(os.getcwd(), "bench"), "preload ="]
for name in ("language", "length", "shout"):
    lines += ["[expert:%s]" % name, "function = pipeline_experts:%s" % name]
(directory / "c.conf").write_text("\n".join(lines) + "\n")
config = load_config(str(directory / "c.conf"))
experts = load_experts(config)
channel, _other = socket.socketpair()
worker = Worker(1, config, experts, channel, Scoreboard(4), 1, Metrics(4, experts).recorder(1))
if not counted and hasattr(worker, "_count_pipeline"):
    worker._count_pipeline = lambda *args: worker._ran.clear()
document = {"id": 1, "text": "Hello there, is le monde OK today?"}
if kind == "call":
    body = memoryview(bytearray(msgpack.packb(["language", [document], {}])))
    request_kind = protocol.CALL
else:
    body = memoryview(bytearray(msgpack.packb(["language,length,shout", document])))
    request_kind = protocol.PIPELINE
conn = _Socket()
def request():
    worker._answer(conn, request_kind, 7, body)
    worker._after_request()
    worker._may_linger()
for _ in range(3):  # (warm: plans made, first-call paths taken)
    request()
for _ in range(count):
    request()
"""


def instructions(tree: Path, kind: str, counted: bool, count: int) -> int:
    done = subprocess.run(["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null", sys.executable, "-c",
                           _CHILD, kind, "1" if counted else "0", str(count)],
                          cwd=tree, capture_output=True, text=True, check=True)
    found = re.search(r"Collected : ([\d,]+)", done.stderr)
    if found is None:
        raise RuntimeError(f"callgrind said no total:\n{done.stderr[-2000:]}")
    return int(found.group(1).replace(",", ""))


def per_request(tree: Path, kind: str, counted: bool) -> float:
    return (instructions(tree, kind, counted, REQUESTS) - instructions(tree, kind, counted, 0)) / REQUESTS


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ref", help="also measure this commit (exported to a temporary tree)")
    options = parser.parse_args()
    if shutil.which("valgrind") is None:
        print("bench/instructions.py needs valgrind (apt install valgrind)", file=sys.stderr)
        return 2
    trees = {"this tree": ROOT}
    with tempfile.TemporaryDirectory(prefix="expertd-instructions-") as scratch:
        if options.ref:
            exported = Path(scratch) / "ref"
            exported.mkdir()
            archive = subprocess.run(["git", "-C", str(ROOT), "archive", options.ref], capture_output=True, check=True)
            subprocess.run(["tar", "-x", "-C", str(exported)], input=archive.stdout, check=True)
            trees = {options.ref: exported, **trees}
        print("| request | " + " | ".join(trees) + " |")
        print("| --- |" + " ---: |" * len(trees))
        for label, (kind, counted) in WAYS.items():
            row = [f"{per_request(tree, kind, counted):,.0f}" for tree in trees.values()]
            print(f"| {label} | " + " | ".join(row) + " |", flush=True)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONDONTWRITEBYTECODE", "1")
    sys.exit(main())
