"""The access log (``access_log``) and the JSON log format (``log_format = json``).

State: this process's open access log, :data:`LOG` (None when ``access_log``
is empty).  The master opens it at start-up; every generation's parent and
worker inherits it across fork and writes its own lines: each line is one
``write()`` on an ``O_APPEND`` descriptor, so the lines of many processes never
interleave (appends to a regular file are atomic) and nothing is buffered that
a killed worker could lose or a forked child could write twice.  A line is
written only after its reply went out, and only when the log is on: the
callers test ``LOG`` (one attribute) before building anything.

Request ids: an HTTP request keeps the caller's ``X-Request-Id`` (when short and
printable, see :func:`request_id_of`) or gets a generated one; a
msgpack frame's id is unique only on its connection, so its log id is
``CONNECTION-FRAME`` (the master's connection serial, then the frame's id).
Error replies carry the id (``request_id`` in the error map; the client sets
``RemoteError.request_id``), and the error log's lines about a request name it.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import struct
import time
from typing import Any

from expertd.logfile import also_reopen, open_log_fd

LOG: AccessLog | None = None  # this process's access log (see open_access_log)

_MAX_REQUEST_ID = 64  # the longest X-Request-Id kept
_MAX_TARGET = 200  # an expert's name comes from the client: a line holds at most this much of it


class AccessLog:
    """An open access log: its path (``-``: stderr), format and descriptor."""

    def __init__(self, path: str, json_format: bool) -> None:
        self.path = path
        self.json = json_format
        if path == "-":
            # (The same plain write on stderr: a pipe whose reader lags blocks the writer, see docs/logging.md.)
            self.fd = 2
        else:
            self.fd = open_log_fd(path)

    def reopen(self) -> None:
        """Open the file at the path afresh (after logrotate moved it): OSError, and the old one kept, if unsafe."""
        if self.path == "-":
            return
        fresh = open_log_fd(self.path)
        try:
            os.dup2(fresh, self.fd, inheritable=False)  # (the same number: nothing holding it needs telling)
        finally:
            os.close(fresh)

    def write(self, request_id: str, peer: str, protocol: str, target: str | None, code: str,
              status: int | None, seconds: float, bytes_in: int, bytes_out: int) -> None:
        """One request's line; a failing write is dropped (the log must never fail a request)."""
        line = format_line(time.time(), request_id, peer, protocol, target, code, status, seconds, bytes_in,
                           bytes_out, self.json)
        try:
            os.write(self.fd, line.encode("utf-8", "replace"))
        except OSError:
            pass


def open_access_log(path: str, log_format: str) -> AccessLog | None:
    """Open the access log at ``path`` (empty: none) as this process's :data:`LOG`; OSError (why) if unsafe."""
    global LOG
    LOG = AccessLog(os.path.abspath(path) if path not in ("", "-") else path, log_format == "json") if path else None
    if LOG is not None:
        also_reopen(reopen_access_log)
    return LOG


def reopen_access_log() -> None:
    """SIGUSR1: reopen the access log, if there is one (OSError if it cannot be opened safely)."""
    if LOG is not None:
        LOG.reopen()


def iso_time(when: float) -> str:
    """``when`` (seconds since the epoch) as ISO 8601 in UTC with milliseconds: 2026-11-26T10:00:00.123Z."""
    millis = int(when * 1000) % 1000
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(when)) + f".{millis:03d}Z"


def format_line(when: float, request_id: str, peer: str, protocol: str, target: str | None, code: str,
                status: int | None, seconds: float, bytes_in: int, bytes_out: int, json_format: bool) -> str:
    """One access-log line, newline included (pure: the table tests call it)."""
    target = target[:_MAX_TARGET] if target else target
    duration_ms = round(seconds * 1000, 3)
    if json_format:
        return json.dumps({
            "time": iso_time(when), "request_id": request_id, "peer": peer, "protocol": protocol,
            "expert": target, "code": code, "status": status, "duration_ms": duration_ms,
            "bytes_in": bytes_in, "bytes_out": bytes_out,
        }, ensure_ascii=True) + "\n"
    # Space-separated fields, "-" for none: every field is one word (names from clients are made so).
    return (f"{iso_time(when)} {_word(request_id)} {peer} {protocol} {_word(target)} {code} "
            f"{status if status is not None else '-'} {duration_ms:.3f}ms {bytes_in} {bytes_out}\n")


def _word(text: str | None) -> str:
    if not text:
        return "-"
    if text.isprintable() and " " not in text:
        return text
    return "".join(c if c.isprintable() and not c.isspace() else "?" for c in text)


def target_of(route: str, expert: str | None) -> str:
    """What the access log names for an HTTP request: its route, and the expert or pipeline (``/call/echo``)."""
    return f"/{route}/{expert}" if expert is not None else f"/{route}"


def status_of(response: bytes | bytearray | memoryview) -> int | None:
    """The status code of a response written here (``HTTP/1.1 200 ...``)."""
    try:
        return int(bytes(response[9:12]))
    except ValueError:
        return None


def request_id_of(value: bytes) -> str | None:
    """The caller's X-Request-Id if it is one to keep: 1 to 64 printable ASCII characters, no spaces; else None
    (the daemon then makes its own: a header's value goes into log lines, so nothing else is taken)."""
    if 0 < len(value) <= _MAX_REQUEST_ID and all(0x21 <= byte <= 0x7E for byte in value):
        return value.decode("ascii")
    return None


def msgpack_id(conn_id: int, frame_id: int) -> str:
    """A msgpack request's log id: the connection's serial, then the frame's id (unique on its connection)."""
    return f"{conn_id}-{frame_id}"


def generated_id(number: int) -> str:
    """An HTTP request's id when its caller sent none: a 32-bit number, in hex (the scoreboard carries it)."""
    return f"{number:08x}"


def new_number() -> int:
    """A random non-zero 32-bit number for :func:`generated_id`."""
    return int.from_bytes(os.urandom(4), "little") or 1


def peer_of(sock: Any) -> str:
    """Who is at the other end of a connection: ``uid=U,pid=P`` on a Unix socket (SO_PEERCRED), else HOST:PORT."""
    try:
        # The kernel's word, not ``sock.family``: a worker wraps every connection handed to it as AF_UNIX
        # (one object type, nothing asked per request), http_listen's TCP ones too.  Asked only when the
        # access log is on, one system call a line.
        if sock.getsockopt(socket.SOL_SOCKET, socket.SO_DOMAIN) == socket.AF_UNIX:
            pid, uid, _gid = _CREDENTIALS.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                                 _CREDENTIALS.size))
            return unix_peer(uid, pid)
        return tcp_peer(sock.getpeername())
    except (OSError, ValueError, struct.error):
        return "-"


def unix_peer(uid: int, pid: int) -> str:
    return f"uid={uid},pid={pid}"


def tcp_peer(address: Any) -> str:
    try:
        host, port = address[0], address[1]
    except (TypeError, IndexError):
        return "-"
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


_CREDENTIALS = struct.Struct("3i")


class JsonFormatter(logging.Formatter):
    """``log_format = json`` for the error log: one object a line, keys time, level, pid, logger, message
    (and request_id, exception when the record has them)."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": iso_time(record.created), "level": record.levelname.lower(), "pid": record.process,
            "logger": record.name, "message": record.getMessage(),
        }
        request_id = getattr(record, "request_id", None)
        if request_id is not None:
            entry["request_id"] = request_id
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=True)
