"""Letting connections in: accept, peer checks, refusals, and room within the descriptor budget.

A new connection is checked before it joins the table: its peer's
credentials against allow_uids/allow_gids (a refused peer is answered in the
protocol it speaks, from a small pen outside the table), then room: at most
max_connections in all and max_connections_per_uid per user, fewer where the
open-file limit leaves less room.  Room is made by closing the longest-idle
connection of the user holding the most; a controller (root, the daemon's user,
control_uids) may pass the limits by a few, so that expertctl works when every
connection is busy.  Out of descriptors altogether, a spare one, given up for a
moment, lets a waiting client be told so instead of hanging.

State owned here: the refused peers awaited (the pen), the descriptor budget
(the open-file limit, the descriptors open besides connections, the spare
descriptor), and whether accepting is paused.
"""

from __future__ import annotations

import errno
import logging
import os
import resource
import select
import socket
from collections import OrderedDict

from expertd import accesslog, http
from expertd.access import NO_PEER, peer_credentials, peer_groups
from expertd.connections import ET_READ, IDLE, Connection, ConnectionTable, drain
from expertd.errors import AccessDenied, Overloaded, RemoteError
from expertd.framing import refusal_reply, undecided
from expertd.logs import Throttle
from expertd.serving import Serving

log = logging.getLogger("expertd.master")

PEEK_SIZE = 4096
# Plain ints: socket's flags are enum.IntFlag members, and ``|`` on those runs Python code.
PEEK_NOW = int(socket.MSG_PEEK) | int(socket.MSG_DONTWAIT)
# A peer refused by allow_uids is answered in the protocol its first bytes show; they are awaited this
# long at most, for this many peers at once (past that, or then, the refusal goes out as a msgpack frame).
_REFUSAL_WAIT = 0.2
_REFUSAL_PEN = 32
# Connections that root and the daemon's own user (and control_uids) may hold past the connection limits
# when nothing idle can make room: expertctl keeps working when every connection is busy.
_CONTROL_RESERVE = 4
# Descriptors kept free beyond those counted (/proc reads, log files, a reload's imports, sd_notify).
_FD_MARGIN = 24
# A connection that has not sent its first request is not closed for room until this long after accept:
# its client is about to send it (and would not know to send it again on a new connection).
_FRESH_GRACE = 1.0


class Acceptor:
    """Accepts on the listeners, refuses who must be refused, and keeps the connection count in bounds."""

    def __init__(self, serving: Serving, table: ConnectionTable, epoll: select.epoll, throttle: Throttle,
                 pool: object) -> None:
        self.serving = serving
        self.table = table
        self.epoll = epoll
        self.throttle = throttle
        self.pool = pool  # (only its worker and channel counts: descriptors they hold)
        self.listeners: list[socket.socket] = []  # set by the master once bound, and emptied when it stops
        # Peers refused by allow_uids, by fd: (socket, until when their first bytes are awaited, refusal).
        self.refusing: dict[int, tuple[socket.socket, float, AccessDenied]] = {}
        self.paused_until = 0.0
        self.spare_fd: int | None = None  # given up for a moment to answer clients when out of descriptors
        self.fd_limit = 1 << 20
        self.fd_base = 0  # descriptors open before the first worker and connection

    # --------------------------------------------------------------- accept
    def accept(self, listener: socket.socket, tcp: bool) -> None:
        access = self.serving.access()
        for _ in range(256):
            try:
                sock, _addr = listener.accept()
            except BlockingIOError:
                return
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE) and self._accept_without_descriptors(listener, tcp, exc):
                    continue
                return
            if tcp:
                pid = uid = gid = NO_PEER
                groups: frozenset[int] = frozenset()
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # replies are whole: send at once
            else:
                try:
                    pid, uid, gid = peer_credentials(sock)
                except OSError:
                    sock.close()
                    continue
                # Supplementary groups as the kernel recorded them at connect (never looked up later by
                # pid, which another process may have by then); read only when a gid list is set.
                groups = peer_groups(sock) if access.uses_groups else frozenset()
                if not access.allows(uid, gid, groups):
                    self.throttle.warning("refused a connection from uid %d (pid %d): not in allow_uids or "
                                          "allow_gids", uid, pid, cause=("refused", uid))
                    self._refuse_peer(sock, AccessDenied(
                        f"uid {uid} may not use this expertd; ask for it to be added to allow_uids or allow_gids"))
                    continue
            if not self._make_room(uid, gid, groups):
                _answer_and_close(sock, Overloaded(
                    "the daemon holds as many connections as it may, none of them idle; retry shortly"),
                    b"GET " if tcp else peek_now(sock))
                continue
            # The descriptor stays blocking: every read and write of the master passes
            # MSG_DONTWAIT instead, and the file's blocking mode (shared with the worker it
            # is handed to) is what lets a lingering worker wait in a plain read. No Python
            # timeout either (an expert module may have set a default one): with a timeout,
            # Python polls before each call, MSG_DONTWAIT or not.
            sock.settimeout(None)
            self.table.add(sock, tcp=tcp, uid=uid, gid=gid, pid=pid, groups=groups)

    def adopt(self, fd: int, pid: int) -> Connection | None:
        """A connection a worker made (ipc HELP: one end of a socket pair), as if accepted; None: no room."""
        sock = socket.socket(fileno=fd)
        if len(self.table) >= self.connection_limit():
            sock.close()  # (declined: the worker that asked runs the request itself)
            return None
        sock.settimeout(None)  # (blocking, as accepted ones: see accept)
        return self.table.add(sock, tcp=False, uid=os.getuid(), gid=os.getgid(), pid=pid, groups=frozenset())

    def _accept_without_descriptors(self, listener: socket.socket, tcp: bool, exc: OSError) -> bool:
        """Out of descriptors: make room, or answer a waiting client with overloaded (spare descriptor).

        Something took descriptors the budget did not count (an expert module
        that keeps files open in the master, imported by a reload): the count
        is corrected, and idle connections past the corrected limit are closed.
        If none can be, a client left in the backlog would hang after connect:
        the spare descriptor, given up for a moment, lets the master accept it
        and answer overloaded.  Returns whether accepting goes on; else accepts
        pause for a second (level-triggered, the listener would wake the loop
        at once, for ever).
        """
        self.throttle.error("cannot accept connections: %s, with %d open (raise the open-file limit or lower "
                            "max_connections)", exc.strerror, len(self.table))
        if exc.errno == errno.EMFILE:
            # Every descriptor is in use (the limit may have been lowered: prlimit): what is not a
            # connection, a refused peer or a channel is the base.
            self.fd_limit = file_limit()
            self.fd_base = max(self.fd_base, self.fd_limit - self._counted())
            limit = self.connection_limit()
            freed = False
            while len(self.table) >= limit and self.evict_for_room():
                freed = True
            if freed:
                return True
        sock = None
        if self.spare_fd is not None:
            os.close(self.spare_fd)
            try:
                sock, _addr = listener.accept()
            except OSError:
                pass
            if sock is not None:
                _answer_and_close(sock, Overloaded("the daemon is out of file descriptors; retry shortly"),
                                  b"GET " if tcp else peek_now(sock))
            self.spare_fd = open_spare()
        if sock is not None and self.spare_fd is not None:
            return True
        if self.spare_fd is None:
            if not self.paused_until:
                for paused in self.listeners:
                    self.epoll.unregister(paused.fileno())
            self.paused_until = self.serving.now + 1.0
        return False

    def resume_if_due(self, now: float) -> None:
        """Accept again after a pause for want of descriptors."""
        if self.paused_until and now >= self.paused_until:
            self.paused_until = 0.0
            for listener in self.listeners:
                self.epoll.register(listener.fileno(), select.EPOLLIN)

    # ------------------------------------------------------- refused peers
    def _refuse_peer(self, sock: socket.socket, refusal: AccessDenied) -> None:
        """Answer a refused peer and close: at once if its first bytes say its protocol, else soon.

        It has not necessarily sent anything yet, and the refusal should go out in
        the protocol it speaks (an HTTP client reads a msgpack frame as garbage).
        So it waits, up to _REFUSAL_WAIT, outside the connection table (it never
        counts against max_connections), with at most _REFUSAL_PEN others;
        past either bound it gets the msgpack frame, which the client library
        reports as AccessDenied.
        """
        head = peek_now(sock)
        if head is not None and undecided(head) and len(self.refusing) < _REFUSAL_PEN:
            sock.settimeout(None)
            self.refusing[sock.fileno()] = (sock, self.serving.now + _REFUSAL_WAIT, refusal)
            self.epoll.register(sock.fileno(), ET_READ)
            return
        _answer_and_close(sock, refusal, head)

    def settle(self, fd: int, expired: bool) -> None:
        """A refused peer sent something (or its wait is over): answer it and close."""
        sock, _until, refusal = self.refusing[fd]
        head = peek_now(sock)
        if not expired and head is not None and undecided(head):
            return
        del self.refusing[fd]
        try:
            self.epoll.unregister(fd)
        except (OSError, ValueError):
            pass
        _answer_and_close(sock, refusal, head)

    def expire(self, now: float) -> None:
        for fd in [fd for fd, (_sock, until, _error) in self.refusing.items() if now >= until]:
            self.settle(fd, expired=True)

    def next_deadline(self) -> float | None:
        if not self.refusing:
            return None
        return min(until for _sock, until, _error in self.refusing.values())

    def settle_all(self) -> None:
        for fd in list(self.refusing):
            self.settle(fd, expired=True)

    # --------------------------------------------------------------- room
    def _counted(self) -> int:
        """Descriptors counted apart from the base: connections, refused peers, worker channels."""
        return len(self.table) + len(self.refusing) + self.pool.channel_count()  # type: ignore[attr-defined]

    def count_base_descriptors(self) -> None:
        """Count again the descriptors open besides connections, refused peers and channels."""
        count = open_descriptors()
        if count is not None:
            self.fd_base = count - self._counted()

    def connection_limit(self) -> int:
        """max_connections, or fewer where the open-file limit leaves less room.

        Kept free: what was open before serving, a channel per worker (twice the
        pool: a reload runs two generations), a channel pair being made, the
        refused peers awaited, the control reserve and a margin.
        """
        config = self.serving.config
        workers = max(config.workers, len(self.pool.workers))  # type: ignore[attr-defined]
        room = (self.fd_limit - self.fd_base - 2 * workers - 2 - _REFUSAL_PEN - _CONTROL_RESERVE - _FD_MARGIN)
        return max(1, min(config.max_connections, room))

    def per_uid_limit(self, limit: int) -> int:
        per_uid = self.serving.config.max_connections_per_uid
        return max(1, limit // 2) if per_uid is None else min(per_uid, limit)

    def _make_room(self, uid: int, gid: int, groups: frozenset[int]) -> bool:
        """Whether a new connection of ``uid`` may be held, after closing an idle one if it must."""
        limit = self.connection_limit()
        per_uid = self.per_uid_limit(limit)
        bucket = self.table.by_uid.get(uid)
        held = len(bucket) if bucket is not None else 0
        if held >= per_uid:
            if bucket is not None and self._evict_idle(bucket):
                self.throttle.warning("uid %d holds max_connections_per_uid (%d) connections: closing its "
                                      "longest-idle connection for each new one", uid, per_uid,
                                      cause=("per uid", uid))
            elif not self._may_overflow(uid, gid, groups, held, per_uid):
                self.throttle.warning("uid %d holds max_connections_per_uid (%d) connections, none of them idle: "
                                      "refusing its new ones (overloaded)", uid, per_uid, cause=("per uid", uid))
                return False
        if len(self.table) >= limit:
            if self.evict_for_room():
                self.throttle.warning("max_connections (%d) reached: closing the longest-idle connection of the "
                                      "user holding the most for each new one", limit, cause="max_connections")
            elif not self._may_overflow(uid, gid, groups, len(self.table), limit):
                self.throttle.warning("max_connections (%d) reached with no connection idle: refusing new "
                                      "connections (overloaded)", limit, cause="max_connections")
                return False
        return True

    def _may_overflow(self, uid: int, gid: int, groups: frozenset[int], held: int, limit: int) -> bool:
        """Whether a controller's connection may pass a limit, into the few kept for expertctl."""
        return (uid != NO_PEER and held < limit + _CONTROL_RESERVE
                and self.serving.access().controls(uid, gid, groups))

    def evict_for_room(self) -> bool:
        """Close one idle connection: the longest-idle of the user holding the most connections (then the next)."""
        for bucket in sorted(self.table.by_uid.values(), key=len, reverse=True):
            if self._evict_idle(bucket):
                return True
        return False

    def _evict_idle(self, bucket: OrderedDict[int, Connection]) -> bool:
        """Close the longest-idle connection in ``bucket``; False if none of them is idle.

        Its client sees the connection closed with no request in flight: the
        client library reconnects and sends its next request on a new one.  A
        connection whose next request has begun to arrive is not idle, nor is
        one that has not sent its first request yet, for _FRESH_GRACE.
        """
        victim = None
        now = self.serving.now
        fresh_since = now - _FRESH_GRACE
        for conn in bucket.values():
            if conn.state != IDLE or conn.unread or (conn.frame_size == 0 and conn.last_active > fresh_since):
                continue
            try:
                arrived = conn.sock.recv(1, PEEK_NOW)
            except BlockingIOError:
                arrived = b""
            except OSError:
                victim = conn
                break
            if arrived:
                self.table.recheck.append(conn)  # a request is arriving: the loop looks at it
                continue
            victim = conn
            break
        if victim is None:
            return False
        log.debug("closing connection %d of uid %d, idle for %.1fs, to make room", victim.conn_id, victim.uid,
                  now - victim.last_active)
        self.table.close(victim)
        return True


def peek_now(sock: socket.socket) -> bytes | None:
    """The first bytes waiting on a new connection: b"" if none yet, None if the peer is gone."""
    try:
        return sock.recv(PEEK_SIZE, PEEK_NOW) or None
    except BlockingIOError:
        return b""
    except OSError:
        return None


def _answer_and_close(sock: socket.socket, error: RemoteError, head: bytes | None) -> None:
    """Refuse a connection the master holds no record of: ``error`` in the protocol ``head`` shows, then close.

    What the client sent is read first, so that closing cannot reset the connection, reply and all.
    """
    if head is not None:
        error.request_id = accesslog.generated_id(accesslog.new_number())  # (refused before it has a serial)
        reply = refusal_reply(error, head)
        drain(sock)
        try:
            sock.send(reply, socket.MSG_DONTWAIT)
        except OSError:
            pass  # the client is gone or not reading: closing is all that is left
        if accesslog.LOG is not None:
            speaks_http = http.looks_like_http(head)
            accesslog.LOG.write(error.request_id or "-", accesslog.peer_of(sock), "http" if speaks_http else "msgpack",
                                None, error.code, accesslog.status_of(reply) if speaks_http else None, 0.0, len(head),
                                len(reply))
    sock.close()


def raise_file_limit() -> int:
    """Raise the soft open-file limit to the hard one; return the limit in force (logged if raised)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError) as exc:
            log.warning("cannot raise the open-file limit from %d to %d: %s", soft, hard, exc)
        else:
            log.info("raised the open-file limit from %d to %d", soft, hard)
    return file_limit()


def file_limit() -> int:
    """The soft open-file limit in force."""
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return soft if soft != resource.RLIM_INFINITY else 1 << 30


def open_descriptors() -> int | None:
    """How many descriptors this process has open (None if /proc cannot tell)."""
    try:
        return len(os.listdir("/proc/self/fd")) - 1  # (less the one listdir opened)
    except OSError:
        return None


def open_spare() -> int | None:
    """A descriptor to give up when out of them, to accept a client and answer it (None if none is free)."""
    try:
        return os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
