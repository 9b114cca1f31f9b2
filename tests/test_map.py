"""Callers batch too: MAP requests (Client.map, POST /map/NAME) and `expertctl opinion --lines` over batched experts."""

from __future__ import annotations

import http.client
import json
import socket
import subprocess
import sys
import threading
import time

import msgpack
import pytest

from expertd import protocol
from expertd.client import Client
from expertd.errors import (
    BadRequest,
    BadResult,
    ExpertFailed,
    Quarantined,
    RequestTimeout,
    UnknownExpert,
    WorkerLost,
)
from expertd.framing import frame_of

from conftest import UnixHTTPConnection, raw_connection

MAP_EXPERTS = {
    "text_length": "batchexperts:text_length",
    "batch_size": {"function": "batchexperts:batch_size", "max_batch": "4"},
    "all_or_nothing": {"function": "batchexperts:all_or_nothing", "max_batch": "2"},
    "reciprocal": "batchexperts:reciprocal",
    "sendable": "batchexperts:sendable",
    "document_length": "testexperts:document_length",
    "fib": "fibs:fib",
    "echo": "testexperts:echo",
}


@pytest.fixture
def daemon(make_daemon):
    return make_daemon(MAP_EXPERTS)


def request(conn: http.client.HTTPConnection, method: str, path: str,
            body: object = None) -> tuple[int, http.client.HTTPResponse, object]:
    conn.request(method, path, body=None if body is None else json.dumps(body).encode())
    response = conn.getresponse()
    raw = response.read()
    if response.getheader("Content-Type", "").startswith("application/json"):
        return response.status, response, json.loads(raw)
    return response.status, response, raw.decode()


# ------------------------------------------------------------------ Client.map
def test_map_returns_each_items_result_in_order_from_a_batched_expert(daemon):
    client = daemon.client()
    documents = [{"text": "a" * n} for n in range(50)]
    assert client.map("text_length", documents) == [{"chars": n, "seen_opinions": []} for n in range(50)]
    # The function is called with at most max_batch items at a time (here 4).
    assert client.map("batch_size", range(10)) == [4, 4, 4, 4, 4, 4, 4, 4, 2, 2]
    assert client.map("batch_size", []) == []


def test_map_calls_an_unbatched_expert_once_per_item(daemon):
    client = daemon.client()
    assert client.map("fib", [5, 6, 7, 10]) == [8, 13, 21, 89]
    assert client.map("reciprocal", (1, 2, 4, 8)) == [1.0, 0.5, 0.25, 0.125]
    # Each item is the call's one positional argument, whatever its type.
    assert client.map("echo", [[1, 2], {"k": b"\x00"}, None]) == [
        {"args": [[1, 2]], "kwargs": {}}, {"args": [{"k": b"\x00"}], "kwargs": {}}, {"args": [None], "kwargs": {}}]


def test_an_item_that_fails_alone_leaves_the_others_answered(daemon):
    client = daemon.client()
    outcomes = client.map("reciprocal", [2, 0, "x", 4])
    assert outcomes[0] == 0.5 and outcomes[3] == 0.25
    assert isinstance(outcomes[1], ExpertFailed)
    assert outcomes[1].message == "ZeroDivisionError: division by zero"
    assert outcomes[1].remote_type == "builtins.ZeroDivisionError" and outcomes[1].expert == "reciprocal"
    assert "batchexperts.py" in outcomes[1].remote_traceback
    assert isinstance(outcomes[2], ExpertFailed) and outcomes[2].remote_type == "builtins.TypeError"

    # A batched expert fails one item by putting an exception in its place.
    outcomes = client.map("text_length", [{"text": "ab"}, {"fail": "on purpose"}, {"text": "abc"}])
    assert outcomes[0] == {"chars": 2, "seen_opinions": []} and outcomes[2] == {"chars": 3, "seen_opinions": []}
    assert isinstance(outcomes[1], ExpertFailed)
    assert (outcomes[1].message, outcomes[1].remote_type) == ("ValueError: asked to fail: on purpose",
                                                              "builtins.ValueError")


def test_a_batched_expert_that_raises_fails_only_the_items_of_that_batch(daemon):
    # max_batch 2: [1, -1] go together and fail together; [3, 4] are answered.
    outcomes = daemon.client().map("all_or_nothing", [1, -1, 3, 4])
    assert outcomes[2:] == [6, 8]
    for failed in outcomes[:2]:
        assert isinstance(failed, ExpertFailed)
        assert failed.message == "ArithmeticError: a negative item spoils the batch"


def test_maps_and_calls_of_a_batched_expert_arriving_together_are_each_answered_whole(make_daemon):
    # One worker, so that requests queue: the daemon gathers concurrent calls into batches, and a MAP
    # (a batch already) goes to a worker on its own, never inside another batch.
    daemon = make_daemon(MAP_EXPERTS, workers=1)
    failures: list[BaseException] = []

    def caller(number: int) -> None:
        client = daemon.client()
        web = UnixHTTPConnection(str(daemon.socket))
        try:
            for round_ in range(30):
                documents = [{"text": "x" * (number + round_ + i)} for i in range(number % 5 + 1)]
                expected = [{"chars": len(d["text"]), "seen_opinions": []} for d in documents]
                if number == 7:
                    assert request(web, "POST", "/map/text_length", documents)[::2] == (
                        200, [{"result": result} for result in expected])
                elif (number + round_) % 2:
                    assert client.map("text_length", documents) == expected
                else:
                    assert [client.call("text_length", d) for d in documents] == expected
        except BaseException as exc:
            failures.append(exc)

    threads = [threading.Thread(target=caller, args=(number,)) for number in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not failures, failures[:3]


def test_a_result_that_cannot_be_sent_fails_its_item_alone(daemon):
    outcomes = daemon.client().map("sendable", ["a", "object", "b"])
    assert outcomes[0] == "a" and outcomes[2] == "b"
    assert isinstance(outcomes[1], BadResult) and "cannot be sent" in outcomes[1].message


def test_raise_first_raises_the_first_failed_items_error(daemon):
    client = daemon.client()
    with pytest.raises(ExpertFailed, match="ZeroDivisionError"):
        client.map("reciprocal", [1, 0, "x"], raise_first=True)
    assert client.map("reciprocal", [1, 2], raise_first=True) == [1.0, 0.5]


def test_a_map_that_fails_as_a_whole_raises(daemon):
    client = daemon.client()
    with pytest.raises(UnknownExpert, match="no expert named 'nope'"):
        client.map("nope", [1, 2])
    with pytest.raises(BadRequest, match=f"the limit is {protocol.MAX_MAP_ITEMS}: send them in several maps"):
        client.map("fib", [1] * (protocol.MAX_MAP_ITEMS + 1))
    assert client.map("fib", [1]) == [1]


def test_a_map_runs_under_its_experts_timeout(make_daemon):
    daemon = make_daemon({"slow": {"function": "testexperts:slow", "timeout": "1s"}, "fib": "fibs:fib"}, workers=1)
    client = daemon.client()
    with pytest.raises(RequestTimeout, match="slow did not answer within its 1s timeout"):
        client.map("slow", [0.4, 0.4, 0.4, 0.4])
    assert client.map("fib", [3]) == [3]  # a new worker serves


def test_a_map_arriving_in_pieces_runs_under_its_experts_timeout_too(make_daemon):
    # The first bytes the master sees hold no name: it reads the name once it has gathered the request.
    daemon = make_daemon({"slow": {"function": "testexperts:slow", "timeout": "1s"}}, workers=1)
    frame = protocol.encode_map(5, "slow", [0.4] * 5)
    with raw_connection(daemon, timeout=20) as sock:
        sock.sendall(frame[:protocol.HEADER_SIZE])
        time.sleep(0.2)
        sock.sendall(frame[protocol.HEADER_SIZE:])
        started = time.monotonic()
        kind, _request_id, body = protocol.read_frame(sock, 1 << 20)
    assert kind == protocol.ERROR and time.monotonic() - started < 10
    assert msgpack.unpackb(body)["message"].startswith("slow did not answer within its 1s timeout")


@pytest.mark.parametrize("retries", [0, 1])
def test_map_retries_a_lost_worker_as_call_does(make_daemon, short_dir, retries):
    daemon = make_daemon({"killed_by": "batchexperts:killed_by"}, workers=1, quarantine_after=0)
    record = short_dir / "kills"
    with pytest.raises(WorkerLost):
        daemon.client(retries=retries).map("killed_by", ["a", ["kill", str(record)]])
    assert record.read_text().count("killed") == 1 + retries
    record.unlink()
    with pytest.raises(WorkerLost):
        daemon.client(retries=retries).call("killed_by", ["kill", str(record)])
    assert record.read_text().count("killed") == 1 + retries


def test_a_map_to_a_quarantined_expert_is_refused_like_a_call(make_daemon, short_dir):
    daemon = make_daemon({"killed_by": "batchexperts:killed_by"}, workers=1, quarantine_after=2)
    client = daemon.client(retries=0)
    for _ in range(2):
        with pytest.raises(WorkerLost):
            client.map("killed_by", [["kill", str(short_dir / "kills")]])
    with pytest.raises(Quarantined, match="killed_by is quarantined"):
        client.map("killed_by", ["harmless"])
    assert request(UnixHTTPConnection(str(daemon.socket)), "POST", "/map/killed_by", [1])[0] == 503


def test_a_map_counts_as_one_request_of_its_expert(daemon):
    client = daemon.client()
    client.map("fib", [1, 2, 3])
    client.map("reciprocal", [0, 1])  # a failed item is in the reply, not an error of the request
    metrics = request(UnixHTTPConnection(str(daemon.socket)), "GET", "/metrics")[2].splitlines()
    assert 'expertd_requests_total{expert="fib"} 1' in metrics
    assert 'expertd_requests_total{expert="reciprocal"} 1' in metrics
    assert not any(line.startswith('expertd_errors_total{expert="reciprocal"') for line in metrics)


# ------------------------------------------------------------ the wire itself
def _exchange(sock: socket.socket, kind: int, body: bytes, request_id: int = 7) -> tuple[int, object]:
    sock.sendall(protocol.encode_frame(kind, request_id, body))
    reply_kind, reply_id, reply = protocol.read_frame(sock, 1 << 24)
    assert reply_id == request_id
    return reply_kind, msgpack.unpackb(reply)


def test_map_reply_holds_one_tagged_entry_per_item(daemon):
    with raw_connection(daemon) as sock:
        kind, body = _exchange(sock, protocol.MAP, msgpack.packb(["reciprocal", [2, 0]]))
    assert kind == protocol.RESULT
    assert body[0] == [0, 0.5]
    assert body[1][0] == 1 and body[1][1]["code"] == "expert_failed"
    assert body[1][1]["message"] == "ZeroDivisionError: division by zero"


@pytest.mark.parametrize("body, message", [
    (b"\xc1", "request body is not valid msgpack"),
    (msgpack.packb({"expert": "fib"}), "a map body must be the array [expert, items]"),
    (msgpack.packb(["fib", [1], {}]), "a map body must be the array [expert, items]"),
    (msgpack.packb([5, [1]]), "expert name must be a string, not int"),
    (msgpack.packb(["fib", 5]), "items must be an array, not int"),
    (msgpack.packb(["fib", [None] * (protocol.MAX_MAP_ITEMS + 1)]),
     f"{protocol.MAX_MAP_ITEMS + 1} items in one map; the limit is {protocol.MAX_MAP_ITEMS}"),
    (msgpack.packb(["echo", [[[[[[1]]]]]]]), "arguments nest deeper than 4 levels (max_depth)"),
])
def test_a_bad_map_body_gets_a_one_line_error_and_the_daemon_keeps_serving(make_daemon, body, message):
    daemon = make_daemon(MAP_EXPERTS, max_depth=4)
    with raw_connection(daemon) as sock:
        kind, error = _exchange(sock, protocol.MAP, body)
        assert kind == protocol.ERROR
        assert error["code"] == "bad_request"
        assert error["message"].startswith(message) and "\n" not in error["message"]
        # The same connection goes on.
        assert _exchange(sock, protocol.MAP, msgpack.packb(["fib", [5, 6]]), 8) == (protocol.RESULT, [[0, 8], [0, 13]])
    assert daemon.client().call("fib", 5) == 8


@pytest.mark.parametrize("items", [[1], list(range(20)), list(range(70_000))[:protocol.MAX_MAP_ITEMS]])
def test_the_master_reads_a_maps_expert_from_the_start_of_its_body(items):
    # The name hint gives a MAP its expert's timeout and quarantine, in every array encoding msgpack allows.
    for body in (msgpack.packb(["fib", items]), b"\xdc\x00\x02" + msgpack.packb("fib") + msgpack.packb(items),
                 b"\xdd\x00\x00\x00\x02" + msgpack.packb("fib") + msgpack.packb(items)):
        frame = frame_of(protocol.pack_header(protocol.MAP, 3, len(body)) + body[:64], 1 << 24)
        assert (frame.kind, frame.expert, frame.error) == (protocol.MAP, "fib", None)
    call = msgpack.packb(["fib", [1], {}])  # a CALL's shape is not a MAP's, and the other way round
    assert frame_of(protocol.pack_header(protocol.MAP, 3, len(call)) + call, 1 << 24).expert is None
    body = msgpack.packb(["fib", items])
    assert frame_of(protocol.pack_header(protocol.CALL, 3, len(body)) + body[:64], 1 << 24).expert is None


# ------------------------------------------------------------------------ HTTP
def test_http_map_returns_one_outcome_per_item(daemon):
    web = UnixHTTPConnection(str(daemon.socket))
    status, _response, body = request(web, "POST", "/map/reciprocal", [4, 0, 2])
    assert status == 200
    assert body[0] == {"result": 0.25} and body[2] == {"result": 0.5}
    assert body[1] == {"error": {"code": "expert_failed", "message": "ZeroDivisionError: division by zero",
                                 "expert": "reciprocal", "type": "builtins.ZeroDivisionError"}}
    status, _response, body = request(web, "POST", "/map/text_length", [{"text": "abc"}, {"fail": "x"}])
    assert status == 200
    assert body == [{"result": {"chars": 3, "seen_opinions": []}},
                    {"error": {"code": "expert_failed", "message": "ValueError: asked to fail: x",
                               "expert": "text_length", "type": "builtins.ValueError"}}]
    status, _response, body = request(web, "POST", "/map/batch_size", list(range(6)))
    assert (status, body) == (200, [{"result": 4}] * 4 + [{"result": 2}] * 2)
    # A result JSON cannot carry fails its item alone.
    status, _response, body = request(web, "POST", "/map/sendable", ["a", "object"])
    assert status == 200 and body[0] == {"result": "a"} and body[1]["error"]["code"] == "bad_result"
    assert request(web, "POST", "/map/fib", [])[::2] == (200, [])


def test_http_map_refuses_what_is_not_a_list_of_items(daemon):
    web = UnixHTTPConnection(str(daemon.socket))
    status, _response, body = request(web, "POST", "/map/fib", {"n": 5})
    assert status == 400 and body["error"]["code"] == "bad_request"
    assert body["error"]["message"].startswith("the body of POST /map/NAME must be a JSON array of items")
    status, _response, body = request(web, "POST", "/map/nope", [1])
    assert status == 404 and body["error"]["code"] == "unknown_expert"
    status, response, body = request(web, "GET", "/map/fib")
    assert status == 405 and response.getheader("Allow") == "POST"
    assert request(web, "POST", "/map/fib", [5, 6])[::2] == (200, [{"result": 8}, {"result": 13}])  # kept alive


# ------------------------------------------------------------- expertctl --lines
def _per_call_output(daemon, names: list[str], documents: list[dict]) -> str:
    """What `expertctl opinion --lines` wrote before it batched: a call per document and expert."""
    client = daemon.client()
    lines = []
    for document in documents:
        for name in names:
            document.setdefault("opinions", {})[name] = client.call(name, json.loads(json.dumps(document)))
        lines.append(json.dumps(document, ensure_ascii=False) + "\n")
    return "".join(lines)


@pytest.mark.parametrize("options", [[], ["--window", "7"], ["--window", "7", "--jobs", "1"]])
def test_opinion_lines_over_a_batched_expert_writes_what_a_call_per_line_writes(daemon, options):
    documents = [{"n": i, "text": "ü" * i} for i in range(100)]
    names = ["text_length", "document_length"]  # batched, then not: each sees the opinions before its own
    done = daemon.ctl("opinion", "--lines", *options, *names, input="".join(json.dumps(d) + "\n" for d in documents))
    assert (done.returncode, done.stderr) == (0, "")
    assert done.stdout == _per_call_output(daemon, names, documents)


def test_opinion_lines_sends_a_batched_expert_one_map_per_window(daemon):
    documents = "".join(json.dumps({"text": "x" * i}) + "\n" for i in range(60))
    assert daemon.ctl("opinion", "--lines", "--window", "8", "text_length", input=documents).returncode == 0
    # By default a window is the expert's max_batch (batch_size's: 4), and it is called with all of it at once.
    done = daemon.ctl("opinion", "--lines", "batch_size", input=documents)
    assert [json.loads(line)["opinions"]["batch_size"] for line in done.stdout.splitlines()] == [4] * 60
    metrics = request(UnixHTTPConnection(str(daemon.socket)), "GET", "/metrics")[2].splitlines()
    assert 'expertd_requests_total{expert="text_length"} 8' in metrics  # 60 documents in windows of 8
    assert 'expertd_requests_total{expert="batch_size"} 15' in metrics


def test_opinion_lines_stops_at_a_failed_document_as_one_call_per_line_does(daemon):
    lines = [json.dumps({"text": "a" * i}) for i in range(10)]
    lines[5] = json.dumps({"text": "x", "fail": "line six"})
    done = daemon.ctl("opinion", "--lines", "--window", "4", "text_length", input="\n".join(lines) + "\n")
    assert done.returncode == 1
    assert [json.loads(line)["opinions"]["text_length"]["chars"] for line in done.stdout.splitlines()] == [0, 1, 2, 3,
                                                                                                             4]
    assert done.stderr == ("expertctl: stdin line 6: text_length: ValueError: asked to fail: line six "
                           "[expert_failed]; stopped there, 5 documents written (--on-error skip or record goes on)\n")
    # The same words as the unbatched path says for the same failure, one document at a time.
    single = daemon.ctl("opinion", "text_length", input=lines[5])
    assert single.returncode == 1
    assert single.stderr == "expertctl: text_length: ValueError: asked to fail: line six [expert_failed]\n"


def test_opinion_lines_names_a_bad_line_inside_a_window(daemon):
    stdin = '{"text": "a"}\n{"text": "b"}\n{"text": \n{"text": "d"}\n'
    done = daemon.ctl("opinion", "--lines", "--window", "3", "text_length", "document_length", input=stdin)
    assert done.returncode == 1
    assert [json.loads(line)["text"] for line in done.stdout.splitlines()] == ["a", "b"]
    assert done.stderr.startswith("expertctl: stdin line 3: invalid JSON") and done.stderr.count("\n") == 1
    done = daemon.ctl("opinion", "--lines", "batch_size", input='{"text": "a"}\n{"text": "b", "opinions": 3}\n')
    assert done.returncode == 1 and done.stdout.count("\n") == 1
    assert done.stderr == ("expertctl: stdin line 2: the document's 'opinions' is a int, not an object; stopped "
                           "there, 1 document written (--on-error skip or record goes on)\n")


def test_opinion_lines_window_must_be_positive(daemon):
    done = daemon.ctl("opinion", "--lines", "--window", "0", "text_length", input="")
    assert done.returncode == 2 and "expected a positive whole number" in done.stderr


# --------------------------------------------------------------- import cost
def test_the_client_imports_nothing_outside_the_standard_library_and_msgpack():
    code = ("import sys; before = set(sys.modules); import expertd.client; "
            "print(' '.join(sorted({m.split('.')[0] for m in set(sys.modules) - before})))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    imported = {name for name in done.stdout.split() if "cython" not in name}  # (msgpack's C extension's runtime)
    assert imported - set(sys.stdlib_module_names) <= {"expertd", "msgpack"}, imported
    assert not imported & {"typing", "threading", "socket", "json", "concurrent", "asyncio"}, imported
    assert callable(Client.map)
