"""A hostile local user: connection hoarding, log flooding, control requests (issue #13, items 3, 4, 12).

The daemon runs as root; alice and bob are other local users (tests/users.py)
on a socket made reachable to them (socket_mode 0666, directory 0755).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import resource
import signal
import socket
import time
from pathlib import Path

import pytest

from expertd import cli, protocol
from expertd.client import Client
from expertd.errors import AccessDenied, Overloaded

from conftest import raw_connection, wait_until
from users import as_user, in_child, local_user, needs_root

pytestmark = needs_root

ADD = {"add": "testexperts:add", "pid": "testexperts:pid"}


@pytest.fixture
def alice():
    return local_user("xd-alice")


@pytest.fixture
def bob():
    return local_user("xd-bob")


@pytest.fixture
def open_daemon(make_daemon, short_dir):
    """A daemon whose socket every local user can reach."""
    os.chmod(short_dir, 0o755)

    def factory(experts: dict | None = None, **settings: object):
        settings.setdefault("socket_mode", "0666")
        return make_daemon(experts or ADD, **settings)

    return factory


def _state(sock: socket.socket) -> str:
    """What became of a connection: "open", "closed", or the code of the error frame it was answered with."""
    sock.setblocking(False)
    try:
        data = sock.recv(65536)
    except BlockingIOError:
        return "open"
    except OSError:
        return "closed"
    if not data:
        return "closed"
    try:
        return protocol.unpack(data[protocol.HEADER_SIZE:])["code"]
    except Exception:
        return f"data {data[:20]!r}"


# A connection that has not sent anything is spared for a second after accept (its client is about to
# send its first request); "idle" connections in these tests have been open longer than that.
GRACE = 1.1


@contextlib.contextmanager
def held_by(user: tuple[int, int], socket_path: Path, count: int, first_bytes: bytes = b"",
            pause_after: int | None = None):
    """``count`` connections opened by ``user`` (each sending ``first_bytes``; a pause of GRACE after the
    first ``pause_after``), held open in a child until the block ends; then ``outcome`` maps what became
    of them (see _state) to how many."""
    ready_r, ready_w = os.pipe()
    go_r, go_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        outcome: object
        try:
            os.close(ready_r)
            os.close(go_w)
            os.setgroups([])
            os.setgid(user[1])
            os.setuid(user[0])
            socks = []
            for number in range(count):
                if number == pause_after:
                    time.sleep(GRACE)
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                sock.settimeout(10)
                sock.connect(str(socket_path))
                if first_bytes:
                    sock.sendall(first_bytes)
                socks.append(sock)
            os.write(ready_w, b"ok\n")
            os.read(go_r, 1)  # until the parent closes its end
            states: dict[str, int] = {}
            for sock in socks:
                state = _state(sock)
                states[state] = states.get(state, 0) + 1
            outcome = states
        except BaseException as exc:
            outcome = {"error": repr(exc)}
        try:
            os.write(ready_w, json.dumps(outcome).encode() + b"\n")
        finally:
            os._exit(0)
    os.close(ready_w)
    os.close(go_r)
    result: dict = {}
    with os.fdopen(ready_r, "rb") as reader:
        first = reader.readline()
        try:
            assert first == b"ok\n", first + reader.read()
            yield result
        finally:
            os.close(go_w)
            result["outcome"] = json.loads(reader.readline() or b"{}")
            os.waitpid(pid, 0)


def _calls(socket_path: Path, count: int = 20) -> str:
    """Calls on fresh clients (a new connection each, all held until the last call); their results, as text."""
    clients = [Client(str(socket_path), retries=0) for _ in range(count)]
    return str([client.call("add", i, 1) for i, client in enumerate(clients)])


def _hung_up(sock: socket.socket) -> bool:
    """Whether the daemon closed this connection (looked at without changing the socket)."""
    try:
        return sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True


def _ctl(socket_path: Path, *args: str) -> tuple[int, str]:
    """expertctl, run in this process (another user cannot run the interpreter under /root)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = cli.main(["--socket", str(socket_path), *args])
    return status, out.getvalue() + err.getvalue()


# ------------------------------------------------------------------ item 3: connections
def test_a_thousand_idle_connections_of_one_user_do_not_stop_another_users_calls(open_daemon, alice, bob):
    daemon = open_daemon(workers=1)  # max_connections 1000: 500 per uid
    with held_by(alice, daemon.socket, 1000, pause_after=500) as held:
        assert as_user(*bob, lambda: _calls(daemon.socket)) == str([i + 1 for i in range(20)])
        assert daemon.client().call("add", 1, 1) == 2
        status = daemon.client().status()
        assert status["max_connections_per_uid"] == 500
        assert status["connections"] <= 500 + 3
    # alice's newest 500 are held, her 500 oldest were closed to admit them
    assert held["outcome"] == {"open": 500, "closed": 500}
    assert wait_until(lambda: "holds max_connections_per_uid (500) connections" in daemon.log)
    assert daemon.log.count("holds max_connections_per_uid") <= 2  # rate-limited


def test_at_the_global_limit_the_biggest_holder_makes_room(open_daemon, alice, bob):
    daemon = open_daemon(workers=1, max_connections=20, max_connections_per_uid=15)
    with held_by(alice, daemon.socket, 15) as held_alice:
        time.sleep(GRACE)
        mine = [raw_connection(daemon) for _ in range(4)]  # root: 4, alice 15, 19 in all
        # bob's first connection takes the 20th place; each of his next four closes one of alice's
        # (she holds the most), longest idle first: root's are left alone
        assert as_user(*bob, lambda: _calls(daemon.socket, 5)) == str([i + 1 for i in range(5)])
        assert [_state(sock) for sock in mine] == ["open"] * 4
    assert held_alice["outcome"] == {"open": 11, "closed": 4}


def test_a_pooled_connection_closed_to_make_room_is_retried_transparently(open_daemon):
    daemon = open_daemon(workers=1, max_connections=10)  # 5 per uid
    client = daemon.client(retries=0)
    assert client.call("add", 1, 1) == 2
    pooled = client._pool[0]
    time.sleep(0.2)  # (the worker hands the connection back to the master just after the reply)
    others = [raw_connection(daemon) for _ in range(5)]  # the 5th closes the longest-idle: the pooled one
    assert wait_until(lambda: _hung_up(pooled))
    assert client.call("add", 2, 2) == 4  # sent again on a new connection, no error
    assert client._pool[0] is not pooled
    del others


def test_when_no_connection_is_idle_a_newcomer_gets_overloaded_not_a_hang(open_daemon, alice):
    daemon = open_daemon(workers=1, max_connections=10)  # 5 per uid
    # Five connections with a request begun and never finished: none of them is idle.
    with held_by(alice, daemon.socket, 5, first_bytes=b"XD") as held:
        def newcomer() -> str:
            started = time.monotonic()
            try:
                Client(str(daemon.socket), retries=0).call("add", 1, 1)
            except Overloaded as exc:
                return f"overloaded after {time.monotonic() - started:.1f}s: {exc}"
            return "admitted"

        outcome = as_user(*alice, newcomer)
        assert outcome.startswith("overloaded after 0.") and "retry shortly" in outcome
        assert daemon.client().call("add", 1, 1) == 2  # others are not affected
    assert held["outcome"] == {"open": 5}
    assert "none of them idle: refusing its new ones (overloaded)" in daemon.log


def test_a_client_that_ends_its_input_mid_request_is_closed_at_once(open_daemon):
    daemon = open_daemon(workers=1)  # read_timeout 10s
    sock = raw_connection(daemon)
    sock.sendall(protocol.encode_frame(protocol.CALL, 1, protocol.pack(["add", [1, 2], {}]))[:7])
    sock.shutdown(socket.SHUT_WR)  # the rest will never come
    started = time.monotonic()
    with contextlib.suppress(ConnectionResetError):  # (closed with its bytes unread: a reset)
        assert sock.recv(100) == b""
    assert time.monotonic() - started < 1.0
    # ending its input after a whole request still gets the answer
    sock = raw_connection(daemon)
    sock.sendall(protocol.encode_frame(protocol.CALL, 2, protocol.pack(["add", [1, 2], {}])))
    sock.shutdown(socket.SHUT_WR)
    kind, request_id, body = protocol.read_frame(sock, 1 << 20, time.monotonic() + 5)
    assert (kind, request_id, protocol.unpack(body)) == (protocol.RESULT, 2, 3)


def test_root_and_the_daemons_user_get_in_past_the_limit_when_nothing_is_idle(open_daemon, alice):
    daemon = open_daemon(workers=1, max_connections=6, max_connections_per_uid=6)
    with held_by(alice, daemon.socket, 6, first_bytes=b"XD"):
        # expertctl still works for root, in the reserve kept past the limit
        status, out = _ctl(daemon.socket, "status")
        assert status == 0 and "connections open" in out


def test_a_refused_peer_is_answered_and_closed_without_sending_anything(open_daemon, alice, bob):
    daemon = open_daemon(workers=1, allow_uids="xd-alice", max_connections=4)

    def connect_and_wait() -> str:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(5)
        sock.connect(str(daemon.socket))
        started = time.monotonic()
        kind, request_id, body = protocol.read_frame(sock, 1 << 20, time.monotonic() + 5)
        rest = sock.recv(100)
        return repr((kind, request_id, protocol.unpack(body)["code"], rest, time.monotonic() - started < 1.0))

    assert as_user(*bob, connect_and_wait) == repr((protocol.ERROR, 0, "access_denied", b"", True))
    # Refused peers never count against max_connections: 40 of them waiting do not keep alice out.
    with held_by(bob, daemon.socket, 40) as held:
        assert as_user(*alice, lambda: _calls(daemon.socket, 5)) == str([i + 1 for i in range(5)])
        assert daemon.client().status()["connections"] <= 3  # alice's 2 (her limit) and this one
        time.sleep(0.5)  # (a refused peer that sent nothing is answered within 0.2s)
    assert held["outcome"] == {"access_denied": 40}


def test_a_refused_uid_connecting_in_a_loop_writes_a_bounded_number_of_lines(open_daemon, bob):
    daemon = open_daemon(workers=1, allow_uids="xd-alice")

    def flood() -> str:
        count, deadline = 0, time.monotonic() + 2
        while time.monotonic() < deadline:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.connect(str(daemon.socket))
                count += 1
            except OSError:
                pass
            sock.close()
        return str(count)

    attempts = int(as_user(*bob, flood))
    assert attempts > 500
    line = f"refused a connection from uid {bob[0]} "
    assert wait_until(lambda: line in daemon.log)
    assert daemon.log.count(line) == 1
    # ten seconds on, one more line says how many were left out
    assert wait_until(lambda: "more like this in the last 10s" in daemon.log, timeout=15)
    summary = next(text for text in daemon.log.splitlines() if "more like this" in text)
    assert line in summary and f"({attempts - 1} more like this in the last 10s)" in summary
    assert daemon.log.count(line) == 2


def test_with_a_low_file_limit_workers_are_replaced_and_clients_answered(open_daemon, alice, bob):
    def low_limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (64, 256))

    daemon = open_daemon(workers=2, preexec_fn=low_limit)
    limits = Path(f"/proc/{daemon.proc.pid}/limits").read_text()
    assert [line.split()[3:5] for line in limits.splitlines() if line.startswith("Max open files")] == [["256", "256"]]
    assert "raised the open-file limit from 64 to 256" in daemon.log
    limit = daemon.client().status()["max_connections"]
    assert 100 < limit < 256 - 40
    assert f"leaves room for {limit} connections, fewer than max_connections (1000)" in daemon.log
    # alice and root hold as many connections as they may (more than the descriptors left)
    with held_by(alice, daemon.socket, 300, pause_after=150):
        mine = [raw_connection(daemon) for _ in range(300)]
        time.sleep(GRACE)
        killed = next(iter(daemon.worker_pids()))
        os.kill(killed, signal.SIGKILL)
        daemon.wait_workers(2, exclude={killed})
        assert as_user(*bob, lambda: _calls(daemon.socket, 5)) == str([i + 1 for i in range(5)])
        assert daemon.client().call("add", 1, 1) == 2
        assert daemon.client().status()["connections"] <= limit + 4  # (root may use the control reserve)
        assert sum(_state(sock) == "open" for sock in mine) <= limit // 2 + 4
    assert "cannot create a worker channel" not in daemon.log
    assert "cannot accept" not in daemon.log


HOLDER = '''
import os

# Kept open for as long as this module lives, in the process that imported it (the generation's parent).
_HELD = [open(os.devnull) for _ in range(int(open(os.path.join(os.path.dirname(__file__), "hold")).read()))]


def add(a, b):
    return a + b
'''


def test_descriptors_an_expert_module_holds_do_not_cut_the_masters_connections(open_daemon, short_dir):
    # The master never imports expert code: what a module keeps open lives in its generation's
    # parent, and the master's room for connections stays what it was, reload or not.
    (short_dir / "holder.py").write_text(HOLDER)
    (short_dir / "hold").write_text("0")
    daemon = open_daemon({"add": "holder:add"}, workers=2, pythonpath=f"{short_dir}",
                         preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256)))
    limit = daemon.client().status()["max_connections"]
    mine = [raw_connection(daemon) for _ in range(limit // 2)]
    time.sleep(GRACE)
    (short_dir / "hold").write_text("120")
    daemon.send_signal(signal.SIGHUP)
    assert wait_until(lambda: "reload done" in daemon.log, timeout=30)
    lowered = daemon.client().status()["max_connections"]
    assert limit - 4 <= lowered <= limit + 4
    more = [raw_connection(daemon) for _ in range(limit)]
    time.sleep(GRACE)
    assert daemon.client().call("add", 1, 1) == 2
    killed = next(iter(daemon.worker_pids()))
    os.kill(killed, signal.SIGKILL)
    daemon.wait_workers(2, exclude={killed}, timeout=10)
    assert daemon.client().call("add", 2, 2) == 4
    assert sum(_state(sock) == "open" for sock in mine + more) <= lowered + 4
    assert "cannot create a worker channel" not in daemon.log and "cannot accept" not in daemon.log


def test_out_of_descriptors_a_new_client_is_answered_not_left_hanging(open_daemon, alice, bob):
    daemon = open_daemon(workers=1, max_connections_per_uid=1000,
                         preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256)))
    pid = daemon.proc.pid
    worker = next(iter(daemon.worker_pids()))
    # alice holds 100 connections, each with a request begun: none is idle, none can be closed for room
    base = len(os.listdir(f"/proc/{pid}/fd"))
    with held_by(alice, daemon.socket, 100, first_bytes=b"XD"):
        assert wait_until(lambda: len(os.listdir(f"/proc/{pid}/fd")) == base + 100)
        resource.prlimit(pid, resource.RLIMIT_NOFILE, (base + 100, 256))  # not one descriptor left
        time.sleep(0.5)  # (the master looks at its limit four times a second)

        def newcomer() -> str:
            started = time.monotonic()
            try:
                return str(Client(str(daemon.socket), retries=0, connect_timeout=5).call("add", 1, 1))
            except Overloaded as exc:
                return f"overloaded after {time.monotonic() - started:.1f}s: {exc}"

        assert as_user(*bob, newcomer).startswith("overloaded after 0.")
        assert wait_until(lambda: "cannot accept connections: Too many open files" in daemon.log)
        os.kill(worker, signal.SIGKILL)  # no descriptor for its replacement's channel while alice holds hers
        assert wait_until(lambda: "cannot create a worker channel" in daemon.log)
    daemon.wait_workers(1, exclude={worker}, timeout=10)  # her connections gone, the worker is replaced
    resource.prlimit(pid, resource.RLIMIT_NOFILE, (256, 256))
    assert daemon.client().call("add", 2, 2) == 4
    assert daemon.log.count("cannot accept connections") <= 2  # rate-limited


# ------------------------------------------------------------------ item 12: control
def test_control_requests_need_privilege_and_status_does_not(open_daemon, alice):
    daemon = open_daemon(workers=2)

    def attempt() -> str:
        client = Client(str(daemon.socket), retries=0)
        outcome = {"status": sorted(client.status())[:3], "call": client.call("add", 1, 2)}
        for verb, action in (("reload", client.reload), ("stop", client.stop),
                             ("workers", lambda: client.set_workers(5))):
            try:
                action()
                outcome[verb] = "allowed"
            except AccessDenied as exc:
                outcome[verb] = str(exc)
        outcome["expertctl"] = [_ctl(daemon.socket, *args) for args in (["stop"], ["reload"], ["workers", "4"])]
        outcome["expertctl status"] = _ctl(daemon.socket, "status")[0]
        outcome["experts"] = [e["name"] for e in client.experts()]
        return json.dumps(outcome)

    outcome = json.loads(as_user(*alice, attempt))
    assert outcome["call"] == 3 and outcome["status"] and outcome["expertctl status"] == 0
    assert outcome["experts"] == ["add", "pid"]
    for verb, name in (("reload", "RELOAD"), ("stop", "STOP"), ("workers", "SCALE")):
        assert outcome[verb].startswith(f"uid {alice[0]} may not send {name} to this expertd"), outcome
        assert "control_uids" in outcome[verb]
    for status, text in outcome["expertctl"]:
        assert status == 1 and "[access_denied]" in text and "control_uids" in text, text
    assert daemon.proc.poll() is None and len(daemon.worker_pids()) == 2  # nothing happened
    assert f"control: refused RELOAD from uid {alice[0]} (pid " in daemon.log
    assert "control: RELOAD from" not in daemon.log and "control: STOP from" not in daemon.log
    # root (here also the daemon's own user) may
    assert daemon.client().set_workers(3) == {"workers": 3}
    assert f"control: SCALE to 3 workers from uid 0 (pid {os.getpid()})" in daemon.log
    reloaded = daemon.ctl("reload")
    assert reloaded.returncode == 0, reloaded.stderr
    assert "control: RELOAD from uid 0 (pid " in daemon.log
    stopping = daemon.ctl("stop")
    assert stopping.returncode == 0
    assert daemon.proc.wait(30) == 0
    assert "control: STOP from uid 0 (pid " in daemon.log


def test_control_uids_and_control_gids_grant_control(open_daemon, alice, bob):
    daemon = open_daemon(workers=1, control_uids="xd-alice", control_gids="xd-bob")
    assert as_user(*alice, lambda: Client(str(daemon.socket)).set_workers(2)) == "{'workers': 2}"
    # a member of bob's group: by its primary group, then by a supplementary one
    assert as_user(alice[0], bob[1], lambda: Client(str(daemon.socket)).set_workers(3)) == "{'workers': 3}"
    assert as_user(4343, 4343, lambda: Client(str(daemon.socket)).set_workers(4),
                   groups=(bob[1],)) == "{'workers': 4}"
    assert as_user(4343, 4343, lambda: Client(str(daemon.socket)).set_workers(1)).startswith(
        "error AccessDenied: uid 4343 may not send SCALE")
    assert f"control: SCALE to 2 workers from uid {alice[0]} (pid " in daemon.log
    assert "control: SCALE to 4 workers from uid 4343 (pid " in daemon.log


def test_status_closed_to_callers_by_public_status_no(open_daemon, alice):
    daemon = open_daemon(workers=1, public_status="no")

    def look() -> str:
        client = Client(str(daemon.socket), retries=0)
        seen = [client.call("add", 2, 3)]
        for action in (client.status, client.experts):
            try:
                seen.append(action())
            except AccessDenied as exc:
                seen.append(exc.code)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(5)
        sock.connect(str(daemon.socket))
        sock.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        seen.append(sock.recv(65536).decode().split("\r\n")[0])
        return str(seen)

    assert as_user(*alice, look) == str([5, "access_denied", "access_denied", "HTTP/1.1 403 Forbidden"])
    assert daemon.client().status()["workers_wanted"] == 1  # root may
    assert [e["name"] for e in daemon.client().experts()] == ["add", "pid"]


def test_a_lingering_worker_hands_control_requests_to_the_master(open_daemon, alice):
    daemon = open_daemon(workers=1, linger="2s")

    def call_then_stop() -> str:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(5)
        sock.connect(str(daemon.socket))
        replies = []
        for request_id, kind, body in ((1, protocol.CALL, protocol.pack(["add", [1, 1], {}])),
                                       (2, protocol.STOP, b""), (3, protocol.SCALE, protocol.pack(3)),
                                       (4, protocol.CALL, protocol.pack(["add", [2, 2], {}]))):
            sock.sendall(protocol.encode_frame(kind, request_id, body))
            reply_kind, reply_id, reply = protocol.read_frame(sock, 1 << 20, time.monotonic() + 5)
            value = protocol.unpack(reply)
            replies.append((reply_id, value if reply_kind == protocol.RESULT else value["code"]))
        return str(replies)

    assert as_user(*alice, call_then_stop) == str([(1, 2), (2, "access_denied"), (3, "access_denied"), (4, 4)])
    assert daemon.proc.poll() is None
    assert daemon.client().status()["workers_wanted"] == 1


@needs_root
def test_control_groups_are_the_ones_the_peer_had_when_it_connected(open_daemon, alice):
    # Groups are read once, at connect (SO_PEERGROUPS), never later from /proc by a pid that may
    # belong to another process by then. Here one process changes its groups after connecting.
    uid, gid = alice
    daemon = open_daemon(control_gids="4646")

    def scale_after_joining_the_group() -> str:
        os.setgroups([])
        os.setresgid(gid, gid, gid)
        os.setresuid(uid, uid, 0)  # (the saved uid lets it take root's rights back below)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(10)
        sock.connect(str(daemon.socket))  # as alice, in no group
        os.seteuid(0)
        os.setgroups([4646])  # a control group, joined after connecting
        os.seteuid(uid)
        sock.sendall(protocol.encode_frame(protocol.SCALE, 1, protocol.pack(3)))
        kind, _request_id, body = protocol.read_frame(sock, 1 << 20, time.monotonic() + 10)
        return protocol.unpack(body).get("code", "ok") if kind == protocol.ERROR else "ok"

    assert in_child(scale_after_joining_the_group) == "access_denied"
    assert daemon.client().status()["workers_wanted"] == 2
