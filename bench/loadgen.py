"""Closed-loop load generator: C client processes calling as fast as they can for T seconds.

    python loadgen.py expertd SOCKET EXPERT ARGS_JSON --clients C --seconds T
    python loadgen.py http SOCKET EXPERT ARGS_JSON --clients C --seconds T    (expertd's HTTP/JSON front)
    python loadgen.py firefly URL FUNCTION KWARGS_JSON --clients C --seconds T
    python loadgen.py keepalive URL FUNCTION KWARGS_JSON ...   (Firefly's route, one kept-alive connection)
    python loadgen.py floor SOCKET --clients 1 --seconds T
    ... --cpu N    (clients run on CPU N only)

Prints one JSON object: calls, errors, throughput (calls/s), p50/p90/p99 latency
(µs), and the clients' CPU time per call (user and system, µs).  Each client
is a process with its own connection (for Firefly: its own client object,
which opens a connection per call as Firefly's client does).
Runs under whichever interpreter has the client it needs: the harness starts
it with the Firefly venv's Python for Firefly.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import socket
import struct
import sys
import time


def _expertd_caller(target: str, name: str, args: list):
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    from expertd.client import Client

    client = Client(target, timeout=60)
    return lambda: client.call(name, *args)


def _firefly_caller(target: str, name: str, kwargs: dict):
    import firefly

    client = firefly.Client(target)
    function = getattr(client, name)
    return lambda: function(**kwargs)


def _json_poster(conn, path: str, value: object):
    """A call: POST ``value`` as JSON to ``path`` on the kept-alive ``conn`` (http.client), its JSON reply."""
    body = json.dumps(value).encode()
    headers = {"Content-Type": "application/json"}

    def call():
        conn.request("POST", path, body, headers)
        response = conn.getresponse()
        data = response.read()
        if response.status != 200:
            raise RuntimeError(data.decode())
        return json.loads(data)

    return call


def _http_caller(target: str, name: str, args: list):
    """expertd's HTTP/JSON front over its Unix socket, one keep-alive connection (http.client)."""
    import http.client

    class UnixConnection(http.client.HTTPConnection):
        def connect(self) -> None:
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.sock.connect(target)

    return _json_poster(UnixConnection("localhost", timeout=60), f"/call/{name}", args)


def _keepalive_caller(target: str, name: str, kwargs: dict):
    """POST /NAME with a JSON object (Firefly's protocol) on one kept-alive connection (http.client), as curl
    with keep-alive or a Rails app's persistent client calls; a server that closes after each reply (Firefly's
    HTTP/1.0 one) is connected to again, as such a client would."""
    import http.client
    from urllib.parse import urlsplit

    url = urlsplit(target)
    return _json_poster(http.client.HTTPConnection(url.hostname, url.port, timeout=60), f"/{name}", kwargs)


def _floor_caller(target: str):
    import msgpack

    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(target)
    counter = iter(range(1 << 62))

    def call():
        body = msgpack.packb(["square", [next(counter)], {}])
        sock.sendall(struct.pack("!I", len(body)) + body)
        data = sock.recv(65536)  # one read: the reply arrives whole
        (length,) = struct.unpack_from("!I", data)
        if len(data) < 4 + length:
            data += sock.recv(4 + length - len(data), socket.MSG_WAITALL)
        return msgpack.unpackb(data[4:])

    return call


def _client(options, results) -> None:
    if options.cpu is not None:
        os.sched_setaffinity(0, {options.cpu})
    if options.kind == "expertd":
        call = _expertd_caller(options.target, options.name, json.loads(options.arguments))
    elif options.kind == "http":
        call = _http_caller(options.target, options.name, json.loads(options.arguments))
    elif options.kind == "firefly":
        call = _firefly_caller(options.target, options.name, json.loads(options.arguments))
    elif options.kind == "keepalive":
        call = _keepalive_caller(options.target, options.name, json.loads(options.arguments))
    else:
        call = _floor_caller(options.target)
    for _ in range(20):  # warm up: connection, caches
        call()
    latencies, errors, example = [], 0, None
    clock = time.perf_counter
    cpu_before = os.times()
    deadline = clock() + options.seconds
    while True:
        started = clock()
        if started >= deadline:
            break
        try:
            call()
        except Exception as exc:
            errors += 1
            example = example or f"{type(exc).__name__}: {exc}"
            continue
        latencies.append(clock() - started)
    cpu_after = os.times()
    cpu = (cpu_after.user - cpu_before.user, cpu_after.system - cpu_before.system)
    results.put((latencies, errors, example, cpu))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("kind", choices=["expertd", "http", "firefly", "keepalive", "floor"])
    parser.add_argument("target")
    parser.add_argument("name", nargs="?", default="square")
    parser.add_argument("arguments", nargs="?", default="[3]")
    parser.add_argument("--clients", type=int, default=1)
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--cpu", type=int, default=None, help="run the clients on this CPU only")
    options = parser.parse_args()

    context = multiprocessing.get_context("fork")
    results = context.Queue()
    procs = [context.Process(target=_client, args=(options, results)) for _ in range(options.clients)]
    for proc in procs:
        proc.start()
    latencies, errors, examples, user, system = [], 0, [], 0.0, 0.0
    for _ in procs:
        some, failed, example, (some_user, some_system) = results.get(timeout=options.seconds + 120)
        latencies += some
        errors += failed
        user += some_user
        system += some_system
        if example:
            examples.append(example)
    for proc in procs:
        proc.join()
    latencies.sort()

    def pct(q: float) -> float:
        return latencies[min(len(latencies) - 1, int(q * len(latencies)))] * 1e6 if latencies else float("nan")

    print(json.dumps({
        "kind": options.kind, "clients": options.clients, "calls": len(latencies), "errors": errors,
        "throughput": len(latencies) / options.seconds, "p50_us": pct(0.5), "p90_us": pct(0.9), "p99_us": pct(0.99),
        "client_user_us": user / max(1, len(latencies)) * 1e6, "client_sys_us": system / max(1, len(latencies)) * 1e6,
        "error_examples": examples[:3],
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
