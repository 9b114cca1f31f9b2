"""`expertctl opinion --lines a b c` before and after pipelines (issue #16: at least 2x the documents/s).

    python bench/pipeline_lines.py [--before REF] [--documents 10000] [--rounds 3] [--workers 2] [--jobs 4]

Starts one daemon from this tree (``--workers`` workers) on three cheap,
unbatched experts (the example ``keywords`` and ``textstats``, and the tests'
``language``).  Each round streams the same JSON Lines through
``expertctl opinion --lines --jobs N keywords textstats language`` of REF
(exported with git archive, or a directory holding an exported tree; default:
the commit before the pipeline faces, where that command made one call per
expert per document on N threads) and of this tree (one PIPELINE request per
document, several in flight on each connection).  Both outputs must be
identical.  Prints the median documents/s of each and the ratio.
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

from conftest import TEST_EXPERTS, Daemon, write_config  # noqa: E402

EXPERTS = {"keywords": "keywords:opinion", "textstats": "textstats:opinion", "language": "docexperts:language"}


def documents(count: int) -> bytes:
    import json

    texts = [line.split("\t")[-1].strip() for line in (ROOT / "examples" / "sentiment" / "corpus.tsv").open()]
    texts = [text for text in texts if text]
    return "".join(json.dumps({"id": n, "text": texts[n % len(texts)]}) + "\n" for n in range(count)).encode()


def run_lines(tree: Path, socket: Path, stdin: bytes, jobs: str) -> tuple[float, bytes]:
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "expertd.cli", "--socket", str(socket), "opinion", "--lines",
                           "--jobs", jobs, *EXPERTS], input=stdin, capture_output=True, check=True,
                          env={"PYTHONPATH": str(tree), "PATH": "/usr/bin:/bin"}, cwd="/")
    return time.perf_counter() - started, done.stdout


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--before", default="0cb11c7", help="the commit (or exported tree) to compare with")
    parser.add_argument("--documents", type=int, default=10000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--jobs", default="4")
    options = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="xd-", dir="/tmp") as directory:
        directory = Path(directory)
        before = export(options.before, directory)
        config = write_config(directory, EXPERTS, pythonpath=f"{ROOT / 'examples'} {TEST_EXPERTS}")
        daemon = Daemon(config, directory / "d.sock", workers=options.workers).start()
        stdin = documents(options.documents)
        rates: dict[str, list[float]] = {"before": [], "after": []}
        try:
            for _ in range(options.rounds):
                outputs = {}
                for label, tree in (("before", before), ("after", ROOT)):
                    seconds, outputs[label] = run_lines(tree, daemon.socket, stdin, options.jobs)
                    rates[label].append(options.documents / seconds)
                if outputs["before"] != outputs["after"]:
                    raise SystemExit("the outputs differ")
        finally:
            daemon.kill()
    a, b = statistics.median(rates["before"]), statistics.median(rates["after"])
    print(f"{options.documents} documents through {', '.join(EXPERTS)}; --jobs {options.jobs}, {options.workers} "
          f"workers; median of {options.rounds} rounds (documents/s)\n")
    print(f"| before ({options.before}) | after | after/before |")
    print("| --- | --- | --- |")
    print(f"| {a:,.0f} | {b:,.0f} | {b / a:.2f}× |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
