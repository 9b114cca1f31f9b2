"""Firefly's own client (firefly-python 0.1.15), unchanged, and curl-like raw HTTP against expertd's Firefly routes.

One real daemon for the module (started from an INI config with firefly_routes = yes, a token and a TCP
listener); each test asks it what a Firefly user would.
"""

from __future__ import annotations

import http.client
import itertools
import json
import os
import shutil
import signal
import socket
import tempfile
from pathlib import Path

import firefly
import pytest
from firefly.validator import ValidationError

from conftest import Daemon, UnixHTTPConnection, free_port, metrics_samples, run_expertd, wait_until, write_config
from users import as_user, local_user, needs_root

TOKEN = "s3cret-token-for-the-firefly-tests"
EXPERTS = {
    "square": "fireflyexperts.square",  # (Firefly's module.function form)
    "greet": "fireflyexperts.greet",
    "total": {"function": "fireflyexperts:total", "path": "/sum"},
    "fails": "fireflyexperts:fails",
    "raw_bytes": "fireflyexperts:raw_bytes",
    "doubled": "fireflyexperts:doubled",
    "health_check": {"function": "fireflyexperts:square", "path": "/health"},  # POST /health: a function
    "nap": {"function": "fireflyexperts:nap", "timeout": "0.5s"},
}


@pytest.fixture(scope="module")
def served():
    """(daemon, port, access log) of one daemon serving EXPERTS with Firefly's routes on http_listen."""
    directory = Path(tempfile.mkdtemp(prefix="xd-ff-", dir="/tmp"))
    port = free_port()
    access = directory / "access.log"
    config = write_config(directory, EXPERTS, http_listen=f"127.0.0.1:{port}", token=TOKEN, firefly_routes="yes",
                          allow_origins="https://app.example", access_log=access)
    daemon = Daemon(config, directory / "d.sock", workers=2).start()
    yield daemon, port, access
    daemon.kill()
    shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
def client(served):
    return firefly.Client(f"http://127.0.0.1:{served[1]}/", auth_token=TOKEN)


@pytest.fixture
def tcp(served):
    conn = http.client.HTTPConnection("127.0.0.1", served[1], timeout=10)
    yield conn
    conn.close()


def ask(conn: http.client.HTTPConnection, method: str, path: str, body: object = None, token: str | None = TOKEN,
        headers: dict | None = None) -> tuple[int, http.client.HTTPResponse, object]:
    sent = dict(headers or {})
    if token is not None:
        sent.setdefault("Authorization", f"Token {token}")
    data = body if isinstance(body, (bytes, type(None))) else json.dumps(body).encode()
    conn.request(method, path, body=data, headers=sent)
    response = conn.getresponse()
    raw = response.read()
    if response.getheader("Content-Type") == "application/json":
        return response.status, response, json.loads(raw)
    return response.status, response, raw


# ------------------------------------------------------------------------------ firefly.Client, unchanged
def test_firefly_client_calls_functions_with_named_arguments(client):
    assert client.square(n=7) == 49
    assert client.greet(name="Ada") == "Hello, Ada!"
    assert client.greet(name="Ada", greeting="Bonjour", punctuation=".") == "Bonjour, Ada."
    assert client.total(values=[1, 2, 3.5]) == 6.5  # its path, /sum, read from GET /
    assert client.doubled(items=21) == 42  # a batched expert: one call is a batch of one item


def test_firefly_client_shows_the_functions_docstring(client):
    assert client.square.__doc__ == "Returns the square of a number."
    assert client.greet.__doc__.startswith("Greets someone by name.\n")


def test_firefly_client_refuses_positional_arguments_itself(client):
    with pytest.raises(firefly.client.FireflyError, match="Firefly functions only accept named arguments"):
        client.square(7)


def test_firefly_client_with_a_wrong_token_gets_a_firefly_error(served):
    wrong = firefly.Client(f"http://127.0.0.1:{served[1]}/", auth_token="not-the-token-of-these-tests")
    # The real client asks GET / (for the doc) before any call: that is where the 403 stops it.
    with pytest.raises(firefly.client.FireflyError, match=r"Failed to contact the server \(http status code 403\)"):
        wrong.square(n=2)
    without = firefly.Client(f"http://127.0.0.1:{served[1]}/")
    with pytest.raises(firefly.client.FireflyError, match="403"):
        without.square(n=2)


def test_firefly_client_with_a_wrong_token_on_a_call_hears_of_the_token_mismatch(served, client):
    client.square(n=1)  # (the metadata is read with the right token...)
    client.auth_token = "not-the-token-of-these-tests"  # (... then the token changes, as after a rotation)
    with pytest.raises(firefly.client.FireflyError, match="Authorization token mismatch"):
        client.square(n=2)


def test_firefly_client_missing_argument_is_a_validation_error_with_the_signature_message(client):
    with pytest.raises(ValidationError, match=r"^missing a required argument: 'n'$"):
        client.square(m=3)
    with pytest.raises(ValidationError, match="unexpected keyword argument 'mood'"):
        client.greet(name="Ada", mood="happy")


def test_firefly_client_gets_the_functions_exception_as_its_message(client):
    with pytest.raises(firefly.client.FireflyError) as raised:
        client.fails(message="no luck today")
    assert str(raised.value) == "ValueError: no luck today"
    with pytest.raises(firefly.client.FireflyError, match="cannot be sent as JSON"):
        client.raw_bytes()


def test_firefly_client_calling_an_unknown_function_gets_not_found(client):
    with pytest.raises(firefly.client.FireflyError, match="Requested function not found"):
        client.no_such_function(x=1)


# ------------------------------------------------------------------------------ the protocol, on the wire
def test_get_root_lists_the_functions_in_firefly_shape(tcp):
    status, _, index = ask(tcp, "GET", "/")
    assert status == 200 and index["app"] == "firefly" and isinstance(index["version"], str)
    functions = index["functions"]
    assert set(functions) == set(EXPERTS)
    assert functions["square"] == {"path": "/square", "doc": "Returns the square of a number.",
                                   "parameters": [{"name": "n", "kind": "POSITIONAL_OR_KEYWORD"}]}
    assert functions["greet"]["parameters"] == [
        {"name": "name", "kind": "POSITIONAL_OR_KEYWORD"},
        {"name": "greeting", "kind": "POSITIONAL_OR_KEYWORD", "default": "Hello"},
        {"name": "punctuation", "kind": "POSITIONAL_OR_KEYWORD", "default": "!"}]
    assert functions["total"]["path"] == "/sum" and functions["health_check"]["path"] == "/health"


@pytest.mark.parametrize(("path", "body", "status", "error"), [
    ("/square", b"{not json", 400, "the body is not valid JSON: Expecting property name enclosed in double quotes: "
                                   "line 1 column 2 (char 1)"),
    ("/square", {"m": 2}, 422, "missing a required argument: 'n'"),
    ("/square", [2], 422, "the body must be a JSON object of named arguments, not an array (Firefly functions "
                          "take named arguments only)"),
    ("/fails", {}, 500, "ValueError: boom"),
    ("/nowhere", {}, 404, "Not found: /nowhere"),
    ("/square/", {"n": 2}, 404, "Not found: /square/"),  # (Firefly's paths are exact)
])
def test_errors_are_firefly_bodies_with_firefly_statuses(tcp, path, body, status, error):
    got, response, reply = ask(tcp, "POST", path, body)
    assert (got, reply) == (status, {"error": error})
    assert response.getheader("Content-Type") == "application/json"


def test_the_token_is_firefly_or_bearer_and_every_request_needs_it(tcp):
    assert ask(tcp, "POST", "/square", {"n": 3})[::2] == (200, 9)
    assert ask(tcp, "POST", "/square", {"n": 3}, token=None, headers={"Authorization": f"Bearer {TOKEN}"})[::2] \
        == (200, 9)
    for token, path in ((None, "/"), ("wrong-token-of-enough-length", "/square"), (None, "/nowhere")):
        tcp.close()
        assert ask(tcp, "POST" if path != "/" else "GET", path, {} if path != "/" else None, token=token)[::2] \
            == (403, {"error": "Invalid auth token"})


def test_cors_headers_and_the_preflight_need_no_token(tcp):
    status, response, body = ask(tcp, "OPTIONS", "/square", token=None,
                                 headers={"Origin": "https://app.example", "Access-Control-Request-Method": "POST"})
    assert (status, body) == (200, b"")
    assert response.getheader("Access-Control-Allow-Origin") == "https://app.example"
    assert response.getheader("Access-Control-Allow-Methods") == "GET,POST"
    assert response.getheader("Access-Control-Allow-Headers") == "Content-Type, Authorization"
    for method, path, body in (("POST", "/square", {"n": 2}), ("POST", "/fails", {}), ("GET", "/", None)):
        response = ask(tcp, method, path, body)[1]
        assert response.getheader("Access-Control-Allow-Origin") == "https://app.example", path
    # Not on expertd's own routes:
    assert ask(tcp, "POST", "/call/square", [2])[1].getheader("Access-Control-Allow-Origin") is None


def test_a_file_upload_is_refused_with_a_clear_error(tcp):
    body = b"--XX\r\nContent-Disposition: form-data; name=\"n\"\r\n\r\n3\r\n--XX--\r\n"
    status, _, reply = ask(tcp, "POST", "/square", body, headers={"Content-Type": "multipart/form-data; boundary=XX"})
    assert status == 415 and "does not take file uploads" in reply["error"]
    assert ask(tcp, "POST", "/square", {"n": 4})[::2] == (200, 16)  # (same connection, kept alive)


def test_wrong_methods_get_firefly_405s_and_native_gets_stay(tcp):
    status, response, reply = ask(tcp, "GET", "/square")
    assert status == 405 and reply == {"error": "GET is not allowed on /square; POST a JSON object of named "
                                                "arguments"}
    assert response.getheader("Allow") == "POST, OPTIONS"
    tcp.close()
    # A Firefly path equal to a native GET route: GET is expertd's health check, POST the function.
    status, _, health = ask(tcp, "GET", "/health")
    assert status == 200 and health["status"] == "ok"
    assert ask(tcp, "POST", "/health", {"n": 5})[::2] == (200, 25)


def test_native_routes_work_beside_firefly_routes_and_take_the_firefly_token(served, tcp):
    daemon = served[0]
    assert ask(tcp, "POST", "/call/square", [6])[::2] == (200, 36)  # (Authorization: Token, on a native route)
    assert ask(tcp, "POST", "/call/square", {"n": 6}, token=None,
               headers={"Authorization": f"Bearer {TOKEN}"})[::2] == (200, 36)
    status, _, reply = ask(tcp, "POST", "/call/nowhere", [1])
    assert status == 404 and reply["error"]["code"] == "unknown_expert"  # (expertd's own error shape)
    tcp.close()
    experts = ask(tcp, "GET", "/experts")[2]
    assert {entry["name"] for entry in experts} == set(EXPERTS)
    with daemon.client() as native:  # msgpack on the Unix socket
        assert native.call("square", 8) == 64


def test_keep_alive_request_ids_metrics_and_the_access_log_cover_firefly_calls(served, tcp):
    daemon, _, access = served
    before = _requests(daemon, "greet")
    for number in range(3):  # one connection
        status, response, reply = ask(tcp, "POST", "/greet", {"name": f"n{number}"},
                                      headers={"X-Request-Id": f"ff-call-{number}"})
        assert (status, reply) == (200, f"Hello, n{number}!")
        assert response.getheader("X-Request-Id") == f"ff-call-{number}"
    assert wait_until(lambda: _requests(daemon, "greet") == before + 3)
    assert wait_until(lambda: "ff-call-2" in access.read_text())
    line = next(line for line in access.read_text().splitlines() if "ff-call-2" in line)
    assert "/firefly/greet" in line and " 200 " in line


def test_the_daemons_own_errors_for_a_call_in_flight_take_firefly_shape_too(tcp, client):
    status, response, reply = ask(tcp, "POST", "/nap", {"seconds": 5})  # killed past its timeout, by the master
    assert status == 504 and set(reply) == {"error"} and isinstance(reply["error"], str)
    assert response.getheader("Access-Control-Allow-Origin") == "https://app.example"  # (a page may read it)
    assert "timeout" in reply["error"]
    with pytest.raises(firefly.client.FireflyError, match="Oops"):  # (what Firefly's client says of a 504)
        client.nap(seconds=5)
    assert client.nap(seconds=0) == 0


def test_bad_requests_never_kill_the_daemon(served, tcp):
    daemon, port, _ = served
    auth = b"Authorization: Token " + TOKEN.encode() + b"\r\n"
    nasty = [b"POST /square HTTP/1.1\r\n" + auth + b"Content-Length: 5\r\n\r\n[[[[[",
             b"POST /square HTTP/1.1\r\n" + auth + b"Content-Length: 10\r\n\r\n{\"n\": [1]}",  # (TypeError)
             b"POST /square HTTP/1.1\r\n" + auth + b"Content-Length: 6\r\n\r\n\xff\xfe{}{}",
             b"POST /square HTTP/1.1\r\n" + auth + b"Content-Length: 3000\r\n\r\n" + b"[" * 3000,
             b"OPTIONS / HTTP/1.1\r\nContent-Length: 3\r\n\r\nabc",
             b"POST / HTTP/1.1\r\n" + auth + b"Content-Length: 0\r\n\r\n",
             b"GET /%ff%fe HTTP/1.1\r\n" + auth + b"\r\n",
             b"POST /square HTTP/1.1\r\n" + auth + b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n"]
    for raw in nasty:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(raw)
            answer = sock.recv(65536)
            assert answer.startswith(b"HTTP/1.1 4") or answer.startswith(b"HTTP/1.1 5"), (raw, answer)
    assert daemon.proc.poll() is None
    assert ask(tcp, "POST", "/square", {"n": 11})[::2] == (200, 121)


def _requests(daemon: Daemon, expert: str) -> float:
    return metrics_samples(daemon).get(f'expertd_requests_total{{expert="{expert}"}}', 0.0)


def test_a_lingering_worker_serves_firefly_calls_and_leaves_the_rest_to_the_master(make_daemon):
    port = free_port()
    daemon = make_daemon({"square": "fireflyexperts.square", "greet": "fireflyexperts.greet",
                          "pid": "testexperts:pid"},
                         workers=2, linger="5s", http_listen=f"127.0.0.1:{port}", token=TOKEN, firefly_routes="yes")
    assert wait_until(lambda: daemon.log.count("memory after warm-up") == 2)  # (settled: no more start-up work)
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:  # one connection: after the first call, its worker keeps it and takes what it may serve itself
        # The worker that served a call serves the next; handed back to the master after each, they go to
        # the two workers in turn (no call served by the worker before it: see test_linger.py's
        # test_linger_off).  Mostly, not always: lingering pauses a moment when the master sees a request
        # wait, and a busy machine can make it see one.
        pids = [ask(conn, "POST", "/pid", {})[2] for _ in range(31)]
        assert sum(pid == previous for previous, pid in itertools.pairwise(pids)) >= 15, pids
        for n in range(4):
            assert ask(conn, "POST", "/square", {"n": n})[::2] == (200, n * n)
            assert ask(conn, "POST", "/squ%61re", {"n": n})[::2] == (200, n * n)  # (decoded as the master does)
        assert ask(conn, "POST", "/greet", {"nom": "x"})[::2] == (422, {"error": "missing a required argument: "
                                                                                 "'name'"})
        assert ask(conn, "GET", "/")[0] == 200  # (the master's)
        assert ask(conn, "OPTIONS", "/square", token=None)[::2] == (200, b"")
        assert ask(conn, "POST", "/call/square", [3])[::2] == (200, 9)
        assert ask(conn, "POST", "/square", {"n": 5})[::2] == (200, 25)
        assert ask(conn, "POST", "/square", {"n": 5}, token="wrong-token-of-enough-length")[::2] == \
            (403, {"error": "Invalid auth token"})
    finally:
        conn.close()


def test_an_encoded_path_is_routed_decoded_by_the_master_and_the_worker_alike(served):
    port = served[1]
    for target, expected in (("/squ%61re", b"16"), ("/c%61ll/square", b"16"), ("/s%75m", b"4")):
        body = b'{"values": [4]}' if target == "/s%75m" else (b"[4]" if "call" in target else b'{"n": 4}')
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:  # (a new connection: the master)
            sock.sendall(f"POST {target} HTTP/1.1\r\nHost: localhost\r\nAuthorization: Token {TOKEN}\r\n"
                         f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
            answer = sock.recv(65536)
        assert answer.startswith(b"HTTP/1.1 200 ") and answer.endswith(b"\r\n\r\n" + expected + b"\n"), answer


def test_several_allowed_origins_each_get_their_own_cors_answer(make_daemon):
    port = free_port()
    make_daemon({"square": "fireflyexperts.square"}, workers=1, http_listen=f"127.0.0.1:{port}", token=TOKEN,
                firefly_routes="yes", allow_origins="https://a.example, https://b.example")
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)

    def cors(method: str, path: str, origin: str | None, token: str | None = TOKEN) -> tuple[int, str | None, str]:
        status, response, _ = ask(conn, method, path, {"n": 2} if method == "POST" else None, token=token,
                                  headers={} if origin is None else {"Origin": origin})
        return status, response.getheader("Access-Control-Allow-Origin"), response.getheader("Vary")

    try:
        assert cors("OPTIONS", "/square", "https://b.example", token=None) == (200, "https://b.example", "Origin")
        assert cors("POST", "/square", "https://a.example") == (200, "https://a.example", "Origin")  # (a worker's)
        assert cors("GET", "/", "https://b.example") == (200, "https://b.example", "Origin")  # (the master's)
        assert cors("POST", "/square", "https://c.example") == (200, None, "Origin")  # (served; the browser hides it)
        assert cors("POST", "/square", None) == (200, None, "Origin")
        assert cors("POST", "/nowhere", "https://a.example") == (404, "https://a.example", "Origin")
        conn.close()
        assert cors("POST", "/square", "https://b.example", token="wrong-token-of-enough-length") == \
            (403, "https://b.example", "Origin")  # (refused by the master, by the head alone)
    finally:
        conn.close()


def test_firefly_client_works_when_public_status_is_no(make_daemon):
    port = free_port()
    make_daemon({"square": "fireflyexperts.square"}, workers=1, http_listen=f"127.0.0.1:{port}", token=TOKEN,
                firefly_routes="yes", public_status="no")
    client = firefly.Client(f"http://127.0.0.1:{port}/", auth_token=TOKEN)  # (it reads GET / first)
    assert client.square(n=3) == 9
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        assert ask(conn, "GET", "/", token=None)[::2] == (403, {"error": "Invalid auth token"})
        conn.close()
        status, _, reply = ask(conn, "GET", "/experts")  # (expertd's own reads stay closed, as they were)
        assert status == 403 and "public_status = no" in reply["error"]["message"]
    finally:
        conn.close()


@needs_root
def test_with_public_status_no_get_root_on_the_socket_is_refused_in_firefly_shape(make_daemon, short_dir):
    os.chmod(short_dir, 0o755)
    daemon = make_daemon({"square": "fireflyexperts.square"}, workers=1, firefly_routes="yes",
                         public_status="no", socket_mode="0666")
    alice = local_user("xd-alice")

    def get_root() -> str:
        conn = UnixHTTPConnection(daemon.socket)
        conn.request("GET", "/")
        response = conn.getresponse()
        return f"{response.status} {response.read().decode()}"

    refused = as_user(*alice, get_root)
    assert refused == (f'403 {{"error":"uid {alice[0]} may not read GET / (public_status = no: only control_uids '
                       '/ control_gids, root and the daemon\'s user may)"}\n'), refused
    assert get_root().startswith('200 {"app":"firefly"')  # (root, the daemon's user, may)
    assert f"refused GET / from uid {alice[0]}" in daemon.log


def test_a_reload_serves_the_new_paths_and_get_root_lists_them(make_daemon):
    port = free_port()
    daemon = make_daemon({"square": "fireflyexperts.square"}, workers=1, http_listen=f"127.0.0.1:{port}",
                         token=TOKEN, firefly_routes="yes")
    daemon.config.write_text(daemon.config.read_text() + "[expert:total]\nfunction = fireflyexperts:total\n"
                             "path = /sum\n")
    daemon.send_signal(signal.SIGHUP)
    assert wait_until(lambda: "generation 2" in daemon.log and daemon.log.count(" ready in ") >= 2, timeout=30)
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        assert wait_until(lambda: ask(conn, "POST", "/sum", {"values": [2, 3]})[::2] == (200, 5), timeout=20)
        assert ask(conn, "GET", "/")[2]["functions"]["total"]["path"] == "/sum"
        # A reload to a config with a bad path is refused in one line; the daemon serves on.
        daemon.config.write_text(daemon.config.read_text().replace("path = /sum", "path = /square"))
        daemon.send_signal(signal.SIGHUP)
        assert wait_until(lambda: "[expert:total] path = /square: already the path of expert square" in daemon.log)
        assert ask(conn, "POST", "/sum", {"values": [1]})[::2] == (200, 1)
    finally:
        conn.close()


# ------------------------------------------------------------------------------ off, and bad configs
def test_without_firefly_routes_no_firefly_path_exists(make_daemon):
    port = free_port()
    make_daemon({"square": "fireflyexperts.square"}, http_listen=f"127.0.0.1:{port}", token=TOKEN)
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        status, _, reply = ask(conn, "POST", "/square", {"n": 2})
        assert status == 404 and reply["error"]["code"] == "not_found"  # expertd's own 404
        conn.close()
        assert ask(conn, "GET", "/")[0] == 404
        conn.close()
        assert ask(conn, "POST", "/call/square", [3])[::2] == (200, 9)  # (Token works on native routes anyway)
    finally:
        conn.close()


@pytest.mark.parametrize(("experts", "message"), [
    ({"a": "fireflyexperts:square", "b": {"function": "fireflyexperts:greet", "path": "/a"}},
     "[expert:b] path = /a: already the path of expert a; give each expert its own path"),
    ({"a": {"function": "fireflyexperts:square", "path": "/call/a"}},
     "[expert:a] path = /call/a: under /call/, one of expertd's own routes; choose another path"),
    ({"a": "fireflyexperts:square", "b": {"function": "fireflyexperts:greet", "path": "/c%61ll/a"}},
     "[expert:b] path = '/c%61ll/a': write the path decoded, without %-escapes (/café, not /caf%C3%A9)"),
])
def test_a_firefly_path_that_collides_is_refused_at_start_in_one_line(short_dir, experts, message):
    config = write_config(short_dir, experts, firefly_routes="yes")
    done = run_expertd("--config", str(config), "--check")
    assert done.returncode != 0
    assert f"{config}: {message}" in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr
