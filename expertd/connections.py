"""Client connections as the master holds them: their states, the table of them, and their budgets.

Every client connection lives in the master's epoll set between requests
(costing nothing while idle) and is lent to a worker for each request.  A
connection is in one state at a time, changed only by :meth:`Connection.to`,
which checks the move against :data:`TRANSITIONS`:

    ============  ==================================================================
    idle          between requests, in epoll; the master peeks when bytes arrive
    partial       a request is arriving (peeked, not whole yet), or being gathered
    queued        a whole request waits for a worker (in the dispatcher's queue)
    busy          handed to a worker (or handed ahead: waiting in its channel)
    lingering     its worker kept it after answering, to serve its next request directly
    writing       the master writes the rest of a reply its client was slow to take
    waiting       a RELOAD request waits for the new generation to load or fail
    closed        gone: out of the table and epoll, its socket closed
    ============  ==================================================================

State owned here: the connections by descriptor and by peer uid (each uid's in
the order they last fell idle, so that the longest idle is closed first for
room), the connections to look at again next loop iteration, and the two
memory budgets the master holds for clients: bytes of requests it gathers from
slow senders and bytes of replies it holds for slow readers, in all and by uid.
"""

from __future__ import annotations

import logging
import select
import socket
from collections import OrderedDict, deque
from dataclasses import dataclass

from expertd import accesslog, firefly, http, protocol
from expertd.access import NO_PEER
from expertd.errors import Overloaded, RemoteError
from expertd.logs import Throttle
from expertd.serving import Serving

log = logging.getLogger("expertd.master")

IDLE, PARTIAL, QUEUED, BUSY, LINGERING, WRITING, WAITING, CLOSED = (
    "idle", "partial", "queued", "busy", "lingering", "writing", "waiting", "closed")

# Which state may follow which.  A move not listed is a bug in the master: to() raises.
TRANSITIONS: dict[str, frozenset[str]] = {
    IDLE: frozenset({IDLE, PARTIAL, QUEUED, WRITING, WAITING, CLOSED}),
    PARTIAL: frozenset({IDLE, PARTIAL, QUEUED, CLOSED}),
    QUEUED: frozenset({BUSY, CLOSED}),  # (a queued request refused is answered, then closed)
    BUSY: frozenset({IDLE, QUEUED, LINGERING, WRITING, CLOSED}),  # (queued again: handed ahead, never reached)
    LINGERING: frozenset({IDLE, LINGERING, WRITING, CLOSED}),
    WRITING: frozenset({IDLE, CLOSED}),
    WAITING: frozenset({IDLE, CLOSED}),
    CLOSED: frozenset(),
}

# EPOLLRDHUP: a client that ends its input with a request still incomplete is closed at once, not at
# read_timeout (a peek sees the bytes it sent, not that nothing more will follow).
ET_READ = select.EPOLLIN | select.EPOLLRDHUP | select.EPOLLET
ET_READ_WRITE = select.EPOLLIN | select.EPOLLOUT | select.EPOLLRDHUP | select.EPOLLET
ET_QUIET = select.EPOLLET  # only hang-ups and errors, once each
ENDED = select.EPOLLRDHUP | select.EPOLLHUP

_GATHER_BUDGET_FRAMES = 4  # requests that do not arrive whole are gathered up to this many max_frames in all
# When that budget is spent, a request that has sent nothing for this long gives its room up to one
# that is arriving (a few stalled senders must not deny large requests to everyone else).
_GATHER_STALLED = 0.5


class StateError(RuntimeError):
    """A connection was moved to a state :data:`TRANSITIONS` does not allow from its own."""


@dataclass(eq=False, slots=True)
class Connection:
    conn_id: int
    sock: socket.socket
    fd: int
    state: str = IDLE
    request_id: int = 0
    expert: str | None = None  # of the request waiting or in progress, when it is a call
    partial_since: float = 0.0
    last_active: float = 0.0  # idle since; while a request is gathered, when its last bytes came
    frame_size: int = 0
    inbuf: bytearray | None = None  # a request the master is gathering from a slow sender
    unread: bytes = b""  # input a worker read but did not serve: it comes before the socket's
    outbuf: memoryview | None = None  # the rest of a reply the client was slow to take
    held: int = 0  # bytes of outbuf counted against max_reply_buffer (see ConnectionTable.hold_reply)
    write_deadline: float = 0.0
    tcp: bool = False  # accepted on http_listen: HTTP only, and the token applies
    speaks: str = ""  # "msgpack" or "http", from the connection's first bytes; "" until they arrive
    close_when_written: bool = False  # a reply of the master's that ends the connection
    head_scanned: int = 0  # bytes of a long HTTP head looked at so far (a head is rescanned only as it grows)
    queued_at: float = 0.0  # when its request was queued (whole) for a worker
    # Handed ahead to a busy worker: how long its request was expected to take then (stale once requeued;
    # each hand-ahead sets it again).
    expected: float = 0.0
    in_batch: bool = False  # handed to a worker as a member of a batch (see expertd.batching)
    # Its request is a MAP (or HTTP POST /map/NAME): many calls of one expert already, served by one worker
    # on its own, never gathered into a batch with other calls (see expertd.batching).
    whole_batch: bool = False
    # Whether more than the request handed over may be waiting in the socket without a new epoll edge
    # (several requests came in one edge, or the peek could not see the whole request): the master
    # looks again when the worker hands the connection back.  Else it waits for the next edge.
    look_again: bool = True
    # The peer's credentials (SO_PEERCRED), read once at accept; NO_PEER (-1) on http_listen (TCP),
    # whose connections share uid -1 for max_connections_per_uid.
    uid: int = NO_PEER
    gid: int = NO_PEER
    pid: int = NO_PEER
    groups: frozenset[int] = frozenset()  # supplementary groups at connect (read only when a gid list is set)
    # The HTTP request examined last: its X-Request-Id (if valid) and its route, for the logs (see log_id).
    http_id: str | None = None
    http_target: str | None = None

    def to(self, state: str) -> None:
        """Move to ``state``: the one place a connection's state changes."""
        if state not in TRANSITIONS[self.state]:
            raise StateError(f"connection {self.conn_id}: {self.state} -> {state} is not a transition")
        self.state = state


class ConnectionTable:
    """The master's connections: registry, rest and close, replies of the master's own, budgets."""

    def __init__(self, serving: Serving, epoll: select.epoll, throttle: Throttle) -> None:
        self.serving = serving
        self.epoll = epoll
        self.throttle = throttle
        self.by_fd: dict[int, Connection] = {}
        # Open connections by the peer's uid, each in the order it last fell idle (longest idle first).
        self.by_uid: dict[int, OrderedDict[int, Connection]] = {}
        # Connections to look at on the loop's next iteration (fair turns: one request per connection
        # per iteration; a connection answered by the master goes back here, after everyone else).
        self.recheck: deque[Connection] = deque()
        self._next_id = 1
        self.gathered = 0  # bytes held in connections' inbufs
        self.held_replies = 0  # bytes held in connections' outbufs
        # The same two counts by peer uid: one user may hold at most half of each (hold_gathered, hold_reply).
        self._gathered_by_uid: dict[int, int] = {}
        self._held_by_uid: dict[int, int] = {}

    def __len__(self) -> int:
        return len(self.by_fd)

    def add(self, sock: socket.socket, *, tcp: bool, uid: int, gid: int, pid: int,
            groups: frozenset[int]) -> Connection:
        conn = Connection(conn_id=self._next_id, sock=sock, fd=sock.fileno(), last_active=self.serving.now,
                          tcp=tcp, speaks="http" if tcp else "", uid=uid, gid=gid, pid=pid, groups=groups)
        self._next_id += 1
        self.by_fd[conn.fd] = conn
        bucket = self.by_uid.get(uid)
        if bucket is None:
            bucket = self.by_uid[uid] = OrderedDict()
        bucket[conn.fd] = conn
        self.epoll.register(conn.fd, ET_READ)
        return conn

    def rest(self, conn: Connection, now: float) -> None:
        """The connection is idle from ``now``: the last of its user's connections to be closed for room."""
        conn.to(IDLE)
        conn.last_active = now
        try:
            self.by_uid[conn.uid].move_to_end(conn.fd)
        except KeyError:
            pass

    def close(self, conn: Connection) -> None:
        if conn.state == CLOSED:
            return
        self.release_gathered(conn)
        self.release_reply(conn)
        conn.unread = b""
        conn.to(CLOSED)
        self.by_fd.pop(conn.fd, None)
        bucket = self.by_uid.get(conn.uid)
        if bucket is not None:
            bucket.pop(conn.fd, None)
            if not bucket:
                del self.by_uid[conn.uid]
        try:
            self.epoll.unregister(conn.fd)
        except (OSError, ValueError):
            pass
        conn.sock.close()

    def expire(self, now: float) -> None:
        """Close connections whose request stalled, whose client does not take its reply, or idle too long.

        (A scan of every connection: the master runs it a few times a second, not per loop iteration.)
        """
        config = self.serving.config
        read_timeout, idle_timeout = config.read_timeout, config.idle_timeout
        for conn in list(self.by_fd.values()):
            if conn.state == PARTIAL and now - conn.partial_since > read_timeout:
                self.throttle.info("closing connection %d of uid %d: request incomplete after %.0fs",
                                   conn.conn_id, conn.uid, read_timeout, cause=("incomplete", conn.uid))
                self.close(conn)
            elif conn.state == WRITING and now > conn.write_deadline:
                self.throttle.info("closing connection %d of uid %d: the client did not take its reply within %.0fs",
                                   conn.conn_id, conn.uid, read_timeout, cause=("not taken", conn.uid))
                self.close(conn)
            elif conn.state == IDLE and idle_timeout and now - conn.last_active > idle_timeout:
                log.debug("closing connection %d: idle for %.0fs", conn.conn_id, idle_timeout)
                self.close(conn)

    # ------------------------------------------------------- replies of the master's own
    def fail(self, conn: Connection, error: RemoteError | http.HttpRefusal, *, started: float | None = None,
             log_id: str | None = None) -> None:
        """Answer the connection's current request with ``error`` (HTTP refusals: HTTP only) and close it.

        ``started``: when its request began (the access log's duration; else none); ``log_id``: its id, if
        not the connection's own (see :func:`log_id`).
        """
        log_id = log_id or self.log_id(conn)
        if conn.speaks == "http":
            drain(conn.sock)
            if conn.http_target is not None and conn.http_target.startswith(firefly.CALL_TARGET):
                # (A timeout, a lost worker, a quarantine: in Firefly's shape, with the CORS headers that need
                # no Origin: a page reads the error as it reads a result.)
                routes = self.serving.config.firefly  # (None after a reload that turned firefly_routes off)
                error = firefly.refusal_of(error, () if routes is None else routes.cors)
            reply = http.error_response(None, error, request_id=log_id)[0]
        else:
            if isinstance(error, RemoteError):
                error.request_id = log_id
            reply = protocol.encode_error(conn.request_id, error)  # type: ignore[arg-type]
        if accesslog.LOG is not None:
            self.log_access(conn, log_id, getattr(error, "code", "error"), reply, started)
        self._send_and_close(conn, reply)

    @staticmethod
    def log_id(conn: Connection) -> str:
        """The id of the connection's request in hand, for the logs (the access log's, the error log's)."""
        if conn.speaks == "http":
            if conn.http_id is None:
                conn.http_id = accesslog.generated_id(accesslog.new_number())
            return conn.http_id
        return accesslog.msgpack_id(conn.conn_id, conn.request_id)

    def log_access(self, conn: Connection, log_id: str, code: str, reply: bytes | bytearray | memoryview,
                   started: float | None = None, target: str | None = None) -> None:
        """The access log's line for a request the master answered itself (the caller checked the log is on)."""
        access = accesslog.LOG
        if access is None:
            return
        if conn.tcp:
            try:
                peer = accesslog.tcp_peer(conn.sock.getpeername())
            except OSError:
                peer = "-"
        else:
            peer = accesslog.unix_peer(conn.uid, conn.pid)
        speaks_http = conn.speaks == "http"
        access.write(log_id, peer, "http" if speaks_http else "msgpack",
                     target or (conn.http_target if speaks_http else conn.expert), code,
                     accesslog.status_of(reply) if speaks_http else None,
                     max(self.serving.now - started, 0.0) if started else 0.0, conn.frame_size, len(reply))

    def _send_and_close(self, conn: Connection, data: bytes) -> None:
        try:
            conn.sock.send(data, socket.MSG_DONTWAIT)
        except OSError:
            pass  # the client is gone or not reading: closing is all that is left
        self.close(conn)

    def send_reply(self, conn: Connection, frame: bytes) -> None:
        """Write a reply of the master's own; what the socket does not take now goes out as it drains."""
        try:
            sent = conn.sock.send(frame, socket.MSG_DONTWAIT)
        except BlockingIOError:
            sent = 0
        except OSError:
            self.close(conn)
            return
        if sent < len(frame):
            refusal = self.hold_reply(conn, memoryview(frame)[sent:])
            if refusal is not None:
                log.warning("closing connection %d: its client is not taking the master's reply, and holding "
                            "the rest would take the master past %s", conn.conn_id, refusal)
                self.close(conn)
                return
            self.start_writing(conn)

    def answer(self, conn: Connection, frame: bytes) -> None:
        """Send a reply of the master's own; the connection then takes its next turn (a request pipelined behind)."""
        self.send_reply(conn, frame)
        if conn.state == IDLE:
            self.recheck.append(conn)  # looked at in the main loop, after the others

    def start_writing(self, conn: Connection) -> None:
        """The master writes the rest of a reply (in ``conn.outbuf``) as the client takes it."""
        conn.to(WRITING)
        conn.write_deadline = self.serving.now + self.serving.config.read_timeout
        self.epoll.modify(conn.fd, ET_READ_WRITE)

    # ------------------------------------------------------- budgets
    def hold_gathered(self, conn: Connection, size: int) -> bool:
        """Count ``size`` more bytes gathered for ``conn``; False if they do not fit in the gathering budget.

        The accounting of gathered bytes is here and in :meth:`release_gathered`
        alone.  When the budget is spent, room is made rather than ``conn``
        (which is sending) refused: first gathered requests that have sent
        nothing for _GATHER_STALLED give it up, the longest stalled first; then,
        if ``conn``'s user (peer uid; http_listen's connections are one) holds
        less than half of the budget, the requests of a user holding more than
        half do, even while they trickle in: one user can use the whole budget
        while nobody else needs it, but never keep others from their half.
        """
        budget = _GATHER_BUDGET_FRAMES * self.serving.config.max_frame
        while self.gathered + size > budget:
            gathering = [other for other in self.by_fd.values()
                         if other.inbuf is not None and other.state == PARTIAL and other is not conn]
            now = self.serving.now
            stalled = min(gathering, key=lambda other: other.last_active, default=None)
            if stalled is not None and now - stalled.last_active >= _GATHER_STALLED:
                why = f"its request stalled for {now - stalled.last_active:.1f}s"
                told = f"request stalled for {now - stalled.last_active:.1f}s"
            else:
                stalled = over_half(gathering, self._gathered_by_uid, conn.uid, budget)
                if stalled is None:
                    return False
                why = f"uid {stalled.uid} holds more than half of it"
                told = "request incomplete while this user held more than half of the room for requests arriving " \
                       "in pieces"
            log.info("closing connection %d: %s while the gathering budget (%d bytes) was needed",
                     stalled.conn_id, why, budget)
            self.fail(stalled, Overloaded(
                f"{told}, and others needed the room it held; send a request without pausing, or retry"))
        self.gathered += size
        self._gathered_by_uid[conn.uid] = self._gathered_by_uid.get(conn.uid, 0) + size
        return True

    def release_gathered(self, conn: Connection) -> None:
        if conn.inbuf is not None:
            self.gathered -= len(conn.inbuf)
            _take_from(self._gathered_by_uid, conn.uid, len(conn.inbuf))
            conn.inbuf = None

    def hold_reply(self, conn: Connection, rest: memoryview) -> str | None:
        """Keep ``rest`` of a reply to write as ``conn``'s client takes it; else the limit it would break.

        The accounting of bytes held for slow readers is here and in
        :meth:`release_reply` alone.  A connection holds one reply at most:
        while it is written, the connection's next requests wait in its socket
        (backpressure).
        """
        config = self.serving.config
        size = rest.nbytes
        if size > config.max_reply_buffer_per_connection:
            return f"max_reply_buffer_per_connection ({config.max_reply_buffer_per_connection} bytes)"
        while self.held_replies + size > config.max_reply_buffer:
            # A user holding more than half for slow readers gives way to one holding less (its
            # replies would be cut off like this one otherwise): nobody is kept from their half.
            hog = over_half([other for other in self.by_fd.values() if other.held and other is not conn],
                            self._held_by_uid, conn.uid, config.max_reply_buffer)
            if hog is None:
                return (f"max_reply_buffer ({config.max_reply_buffer} bytes, "
                        f"{self.held_replies} held for other slow readers)")
            self.throttle.warning("dropping the rest of a %d-byte reply for connection %d: uid %d holds more than "
                                  "half of max_reply_buffer (%d bytes) while another user needs room",
                                  hog.held, hog.conn_id, hog.uid, config.max_reply_buffer,
                                  cause=("reply over half", hog.uid))
            self.close(hog)
        conn.outbuf, conn.held = rest, size
        self.held_replies += size
        self._held_by_uid[conn.uid] = self._held_by_uid.get(conn.uid, 0) + size
        return None

    def release_reply(self, conn: Connection) -> None:
        if conn.held:
            self.held_replies -= conn.held
            _take_from(self._held_by_uid, conn.uid, conn.held)
        conn.outbuf, conn.held = None, 0


def drain(sock: socket.socket) -> None:
    """Read what the client sent and nobody will: closing a socket with unread input resets the
    connection, and the reply just written with it."""
    try:
        for _ in range(16):
            if not sock.recv(65536, socket.MSG_DONTWAIT):
                break
    except OSError:
        pass


def over_half(holders: list[Connection], held_by_uid: dict[int, int], uid: int, budget: int,
              ) -> Connection | None:
    """Among ``holders``, the longest-quiet one of a user holding more than half of ``budget``, if ``uid``
    holds less than half (so that the newcomer's user is owed room); else None."""
    if held_by_uid.get(uid, 0) >= budget // 2:
        return None
    hogs = [other for other in holders if held_by_uid.get(other.uid, 0) > budget // 2 and other.uid != uid]
    return min(hogs, key=lambda other: other.last_active, default=None)


def _take_from(counts: dict[int, int], key: int, amount: int) -> None:
    """Subtract ``amount`` from ``counts[key]``, forgetting keys that reach zero (the dict stays small)."""
    left = counts.get(key, 0) - amount
    if left > 0:
        counts[key] = left
    else:
        counts.pop(key, None)
