"""Model experts against Keras in one process: start-up, memory and latency of a 192 MiB MLP.

    python bench/models.py                 # make bench (after bench/make_mlp.py), 1–2 minutes
    python bench/models.py --quick         # fewer rounds, about a minute
    python bench/models.py --workers 1 4 --output /tmp/models.md

The model is bench/models/mlp192.keras (bench/make_mlp.py: 2048 → 4096 →
4096 → 4096 → 2048, float32, 50.3M parameters).  Three parts, one after the
other, so that no part's pages or CPU use hide in another's figures:

1. Start-up and memory, one daemon at a time (`expertd --config FILE`, the
   daemon's own command, on a config written to a temporary directory with
   ``model = …`` and one intra/inter-op thread).  The first daemon starts with
   an empty model cache (cold: the model is prepared in a child process); every
   later one shares that cache (warm).  Each warm start is paired with a
   start of the same daemon serving a trivial function expert instead of the
   model (the daemon without the model).  Start-up is the time from the
   process's start to the log line saying every worker is ready.  Memory is
   read with psutil (USS, PSS) from the workers the daemon's status names,
   after every worker has served a few batches.
2. Latency: a Keras baseline process (the .keras file loaded, wrapped in a
   ``tf.function`` with input_signature [None, 2048] float32, one intra- and
   one inter-op thread) and one daemon per worker count, all started, then
   measured in interleaved rounds (Keras, 1 worker, 2, 4, Keras, …) with
   batch-1 and batch-32 calls alternating; medians.  Every daemon output is
   checked against the Keras output for the same input.
3. The shipped sentiment expert (a Python function running a small Keras
   model) against the trivial ``square`` on one daemon with one worker:
   sequential round trips in interleaved blocks, medians.

Writes the report (markdown, also printed) to --output, default
BENCHMARKS-models.md at the repository root, and the raw results as JSON
(bench/plots/models-results.json for the default report, else next to it).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import ExitStack, contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
sys.path.insert(0, str(ROOT))

sys.path.insert(0, str(BENCH))

import numpy as np  # noqa: E402
import psutil  # noqa: E402
from memory import _private_split  # noqa: E402

from expertd.client import Client  # noqa: E402

MIB = 2**20
PYTHON = sys.executable
DEFAULT_MODEL = BENCH / "models" / "mlp192.keras"
WIDTH = 2048  # the model's input and output width
RTOL = ATOL = 1e-4

QUICK = {"startup_rounds": 2, "rounds": 4, "pairs": 4, "touch_calls": 2, "sentiment_blocks": 6, "block": 100}
FULL = {"startup_rounds": 5, "rounds": 10, "pairs": 3, "touch_calls": 3, "sentiment_blocks": 20, "block": 100}

TARGETS = {"worker_uss": 20.0, "workers_pss": 500.0, "latency": 1.0, "restart": 1.5, "sentiment": 2.0}


# ----------------------------------------------------------------- helpers
def median(values: list[float]) -> float:
    return statistics.median(values)


def spread(values: list[float], digits: int = 1, unit: str = "") -> str:
    if not values:
        return "n/a"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}{unit}"
    return f"{median(values):.{digits}f}{unit} ({min(values):.{digits}f}–{max(values):.{digits}f})"


def each(values: list[float], digits: int = 1) -> str:
    return ", ".join(f"{v:.{digits}f}" for v in values) or "n/a"


def verdict(ok: bool | None) -> str:
    return "n/a" if ok is None else ("**PASS**" if ok else "**FAIL**")


def expertd_command() -> list[str]:
    """The daemon's own entry point next to this Python (.venv/bin/expertd), else ``python -m expertd``."""
    script = Path(PYTHON).parent / "expertd"
    return [str(script)] if script.exists() else [PYTHON, "-m", "expertd"]


def write_config(directory: Path, workers: int, experts: dict[str, dict[str, str]], **settings) -> Path:
    """A config file in ``directory`` (with its socket there); experts: name -> {key: value}."""
    directory.mkdir(parents=True, exist_ok=True)
    lines = ["[expertd]", f"socket = {directory / 'expertd.sock'}", f"workers = {workers}",
             *(f"{key} = {value}" for key, value in settings.items())]
    for name, keys in experts.items():
        lines += ["", f"[expert:{name}]", *(f"{key} = {value}" for key, value in keys.items())]
    path = directory / "expertd.conf"
    path.write_text("\n".join(lines) + "\n")
    return path


class Daemon:
    """A running ``expertd --config FILE``: its process, socket, log and time to ready."""

    def __init__(self, config: Path, timeout: float) -> None:
        self.config = config
        self.sock = str(config.parent / "expertd.sock")
        self.log_path = config.parent / f"expertd-{time.monotonic_ns()}.log"
        with open(self.log_path, "wb") as log:
            self.started = time.monotonic()
            self.started_wall = time.time()
            self.proc = subprocess.Popen([*expertd_command(), "--config", str(config)],
                                         stdout=log, stderr=log, stdin=subprocess.DEVNULL)
        try:
            while "expertd ready" not in self.log():
                if self.proc.poll() is not None:
                    raise RuntimeError(f"expertd --config {config} exited with status {self.proc.returncode}:\n"
                                       + self.log()[-4000:])
                if time.monotonic() - self.started > timeout:
                    raise RuntimeError(f"expertd --config {config} not ready after {timeout:.0f}s:\n"
                                       + self.log()[-4000:])
                time.sleep(0.005)
            self.ready_s = time.monotonic() - self.started
        except BaseException:
            self.stop()
            raise
        self.client = Client(self.sock)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def fork_to_ready(self) -> list[float]:
        """Each worker's fork-to-ready time, from the daemon's log."""
        times = []
        for line in self.log().splitlines():
            if ") ready in " in line and "worker " in line:
                times.append(float(line.rsplit("ready in ", 1)[1].rstrip("s \n")))
        return times

    def listening_s(self) -> float | None:
        """Seconds from the process's start to the master's "listening" log line (models loaded, before any fork)."""
        from datetime import datetime

        for line in self.log().splitlines():
            if "expertd master" in line and "listening" in line:
                stamp = datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f")  # the log's local time
                return stamp.timestamp() - self.started_wall
        return None

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@contextmanager
def daemon(config: Path, timeout: float = 120):
    running = Daemon(config, timeout)
    try:
        yield running
    finally:
        running.client.close()
        running.stop()


def model_config(directory: Path, workers: int, cache: Path, model: Path, **settings: object) -> Path:
    return write_config(directory, workers, {"mlp": {"model": str(model)}}, model_cache=cache,
                        intra_op_threads=1, inter_op_threads=1, log_level="info", **settings)


def function_config(directory: Path, workers: int, **settings: object) -> Path:
    """The daemon without the model: the same settings, one trivial function expert."""
    return write_config(directory, workers, {"square": {"function": "squares:square"}},
                        pythonpath=ROOT / "examples", intra_op_threads=1, inter_op_threads=1, log_level="info",
                        **settings)


def inputs() -> dict[int, np.ndarray]:
    """The benchmark's batches (1 and 32 rows), from a seeded generator."""
    rng = np.random.default_rng(2048)
    return {batch: rng.standard_normal((batch, WIDTH), dtype=np.float32) for batch in (1, 32)}


# ----------------------------------------------------------------- the Keras baseline (its own process)
def keras_server(model_path: str, directory: str) -> int:
    """Load the model into a tf.function and answer commands on stdin, one JSON line each on stdout.

    ``run PAIRS``: PAIRS × (batch-1 call, batch-32 call), timed one by one
    (input conversion and ``.numpy()`` of the output included), replies
    {"1": [seconds...], "32": [...], "cpu_wall": [process CPU s, wall s]}.  ``quit`` ends it.  Before the first
    command it writes its outputs for the benchmark's inputs to
    DIRECTORY/keras-B.npy and replies with its load time and memory.
    """
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    started = time.monotonic()
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(1)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    import keras

    model = keras.saving.load_model(model_path, compile=False)
    function = tf.function(lambda x: model(x, training=False),
                           input_signature=[tf.TensorSpec([None, WIDTH], tf.float32)])
    batches = inputs()
    for batch, x in batches.items():
        for _ in range(5):  # trace once (the signature has a None batch), then warm caches
            y = function(x).numpy()
        np.save(Path(directory) / f"keras-{batch}.npy", y)
    load_s = time.monotonic() - started
    info = psutil.Process().memory_full_info()
    reply = {"load_s": load_s, "rss_mib": info.rss / MIB, "uss_mib": info.uss / MIB, "pss_mib": info.pss / MIB,
             "tensorflow": tf.__version__, "keras": keras.__version__, "params": model.count_params()}
    print(json.dumps(reply), flush=True)
    for line in sys.stdin:
        command = line.split()
        if not command or command[0] == "quit":
            break
        if command[0] == "run":
            times: dict[str, list[float]] = {"1": [], "32": []}
            cpu, wall = time.process_time(), time.perf_counter()
            for _ in range(int(command[1])):
                for batch, x in batches.items():
                    begin = time.perf_counter()
                    function(x).numpy()
                    times[str(batch)].append(time.perf_counter() - begin)
            times["cpu_wall"] = [time.process_time() - cpu, time.perf_counter() - wall]
            print(json.dumps(times), flush=True)
    return 0


class KerasBaseline:
    def __init__(self, model: Path, directory: Path) -> None:
        self.directory = directory
        self.proc = subprocess.Popen([PYTHON, __file__, "--keras-server", str(model), str(directory)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait()
            raise RuntimeError(f"the Keras baseline process failed (status {self.proc.returncode})")
        self.info = json.loads(line)
        self.outputs = {batch: np.load(directory / f"keras-{batch}.npy") for batch in (1, 32)}

    def run(self, pairs: int) -> tuple[dict[int, list[float]], list[float]]:
        """Latencies by batch size, and [CPU seconds, wall seconds] of the whole run."""
        self.proc.stdin.write(f"run {pairs}\n")
        self.proc.stdin.flush()
        reply = json.loads(self.proc.stdout.readline())
        return {int(k): v for k, v in reply.items() if k != "cpu_wall"}, reply["cpu_wall"]

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.write("quit\n")
            self.proc.stdin.close()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


# ----------------------------------------------------------------- measurements
def _cpu_seconds(processes: list[psutil.Process]) -> float:
    """User + system CPU time of the processes, all their threads."""
    total = 0.0
    for process in processes:
        try:
            times = process.cpu_times()
        except psutil.NoSuchProcess:
            continue
        total += times.user + times.system
    return total


def worker_pids(running: Daemon) -> list[int]:
    status = running.client.status()
    return [w["pid"] for w in status["workers"]
            if w["generation"] == status["generation"] and w["state"] not in ("booting", "retiring")]


def touch_every_worker(running: Daemon, workers: int, calls: int, x: np.ndarray) -> None:
    """``workers`` concurrent clients (threads, one connection each) each send ``calls`` batches."""
    errors: list[BaseException] = []

    def client_loop() -> None:
        client = Client(running.sock)
        try:
            for _ in range(calls):
                client.predict("mlp", x)
        except BaseException as exc:  # reported below, in the main thread
            errors.append(exc)
        finally:
            client.close()

    threads = [threading.Thread(target=client_loop) for _ in range(workers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]


def measure_memory(running: Daemon, workers: int, cfg: dict, x: np.ndarray) -> dict:
    touch_every_worker(running, workers, cfg["touch_calls"], x)
    time.sleep(0.2)  # let the workers settle (reports to the master, linger timeouts)
    pids = worker_pids(running)
    master = psutil.Process(running.proc.pid)
    others = [child.pid for child in master.children() if child.pid not in pids]
    status = running.client.status()
    requests = {w["pid"]: w["requests"] for w in status["workers"]}
    per_worker = []
    for pid in pids:
        info = psutil.Process(pid).memory_full_info()
        own, clean_files = _private_split(pid)
        per_worker.append({"pid": pid, "uss": info.uss / MIB, "pss": info.pss / MIB, "rss": info.rss / MIB,
                           "uss_own": own, "uss_clean_files": clean_files, "requests": requests.get(pid)})
    master_info = master.memory_full_info()
    return {
        "workers": per_worker,
        "workers_pss": sum(w["pss"] for w in per_worker),
        "workers_uss": sum(w["uss"] for w in per_worker),
        "master_pss": master_info.pss / MIB, "master_uss": master_info.uss / MIB, "master_rss": master_info.rss / MIB,
        "other_children": [{"pid": pid, "cmdline": " ".join(psutil.Process(pid).cmdline())[:200]} for pid in others],
    }


def measure_startup_and_memory(cfg: dict, workdir: Path, model: Path, worker_counts: list[int],
                               x32: np.ndarray) -> dict:
    cache = workdir / "shared" / "cache"  # one cache for every model daemon: the first fills it
    result: dict = {"reference": {n: [] for n in worker_counts}, "warm": {n: [] for n in worker_counts},
                    "reference_listening": {n: [] for n in worker_counts},
                    "warm_listening": {n: [] for n in worker_counts}, "fork_to_ready": {}, "memory": {}}
    print("cold start (empty model cache) ...", flush=True)
    with daemon(model_config(workdir / "cold", 1, cache, model), timeout=900) as cold:
        result["cold"] = {"ready_s": cold.ready_s, "fork_to_ready": cold.fork_to_ready(),
                          "listening_s": cold.listening_s(),
                          "log": [line for line in cold.log().splitlines() if "ready" in line or "model" in line
                                  or "prepar" in line or "cache" in line][:40]}
        cold.client.predict("mlp", x32)
    cache_files = [p for p in cache.rglob("*") if p.is_file()]
    result["cache"] = {"files": len(cache_files), "mib": sum(p.stat().st_size for p in cache_files) / MIB}
    for round_ in range(cfg["startup_rounds"]):
        for n in worker_counts:
            print(f"start-up round {round_ + 1}/{cfg['startup_rounds']}, {n} workers ...", flush=True)
            with daemon(function_config(workdir / f"ref{n}", n)) as reference:
                result["reference"][n].append(reference.ready_s)
                result["reference_listening"][n].append(reference.listening_s())
                reference.client.call("square", 3)
            with daemon(model_config(workdir / f"warm{n}", n, cache, model)) as warm:
                result["warm"][n].append(warm.ready_s)
                result["warm_listening"][n].append(warm.listening_s())
                if round_ == 0:
                    result["fork_to_ready"][n] = warm.fork_to_ready()
                    result["memory"][n] = measure_memory(warm, n, cfg, x32)
        # The same pair as a real deployment runs it: TensorFlow preloaded (the shipped config does) in both.
        n = max(worker_counts)
        print(f"start-up round {round_ + 1}/{cfg['startup_rounds']}, {n} workers, TensorFlow preloaded ...", flush=True)
        preloaded = {"preload": "tensorflow keras numpy", "tf_log_level": "error"}
        with daemon(function_config(workdir / f"reftf{n}", n, **preloaded)) as reference:
            result.setdefault("reference_tf", []).append(reference.ready_s)
        with daemon(model_config(workdir / f"warmtf{n}", n, cache, model, **preloaded)) as warm:
            result.setdefault("warm_tf", []).append(warm.ready_s)
    result["tf_workers"] = max(worker_counts)
    return result


def measure_latency(cfg: dict, workdir: Path, model: Path, worker_counts: list[int]) -> dict:
    """Keras and one daemon per worker count, all up; interleaved rounds of alternating batch sizes."""
    cache = workdir / "shared" / "cache"
    batches = inputs()
    print("latency: starting the Keras baseline and the daemons ...", flush=True)
    with ExitStack() as stack:
        keras = KerasBaseline(model, workdir)
        stack.callback(keras.close)
        daemons = {n: stack.enter_context(daemon(model_config(workdir / f"lat{n}", n, cache, model)))
                   for n in worker_counts}
        times: dict = {"keras": {1: [], 32: []}, **{n: {1: [], 32: []} for n in worker_counts}}
        cpu_wall = {"keras": [0.0, 0.0], **{n: [0.0, 0.0] for n in worker_counts}}  # summed over the rounds
        worst = {n: 0.0 for n in worker_counts}
        mismatches = {n: 0 for n in worker_counts}
        for running in daemons.values():  # warm-up
            for x in batches.values():
                for _ in range(3):
                    running.client.predict("mlp", x)
        keras.run(2)
        for round_ in range(cfg["rounds"]):
            print(f"latency round {round_ + 1}/{cfg['rounds']} ...", flush=True)
            keras_times, (cpu, wall) = keras.run(cfg["pairs"])
            for batch, values in keras_times.items():
                times["keras"][batch] += values
            cpu_wall["keras"][0] += cpu
            cpu_wall["keras"][1] += wall
            for n, running in daemons.items():
                client = running.client
                processes = [psutil.Process(running.proc.pid), *psutil.Process(running.proc.pid).children()]
                cpu_before, wall_before = _cpu_seconds(processes), time.perf_counter()
                block = []  # checked after the block, outside the timed stretch
                for _ in range(cfg["pairs"]):
                    for batch, x in batches.items():
                        begin = time.perf_counter()
                        y = client.predict("mlp", x)
                        times[n][batch].append(time.perf_counter() - begin)
                        block.append((batch, y))
                cpu_wall[n][0] += _cpu_seconds(processes) - cpu_before
                cpu_wall[n][1] += time.perf_counter() - wall_before
                for batch, y in block:
                    expected = keras.outputs[batch]
                    if not (isinstance(y, np.ndarray) and y.shape == expected.shape
                            and np.allclose(y, expected, rtol=RTOL, atol=ATOL)):
                        mismatches[n] += 1
                    if isinstance(y, np.ndarray) and y.shape == expected.shape:
                        worst[n] = max(worst[n], float(np.max(np.abs(y.astype(np.float64) - expected))))
                    else:
                        worst[n] = float("inf")
        return {"keras": keras.info, "times": times, "max_abs_diff": worst, "mismatches": mismatches,
                "cpu_per_wall": {k: cpu / wall for k, (cpu, wall) in cpu_wall.items()},
                "output_scale": {b: float(np.max(np.abs(y))) for b, y in keras.outputs.items()}}


def measure_sentiment(cfg: dict, workdir: Path) -> dict:
    """sentiment (a Keras model behind a Python function) against square, one worker, interleaved blocks."""
    config = write_config(workdir / "sentiment", 1, {"sentiment": {"function": "sentiment:opinion"},
                                                     "square": {"function": "squares:square"}},
                          preload="tensorflow keras numpy", pythonpath=ROOT / "examples", log_level="info",
                          tf_log_level="error", model_cache=workdir / "sentiment-cache")
    print("sentiment vs square ...", flush=True)
    times: dict[str, list[float]] = {"sentiment": [], "square": []}
    document = {"text": "what a wonderful day"}
    with daemon(config) as running:
        client = running.client
        label = client.opinion("sentiment", dict(document))
        for _ in range(200):
            client.opinion("sentiment", dict(document))
            client.call("square", 7)
        for _ in range(cfg["sentiment_blocks"]):
            for name in ("sentiment", "square"):
                bucket = times[name]
                for _ in range(cfg["block"]):
                    if name == "sentiment":
                        begin = time.perf_counter()
                        client.opinion("sentiment", document)
                    else:
                        begin = time.perf_counter()
                        client.call("square", 7)
                    bucket.append(time.perf_counter() - begin)
    return {"times": times, "reply": label, "compute": measure_sentiment_compute(cfg, workdir / "sentiment-cache")}


def measure_sentiment_compute(cfg: dict, cache: Path) -> dict:
    """The sentiment model's compute per call, in one process: before (Keras in a tf.function) and after (Model)."""
    print("sentiment compute per call ...", flush=True)
    done = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--sentiment-compute", str(cache),
                           str(cfg["sentiment_blocks"])], capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"))
    if done.returncode != 0:
        raise RuntimeError(f"the sentiment compute probe failed: {done.stderr.strip()[-500:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def sentiment_compute(cache: str, blocks: int) -> int:
    """(Child process.) Median µs per call of the shipped sentiment model on one text, both ways, interleaved."""
    sys.path.insert(0, str(ROOT / "examples"))
    import keras
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(1)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    from sentiment.model import SEQUENCE_LENGTH, encode

    from expertd.model import Model

    path = ROOT / "examples" / "sentiment" / "sentiment.keras"
    with open(ROOT / "examples" / "sentiment" / "vocabulary.txt", encoding="utf-8") as words:
        vocabulary = {word: index for index, word in enumerate(words.read().split(), start=2)}
    ids = encode(["what a wonderful day"], vocabulary)
    keras_model = keras.models.load_model(path)
    before = tf.function(lambda x: keras_model(x, training=False),
                         input_signature=[tf.TensorSpec([None, SEQUENCE_LENGTH], tf.int32)])
    after = Model(str(path), _register=False)
    after.prepare(cache, 600, "bench")
    after.load(1)
    ways = {"tf.function": lambda: before(ids).numpy(), "expertd.Model": lambda: after.predict(ids)}
    assert abs(float(ways["tf.function"]()[0, 0]) - float(ways["expertd.Model"]()[0, 0])) < 1e-4
    times: dict[str, list[float]] = {name: [] for name in ways}
    for _ in range(blocks):
        for name, call in ways.items():
            for _ in range(100):
                begin = time.perf_counter()
                call()
                times[name].append(time.perf_counter() - begin)
    print(json.dumps({name: statistics.median(values) * 1e6 for name, values in times.items()}))
    return 0


# ----------------------------------------------------------------- report
def _version(distribution: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(distribution)
    except PackageNotFoundError:
        return "not installed"


def _seconds(value: float | list | None) -> str:
    values = [v for v in (value if isinstance(value, list) else [value]) if v is not None]
    return spread(values, 2) if values else "n/a"


def markdown(data: dict, quick: bool) -> str:
    model = data["model"]
    startup, latency, sentiment = data["startup"], data["latency"], data["sentiment"]
    counts = data["worker_counts"]
    target_n = 4 if 4 in counts else max(counts)
    times = latency["times"]
    keras_ms = {b: median(times["keras"][b]) * 1000 for b in (1, 32)}
    ms = {n: {b: median(times[n][b]) * 1000 for b in (1, 32)} for n in counts}
    versions = {name: _version(name) for name in ("tensorflow-cpu", "keras", "ai-edge-litert", "numpy", "psutil")}
    out = [
        "# expertd model experts: benchmark",
        "",
        f"Generated by `{'bench/models.py --quick' if quick else 'make bench'}` (bench/models.py) on "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime(data['finished']))} in {data['elapsed_s']:.0f} s. "
        "Medians (with min–max where several runs); comparisons measured in one run, interleaved.",
        "",
        f"- model: `{model['path']}` (bench/make_mlp.py): MLP 2048 → 4096 → 4096 → 4096 → 2048, float32, "
        f"{model['params'] / 1e6:.1f}M parameters, {model['params'] * 4 / MIB:.0f} MiB of weights, "
        f"{model['file_mib']:.0f} MiB file",
        f"- {platform.platform()}, {psutil.cpu_count()} cores ({platform.processor() or platform.machine()}), "
        f"{psutil.virtual_memory().total / 2**30:.0f} GiB memory; a shared machine: read ratios measured side "
        "by side rather than absolute figures",
        f"- Python {platform.python_version()}; " + ", ".join(f"{k} {v}" for k, v in versions.items()),
        "- every daemon: `intra_op_threads = 1`, `inter_op_threads = 1`; the Keras baseline: one process, "
        "`tf.function` with input_signature [None, 2048] float32, 1 intra- and 1 inter-op thread",
        "",
    ]

    memory = startup["memory"].get(target_n)
    restart_ratio = None
    if startup["warm"].get(target_n) and startup["reference"].get(target_n):
        warm_s, ref_s = median(startup["warm"][target_n]), median(startup["reference"][target_n])
        restart_ratio = warm_s / ref_s
    sent_us = median(sentiment["times"]["sentiment"]) * 1e6
    square_us = median(sentiment["times"]["square"]) * 1e6
    out += [f"## Targets ({target_n} workers)", "", "| target | measured | |", "| --- | --- | --- |"]
    if memory:
        worst_uss = max(w["uss"] for w in memory["workers"])
        out.append(f"| per-worker USS ≤ {TARGETS['worker_uss']:.0f} MiB | worst {worst_uss:.1f} MiB "
                   f"(each: {each([w['uss'] for w in memory['workers']])}; of which clean file pages: "
                   f"{each([w['uss_clean_files'] for w in memory['workers']])}) "
                   f"| {verdict(worst_uss <= TARGETS['worker_uss'])} |")
        out.append(f"| workers' summed PSS ≤ {TARGETS['workers_pss']:.0f} MiB | {memory['workers_pss']:.0f} MiB "
                   f"(master {memory['master_pss']:.0f} MiB more) "
                   f"| {verdict(memory['workers_pss'] <= TARGETS['workers_pss'])} |")
    for batch in (1, 32):
        ratio = ms[target_n][batch] / keras_ms[batch]
        out.append(f"| batch-{batch} latency ≤ {TARGETS['latency']:.1f}× Keras tf.function | "
                   f"{ms[target_n][batch]:.2f} ms vs {keras_ms[batch]:.2f} ms = {ratio:.2f}× "
                   f"| {verdict(ratio <= TARGETS['latency'])} |")
    if restart_ratio is not None:
        out.append(f"| warm restart ready ≤ {TARGETS['restart']}× the daemon without the model | "
                   f"{median(startup['warm'][target_n]):.2f} s vs {median(startup['reference'][target_n]):.2f} s "
                   f"= {restart_ratio:.2f}× | {verdict(restart_ratio <= TARGETS['restart'])} |")
    if startup.get("warm_tf"):
        tf_ratio = median(startup["warm_tf"]) / median(startup["reference_tf"])
        out.append(f"| the same, both with TensorFlow preloaded (as the shipped config), {startup['tf_workers']} "
                   f"workers | {median(startup['warm_tf']):.2f} s vs {median(startup['reference_tf']):.2f} s "
                   f"= {tf_ratio:.2f}× "
                   f"| {verdict(tf_ratio <= TARGETS['restart'])} |")
    out.append(f"| sentiment round trip ≤ {TARGETS['sentiment']:.0f}× square (1 worker) | {sent_us:.0f} µs vs "
               f"{square_us:.0f} µs = {sent_us / square_us:.2f}× "
               f"| {verdict(sent_us <= TARGETS['sentiment'] * square_us)} |")
    worst_diff = max(latency["max_abs_diff"].values())
    bad = sum(latency["mismatches"].values())
    out.append(f"| outputs match Keras (np.allclose, rtol {RTOL:g}, atol {ATOL:g}), every call | max abs difference "
               f"{worst_diff:.2g} (outputs up to {max(latency['output_scale'].values()):.1f}); {bad} mismatched "
               f"| {verdict(bad == 0)} |")

    keras = latency["keras"]
    out += ["", "## Memory", "",
            "After every worker has served batches: psutil's USS and PSS of each worker the daemon's status "
            "names, and of the master. USS counts a page of a mapped file as private while one process alone "
            "maps it, so it is split here (from /proc/PID/smaps, as bench/memory.py does) into the worker's own "
            "memory and clean pages of mapped files, which stay in the page cache, one copy however many "
            "processes map them. Other processes on the machine that map the same files or libraries lower these PSS "
            "figures.", "",
            "| | workers | worker USS (MiB, each) | of which clean file pages | worker PSS (MiB, each) "
            "| workers' PSS sum (MiB) | master PSS (MiB) | master + workers PSS (MiB) |",
            "| --- | --- | --- | --- | --- | --- | --- | --- |",
            f"| Keras tf.function, one process (RSS {keras['rss_mib']:.0f} MiB) | — | {keras['uss_mib']:.0f} | "
            f"| {keras['pss_mib']:.0f} | | | {keras['pss_mib']:.0f} |"]
    for n in counts:
        mem = startup["memory"].get(n)
        if mem:
            workers = mem["workers"]
            out.append(f"| expertd | {n} | {each([w['uss'] for w in workers])} "
                       f"| {each([w['uss_clean_files'] for w in workers])} | {each([w['pss'] for w in workers])} "
                       f"| {mem['workers_pss']:.0f} | {mem['master_pss']:.0f} "
                       f"| {mem['workers_pss'] + mem['master_pss']:.0f} |")
    others = [o for n in counts for o in (startup["memory"].get(n) or {}).get("other_children", [])]
    if others:
        out += ["", "Children of the master that are not workers (left out of the sums): "
                + "; ".join(f"pid {o['pid']} `{o['cmdline']}`" for o in others)]
    requests = {n: [w["requests"] for w in startup["memory"][n]["workers"]] for n in counts
                if n in startup["memory"]}
    out += ["", "Requests each worker had served when its memory was read: "
            + "; ".join(f"{n} workers: {each(r, 0)}" for n, r in requests.items()) + "."]

    out += ["", "## Latency", "",
            "One client's sequential calls (`Client.predict`, numpy arrays on the wire, encoding and decoding "
            "included) against the Keras baseline's calls (numpy in, `.numpy()` out) in the same interleaved "
            f"rounds: {len(times['keras'][1])} calls of each batch size per system, batch-1 and batch-32 "
            "alternating. Server CPU / wall: CPU time (all threads) of the Keras process, or of the daemon's "
            "master and workers, over the wall time of the calls; about 1 or less means one thread computes "
            "(the daemon's figure leaves out the client's share of the wall time). Max abs diff: the largest "
            "difference from Keras's output over every call.", "",
            "| | workers | batch-1 ms | × Keras | batch-32 ms | × Keras | server CPU / wall | max abs diff |",
            "| --- | --- | --- | --- | --- | --- | --- | --- |",
            f"| Keras tf.function, one process | — | {spread([t * 1000 for t in times['keras'][1]], 2)} | 1.00× "
            f"| {spread([t * 1000 for t in times['keras'][32]], 2)} | 1.00× "
            f"| {latency['cpu_per_wall']['keras']:.2f} | |"]
    for n in counts:
        out.append(f"| expertd | {n} | {spread([t * 1000 for t in times[n][1]], 2)} | "
                   f"{ms[n][1] / keras_ms[1]:.2f}× | {spread([t * 1000 for t in times[n][32]], 2)} | "
                   f"{ms[n][32] / keras_ms[32]:.2f}× | {latency['cpu_per_wall'][n]:.2f} "
                   f"| {latency['max_abs_diff'][n]:.2g} |")

    cold = startup["cold"]
    out += ["", "## Start-up", "",
            "Time from the daemon's process start to its log line saying every worker is ready "
            f"({startup['rounds']} start(s) each, interleaved daemon without the model / with it). "
            f"The model cache after the cold start: {startup['cache']['files']} files, "
            f"{startup['cache']['mib']:.0f} MiB.", "",
            "| daemon | workers | start → all workers ready (s) | × without the model "
            "| start → master listening (s) | fork → ready, each worker (s) |",
            "| --- | --- | --- | --- | --- | --- |"]
    ref1 = median(startup["reference"][counts[0]]) if counts[0] == 1 else None
    out.append(f"| model, cold (empty cache: model prepared in a child process) | 1 | {cold['ready_s']:.2f} | "
               + (f"{cold['ready_s'] / ref1:.1f}×" if ref1 else "")
               + f" | {_seconds(cold['listening_s'])} | {each(cold['fork_to_ready'], 2)} |")
    for n in counts:
        ref, warm = startup["reference"][n], startup["warm"][n]
        out.append(f"| trivial function expert only (the daemon without the model) | {n} | {spread(ref, 2)} "
                   f"| 1.00× | {_seconds(startup['reference_listening'][n])} | |")
        out.append(f"| model, warm cache | {n} | {spread(warm, 2)} | {median(warm) / median(ref):.2f}× "
                   f"| {_seconds(startup['warm_listening'][n])} | {each(startup['fork_to_ready'].get(n, []), 2)} |")
    out += ["", "Master listening: the log line the master writes once its experts (and models) are loaded, "
            "before it forks the workers; its time comes from the log's millisecond timestamps."]

    out += ["", "## Sentiment expert round trip", "",
            "The shipped sentiment expert (`sentiment:opinion`, a small Keras model behind a Python function) and "
            "`square`, on one daemon with one worker (`preload = tensorflow keras numpy`), one client, "
            f"{len(sentiment['times']['sentiment'])} sequential calls each in interleaved blocks of "
            f"{data['config']['block']}.", "",
            "| call | median µs | p90 µs | × square |", "| --- | --- | --- | --- |"]
    for name, label in (("sentiment", 'client.opinion("sentiment", {"text": "what a wonderful day"})'),
                        ("square", 'client.call("square", 7)')):
        values = sorted(sentiment["times"][name])
        p90 = values[int(0.9 * (len(values) - 1))] * 1e6
        out.append(f"| `{label}` | {median(values) * 1e6:.0f} | {p90:.0f} | "
                   f"{median(values) * 1e6 / square_us:.2f}× |")
    compute = sentiment["compute"]
    out += ["", "The same model's compute per call (one text, in one process, one thread, interleaved blocks of 100; "
            "median): before, the Keras model in a `tf.function` (what the expert did until now); after, "
            "`expertd.Model` (the file prepared for LiteRT, as the expert runs it now).", "",
            "| way | µs per call |", "| --- | --- |",
            f"| Keras in a `tf.function` (before) | {compute['tf.function']:.1f} |",
            f"| `expertd.Model.predict` (after) | {compute['expertd.Model']:.1f} "
            f"({compute['tf.function'] / compute['expertd.Model']:.0f}× less) |"]
    return "\n".join(out)


# ----------------------------------------------------------------- main
def main() -> int:
    if len(sys.argv) == 4 and sys.argv[1] == "--keras-server":
        return keras_server(sys.argv[2], sys.argv[3])
    if len(sys.argv) == 4 and sys.argv[1] == "--sentiment-compute":
        return sentiment_compute(sys.argv[2], int(sys.argv[3]))
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds (under 3 minutes)")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4], help="worker counts (default 1 2 4)")
    parser.add_argument("--model", default=str(DEFAULT_MODEL), help="the .keras file (bench/make_mlp.py makes it)")
    parser.add_argument("--output", default=str(ROOT / "BENCHMARKS-models.md"),
                        help="the markdown report; raw results go next to it as .json")
    options = parser.parse_args()
    cfg = QUICK if options.quick else FULL
    model = Path(options.model).resolve()
    if not model.exists():
        parser.error(f"{model} does not exist: run 'make bench-model' (bench/make_mlp.py) first")
    counts = sorted(set(options.workers))
    started = time.monotonic()
    x32 = inputs()[32]
    workdir = Path(tempfile.mkdtemp(prefix="xdmodel-", dir="/tmp"))
    data: dict = {"config": cfg, "worker_counts": counts, "quick": options.quick}
    try:
        data["startup"] = measure_startup_and_memory(cfg, workdir, model, counts, x32)
        data["startup"]["rounds"] = cfg["startup_rounds"]
        data["latency"] = measure_latency(cfg, workdir, model, counts)
        data["sentiment"] = measure_sentiment(cfg, workdir)
    except RuntimeError as exc:  # a daemon or the Keras baseline did not start: its log says why
        print(f"bench/models.py: {exc}", file=sys.stderr)
        return 1
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    data["model"] = {"path": str(model.relative_to(ROOT)) if model.is_relative_to(ROOT) else str(model),
                     "params": data["latency"]["keras"]["params"], "file_mib": model.stat().st_size / MIB}
    data["finished"] = time.time()
    data["elapsed_s"] = time.monotonic() - started
    text = markdown(data, options.quick)
    output = Path(options.output)
    output.write_text(text + "\n")
    default = output.name == "BENCHMARKS-models.md"
    raw = BENCH / "plots" / "models-results.json" if default else output.with_suffix(".json")
    raw.write_text(json.dumps(data, indent=1, default=str) + "\n")
    print()
    print(text)
    print()
    print(f"wrote {output} and {raw} in {data['elapsed_s']:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
