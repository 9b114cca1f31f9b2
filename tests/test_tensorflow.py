"""TensorFlow experts with real TensorFlow: the fork rule, thread settings, shared memory."""

import hashlib
import re
import threading
import time
from pathlib import Path

import pytest

from conftest import run_expertd, wait_until, write_config

tf = pytest.importorskip("tensorflow")  # the `tensorflow` extra, installed by `make test`

ROOT = Path(__file__).resolve().parent.parent
TF_EXPERTS = {
    "matmul": "tfexperts:matmul",
    "eager_matmul": "tfexperts:eager_matmul",
    "threads": "tfexperts:threads",
    "sentiment": "sentiment:opinion",
    "sentiment_batch": "sentiment:opinions",
}


@pytest.fixture(scope="module")
def tf_daemon(tmp_path_factory):
    import tempfile

    from conftest import Daemon

    directory = Path(tempfile.mkdtemp(prefix="xdtf-", dir="/tmp"))
    config = write_config(directory, TF_EXPERTS, preload="tensorflow keras numpy")
    daemon = Daemon(config, directory / "tf.sock", workers=2).start()
    yield daemon
    daemon.kill()


def test_concurrent_big_ops_from_two_workers_do_not_deadlock(tf_daemon):
    expected = tf_daemon.client(timeout=60).call("matmul")
    results, errors, pids = [], [], set()

    def caller(name):
        try:
            client = tf_daemon.client(timeout=60)
            for _ in range(5):
                results.append(client.call(name))
                pids.add(client.ping()["pid"])
        except Exception as exc:
            errors.append(exc)

    threads = [threading.Thread(target=caller, args=(name,)) for name in ("matmul", "eager_matmul") * 3]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert not errors
    assert len(results) == 30 and set(results) == {expected}
    assert pids == tf_daemon.worker_pids()  # both workers served


def test_shipped_sentiment_expert(tf_daemon):
    client = tf_daemon.client()
    happy = client.opinion("sentiment", {"text": "what a wonderful day"})
    sad = client.opinion("sentiment", {"text": "the food was awful and the staff rude"})
    assert happy["label"] == "positive" and happy["score"] > 0.8
    assert sad["label"] == "negative" and sad["score"] < 0.2
    digest = hashlib.sha256((ROOT / "examples" / "sentiment" / "sentiment.keras").read_bytes()).hexdigest()[:16]
    assert happy["model"] == digest


def test_sentiment_of_a_text_without_words_is_a_number(tf_daemon):
    for text in ("", "  !?  "):
        opinion = tf_daemon.client().opinion("sentiment", {"text": text})
        assert 0.0 <= opinion["score"] <= 1.0 and opinion["label"] in ("positive", "negative")


def test_sentiment_is_deterministic_across_workers_and_batches(tf_daemon):
    texts = [f"day {i}: the hotel was {'lovely' if i % 2 else 'dirty'} and the staff were friendly" * 3
             for i in range(512)]
    documents = [{"text": text} for text in texts]
    results, errors = [], []

    def caller():
        try:
            results.append(tf_daemon.client(timeout=60).call("sentiment_batch", documents))
        except Exception as exc:
            errors.append(exc)

    callers = [threading.Thread(target=caller) for _ in range(4)]
    for thread in callers:
        thread.start()
    for thread in callers:
        thread.join(120)
    assert not errors and len(results) == 4
    assert all(batch == results[0] for batch in results)
    client = tf_daemon.client()
    singles = [client.opinion("sentiment", documents[i]) for i in (0, 1, 2, 511)]
    assert singles == [results[0][i] for i in (0, 1, 2, 511)]


def test_thread_settings_reach_the_workers(make_daemon):
    daemon = make_daemon(TF_EXPERTS, workers=1, preload="tensorflow", intra_op_threads=3, inter_op_threads=2)
    assert daemon.client().call("threads") == {"intra": 3, "inter": 2, "env_intra": "3"}


def test_auto_threads_share_the_cores(tf_daemon):
    import os

    expected = max(1, (os.cpu_count() or 1) // 2)
    assert tf_daemon.client().call("threads") == {"intra": expected, "inter": expected, "env_intra": str(expected)}


def test_worker_memory_and_readiness_are_logged(tf_daemon):
    lines = re.findall(r"memory after warm-up: USS ([\d.]+) MiB, PSS ([\d.]+) MiB, RSS ([\d.]+) MiB", tf_daemon.log)
    assert len(lines) >= 2
    for uss, pss, rss in lines:
        assert 0 < float(uss) < float(pss) <= float(rss)
    assert len(re.findall(r"worker \d \(pid \d+\) ready in [\d.]+s", tf_daemon.log)) >= 2


def test_tensorflow_start_up_noise_is_quiet_by_default(tf_daemon, make_daemon):
    assert "oneDNN custom operations" not in tf_daemon.log
    assert "absl::InitializeLog" not in tf_daemon.log
    loud = make_daemon({"threads": "tfexperts:threads"}, workers=1, preload="tensorflow", tf_log_level="info")
    # Which notices TensorFlow prints depends on the CPU (oneDNN's only on some); absl's always comes first,
    # though not always before the daemon says it is ready (a worker's runtime may print it as it starts).
    assert wait_until(lambda: "absl::InitializeLog" in loud.log, timeout=10)


@pytest.mark.parametrize(
    "function, culprit",
    [
        ("tf_starts_at_import:opinion", "function = tf_starts_at_import:opinion: importing 'tf_starts_at_import'"),
        ("tf_starts_in_hook:opinion", "before_fork hook tf_starts_in_hook.load_and_build"),
    ],
)
def test_runtime_started_in_the_master_stops_start_up(short_dir, function, culprit):
    config = write_config(short_dir, {"culprit": function}, preload="tensorflow")
    started = time.monotonic()
    done = run_expertd("--config", str(config), "--socket", str(short_dir / "x.sock"), timeout=60)
    assert time.monotonic() - started < 30
    assert done.returncode == 3
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert culprit in lines[0]
    assert "started TensorFlow's runtime" in lines[0] and "after_fork hook" in lines[0]
    assert not (short_dir / "x.sock").exists()


def test_after_fork_hook_failure_stops_start_up_naming_the_expert(short_dir):
    config = write_config(short_dir, {"broken_model": "tfexperts:broken_model"}, preload="tensorflow")
    started = time.monotonic()
    done = run_expertd("--config", str(config), "--socket", str(short_dir / "x.sock"), "--workers", "2", timeout=60)
    assert done.returncode == 3
    assert time.monotonic() - started < 30
    assert "[expert:broken_model] after_fork hook tfexperts._fail_after_building failed" in done.stderr
    assert "RuntimeError: model file is corrupt" in done.stderr
    # Reported by each of the two first workers and by the master, and never respawned.
    assert done.stderr.count("model file is corrupt") <= 3
    assert "respawning" not in done.stderr
