"""The channel between the master and one worker: a SOCK_SEQPACKET socket pair.

The master owns every client connection.  When a connection has a complete
request, the master hands the connection's file descriptor to an idle worker
(SCM_RIGHTS); the worker answers that one request on the connection, closes
its copy of the descriptor and reports back.  Idle and slow connections
therefore never occupy a worker.  When no worker is idle, the master may
hand a busy worker its next connection ahead: SERVE messages queue in the
channel, and a worker reads the next only after reporting the one in hand.

A request that arrived whole in the socket is read by the worker.  One that
arrived in pieces was gathered by the master, which sends it along: inside
the message when small, else in a memfd.  A reply the client is slow to take
goes back the same way, for the master to finish writing.  A worker reads
what the socket holds, so it may read more than it serves (a request behind
the one it answered, the start of one still arriving, a control request that
is the master's): those unread bytes go back with DONE, and the master treats
them as the start of the connection's input.

Calls of a batched expert may go to one worker together (BATCH: one
connection per member, each with its request whole in the socket or inside the
message, see :mod:`expertd.batching`); the worker answers each member on its
connection and reports a DONE per member, the last one carrying the
retirement.  A member never lingers.

A worker that finished a request while no other request waits may keep the
connection a moment ("linger", DONE with the LINGER flag) and serve the
connection's next request directly, without the master; the master takes it
back as soon as another request needs the worker, with SIGUSR2 rather than a
message, because a lingering worker waits in a blocking read of the client's
connection, not on this channel.  What the
master must still know about a lingering worker (is it serving, since when,
has it begun replying) is in the shared :mod:`expertd.scoreboard`.

Messages are tiny fixed-format packets (one message per packet, so no framing):

    master -> worker   SERVE conn_id how  (+ connection fd) (+ frame bytes | + memfd)
                       | BATCH count (conn_id how size)*count frames  (+ one fd per member)
    worker -> master   READY pid | DONE conn_id flags served (+ memfd of unsent reply bytes)
                       (+ memfd of unread request bytes)
                       | FAILED utf-8 text | MEMORY uss pss rss
                       | HELP (+ one end of a socket pair holding a whole request)

HELP is a worker running a pipeline asking for an idle worker to run part of
a stage (:mod:`expertd.worker_pipeline`): the master serves the socket pair's
end as a connection if a worker is idle now, and otherwise closes it at once
(the asking worker then runs that part itself).
"""

from __future__ import annotations

import os
import socket
import struct

SERVE = b"S"
BATCH = b"B"
READY = b"R"
DONE = b"D"
FAILED = b"F"
MEMORY = b"M"
HELP = b"H"

_FROM_SOCKET, _IN_MESSAGE, _IN_MEMFD = 0, 1, 2
_DONTWAIT = int(socket.MSG_DONTWAIT)
_SERVE = struct.Struct("!IB")
_SERVE_SIZE = 1 + _SERVE.size
_COUNT = struct.Struct("!H")
_MEMBER = struct.Struct("!IBI")  # conn_id, how, size of the frame inside the message (0: in the socket)
_U32 = struct.Struct("!I")
_DONE = struct.Struct("!IBI")
_DONE_SIZE = 1 + _DONE.size
_MEMORY = struct.Struct("!QQQ")
_CLOSE, _RETIRING, _UNSENT, _LINGER, _UNREAD = 1, 2, 4, 8, 16
_HTTP = 0x80  # in SERVE's ``how``: the connection speaks HTTP
_INT = struct.Struct("i")
_SOL_SOCKET, _SCM_RIGHTS = int(socket.SOL_SOCKET), int(socket.SCM_RIGHTS)
_MAX_MESSAGE = 4096
# Frames up to this size travel inside the SERVE message (the default socket buffer holds them).
MAX_INLINE = 64 * 1024


def channel_pair() -> tuple[socket.socket, socket.socket]:
    """A connected (master end, worker end) pair."""
    master_end, worker_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    master_end.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 2 * MAX_INLINE)
    return master_end, worker_end


def write_memfd(name: str, data: bytes | bytearray | memoryview) -> int:
    """A new memfd holding ``data`` (the caller closes it)."""
    return _to_memfd(name, data)


def read_memfd(fd: int) -> bytearray:
    """What memfd ``fd`` holds; closes it."""
    return _from_memfd(fd)


def _to_memfd(name: str, data: bytes | bytearray | memoryview) -> int:
    fd = os.memfd_create(name, os.MFD_CLOEXEC)
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]
    return fd


def _from_memfd(fd: int) -> bytearray:
    try:
        size = os.fstat(fd).st_size
        data = bytearray(size)
        view = memoryview(data)
        got = 0
        while got < size:
            chunk = os.pread(fd, size - got, got)
            if not chunk:
                break
            view[got : got + len(chunk)] = chunk
            got += len(chunk)
        return data
    finally:
        os.close(fd)


def send_serve(channel: socket.socket, conn_id: int, fd: int, frame: bytes | bytearray | None = None,
               speaks_http: bool = False) -> None:
    """Hand a connection to the worker.

    ``frame`` is the request when the master already read it (for msgpack, it
    may be followed by more of the connection's input); ``speaks_http`` says
    which protocol the connection speaks.
    """
    protocol_bit = _HTTP if speaks_http else 0
    if frame is None:  # the hot path: sendmsg itself (socket.send_fds builds an array and a list a call)
        channel.sendmsg([SERVE + _SERVE.pack(conn_id, _FROM_SOCKET | protocol_bit)],
                        [(_SOL_SOCKET, _SCM_RIGHTS, _INT.pack(fd))])
    elif len(frame) <= MAX_INLINE:
        socket.send_fds(channel, [SERVE + _SERVE.pack(conn_id, _IN_MESSAGE | protocol_bit), frame], [fd])
    else:
        memfd = _to_memfd("expertd-request", frame)
        try:
            socket.send_fds(channel, [SERVE + _SERVE.pack(conn_id, _IN_MEMFD | protocol_bit)], [fd, memfd])
        finally:
            os.close(memfd)


def send_batch(channel: socket.socket, members: list[tuple[int, int, bytes | bytearray | None, bool]]) -> None:
    """Hand the connections of one batch to the worker: ``(conn_id, fd, frame or None, speaks_http)`` each.

    Frames the master gathered travel inside the message; the caller keeps
    their total within :data:`MAX_INLINE` and the members within
    :data:`MAX_BATCH_FDS`.
    """
    parts: list[bytes | bytearray] = [BATCH + _COUNT.pack(len(members))]
    frames: list[bytes | bytearray] = []
    for conn_id, _fd, frame, speaks_http in members:
        parts.append(_MEMBER.pack(conn_id, (_HTTP if speaks_http else 0) | (_IN_MESSAGE if frame else _FROM_SOCKET),
                                  len(frame) if frame else 0))
        if frame:
            frames.append(frame)
    socket.send_fds(channel, parts + frames, [fd for _conn_id, fd, _frame, _http in members])


# The most members one BATCH carries: one descriptor each, and the kernel passes at most 253 in one message.
MAX_BATCH_FDS = 250
# Room for this many descriptors in a message's ancillary data.
_FDS_SPACE = socket.CMSG_SPACE(MAX_BATCH_FDS * struct.calcsize("i"))
_REPORT_FDS_SPACE = socket.CMSG_SPACE(2 * struct.calcsize("i"))  # (a report carries at most two memfds)


def _receive(channel: socket.socket, size: int, flags: int = 0) -> tuple[bytes, list[int]]:
    """One message and the descriptors it carries (socket.recv_fds without its per-call set-up)."""
    data, ancillary, _flags, _addr = channel.recvmsg(size, _FDS_SPACE, flags)
    return data, _descriptors(ancillary)


def _descriptors(ancillary: list[tuple[int, int, bytes]]) -> list[int]:
    fds: list[int] = []
    for level, kind, payload in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds += [_INT.unpack_from(payload, i)[0] for i in range(0, len(payload) - _INT.size + 1, _INT.size)]
    return fds


def receive_command(channel: socket.socket) -> tuple[int, int, bytearray | None, bool] | list | None:
    """Block for the next connection: ``(conn_id, fd, frame or None, speaks_http)``.

    A list of those for a batch; None when the master closed the channel.
    """
    data, ancillary, _flags, _addr = channel.recvmsg(_MAX_MESSAGE + MAX_INLINE, _FDS_SPACE)
    if len(ancillary) == 1 and len(data) == _SERVE_SIZE and data[:1] == SERVE:
        # The hot path: a connection whose request waits in its socket, and its one descriptor.
        level, kind, payload = ancillary[0]
        conn_id, how = _SERVE.unpack_from(data, 1)
        if level == _SOL_SOCKET and kind == _SCM_RIGHTS and len(payload) == _INT.size and how & ~_HTTP == _FROM_SOCKET:
            return conn_id, _INT.unpack(payload)[0], None, bool(how & _HTTP)
    fds = _descriptors(ancillary)
    if data[:1] == BATCH and fds:
        return _batch(data, fds)
    if not data or data[:1] != SERVE or not fds:
        for fd in fds:
            os.close(fd)
        if not data:
            return None
        raise RuntimeError(f"unexpected message from the master: {data[:16]!r}")
    conn_id, how = _SERVE.unpack_from(data, 1)
    speaks_http, how = bool(how & _HTTP), how & ~_HTTP
    frame = None
    if how == _IN_MESSAGE:
        frame = bytearray(data[1 + _SERVE.size :])
    elif how == _IN_MEMFD:
        frame = _from_memfd(fds[1])
    return conn_id, fds[0], frame, speaks_http


def _batch(data: bytes, fds: list[int]) -> list[tuple[int, int, bytearray | None, bool]]:
    (count,) = _COUNT.unpack_from(data, 1)
    if count != len(fds):
        for fd in fds:
            os.close(fd)
        raise RuntimeError(f"a batch of {count} members came with {len(fds)} descriptors")
    members = []
    offset = 1 + _COUNT.size
    inline = offset + count * _MEMBER.size
    for fd in fds:
        conn_id, how, size = _MEMBER.unpack_from(data, offset)
        offset += _MEMBER.size
        frame = None
        if how & ~_HTTP == _IN_MESSAGE:
            frame = bytearray(data[inline:inline + size])
            inline += size
        members.append((conn_id, fd, frame, bool(how & _HTTP)))
    return members


def send_ready(channel: socket.socket, pid: int) -> None:
    channel.send(READY + _U32.pack(pid))


def send_done(channel: socket.socket, conn_id: int, close: bool, retiring: bool = False,
              unsent: bytes | memoryview | None = None, linger: bool = False, served: int = 1,
              unread: bytes | None = None) -> None:
    """Report finished requests on a connection (``served`` of them).

    ``retiring``: this worker exits now and takes no more.  ``unsent``: the
    part of the reply the client has not taken yet, for the master to write.
    ``linger``: the worker keeps the connection for its next request, until
    it hands it back with another DONE (or is reclaimed).  ``unread``: bytes
    the worker read from the connection but did not serve.
    """
    flags = ((_CLOSE if close else 0) | (_RETIRING if retiring else 0) | (_UNSENT if unsent else 0)
             | (_LINGER if linger else 0) | (_UNREAD if unread else 0))
    message = DONE + _DONE.pack(conn_id, flags, served)
    if not unsent and not unread:
        channel.send(message)
        return
    memfds: list[int] = []
    try:
        for name, data in (("expertd-reply", unsent), ("expertd-unread", unread)):
            if data:
                memfds.append(_to_memfd(name, data))
        socket.send_fds(channel, [message], memfds)
    finally:
        for memfd in memfds:
            os.close(memfd)


def send_help(channel: socket.socket, fd: int) -> None:
    """Offer the master a connection (one end of a socket pair) whose request an idle worker may serve."""
    socket.send_fds(channel, [HELP], [fd])


def send_memory(channel: socket.socket, uss: int, pss: int, rss: int) -> None:
    channel.send(MEMORY + _MEMORY.pack(uss, pss, rss))


def send_failed(channel: socket.socket, message: str) -> None:
    channel.send(FAILED + message.encode("utf-8", "replace")[: _MAX_MESSAGE - 1])


def receive_nowait(channel: socket.socket, size: int) -> tuple[bytes, list[int]] | None:
    """One message and its descriptors without blocking; None if none waits, ``(b"", [])`` at the channel's end."""
    try:
        data, fds = _receive(channel, size, _DONTWAIT)
    except BlockingIOError:
        return None
    except OSError:
        return b"", []
    if not data:
        for fd in fds:
            os.close(fd)
        return b"", []
    return data, fds


def receive_report(channel: socket.socket) -> tuple[bytes, object] | None:
    """Read one worker report without blocking.

    Returns ``(READY, pid)``, ``(DONE, (conn_id, close, retiring, linger,
    served, unsent bytes or None, unread bytes or None))``, ``(FAILED, text)``, ``(MEMORY, (uss,
    pss, rss))``, None when nothing is waiting, or ``(b"", None)`` when the
    worker's end closed.
    """
    try:
        data, ancillary, _flags, _addr = channel.recvmsg(_MAX_MESSAGE, _REPORT_FDS_SPACE, _DONTWAIT)
    except BlockingIOError:
        return None
    except OSError:
        return b"", None
    if not ancillary and data[:1] == DONE and len(data) == _DONE_SIZE:
        # The hot path: a DONE with nothing to carry (one per handed-over request).
        conn_id, flags, served = _DONE.unpack_from(data, 1)
        if not flags & (_UNSENT | _UNREAD):
            return DONE, (conn_id, bool(flags & _CLOSE), bool(flags & _RETIRING), bool(flags & _LINGER), served,
                          None, None)
    fds = _descriptors(ancillary)
    if not data:
        for fd in fds:
            os.close(fd)
        return b"", None
    try:
        return _report(data, fds)
    except struct.error:  # a short message: not from a worker's code path (an expert writing to fd it should not)
        raise RuntimeError(f"malformed report from a worker: {data[:16]!r}") from None


def _report(data: bytes, fds: list[int]) -> tuple[bytes, object]:
    op = data[:1]
    if op == DONE:
        conn_id, flags, served = _DONE.unpack_from(data, 1)
        memfds = iter(fds)
        unsent_fd = next(memfds, None) if flags & _UNSENT else None
        unread_fd = next(memfds, None) if flags & _UNREAD else None
        for fd in memfds:
            os.close(fd)
        unsent = _from_memfd(unsent_fd) if unsent_fd is not None else None
        unread = bytes(_from_memfd(unread_fd)) if unread_fd is not None else None
        # A descriptor the kernel could not pass (the master out of descriptors) loses bytes of
        # the connection's stream: it must then be closed, never carried on with a gap.
        lost = bool((flags & _UNSENT and unsent is None) or (flags & _UNREAD and unread is None))
        return DONE, (conn_id, bool(flags & _CLOSE) or lost, bool(flags & _RETIRING), bool(flags & _LINGER), served,
                      unsent, unread)
    if op == HELP:
        for fd in fds[1:]:
            os.close(fd)
        if not fds:
            raise RuntimeError("a HELP report from a worker came without its descriptor")
        return HELP, fds[0]
    for fd in fds:
        os.close(fd)
    if op == READY:
        return READY, _U32.unpack_from(data, 1)[0]
    if op == FAILED:
        return FAILED, data[1:].decode("utf-8", "replace")
    if op == MEMORY:
        return MEMORY, _MEMORY.unpack_from(data, 1)
    raise RuntimeError(f"unexpected report from a worker: {data[:16]!r}")
