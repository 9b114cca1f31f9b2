"""Dynamic batching: throughput and latency of batched experts, batching on against off.

    python bench/batching.py               # make bench-batching (and make bench), about 5 minutes
    python bench/batching.py --quick       # fewer, shorter rounds: 1–2 minutes
    python bench/batching.py --workers 2 --clients 16 --output /tmp/batching.md

Each daemon is ``python -m expertd --config FILE --socket SOCK --workers N``
(this Python's expertd, started outside the repository so that ``-m`` finds
the installed package) on a config written to a temporary directory, with one
intra/inter-op thread and a model cache that persists between runs
(bench/models/cache, git-ignored: only the first run prepares the models).
Batching on is the expert's default ``max_batch``; off is ``max_batch = 1``.
Both daemons of a part run side by side and are measured in alternating rounds
(off, on, off, on, …); the figures are medians over the rounds, and every
ratio compares figures of the same run.

1. The 192 MiB model expert (bench/models/mlp192.keras, ``make bench-model``;
   2048 float32 inputs per row), C concurrent callers (default 16), each a
   process with its own ``expertd.client.Client`` sending one row per call
   with ``Client.predict`` (numpy arrays as raw bytes on the wire, numpy
   back): calls/s, p50 and p99 latency.  Every caller's replies are checked
   against the batching-off daemon's answer for the same row, called alone.
   The batch's own time is what the batching-on daemon reports for its
   batches in each window (status: mean_batch_ms, hand-over to the last
   member's report); for comparison, the latency of one call carrying B rows
   (B = callers / workers) from a lone client to the batching-off daemon,
   measured in the same rounds, is shown too.
2. A lone caller (one client process, sequential one-row calls) on the same
   two daemons: p50 latency.
3. The shipped sentiment expert (``sentiment:opinion`` from examples/, a
   Python function around a small Keras model), C callers each sending
   documents of examples/sentiment/corpus.tsv: calls/s.  The batching-on
   daemon writes ``max_batch = 32`` (auto's value) explicitly, so that a
   daemon on which the function is not batched refuses the config, which is
   reported, instead of silently serving it unbatched.

Writes the report (markdown, also printed) to --output, default
BENCHMARKS-batching.md at the repository root, and the raw results as JSON
(bench/plots/batching-results.json for the default report, else next to it).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(BENCH))

import numpy as np  # noqa: E402
import psutil  # noqa: E402
from models import _version, median, spread, verdict, write_config  # noqa: E402

from expertd.client import Client  # noqa: E402

PYTHON = sys.executable
DEFAULT_MODEL = BENCH / "models" / "mlp192.keras"
DEFAULT_CACHE = BENCH / "models" / "cache"
WIDTH = 2048  # the model's input and output width
DEFAULT_MAX_BATCH = 32  # max_batch = auto
BATCH_DELAY_MS = 2.0  # batch_delay's default (not written in the configs)
BATCH_COLUMNS = ("Mean batch and mean queueing: calls per batch and the time a call waited in the daemon's "
                 "queue, from the daemon's status (`batches`) read at the window's start and end; n/a where it "
                 "reports none (batching off).")
BUSY_CPU = 0.25  # others' CPU s/s above which the report warns
RELATIVE_TOLERANCE = 1e-4  # of the output's largest magnitude, as the daemon's own check

QUICK = {"rounds": 3, "seconds": 4.0, "lone_seconds": 2.5, "compute_calls": 10, "warmup": 3}
FULL = {"rounds": 5, "seconds": 10.0, "lone_seconds": 5.0, "compute_calls": 20, "warmup": 5}

TARGETS = {"throughput": 4.0, "p99_compute": 1.5, "lone_p50": 1.1, "sentiment": 1.0}


# ----------------------------------------------------------------- daemons
class DaemonError(RuntimeError):
    """A daemon that did not start; the message holds its log's tail."""


class Daemon:
    """``python -m expertd --config FILE --socket SOCK --workers N``, ready ("expertd ready" in its log)."""

    def __init__(self, config: Path, workers: int, timeout: float) -> None:
        self.sock = str(config.parent / "expertd.sock")
        self.log_path = config.parent / "expertd.log"
        self.command = [PYTHON, "-m", "expertd", "--config", str(config), "--socket", self.sock,
                        "--workers", str(workers)]
        with open(self.log_path, "wb") as log:
            started = time.monotonic()
            # cwd: not the repository, whose expertd/ ``-m`` would otherwise find first; the daemon is the
            # expertd this Python has installed.
            self.proc = subprocess.Popen(self.command, stdout=log, stderr=log, stdin=subprocess.DEVNULL,
                                         cwd=config.parent)
        try:
            while "expertd ready" not in self.log():
                if self.proc.poll() is not None:
                    raise DaemonError(f"exited with status {self.proc.returncode}:\n" + self.log_tail())
                if time.monotonic() - started > timeout:
                    raise DaemonError(f"not ready after {timeout:.0f}s:\n" + self.log_tail())
                time.sleep(0.01)
        except BaseException:
            self.stop()
            raise
        self.ready_s = time.monotonic() - started

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def log_tail(self) -> str:
        return "\n".join(self.log().strip().splitlines()[-15:])

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def status(self) -> dict | None:
        try:
            with Client(self.sock, timeout=10) as client:
                return client.status()
        except Exception as exc:  # recorded, never needed
            return {"error": f"{type(exc).__name__}: {exc}"}


def start(stack: ExitStack, directory: Path, workers: int, experts: dict, timeout: float = 900,
          **settings: object) -> Daemon:
    config = write_config(directory, workers, experts, intra_op_threads=1, inter_op_threads=1, log_level="info",
                          **settings)
    running = Daemon(config, workers, timeout)
    stack.callback(running.stop)
    return running


def daemon_source() -> dict:
    """Which expertd the daemons run: this Python's, imported outside the repository, and its git state."""
    done = subprocess.run([PYTHON, "-c", "import expertd; print(expertd.__file__); print(expertd.__version__)"],
                          capture_output=True, text=True, cwd=tempfile.gettempdir(), timeout=60)
    lines = done.stdout.split()
    if done.returncode != 0 or len(lines) < 2:
        return {"package": "unknown", "error": done.stderr.strip()[-300:]}
    package = Path(lines[0]).parent
    source = {"package": str(package), "version": lines[1]}
    git = subprocess.run(["git", "-C", str(package.parent), "log", "-1", "--format=%h %s"],
                         capture_output=True, text=True)
    dirty = subprocess.run(["git", "-C", str(package.parent), "status", "--porcelain", "--untracked-files=no",
                            "--", "expertd"], capture_output=True, text=True)
    if git.returncode == 0:
        commit = git.stdout.strip()
        source["commit"] = commit if len(commit) <= 72 else commit[:71] + "…"
        source["dirty"] = bool(dirty.stdout.strip())
    return source


# ----------------------------------------------------------------- load
def mlp_rows(count: int) -> np.ndarray:
    """One row per caller, from a seeded generator: shape (count, 1, WIDTH)."""
    rng = np.random.default_rng(2048)
    return rng.standard_normal((count, 1, WIDTH), dtype=np.float32)


def corpus_documents() -> list[dict]:
    lines = (ROOT / "examples" / "sentiment" / "corpus.tsv").read_text(encoding="utf-8").splitlines()[1:]
    return [{"text": line.split("\t", 1)[1]} for line in lines if "\t" in line]


def _caller(spec: dict, index: int, barrier, results) -> None:
    """(A child process.)  One client: warm up, wait for the others, call for ``seconds``, report."""
    try:
        client = Client(spec["socket"], timeout=120)
        if spec["kind"] == "predict":
            x = mlp_rows(spec["callers"])[index]

            def call(_: int) -> tuple[object, object]:
                return index, client.predict(spec["expert"], x)
        else:
            documents = corpus_documents()

            def call(n: int) -> tuple[object, object]:
                document = documents[(index * 7 + n) % len(documents)]
                return document["text"], client.opinion(spec["expert"], document)
        for n in range(spec["warmup"]):
            call(n)
    except BaseException as exc:
        barrier.abort()
        results.put((index, None, 1, f"{type(exc).__name__}: {exc}", {}, 0.0))
        return
    try:
        barrier.wait(120)
    except Exception:  # another caller failed to start
        results.put((index, None, 0, None, {}, 0.0))
        return
    clock = time.perf_counter
    cpu = os.times()
    latencies: list[float] = []
    replies: dict = {}
    errors, example = 0, None
    deadline = clock() + spec["seconds"]
    n = 0
    while True:
        begin = clock()
        if begin >= deadline:
            break
        try:
            key, reply = call(n)
        except Exception as exc:
            errors += 1
            example = example or f"{type(exc).__name__}: {exc}"
            continue
        finally:
            n += 1
        end = clock()
        if end > deadline:  # finished after the window closed: not counted
            break
        latencies.append(end - begin)
        replies.setdefault(key, reply)
    after = os.times()
    results.put((index, latencies, errors, example, replies, after.user - cpu.user + after.system - cpu.system))


def _tree_cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process and all its descendants (those alive now)."""
    try:
        root = psutil.Process(pid)
        processes = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0.0
    total = 0.0
    for process in processes:
        try:
            times = process.cpu_times()
        except psutil.NoSuchProcess:
            continue
        total += times.user + times.system
    return total


def _busy_s() -> float:
    """CPU seconds the whole machine has spent busy (every CPU: all but idle and iowait)."""
    times = psutil.cpu_times()
    return sum(getattr(times, field, 0.0) for field in ("user", "nice", "system", "irq", "softirq", "steal"))


def _batch_figures(sock: str, expert: str) -> dict | None:
    """The daemon's batch counts for ``expert`` (``status()["batches"]``; None where the daemon has none)."""
    try:
        with Client(sock, timeout=10) as client:
            return client.status().get("batches", {}).get(expert)
    except Exception:
        return None


def _window_batches(before: dict | None, after: dict | None) -> dict | None:
    """Batches, calls, mean batch and mean queueing (ms) between two readings of :func:`_batch_figures`."""
    if not after:
        return None
    before = before or {"batches": 0, "calls": 0, "mean_queue_delay_ms": 0.0, "mean_batch_ms": 0.0}
    batches, calls = after["batches"] - before["batches"], after["calls"] - before["calls"]
    delay = after["mean_queue_delay_ms"] * after["calls"] - before["mean_queue_delay_ms"] * before["calls"]
    # The batch's own time in its worker (hand-over to its last member's report), over the window; weighted by
    # batches handed out, which differ from batches reported done by the few in hand at each reading.
    run = after.get("mean_batch_ms", 0.0) * after["batches"] - before.get("mean_batch_ms", 0.0) * before["batches"]
    return {"batches": batches, "calls": calls, "mean_batch": calls / batches if batches else None,
            "mean_queue_delay_ms": delay / calls if calls else None,
            "mean_batch_ms": run / batches if batches and "mean_batch_ms" in after else None}


def run_load(sock: str, expert: str, kind: str, callers: int, seconds: float, warmup: int,
             daemon_pid: int | None = None) -> dict:
    """``callers`` processes, closed loop, one connection each, all measured over the same ``seconds``.

    With ``daemon_pid``, also the CPU seconds per second of wall time that the daemon (master, generation
    parent, workers) and the callers used in the window.
    """
    context = multiprocessing.get_context("fork")
    barrier = context.Barrier(callers + 1)  # the callers, warmed up, and this process
    results = context.Queue()
    spec = {"socket": sock, "expert": expert, "kind": kind, "callers": callers, "seconds": seconds, "warmup": warmup}
    procs = [context.Process(target=_caller, args=(spec, i, barrier, results)) for i in range(callers)]
    for proc in procs:
        proc.start()
    latencies: list[float] = []
    errors, examples, replies, callers_cpu, daemon_cpu, machine_cpu, batches = 0, [], {}, 0.0, None, None, None
    try:
        try:
            barrier.wait(300)
        except Exception:  # broken: a caller failed before the window; its report says why
            pass
        else:
            if daemon_pid is not None:
                before, machine, begin = _tree_cpu_s(daemon_pid), _busy_s(), time.perf_counter()
                figures = _batch_figures(sock, expert)
                time.sleep(max(0.0, seconds - (time.perf_counter() - begin)))
                batches = _window_batches(figures, _batch_figures(sock, expert))
                wall = time.perf_counter() - begin
                daemon_cpu = (_tree_cpu_s(daemon_pid) - before) / wall
                machine_cpu = (_busy_s() - machine) / wall
        for _ in procs:
            _, some, failed, example, seen, cpu = results.get(timeout=seconds + 300)
            errors += failed
            if example:
                examples.append(example)
            if some is None:
                continue
            callers_cpu += cpu
            latencies += some
            for key, value in seen.items():
                replies.setdefault(key, value)
    finally:
        for proc in procs:
            proc.join(30)
            if proc.is_alive():
                proc.kill()
                proc.join()
    if not latencies:
        raise RuntimeError(f"no call succeeded ({errors} errors): {examples[:3]}")
    latencies.sort()

    def pct(q: float) -> float:
        return latencies[min(len(latencies) - 1, int(q * len(latencies)))] * 1000

    return {"calls": len(latencies), "errors": errors, "error_examples": examples[:3],
            "throughput": len(latencies) / seconds, "p50_ms": pct(0.5), "p90_ms": pct(0.9), "p99_ms": pct(0.99),
            "daemon_cpu": daemon_cpu, "callers_cpu": callers_cpu / seconds, "batches": batches,
            "others_cpu": None if machine_cpu is None else machine_cpu - daemon_cpu - callers_cpu / seconds,
            "replies": replies}


def sequential_ms(sock: str, expert: str, x: np.ndarray, calls: int, daemon_pid: int) -> tuple[list[float], float]:
    """One client's sequential ``predict`` calls of ``x``: each call's ms, and the CPU s/s others used meanwhile."""
    times = []
    own = psutil.Process()
    with Client(sock, timeout=120) as client:
        client.predict(expert, x)
        mine, machine, start_ = _tree_cpu_s(daemon_pid) + sum(own.cpu_times()[:2]), _busy_s(), time.perf_counter()
        for _ in range(calls):
            begin = time.perf_counter()
            client.predict(expert, x)
            times.append((time.perf_counter() - begin) * 1000)
        wall = time.perf_counter() - start_
        mine = _tree_cpu_s(daemon_pid) + sum(own.cpu_times()[:2]) - mine
    return times, (_busy_s() - machine - mine) / wall


# ----------------------------------------------------------------- parts
def _load(result: dict, daemons: dict, mode: str, *args: object) -> dict | None:
    """:func:`run_load` on ``daemons[mode]``; a batching-on daemon whose calls all fail is reported and dropped."""
    running = daemons[mode]
    try:
        return run_load(running.sock, *args, daemon_pid=running.proc.pid)
    except RuntimeError as exc:
        if mode == "off":
            raise
        result["on_error"] = f"failed in the run: {exc}\n{running.log_tail()}"
        print(f"batching on: {result['on_error']}\nmeasuring batching off alone from here", flush=True)
        del daemons[mode]
        return None


def measure_mlp(cfg: dict, workdir: Path, model: Path, cache: Path, workers: int, callers: int) -> dict:
    rows = callers // workers or 1
    result: dict = {"batch_rows": rows, "on": {"load": [], "lone": []},
                    "off": {"load": [], "lone": [], "compute": [], "compute_others_cpu": []},
                    "mismatches": 0, "max_rel_diff": 0.0}
    with ExitStack() as stack:
        print("model: starting the daemons (batching off: max_batch = 1; on: the default) ...", flush=True)
        daemons = {"off": start(stack, workdir / "mlp-off", workers, {"mlp": {"model": model, "max_batch": 1}},
                                model_cache=cache)}
        try:
            daemons["on"] = start(stack, workdir / "mlp-on", workers, {"mlp": {"model": model}}, model_cache=cache)
        except DaemonError as exc:
            result["on_error"] = f"did not start: {exc}"
            print(f"model, batching on: the daemon did not start; measuring batching off alone:\n{exc}", flush=True)
        x = mlp_rows(callers)
        with Client(daemons["off"].sock, timeout=120) as client:
            reference = [client.predict("mlp", row) for row in x]  # each row alone
        scale = max(float(np.max(np.abs(y))) for y in reference)
        batch = np.concatenate(list(x[:rows]))
        for round_ in range(cfg["rounds"]):
            for mode in ("off", "on"):
                if mode not in daemons:
                    continue
                print(f"model round {round_ + 1}/{cfg['rounds']}: batching {mode}, {callers} callers ...", flush=True)
                load = _load(result, daemons, mode, "mlp", "predict", callers, cfg["seconds"], cfg["warmup"])
                if load is None:
                    continue
                for index, y in load.pop("replies").items():
                    diff = float(np.max(np.abs(y - reference[index]))) / scale if y.shape == (1, WIDTH) else np.inf
                    result["max_rel_diff"] = max(result["max_rel_diff"], diff)
                    result["mismatches"] += diff > RELATIVE_TOLERANCE
                result[mode]["load"].append(load)
            for mode in ("off", "on"):
                if mode in daemons:
                    print(f"model round {round_ + 1}/{cfg['rounds']}: batching {mode}, a lone caller ...", flush=True)
                    lone = _load(result, daemons, mode, "mlp", "predict", 1, cfg["lone_seconds"], cfg["warmup"])
                    if lone is not None:
                        lone.pop("replies")
                        result[mode]["lone"].append(lone)
            print(f"model round {round_ + 1}/{cfg['rounds']}: compute time of {rows} rows (batching off) ...",
                  flush=True)
            times, others = sequential_ms(daemons["off"].sock, "mlp", batch, cfg["compute_calls"],
                                          daemons["off"].proc.pid)
            result["off"]["compute"] += times
            result["off"]["compute_others_cpu"].append(others)
        result["status"] = {mode: running.status() for mode, running in daemons.items()}
        result["ready_s"] = {mode: running.ready_s for mode, running in daemons.items()}
    return result


def measure_sentiment(cfg: dict, workdir: Path, cache: Path, workers: int, callers: int, function: str) -> dict:
    result: dict = {"function": function, "on": {"load": []}, "off": {"load": []}, "disagreements": 0}
    settings = {"pythonpath": ROOT / "examples", "model_cache": cache, "preload": "numpy"}
    with ExitStack() as stack:
        print(f"sentiment: starting the daemons ({function}; off: max_batch = 1; on: max_batch = "
              f"{DEFAULT_MAX_BATCH}) ...", flush=True)
        daemons = {"off": start(stack, workdir / "sent-off", workers,
                                {"sentiment": {"function": function, "max_batch": 1}}, **settings)}
        try:
            daemons["on"] = start(stack, workdir / "sent-on", workers,
                                  {"sentiment": {"function": function, "max_batch": DEFAULT_MAX_BATCH}}, **settings)
        except DaemonError as exc:
            result["on_error"] = f"did not start: {exc}"
            print(f"sentiment, batching on: the daemon did not start; measuring batching off alone:\n{exc}",
                  flush=True)
        with Client(daemons["off"].sock, timeout=60) as client:
            reference = {d["text"]: client.opinion("sentiment", d) for d in corpus_documents()}
        for round_ in range(cfg["rounds"]):
            for mode in [m for m in ("off", "on") if m in daemons]:
                print(f"sentiment round {round_ + 1}/{cfg['rounds']}: batching {mode}, {callers} callers ...",
                      flush=True)
                load = _load(result, daemons, mode, "sentiment", "opinion", callers, cfg["seconds"], cfg["warmup"])
                if load is None:
                    continue
                result["disagreements"] += sum(reply != reference[text] for text, reply in load.pop("replies").items())
                result[mode]["load"].append(load)
        result["status"] = {mode: running.status() for mode, running in daemons.items()}
    return result


# ----------------------------------------------------------------- report
def _figure(loads: list[dict], key: str) -> list[float]:
    return [load[key] for load in loads]


def _med(loads: list[dict], key: str) -> float:
    return median(_figure(loads, key)) if loads else float("nan")


def _batch_stat(loads: list[dict], key: str, digits: int = 1) -> str:
    """A figure of the daemon's batch counts over the windows (n/a where the daemon reports none)."""
    values = [load["batches"][key] for load in loads if load.get("batches") and load["batches"][key] is not None]
    return spread(values, digits) if values else "n/a"


def markdown(data: dict) -> str:
    mlp, sentiment = data.get("mlp"), data.get("sentiment")
    workers, callers, cfg = data["workers"], data["callers"], data["config"]
    source = data["daemon"]
    versions = {name: _version(name) for name in ("tensorflow-cpu", "ai-edge-litert", "numpy", "msgpack")}
    state = (f"commit {source['commit']}{', with uncommitted changes under expertd/' if source.get('dirty') else ''}"
             if "commit" in source else "not a git checkout")
    out = [
        "# expertd dynamic batching: benchmark",
        "",
        f"Generated by `{data['command']}` (bench/batching.py; `make bench-batching`) on "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime(data['finished']))} in {data['elapsed_s']:.0f} s.",
        "",
        f"- machine: `nproc` = {data['nproc']} ({platform.platform()}, {platform.machine()}, "
        f"{psutil.virtual_memory().total / 2**30:.0f} GiB memory); a shared machine: read the ratios, measured "
        "side by side, rather than absolute figures",
        f"- daemon: `python -m expertd --config FILE --socket SOCK --workers {workers}`, "
        f"expertd {source.get('version')} from `{source['package']}` ({state}); Python {platform.python_version()}; "
        + ", ".join(f"{k} {v}" for k, v in versions.items()),
        f"- every daemon: {workers} workers, `intra_op_threads = 1`, `inter_op_threads = 1`; batching off is "
        f"`max_batch = 1`, on is the default (`auto` = {DEFAULT_MAX_BATCH}) with the default "
        f"`batch_delay` ({BATCH_DELAY_MS:g} ms)",
        f"- callers: processes with one `expertd.client.Client` each, closed loop, all measured over the same "
        f"{cfg['seconds']:g} s window ({cfg['lone_seconds']:g} s for the lone caller) after {cfg['warmup']} warm-up "
        f"calls; {cfg['rounds']} rounds, batching off then on in each; medians over the rounds (min–max)",
    ]
    others = [load["others_cpu"] for part in (mlp, sentiment) if part for mode in ("on", "off")
              for kind in ("load", "lone") for load in part[mode].get(kind, []) if load.get("others_cpu") is not None]
    if others and median(others) > BUSY_CPU:
        out.append(f"- **the machine was busy with other work**: other processes used {median(others):.2f} CPU s/s "
                   f"(median over the windows; up to {max(others):.2f}) of the {data['nproc']} there are, so every "
                   "figure here had less CPU than the machine has; rerun on a quiet machine before reading the "
                   "verdicts")
    out.append("")
    rows: list[str] = []
    if mlp:
        off, on = mlp["off"], mlp["on"]
        compute = median(off["compute"])
        runs = [load["batches"]["mean_batch_ms"] for load in on["load"]
                if load.get("batches") and load["batches"].get("mean_batch_ms")]
        own = median(runs) if runs else compute  # the batch's own time in the run (else: alone, if not reported)
        bound = TARGETS["p99_compute"] * own + BATCH_DELAY_MS
        if on["load"]:
            ratio = _med(on["load"], "throughput") / _med(off["load"], "throughput")
            p99 = _med(on["load"], "p99_ms")
            lone_ratio = _med(on["lone"], "p50_ms") / _med(off["lone"], "p50_ms")
            rows += [
                f"| model, {callers} callers: calls/s on ≥ {TARGETS['throughput']:g}× off | "
                f"{_med(on['load'], 'throughput'):.0f} vs {_med(off['load'], 'throughput'):.0f} = {ratio:.2f}× "
                f"| {verdict(ratio >= TARGETS['throughput'])} |",
                f"| model, {callers} callers: p99 on ≤ {TARGETS['p99_compute']:g} × the batch's own time + "
                f"batch_delay | {p99:.1f} ms vs {TARGETS['p99_compute']:g} × {own:.1f} + {BATCH_DELAY_MS:g} "
                f"= {bound:.1f} ms | {verdict(p99 <= bound)} |",
                f"| (for comparison, not a target: p99 on vs 1.5 × one call of {mlp['batch_rows']} rows alone + "
                f"batch_delay) | {p99:.1f} ms vs {TARGETS['p99_compute']:g} × {compute:.1f} + {BATCH_DELAY_MS:g} = "
                f"{TARGETS['p99_compute'] * compute + BATCH_DELAY_MS:.1f} ms | "
                f"{'within' if p99 <= TARGETS['p99_compute'] * compute + BATCH_DELAY_MS else 'over'} |",
                f"| model, a lone caller: p50 on ≤ {TARGETS['lone_p50']:g}× off | {_med(on['lone'], 'p50_ms'):.2f} ms "
                f"vs {_med(off['lone'], 'p50_ms'):.2f} ms = {lone_ratio:.3f}× "
                f"| {verdict(lone_ratio <= TARGETS['lone_p50'])} |",
            ]
        else:
            rows.append("| model: batching on | no figures: the daemon failed (below) | n/a |")
    if sentiment:
        if sentiment["on"]["load"]:
            on_t, off_t = _med(sentiment["on"]["load"], "throughput"), _med(sentiment["off"]["load"], "throughput")
            rows.append(f"| sentiment, {callers} callers: calls/s on ≥ off | {on_t:.0f} vs {off_t:.0f} = "
                        f"{on_t / off_t:.2f}× | {verdict(on_t >= TARGETS['sentiment'] * off_t)} |")
        else:
            rows.append("| sentiment: batching on | no figures: the daemon failed (below) | n/a |")
    if mlp:
        rows.append(f"| model replies match the batching-off daemon's, each row alone (within "
                    f"{RELATIVE_TOLERANCE:g} of the largest output) | largest difference "
                    f"{mlp['max_rel_diff']:.1g}; {mlp['mismatches']} mismatched | {verdict(mlp['mismatches'] == 0)} |")
    if sentiment and sentiment["on"]["load"]:
        rows.append(f"| sentiment opinions equal the batching-off daemon's | {sentiment['disagreements']} differ "
                    f"| {verdict(sentiment['disagreements'] == 0)} |")
    errors = sum(load["errors"] for part in (mlp, sentiment) if part for mode in ("on", "off")
                 for kind in ("load", "lone") for load in part[mode].get(kind, []))
    rows.append(f"| no call failed | {errors} errors | {verdict(errors == 0)} |")
    out += [f"## Targets ({workers} workers)", "", "| target | measured | |", "| --- | --- | --- |", *rows]

    if mlp:
        off, on = mlp["off"], mlp["on"]
        out += ["", f"## Model expert: {callers} callers", "",
                f"`{data['model']}` (bench/make_mlp.py: 2048 → 4096 → 4096 → 4096 → 2048, float32, 192 MiB of "
                f"weights). Each call: `Client.predict(\"mlp\", x)` with x one float32 row of {WIDTH} (numpy "
                "arrays as raw bytes on the wire, docs/protocol.md \"Arrays\"; numpy back), the same in both "
                "modes; each caller its own seeded row. CPU s/s: CPU seconds (user + system, every thread) that "
                "the daemon's processes (master, generation parent, workers) and the caller processes used per "
                "second of the window, and what the rest of the machine used meanwhile (its busy time, steal "
                f"included, less the two); the machine has {data['nproc']} to give. {BATCH_COLUMNS}", "",
                "| batching | calls/s | p50 ms | p90 ms | p99 ms | calls per round | mean batch | mean queueing ms "
                "| daemon CPU s/s | callers' CPU s/s | others' CPU s/s |",
                "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for mode in ("off", "on"):
            loads = mlp[mode]["load"]
            if loads:
                out.append(f"| {mode} | {spread(_figure(loads, 'throughput'), 0)} | {spread(_figure(loads, 'p50_ms'))} "
                           f"| {spread(_figure(loads, 'p90_ms'))} | {spread(_figure(loads, 'p99_ms'))} "
                           f"| {spread(_figure(loads, 'calls'), 0)} | {_batch_stat(loads, 'mean_batch')} "
                           f"| {_batch_stat(loads, 'mean_queue_delay_ms')} | {spread(_figure(loads, 'daemon_cpu'), 2)} "
                           f"| {spread(_figure(loads, 'callers_cpu'), 2)} "
                           f"| {spread(_figure(loads, 'others_cpu'), 2)} |")
        if on["load"]:
            pairs = [b["throughput"] / a["throughput"] for a, b in zip(off["load"], on["load"], strict=False)]
            out += ["", "calls/s on / off, round by round: " + ", ".join(f"{p:.2f}×" for p in pairs) + "."]
        compute = off["compute"]
        out += ["", "The batch's own time: what the batching-on daemon reports for its batches over each window "
                "(`status()[\"batches\"]`, mean_batch_ms: from a batch's hand-over to its last member's report, "
                "in the worker, while the other worker runs its own batch on the same 2 cores): "
                f"{_batch_stat(on['load'], 'mean_batch_ms', 2)} ms; the p99 bound is "
                f"{TARGETS['p99_compute']:g} × its median + {BATCH_DELAY_MS:g} ms. For comparison, one call "
                f"carrying B = {mlp['batch_rows']} rows (B = {callers} callers / {workers} workers) from a lone "
                "client to the batching-off daemon, with no other batch running, round trip: "
                f"{spread(compute, 2, ' ms')} over {len(compute)} calls (others' CPU meanwhile: "
                f"{spread(off['compute_others_cpu'], 2, ' s/s')}). The mean batch the batching-on daemon reported "
                f"over its windows: {_batch_stat(on['load'], 'mean_batch')}.",
                "", "## Model expert: a lone caller", "",
                "One caller process, sequential one-row calls, on the same two daemons.", "",
                "| batching | p50 ms | p99 ms | calls/s | others' CPU s/s |", "| --- | --- | --- | --- | --- |"]
        for mode in ("off", "on"):
            loads = mlp[mode]["lone"]
            if loads:
                out.append(f"| {mode} | {spread(_figure(loads, 'p50_ms'), 2)} | {spread(_figure(loads, 'p99_ms'), 2)} "
                           f"| {spread(_figure(loads, 'throughput'), 1)} | {spread(_figure(loads, 'others_cpu'), 2)} |")
        if "on_error" in mlp:
            out += ["", "The batching-on daemon:", "", "```", mlp["on_error"], "```"]

    if sentiment:
        out += ["", f"## Sentiment expert: {callers} callers", "",
                f"`{sentiment['function']}` (examples/sentiment: tokenise, a small Keras model on LiteRT, an "
                "opinion), `client.opinion(\"sentiment\", document)` with the documents of "
                "examples/sentiment/corpus.tsv, each caller from its own offset. Batching on writes "
                f"`max_batch = {DEFAULT_MAX_BATCH}` (auto's value) so that a daemon on which the function is not "
                f"batched refuses it instead of serving it unbatched. {BATCH_COLUMNS}", ""]
        if sentiment["on"]["load"] or sentiment["off"]["load"]:
            out += ["| batching | calls/s | p50 ms | p99 ms | mean batch | mean queueing ms | daemon CPU s/s "
                    "| callers' CPU s/s | others' CPU s/s |",
                    "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
            for mode in ("off", "on"):
                loads = sentiment[mode]["load"]
                if loads:
                    out.append(f"| {mode} | {spread(_figure(loads, 'throughput'), 0)} "
                               f"| {spread(_figure(loads, 'p50_ms'), 2)} | {spread(_figure(loads, 'p99_ms'), 2)} "
                               f"| {_batch_stat(loads, 'mean_batch')} | {_batch_stat(loads, 'mean_queue_delay_ms', 2)} "
                               f"| {spread(_figure(loads, 'daemon_cpu'), 2)} "
                               f"| {spread(_figure(loads, 'callers_cpu'), 2)} "
                               f"| {spread(_figure(loads, 'others_cpu'), 2)} |")
        if "on_error" in sentiment:
            out += ["", "The batching-on daemon:", "", "```", sentiment["on_error"], "```"]
    return "\n".join(out)


def _shown(path: str) -> str:
    """A path as typed from the repository root, when it lies inside it."""
    resolved = Path(path).absolute()
    return str(resolved.relative_to(Path.cwd())) if resolved.is_relative_to(Path.cwd()) else path


# ----------------------------------------------------------------- main
def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer, shorter rounds (1–2 minutes)")
    parser.add_argument("--workers", type=int, default=2, help="workers per daemon (default 2)")
    parser.add_argument("--clients", type=int, default=16, help="concurrent callers (default 16)")
    parser.add_argument("--model", default=str(DEFAULT_MODEL), help="the .keras file (make bench-model makes it)")
    parser.add_argument("--model-cache", default=str(DEFAULT_CACHE), help="the daemons' model_cache (kept)")
    parser.add_argument("--sentiment-function", default="sentiment:opinion", help="module:function in examples/")
    parser.add_argument("--skip", choices=["model", "sentiment"], action="append", default=[],
                        help="leave a part out")
    parser.add_argument("--output", default=str(ROOT / "BENCHMARKS-batching.md"),
                        help="the markdown report; raw results go next to it as .json")
    options = parser.parse_args()
    cfg = QUICK if options.quick else FULL
    model = Path(options.model).absolute()
    if "model" not in options.skip and not model.exists():
        parser.error(f"{model} does not exist: run 'make bench-model' (bench/make_mlp.py) first")
    cache = Path(options.model_cache).resolve()
    cache.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    workdir = Path(tempfile.mkdtemp(prefix="xdbatch-", dir="/tmp"))
    data: dict = {"config": cfg, "quick": options.quick, "workers": options.workers, "callers": options.clients,
                  "nproc": len(os.sched_getaffinity(0)), "cpu_count": os.cpu_count(),
                  "command": shlex.join([_shown(PYTHON), _shown(sys.argv[0]), *sys.argv[1:]]),
                  "daemon": daemon_source(),
                  "model": str(model.relative_to(ROOT)) if model.is_relative_to(ROOT) else str(model)}
    print(f"daemon: expertd from {data['daemon']['package']} ({data['daemon'].get('commit', '')}"
          f"{', dirty' if data['daemon'].get('dirty') else ''})", flush=True)
    try:
        if "model" not in options.skip:
            data["mlp"] = measure_mlp(cfg, workdir, model, cache, options.workers, options.clients)
        if "sentiment" not in options.skip:
            data["sentiment"] = measure_sentiment(cfg, workdir, cache, options.workers, options.clients,
                                                  options.sentiment_function)
    except (DaemonError, RuntimeError) as exc:  # a batching-off daemon did not start, or no call succeeded
        print(f"bench/batching.py: {exc}", file=sys.stderr)
        return 1
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    data["finished"] = time.time()
    data["elapsed_s"] = time.monotonic() - started
    text = markdown(data)
    output = Path(options.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(text + "\n")
    default = output.resolve() == (ROOT / "BENCHMARKS-batching.md").resolve()
    raw = BENCH / "plots" / "batching-results.json" if default else output.with_suffix(".json")
    raw.write_text(json.dumps(data, indent=1, default=str) + "\n")
    print()
    print(text)
    print()
    print(f"wrote {output} and {raw} in {data['elapsed_s']:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
