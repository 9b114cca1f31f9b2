"""Callers for bench/peers.py: C processes, closed loop, one kept-alive connection each, one shared window.

Each caller is a process of its own (so that callers do not share a GIL), with
one connection kept alive, calling as fast as its replies come: it warms up,
waits at a barrier for the others, then calls for ``seconds``; a call is
counted when it ends inside the window.  Every caller sends its own row (a
float32 row of 2,048 from a seeded generator, :func:`rows`), and keeps its
first reply, which the harness checks against the model's output computed in
numpy.

Kinds of call:

- ``raw``: ``POST /predict`` with the row as 8,192 bytes of float32 (the
  peers' contract, bench/peers/*/serve.py), the reply read with
  ``np.frombuffer``; the ``X-Worker-Pid`` header names the model worker.
- ``json``: expertd's HTTP API, ``POST /call/mlp`` with ``{"inputs": [row]}``
  (docs/http.md), the reply read with orjson as a JSON client would
  read 40 KB of floats (the body is made once, outside the window).
- ``binary``: the same route with the row as raw bytes
  (``Content-Type: application/octet-stream``, docs/http.md), raw bytes back.
- ``socket``: expertd's own client on its Unix socket, ``Client.predict``
  (numpy arrays as raw bytes on the wire).
- ``square-raw`` / ``square-dirty`` / ``square-json`` / ``square-socket``: the
  trivial function, ``POST /square`` with ``7`` (a peer), through a gunicorn
  dirty worker, expertd's ``POST /call/square`` with ``[7]``, or its client's
  ``call("square", 7)`` on the socket.
"""

from __future__ import annotations

import http.client
import json
import multiprocessing
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
WIDTH = 2048

try:
    import orjson

    read_json = orjson.loads
except ImportError:  # (expertd depends on it; a plain venv still runs)
    read_json = json.loads


def rows(count: int) -> np.ndarray:
    """Caller i's row is rows(count)[i]: float32, from a seeded generator (the same in every run)."""
    return np.random.default_rng(2048).standard_normal((count, WIDTH), dtype=np.float32)


def make_call(spec: dict, index: int):
    """A function that makes one call and returns (worker pid or None, reply)."""
    kind = spec["kind"]
    if kind in ("socket", "square-socket"):
        sys.path.insert(0, str(ROOT))
        from expertd.client import Client

        client = Client(spec["socket"], timeout=120)
        if kind == "square-socket":
            return lambda: (None, client.call("square", 7))
        x = rows(spec["rows"])[index:index + 1]
        return lambda: (None, client.predict("mlp", x))
    host, port = spec["url"].rsplit("/", 1)[-1].split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=120)
    x = rows(spec["rows"])[index:index + 1]
    path, body, content_type, read = {
        "raw": ("/predict", x.tobytes(), "application/octet-stream",
                lambda data: np.frombuffer(data, dtype=np.float32).reshape(-1, WIDTH)),
        "json": ("/call/mlp", json.dumps({"inputs": x.tolist()}).encode(), "application/json",
                 lambda data: np.asarray(read_json(data), dtype=np.float32)),
        "binary": ("/call/mlp", x.tobytes(), "application/octet-stream",
                   lambda data: np.frombuffer(data, dtype=np.float32).reshape(-1, WIDTH)),
        "square-raw": ("/square", b"7", "application/json", read_json),
        "square-dirty": ("/square-dirty", b"7", "application/json", read_json),
        "square-json": ("/call/square", b"[7]", "application/json", read_json),
    }[kind]
    headers = {"Content-Type": content_type}

    def call() -> tuple[int | None, object]:
        conn.request("POST", path, body, headers)
        response = conn.getresponse()
        data = response.read()
        if response.status != 200:
            raise RuntimeError(f"HTTP {response.status}: {data[:300]!r}")
        pid = response.getheader("X-Worker-Pid")
        return (int(pid) if pid else None), read(data)

    return call


def _caller(spec: dict, index: int, barrier, results) -> None:
    """(A child process.)  One caller: warm up, wait for the others, call for ``seconds``, report."""
    try:
        call = make_call(spec, index)
        for _ in range(spec["warmup"]):
            call()
    except BaseException as exc:
        barrier.abort()
        results.put((index, None, 1, f"{type(exc).__name__}: {exc}", None, set()))
        return
    try:
        barrier.wait(300)
    except Exception:  # another caller failed to start
        results.put((index, None, 0, None, None, set()))
        return
    clock = time.perf_counter
    latencies: list[float] = []
    errors, example, first, pids = 0, None, None, set()
    deadline = clock() + spec["seconds"]
    while True:
        begin = clock()
        if begin >= deadline:
            break
        try:
            pid, reply = call()
        except Exception as exc:
            errors += 1
            example = example or f"{type(exc).__name__}: {exc}"
            time.sleep(0.01)  # (a server that refuses at once must not turn this into a busy loop)
            continue
        end = clock()
        if end > deadline:  # finished after the window closed: not counted
            break
        latencies.append(end - begin)
        pids.add(pid)
        if first is None:
            first = reply
    results.put((index, latencies, errors, example, first, pids))


def run(spec: dict, callers: int) -> dict:
    """``callers`` processes of ``spec`` (kind, url or socket, seconds, warmup, rows), one window; figures.

    Returns calls, errors, items/s, p50/p90/p99 (ms), the model-worker pids the replies named, and each
    caller's first reply (index -> reply) for the harness to check.
    """
    spec = {"rows": 16, "warmup": 3, **spec}
    context = multiprocessing.get_context("fork")
    barrier = context.Barrier(callers)
    results = context.Queue()
    procs = [context.Process(target=_caller, args=(spec, i, barrier, results), daemon=True) for i in range(callers)]
    for proc in procs:
        proc.start()
    latencies: list[float] = []
    errors, examples, replies, pids = 0, [], {}, set()
    try:
        for _ in procs:
            index, some, failed, example, first, seen = results.get(timeout=spec["seconds"] + 600)
            errors += failed
            if example:
                examples.append(example)
            if some:
                latencies += some
                replies[index] = first
                pids |= seen
    finally:
        for proc in procs:
            proc.join(30)
            if proc.is_alive():
                proc.kill()
    latencies.sort()

    def pct(q: float) -> float | None:
        return latencies[min(len(latencies) - 1, int(q * len(latencies)))] * 1000 if latencies else None

    return {"clients": callers, "calls": len(latencies), "errors": errors, "error_examples": examples[:3],
            "items_s": len(latencies) / spec["seconds"], "p50_ms": pct(0.5), "p90_ms": pct(0.9),
            "p99_ms": pct(0.99), "pids": sorted(p for p in pids if p is not None), "replies": replies}


if __name__ == "__main__":  # a quick look: python bench/peer_load.py raw http://127.0.0.1:8000 16
    kind, target, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
    where = {"socket": target} if kind == "socket" else {"url": target}
    figures = run({"kind": kind, "seconds": 5.0, **where}, count)
    figures.pop("replies")
    print(json.dumps(figures))
