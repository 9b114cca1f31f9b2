"""The access log (access_log, log_format) on a real daemon: one line per request, whoever answers it.

Every test reads the file the daemon wrote and parses each of its lines (text:
ten space-separated fields; json: one object); byte counts are compared with
what the test itself sent and received on its socket, and request ids with
those the client was given (RemoteError.request_id, X-Request-Id) and with the
error log's lines.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import msgpack
import pytest
from test_batching import EXPERTS as BATCH_EXPERTS
from test_batching import free_port, in_one_batch, post, tagged

from expertd import accesslog, protocol
from expertd.errors import ExpertFailed, FrameTooLarge, RequestTimeout, UnknownExpert, WorkerLost
from expertd.scoreboard import Scoreboard

from conftest import ROOT, UnixHTTPConnection, run_expertd, wait_until, write_config

TEXT_FIELDS = ("time", "request_id", "peer", "protocol", "expert", "code", "status", "duration_ms", "bytes_in",
               "bytes_out")
JSON_KEYS = {"time", "request_id", "peer", "protocol", "expert", "code", "status", "duration_ms", "bytes_in",
             "bytes_out"}
TIME = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")
TOKEN = "an-access-log-test-token"


def parse_text(line: str) -> dict:
    fields = line.split(" ")
    assert len(fields) == len(TEXT_FIELDS), line
    entry = dict(zip(TEXT_FIELDS, fields, strict=True))
    assert entry["duration_ms"].endswith("ms"), line
    entry["duration_ms"] = float(entry["duration_ms"][:-2])
    entry["status"] = None if entry["status"] == "-" else int(entry["status"])
    entry["expert"] = None if entry["expert"] == "-" else entry["expert"]
    entry["bytes_in"], entry["bytes_out"] = int(entry["bytes_in"]), int(entry["bytes_out"])
    return entry


def parse_json(line: str) -> dict:
    entry = json.loads(line)
    assert set(entry) == JSON_KEYS, line
    return entry


def access_lines(path: Path, count: int, json_format: bool = False) -> list[dict]:
    """The log's lines once there are ``count`` of them (workers write after their reply is out), each checked."""
    assert wait_until(lambda: path.exists() and len(path.read_text().splitlines()) >= count), \
        path.read_text() if path.exists() else "no access log"
    time.sleep(0.05)  # (a line too many would show here)
    lines = path.read_text().splitlines()
    assert len(lines) == count, "\n".join(lines)
    entries = [parse_json(line) if json_format else parse_text(line) for line in lines]
    for entry in entries:
        assert TIME.match(entry["time"]), entry
        assert entry["duration_ms"] >= 0 and entry["bytes_in"] >= 0 and entry["bytes_out"] > 0, entry
    return entries


def exchange(daemon, frame: bytes) -> bytes:
    """Send one msgpack frame on a connection of its own; the reply's bytes, all of them."""
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(10)
        sock.connect(str(daemon.socket))
        sock.sendall(frame)
        header = _read(sock, protocol.HEADER_SIZE)
        return header + _read(sock, protocol.HEADER.unpack(header)[4])


def _read(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        more = sock.recv(size - len(data))
        assert more, "connection closed early"
        data += more
    return data


def http_exchange(conn: http.client.HTTPConnection, method: str, path: str, body: bytes | None = None,
                  headers: dict | None = None) -> tuple[http.client.HTTPResponse, bytes]:
    conn.request(method, path, body=body, headers=headers or {})
    response = conn.getresponse()
    return response, response.read()


# ------------------------------------------------------------------------------------------ msgpack
def test_each_msgpack_call_gets_one_line_with_its_peer_id_outcome_and_bytes(make_daemon, short_dir):
    log = short_dir / "access.log"
    daemon = make_daemon(access_log=log)
    sent_ok = protocol.encode_frame(protocol.CALL, 7, msgpack.packb(["add", [2, 3], {}]))
    got_ok = exchange(daemon, sent_ok)
    sent_bad = protocol.encode_frame(protocol.CALL, 8, msgpack.packb(["boom", ["no"], {}]))
    got_bad = exchange(daemon, sent_bad)
    ok, bad = access_lines(log, 2)
    assert ok["protocol"] == bad["protocol"] == "msgpack"
    assert ok["peer"] == bad["peer"] == f"uid={os.getuid()},pid={os.getpid()}"
    assert (ok["expert"], ok["code"], ok["status"]) == ("add", "ok", None)
    assert (bad["expert"], bad["code"]) == ("boom", "expert_failed")
    assert (ok["bytes_in"], ok["bytes_out"]) == (len(sent_ok), len(got_ok))
    assert (bad["bytes_in"], bad["bytes_out"]) == (len(sent_bad), len(got_bad))
    assert ok["request_id"].endswith("-7") and bad["request_id"].endswith("-8")
    assert ok["request_id"] != bad["request_id"].replace("-8", "-7")  # two connections: two serials
    # The error reply carries the id the log names it by.
    assert msgpack.unpackb(got_bad[protocol.HEADER_SIZE:])["request_id"] == bad["request_id"]


def test_requests_on_one_kept_connection_each_get_a_line_under_its_serial(make_daemon, short_dir):
    log = short_dir / "access.log"
    daemon = make_daemon(access_log=log, workers=1)
    client = daemon.client()  # (one pooled connection: the worker lingers on it between calls)
    assert [client.call("add", number, 1) for number in range(5)] == [1, 2, 3, 4, 5]
    lines = access_lines(log, 5)
    assert len({line["request_id"].split("-")[0] for line in lines}) == 1
    frames = [int(line["request_id"].split("-")[1]) for line in lines]
    assert frames == sorted(set(frames))


def test_a_client_error_names_the_request_id_of_its_access_log_line(make_daemon, short_dir):
    log = short_dir / "access.log"
    daemon = make_daemon(access_log=log)
    client = daemon.client()
    assert client.call("add", 1, 1) == 2
    with pytest.raises(ExpertFailed) as failed:
        client.call("boom")
    with pytest.raises(UnknownExpert) as unknown:
        client.call("no_such_expert")
    lines = access_lines(log, 3)
    assert [line["code"] for line in lines] == ["ok", "expert_failed", "unknown_expert"]
    assert failed.value.request_id == lines[1]["request_id"]
    assert unknown.value.request_id == lines[2]["request_id"]
    # expertctl says it too (this tree's, whatever the environment installed).
    done = subprocess.run([sys.executable, "-m", "expertd.cli", "--socket", str(daemon.socket), "call", "boom"],
                          capture_output=True, text=True, timeout=30, cwd=ROOT)
    assert done.returncode != 0
    said = re.search(r"\(request (\S+)\)$", done.stderr.strip())
    assert said, done.stderr
    assert access_lines(log, 4)[3]["request_id"] == said.group(1)


def test_a_request_refused_by_the_master_gets_its_line(make_daemon, short_dir):
    log = short_dir / "access.log"
    daemon = make_daemon(access_log=log, max_frame="1K")
    with pytest.raises(FrameTooLarge) as refused:
        daemon.client().call("echo", "x" * 4096)
    status = daemon.client().status()
    assert status
    too_large, answered = access_lines(log, 2)
    assert too_large["code"] == "frame_too_large" and too_large["request_id"] == refused.value.request_id
    assert too_large["peer"] == f"uid={os.getuid()},pid={os.getpid()}"
    assert (answered["expert"], answered["code"]) == ("(status)", "ok")


def test_a_timed_out_request_has_the_same_id_in_the_access_log_the_error_log_and_the_error(make_daemon, short_dir):
    log = short_dir / "access.log"
    daemon = make_daemon(access_log=log, timeout="0.5s", workers=1)
    with pytest.raises(RequestTimeout) as timed_out:
        daemon.client().call("slow", 10)
    (line,) = access_lines(log, 1)
    assert (line["expert"], line["code"]) == ("slow", "timeout")
    assert line["request_id"] == timed_out.value.request_id
    assert line["duration_ms"] >= 400
    assert wait_until(lambda: f"(request {line['request_id']})" in daemon.log), daemon.log


def test_a_request_whose_worker_died_has_the_same_id_in_the_access_log_the_error_log_and_the_error(
        make_daemon, short_dir):
    log = short_dir / "access.log"
    daemon = make_daemon(access_log=log, workers=1)
    with pytest.raises(WorkerLost) as lost:
        daemon.client(retries=0).call("kill_worker")
    (line,) = access_lines(log, 1)
    assert (line["expert"], line["code"]) == ("kill_worker", "worker_lost")
    assert line["request_id"] == lost.value.request_id
    assert wait_until(lambda: f"while serving request {line['request_id']}" in daemon.log), daemon.log


def test_a_reply_the_caller_left_before_is_logged_under_the_request_id_of_its_access_line(make_daemon, short_dir):
    log = short_dir / "access.log"
    daemon = make_daemon(access_log=log, workers=1)
    with socket.socket(socket.AF_UNIX) as sock:
        sock.connect(str(daemon.socket))
        sock.sendall(protocol.encode_frame(protocol.CALL, 7, msgpack.packb(["slow", [0.3], {}])))
        time.sleep(0.1)  # (the worker has it)
    (line,) = access_lines(log, 1)
    assert line["request_id"].endswith("-7") and line["expert"] == "slow"
    assert wait_until(lambda: "could not deliver the reply" in daemon.log), daemon.log
    assert f"could not deliver the reply to request {line['request_id']}: " in daemon.log, daemon.log


# ------------------------------------------------------------------------------------------ HTTP
def test_http_requests_get_lines_in_json_with_status_and_their_request_id(make_daemon, short_dir):
    log = short_dir / "access.log"
    port = free_port()
    daemon = make_daemon(access_log=log, log_format="json", http_listen=f"127.0.0.1:{port}", token=TOKEN,
                         max_frame="1K")
    unix = UnixHTTPConnection(daemon.socket)
    body = json.dumps([2, 3]).encode()
    ok, ok_body = http_exchange(unix, "POST", "/call/add", body, {"X-Request-Id": "caller-id-1"})
    assert ok.status == 200 and ok.getheader("X-Request-Id") == "caller-id-1"
    missing, _ = http_exchange(unix, "POST", "/call/no_such_expert", body)
    assert missing.status == 404
    made = missing.getheader("X-Request-Id")
    assert made and made != "caller-id-1"
    unix.close()
    unix = UnixHTTPConnection(daemon.socket)
    big, _ = http_exchange(unix, "POST", "/call/echo", b"[" + b"1," * 1000 + b"1]",
                           {"X-Request-Id": "bad id with spaces"})
    assert big.status == 413
    assert big.getheader("X-Request-Id") not in (None, "bad id with spaces")  # not kept: one of the daemon's
    unix.close()
    tcp = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    denied, _ = http_exchange(tcp, "POST", "/call/add", body, {"X-Request-Id": "caller-id-2"})
    assert denied.status == 401 and denied.getheader("X-Request-Id") == "caller-id-2"
    tcp.close()
    tcp = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    health, _ = http_exchange(tcp, "GET", "/health", None, {"Authorization": f"Bearer {TOKEN}"})
    assert health.status == 200
    local_port = tcp.sock.getsockname()[1]
    tcp.close()
    lines = access_lines(log, 5, json_format=True)
    by_status = {line["status"]: line for line in lines[:-1]}
    assert set(by_status) == {200, 404, 413, 401}, lines
    assert [line["protocol"] for line in lines] == ["http"] * 5
    assert by_status[200]["request_id"] == "caller-id-1" and by_status[200]["expert"] == "/call/add"
    assert by_status[200]["bytes_out"] > len(ok_body)
    assert by_status[404]["request_id"] == made and by_status[404]["code"] == "unknown_expert"
    assert by_status[413]["request_id"] == big.getheader("X-Request-Id") and by_status[413]["code"] == "frame_too_large"
    assert by_status[401]["request_id"] == "caller-id-2" and by_status[401]["peer"].startswith("127.0.0.1:")
    assert lines[-1]["expert"] == "/health" and lines[-1]["code"] == "ok"
    assert lines[-1]["peer"] == f"127.0.0.1:{local_port}"
    assert by_status[200]["peer"] == f"uid={os.getuid()},pid={os.getpid()}"
    # The error log is JSON too: every line an object with its keys.
    for line in daemon.log.splitlines():
        entry = json.loads(line)
        assert {"time", "level", "pid", "logger", "message"} <= set(entry), line
        assert TIME.match(entry["time"]), line


def test_http_calls_a_worker_answers_on_http_listen_name_the_callers_address(make_daemon, short_dir):
    log = short_dir / "access.log"
    port = free_port()
    make_daemon(access_log=log, http_listen=f"127.0.0.1:{port}", token=TOKEN, workers=1, linger="2s")
    tcp = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    auth = {"Authorization": f"Bearer {TOKEN}"}
    # The first call is handed to the worker; the second comes on the connection the worker kept.
    for numbers in ([2, 3], [4, 5]):
        answer, body = http_exchange(tcp, "POST", "/call/add", json.dumps(numbers).encode(), auth)
        assert answer.status == 200 and json.loads(body) == sum(numbers)
    local_port = tcp.sock.getsockname()[1]
    tcp.close()
    lines = access_lines(log, 2)
    assert [(line["expert"], line["code"], line["status"]) for line in lines] == [("/call/add", "ok", 200)] * 2
    assert [line["peer"] for line in lines] == [f"127.0.0.1:{local_port}"] * 2


def test_a_callers_request_id_survives_its_worker_dying_on_a_kept_http_connection(make_daemon, short_dir):
    log = short_dir / "access.log"
    daemon = make_daemon(access_log=log, workers=1, linger="2s")
    unix = UnixHTTPConnection(daemon.socket)
    first, _ = http_exchange(unix, "POST", "/map/add", b"[1, 2]")
    assert first.status == 200
    # The worker lingers on the connection: it, not the master, reads the next request.
    died, body = http_exchange(unix, "POST", "/call/kill_worker", b"[]", {"X-Request-Id": "my-caller-id"})
    unix.close()
    assert died.status >= 500 and json.loads(body)["error"]["code"] == "worker_lost", body
    assert died.getheader("X-Request-Id") == "my-caller-id"
    _, line = access_lines(log, 2)
    assert (line["request_id"], line["expert"], line["code"]) == ("my-caller-id", "/call/kill_worker", "worker_lost")
    assert line["bytes_in"] == 0  # (the master did not see this request: its size is not known)
    assert wait_until(lambda: "while serving request my-caller-id" in daemon.log), daemon.log


def test_a_request_without_an_id_dying_on_a_kept_http_connection_is_named_by_the_id_it_was_given(
        make_daemon, short_dir):
    log = short_dir / "access.log"
    daemon = make_daemon(access_log=log, workers=1, linger="2s")
    unix = UnixHTTPConnection(daemon.socket)
    first, _ = http_exchange(unix, "POST", "/call/add", b"[1, 2]", {"X-Request-Id": "the-first-one"})
    assert first.status == 200
    died, _ = http_exchange(unix, "POST", "/call/kill_worker", b"[]")
    unix.close()
    made = died.getheader("X-Request-Id")
    assert made and made != "the-first-one"
    _, line = access_lines(log, 2)
    assert (line["request_id"], line["expert"], line["code"]) == (made, "/call/kill_worker", "worker_lost")
    assert wait_until(lambda: f"while serving request {made}" in daemon.log), daemon.log


def test_a_callers_request_id_survives_a_timeout_on_a_kept_http_connection(make_daemon, short_dir):
    log = short_dir / "access.log"
    daemon = make_daemon(access_log=log, workers=1, linger="2s", timeout="0.5s")
    unix = UnixHTTPConnection(daemon.socket)
    first, _ = http_exchange(unix, "POST", "/call/add", b"[1, 2]", {"X-Request-Id": "the-first-one"})
    assert first.status == 200
    slow, _ = http_exchange(unix, "POST", "/call/slow", b"[10]", {"X-Request-Id": "my-slow-id"})
    unix.close()
    assert slow.status == 504 and slow.getheader("X-Request-Id") == "my-slow-id"
    _, line = access_lines(log, 2)
    assert (line["request_id"], line["expert"], line["code"]) == ("my-slow-id", "/call/slow", "timeout")
    assert wait_until(lambda: "timeout of slow (request my-slow-id)" in daemon.log), daemon.log


def test_the_scoreboard_names_a_callers_id_only_for_the_request_it_came_with():
    board = Scoreboard(2)
    writer = board.slot(1)
    writer.begin(1.0, 5.0, 77, "fib")
    assert board.http_request(1, 77) == (None, None)  # (nothing written yet)
    writer.http_route("opinion")
    writer.caller_id(77, "c" * 64)
    assert board.http_request(1, 77) == ("opinion", "c" * 64)
    writer.begin(2.0, 5.0, 78, "fib")  # the next request, without an id of its own: the old one is not its
    writer.http_route("call")
    assert board.http_request(1, 78) == ("call", None)
    assert board.read(1) == (2.0, 5.0, 78, False, "fib") and board.http_request(0, 0) == (None, None)


def test_http_bytes_in_and_out_are_what_went_over_the_socket(make_daemon, short_dir):
    log = short_dir / "access.log"
    daemon = make_daemon(access_log=log)
    request = b'POST /call/add HTTP/1.1\r\nHost: localhost\r\nContent-Length: 6\r\n\r\n[2, 3]'
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(10)
        sock.connect(str(daemon.socket))
        sock.sendall(request)
        response = http.client.HTTPResponse(sock)
        response.begin()
        body = response.read()
        fields = sum(len(f"{name}: {value}\r\n") for name, value in response.getheaders())
        head_size = len(f"HTTP/1.1 200 {response.reason}\r\n") + fields + 2
    (line,) = access_lines(log, 1)
    assert (line["bytes_in"], line["bytes_out"]) == (len(request), head_size + len(body))
    assert line["request_id"] == response.getheader("X-Request-Id")


# ------------------------------------------------------------------------------------------ pipelines, batches
def test_a_pipeline_request_gets_one_line_of_its_own(make_daemon, short_dir):
    log = short_dir / "access.log"
    daemon = make_daemon({"language": "docexperts:language", "length": "docexperts:length"}, access_log=log,
                         workers=1)
    document = daemon.client().opinions({"text": "hello there"}, ["language", "length"])
    assert set(document["opinions"]) == {"language", "length"}
    unix = UnixHTTPConnection(daemon.socket)
    answer, _ = http_exchange(unix, "POST", "/pipeline/language,length", json.dumps({"text": "hi"}).encode(),
                              {"Content-Type": "application/json"})
    unix.close()
    assert answer.status == 200
    lines = access_lines(log, 2)
    assert [(line["protocol"], line["expert"], line["code"]) for line in lines] == [
        ("msgpack", "language,length", "ok"), ("http", "/pipeline/language,length", "ok")]


def test_each_member_of_a_batch_gets_its_line(make_daemon, short_dir):
    log = short_dir / "access.log"
    daemon = make_daemon(BATCH_EXPERTS, workers=1, access_log=log)
    calls = [tagged(daemon, {"x": "m1"}), tagged(daemon, {"x": "m2", "fail": True}),
             lambda: post(UnixHTTPConnection(daemon.socket, timeout=30), "/call/tagged", [{"x": "h1"}])]
    m1, m2, h1 = in_one_batch(daemon, short_dir, calls)
    assert m1["size"] == 3 and isinstance(m2, ExpertFailed) and h1[0] == 200
    # (The master's own lines come too: the queue is watched through /metrics.)
    assert wait_until(lambda: log.read_text().count("tagged ") == 3), log.read_text()
    lines = access_lines(log, len(log.read_text().splitlines()))
    members = [line for line in lines if line["expert"] in ("tagged", "/call/tagged")]
    assert sorted((line["protocol"], line["code"], line["status"]) for line in members) == [
        ("http", "ok", 200), ("msgpack", "expert_failed", None), ("msgpack", "ok", None)]
    assert m2.request_id in {line["request_id"] for line in members}
    assert len({line["duration_ms"] for line in members}) == 1  # one call served them all
    assert [line["expert"] for line in lines].count("gate") == 1


# ------------------------------------------------------------------------------------------ the file
def test_no_access_log_unless_asked(make_daemon, short_dir):
    daemon = make_daemon()
    assert daemon.client().call("add", 1, 2) == 3
    unix = UnixHTTPConnection(daemon.socket)
    assert http_exchange(unix, "POST", "/call/add", b"[1, 2]")[0].status == 200
    unix.close()
    daemon.stop()
    assert not any(" msgpack " in line or " http " in line for line in daemon.log.splitlines()), daemon.log
    assert sorted(path.name for path in short_dir.iterdir() if "access" in path.name) == []


def test_usr1_reopens_the_access_log_after_it_was_moved(make_daemon, short_dir):
    log = short_dir / "access.log"
    daemon = make_daemon(access_log=log, workers=1)
    assert daemon.client().call("add", 1, 2) == 3
    access_lines(log, 1)
    log.rename(short_dir / "access.log.1")
    daemon.send_signal(signal.SIGUSR1)
    assert wait_until(lambda: "log files reopened" in daemon.log and log.exists()), daemon.log
    time.sleep(0.2)  # (the worker reopens when idle: at once)
    assert daemon.client().call("add", 2, 2) == 4
    (line,) = access_lines(log, 1)
    assert line["expert"] == "add"


def test_an_access_log_that_is_a_symlink_stops_start_up_with_one_line(make_daemon, short_dir):
    target = short_dir / "elsewhere"
    target.write_text("")
    (short_dir / "access.log").symlink_to(target)
    daemon = make_daemon(access_log=short_dir / "access.log", start=False)
    daemon.start(wait=False)
    assert daemon.proc.wait(30) == 2
    assert "cannot open access log" in daemon.log and "symbolic link" in daemon.log, daemon.log
    assert target.read_text() == ""


def test_access_log_dash_writes_to_stderr_beside_the_log(make_daemon):
    daemon = make_daemon(access_log="-")
    with pytest.raises(UnknownExpert) as unknown:
        daemon.client().call("nope")
    assert wait_until(lambda: f" {unknown.value.request_id} " in daemon.log), daemon.log
    (line,) = [parse_text(text) for text in daemon.log.splitlines() if f" {unknown.value.request_id} " in text]
    assert (line["expert"], line["code"]) == ("nope", "unknown_expert")


def test_a_log_format_that_is_neither_text_nor_json_stops_start_up_with_one_line(short_dir):
    config = write_config(short_dir, log_format="xml")
    done = run_expertd("--config", str(config), "--check")
    assert done.returncode == 2
    assert "log_format" in done.stderr and "text or json" in done.stderr, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr


# ------------------------------------------------------------------------------------------ pure parts
@pytest.mark.parametrize(("value", "kept"), [
    (b"abc-123", "abc-123"),
    (b"x" * 64, "x" * 64),
    (b"x" * 65, None),
    (b"", None),
    (b"has space", None),
    (b"tab\there", None),
    (b"caf\xc3\xa9", None),
    (b"line\nbreak", None),
])
def test_an_x_request_id_is_kept_only_when_short_and_printable(value, kept):
    assert accesslog.request_id_of(value) == kept


@pytest.mark.parametrize(("json_format", "target", "status", "expected"), [
    (False, "add", None, "2026-11-26T10:00:00.250Z 3-7 uid=1,pid=2 msgpack add ok - 1.500ms 20 9\n"),
    (False, None, 401, "2026-11-26T10:00:00.250Z 3-7 uid=1,pid=2 msgpack - ok 401 1.500ms 20 9\n"),
    (False, "two words\n", None, "2026-11-26T10:00:00.250Z 3-7 uid=1,pid=2 msgpack two?words? ok - 1.500ms 20 9\n"),
    (True, "add", None, '{"time": "2026-11-26T10:00:00.250Z", "request_id": "3-7", "peer": "uid=1,pid=2", '
                        '"protocol": "msgpack", "expert": "add", "code": "ok", "status": null, "duration_ms": 1.5, '
                        '"bytes_in": 20, "bytes_out": 9}\n'),
])
def test_an_access_line_is_formatted_as_documented(json_format, target, status, expected):
    when = 1795687200.25  # 2026-11-26T10:00:00.250Z
    assert accesslog.format_line(when, "3-7", "uid=1,pid=2", "msgpack", target, "ok", status, 0.0015, 20, 9,
                                 json_format) == expected


@pytest.mark.parametrize(("address", "peer"), [
    (("127.0.0.1", 8000), "127.0.0.1:8000"),
    (("::1", 8000, 0, 0), "[::1]:8000"),
    ("", "-"),
])
def test_a_tcp_peer_is_its_address_and_port(address, peer):
    assert accesslog.tcp_peer(address) == peer


@pytest.mark.parametrize(("kind", "label"), [
    (protocol.PING, "(ping)"), (protocol.STATUS, "(status)"), (protocol.LIST, "(list)"), (protocol.RELOAD, "(reload)"),
    (protocol.STOP, "(stop)"), (protocol.SCALE, "(scale)")])
def test_a_request_that_names_no_expert_is_named_by_its_kind(kind, label):
    assert protocol.KIND_LABELS[kind] == label
    assert protocol.KIND_NAMES[kind] == label[1:-1].upper()  # (one table: the refusals' "may not send STOP")
