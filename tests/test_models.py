"""Model experts: config-only models and Model in Python experts, on real daemons with real LiteRT and TensorFlow.

The models are small, seeded and built by tests/experts/make_models.py in a
child process (the test process never starts TensorFlow's runtime); each comes
with Keras' own outputs, which every answer is compared against.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import numpy as np
import psutil
import pytest

from expertd import arrays
from expertd.errors import BadRequest

from conftest import TEST_EXPERTS, Daemon, UnixHTTPConnection, run_expertd, wait_until, write_config

pytest.importorskip("ai_edge_litert")  # the `tensorflow` extra, installed by `make test`


@pytest.fixture(scope="module")
def models():
    directory = Path(tempfile.mkdtemp(prefix="xd-testmodels-"))
    subprocess.run([sys.executable, str(TEST_EXPERTS / "make_models.py"), str(directory)], check=True, timeout=300)
    yield directory
    shutil.rmtree(directory, ignore_errors=True)


def reference(models: Path, name: str) -> dict[str, np.ndarray]:
    with np.load(models / f"{name}.npz") as data:
        return {key: data[key] for key in data.files}


def start(directory: Path, experts: dict, workers: int = 2, **settings: object) -> Daemon:
    config = write_config(directory, experts, **settings)
    return Daemon(config, directory / "m.sock", workers=workers).start()


@pytest.fixture
def served(models, short_dir):
    """One daemon with every kind of model expert (two workers)."""
    daemon = start(short_dir, {
        "mlp": {"model": models / "mlp.keras"},
        "saved": {"model": models / "mlp_saved_model"},
        "lite": {"model": models / "mlp.tflite"},
        "multi": {"model": models / "multi.keras"},
        "small": {"model": models / "mlp.keras", "max_rows": 2},
    })
    yield daemon
    daemon.kill()


def test_config_only_keras_model_is_served_by_every_worker_with_keras_outputs(served, models):
    expected = reference(models, "mlp")
    pids, answers, errors = set(), [], []

    def caller():
        try:
            client = served.client()
            for _ in range(20):
                answers.append(np.array(client.call("mlp", expected["x"].tolist())))
                pids.add(client.ping()["pid"])
        except Exception as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=caller) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not errors
    assert pids == served.worker_pids()  # both workers answered
    assert len(answers) == 80
    for answer in answers:
        np.testing.assert_allclose(answer, expected["y"], rtol=1e-5, atol=1e-5)


def test_savedmodel_and_tflite_files_serve_the_same_outputs(served, models):
    expected = reference(models, "mlp")
    client = served.client()
    for name in ("saved", "lite"):
        np.testing.assert_allclose(client.predict(name, expected["x"]), expected["y"], rtol=1e-5, atol=1e-5)


def test_numpy_arrays_travel_as_bytes_and_come_back_as_arrays(served, models):
    expected = reference(models, "mlp")
    client = served.client()
    got = client.predict("mlp", expected["x"])
    assert isinstance(got, np.ndarray) and got.dtype == np.float32 and got.shape == (6, 3)
    np.testing.assert_allclose(got, expected["y"], rtol=1e-5, atol=1e-5)
    # Another dtype and byte order are converted; nested lists in, arrays out on request.
    np.testing.assert_allclose(client.predict("mlp", expected["x"].astype(">f8")), expected["y"], rtol=1e-5, atol=1e-5)
    as_arrays = client.predict("mlp", expected["x"].tolist(), arrays=True)
    assert isinstance(as_arrays, np.ndarray)
    assert client.predict("mlp", np.zeros((0, 8), np.float32)).shape == (0, 3)


def test_multi_input_model_takes_and_returns_dicts_by_name(served, models):
    expected = reference(models, "multi")
    client = served.client()
    got = client.predict("multi", {"features": expected["features"], "ids": expected["ids"]})
    assert set(got) == {"score", "vector"}
    np.testing.assert_allclose(got["score"], expected["score"], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got["vector"], expected["vector"], rtol=1e-5, atol=1e-5)
    as_lists = client.call("multi", {"features": expected["features"].tolist(), "ids": expected["ids"].tolist()})
    np.testing.assert_allclose(np.array(as_lists["vector"]), expected["vector"], rtol=1e-5, atol=1e-5)


BAD_INPUTS = [
    ("mlp", [[1.0] * 8, [1.0] * 7], r"mlp: input 'x': rows are ragged .*; expected float32\[batch, 8\]"),
    ("mlp", [[1.0] * 9], r"mlp: input 'x': got shape \[1, 9\]; expected float32\[batch, 8\]"),
    ("mlp", [1.0] * 8, r"mlp: input 'x': got shape \[8\]; expected float32\[batch, 8\]"),
    ("mlp", [["a"] * 8], r"mlp: input 'x': got text .*; expected float32\[batch, 8\]"),
    ("mlp", {"y": [[1.0] * 8]}, r"mlp: inputs are \['y'\]; this model takes \['x'\]"),
    ("mlp", {arrays.KEY: ["float32", [1, 8], b"\0" * 31]}, r"mlp: input 'x': shape \[1, 8\] of float32 needs 32 bytes"),
    ("mlp", {arrays.KEY: ["object", [1, 8], b""]}, r"mlp: input 'x': dtype 'object' is not accepted"),
    ("multi", [[1.0] * 4], r"multi: this model takes several inputs; send a dict of batches by name"),
    ("multi", {"features": [[0.5] * 4], "ids": [[2**40] * 5]},
     r"multi: input 'ids': values from 1099511627776 to 1099511627776 do not fit int32"),
    ("multi", {"features": [[0.5] * 4], "ids": [[50] * 5]},
     r"multi: the model cannot run on these inputs: .*gather index out of bounds.*; check their values"),
    ("small", [[0.0] * 8] * 3, r"small: 3 rows in one call; at most 2 \(max_rows\): send them in several calls"),
    ("multi", {"features": [[0.5] * 4], "ids": [[0.5] * 5]}, r"multi: input 'ids': got floats .*; expected int32"),
    ("multi", {"features": [[0.5] * 4] * 2, "ids": [[1] * 5]},
     r"multi: input 'ids' has 1 rows where other inputs have 2"),
]


@pytest.mark.parametrize(("expert", "inputs", "message"), BAD_INPUTS)
def test_bad_input_gets_a_one_line_bad_request_naming_the_input_and_shape(served, expert, inputs, message):
    client = served.client()
    with pytest.raises(BadRequest, match=message) as refused:
        client.call(expert, inputs)
    assert "\n" not in str(refused.value)
    assert refused.value.expert == expert
    assert len(client.call("mlp", [[0.0] * 8])) == 1  # and the daemon goes on serving


def test_an_empty_batch_gets_an_empty_answer_whatever_the_dtypes(served):
    client = served.client()
    assert client.call("multi", {"features": [], "ids": []}) == {"score": [], "vector": []}
    assert client.call("mlp", []) == []


def test_model_expert_answers_json_over_http(served, models):
    expected = reference(models, "mlp")
    done = subprocess.run(["curl", "-s", "--unix-socket", str(served.socket), "http://localhost/call/mlp",
                           "-d", json.dumps({"inputs": expected["x"].tolist()})],
                          capture_output=True, text=True, timeout=30)
    np.testing.assert_allclose(np.array(json.loads(done.stdout)), expected["y"], rtol=1e-5, atol=1e-5)


def test_expertctl_list_shows_a_model_experts_inputs_and_outputs(served):
    done = served.ctl("list")
    assert done.returncode == 0, done.stderr
    assert "x: float32[batch, 8]" in done.stdout and "scores: float32[batch, 3]" in done.stdout
    described = {e["name"]: e for e in served.client().experts()}
    assert described["mlp"]["runtime"] == "litert"
    assert described["multi"]["inputs"] == [{"name": "features", "dtype": "float32", "shape": [-1, 4]},
                                            {"name": "ids", "dtype": "int32", "shape": [-1, 5]}]


def test_a_changed_model_file_is_prepared_again_on_reload(models, short_dir):
    path = short_dir / "current.keras"
    shutil.copy(models / "mlp.keras", path)
    cache = short_dir / "cache"
    daemon = start(short_dir, {"current": {"model": path}}, model_cache=cache)
    try:
        first, second = reference(models, "mlp"), reference(models, "mlp2")
        client = daemon.client()
        np.testing.assert_allclose(client.predict("current", first["x"]), first["y"], rtol=1e-5, atol=1e-5)
        shutil.copy(models / "mlp2.keras", path)
        daemon.send_signal(signal.SIGHUP)
        assert wait_until(lambda: "reload done" in daemon.log, timeout=120), daemon.log
        np.testing.assert_allclose(client.predict("current", first["x"]), second["y"], rtol=1e-5, atol=1e-5)
        entries = [p for p in cache.iterdir() if p.is_dir() and not p.name.startswith(".")]
        assert len(entries) == 2  # one per content; neither is rewritten
    finally:
        daemon.kill()


def test_the_correctness_guard_refuses_a_wrong_prepared_file(models, short_dir):
    cache = short_dir / "cache"
    config = write_config(short_dir, {"mlp": {"model": models / "mlp.keras"}}, model_cache=cache)
    assert run_expertd("--config", str(config), "--check", timeout=300).returncode == 0
    (entry,) = [p for p in cache.iterdir() if p.is_dir() and not p.name.startswith(".")]
    # Put another model (same shape, other weights) where the prepared one was.
    os.chmod(entry / "model.tflite", 0o644)
    other = short_dir / "other"
    other.mkdir()
    config_other = write_config(other, {"mlp": {"model": models / "mlp2.keras"}}, model_cache=other / "cache")
    assert run_expertd("--config", str(config_other), "--check", timeout=300).returncode == 0
    (other_entry,) = [p for p in (other / "cache").iterdir() if p.is_dir() and not p.name.startswith(".")]
    shutil.copy(other_entry / "model.tflite", entry / "model.tflite")
    (entry / "xnnpack.cache").unlink(missing_ok=True)  # (small models run on the interpreter: none)

    done = run_expertd("--config", str(config), "--socket", str(short_dir / "g.sock"), "--workers", "1", timeout=120)
    assert done.returncode != 0
    assert "differs from the original model's" in done.stderr
    assert f"delete {entry} to prepare it again" in done.stderr


def test_two_daemons_preparing_one_model_at_once_make_one_entry(models, short_dir):
    cache = short_dir / "cache"
    configs = []
    for name in ("a", "b"):
        (short_dir / name).mkdir()
        configs.append(write_config(short_dir / name, {"m": {"model": models / "multi.keras"}}, model_cache=cache))
    checks = [subprocess.Popen([sys.executable, "-m", "expertd", "--config", str(c), "--check"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE) for c in configs]
    for check in checks:
        assert check.wait(300) == 0, check.stderr.read()
    entries = list(cache.iterdir())
    assert len([p for p in entries if p.is_dir() and not p.name.startswith(".")]) == 1
    assert not [p for p in entries if p.name.startswith(".") and p.name != ".hashes"]  # nothing half-prepared


def test_a_model_litert_cannot_express_runs_on_tensorflow_with_a_warning_naming_the_op(models, short_dir):
    daemon = start(short_dir, {"odd": {"model": models / "unsupported"}}, workers=1)
    try:
        expected = reference(models, "unsupported")
        np.testing.assert_allclose(daemon.client().predict("odd", expected["x"]), expected["y"], rtol=1e-5)
        assert "runs on TensorFlow, not LiteRT (ops outside TensorFlow Lite's builtin set: tf.Igamma)" in daemon.log
    finally:
        daemon.kill()


def test_the_tensorflow_fallback_still_shares_the_weights_between_workers(models, short_dir):
    """64 MiB of weights behind an op LiteRT lacks, 2 workers: each worker's private memory stays well below it."""
    daemon = start(short_dir, {"odd": {"model": models / "unsupported_big"}}, workers=2, intra_op_threads=1)
    try:
        expected = reference(models, "unsupported_big")
        client = daemon.client()
        for _ in range(6):
            np.testing.assert_allclose(client.predict("odd", expected["x"]), expected["y"], rtol=1e-4, atol=1e-5)
        assert client.experts()[0]["runtime"] == "tensorflow-graph"
        assert "the weights are still shared by every worker" in daemon.log
        private = {pid: psutil.Process(pid).memory_full_info().uss for pid in daemon.worker_pids()}
        assert all(uss < 48 * 2**20 for uss in private.values()), {p: u / 2**20 for p, u in private.items()}
    finally:
        daemon.kill()


@pytest.mark.parametrize(("model", "message"), [
    ("missing.keras", r"\[expert:m\] model = .*missing.keras: no model at .*missing.keras; check the path"),
    ("notes.txt", r"unknown model format '.txt'; use a .keras or .h5 file, a .tflite file or a SavedModel directory"),
    ("broken.keras", r"preparing .*broken.keras failed: Keras cannot load"),
])
def test_a_bad_model_stops_start_up_with_one_line(short_dir, model, message):
    (short_dir / "notes.txt").write_text("not a model")
    (short_dir / "broken.keras").write_bytes(b"PK\x03\x04 not really a zip")
    config = write_config(short_dir, {"m": {"model": model}}, model_cache=short_dir / "cache")
    done = run_expertd("--config", str(config), "--check", timeout=300)
    assert done.returncode != 0
    # Progress lines (preparing ...) are log lines; the error is one line of its own.
    lines = [line for line in done.stderr.splitlines() if line.startswith("expertd: ")]
    assert len(lines) == 1, done.stderr
    assert __import__("re").search(message, lines[0]), lines[0]


def test_a_model_that_computes_nan_is_served_with_its_nans(models, short_dir):
    daemon = start(short_dir, {"log": {"model": models / "log1p"}}, workers=1)
    try:
        got = daemon.client().predict("log", np.array([[-2.0, 0.0, 1.0, -1.0]], np.float32))
        assert np.isnan(got[0, 0]) and got[0, 1] == 0.0 and np.isinf(got[0, 3])
    finally:
        daemon.kill()


def test_a_half_deleted_cache_entry_is_prepared_again(models, short_dir):
    config = write_config(short_dir, {"m": {"model": models / "mlp.keras"}}, model_cache=short_dir / "cache")
    assert run_expertd("--config", str(config), "--check", timeout=300).returncode == 0
    (entry,) = [p for p in (short_dir / "cache").iterdir() if p.is_dir() and not p.name.startswith(".")]
    (entry / "manifest.json").unlink()
    done = run_expertd("--config", str(config), "--check", timeout=300)
    assert done.returncode == 0, done.stderr
    assert (entry / "manifest.json").exists()


def test_a_cache_entry_others_can_write_is_refused(models, short_dir):
    config = write_config(short_dir, {"m": {"model": models / "mlp.keras"}}, model_cache=short_dir / "cache")
    assert run_expertd("--config", str(config), "--check", timeout=300).returncode == 0
    (entry,) = [p for p in (short_dir / "cache").iterdir() if p.is_dir() and not p.name.startswith(".")]
    entry.chmod(0o777)
    done = run_expertd("--config", str(config), "--check", timeout=60)
    assert done.returncode != 0
    assert f"the model cache entry {entry} is writable by others (mode 0777)" in done.stderr


def test_a_model_file_that_changes_while_being_prepared_is_not_cached(models, short_dir):
    out = short_dir / "scratch"
    out.mkdir()
    done = subprocess.run([sys.executable, "-m", "expertd.prepare", str(models / "mlp.keras"), str(out),
                           "--sha256", "0" * 64], capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    assert "mlp.keras changed while it was being prepared" in done.stderr
    assert not (out / "manifest.json").exists()


def test_max_rows_belongs_to_model_experts(short_dir):
    config = write_config(short_dir, {"f": {"function": "squares:square", "max_rows": 3}})
    done = run_expertd("--config", str(config), "--check")
    assert done.returncode != 0
    assert "[expert:f] max_rows: only model experts take it" in done.stderr


def test_model_and_function_together_are_a_config_error(short_dir):
    config = write_config(short_dir, {"m": {"model": "x.keras", "function": "squares:square"}})
    done = run_expertd("--config", str(config), "--check")
    assert done.returncode != 0
    assert "[expert:m]: both function and model are set; keep one" in done.stderr


def test_workers_share_one_copy_of_the_weights(models, short_dir):
    """64 MiB of weights, 3 workers: each worker's private memory stays far below the weights' size."""
    daemon = start(short_dir, {"big": {"model": models / "big.keras"}}, workers=3, intra_op_threads=1)
    try:
        client = daemon.client()
        for rows in (1, 7, 1, 32):
            assert client.predict("big", np.ones((rows, 2048), np.float32)).shape == (rows, 2048)
        pids = daemon.worker_pids()
        for _ in range(12):  # every worker runs at several batch sizes
            client.predict("big", np.ones((3, 2048), np.float32))
        private = {pid: psutil.Process(pid).memory_full_info().uss for pid in pids}
        weights = 64 * 2**20
        assert all(uss < weights / 2 for uss in private.values()), {p: u / 2**20 for p, u in private.items()}
    finally:
        daemon.kill()


def test_model_in_a_python_expert_is_prepared_and_loaded_for_it(models, short_dir):
    module = short_dir / "scorer.py"
    module.write_text(
        "from expertd import Model, expert\n"
        f"MODEL = Model({str(models / 'mlp.keras')!r})\n"
        "@expert\n"
        "def best(rows):\n"
        "    return MODEL.predict(rows).argmax(axis=1).tolist()\n"
    )
    daemon = start(short_dir, {"best": "scorer:best"}, pythonpath=f"{short_dir}")
    try:
        expected = reference(models, "mlp")
        assert daemon.client().call("best", expected["x"].tolist()) == expected["y"].argmax(axis=1).tolist()
        with pytest.raises(BadRequest, match=r"mlp.keras: input 'x': got shape \[1, 2\]") as refused:
            daemon.client().call("best", [[1.0, 2.0]])
        assert refused.value.expert == "best"  # the expert called, not the model's file
    finally:
        daemon.kill()


def _post_rows(served, expert: str, body: bytes, content_type: str = "application/octet-stream"):
    conn = UnixHTTPConnection(served.socket, timeout=30)
    try:
        conn.request("POST", f"/call/{expert}", body, {"Content-Type": content_type})
        response = conn.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        conn.close()


@pytest.mark.parametrize("expert", ["mlp", "lite"])
def test_rows_sent_as_raw_bytes_over_http_come_back_as_raw_bytes(served, models, expert):
    expected = reference(models, "mlp")
    x = expected["x"].astype(np.float32)
    status, headers, body = _post_rows(served, expert, x.tobytes())
    assert status == 200, body
    assert headers["Content-Type"] == "application/octet-stream"
    assert headers["X-Expertd-Dtype"] == "float32"
    shape = [int(d) for d in headers["X-Expertd-Shape"].split(",")]
    assert shape == list(expected["y"].shape)
    answer = np.frombuffer(body, dtype="<f4").reshape(shape)
    np.testing.assert_allclose(answer, expected["y"], rtol=1e-5, atol=1e-5)
    assert np.array_equal(answer, served.client().predict(expert, x))  # (the same bytes as the socket's client)


@pytest.mark.parametrize(("expert", "body", "message"), [
    ("mlp", b"\0" * 10, "mlp: the body is 10 bytes, not whole rows of float32[batch, 8] (32 bytes each, "
                        "little-endian)"),
    ("multi", b"\0" * 32, "multi has 2 inputs and 2 outputs: an application/octet-stream body carries one"),
])
def test_raw_bytes_that_are_not_whole_rows_of_one_input_get_a_one_line_bad_request(served, expert, body, message):
    status, headers, reply = _post_rows(served, expert, body)
    assert status == 400
    assert headers["Content-Type"] == "application/json"
    error = json.loads(reply)["error"]
    assert error["code"] == "bad_request" and message in error["message"] and "\n" not in error["message"]
    assert _post_rows(served, "mlp", b"\0" * 64)[0] == 200  # (the daemon serves on)


def test_raw_bytes_for_an_expert_that_is_not_a_model_are_refused_with_the_way_to_call_it(short_dir):
    daemon = start(short_dir, {"echo": "testexperts:echo"}, workers=1)
    try:
        # A body nested past what JSON readers can read is refused, raw or JSON, and the worker lives on.
        pids = [w["pid"] for w in daemon.client().status()["workers"]]
        for content_type in ("application/octet-stream", "application/json"):
            status, _, reply = _post_rows(daemon, "echo", b"[" * 5000, content_type)
            assert status == 400, reply
        assert [w["pid"] for w in daemon.client().status()["workers"]] == pids
        status, _, reply = _post_rows(daemon, "echo", b"[1]")
        assert status == 400
        assert "echo is not a model expert" in json.loads(reply)["error"]["message"]
        assert "send JSON" in json.loads(reply)["error"]["message"]
        assert json.loads(_post_rows(daemon, "echo", b"[1]", "application/json")[2]) == {"args": [1], "kwargs": {}}
    finally:
        daemon.kill()


def test_raw_and_json_callers_at_once_each_get_their_own_rows_answer(served, models):
    rows = reference(models, "mlp")["x"].astype(np.float32)
    expected = served.client().predict("mlp", rows)
    failures: list[str] = []

    def caller(index: int) -> None:
        try:
            calls(index)
        except Exception as exc:  # (a dropped connection: a failure too)
            failures.append(f"caller {index}: {type(exc).__name__}: {exc}")

    def calls(index: int) -> None:
        row = rows[index % len(rows)][None, :]
        for turn in range(5):
            if (index + turn) % 2:
                status, _, body = _post_rows(served, "mlp", row.tobytes())
                answer = np.frombuffer(body, dtype="<f4").reshape(1, -1) if status == 200 else None
            else:
                status, _, body = _post_rows(served, "mlp", json.dumps({"inputs": row.tolist()}).encode(),
                                             "application/json")
                answer = np.asarray(json.loads(body), dtype=np.float32) if status == 200 else None
            if answer is None or not np.allclose(answer, expected[index % len(rows)][None, :], atol=1e-6):
                failures.append(f"caller {index}, turn {turn}: {status} {body[:80]!r}")

    threads = [threading.Thread(target=caller, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not any(thread.is_alive() for thread in threads)
    assert failures == []
