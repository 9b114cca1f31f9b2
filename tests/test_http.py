"""The HTTP/JSON front, driven with http.client, curl and schemathesis against a real daemon."""

from __future__ import annotations

import http.client
import json
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from expertd import protocol

from conftest import BIN, ROOT, UnixHTTPConnection, free_port, raw_connection, run_expertd, wait_until, write_config

TOKEN = "s3cret-token-for-the-tests"


def request(conn: http.client.HTTPConnection, method: str, path: str, body: object = None,
            headers: dict | None = None) -> tuple[int, http.client.HTTPResponse, object]:
    data = body if isinstance(body, (bytes, type(None))) else json.dumps(body).encode()
    conn.request(method, path, body=data, headers=headers or {})
    response = conn.getresponse()
    raw = response.read()
    if response.getheader("Content-Type", "").startswith("application/json"):
        return response.status, response, json.loads(raw)
    return response.status, response, raw.decode()


def test_curl_calls_an_expert_over_the_unix_socket(daemon):
    curl = shutil.which("curl")
    if curl is None:
        pytest.skip("curl is not installed")
    done = subprocess.run([curl, "-sS", "--unix-socket", str(daemon.socket), "http://localhost/call/fib",
                           "-d", '{"n": 5}'], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0 and done.stdout == "8\n", done.stderr
    document = json.dumps({"text": "four", "opinions": {"other": 1}})
    done = subprocess.run([curl, "-sS", "--unix-socket", str(daemon.socket), "http://localhost/opinion/document_length",
                           "-H", "Content-Type: application/json", "-d", document],
                          capture_output=True, text=True, timeout=30)
    assert json.loads(done.stdout)["opinions"] == {"other": 1, "document_length": {"chars": 4,
                                                                                   "seen_opinions": ["other"]}}


def test_positional_and_keyword_arguments(web):
    assert request(web, "POST", "/call/fib", [10])[::2] == (200, 89)
    assert request(web, "POST", "/call/fib", {"n": 10})[::2] == (200, 89)
    assert request(web, "POST", "/call/add", [2])[::2] == (200, 2)
    value = {"x": [1, {"y": None}]}
    assert request(web, "POST", "/call/echo", value)[2] == {"args": [], "kwargs": value}


def test_opinion_returns_the_document_with_the_opinion_added(web):
    status, _, document = request(web, "POST", "/opinion/document_length", {"text": "hello", "id": 7})
    assert status == 200
    assert document == {"text": "hello", "id": 7, "opinions": {"document_length": {"chars": 5, "seen_opinions": []}}}
    # An expert that returns its argument: the reply holds the document as sent, once.
    status, _, document = request(web, "POST", "/opinion/echo", {"text": "hi"})
    assert status == 200 and document == {"text": "hi", "opinions": {"echo": {"args": [{"text": "hi"}], "kwargs": {}}}}


def test_keep_alive_serves_many_requests_on_one_connection(web):
    request(web, "GET", "/health")
    first_socket = web.sock
    for n in range(60):
        assert request(web, "POST", "/call/add", [n, 1])[::2] == (200, n + 1)
    assert request(web, "GET", "/experts")[0] == 200
    assert web.sock is first_socket  # http.client reconnects silently if the daemon closes: it did not


def test_msgpack_and_http_share_the_socket(daemon, web):
    client = daemon.client()
    for n in range(20):
        assert client.call("add", n, 2) == n + 2
        assert request(web, "POST", "/call/add", [n, 3])[2] == n + 3


def test_experts_and_health(web):
    status, _, experts = request(web, "GET", "/experts")
    assert status == 200
    fib = next(e for e in experts if e["name"] == "fib")
    assert fib["signature"] == "fib(n: int) -> int" and fib["function"] == "fibs:fib"
    status, _, health = request(web, "GET", "/health")
    assert status == 200 and health["status"] == "ok" and health["workers_ready"] == 2


@pytest.mark.parametrize(("method", "path", "body", "status", "code"), [
    ("POST", "/call/fib", b"{not json", 400, "bad_request"),
    ("POST", "/call/fib", b"", 400, "bad_request"),
    ("POST", "/call/fib", '"a string"', 400, "bad_request"),
    ("POST", "/call/fib", [1, 2, 3], 400, "bad_request"),
    ("POST", "/call/fib", {"m": 1}, 400, "bad_request"),
    ("POST", "/opinion/document_length", [1], 400, "bad_request"),
    ("POST", "/call/nonexistent", [1], 404, "unknown_expert"),
    ("POST", "/opinion/nonexistent", {}, 404, "unknown_expert"),
    ("GET", "/nowhere", None, 404, "not_found"),
    ("POST", "/call/", [1], 404, "not_found"),
    ("GET", "/call/fib", None, 405, "method_not_allowed"),
    ("POST", "/health", b"", 405, "method_not_allowed"),
    ("POST", "/call/boom", ["the model is on fire"], 500, "expert_failed"),
    ("POST", "/call/blob", [10], 500, "bad_result"),
    ("POST", "/call/echo", ("[" * 70 + "1" + "]" * 70).encode(), 400, "bad_request"),  # past max_depth
])
def test_errors_are_json_with_their_status(daemon, method, path, body, status, code):
    conn = UnixHTTPConnection(str(daemon.socket))
    got, response, error = request(conn, method, path, body if not isinstance(body, str) else body.encode())
    assert got == status, error
    assert error["error"]["code"] == code and error["error"]["message"]
    if status == 405:
        assert response.getheader("Allow") in ("POST", "GET, HEAD")
    if code == "expert_failed":
        assert error["error"]["type"] == "builtins.ValueError" and "on fire" in error["error"]["message"]
    assert daemon.client().call("add", 1, 1) == 2  # nothing bad request does harms the daemon


def test_opinion_on_a_document_whose_opinions_is_not_an_object_is_the_callers_error(web):
    for opinions in ([1, 2], "none", 3, None):
        status, _, error = request(web, "POST", "/opinion/document_length", {"text": "hi", "opinions": opinions})
        assert status == 400, error
        assert error["error"]["code"] == "bad_request" and "'opinions'" in error["error"]["message"]
    assert request(web, "POST", "/opinion/document_length", {"text": "hi", "opinions": {}})[0] == 200


def test_a_result_json_cannot_carry_is_500_and_the_worker_lives(daemon, web):
    before = daemon.worker_pids()
    status, _, error = request(web, "POST", "/call/deep", [])
    assert status == 500 and error["error"]["code"] == "bad_result"
    assert daemon.worker_pids() == before


def test_http_1_0_reply_too_big_for_the_socket_still_closes(daemon):
    body = json.dumps(["x" * 3_000_000]).encode()
    sock = raw_connection(daemon, timeout=20)
    sock.sendall(b"POST /call/echo HTTP/1.0\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
    time.sleep(0.3)  # the worker cannot put it all in the socket: the master finishes writing it
    reply = b""
    while chunk := sock.recv(1 << 20):  # ends only if the daemon closes, as HTTP/1.0 needs
        reply += chunk
    assert reply.startswith(b"HTTP/1.1 200 ") and len(reply) > 3_000_000


def test_a_connection_keeps_to_its_protocol(daemon):
    sock = raw_connection(daemon)
    sock.sendall(b"POST /call/add HTTP/1.1\r\nHost: x\r\nContent-Length: 6\r\n\r\n[1, 1]")
    assert sock.recv(65536).endswith(b"\r\n\r\n2\n")
    sock.sendall(protocol.encode_call(1, "add", [1, 2], {}))  # msgpack on an HTTP connection: refused
    assert sock.recv(65536).startswith(b"HTTP/1.1 400 ")


def test_folded_headers_and_bodies_on_get_are_refused(daemon):
    sock = raw_connection(daemon)
    sock.sendall(b"POST /call/echo HTTP/1.1\r\nHost: x\r\nX-A: a\r\n Content-Length: 5\r\n\r\nhello")
    assert sock.recv(65536).startswith(b"HTTP/1.1 400 ")
    sock = raw_connection(daemon)
    sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}")
    assert sock.recv(65536).startswith(b"HTTP/1.1 400 ")


def test_timeout_is_504_and_a_lost_worker_503(make_daemon):
    daemon = make_daemon({"slow": {"function": "testexperts:slow", "timeout": "0.5s"},
                          "kill_worker": "testexperts:kill_worker", "add": "testexperts:add"})
    conn = UnixHTTPConnection(str(daemon.socket))
    status, _, error = request(conn, "POST", "/call/slow", [5])
    assert status == 504 and error["error"]["code"] == "timeout" and error["error"]["expert"] == "slow"
    conn = UnixHTTPConnection(str(daemon.socket))
    status, response, error = request(conn, "POST", "/call/kill_worker", [])
    assert status == 503 and error["error"]["code"] == "worker_lost" and response.getheader("Retry-After") == "1"
    assert request(UnixHTTPConnection(str(daemon.socket)), "POST", "/call/add", [1, 2])[2] == 3


def test_body_over_max_frame_is_413(make_daemon):
    daemon = make_daemon(max_frame="1K")
    status, _, error = request(UnixHTTPConnection(str(daemon.socket)), "POST", "/call/echo", ["x" * 2000])
    assert status == 413 and error["error"]["code"] == "frame_too_large"
    assert request(UnixHTTPConnection(str(daemon.socket)), "POST", "/call/echo", ["x" * 100])[0] == 200


def test_chunked_body_is_411_and_garbage_is_400(daemon):
    sock = raw_connection(daemon)
    sock.sendall(b"POST /call/fib HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n1\r\n5\r\n0\r\n\r\n")
    assert sock.recv(65536).startswith(b"HTTP/1.1 411 ")
    sock = raw_connection(daemon)
    sock.sendall(b"GET /health\r\n\r\n")  # no protocol version
    assert sock.recv(65536).startswith(b"HTTP/1.1 400 ")
    sock = raw_connection(daemon)
    sock.sendall(b"POST /call/fib HTTP/1.1\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\n[5]")
    assert sock.recv(65536).startswith(b"HTTP/1.1 400 ")
    assert daemon.client().call("fib", 5) == 8


def test_a_request_arriving_slowly_is_gathered(daemon):
    sock = raw_connection(daemon)
    body = json.dumps({"n": 6}).encode()
    for piece in (b"POST /call/fib HTTP/1.1\r\nHo", b"st: x\r\nContent-Length: %d\r\n\r\n" % len(body), body[:3],
                  body[3:]):
        sock.sendall(piece)
        time.sleep(0.05)
    reply = sock.recv(65536)
    assert reply.startswith(b"HTTP/1.1 200 ") and reply.endswith(b"\r\n\r\n13\n")


def test_expect_100_continue_is_answered(daemon):
    sock = raw_connection(daemon)
    body = json.dumps({"x": "y" * 5000}).encode()
    sock.sendall(b"POST /call/echo HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n"
                 b"Content-Length: %d\r\n\r\n" % len(body))
    assert sock.recv(65536) == b"HTTP/1.1 100 Continue\r\n\r\n"
    sock.sendall(body)
    reply = b""
    while not reply.endswith(b"}}\n"):
        reply += sock.recv(65536)
    assert reply.startswith(b"HTTP/1.1 200 ") and b'"y' in reply


def test_http_1_0_closes_after_the_reply(daemon):
    sock = raw_connection(daemon)
    sock.sendall(b"POST /call/fib HTTP/1.0\r\nContent-Length: 3\r\n\r\n[7]")
    reply = b""
    while chunk := sock.recv(65536):
        reply += chunk
    assert reply.startswith(b"HTTP/1.1 200 ") and reply.endswith(b"21\n")


def test_pipelined_requests_are_answered_in_order(daemon):
    sock = raw_connection(daemon)
    calls = b"".join(b"POST /call/add HTTP/1.1\r\nHost: x\r\nContent-Length: 6\r\n\r\n[%d, 1]" % n for n in range(5))
    sock.sendall(calls + b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
    reply = b""
    while reply.count(b"HTTP/1.1 200 ") < 6:
        reply += sock.recv(65536)
    bodies = [part.split(b"\r\n\r\n", 1)[1] for part in reply.split(b"HTTP/1.1 200 OK")[1:]]
    assert bodies[:5] == [b"%d\n" % (n + 1) for n in range(5)] and b'"ok"' in bodies[5]


def test_metrics_in_prometheus_format(daemon, web):
    for n in range(7):
        request(web, "POST", "/call/add", [n])
    daemon.client().call("add", 1, 1)
    request(web, "POST", "/call/boom", ["x"])
    request(web, "POST", "/call/nonexistent", [])
    status, response, text = request(web, "GET", "/metrics")
    assert status == 200 and response.getheader("Content-Type").startswith("text/plain; version=0.0.4")
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    assert samples[("expertd_requests_total", (("expert", "add"),))] == 8
    assert samples[("expertd_errors_total", (("code", "expert_failed"), ("expert", "boom")))] == 1
    assert samples[("expertd_errors_total", (("code", "unknown_expert"), ("expert", "(unknown)")))] == 1
    assert samples[("expertd_request_duration_seconds_count", (("expert", "add"),))] == 8
    assert samples[("expertd_request_duration_seconds_bucket", (("expert", "add"), ("le", "+Inf")))] == 8
    assert 0 < samples[("expertd_request_duration_seconds_sum", (("expert", "add"),))] < 8
    workers = sum(v for (name, _), v in samples.items() if name == "expertd_workers")
    assert workers == 2
    assert samples[("expertd_memory_bytes", (("kind", "rss"), ("process", "workers")))] > 1 << 20
    assert samples[("expertd_workers_wanted", ())] == 2


def test_metrics_outlive_recycled_workers(make_daemon):
    daemon = make_daemon(max_requests=5, max_requests_jitter=0)
    client = daemon.client()
    for n in range(23):
        assert client.call("add", n, 0) == n
    wait_until(lambda: len(daemon.worker_pids()) == 2)
    text = request(UnixHTTPConnection(str(daemon.socket)), "GET", "/metrics")[2]
    assert 'expertd_requests_total{expert="add"} 23' in text.splitlines()


@pytest.fixture
def tcp_daemon(make_daemon):
    port = free_port()
    daemon = make_daemon(http_listen=f"127.0.0.1:{port}", token=TOKEN)
    daemon.port = port
    return daemon


def test_tcp_listener_requires_the_token(tcp_daemon):
    def call(headers: dict) -> tuple[int, object]:
        conn = http.client.HTTPConnection("127.0.0.1", tcp_daemon.port, timeout=10)
        status, _response, body = request(conn, "POST", "/call/fib", [5], headers)
        return status, body

    status, body = call({})
    assert status == 401 and body["error"]["code"] == "unauthorized"
    assert call({"Authorization": "Bearer wrong-token-of-enough-length"})[0] == 401
    assert call({"Authorization": f"Bearer {TOKEN}"}) == (200, 8)
    # Keep-alive on TCP, token on every request:
    conn = http.client.HTTPConnection("127.0.0.1", tcp_daemon.port, timeout=10)
    for n in range(10):
        assert request(conn, "POST", "/call/add", [n, 1], {"Authorization": f"Bearer {TOKEN}"})[2] == n + 1
    assert request(conn, "POST", "/call/add", [1, 1])[0] == 401
    # The Unix socket needs no token: its file mode and allow_uids guard it.
    assert request(UnixHTTPConnection(str(tcp_daemon.socket)), "POST", "/call/fib", [5])[2] == 8


def test_tcp_listener_speaks_only_http(tcp_daemon):
    with socket.create_connection(("127.0.0.1", tcp_daemon.port), timeout=10) as sock:
        sock.sendall(b"XD\x01\x01\x00\x00\x00\x01\x00\x00\x00\x01\x90")
        assert sock.recv(65536).startswith(b"HTTP/1.1 400 ")
    assert tcp_daemon.proc.poll() is None


def test_loopback_needs_no_token_but_a_loopback_host(make_daemon):
    port = free_port()
    make_daemon(http_listen=f"127.0.0.1:{port}")
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    assert request(conn, "POST", "/call/fib", {"n": 5})[::2] == (200, 8)
    # A page that reached 127.0.0.1 through DNS rebinding sends its own host name:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    status, _, error = request(conn, "POST", "/call/fib", [5], {"Host": "attacker.example"})
    assert status == 403 and error["error"]["code"] == "forbidden_host"


def test_every_request_on_a_kept_alive_loopback_connection_has_its_host_checked(make_daemon):
    port = free_port()
    make_daemon(http_listen=f"127.0.0.1:{port}", linger="1s")  # a lingering worker serves the next request
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b"POST /call/add HTTP/1.1\r\nHost: localhost\r\nContent-Length: 6\r\n\r\n[1, 1]")
        assert sock.recv(65536).startswith(b"HTTP/1.1 200 ")
        # The same connection, another host name (DNS rebinding after a first innocent request):
        sock.sendall(b"POST /call/add HTTP/1.1\r\nHost: evil.example\r\nContent-Length: 6\r\n\r\n[1, 1]")
        reply = sock.recv(65536)
        assert reply.startswith(b"HTTP/1.1 403 ") and b"forbidden_host" in reply, reply


def test_reload_keeps_the_token_in_force(tcp_daemon):
    config = tcp_daemon.config.read_text()
    tcp_daemon.config.write_text(config.replace(f"token = {TOKEN}\n", ""))
    tcp_daemon.send_signal(signal.SIGHUP)
    assert wait_until(lambda: "generation 2" in tcp_daemon.log and "takes a restart" in tcp_daemon.log)
    conn = http.client.HTTPConnection("127.0.0.1", tcp_daemon.port, timeout=10)
    assert request(conn, "POST", "/call/fib", [5])[0] == 401


def test_non_loopback_without_token_refuses_to_start(short_dir):
    config = write_config(short_dir, http_listen="0.0.0.0:8000")
    done = run_expertd("--config", str(config), "--socket", str(short_dir / "x.sock"))
    assert done.returncode != 0
    assert "http_listen = 0.0.0.0:8000" in done.stderr and "token" in done.stderr
    assert not (short_dir / "x.sock").exists()


def test_port_in_use_refuses_to_start_and_leaves_no_socket(short_dir):
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen(1)
        port = holder.getsockname()[1]
        config = write_config(short_dir, http_listen=f"127.0.0.1:{port}")
        done = run_expertd("--config", str(config), "--socket", str(short_dir / "x.sock"))
    assert done.returncode == 1 and f"http_listen = 127.0.0.1:{port}: cannot listen" in done.stderr
    assert not (short_dir / "x.sock").exists()


def test_schemathesis_against_the_openapi_document(make_daemon):
    """Generated requests against docs/openapi.yaml on a live daemon: no 5xx, every response as documented."""
    port = free_port()
    daemon = make_daemon({"echo": "testexperts:echo"}, http_listen=f"127.0.0.1:{port}", token=TOKEN)
    # Generated names are nearly all unknown (404); half the run calls the one expert that takes anything.
    (daemon.socket.parent / "schemathesis.toml").write_text('[parameters]\n"path.name" = "echo"\n')
    done = subprocess.run(
        [str(BIN / "schemathesis"), "run", str(ROOT / "docs" / "openapi.yaml"), "--url", f"http://127.0.0.1:{port}",
         "--header", f"Authorization: Bearer {TOKEN}", "--max-examples", "40", "--workers", "1",
         "--checks", "not_a_server_error,status_code_conformance,content_type_conformance,"
                     "response_schema_conformance,response_headers_conformance",
         "--no-color", "--seed", "1"],
        capture_output=True, text=True, timeout=240, cwd=daemon.socket.parent,
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert daemon.proc.poll() is None


def test_http_client_library_is_not_needed_by_the_msgpack_client():
    done = subprocess.run([sys.executable, "-c", "import sys, expertd.client; print('h11' in sys.modules)"],
                          capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "False"


def test_openapi_document_names_every_route():
    spec = (Path(ROOT) / "docs" / "openapi.yaml").read_text()
    for path in ("/call/{name}:", "/opinion/{name}:", "/map/{name}:", "/experts:", "/health:", "/metrics:"):
        assert f"  {path}" in spec
