"""A batch in a worker: many connections' calls of one batched expert, answered by one call.

:class:`BatchServing` is mixed into :class:`expertd.worker.Worker`.  The master
hands over a batch (:func:`expertd.ipc.send_batch`): the connections of calls
of one batched expert, msgpack and HTTP alike, each request whole in its
socket or inside the message.  The worker reads each member's one request (and
nothing behind it), calls the expert once for all of them
(:func:`expertd.batches.call_batch`), writes each member's reply on its own
connection and reports a DONE per member as soon as its reply is out, so that
its caller's connection goes back to the master at once.  A member never
lingers.  A member that cannot be read, or whose call does not fit, gets its
own error; the others are not held back.

It owns no state: it works with the Worker's (channel, scoreboard slot,
recorder, experts, timeouts) and its reading and answering methods.
"""

from __future__ import annotations

import logging
import socket
import time
from typing import TYPE_CHECKING, Any

from expertd import accesslog, http, ipc, protocol, stage_timer
from expertd.batches import call_batch
from expertd.calls import IN_HAND, _failure, _pack_result
from expertd.errors import BadRequest, ConnectionLost, RemoteError, RequestTimeout
from expertd.worker_http import HttpServing

log = logging.getLogger("expertd.worker")


class _Member:
    """One caller of a batch, from its request to its reply."""

    __slots__ = ("bytes_in", "call", "close", "conn", "conn_id", "error", "log_id", "request", "request_id", "unread",
                 "unsent")

    def __init__(self, conn_id: int, conn: socket.socket) -> None:
        self.conn_id = conn_id
        self.conn = conn
        self.request_id = 0
        self.request: http.Request | None = None  # (HTTP members)
        self.call: tuple[list, dict] | None = None  # its arguments, once read and checked
        self.error: Any = None  # a RemoteError to answer with, or (response, keep_alive, code) for HTTP
        self.close = False  # the connection broke: nothing can be answered on it
        self.unread: bytes | None = None  # input read behind its request (goes back to the master)
        self.unsent: memoryview | None = None  # the part of its reply the client did not take in time
        self.log_id = "-"  # its request id in the logs (see expertd.accesslog), once read
        self.bytes_in = 0


class BatchServing(HttpServing):
    """Serving a batch (a mixin of :class:`expertd.worker.Worker`)."""

    channel: socket.socket

    if TYPE_CHECKING:  # the Worker's
        def _after_request(self) -> str | None: ...

    def _serve_batch(self, handed: list[tuple[int, int, bytearray | None, bool]]) -> str | None:
        """Answer every member of a batch; returns why this worker should retire, if it should."""
        if stage_timer.ALARM_AT[0]:
            stage_timer.off()  # (a pipeline's timer, left running for the next: a batch must not see SIGALRM)
        started = time.monotonic()
        members = [_Member(conn_id, socket.socket(fileno=fd)) for conn_id, fd, _frame, _http in handed]
        try:
            expert_name = ""
            for member, (_conn_id, _fd, frame, speaks_http) in zip(members, handed, strict=True):
                try:
                    if speaks_http:
                        name = self._read_http_member(member, frame, started)
                    else:
                        name = self._read_msgpack_member(member, frame)
                    if name is not None and name != (expert_name or name):
                        # (never sent by the master: it batches the calls of one expert)
                        member.call, member.error = None, BadRequest(f"a call of {name} in a batch of {expert_name}")
                    elif name is not None:
                        expert_name = name
                except (ConnectionLost, RequestTimeout, OSError) as exc:
                    self._throttle.info("closing connection: %s", exc)
                    member.close = True
                except RemoteError as exc:
                    member.error = exc
            callers = [member for member in members if member.call is not None]
            expert = self.experts.get(expert_name)
            self.board.begin(started, self._timeouts.get(expert_name, self.config.timeout),
                             callers[0].request_id if callers else 0, expert_name)
            if callers:
                IN_HAND[0], IN_HAND[1] = callers[0].log_id, None  # (an expert's failure line names the first)
                if expert is not None and expert.batched:
                    try:
                        results = call_batch(expert, [member.call for member in callers], _failure)  # type: ignore[misc]
                    except BaseException as exc:  # (call_batch catches the expert's own: this is a bug of ours)
                        results = [_failure(expert, *member.call, exc) for member in callers]  # type: ignore[misc]
                else:  # unknown here, or not batched here: the generation after this one's (a reload under way)
                    results = [_outcome(self._invoke, expert_name, *member.call) for member in callers]  # type: ignore[misc]
                for member, result in zip(callers, results, strict=True):
                    member.error = result if isinstance(result, RemoteError) else None
                    member.call = (result,) if member.error is None else None  # (the call's result, from here)
            elapsed = time.monotonic() - started
            retire = None
            for number, member in enumerate(members, 1):
                retire = self._reply(member, expert_name, elapsed) or retire
                member.conn.close()  # (before its DONE: the master may close the connection at once)
                last = number == len(members)
                # The DONE goes now: its caller's connection is the master's again, whatever the others wait
                # for.  The last one says whether this worker retires (as a single request's DONE does).
                ipc.send_done(self.channel, member.conn_id, member.close, unsent=member.unsent,
                              unread=member.unread, retiring=last and (retire is not None or self._stop_requested))
            return retire
        finally:
            for member in members:
                member.conn.close()

    # ------------------------------------------------------------- reading
    def _read_msgpack_member(self, member: _Member, frame: bytearray | None) -> str:
        if frame is None:  # whole in the socket: exactly this request is read, nothing behind it
            kind, member.request_id, length = protocol.parse_header(_read_now(member.conn, protocol.HEADER_SIZE))
            member.log_id = accesslog.msgpack_id(member.conn_id, member.request_id)
            body: bytes | memoryview = _read_now(member.conn, length) if length else b""
        else:
            kind, member.request_id, length = protocol.parse_header(bytes(frame[:protocol.HEADER_SIZE]))
            member.log_id = accesslog.msgpack_id(member.conn_id, member.request_id)
            end = protocol.HEADER_SIZE + length
            body = memoryview(frame)[protocol.HEADER_SIZE:end]
            if len(frame) > end:
                member.unread = bytes(frame[end:])
        member.bytes_in = protocol.HEADER_SIZE + len(body)
        if kind != protocol.CALL:
            raise BadRequest("only calls are batched")  # (never sent by the master: it batches calls)
        name, args, kwargs = protocol.decode_call(body)
        if len(body) >= self._max_depth or len(args) + len(kwargs) > self._max_args:
            protocol.check_shape(args, kwargs, self._max_args, self._max_depth, body)
        member.call = (args, kwargs)
        return name

    def _read_http_member(self, member: _Member, frame: bytearray | None, started: float) -> str | None:
        member.request, refused = self._read_http(member.conn, frame, None, started)
        member.log_id, member.bytes_in = self._http_id, self._http_in
        if refused is not None:
            member.error = refused
            return None
        member.call = self._http_call(member.request)
        return member.request.expert or ""

    # ------------------------------------------------------------- answering
    def _reply(self, member: _Member, expert_name: str, elapsed: float) -> str | None:
        """Write one member's reply (unless its connection broke); returns why to retire, if this worker should."""
        if not member.close:
            outcome, status = "ok", None
            if member.request is not None or isinstance(member.error, tuple):  # HTTP
                if isinstance(member.error, tuple):
                    response, keep_alive, outcome = member.error
                else:
                    result = member.error if member.error is not None else member.call[0]  # type: ignore[index]
                    response, keep_alive, outcome = self._http_reply(member.request, result)  # type: ignore[arg-type]
                # No patience: a slow reader's rest goes to the master, and its batch mates are not kept waiting.
                member.close, member.unsent = self._deliver(member.conn, response, member.log_id, patience=0.0)
                member.close = member.close or not keep_alive
                status = accesslog.status_of(response)
                target = accesslog.target_of(member.request.route if member.request is not None else "call",
                                             expert_name or None)
            else:
                if member.error is None:
                    try:
                        reply_kind, reply = _RESULT, _pack_result(expert_name, member.call[0])  # type: ignore[index]
                    except RemoteError as exc:
                        member.error = exc
                if member.error is not None:
                    member.error.request_id = member.log_id
                    reply_kind, reply = _ERROR, protocol.pack(member.error.to_wire())
                    outcome = member.error.code
                frame = protocol.pack_header(reply_kind, member.request_id, len(reply)) + reply
                member.close, member.unsent = self._deliver(member.conn, frame, member.log_id, patience=0.0)
                response, target = frame, expert_name or None
            self.recorder.record(expert_name or None, outcome, elapsed)
            if self._access is not None:  # (a member's time is the batch's: one call served them all)
                self._access.write(member.log_id, accesslog.peer_of(member.conn), "http" if status else "msgpack",
                                   target, outcome, status, elapsed, member.bytes_in, len(response))
            if log.isEnabledFor(logging.DEBUG):
                log.debug("batch member %d %s %.3f ms %s", member.request_id, expert_name, elapsed * 1000, outcome)
        return self._after_request()


def _outcome(invoke: Any, name: str, args: list, kwargs: dict) -> Any:
    try:
        return invoke(name, args, kwargs)
    except RemoteError as exc:
        return exc


def _read_now(conn: socket.socket, size: int) -> bytes:
    """``size`` bytes the master saw waiting in the socket, without waiting (less: the connection broke)."""
    data = conn.recv(size, _NOW)
    while len(data) < size:
        more = conn.recv(size - len(data), _NOW)  # (BlockingIOError: not all there after all)
        if not more:
            raise ConnectionLost("the client closed its connection mid-request")
        data += more
    return data


_RESULT, _ERROR = protocol.RESULT, protocol.ERROR
_NOW = int(socket.MSG_DONTWAIT)
