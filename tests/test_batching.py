"""Dynamic batching on a real daemon: concurrent calls of a batched expert go to one worker together.

The batched expert (tests/experts/batched.py:tagged) answers each call with the
batch it was computed in, so that a test sees which calls shared a batch.  To
make a batch of known members, a test holds the only worker with an unbatched
``gate`` call, makes its calls (each on its own connection), waits until the
master shows them all queued, and releases the gate: the queued calls then go
to the worker as one batch.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import statistics
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import msgpack
import pytest

from expertd import protocol
from expertd.errors import BadRequest, ExpertFailed, RequestTimeout, WorkerLost

from conftest import EXAMPLES, Daemon, UnixHTTPConnection, free_port, run_expertd, wait_until, write_config

EXPERTS = {"tagged": "batched:tagged", "gate": "batched:gate", "add": "testexperts:add"}


# ------------------------------------------------------------------------------------------ helpers
def post(conn: http.client.HTTPConnection, path: str, body: object) -> tuple[int, object]:
    try:
        conn.request("POST", path, body=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        return response.status, json.loads(response.read())
    finally:
        conn.close()


def queued(daemon: Daemon) -> int:
    """Whole requests waiting for a worker, as the master counts them (its own /metrics)."""
    conn = UnixHTTPConnection(daemon.socket, timeout=30)
    conn.request("GET", "/metrics")
    text = conn.getresponse().read().decode()
    conn.close()
    return next(int(float(line.split()[1])) for line in text.splitlines()
                if line.startswith("expertd_queued_requests "))


def outcome(future: Future) -> object:
    """A call's result, or the exception it raised."""
    error = future.exception(timeout=30)
    return error if error is not None else future.result()


def at_once(calls: list[Callable[[], object]]) -> list[object]:
    """Run every call in a thread of its own, all at once: each one's result or exception, in order."""
    with ThreadPoolExecutor(len(calls)) as pool:
        return [outcome(future) for future in [pool.submit(call) for call in calls]]


@contextmanager
def worker_held(daemon: Daemon, directory: Path) -> Iterator[None]:
    """The only worker serves an unbatched ``gate`` call until the block ends: calls made meanwhile queue."""
    gate = directory / f"gate-{uuid.uuid4().hex[:8]}"
    holder = threading.Thread(target=daemon.client().call, args=("gate", str(gate)))
    holder.start()
    try:
        assert wait_until(Path(f"{gate}.began").exists), "the gate call did not begin"
        yield
    finally:
        gate.touch()
        holder.join(30)


def in_one_batch(daemon: Daemon, directory: Path, calls: list[Callable[[], object]], *, hold: float = 0.0,
                 meanwhile: Callable[[], None] | None = None) -> list[object]:
    """Make ``calls`` while the only worker is held; once all are queued (and ``hold`` seconds more) let it go:
    they reach it as one batch.  ``meanwhile`` runs once they are released.  Each call's result or exception."""
    with ThreadPoolExecutor(len(calls)) as pool:
        with worker_held(daemon, directory):
            futures = [pool.submit(call) for call in calls]
            assert wait_until(lambda: queued(daemon) == len(calls)), f"not all queued: {queued(daemon)}"
            time.sleep(hold)
        if meanwhile is not None:
            meanwhile()
        return [outcome(future) for future in futures]


def in_pieces(daemon: Daemon, request: bytes, split: int | None = None) -> tuple:
    """Send ``request`` on a connection of its own in two pieces 0.1 s apart, the first with its whole head
    and the expert's name (so that the master gathers the rest), or ``split`` bytes; its reply: ``(kind,
    request id, result)`` for msgpack, ``(status, body)`` for HTTP."""
    if split is None:
        split = request.index(b"\r\n\r\n") + 6 if request.startswith(b"POST ") else protocol.HEADER_SIZE + 10
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(30)
        sock.connect(str(daemon.socket))
        sock.sendall(request[:split])
        time.sleep(0.1)
        sock.sendall(request[split:])
        if not request.startswith(b"POST "):
            kind, request_id, body = protocol.read_frame(sock, 1 << 20)
            return kind, request_id, msgpack.unpackb(body)
        response = http.client.HTTPResponse(sock)
        response.begin()
        return response.status, json.loads(response.read())


def tagged(daemon: Daemon, document: object, **options: object) -> Callable[[], object]:
    """A msgpack call of ``tagged`` on a connection of its own."""
    return lambda: daemon.client(**options).call("tagged", document)


def log_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


# ------------------------------------------------------------------------------------------ answers
def test_concurrent_callers_each_get_their_own_answer_and_share_batches(make_daemon):
    daemon = make_daemon(EXPERTS, workers=2)
    answers: dict[str, dict] = {}

    def caller(number: int) -> None:
        client = daemon.client()
        for call in range(8):
            x = f"{number}.{call}"
            answers[x] = client.call("tagged", {"x": x, "sleep": 0.02})

    assert at_once([lambda number=number: caller(number) for number in range(16)]) == [None] * 16
    assert len(answers) == 16 * 8
    assert all(answer["x"] == x for x, answer in answers.items())  # each caller its own answer, none swapped
    assert all(x in answer["members"] for x, answer in answers.items())
    assert max(answer["size"] for answer in answers.values()) > 1  # batches did form
    # Every member of a batch was answered with that batch's figures.
    for answer in answers.values():
        for member in answer["members"]:
            assert answers[member]["batch"] == answer["batch"] and answers[member]["size"] == answer["size"]


def test_an_item_that_fails_alone_fails_only_its_caller(make_daemon, short_dir):
    daemon = make_daemon(EXPERTS, workers=1)
    documents = [{"x": x, "fail": x == 3} for x in range(5)]
    calls = [tagged(daemon, document) for document in documents]
    calls.append(lambda: daemon.client().call("tagged", {"x": 5}, "a second argument"))  # does not fit
    results = in_one_batch(daemon, short_dir, calls)
    misfit = results.pop()
    assert isinstance(misfit, BadRequest) and misfit.expert == "tagged", misfit
    assert "each call passes exactly one argument (documents); this one passed 2 positional" in str(misfit)
    failed = results[3]
    assert isinstance(failed, ExpertFailed), failed
    assert failed.remote_type == "builtins.ValueError" and failed.expert == "tagged"
    assert str(failed) == "ValueError: document 3 refused"
    for x, result in enumerate(results):
        if x != 3:
            assert result["x"] == x and result["size"] == 5  # in the same batch as the failure (and the misfit)
            assert sorted(result["members"]) == [0, 1, 2, 3, 4]
    assert daemon.client().call("tagged", {"x": "next"})["x"] == "next"  # the worker went on


def test_http_and_msgpack_callers_share_a_batch(make_daemon, short_dir):
    port = free_port()
    daemon = make_daemon(EXPERTS, workers=1, http_listen=f"127.0.0.1:{port}")

    def tcp(path: str, body: object) -> Callable[[], object]:
        return lambda: post(http.client.HTTPConnection("127.0.0.1", port, timeout=30), path, body)

    http_body = json.dumps([{"x": "u2"}]).encode()
    calls = [
        tagged(daemon, {"x": "m1"}),
        tcp("/call/tagged", [{"x": "h1"}]),
        tagged(daemon, {"x": "m2"}),
        tcp("/opinion/tagged", {"x": "o1", "text": "a document"}),
        lambda: post(UnixHTTPConnection(daemon.socket, timeout=30), "/call/tagged", {"documents": {"x": "u1"}}),
        # Arriving in pieces: the master gathers them, and they travel inside the batch's message.
        lambda: in_pieces(daemon, b"POST /call/tagged HTTP/1.1\r\nHost: localhost\r\nContent-Length: %d\r\n\r\n%s"
                          % (len(http_body), http_body)),
        lambda: in_pieces(daemon, protocol.encode_frame(protocol.CALL, 9, msgpack.packb(["tagged", ["m3"], {}]))),
    ]
    m1, h1, m2, o1, u1, u2, m3 = in_one_batch(daemon, short_dir, calls)
    assert [m1["x"], m2["x"]] == ["m1", "m2"]
    assert h1[0] == 200 and h1[1]["x"] == "h1"
    assert u1[0] == 200 and u1[1]["x"] == "u1"
    assert u2[0] == 200 and u2[1]["x"] == "u2"
    assert o1[0] == 200 and o1[1]["text"] == "a document" and o1[1]["opinions"]["tagged"]["x"] == "o1"
    assert m3[:2] == (protocol.RESULT, 9) and m3[2]["x"] == "m3"
    batches = {m1["batch"], m2["batch"], h1[1]["batch"], u1[1]["batch"], u2[1]["batch"], m3[2]["batch"],
               o1[1]["opinions"]["tagged"]["batch"]}
    assert len(batches) == 1  # one batch: msgpack, HTTP on TCP and on the Unix socket, calls and opinions
    assert sorted(m1["members"]) == ["h1", "m1", "m2", "m3", "o1", "u1", "u2"]


def test_a_call_whose_name_arrived_after_its_header_joins_a_batch(make_daemon, short_dir):
    daemon = make_daemon(EXPERTS, workers=1)
    frame = protocol.encode_frame(protocol.CALL, 9, msgpack.packb(["tagged", ["late"], {}]))
    late, a, b = in_one_batch(daemon, short_dir, [lambda: in_pieces(daemon, frame, split=protocol.HEADER_SIZE + 2),
                                                  tagged(daemon, "a"), tagged(daemon, "b")])
    assert late[:2] == (protocol.RESULT, 9) and late[2]["x"] == "late"  # (answered right, either way)
    assert late[2]["members"] == a["members"] == b["members"], (late, a)


@pytest.mark.parametrize("max_batch, batches", [(1, [[0], [1], [2], [3], [4], [5], [6], [7]]),
                                                (3, [[0, 1, 2], [3, 4, 5], [6, 7]])])
def test_a_batch_never_holds_more_than_max_batch_calls(make_daemon, short_dir, max_batch, batches):
    daemon = make_daemon({**EXPERTS, "tagged": {"function": "batched:tagged", "max_batch": max_batch}}, workers=1)
    with ThreadPoolExecutor(8) as pool, worker_held(daemon, short_dir):
        futures = []
        for x in range(8):  # one after another into the queue: oldest first is a known order
            futures.append(pool.submit(tagged(daemon, x)))
            assert wait_until(lambda count=x + 1: queued(daemon) == count)
    results = [outcome(future) for future in futures]
    assert [result["x"] for result in results] == list(range(8))
    assert sorted({tuple(result["members"]) for result in results}) == [tuple(batch) for batch in batches]
    # What status and /metrics show of them (max_batch 1: not batched, so nothing).
    figures = daemon.client().status()["batches"].get("tagged")
    metrics = UnixHTTPConnection(daemon.socket, timeout=30)
    metrics.request("GET", "/metrics")
    text = metrics.getresponse().read().decode()
    if max_batch == 1:
        assert figures is None and 'expertd_batch_size_count{expert="tagged"}' not in text
        return
    assert {key: figures[key] for key in ("batches", "calls", "mean_batch", "sizes")} == {
        "batches": 3, "calls": 8, "mean_batch": 2.67, "sizes": {"2": 1, "4": 2}}  # (sizes by bucket: at most 4)
    assert figures["mean_queue_delay_ms"] > 0
    assert 'expertd_batch_size_count{expert="tagged"} 3' in text.splitlines()
    assert 'expertd_batch_size_bucket{expert="tagged",le="2"} 1' in text.splitlines()
    assert 'expertd_batch_queue_delay_seconds_count{expert="tagged"} 8' in text.splitlines()
    assert "batches of tagged: 3 for 8 calls, mean size 2.67" in daemon.ctl("status").stdout


def test_a_call_handed_out_alone_counts_as_a_batch_of_one(make_daemon):
    daemon = make_daemon(EXPERTS, workers=1, linger="0")  # (linger 0: every call goes through the master)
    assert daemon.client().call("tagged", "alone")["size"] == 1
    figures = daemon.client().status()["batches"].get("tagged")
    assert figures is not None and (figures["batches"], figures["calls"], figures["sizes"]) == (1, 1, {"1": 1})


def test_max_batch_is_32_unless_set(make_daemon, short_dir):
    daemon = make_daemon(EXPERTS, workers=1)
    results = in_one_batch(daemon, short_dir, [tagged(daemon, x) for x in range(40)])
    assert [result["x"] for result in results] == list(range(40))
    assert sorted(result["size"] for result in results) == [8] * 8 + [32] * 32


def test_pipelined_calls_on_one_connection_are_each_answered_in_order(make_daemon, short_dir):
    daemon = make_daemon(EXPERTS, workers=1)

    def pipelined() -> list:
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(30)
            sock.connect(str(daemon.socket))
            sock.sendall(b"".join(protocol.encode_frame(protocol.CALL, number, msgpack.packb(
                ["tagged", [{"x": f"p{number}"}], {}])) for number in (1, 2, 3)))
            replies = [protocol.read_frame(sock, 1 << 20) for _ in range(3)]
        return [(kind, request_id, msgpack.unpackb(body)["x"]) for kind, request_id, body in replies]

    piped, a, b = in_one_batch(daemon, short_dir, [pipelined, tagged(daemon, "a"), tagged(daemon, "b")])
    assert piped == [(protocol.RESULT, 1, "p1"), (protocol.RESULT, 2, "p2"), (protocol.RESULT, 3, "p3")]
    # One request per connection in a batch (in the order they arrived, which the test does not fix).
    assert a["members"] == b["members"] and sorted(a["members"]) == ["a", "b", "p1"]


@pytest.mark.parametrize("linger, pool_size", [
    ("5ms", 8),
    ("0", 8),  # every call goes through the master's hand-out
    ("0", 0),  # and on a new connection: the last one, closed, is not a caller to wait for
])
def test_a_lone_caller_is_not_delayed(make_daemon, linger, pool_size):
    daemon = make_daemon({"tagged": {"function": "batched:tagged", "batch_delay": "200ms"}}, workers=1, linger=linger)
    client = daemon.client(pool_size=pool_size)
    client.call("tagged", {"x": "warm-up"})
    durations, sizes = [], set()
    for x in range(20):
        started = time.monotonic()
        answer = client.call("tagged", {"x": x})
        durations.append(time.monotonic() - started)
        assert answer["x"] == x
        sizes.add(answer["size"])
    assert sizes == {1}
    assert statistics.median(durations) < 0.05, durations  # never held for company (batch_delay is 200 ms)


def test_a_caller_whose_batch_mates_left_is_not_delayed(make_daemon, short_dir):
    daemon = make_daemon({**EXPERTS, "tagged": {"function": "batched:tagged", "batch_delay": "800ms"}},
                         workers=1, linger="0")
    clients = [daemon.client() for _ in range(4)]
    first = in_one_batch(daemon, short_dir, [lambda client=client, x=x: client.call("tagged", {"x": x})
                                             for x, client in enumerate(clients)])
    assert [answer["size"] for answer in first] == [4] * 4  # they were answered together...
    for client in clients[1:]:
        client.close()  # ...and three of them leave: nobody but the last caller is expected
    started = time.monotonic()
    assert clients[0].call("tagged", {"x": "alone"})["size"] == 1
    assert time.monotonic() - started < 0.4  # not held for the 800 ms batch_delay


def test_a_free_worker_waits_at_most_batch_delay_for_a_caller_it_just_answered(make_daemon, short_dir):
    daemon = make_daemon({**EXPERTS, "tagged": {"function": "batched:tagged", "batch_delay": "300ms"}},
                         workers=1, linger="0")
    first, second = daemon.client(), daemon.client()
    # Batches that take 0.4 s to run: a free worker may wait up to batch_delay (0.3 s) for company, since a
    # wait never lasts longer than a batch of the expert takes.
    a, b = {"x": "a", "sleep": 0.4}, {"x": "b", "sleep": 0.4}
    answers = in_one_batch(daemon, short_dir, [lambda: first.call("tagged", a), lambda: second.call("tagged", b)])
    assert [answer["size"] for answer in answers] == [2, 2]
    # Both come back, the second 50 ms later: the first's call waits for it, and they share a batch again.
    answers = at_once([lambda: first.call("tagged", a), lambda: (time.sleep(0.05), second.call("tagged", b))[1]])
    assert [sorted(answer["members"]) for answer in answers] == [["a", "b"], ["a", "b"]]
    # Only the first comes back: its call waits for the second, which does not come, no longer than batch_delay...
    started = time.monotonic()
    assert first.call("tagged", a)["size"] == 1
    assert 0.4 + 0.1 < time.monotonic() - started < 0.4 + 0.9
    # ...and the second, answered too long ago now, is not waited for again.
    started = time.monotonic()
    assert first.call("tagged", a)["size"] == 1
    assert time.monotonic() - started < 0.4 + 0.1


def test_a_free_worker_never_waits_longer_than_a_batch_takes_to_run(make_daemon, short_dir):
    daemon = make_daemon({**EXPERTS, "tagged": {"function": "batched:tagged", "batch_delay": "500ms"}},
                         workers=1, linger="0")
    first, second = daemon.client(), daemon.client()
    answers = in_one_batch(daemon, short_dir, [lambda: first.call("tagged", "a"), lambda: second.call("tagged", "b")])
    assert [answer["size"] for answer in answers] == [2, 2]
    # The second caller does not come back: batches take about a millisecond, so waiting 500 ms for it would
    # cost far more than the run it could save.
    durations = []
    for _ in range(5):
        started = time.monotonic()
        assert first.call("tagged", "a")["size"] == 1
        durations.append(time.monotonic() - started)
    assert statistics.median(durations) < 0.1, durations


# ------------------------------------------------------------------------------------------ failures
def test_a_batch_killed_by_its_timeout_answers_every_member_with_timeout(make_daemon, short_dir):
    daemon = make_daemon({**EXPERTS, "tagged": {"function": "batched:tagged", "timeout": "1s"}}, workers=1)
    log = short_dir / "batches.log"
    documents = [{"x": 0, "sleep": 30, "log": str(log)}, {"x": 1}, {"x": 2}, {"x": 3}]
    started = time.monotonic()
    results = in_one_batch(daemon, short_dir, [tagged(daemon, document) for document in documents])
    assert time.monotonic() - started < 8  # answered at the timeout, not after the 30 s sleep
    [batch] = log_lines(log)
    assert sorted(batch["members"]) == [0, 1, 2, 3]  # they were one batch
    for result in results:
        assert isinstance(result, RequestTimeout), result
        assert "did not answer within its 1s timeout" in str(result) and result.expert == "tagged"
    daemon.wait_workers(1, exclude={batch["pid"]})
    assert daemon.client().call("tagged", {"x": "after"})["x"] == "after"


def test_a_worker_killed_mid_batch_answers_every_member(make_daemon, short_dir):
    daemon = make_daemon(EXPERTS, workers=1)
    log = short_dir / "batches.log"
    killed: list[int] = []

    def kill_the_worker() -> None:
        assert wait_until(lambda: bool(log_lines(log)))  # the batch is running (sleeping)
        killed.append(log_lines(log)[0]["pid"])
        os.kill(killed[0], signal.SIGKILL)

    calls = [
        tagged(daemon, {"x": 0, "sleep": 30, "log": str(log)}, retries=0),
        tagged(daemon, {"x": 1}, retries=0),
        tagged(daemon, {"x": 2}),  # retries=1, the client's default: a worker_lost is retried once
        tagged(daemon, {"x": 3}),
    ]
    started = time.monotonic()
    results = in_one_batch(daemon, short_dir, calls, meanwhile=kill_the_worker)
    assert time.monotonic() - started < 8  # none waited for the 30 s sleep, none hung
    assert sorted(log_lines(log)[0]["members"]) == [0, 1, 2, 3]
    for result in results[:2]:
        assert isinstance(result, WorkerLost), result
        assert "SIGKILL" in str(result), result
    for x, result in enumerate(results[2:], 2):
        assert result["x"] == x and result["pid"] != killed[0]  # retried on the new worker, answered right
    assert daemon.wait_workers(1, exclude=set(killed))
    assert daemon.client().call("tagged", {"x": "after"})["x"] == "after"


def test_a_call_that_waited_in_the_queue_past_its_timeout_is_not_run(make_daemon, short_dir):
    daemon = make_daemon({**EXPERTS, "tagged": {"function": "batched:tagged", "timeout": "1s"}}, workers=1)
    log = short_dir / "invocations.log"
    calls = [tagged(daemon, {"x": x, "log": str(log)}) for x in range(3)]
    results = in_one_batch(daemon, short_dir, calls, hold=1.3)  # the gate keeps them queued past their 1 s
    for result in results:
        assert isinstance(result, RequestTimeout), result
        assert "for a worker, past its 1s timeout; it was not run" in str(result) and result.expert == "tagged"
    assert not log.exists()  # the expert never saw them
    assert daemon.client().call("tagged", {"x": "fresh", "log": str(log)})["x"] == "fresh"
    assert [line["members"] for line in log_lines(log)] == [["fresh"]]  # (the log does record what runs)


def test_a_caller_that_hung_up_while_queued_costs_its_batch_nothing(make_daemon, short_dir):
    daemon = make_daemon(EXPERTS, workers=1)

    def hang_up() -> str:
        with socket.socket(socket.AF_UNIX) as sock:
            sock.connect(str(daemon.socket))
            sock.sendall(protocol.encode_frame(protocol.CALL, 1, msgpack.packb(["tagged", [{"x": "gone"}], {}])))
            assert wait_until(lambda: queued(daemon) == 3)
        return "hung up"

    gone, a, b = in_one_batch(daemon, short_dir, [hang_up, tagged(daemon, "a"), tagged(daemon, "b")], hold=0.1)
    assert gone == "hung up" and (a["x"], b["x"]) == ("a", "b") and a["batch"] == b["batch"]
    assert daemon.client().call("tagged", "next")["x"] == "next"


def test_a_caller_slow_to_read_its_large_reply_does_not_hold_back_its_batch_mates(make_daemon, short_dir):
    daemon = make_daemon(EXPERTS, workers=1)
    reading_from: list[float] = []

    def slow_reader() -> tuple:
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(30)
            sock.connect(str(daemon.socket))
            sock.sendall(protocol.encode_frame(protocol.CALL, 3, msgpack.packb(
                ["tagged", [{"x": "large", "reply": 4_000_000}], {}])))
            time.sleep(1.0)  # far more than the socket holds waits for it meanwhile
            reading_from.append(time.monotonic())
            kind, _request_id, body = protocol.read_frame(sock, 1 << 26)
        answer = msgpack.unpackb(body)
        return kind, answer["x"], len(answer["pad"])

    def timed(x: str) -> Callable[[], tuple]:
        def call() -> tuple:
            answer = daemon.client().call("tagged", x)
            return answer["x"], answer["members"], time.monotonic()
        return call

    large, a, b = in_one_batch(daemon, short_dir, [slow_reader, timed("a"), timed("b")])
    assert large == (protocol.RESULT, "large", 4_000_000)  # (whole, once its caller read it)
    assert (a[0], b[0]) == ("a", "b") and sorted(a[1]) == sorted(b[1]) == ["a", "b", "large"]
    assert a[2] < reading_from[0] and b[2] < reading_from[0]  # answered before the first member's reply was read


@pytest.mark.parametrize("size", [100_000, 1_000_000])
def test_a_large_request_the_master_gathered_goes_alone_and_the_calls_behind_it_are_answered(
        make_daemon, short_dir, size):
    daemon = make_daemon(EXPERTS, workers=1)

    def large() -> object:
        frame = protocol.encode_frame(protocol.CALL, 7, msgpack.packb(["tagged", [{"x": "large", "pad": "p" * size}],
                                                                      {}]))
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(30)
            sock.connect(str(daemon.socket))
            sock.sendall(frame[:1000])
            time.sleep(0.1)  # arriving in pieces: the master gathers it
            sock.sendall(frame[1000:])
            kind, _request_id, body = protocol.read_frame(sock, 1 << 20)
        return kind, msgpack.unpackb(body)

    with ThreadPoolExecutor(3) as pool, worker_held(daemon, short_dir):
        futures = [pool.submit(large)]
        assert wait_until(lambda: queued(daemon) == 1)  # first in the queue: it would lead the batch
        futures += [pool.submit(tagged(daemon, x, retries=0)) for x in (1, 2)]
        assert wait_until(lambda: queued(daemon) == 3)
    (kind, answer), first, second = [outcome(future) for future in futures]
    assert kind == protocol.RESULT and answer["x"] == "large" and answer["size"] == 1, answer  # (too large to go along)
    assert (first["x"], second["x"]) == (1, 2) and first["members"] == second["members"]
    assert sorted(first["members"]) == [1, 2]  # (behind it: together)


def test_a_graceful_stop_lets_a_batch_in_hand_finish(make_daemon, short_dir):
    daemon = make_daemon(EXPERTS, workers=1)
    stopped: list[int] = []
    results = in_one_batch(daemon, short_dir, [tagged(daemon, {"x": x, "sleep": 0.5}) for x in range(3)],
                           meanwhile=lambda: (time.sleep(0.1), stopped.append(daemon.stop())))
    assert stopped == [0]
    assert [(result["x"], result["size"]) for result in results] == [(0, 3), (1, 3), (2, 3)]


# ------------------------------------------------------------------------------------------ workers
def test_max_requests_counts_every_member_and_workers_are_replaced(make_daemon):
    daemon = make_daemon(EXPERTS, workers=2, max_requests=5, max_requests_jitter=0)
    before = daemon.worker_pids()
    answers: dict[str, dict] = {}

    def caller(number: int) -> None:
        client = daemon.client()
        for call in range(5):
            x = f"{number}.{call}"
            answers[x] = client.call("tagged", {"x": x, "sleep": 0.01})

    assert at_once([lambda number=number: caller(number) for number in range(16)]) == [None] * 16
    assert len(answers) == 80 and all(answer["x"] == x for x, answer in answers.items())
    pids = {answer["pid"] for answer in answers.values()}
    assert len(pids) > 2 and pids - before  # recycled along the way
    for pid in pids:  # every member counts: a worker retires after the batch that brings it to 5 calls
        batches = {int(answer["batch"].split("-")[1]): answer["size"] for answer in answers.values()
                   if answer["pid"] == pid}
        assert sum(batches.values()) - batches[max(batches)] < 5, (pid, batches)


def call_until(daemon, number: int, done: threading.Event, answers: list[tuple[str, object]],
               sleep: float) -> None:
    """(A caller thread.)  Call ``tagged`` (``sleep`` s a batch) until ``done``, recording each answer or error."""
    client = daemon.client()
    call = 0
    while not done.is_set():
        x = f"{number}.{call}"
        try:
            answers.append((x, client.call("tagged", {"x": x, "sleep": sleep})))
        except Exception as exc:  # (any error is what the tests using this look for)
            answers.append((x, exc))
        call += 1


@contextmanager
def eight_callers(daemon, sleep: float = 0.005) -> Iterator[list[tuple[str, object]]]:
    """Eight threads calling ``tagged`` while the block runs; yields their (x, answer or error), and checks
    on the way out that every thread ended cleanly."""
    done = threading.Event()
    answers: list[tuple[str, object]] = []
    with ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(call_until, daemon, number, done, answers, sleep) for number in range(8)]
        try:
            yield answers
        finally:
            done.set()
        assert [outcome(future) for future in futures] == [None] * 8


def test_a_reload_while_batched_callers_run_costs_them_nothing(make_daemon):
    daemon = make_daemon(EXPERTS, workers=2)
    before = daemon.worker_pids()
    with eight_callers(daemon) as answers:
        time.sleep(0.3)
        for _ in range(2):
            assert daemon.client().reload()["generation"] > 1
            time.sleep(0.3)
    errors = [(x, answer) for x, answer in answers if not isinstance(answer, dict)]
    assert not errors, errors[:5]
    assert all(answer["x"] == x for x, answer in answers)  # type: ignore[index]
    assert {answer["pid"] for _x, answer in answers} - before  # type: ignore[index]  (new generations served)
    assert max(answer["size"] for _x, answer in answers) > 1  # type: ignore[index]


def test_a_reload_that_makes_an_expert_batched_costs_its_callers_nothing(make_daemon):
    daemon = make_daemon({"tagged": "batched:tagged_alone"}, workers=2)
    with eight_callers(daemon) as answers:
        time.sleep(0.2)
        write_config(daemon.config.parent, {"tagged": "batched:tagged_slow_start"})  # (workers start in 0.5 s)
        assert daemon.client().reload()["generation"] == 2
        assert wait_until(lambda: "reload done" in daemon.log)
        time.sleep(0.2)
    errors = [(x, answer) for x, answer in answers if not isinstance(answer, dict)]
    assert not errors, (len(errors), len(answers), errors[:3])
    assert all(answer["x"] == x for x, answer in answers)  # type: ignore[index]
    assert max(answer["size"] for _x, answer in answers) > 1  # type: ignore[index]  (the new generation batches)


def test_calls_of_an_expert_a_reload_adds_get_no_wrong_answer_from_the_old_workers(make_daemon):
    # From the reload on, the master knows the new batched expert while the old generation's workers, which
    # do not, still serve: a batch of its calls reaching one of them is answered unknown_expert, never with
    # anything else (a batch once came back with each caller's own arguments as its result).
    daemon = make_daemon({"other": "batched:tagged"}, workers=2)
    with eight_callers(daemon, sleep=0.002) as answers:  # (unknown_expert is expected before the reload)
        time.sleep(0.2)
        write_config(daemon.config.parent, {"other": "batched:tagged", "tagged": "batched:tagged_slow_start"})
        assert daemon.client().reload()["generation"] == 2
        assert wait_until(lambda: "reload done" in daemon.log)
        time.sleep(0.2)
    wrong = [(x, answer) for x, answer in answers
             if not (isinstance(answer, dict) and answer.get("x") == x)
             and not (isinstance(answer, Exception) and getattr(answer, "code", None) == "unknown_expert")]
    assert not wrong, (len(wrong), len(answers), wrong[:3])
    assert any(isinstance(answer, dict) for _x, answer in answers)  # (the new generation served it)


# ------------------------------------------------------------------------------------------ config
@pytest.mark.parametrize("expert, value, status, expected", [
    ("testexperts:add", "8", 3, "max_batch = 8: testexperts:add is not a batched expert"),
    ("batched:tagged", "0", 2, "max_batch = '0': must be at least 1"),
    ("batched:tagged", "999", 2, "max_batch = '999': must be at most 250"),
])
def test_a_bad_max_batch_stops_start_up_with_one_line(short_dir, expert, value, status, expected):
    config = write_config(short_dir, {"x": {"function": expert, "max_batch": value}})
    done = run_expertd("--config", str(config), "--socket", str(short_dir / "x.sock"))
    assert done.returncode == status, done.stderr
    assert done.stderr.count("\n") == 1 and done.stderr.startswith(f"expertd: {config}"), done.stderr
    assert f"[expert:x] {expected}" in done.stderr, done.stderr
    assert not (short_dir / "x.sock").exists()


# ------------------------------------------------------------------------------------------ models
SENTIMENT = EXAMPLES / "sentiment" / "sentiment.keras"


def test_a_model_expert_batches_its_callers_rows(make_daemon, short_dir):
    pytest.importorskip("ai_edge_litert")  # the `tensorflow` extra, installed by `make test`
    np = pytest.importorskip("numpy")
    daemon = make_daemon({"sentiment": {"model": SENTIMENT}, "single": {"model": SENTIMENT, "max_batch": 1},
                          "two_rows": {"model": SENTIMENT, "max_rows": 2}, "gate": "batched:gate"}, workers=1)
    rows = np.random.default_rng(7).integers(0, 200, size=(7, 1, 64), dtype=np.int32)
    calls: list[Callable[[], object]] = [
        lambda row=row: daemon.client().predict("sentiment", row) for row in rows[:5]]
    calls += [lambda row=row: daemon.client().call("sentiment", row.tolist()) for row in rows[5:]]  # lists in, out
    calls.insert(3, lambda: daemon.client().predict("sentiment", np.zeros((1, 63), np.int32)))  # the wrong shape
    results = in_one_batch(daemon, short_dir, calls)
    bad = results.pop(3)
    assert isinstance(bad, BadRequest) and bad.expert == "sentiment", bad
    assert "got shape [1, 63]; expected int32[batch, 64]" in str(bad), bad
    figures = daemon.client().status()["batches"]["sentiment"]
    assert (figures["batches"], figures["calls"], figures["sizes"]) == (1, 8, {"8": 1})  # the eight went together
    alone = daemon.client()
    for row, result in zip(rows, results, strict=True):  # each caller its own rows, as the row alone gives them
        expected = alone.predict("single", row)
        assert np.asarray(result, np.float32).shape == expected.shape == (1, 1)
        np.testing.assert_allclose(np.asarray(result, np.float32), expected, rtol=1e-6, atol=1e-7)
    # A batch stays within max_rows: the callers' rows run in turn (1 + 1, 1, 2), and a call over it fails alone.
    inputs = [rows[0], rows[1], rows[2], np.concatenate(rows[3:6]), np.concatenate(rows[5:7])]
    results = in_one_batch(daemon, short_dir, [lambda batch=batch: daemon.client().predict("two_rows", batch)
                                               for batch in inputs])
    assert daemon.client().status()["batches"]["two_rows"]["sizes"] == {"8": 1}  # (one batch of five)
    over = results.pop(3)
    assert isinstance(over, BadRequest) and "3 rows in one call; at most 2 (max_rows)" in str(over), over
    for batch, result in zip([inputs[0], inputs[1], inputs[2], inputs[4]], results, strict=True):
        expected = alone.predict("single", batch)
        assert result.shape == expected.shape == (len(batch), 1)
        np.testing.assert_allclose(result, expected, rtol=1e-6, atol=1e-7)
