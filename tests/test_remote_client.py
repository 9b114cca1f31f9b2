"""Client("http://host:port", token=...): the same client API on a daemon's http_listen, on a real daemon over TCP."""

from __future__ import annotations

import os
import pickle
import socket
import ssl
import subprocess
import sys
import threading
import time

import psutil
import pytest
import trustme

from expertd import errors
from expertd.client import Client

from conftest import BIN, DEFAULT_EXPERTS, free_port, metrics_samples, wait_until

TOKEN = "remote-token-for-the-tests-0123456789"
EXPERTS = {
    **DEFAULT_EXPERTS,
    "textstats": "textstats:opinion",
    "document_length": "testexperts:document_length",
    "rows_doubled": "testexperts:rows_doubled",
    "sleepy": {"function": "testexperts:slow", "timeout": "1s"},
    "pipeline:moderation": {"stages": "keywords, textstats"},
    "pipeline:strict": {"stages": "boom, textstats", "on_error": "stop"},
}


@pytest.fixture
def remote(make_daemon):
    """A daemon with a token on a TCP address; .url is its http_listen as a URL."""
    port = free_port()
    daemon = make_daemon(EXPERTS, http_listen=f"127.0.0.1:{port}", token=TOKEN)
    daemon.port = port
    daemon.url = f"http://127.0.0.1:{port}"
    return daemon


@pytest.fixture
def client(remote):
    with Client(remote.url, token=TOKEN) as client:
        yield client


def server_side_peers(daemon) -> set[int]:
    """The client ports of the established TCP connections the daemon's processes hold on its http_listen."""
    processes = [psutil.Process(daemon.proc.pid), *psutil.Process(daemon.proc.pid).children(recursive=True)]
    peers = set()
    for process in processes:
        try:
            connections = process.net_connections(kind="tcp")
        except psutil.Error:
            continue
        peers.update(conn.raddr.port for conn in connections
                     if conn.status == psutil.CONN_ESTABLISHED and conn.laddr.port == daemon.port and conn.raddr)
    return peers


# ------------------------------------------------------------------ the calls

def test_remote_client_answers_every_call_form_with_the_values_of_the_socket_client(remote, client):
    local = remote.client()
    assert type(client).__name__ == "HttpClient" and isinstance(client, Client)
    assert client.call("fib", 10) == 89
    assert client.call("fib", n=10) == 89
    assert client.fib(11) == 144 and client.fib(n=12) == 233
    assert client.add(2, 3) == 5 and client.add(a=2, b=40) == 42
    assert client.call("echo") == {"args": [], "kwargs": {}}
    assert client.echo("é", [1, {"x": None}]) == local.echo("é", [1, {"x": None}])
    doc = {"text": "you idiot", "opinions": {"earlier": 1}}
    assert client.opinion("keywords", doc) == local.opinion("keywords", doc)
    assert client.opinion("document_length", {"text": "abc"}) == {"chars": 3, "seen_opinions": []}
    assert client.map("fib", [5, 6, 7]) == [8, 13, 21]
    assert client.map("add", []) == []
    assert client.experts() == local.experts()
    assert {"fib", "moderation"} <= {entry["name"] for entry in client.experts()}


def test_remote_pipelines_and_opinions_return_the_document_as_on_the_socket(remote, client):
    local = remote.client()
    doc = {"text": "you IDIOT, go away"}
    piped = client.pipeline("moderation", doc)
    assert piped == local.pipeline("moderation", doc)
    assert piped["opinions"]["keywords"]["flagged"] == ["idiot"] and piped["opinions"]["textstats"]["words"] == 4
    assert client.opinions(doc, ["keywords", ("textstats", "document_length")]) == \
        local.opinions(doc, ["keywords", ("textstats", "document_length")])
    # A failing stage: on_error from the pipeline, overridden per request by X-Expertd-On-Error.
    stopped = client.pipeline("strict", doc)
    assert stopped["errors"]["boom"]["code"] == "expert_failed" and stopped["errors"]["textstats"]["code"] == "skipped"
    went_on = client.pipeline("strict", doc, on_error="continue")
    assert went_on["errors"]["boom"]["code"] == "expert_failed" and went_on["opinions"]["textstats"]["words"] == 4
    with pytest.raises(errors.BadRequest, match="stop or continue"):
        client.pipeline("strict", doc, on_error="sometimes")


def test_remote_predict_sends_rows_as_json_and_returns_arrays_for_array_inputs(client):
    np = pytest.importorskip("numpy")
    assert client.predict("rows_doubled", [[1, 2], [3, 4]]) == [[2, 4], [6, 8]]
    outputs = client.predict("rows_doubled", np.array([[0.5, 1.5]], dtype=np.float32))
    assert isinstance(outputs, np.ndarray) and outputs.tolist() == [[1.0, 3.0]]
    assert client.predict("rows_doubled", np.array([[1, 2]]), arrays=False) == [[2, 4]]


def test_remote_ping_is_the_daemons_health(client):
    health = client.ping()
    assert health["status"] == "ok" and health["workers_ready"] >= 1 and health["stopping"] is False


def test_control_verbs_are_refused_locally_with_a_named_error(client):
    for verb, args in (("status", ()), ("reload", ()), ("stop", ()), ("set_workers", (3,))):
        with pytest.raises(errors.LocalOnly, match=f"{verb} is not served over HTTP.*Unix socket"):
            getattr(client, verb)(*args)
    assert client.fib(5) == 8  # (and the daemon is still there: nothing was sent)


def test_positional_and_named_arguments_at_once_are_a_clear_error(client):
    with pytest.raises(errors.BadRequest, match="positional or keyword arguments, not both") as both:
        client.add(1, b=2)
    assert both.value.expert == "add"
    with pytest.raises(TypeError, match="bytes cannot be sent as JSON"):
        client.echo(b"raw")


def test_the_remote_client_works_the_same_on_a_daemon_serving_fireflys_routes_too(make_daemon):
    port = free_port()
    make_daemon({"fib": "fibs:fib", "boom": "testexperts:boom", "keywords": "keywords:opinion",
                 "textstats": "textstats:opinion", "pipeline:moderation": {"stages": "keywords, textstats"}},
                http_listen=f"127.0.0.1:{port}", token=TOKEN, firefly_routes="yes")
    client = Client(f"http://127.0.0.1:{port}", token=TOKEN)
    assert client.fib(10) == client.fib(n=10) == 89 and client.map("fib", [5, "x"])[0] == 8
    assert client.pipeline("moderation", {"text": "idiot"})["opinions"]["keywords"]["flagged"] == ["idiot"]
    with pytest.raises(errors.ExpertFailed):
        client.boom()
    with pytest.raises(errors.UnknownExpert):
        client.nope()
    with pytest.raises(errors.Unauthorized):
        Client(f"http://127.0.0.1:{port}", token="not-the-token-0123456789").fib(5)


# ------------------------------------------------------------------ errors

@pytest.mark.parametrize("expert, args, kwargs, cls, remote_type", [
    ("nope", (1,), {}, errors.UnknownExpert, "UnknownExpert"),
    ("boom", ("bad day",), {}, errors.ExpertFailed, "builtins.ValueError"),
    ("type_error", ("x",), {}, errors.ExpertFailed, "builtins.TypeError"),
    ("add", (1, 2, 3), {}, errors.BadRequest, "BadRequest"),
    ("add", (), {"c": 1}, errors.BadRequest, "BadRequest"),
])
def test_remote_errors_are_the_classes_the_socket_client_raises(remote, client, expert, args, kwargs, cls,
                                                                remote_type):
    with pytest.raises(cls) as over_http:
        client.call(expert, *args, **kwargs)
    with pytest.raises(cls) as over_socket:
        remote.client().call(expert, *args, **kwargs)
    assert type(over_http.value) is type(over_socket.value)
    assert over_http.value.remote_type == over_socket.value.remote_type == remote_type
    assert over_http.value.message == over_socket.value.message
    assert over_http.value.request_id  # the daemon's X-Request-Id, as in its logs
    assert over_http.value.remote_traceback is None  # (HTTP errors carry none: see docs/client.md)


def test_remote_map_puts_each_failed_items_error_in_its_place(client):
    outcomes = client.map("boom", ["one", "two"])
    assert [type(outcome) for outcome in outcomes] == [errors.ExpertFailed, errors.ExpertFailed]
    assert outcomes[1].remote_type == "builtins.ValueError" and "two" in outcomes[1].message
    mixed = client.map("fib", [5, "x", 7])
    assert mixed[0] == 8 and mixed[2] == 21 and isinstance(mixed[1], errors.ExpertFailed)
    with pytest.raises(errors.ExpertFailed, match="TypeError"):
        client.map("fib", [5, "x"], raise_first=True)
    with pytest.raises(errors.UnknownExpert):
        client.map("nope", [1])


def test_an_expert_past_its_timeout_and_a_client_timeout_raise_request_timeout(remote, client):
    with pytest.raises(errors.RequestTimeout) as daemon_side:
        client.sleepy(5)  # the expert's timeout is 1s: the daemon answers 504
    assert daemon_side.value.code == "timeout"
    impatient = Client(remote.url, token=TOKEN, timeout=0.3)
    started = time.monotonic()
    with pytest.raises(errors.RequestTimeout, match=r"no reply .* within 0\.3s"):
        impatient.slow(30)  # (far longer than the bound below, which leaves room for a loaded machine)
    assert time.monotonic() - started < 10
    assert client.fib(6) == 13


def test_a_missing_or_wrong_token_raises_unauthorized_saying_to_pass_token(remote, monkeypatch):
    monkeypatch.delenv("EXPERTD_TOKEN", raising=False)
    with pytest.raises(errors.Unauthorized, match=r"no token was sent; pass Client\(url, token=\.\.\.\)"):
        Client(remote.url).fib(5)
    wrong = Client(remote.url, token="not-the-token-0123456789")
    with pytest.raises(errors.Unauthorized, match="the token was not accepted") as refused:
        wrong.fib(5)
    assert refused.value.code == "unauthorized" and isinstance(refused.value, errors.RemoteError)
    assert "not-the-token" not in str(refused.value) and "not-the-token" not in repr(wrong)
    assert TOKEN not in repr(Client(remote.url, token=TOKEN))
    with pytest.raises(ValueError, match="printable ASCII") as unsendable:
        Client(remote.url, token="line\nbreak-token")
    assert "break-token" not in str(unsendable.value)
    # The environment's token, as the daemon reads it, when none is passed:
    monkeypatch.setenv("EXPERTD_TOKEN", TOKEN)
    assert Client(remote.url).fib(7) == 21
    monkeypatch.setenv("EXPERTD_SOCKET", remote.url)  # (where Client() and expertctl look when given nothing)
    assert Client().fib(8) == 34


def test_no_daemon_at_the_address_raises_connect_error(monkeypatch):
    port = free_port()
    with pytest.raises(errors.ConnectError, match=f"nothing is listening on 127.0.0.1:{port}"):
        Client(f"http://127.0.0.1:{port}", token=TOKEN).fib(5)
    with pytest.raises(ValueError, match="token="):
        Client(f"http://user:{TOKEN}@127.0.0.1:{port}")


def test_a_body_over_max_frame_raises_frame_too_large_and_the_client_goes_on(make_daemon):
    port = free_port()
    make_daemon(EXPERTS, http_listen=f"127.0.0.1:{port}", token=TOKEN, max_frame="64K")
    client = Client(f"http://127.0.0.1:{port}", token=TOKEN)
    assert client.fib(3) == 3
    for size in (100_000, 8_000_000):  # (the larger one is refused while it is still being sent)
        with pytest.raises(errors.FrameTooLarge, match="exceeds max_frame"):
            client.echo("x" * size)
    assert client.fib(4) == 5


def test_a_url_with_a_path_prefix_sends_it_before_each_route(remote):
    # (behind a proxy that serves the daemon under /expertd; here nothing strips it, so the daemon says no such path)
    with pytest.raises(errors.RemoteError, match="no such path") as wrong:
        Client(remote.url + "/expertd", token=TOKEN).fib(5)
    assert wrong.value.code == "not_found" and type(wrong.value) is errors.RemoteError
    assert Client(remote.url + "/", token=TOKEN).fib(5) == 8


def test_a_lost_worker_is_retried_as_on_the_socket(remote, client):
    with pytest.raises(errors.WorkerLost):
        client.kill_worker()
    assert wait_until(lambda: metrics_samples(remote).get('expertd_requests_total{expert="kill_worker"}') == 2)
    remote.wait_workers(2, timeout=30)
    with pytest.raises(errors.WorkerLost):
        Client(remote.url, token=TOKEN, retries=0).kill_worker()
    assert wait_until(lambda: metrics_samples(remote).get('expertd_requests_total{expert="kill_worker"}') == 3)


# ------------------------------------------------------------------ connections

def test_many_calls_reuse_one_kept_alive_connection(remote, client):
    for n in range(30):
        assert client.add(n, 1) == n + 1
    (conn,) = client._pool
    mine = conn.getsockname()[1]
    assert server_side_peers(remote) == {mine}


def test_a_connection_the_daemon_closed_while_idle_is_replaced_transparently(make_daemon):
    port = free_port()
    daemon = make_daemon(EXPERTS, http_listen=f"127.0.0.1:{port}", token=TOKEN, idle_timeout="1s")
    daemon.port = port
    client = Client(f"http://127.0.0.1:{port}", token=TOKEN)
    assert client.fib(5) == 8
    first = client._pool[0].getsockname()[1]
    assert wait_until(lambda: first not in server_side_peers(daemon), timeout=10)
    assert client.fib(8) == 34  # on a fresh connection, with no error
    assert client._pool[0].getsockname()[1] != first


def test_concurrent_calls_from_threads_each_get_their_own_answer(client):
    failures: list[object] = []

    def work(thread: int) -> None:
        for n in range(25):
            try:
                got = client.add(thread * 1000, n)
                if got != thread * 1000 + n:
                    failures.append((thread, n, got))
            except Exception as exc:  # (reported below, by value)
                failures.append(exc)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert failures == []
    assert 1 <= len(client._pool) <= client.pool_size


def test_a_forked_child_calls_on_its_own_connection(remote, client):
    assert client.fib(5) == 8
    parents = client._pool[0].getsockname()[1]
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report its answer and its connection's port, and leave without cleanup
        try:
            answer = (client.fib(10), client._pool[0].getsockname()[1])
        except BaseException as exc:  # (reported to the parent)
            answer = (repr(exc), None)
        os.write(write_end, pickle.dumps(answer))
        os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        result, childs = pickle.loads(pipe.read())
    os.waitpid(pid, 0)
    assert result == 89 and childs not in (None, parents)
    assert client.fib(6) == 13 and client._pool[0].getsockname()[1] == parents  # the parent's is untouched


# ------------------------------------------------------------------ replies as proxies send them

@pytest.mark.parametrize("wire, status, body, will_close", [
    (b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\n[1]", 200, b"[1]", False),
    (b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}", 200, b"{}", False),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n[1\r\n3;x=y\r\n,2]\r\n0\r\nT: 1\r\n\r\n",
     200, b"[1,2]", False),
    (b"HTTP/1.0 200 OK\r\n\r\n[1, 2, 3]", 200, b"[1, 2, 3]", True),  # (ends when the connection does)
    (b"HTTP/1.0 502 Bad Gateway\r\nContent-Length: 0\r\nConnection: keep-alive\r\n\r\n", 502, b"", False),
    (b"HTTP/1.1 401 Unauthorized\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}", 401, b"{}", True),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n[]extra", 200, b"[]", True),  # (bytes after it: not reused)
    # Repeated with one value (RFC 9110 8.6), upper-case hex, extensions after spaces, a chunk split across reads:
    (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 2\r\n\r\n[]", 200, b"[]", False),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 2, 2\r\n\r\n[]", 200, b"[]", False),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: Chunked\r\n\r\nA ; ext\r\n[" + b"1" * 8 + b"]\r\n0\r\n\r\n",
     200, b"[11111111]", False),
])
def test_replies_in_every_framing_a_proxy_may_use_are_read_whole(wire, status, body, will_close):
    from expertd.client_http_reader import read_reply

    ours, theirs = socket.socketpair()
    with ours, theirs:
        theirs.sendall(wire)
        theirs.shutdown(socket.SHUT_WR)
        ours.settimeout(5)
        reply = read_reply(ours, False)
    assert (reply.status, reply.body, reply.will_close) == (status, body, will_close)


@pytest.mark.parametrize("wire, error", [
    (b"", "Stale"),  # nothing at all: the request was never served (retried on a fresh connection)
    (b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n[1", "ConnectionLost"),
    (b"SSH-2.0-OpenSSH\r\n\r\n", "ProtocolError"),
])
def test_a_reply_cut_short_or_not_http_is_told_apart(wire, error):
    from expertd.client_http_reader import read_reply

    ours, theirs = socket.socketpair()
    with ours, theirs:
        theirs.sendall(wire)
        theirs.shutdown(socket.SHUT_WR)
        ours.settimeout(5)
        with pytest.raises(Exception) as raised:
            read_reply(ours, False)
    assert type(raised.value).__name__ == error


CHUNKED = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"


@pytest.mark.parametrize("wire, says", [
    (b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n[1]]", "not one decimal number"),  # (was: [1], a success)
    (b"HTTP/1.1 200 OK\r\nContent-Length: 0_3\r\n\r\n[1]", "not one decimal number"),  # (was: int("0_3") == 3)
    (b"HTTP/1.1 200 OK\r\nContent-Length: +3\r\n\r\n[1]", "not one decimal number"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: \xb3\r\n\r\n[1]", "not one decimal number"),  # ("3" superscript)
    (b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\n[1]]", "not one decimal number"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 3, 4\r\n\r\n[1]]", "not one decimal number"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: " + b"9" * 5000 + b"\r\n\r\n[1]", "larger than the client accepts"),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n3\r\n[1]\r\n0\r\n\r\n",
     "both Transfer-Encoding and Content-Length"),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n3\r\n[1]\r\n0\r\n\r\n", "other than chunked"),
    (CHUNKED + b"0x3\r\n[1]\r\n0\r\n\r\n", "not hexadecimal digits"),  # (int(x, 16) takes "0x3")
    (CHUNKED + b"-1\r\n[1]\r\n0\r\n\r\n", "not hexadecimal digits"),  # (was: a hang until the timeout)
    (CHUNKED + b"_\r\n[1]\r\n0\r\n\r\n", "not hexadecimal digits"),  # (was: read as no more chunks)
    (CHUNKED + b"1_0\r\n[1]\r\n0\r\n\r\n", "not hexadecimal digits"),
    (CHUNKED + b"\r\n[1]\r\n0\r\n\r\n", "not hexadecimal digits"),
    (CHUNKED + b"3\r\n[1]XY0\r\n\r\n", "not followed by CRLF"),
    (CHUNKED + b"40000001\r\n[1]", "larger than"),  # (refused before reading a byte of it, not after)
])
def test_a_reply_with_malformed_framing_is_a_protocol_error(wire, says):
    from expertd.client_http_reader import read_reply

    ours, theirs = socket.socketpair()
    with ours, theirs:
        theirs.sendall(wire)  # (the connection stays open: a reader that waited for more would time out)
        ours.settimeout(2)
        with pytest.raises(errors.ProtocolError, match=says):
            read_reply(ours, False)


class FakeServer:
    """A TCP server answering each request with the next of ``replies`` (bytes), for replies no daemon sends.

    A reply that is a callable is called with the connection and the request's head instead (it may close it).
    Each connection is served until the client closes it; ``connections`` counts them.
    """

    def __init__(self, replies: list) -> None:
        self.replies = list(replies)
        self.connections = 0
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return  # closed
            self.connections += 1
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        data = b""
        with conn:
            while self.replies:
                while b"\r\n\r\n" not in data:
                    received = conn.recv(65536)
                    if not received:
                        return
                    data += received
                head, _, data = data.partition(b"\r\n\r\n")
                reply = self.replies.pop(0)
                if callable(reply):
                    reply(conn, head)
                    return
                length = int(dict(line.split(": ", 1) for line in head.decode().split("\r\n")[1:]
                                  ).get("Content-Length", 0))
                while len(data) < length:
                    data += conn.recv(65536)
                data = data[length:]
                conn.sendall(reply)

    def close(self) -> None:
        self.listener.close()


OK_REPLY = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n13"


@pytest.mark.parametrize("malformed", [
    b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n[1]]",
    b"HTTP/1.1 200 OK\r\nContent-Length: 0_3\r\n\r\n[1]",
    b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nContent-Length: 2\r\n\r\n[1]",
    CHUNKED + b"-1\r\n[1]\r\n0\r\n\r\n",
])
def test_a_malformed_reply_raises_protocol_error_and_its_connection_is_never_reused(malformed):
    server = FakeServer([malformed, OK_REPLY, OK_REPLY])
    try:
        client = Client(server.url, timeout=5)
        started = time.monotonic()
        with pytest.raises(errors.ProtocolError, match=f"{server.url} did not answer in HTTP/1.1"):
            client.fib(7)
        assert time.monotonic() - started < 4  # (at once, not at the timeout)
        assert client._pool == []
        assert client.fib(7) == 13 and server.connections == 2  # on a fresh connection
    finally:
        server.close()


def test_a_connection_whose_request_could_not_all_be_sent_is_not_pooled():
    # The server answers after the request's head, without Connection: close, and closes with the body unread:
    # the client reads the early reply (0.5 s), and must not pool the connection (nor keep it at 0.5 s).
    refusal = b'{"error": {"code": "frame_too_large", "message": "the request exceeds max_frame"}}'

    def refuse_early(conn: socket.socket, head: bytes) -> None:
        conn.sendall(b"HTTP/1.1 413 Content Too Large\r\nContent-Length: %d\r\n\r\n%s" % (len(refusal), refusal))
        time.sleep(0.2)  # (the reply is on its way before the reset that closing with unread bytes sends)

    server = FakeServer([refuse_early, OK_REPLY])
    try:
        client = Client(server.url, timeout=5)
        with pytest.raises(errors.FrameTooLarge, match="exceeds max_frame"):
            client.echo("x" * 16_000_000)
        assert client._pool == []
        assert client.fib(7) == 13 and server.connections == 2
        (conn,) = client._pool
        assert conn.gettimeout() == 5
    finally:
        server.close()


# ------------------------------------------------------------------ tokens in cleartext

@pytest.mark.parametrize("host, loopback", [
    ("localhost", True), ("127.0.0.1", True), ("127.3.2.1", True), ("::1", True), ("0:0:0:0:0:0:0:1", True),
    ("10.0.0.7", False), ("192.0.2.1", False), ("::2", False), ("experts.internal", False),
    ("localhost.example.com", False), ("128.0.0.1", False),
])
def test_which_hosts_are_this_machine_for_the_cleartext_token_warning(host, loopback):
    from expertd.client_http import _is_loopback

    assert _is_loopback(host) is loopback


def test_a_token_sent_over_plain_http_to_another_machine_warns_once(monkeypatch):
    import warnings

    monkeypatch.delenv("EXPERTD_TOKEN", raising=False)
    with pytest.warns(UserWarning, match=r"token for http://192\.0\.2\.77:8000 crosses the network in cleartext.*"
                                         r"https://") as warned:
        Client("http://192.0.2.77:8000", token=TOKEN)  # (no connection is made until a call)
    assert len(warned) == 1 and TOKEN not in str(warned[0].message)
    assert warned[0].filename == __file__  # (it points at the caller's line)
    with warnings.catch_warnings(record=True) as quiet:
        warnings.simplefilter("always")
        Client("http://192.0.2.77:8000", token=TOKEN)  # once per host
        Client("https://192.0.2.78:8443", token=TOKEN)  # TLS
        Client("http://127.0.0.1:8000", token=TOKEN)  # this machine
        Client("http://[::1]:8000", token=TOKEN)
        Client("http://localhost:8000", token=TOKEN)
        Client("http://192.0.2.79:8000")  # no token
    assert [str(warning.message) for warning in quiet] == []
    monkeypatch.setenv("EXPERTD_TOKEN", TOKEN)  # the environment's token travels the same way
    with pytest.warns(UserWarning, match="cleartext"):
        Client("http://192.0.2.80:8000")


# ------------------------------------------------------------------ TLS

class TlsProxy:
    """A TLS-terminating proxy: TLS on its own port, the bytes forwarded in plain to the daemon's address."""

    def __init__(self, context: ssl.SSLContext, target: tuple[str, int]) -> None:
        self.context = context
        self.target = target
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                raw, _ = self.listener.accept()
            except OSError:
                return  # closed
            threading.Thread(target=self._serve, args=(raw,), daemon=True).start()

    def _serve(self, raw: socket.socket) -> None:
        try:
            tls = self.context.wrap_socket(raw, server_side=True)
        except (ssl.SSLError, OSError):
            raw.close()  # a client that did not trust us
            return
        upstream = socket.create_connection(self.target)
        threading.Thread(target=self._pump, args=(upstream, tls), daemon=True).start()
        self._pump(tls, upstream)

    @staticmethod
    def _pump(source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        for sock in (source, sink):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def close(self) -> None:
        self.listener.close()


def test_https_through_a_tls_terminating_proxy_with_a_private_ca(remote, tmp_path):
    ca = trustme.CA()
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("localhost").configure_cert(server_context)
    proxy = TlsProxy(server_context, ("127.0.0.1", remote.port))
    try:
        url = f"https://localhost:{proxy.port}"
        client_context = ssl.create_default_context()
        ca.configure_trust(client_context)
        secure = Client(url, token=TOKEN, ssl_context=client_context)
        assert [secure.fib(n) for n in range(5, 10)] == [8, 13, 21, 34, 55]
        assert secure.map("fib", [10]) == [89]
        with pytest.raises(errors.ExpertFailed):
            secure.boom()
        assert len(secure._pool) == 1  # kept alive through the proxy
        # The system's CAs (the default) do not know the test's CA: a clear error, naming the way out.
        with pytest.raises(errors.ConnectError, match=r"not trusted.*ssl_context="):
            Client(url, token=TOKEN).fib(5)
        ca_file = tmp_path / "ca.pem"
        ca.cert_pem.write_to_path(str(ca_file))
        assert Client(url, token=TOKEN, ssl_context=ssl.create_default_context(cafile=str(ca_file))).fib(4) == 5
    finally:
        proxy.close()


# ------------------------------------------------------------------ import cost, expertctl

def test_importing_the_client_loads_no_http_machinery_until_a_url_is_given(remote):
    probe = ("import sys; from expertd.client import Client; c = Client({where!r}{token}); {use}"
             "print(sorted(m for m in ('http.client', 'ssl', 'json', 'urllib.request') if m in sys.modules))")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    local = subprocess.run([sys.executable, "-c", probe.format(where="/nonexistent.sock", token="", use="")],
                           capture_output=True, text=True, env=env, timeout=60)
    assert local.stdout.strip() == "[]", local.stderr
    far = subprocess.run([sys.executable, "-c", probe.format(where=remote.url, token=f", token={TOKEN!r}",
                                                             use="print(c.fib(9)); ")],
                         capture_output=True, text=True, env=env, timeout=60)
    assert far.stdout.split("\n")[:2] == ["55", "['json']"], far.stderr  # (ssl too for https://)


def test_expertctl_calls_a_remote_daemon_given_its_url(remote):
    env = {**os.environ, "EXPERTD_TOKEN": TOKEN}
    done = subprocess.run([str(BIN / "expertctl"), "--socket", remote.url, "call", "fib", "10"],
                          capture_output=True, text=True, env=env, timeout=60)
    assert (done.returncode, done.stdout.strip()) == (0, "89"), done.stderr
    pong = subprocess.run([str(BIN / "expertctl"), "--socket", remote.url, "ping"],
                          capture_output=True, text=True, env=env, timeout=60)
    assert pong.returncode == 0 and pong.stdout.startswith(f"pong from {remote.url}: 2 of 2 workers ready"), pong
    listed = subprocess.run([str(BIN / "expertctl"), "--socket", remote.url, "list"],
                            capture_output=True, text=True, env=env, timeout=60)
    assert listed.returncode == 0 and "rows_doubled" in listed.stdout, listed
    refused = subprocess.run([str(BIN / "expertctl"), "--socket", remote.url, "status"],
                             capture_output=True, text=True, env=env, timeout=60)
    assert refused.returncode != 0 and "status is not served over HTTP" in refused.stderr
    streamed = subprocess.run([str(BIN / "expertctl"), "--socket", remote.url, "opinion", "--lines", "keywords"],
                              input='{"text": "idiot"}\n', capture_output=True, text=True, env=env, timeout=60)
    assert streamed.returncode != 0 and streamed.stderr.count("\n") == 1
    assert "--lines streams over the daemon's Unix socket, not over HTTP" in streamed.stderr
    assert TOKEN not in refused.stderr
