"""The gunicorn peer of ``make bench-peers``: gunicorn 27's dirty arbiters serving the 192 MiB Keras MLP.

Run (cwd = the repository root; bench/peers.py does this)::

    bench/.venv-peer-gunicorn/bin/python bench/peers/gunicorn/serve.py --port PORT --workers N \
        --model /abs/path/mlp192.keras --threads 1

It starts ``gunicorn`` from the same virtualenv as a child in its own session, prints ``ready`` on stdout once a
``POST /predict`` is answered, forwards SIGHUP (gunicorn's reload) and SIGTERM (gunicorn's graceful stop) to gunicorn's
master, and exits when gunicorn has. Everything gunicorn logs goes to stderr; stdout carries only ``ready`` and
``reloaded``.

The process tree (the shape issue #19 measured): gunicorn's master; 2 gthread HTTP workers × 4 threads that take the
HTTP requests (http_app.py) and answer /square themselves; one dirty arbiter; ``--workers N`` dirty workers, each of
which loads the model once in its dirty app's ``init()`` (model_app.py). An HTTP worker thread hands /predict and
/square-dirty to the dirty arbiter with the dirty client's ``execute()``; the arbiter passes it to a dirty worker
(round-robin) and the reply back.

gunicorn settings that are not gunicorn's defaults, and why:

- ``--bind 127.0.0.1:PORT``: the harness's port, loopback only.
- ``--worker-class gthread --workers 2 --threads 4``: the HTTP side the issue measured. gthread is gunicorn's worker
  for blocking I/O with keep-alive (the sync worker closes every connection), and an HTTP thread blocks in
  ``execute()`` while the model runs, so 4 threads per worker let 8 calls wait on the dirty workers at once.
- ``--dirty-app model_app:ModelApp --dirty-workers N``: the model in N dirty workers (gunicorn's default is none).
- ``--pythonpath bench/peers/gunicorn``: where http_app.py and model_app.py are.
- environment ``PEER_MODEL`` and ``PEER_TF_THREADS`` for the dirty app (gunicorn has no setting for an app's own
  parameters; its docs' dirty apps read their own configuration).

Left at gunicorn's defaults: ``dirty_threads`` 1 (one model call at a time per dirty worker, which is what the model
wants with 1 intra-op thread), ``dirty_timeout`` 300 s, ``keepalive`` 2 s, ``graceful_timeout`` 30 s,
``dirty_graceful_timeout`` 30 s, no access log, error log on stderr at level info.

Reload: SIGHUP is forwarded to gunicorn's master, gunicorn's documented reload (what a user would send). It replaces
the HTTP workers gracefully and forwards SIGHUP to the dirty arbiter, whose own reload (``DirtyArbiter.reload``) is
racy in 27.0.1 (it broke in the helper's runs and in one full make bench-peers, and completed in 5 s in another): it
forks N new dirty workers, and within a second both its own "kill old workers" step (which
takes ``list(self.workers)[N:]``, i.e. the NEW workers while the old ones are not yet reaped) and the arbiter's
once-a-second ``manage_workers()`` (which kills the oldest while there are more than N) send SIGTERM: the old workers
exit at once, the new ones get SIGTERM while their ``init()`` loads the model, so they come up with ``alive = False``,
accept the arbiter's connections and close them unread. Every /predict then fails (500, "Connection lost" /
"Connection reset by peer" in the log) and, because a worker that never beat its heartbeat is never seen as timed
out (its heartbeat file holds wall-clock time, compared with ``time.monotonic()``), nothing recovers until gunicorn
is restarted. serve.py prints ``reloaded`` only when a ``POST /predict`` is answered by a dirty worker that did not
exist when SIGHUP came, and says on stderr if none has after RELOAD_WAIT_S. README.md next to this file has the
measurements.
"""

import argparse
import http.client
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
HTTP_WORKERS = 2
HTTP_THREADS = 4
READY_WAIT_S = 300.0
RELOAD_WAIT_S = 120.0
STOP_WAIT_S = 40.0
POLL_S = 0.1
ROW = bytes(2048 * 4)  # one row of float32 zeros: the probe that says the model answers


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--workers", type=int, required=True, help="dirty workers, each holding the model")
    parser.add_argument("--model", required=True, help="absolute path of mlp192.keras")
    parser.add_argument("--threads", type=int, default=1, help="TensorFlow intra-op threads per dirty worker")
    parser.add_argument("--variant", default="default", choices=["default"], help="this peer has one configuration")
    return parser.parse_args(argv)


def gunicorn_command(args):
    """The gunicorn command line: the virtualenv's own ``gunicorn`` script, with the settings listed above."""
    return [str(Path(sys.executable).parent / "gunicorn"),
            "--bind", f"127.0.0.1:{args.port}",
            "--worker-class", "gthread", "--workers", str(HTTP_WORKERS), "--threads", str(HTTP_THREADS),
            "--dirty-app", "model_app:ModelApp", "--dirty-workers", str(args.workers),
            "--pythonpath", str(HERE),
            "http_app:application"]


def predict_pid(port, timeout=10.0):
    """POST one zero row to /predict; the X-Worker-Pid of a 200 reply, else None."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        connection.request("POST", "/predict", ROW, {"Content-Type": "application/octet-stream"})
        reply = connection.getresponse()
        reply.read()
        return int(reply.getheader("X-Worker-Pid")) if reply.status == 200 else None
    except (OSError, http.client.HTTPException, TypeError, ValueError):
        return None
    finally:
        connection.close()


def parents():
    """pid → parent pid for every process, from /proc."""
    out = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            out[int(entry)] = int(stat.rsplit(")", 1)[1].split()[1])
    return out


def grandchildren(pid):
    """The dirty workers: the children of the master's children (HTTP workers have none; the dirty arbiter has)."""
    ppid = parents()
    children = {p for p, parent in ppid.items() if parent == pid}
    return {p for p, parent in ppid.items() if parent in children}


def session_members(sid):
    out = []
    for pid in parents():
        try:
            if os.getsid(pid) == sid:
                out.append(pid)
        except OSError:
            pass
    return out


def say(line):
    print(line, flush=True)


def log(line):
    print(f"serve.py: {line}", file=sys.stderr, flush=True)


def watch_reload(port, old, stop):
    """Print ``reloaded`` once /predict is answered by a dirty worker not in ``old``."""
    deadline = time.monotonic() + RELOAD_WAIT_S
    while not stop.is_set() and time.monotonic() < deadline:
        pid = predict_pid(port)
        if pid is not None and pid not in old:
            say("reloaded")
            return
        time.sleep(POLL_S)
    if not stop.is_set():
        log(f"no new dirty worker answered /predict within {RELOAD_WAIT_S:.0f} s of SIGHUP "
            f"(dirty workers before: {sorted(old)}, now: {sorted(grandchildren(os.getpid()))})")


def main(argv=None):
    args = parse_args(argv)
    env = dict(os.environ, PEER_MODEL=str(Path(args.model).resolve()), PEER_TF_THREADS=str(args.threads))
    master = subprocess.Popen(gunicorn_command(args), env=env, stdout=sys.stderr, start_new_session=True)
    stop, hup = threading.Event(), threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    signal.signal(signal.SIGHUP, lambda *_: hup.set())

    deadline = time.monotonic() + READY_WAIT_S
    while not stop.is_set() and master.poll() is None:
        if predict_pid(args.port) is not None:
            say("ready")
            break
        if time.monotonic() > deadline:
            log(f"no answer from /predict within {READY_WAIT_S:.0f} s; stopping")
            stop.set()
        time.sleep(POLL_S)

    while not stop.is_set() and master.poll() is None:
        if hup.is_set():
            hup.clear()
            old = grandchildren(master.pid)
            master.send_signal(signal.SIGHUP)
            threading.Thread(target=watch_reload, args=(args.port, old, stop), daemon=True).start()
        time.sleep(0.05)

    stop.set()
    if master.poll() is None:
        master.send_signal(signal.SIGTERM)  # gunicorn's graceful stop: HTTP workers, dirty arbiter, dirty workers
        try:
            master.wait(STOP_WAIT_S)
        except subprocess.TimeoutExpired:
            log(f"gunicorn still running {STOP_WAIT_S:.0f} s after SIGTERM; SIGKILL to its session")
            os.killpg(master.pid, signal.SIGKILL)
            master.wait()
    for _ in range(50):  # gunicorn stops its children before the master exits; check that none is left
        left = session_members(master.pid)
        if not left:
            break
        time.sleep(0.1)
    else:
        log(f"processes left after gunicorn's master exited: {left}; SIGKILL")
        for pid in left:
            os.kill(pid, signal.SIGKILL)
    return max(master.returncode, 0)


if __name__ == "__main__":
    sys.exit(main())
