"""`expertctl opinion --lines` before and after it sent batched experts windows of documents (MAP requests).

    python bench/opinion_lines.py [--before REF] [--documents 20000] [--rounds 3] [--workers 2]

Starts one daemon from this tree (``--workers`` workers) on three experts:
the example ``sentiment`` (batched: one model run per list of documents),
``text_length`` (batched, next to nothing per document: per-request costs
show) and the example ``keywords`` (not batched: both versions send it one
call per document).  Each round streams the same JSON Lines through each
version's ``expertctl opinion --lines --jobs 4``: REF's (exported with git
archive, or a directory holding an exported tree; default: the commit before
MAP requests) and this tree's.  Both outputs must be identical.
Prints the median documents/s of each and the ratio.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "tests"))

from ab import export  # noqa: E402

from conftest import Daemon, write_config  # noqa: E402

EXPERTS = {
    "sentiment": "sentiment:opinion",
    "text_length": "batched_experts:text_length",
    "keywords": "keywords:opinion",
}


def documents(count: int) -> bytes:
    import json

    texts = [line.split("\t")[-1].strip() for line in (ROOT / "examples" / "sentiment" / "corpus.tsv").open()]
    texts = [text for text in texts if text]
    return "".join(json.dumps({"id": n, "text": texts[n % len(texts)]}) + "\n" for n in range(count)).encode()


def run_lines(tree: Path, socket: Path, expert: str, stdin: bytes, options: list[str]) -> tuple[float, bytes]:
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "expertd.cli", "--socket", str(socket), "opinion", "--lines",
                           *options, expert], input=stdin, capture_output=True, check=True,
                          env={"PYTHONPATH": str(tree), "PATH": "/usr/bin:/bin"}, cwd="/")
    return time.perf_counter() - started, done.stdout


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--before", default="83c5df9", help="the commit (or exported tree) to compare with")
    parser.add_argument("--documents", type=int, default=20000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--jobs", default="4")
    options = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="xd-", dir="/tmp") as directory:
        directory = Path(directory)
        before = export(options.before, directory)
        config = write_config(directory, EXPERTS, pythonpath=f"{ROOT / 'bench'} {ROOT / 'examples'}")
        daemon = Daemon(config, directory / "d.sock", workers=options.workers).start()
        stdin = documents(options.documents)
        try:
            print(f"{options.documents} documents, --jobs {options.jobs}, {options.workers} workers; "
                  f"median of {options.rounds} rounds (documents/s)\n")
            print(f"| expert | before ({options.before}) | after | after/before |")
            print("| --- | --- | --- | --- |")
            for expert in EXPERTS:
                rates: dict[str, list[float]] = {"before": [], "after": []}
                for _ in range(options.rounds):
                    outputs = {}
                    for label, tree in (("before", before), ("after", ROOT)):
                        seconds, outputs[label] = run_lines(tree, daemon.socket, expert, stdin,
                                                            ["--jobs", options.jobs])
                        rates[label].append(options.documents / seconds)
                    if outputs["before"] != outputs["after"]:
                        raise SystemExit(f"{expert}: the outputs differ")
                a, b = statistics.median(rates["before"]), statistics.median(rates["after"])
                print(f"| {expert} | {a:,.0f} | {b:,.0f} | {b / a:.2f}× |")
        finally:
            daemon.kill()
    return 0


if __name__ == "__main__":
    sys.exit(main())
