"""Connection and worker states (their TRANSITIONS tables), and the master's connection table on real sockets."""

import itertools
import logging
import select
import socket

import pytest

from expertd import connections, pool, protocol
from expertd.config import load_config
from expertd.connections import (
    BUSY,
    CLOSED,
    IDLE,
    LINGERING,
    PARTIAL,
    QUEUED,
    WAITING,
    WRITING,
    Connection,
    ConnectionTable,
)
from expertd.errors import Overloaded
from expertd.logs import Throttle
from expertd.pool import WorkerSlot
from expertd.serving import Serving

# ---------------------------------------------------------------------------------------- the tables
CONNECTION_STATES = [IDLE, PARTIAL, QUEUED, BUSY, LINGERING, WRITING, WAITING, CLOSED]
WORKER_STATES = [pool.BOOTING, pool.IDLE, pool.BUSY, pool.LINGERING, pool.GONE]

CONNECTION_MOVES = {  # the moves the master makes, as docs in expertd/connections.py describe them
    (IDLE, IDLE), (IDLE, PARTIAL), (IDLE, QUEUED), (IDLE, WRITING), (IDLE, WAITING), (IDLE, CLOSED),
    (PARTIAL, IDLE), (PARTIAL, PARTIAL), (PARTIAL, QUEUED), (PARTIAL, CLOSED),
    (QUEUED, BUSY), (QUEUED, CLOSED),
    (BUSY, IDLE), (BUSY, QUEUED), (BUSY, LINGERING), (BUSY, WRITING), (BUSY, CLOSED),
    (LINGERING, IDLE), (LINGERING, LINGERING), (LINGERING, WRITING), (LINGERING, CLOSED),
    (WRITING, IDLE), (WRITING, CLOSED),
    (WAITING, IDLE), (WAITING, CLOSED),
}
WORKER_MOVES = {
    (pool.BOOTING, pool.IDLE), (pool.BOOTING, pool.GONE),
    (pool.IDLE, pool.BUSY), (pool.IDLE, pool.GONE),
    (pool.BUSY, pool.IDLE), (pool.BUSY, pool.BUSY), (pool.BUSY, pool.LINGERING), (pool.BUSY, pool.GONE),
    (pool.LINGERING, pool.IDLE), (pool.LINGERING, pool.BUSY), (pool.LINGERING, pool.LINGERING),
    (pool.LINGERING, pool.GONE),
}


def _connection(state: str) -> Connection:
    return Connection(conn_id=7, sock=None, fd=-1, state=state)


def _worker(state: str) -> WorkerSlot:
    return WorkerSlot(number=3, pid=4242, channel=None, born=0.0, generation=1, board=0, state=state)


def test_every_connection_state_has_its_row_and_no_move_leads_to_an_unknown_state():
    assert set(connections.TRANSITIONS) == set(CONNECTION_STATES)
    assert set().union(*connections.TRANSITIONS.values()) <= set(CONNECTION_STATES)
    assert {(a, b) for a, row in connections.TRANSITIONS.items() for b in row} == CONNECTION_MOVES


def test_every_worker_state_has_its_row_and_no_move_leads_to_an_unknown_state():
    assert set(pool.TRANSITIONS) == set(WORKER_STATES)
    assert set().union(*pool.TRANSITIONS.values()) <= set(WORKER_STATES)
    assert {(a, b) for a, row in pool.TRANSITIONS.items() for b in row} == WORKER_MOVES


@pytest.mark.parametrize("before, after", sorted(itertools.product(CONNECTION_STATES, repeat=2)))
def test_a_connection_moves_only_as_its_table_allows(before, after):
    conn = _connection(before)
    if (before, after) in CONNECTION_MOVES:
        conn.to(after)
        assert conn.state == after
    else:
        with pytest.raises(connections.StateError, match=f"connection 7: {before} -> {after} is not a transition"):
            conn.to(after)
        assert conn.state == before  # a refused move changes nothing


@pytest.mark.parametrize("before, after", sorted(itertools.product(WORKER_STATES, repeat=2)))
def test_a_worker_moves_only_as_its_table_allows(before, after):
    slot = _worker(before)
    if (before, after) in WORKER_MOVES:
        slot.to(after)
        assert slot.state == after
    else:
        with pytest.raises(pool.StateError, match=rf"worker 3 \(pid 4242\): {before} -> {after} is not a transition"):
            slot.to(after)
        assert slot.state == before


@pytest.mark.parametrize("state", [s for s in CONNECTION_STATES if s != CLOSED])
def test_a_connection_can_be_closed_in_any_state(state):
    conn = _connection(state)
    conn.to(CLOSED)
    assert conn.state == CLOSED


@pytest.mark.parametrize("state", [s for s in WORKER_STATES if s != pool.GONE])
def test_a_worker_can_die_in_any_state(state):
    slot = _worker(state)
    slot.to(pool.GONE)
    assert slot.state == pool.GONE


@pytest.mark.parametrize("state", CONNECTION_STATES)
def test_a_closed_connection_stays_closed(state):
    conn = _connection(CLOSED)
    with pytest.raises(connections.StateError):
        conn.to(state)
    assert connections.TRANSITIONS[CLOSED] == frozenset()


@pytest.mark.parametrize("state", WORKER_STATES)
def test_a_gone_worker_stays_gone(state):
    slot = _worker(pool.GONE)
    with pytest.raises(pool.StateError):
        slot.to(state)
    assert pool.TRANSITIONS[pool.GONE] == frozenset()


def test_a_new_connection_is_idle_and_a_new_worker_is_booting():
    assert Connection(conn_id=1, sock=None, fd=-1).state == IDLE
    assert WorkerSlot(number=1, pid=1, channel=None, born=0.0, generation=1, board=0).state == pool.BOOTING


# ---------------------------------------------------------------------------------------- the table
MAX_FRAME = 1024
BUDGET = 4 * MAX_FRAME  # gathering: four max_frames
SETTINGS = {"max_frame": "1K", "max_reply_buffer": "64K", "max_reply_buffer_per_connection": "32K",
            "read_timeout": "10s", "idle_timeout": "300s"}


class Harness:
    """A ConnectionTable over socketpairs and a real epoll, with the client end of every connection."""

    def __init__(self, directory, **settings: str) -> None:
        path = directory / "expertd.conf"
        lines = ["[expertd]", f"socket = {directory / 'x.sock'}"]
        lines += [f"{key} = {value}" for key, value in {**SETTINGS, **settings}.items()]
        lines += ["[expert:square]", "function = squares:square"]
        path.write_text("\n".join(lines) + "\n")
        self.serving = Serving(load_config(str(path)))
        self.epoll = select.epoll()
        self.table = ConnectionTable(self.serving, self.epoll, Throttle(logging.getLogger("t")))
        self.clients: dict[int, socket.socket] = {}  # by conn_id
        self._sockets: list[socket.socket] = []

    def connect(self, uid: int = 1000, tcp: bool = False) -> Connection:
        ours, theirs = socket.socketpair()
        ours.setblocking(False)
        theirs.setblocking(False)
        self._sockets += [ours, theirs]
        conn = self.table.add(ours, tcp=tcp, uid=uid, gid=uid, pid=4000 + uid, groups=frozenset())
        self.clients[conn.conn_id] = theirs
        return conn

    def gather(self, conn: Connection, size: int) -> bool:
        """What intake does with ``size`` more bytes of a request arriving in pieces."""
        if conn.state != PARTIAL:
            conn.to(PARTIAL)
        if conn.inbuf is None:
            conn.inbuf = bytearray()
        if not self.table.hold_gathered(conn, size):
            return False
        conn.inbuf += bytes(size)
        conn.last_active = self.serving.now
        return True

    def received(self, conn: Connection) -> bytes:
        """What the connection's client has been sent so far."""
        data = b""
        client = self.clients[conn.conn_id]
        while True:
            try:
                chunk = client.recv(1 << 20)
            except (BlockingIOError, ConnectionResetError):
                return data
            if not chunk:
                return data
            data += chunk

    def close(self) -> None:
        for sock in self._sockets:
            sock.close()
        self.epoll.close()


@pytest.fixture
def harness(tmp_path):
    made = []

    def make(**settings: str) -> Harness:
        made.append(Harness(tmp_path, **settings))
        return made[-1]

    yield make
    for each in made:
        each.close()


@pytest.fixture
def h(harness):
    return harness()


def _error_in(reply: bytes) -> tuple[int, dict]:
    kind, request_id, length = protocol.parse_header(reply[: protocol.HEADER_SIZE])
    assert kind == protocol.ERROR and length == len(reply) - protocol.HEADER_SIZE
    return request_id, protocol.unpack(reply[protocol.HEADER_SIZE:])


def test_an_added_connection_is_idle_registered_and_watched(h):
    h.serving.now = 500.0
    conn = h.connect(uid=1001)
    assert conn.state == IDLE and conn.last_active == 500.0
    assert (conn.uid, conn.gid, conn.pid, conn.speaks, conn.tcp) == (1001, 1001, 5001, "", False)
    assert h.table.by_fd[conn.fd] is conn and list(h.table.by_uid[1001].values()) == [conn]
    assert len(h.table) == 1
    assert h.epoll.poll(0) == []
    h.clients[conn.conn_id].send(b"XD")
    assert h.epoll.poll(0) == [(conn.fd, select.EPOLLIN)]  # bytes from its client wake the loop


def test_an_http_listen_connection_speaks_http_from_its_first_byte(h):
    conn = h.connect(uid=-1, tcp=True)
    assert conn.speaks == "http" and conn.tcp


def test_connection_ids_are_never_reused(h):
    first = h.connect()
    h.table.close(first)
    second, third = h.connect(), h.connect()
    assert [first.conn_id, second.conn_id, third.conn_id] == [1, 2, 3]


def test_resting_moves_a_connection_to_the_end_of_its_users_order(h):
    a, b, c = h.connect(), h.connect(), h.connect()
    other = h.connect(uid=2000)
    assert list(h.table.by_uid[1000].values()) == [a, b, c]
    a.to(PARTIAL)
    h.table.rest(a, 123.0)
    assert a.state == IDLE and a.last_active == 123.0
    assert list(h.table.by_uid[1000].values()) == [b, c, a]  # a is now the last to be closed for room
    assert list(h.table.by_uid[2000].values()) == [other]


def test_resting_a_connection_that_may_not_go_idle_is_refused(h):
    conn = h.connect()
    conn.to(QUEUED)
    with pytest.raises(connections.StateError):
        h.table.rest(conn, 1.0)


def test_closing_releases_what_it_held_and_is_idempotent(h):
    gathering, writing, other = h.connect(), h.connect(), h.connect(uid=2000)
    assert h.gather(gathering, 1000)
    assert h.table.hold_reply(writing, memoryview(bytes(5000))) is None
    assert h.gather(other, 300)
    assert (h.table.gathered, h.table.held_replies) == (1300, 5000)
    gathering.unread = b"left over"
    h.table.close(gathering)
    h.table.close(writing)
    assert (h.table.gathered, h.table.held_replies) == (300, 0)
    assert gathering.state == writing.state == CLOSED
    assert gathering.inbuf is None and gathering.unread == b"" and writing.outbuf is None and writing.held == 0
    assert gathering.sock.fileno() == -1 and h.received(gathering) == b""  # its client sees the end
    h.table.close(gathering)  # again: nothing changes, nothing raises
    assert (h.table.gathered, h.table.held_replies, len(h.table)) == (300, 0, 1)
    assert list(h.table.by_fd.values()) == [other]


def test_closing_a_users_last_connection_forgets_the_user(h):
    conn = h.connect(uid=1234)
    h.table.close(conn)
    assert 1234 not in h.table.by_uid and h.table.by_fd == {}


# --------------------------------------------------------------------- gathering budget
def test_requests_arriving_in_pieces_are_gathered_up_to_four_max_frames(h):
    a, b = h.connect(), h.connect()
    assert h.gather(a, BUDGET - 100)
    assert h.gather(b, 100)
    assert h.table.gathered == BUDGET
    assert not h.gather(b, 1)  # the same user holds it all: nobody stalled, nobody to give way
    assert h.table.gathered == BUDGET and a.state == b.state == PARTIAL


def test_gathering_past_the_budget_is_refused_when_nobody_stalled_or_holds_over_half(h):
    a, b = h.connect(uid=1), h.connect(uid=2)
    assert h.gather(a, BUDGET // 2) and h.gather(b, BUDGET // 2)  # exactly half each
    newcomer = h.connect(uid=3)
    assert not h.gather(newcomer, 1)
    assert a.state == b.state == PARTIAL and h.table.gathered == BUDGET


def test_a_stalled_gatherer_is_closed_to_make_room(h):
    stalled, sending = h.connect(), h.connect()
    stalled.request_id = 77
    assert h.gather(stalled, BUDGET)
    stalled.last_active = h.serving.now
    h.serving.now += 0.5  # _GATHER_STALLED without a byte
    assert h.gather(sending, 100)
    assert stalled.state == CLOSED and h.table.gathered == 100
    request_id, error = _error_in(h.received(stalled))
    assert request_id == 77 and error["code"] == Overloaded.code
    assert "request stalled for 0.5s" in error["message"]


def test_a_gatherer_that_sent_lately_is_not_stalled(h):
    recent, sending = h.connect(), h.connect()
    assert h.gather(recent, BUDGET)
    recent.last_active = h.serving.now
    h.serving.now += 0.4
    assert not h.gather(sending, 100)
    assert recent.state == PARTIAL


def test_the_longest_stalled_gatherer_gives_way_first(h):
    old, older, sending = h.connect(), h.connect(), h.connect()
    assert h.gather(old, BUDGET // 2) and h.gather(older, BUDGET // 2)
    older.last_active, old.last_active = h.serving.now - 5, h.serving.now - 1
    assert h.gather(sending, 100)
    assert older.state == CLOSED and old.state == PARTIAL
    assert h.table.gathered == BUDGET // 2 + 100


def test_a_user_holding_over_half_of_the_gathering_budget_gives_way_to_another(h):
    hog_a, hog_b = h.connect(uid=1), h.connect(uid=1)
    assert h.gather(hog_a, 1500) and h.gather(hog_b, 1500)  # uid 1: 3000 of 4096, still sending
    hog_a.last_active = h.serving.now - 0.2  # the quieter one (not stalled)
    other = h.connect(uid=2)
    assert h.gather(other, 1500)
    assert hog_a.state == CLOSED and hog_b.state == PARTIAL
    assert h.table.gathered == 3000
    _, error = _error_in(h.received(hog_a))
    assert error["code"] == "overloaded" and "more than half" in error["message"]


def test_a_user_may_use_the_whole_gathering_budget_while_nobody_else_needs_it(h):
    conns = [h.connect(uid=1) for _ in range(4)]
    assert all(h.gather(conn, MAX_FRAME) for conn in conns)
    assert h.table.gathered == BUDGET


def test_room_gathered_is_free_again_once_its_connection_closes(h):
    a = h.connect(uid=1)
    assert h.gather(a, BUDGET)
    h.table.close(a)
    b = h.connect(uid=2)
    assert h.gather(b, BUDGET) and h.table.gathered == BUDGET


# --------------------------------------------------------------------- reply budget
def test_a_reply_rest_over_max_reply_buffer_per_connection_is_refused(h):
    conn = h.connect()
    refusal = h.table.hold_reply(conn, memoryview(bytes(32 * 1024 + 1)))
    assert refusal == "max_reply_buffer_per_connection (32768 bytes)"
    assert conn.outbuf is None and conn.held == 0 and h.table.held_replies == 0
    assert h.table.hold_reply(conn, memoryview(bytes(32 * 1024))) is None
    assert conn.held == 32 * 1024 and conn.outbuf.nbytes == 32 * 1024


def test_replies_held_past_max_reply_buffer_are_refused(h):
    a, b, c = h.connect(), h.connect(), h.connect()
    assert h.table.hold_reply(a, memoryview(bytes(30000))) is None
    assert h.table.hold_reply(b, memoryview(bytes(30000))) is None
    refusal = h.table.hold_reply(c, memoryview(bytes(10000)))
    assert refusal == "max_reply_buffer (65536 bytes, 60000 held for other slow readers)"
    assert c.held == 0 and h.table.held_replies == 60000 and a.state == b.state == IDLE


def test_a_user_holding_over_half_of_the_reply_buffer_gives_way_to_another(h):
    quiet, busy = h.connect(uid=1), h.connect(uid=1)
    assert h.table.hold_reply(quiet, memoryview(bytes(30000))) is None
    assert h.table.hold_reply(busy, memoryview(bytes(30000))) is None
    quiet.last_active, busy.last_active = 1.0, 2.0
    newcomer = h.connect(uid=2)
    assert h.table.hold_reply(newcomer, memoryview(bytes(10000))) is None
    assert quiet.state == CLOSED and busy.state == IDLE  # the longest quiet of the hog's connections
    assert h.table.held_replies == 40000 and newcomer.held == 10000


def test_a_user_holding_half_or_more_does_not_take_room_from_another_hog(h):
    a, b = h.connect(uid=1), h.connect(uid=2)
    assert h.table.hold_reply(a, memoryview(bytes(32768))) is None
    assert h.table.hold_reply(b, memoryview(bytes(32768))) is None
    c = h.connect(uid=2)
    assert h.table.hold_reply(c, memoryview(bytes(1))) is not None
    assert a.state == b.state == IDLE


# --------------------------------------------------------------------- replies of the master's own
def test_a_reply_the_socket_takes_at_once_leaves_the_connection_idle(h):
    conn = h.connect()
    frame = protocol.encode_frame(protocol.RESULT, 5, protocol.pack({"ok": True}))
    h.table.send_reply(conn, frame)
    assert conn.state == IDLE and conn.outbuf is None and h.table.held_replies == 0
    assert h.received(conn) == frame


def test_a_reply_larger_than_the_socket_buffer_is_written_as_the_client_takes_it(harness):
    h = harness(max_reply_buffer="8M", max_reply_buffer_per_connection="4M")
    conn = h.connect()
    conn.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    h.serving.now = 100.0
    frame = bytes(range(256)) * 4096  # 1 MiB
    h.table.send_reply(conn, frame)
    assert conn.state == WRITING
    assert conn.write_deadline == 100.0 + h.serving.config.read_timeout
    assert 0 < conn.held == conn.outbuf.nbytes < len(frame) and h.table.held_replies == conn.held
    taken = h.received(conn)
    assert taken + bytes(conn.outbuf) == frame  # what went out, then the rest held, is the reply
    assert (conn.fd, select.EPOLLOUT) in [(fd, mask & select.EPOLLOUT) for fd, mask in h.epoll.poll(1)]


def test_a_reply_whose_rest_cannot_be_held_closes_the_connection(h):
    conn = h.connect()
    conn.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    h.table.send_reply(conn, bytes(1 << 20))  # the rest is over max_reply_buffer_per_connection
    assert conn.state == CLOSED and h.table.held_replies == 0 and len(h.table) == 0


def test_a_reply_to_a_client_gone_closes_the_connection(h):
    conn = h.connect()
    h.clients[conn.conn_id].close()
    h.table.send_reply(conn, b"XD" + bytes(100))
    assert conn.state == CLOSED


def test_an_answered_connection_takes_its_next_turn_after_the_others(h):
    a, b = h.connect(), h.connect()
    h.table.recheck.append(a)
    h.table.answer(b, b"reply")
    assert list(h.table.recheck) == [a, b]


def test_a_msgpack_failure_answers_the_request_then_closes(h):
    conn = h.connect()
    conn.request_id = 31
    h.table.fail(conn, Overloaded("busy"))
    request_id, error = _error_in(h.received(conn))
    assert (request_id, error["code"], error["message"]) == (31, "overloaded", "busy")
    assert conn.state == CLOSED and len(h.table) == 0


def test_an_http_failure_is_an_http_response_after_its_request_is_read(h):
    conn = h.connect(uid=-1, tcp=True)
    h.clients[conn.conn_id].send(b"POST /call/square HTTP/1.1\r\nContent-Length: 3\r\n\r\n[3]")
    h.table.fail(conn, Overloaded("busy"))
    reply = h.received(conn)  # (read, not reset: its unread request was drained first)
    assert reply.startswith(b"HTTP/1.1 503 Service Unavailable\r\n")
    assert b"Connection: close\r\n" in reply and b'"code":"overloaded"' in reply
    assert conn.state == CLOSED


# --------------------------------------------------------------------- expiry
def test_a_request_incomplete_past_read_timeout_is_closed(h):
    slow, fresh = h.connect(), h.connect()
    for conn, since in ((slow, 100.0), (fresh, 105.0)):
        conn.to(PARTIAL)
        conn.partial_since = since
    h.table.expire(100.0 + 10.0)
    assert slow.state == PARTIAL  # exactly read_timeout: not yet
    h.table.expire(110.5)
    assert slow.state == CLOSED and fresh.state == PARTIAL
    h.table.expire(115.5)
    assert fresh.state == CLOSED


def test_an_idle_connection_past_idle_timeout_is_closed(h):
    old, recent = h.connect(), h.connect()
    h.table.rest(old, 1000.0)
    h.table.rest(recent, 1200.0)
    h.table.expire(1300.0)
    assert old.state == recent.state == IDLE
    h.table.expire(1300.5)
    assert old.state == CLOSED and recent.state == IDLE


def test_with_idle_timeout_off_an_idle_connection_is_kept(harness):
    h = harness(idle_timeout="0")
    conn = h.connect()
    h.table.rest(conn, 0.0)
    h.table.expire(1e9)
    assert conn.state == IDLE


def test_a_client_that_does_not_take_its_reply_in_time_is_closed(h):
    conn = h.connect()
    assert h.table.hold_reply(conn, memoryview(bytes(100))) is None
    h.serving.now = 50.0
    h.table.start_writing(conn)
    h.table.expire(60.0)
    assert conn.state == WRITING
    h.table.expire(60.5)
    assert conn.state == CLOSED and h.table.held_replies == 0


@pytest.mark.parametrize("path", [[QUEUED], [QUEUED, BUSY], [QUEUED, BUSY, LINGERING], [WAITING]])
def test_a_connection_a_worker_or_a_reload_holds_never_expires(h, path):
    conn = h.connect()
    conn.partial_since = conn.last_active = 0.0
    for state in path:
        conn.to(state)
    h.table.expire(1e9)
    assert conn.state == path[-1] and len(h.table) == 1

