"""expertd against the model servers users would pick instead: gunicorn's dirty arbiters and Ray Serve.

    make bench-peers                         # the peers' venvs, then this: about 25 minutes on 2 cores
    python bench/peers.py --quick            # one short round: a smoke run
    python bench/peers.py --systems expertd,gunicorn --rounds 1
    python bench/peers.py --render bench/plots/peers-results.json   # only rewrite the section and plots

Every server serves the same model, bench/models/mlp192.keras (bench/make_mlp.py: a 192 MiB float32 MLP,
2048 → 4096 → 4096 → 4096 → 2048), with 2 model workers of one TensorFlow thread each (one intra-op, one
inter-op), on this machine's cores:

- expertd, the model as a model expert (config only), batching off (``max_batch = 1``) and on (the default);
  called over HTTP (``POST /call/mlp``, JSON) and with its Python client on its Unix socket;
- gunicorn 27's dirty arbiters (bench/peers/gunicorn/), Keras in a ``tf.function`` in each dirty worker;
- Ray Serve (bench/peers/ray/): its default proxy and its HAProxy mode, each with and without
  ``@serve.batch``, Keras in a ``tf.function`` in each replica.

The peers take rows as raw float32 bytes (``POST /predict``), the cheapest body they can have; expertd's
HTTP API takes JSON.  In rounds, the systems one after the other (each started, measured, stopped, so no
idle server weighs on another's figures), every round in the same order: start to first answer; 1, 8 and
16 concurrent single-row callers (bench/peer_load.py: processes, one kept-alive connection each, one shared
window), whose one-caller window is the batch-1 latency; the trivial function over HTTP; memory with the
model workers warm; reload to first answer from a new worker.  Then memory by model workers (1, 2, 4), one
start each.  Every model reply is checked against the model's output computed in numpy.

Writes its section of BENCHMARKS.md (bench/sections.py: the rest is bench/compare.py's), the plots
bench/plots/peers_items_by_clients.png and peers_memory_by_workers.png, and the raw figures in
bench/plots/peers-results.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
sys.path.insert(0, str(BENCH))
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import peer_load  # noqa: E402
import peer_report  # noqa: E402
import psutil  # noqa: E402
from peer_servers import Expertd, Peer, installed_versions, measure_reload, peer_python  # noqa: E402

MODEL = BENCH / "models" / "mlp192.keras"
RESULTS = BENCH / "plots" / "peers-results.json"
QUICK = {"rounds": 1, "seconds": 3.0, "square_seconds": 1.0, "clients": [1, 8, 16], "memory_workers": [1, 2, 4],
         "keras_seconds": 3.0, "reload_wait": 60}
FULL = {"rounds": 2, "seconds": 4.0, "square_seconds": 2.0, "clients": [1, 8, 16], "memory_workers": [1, 2, 4],
        "keras_seconds": 5.0, "reload_wait": 60}
WORKERS = 2
TOLERANCE = 1e-3  # (LiteRT's and TensorFlow's float32 sums differ from numpy's in the 5th digit)


def systems(cache: Path) -> dict:
    return {s.key: s for s in [
        Expertd(False, MODEL, cache), Expertd(True, MODEL, cache), Expertd(True, MODEL, cache, threads=2),
        Peer("gunicorn", None, "gunicorn 27 dirty arbiters", MODEL),
        Peer("ray", "default", "Ray Serve", MODEL),
        Peer("ray", "haproxy", "Ray Serve, HAProxy mode", MODEL),
        Peer("ray", "batch", "Ray Serve + @serve.batch", MODEL),
        Peer("ray", "haproxy-batch", "Ray Serve, HAProxy mode + @serve.batch", MODEL),
        Peer("ray", "haproxy-batch", "Ray Serve, HAProxy mode + @serve.batch, 1 replica × 2 threads", MODEL,
             threads=2),
    ]}


# (Ray's HAProxy mode adds its manager and haproxy, about 90 MiB: the 2-worker table has it; each Ray start
# costs half a minute)
MEMORY_SYSTEMS = ["expertd-batching", "gunicorn", "ray"]


def reference(count: int = 16) -> np.ndarray:
    """The model's output for every caller's row, in numpy from the generator's own weights."""
    import make_mlp

    weights = make_mlp.weights()
    h = peer_load.rows(count).astype(np.float64)
    for i in range(0, len(weights), 2):
        h = h @ weights[i] + weights[i + 1]
        if i + 2 < len(weights):
            h = np.maximum(h, 0.0)
    return h


def check(replies: dict, expected: np.ndarray) -> tuple[float, int]:
    """(largest difference, mismatched replies) of callers' first replies against the numpy output."""
    worst, bad = 0.0, 0
    for index, reply in replies.items():
        got = np.asarray(reply, dtype=np.float64).reshape(-1)
        want = expected[index]
        if got.shape != want.shape:
            bad += 1
            continue
        diff = float(np.max(np.abs(got - want)))
        worst = max(worst, diff)
        bad += diff > TOLERANCE * max(1.0, float(np.max(np.abs(want))))
    return worst, bad


def keras_baseline(seconds: float) -> dict:
    """The model in a ``tf.function`` in one process, no server: sequential batch-1 calls (a child process)."""
    done = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--keras-baseline", str(seconds)],
                          capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def _keras_baseline_main(seconds: float) -> int:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import keras
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(1)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    model = keras.saving.load_model(str(MODEL))
    predict = tf.function(model, input_signature=[tf.TensorSpec([None, 2048], tf.float32)])
    x = peer_load.rows(1)
    for _ in range(5):
        predict(x).numpy()
    times = []
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        begin = time.perf_counter()
        predict(x).numpy()
        times.append((time.perf_counter() - begin) * 1000)
    times.sort()
    info = psutil.Process().memory_full_info()
    print(json.dumps({"p50_ms": statistics.median(times), "p99_ms": times[min(len(times) - 1, int(0.99 * len(times)))],
                      "calls": len(times), "uss": info.uss / 2**20, "pss": info.pss / 2**20, "rss": info.rss / 2**20}))
    return 0


def measure_round(cfg: dict, system, workdir: Path, expected: np.ndarray, reload: bool) -> dict:
    """One system, 2 model workers: start, callers (1, 8, 16), the trivial function, memory, and reload
    (in the first round only: Ray's takes half a minute, and gunicorn's never completes)."""
    print(f"  {system.label} ...", flush=True)
    began = time.monotonic()
    running = system.start(workdir, WORKERS)
    out: dict = {"first_answer_s": running.first_answer_s, "http": {}, "json": {}, "socket": {}, "square": {}}
    try:
        transports = [("http", system.http_kind, {"url": running.url})]
        for transport in getattr(system, "more_transports", ()):  # (expertd: JSON over HTTP, its socket client)
            transports.append((transport, transport, {"url": running.url, "socket": running.socket}))
        for transport, kind, where in transports:
            for clients in cfg["clients"]:
                load = peer_load.run({"kind": kind, "seconds": cfg["seconds"], **where}, clients)
                load["max_diff"], load["mismatched"] = check(load.pop("replies"), expected)
                running.seen_pids |= set(load["pids"])
                out[transport][clients] = load
                print(f"    {transport} {clients:>2} callers: {load['items_s']:7.1f} items/s, "
                      f"p50 {load['p50_ms'] or 0:7.2f} ms, errors {load['errors']}", flush=True)
        for kind in system.square_kinds:
            load = peer_load.run({"kind": kind, "seconds": cfg["square_seconds"], "url": running.url,
                                  "socket": running.socket}, 1)
            load.pop("replies")
            out["square"][kind] = load
        out["memory"] = running.memory()
        if reload and system.can_reload:
            out["reload"] = measure_reload(running, min(cfg["reload_wait"], system.reload_wait))  # (last: it may
            # leave the server broken)
    finally:
        running.stop()
    print(f"    ({time.monotonic() - began:.0f} s)", flush=True)
    return out


def measure_memory(cfg: dict, system, workdir: Path, workers: int) -> dict:
    """One start with ``workers`` model workers, each made to run the model, then every process weighed.

    Calls (2 callers per worker, 2 s at a time) until every model worker has answered one (a gunicorn dirty
    worker still loading the model fails its calls), at most 10 times; ``warm`` says whether they all did.
    """
    print(f"  {system.label}, {workers} model workers ...", flush=True)
    running = system.start(workdir, workers)
    try:
        where = {"socket": running.socket} if running.socket else {"url": running.url}
        kind = "socket" if running.socket else system.http_kind
        calls = errors = 0
        for _ in range(10):
            load = peer_load.run({"kind": kind, "seconds": 2.0, **where}, 2 * workers)
            running.seen_pids |= set(load["pids"])
            calls, errors = calls + load["calls"], errors + load["errors"]
            if len(answered(running)) >= workers:
                break
        return {"first_answer_s": running.first_answer_s, "warm": len(answered(running)) >= workers,
                "calls": calls, "errors": errors, **running.memory()}
    finally:
        running.stop()


def answered(running) -> set[int]:
    """The model workers that have answered a call (expertd: from its status; a peer: from X-Worker-Pid)."""
    if running.socket is None:
        return set(running.seen_pids)
    from expertd.client import Client

    with Client(running.socket, timeout=30) as client:
        return {w["pid"] for w in client.status()["workers"] if w.get("requests", 0) > 0}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one short round (a smoke run)")
    parser.add_argument("--rounds", type=int, help="rounds of the 2-worker measurements (default 2)")
    parser.add_argument("--systems", help="comma-separated keys to run (default: all): " + ", ".join(
        ["expertd", "expertd-batching", "expertd-batching-1x2", "gunicorn", "ray", "ray-haproxy", "ray-batch",
         "ray-haproxy-batch", "ray-haproxy-batch-1x2"]))
    parser.add_argument("--output", default=str(ROOT / "BENCHMARKS.md"),
                        help="the report whose peers section is written (default BENCHMARKS.md)")
    parser.add_argument("--render", metavar="RESULTS_JSON",
                        help="only rewrite the section and plots from saved results")
    parser.add_argument("--keras-baseline", type=float, help=argparse.SUPPRESS)
    options = parser.parse_args()
    if options.keras_baseline is not None:
        return _keras_baseline_main(options.keras_baseline)
    if options.render:
        data = json.loads(Path(options.render).read_text())
        peer_report.write(data, Path(options.output), BENCH / "plots")
        return 0
    cfg = dict(QUICK if options.quick else FULL)
    if options.rounds:
        cfg["rounds"] = options.rounds
    if not MODEL.exists():
        raise SystemExit(f"{MODEL} is missing: run `make bench-model` (bench/make_mlp.py) first")
    began = time.monotonic()
    workdir = Path(tempfile.mkdtemp(prefix="xdpeers-"))
    every = systems(workdir / "model-cache")
    chosen = options.systems.split(",") if options.systems else list(every)
    unknown = [key for key in chosen if key not in every]
    if unknown:
        raise SystemExit(f"--systems: unknown {', '.join(unknown)}; choose from {', '.join(every)}")
    peers = sorted({every[k].peer for k in chosen if isinstance(every[k], Peer)})
    pythons = {peer: peer_python(peer) for peer in peers}
    data: dict = {
        "config": cfg, "quick": options.quick, "workers": WORKERS, "systems": {k: every[k].label for k in chosen},
        "machine": {"nproc": len(os.sched_getaffinity(0)), "platform": platform.platform(),
                    "memory_gib": psutil.virtual_memory().total / 2**30},
        "versions": {"python": platform.python_version(), "expertd": _commit(),
                     **installed_versions(Path(sys.executable),
                                          ["tensorflow-cpu", "keras", "ai-edge-litert", "orjson"]),
                     **{f"{peer}:{name}": version for peer, python in pythons.items()
                        for name, version in installed_versions(python, _packages(peer)).items()}},
        "started": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "rounds": [], "memory": {}, "keras": [],
    }
    expected = reference()
    try:
        # The first expertd start prepares the model for LiteRT (cold); every later one loads the cache (warm).
        if "expertd" in chosen or "expertd-batching" in chosen:
            key = "expertd-batching" if "expertd-batching" in chosen else "expertd"
            print("expertd, cold start (empty model cache) ...", flush=True)
            cold = every[key].start(workdir, WORKERS)
            data["expertd_cold_start_s"] = cold.first_answer_s
            cold.stop()
        for number in range(cfg["rounds"]):
            print(f"round {number + 1} of {cfg['rounds']} ...", flush=True)
            data["keras"].append(keras_baseline(cfg["keras_seconds"]))
            order = chosen if number % 2 == 0 else chosen[::-1]  # (drift on a shared machine: both ways)
            data["rounds"].append({key: measure_round(cfg, every[key], workdir, expected, number == 0)
                                   for key in order})
        print("memory by model workers ...", flush=True)
        for key in [k for k in MEMORY_SYSTEMS if k in chosen]:
            data["memory"][key] = {n: measure_memory(cfg, every[key], workdir, n) for n in cfg["memory_workers"]}
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    data["seconds"] = time.monotonic() - began
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(data, indent=1, default=str))
    peer_report.write(json.loads(RESULTS.read_text()), Path(options.output), BENCH / "plots")
    print(f"wrote the peers section of {options.output}, bench/plots/peers_*.png and {RESULTS} "
          f"in {data['seconds']:.0f} s")
    return 0


def _packages(peer: str) -> list[str]:
    requirements = (ROOT / "bench" / "peers" / peer / "requirements.txt").read_text().splitlines()
    return [line.split("==")[0].split("[")[0].strip() for line in requirements
            if "==" in line and not line.lstrip().startswith("#")]


def _commit() -> str:
    try:
        return subprocess.run(["git", "-C", str(ROOT), "log", "-1", "--format=%h %s"], capture_output=True,
                              text=True, check=True).stdout.strip()[:60]
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


if __name__ == "__main__":
    sys.exit(main())
