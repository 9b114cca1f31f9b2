"""The channel between the master and one worker: a SOCK_SEQPACKET socket pair.

The master owns every client connection.  When a connection has a complete
request waiting, the master hands the connection's file descriptor to an idle
worker (SCM_RIGHTS); the worker reads that one request, replies on the
connection, closes its copy of the descriptor and reports back.  Idle and
slow connections therefore never occupy a worker.

Messages are tiny fixed-format packets (one message per packet, so no framing):

    master -> worker   SERVE conn_id (+ the connection's fd)
    worker -> master   READY pid | DONE conn_id close_flag | FAILED utf-8 text
                       | MEMORY uss pss rss (bytes, measured once, just after READY)
"""

from __future__ import annotations

import socket
import struct

SERVE = b"S"
READY = b"R"
DONE = b"D"
FAILED = b"F"
MEMORY = b"M"

_U32 = struct.Struct("!I")
_DONE = struct.Struct("!IB")
_MEMORY = struct.Struct("!QQQ")
_MAX_MESSAGE = 4096


def channel_pair() -> tuple[socket.socket, socket.socket]:
    """A connected (master end, worker end) pair."""
    return socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)


def send_serve(channel: socket.socket, conn_id: int, fd: int) -> None:
    socket.send_fds(channel, [SERVE + _U32.pack(conn_id)], [fd])


def receive_command(channel: socket.socket) -> tuple[bytes, int, int] | None:
    """Block for the master's next command: ``(op, conn_id, fd)``, or None when the master closed the channel."""
    data, fds, _flags, _addr = socket.recv_fds(channel, 64, 1)
    if not data:
        for fd in fds:
            socket.close(fd)
        return None
    if data[:1] != SERVE or len(fds) != 1:
        for fd in fds:
            socket.close(fd)
        raise RuntimeError(f"unexpected message from the master: {data!r}")
    return SERVE, _U32.unpack_from(data, 1)[0], fds[0]


def send_ready(channel: socket.socket, pid: int) -> None:
    channel.send(READY + _U32.pack(pid))


def send_done(channel: socket.socket, conn_id: int, close: bool) -> None:
    channel.send(DONE + _DONE.pack(conn_id, 1 if close else 0))


def send_memory(channel: socket.socket, uss: int, pss: int, rss: int) -> None:
    channel.send(MEMORY + _MEMORY.pack(uss, pss, rss))


def send_failed(channel: socket.socket, message: str) -> None:
    channel.send(FAILED + message.encode("utf-8", "replace")[: _MAX_MESSAGE - 1])


def receive_report(channel: socket.socket) -> tuple[bytes, object] | None:
    """Read one worker report without blocking.

    Returns ``(READY, pid)``, ``(DONE, (conn_id, close))``, ``(FAILED, text)``,
    ``(MEMORY, (uss, pss, rss))``,
    None when nothing is waiting, or ``(b"", None)`` when the worker's end closed.
    """
    try:
        data = channel.recv(_MAX_MESSAGE, socket.MSG_DONTWAIT)
    except BlockingIOError:
        return None
    except OSError:
        return b"", None
    if not data:
        return b"", None
    op = data[:1]
    if op == DONE:
        conn_id, close = _DONE.unpack_from(data, 1)
        return DONE, (conn_id, bool(close))
    if op == READY:
        return READY, _U32.unpack_from(data, 1)[0]
    if op == FAILED:
        return FAILED, data[1:].decode("utf-8", "replace")
    if op == MEMORY:
        return MEMORY, _MEMORY.unpack_from(data, 1)
    raise RuntimeError(f"unexpected report from a worker: {data!r}")
