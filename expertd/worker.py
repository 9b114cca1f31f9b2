"""A worker process: runs the after-fork hooks, then serves one request at a time.

The worker never accepts connections itself.  The master passes it a client
connection with a complete request waiting (see :mod:`expertd.ipc`); the
worker reads exactly that request, calls the expert, writes the reply, hands
the connection back and waits for the next one.  An expert's exception, bad
arguments or an unserialisable result become structured error replies: a bad
request never kills the worker.
"""

from __future__ import annotations

import logging
import os
import random
import signal
import socket
import struct
import sys
import time
import traceback
from types import FrameType
from typing import Any, NamedTuple, NoReturn

from expertd import __version__, http, ipc, notify, protocol, runtimes
from expertd.config import Config
from expertd.errors import (
    BadRequest,
    BadResult,
    ConnectionLost,
    ExpertFailed,
    ExpertLoadError,
    ProtocolError,
    RemoteError,
    RequestTimeout,
    UnknownExpert,
)
from expertd.loader import LoadedExpert, describe_exception, run_after_fork
from expertd.metrics import Recorder
from expertd.scoreboard import Scoreboard

log = logging.getLogger("expertd.worker")

EXIT_BOOT_FAILED = 3


class Worker:
    """The code that runs in a forked worker process (see :meth:`run`)."""

    def __init__(self, number: int, config: Config, experts: dict[str, LoadedExpert], channel: socket.socket,
                 scoreboard: Scoreboard, board_slot: int, recorder: Recorder) -> None:
        self.number = number
        self.recorder = recorder
        self.scoreboard = scoreboard
        self.board = scoreboard.slot(board_slot)
        self.config = config
        self.experts = experts
        self.channel = channel
        self.requests = 0
        self._idle = False  # booting: SIGTERM waits until the hooks are done
        self._stop_requested = False
        self._reopen_logs = False
        self._titled_at = 0.0
        self._last_uss_check = 0.0
        self._last_uss = 0
        self._rss_at_uss_check = 0
        self._drain = bytearray(_PEEK)  # where requests already seen by a peek are read to
        self._served_http = False  # what the last request served spoke
        self._reclaimable = False  # waiting in the lingering peek: a reclaim may interrupt it
        self._reclaim_signalled = False
        self._master_pid = os.getppid()
        self._timeouts = {name: config.expert_timeout(name) for name in experts}
        jitter = config.max_requests_jitter
        if jitter is None:
            jitter = config.max_requests // 10
        # Each worker draws its own limit so that workers do not all recycle at once.
        self._request_limit = config.max_requests + random.randint(0, jitter) if config.max_requests else 0

    def run(self) -> NoReturn:
        """Boot, serve until told to stop, exit.  Never returns."""
        self._install_signals()
        self._set_title("booting")
        config = self.config
        runtimes.apply_worker_threads(
            runtimes.resolve_threads(config.intra_op_threads, config.workers),
            runtimes.resolve_threads(config.inter_op_threads, config.workers),
        )
        try:
            with runtimes.quiet_native_logs(config.tf_log_level in ("warning", "error")):
                run_after_fork(self.experts)
        except ExpertLoadError as exc:
            message = f"worker {self.number}: {exc}"
            log.error("%s", message)
            _send_quietly(ipc.send_failed, self.channel, message)
            os._exit(EXIT_BOOT_FAILED)
        ipc.send_ready(self.channel, os.getpid())
        self._set_title("ready")
        self._report_memory()
        try:
            self._serve_forever()
        except SystemExit:
            pass
        except BaseException:
            log.exception("worker %d crashed", self.number)
            os._exit(1)
        os._exit(0)

    def _report_memory(self) -> None:
        # After READY, so that reading /proc/self/smaps does not delay serving.
        import psutil

        try:
            info = psutil.Process().memory_full_info()
            ipc.send_memory(self.channel, info.uss, info.pss, info.rss)
        except (psutil.Error, OSError, AttributeError) as exc:
            log.debug("worker %d: memory figures unavailable: %s", self.number, exc)

    def _install_signals(self) -> None:
        signal.set_wakeup_fd(-1)
        # Ctrl-C in a terminal signals the whole process group; the master decides
        # when workers stop, so an interactive interrupt must not kill a request.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, self._on_term)
        for sig in (signal.SIGHUP, signal.SIGQUIT, signal.SIGCHLD, signal.SIGTTIN, signal.SIGTTOU):
            signal.signal(sig, signal.SIG_DFL)
        signal.signal(signal.SIGUSR1, self._on_usr1)
        signal.signal(signal.SIGUSR2, self._on_reclaim)
        # SA_RESTART: an expert's own blocking calls carry on through a reclaim. The lingering
        # peek is still interrupted: reads with SO_RCVTIMEO are never restarted (signal(7)).
        signal.siginterrupt(signal.SIGUSR2, False)

    def _on_usr1(self, signum: int, frame: FrameType | None) -> None:
        # The master rotated the log file. Reopen now if idle (no logging lock can be
        # held while we wait for work), else right after the request in hand.
        if self._idle:
            _reopen_logs_quietly()
        else:
            self._reopen_logs = True

    def _set_title(self, state: str) -> None:
        notify.set_title(f"expertd: worker {self.number} [{state}, {self.requests} requests]")

    def _on_term(self, signum: int, frame: FrameType | None) -> None:
        # Finish the request in hand, then exit; an idle worker exits at once.
        self._stop_requested = True
        if self._idle:
            raise SystemExit(0)

    def _serve_forever(self) -> None:
        while not self._stop_requested:
            self._idle = True
            command = ipc.receive_command(self.channel)
            self._idle = False
            if command is None:  # the master closed our channel: time to go
                return
            conn_id, fd, frame = command
            # No timeout on the socket object: every request handed to us is whole in the socket,
            # so reads never wait, and Python polls before each call on a socket with a timeout.
            conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM, 0, fileno=fd)
            try:
                close, unsent, retire, served = self._serve_connection(conn_id, conn, frame)
            finally:
                conn.close()
            ipc.send_done(self.channel, conn_id, close, retiring=retire is not None, unsent=unsent, served=served)
            if retire is not None:
                log.info("worker %d (pid %d) retiring after %d requests: %s",
                         self.number, os.getpid(), self.requests, retire)
                return

    def _serve_connection(self, conn_id: int, conn: socket.socket,
                          frame: bytearray | None) -> tuple[bool, memoryview | None, str | None, int]:
        """Serve the request handed over, then linger for the connection's next ones while nobody else waits.

        Returns (close, unsent reply bytes, retire reason, requests served since the last DONE).
        """
        self._reclaim_signalled = False  # (a late signal meant for the previous connection)
        close, unsent = self._serve_one(conn, frame)
        retire = self._after_request()
        speaks_http = self._served_http  # a connection speaks one protocol for its whole life
        served, lingering = 1, False
        while not (close or unsent or retire or self._stop_requested) and self._may_linger():
            if not lingering:
                lingering = True
                ipc.send_done(self.channel, conn_id, False, linger=True, served=served)
                served = 0
                # Waiting is a blocking peek that gives up after `linger`; a reclaim interrupts it.
                conn.setblocking(True)  # (a worker's _send_briefly may have left it non-blocking)
                micros = max(1, round(self.config.linger * 1e6))  # (a zero timeval would mean for ever)
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, _TIMEVAL.pack(*divmod(micros, 10**6)))
            waiting = self._await_next(conn, speaks_http)
            if isinstance(waiting, str):
                close = waiting == "eof"
                break
            close, unsent = self._serve_one(conn, None, waiting)
            retire = self._after_request()
            served += 1
        return close, unsent, retire, served

    def _may_linger(self) -> bool:
        return self.config.linger > 0 and self.scoreboard.may_linger(time.monotonic())

    def _await_next(self, conn: socket.socket, speaks_http: bool) -> _Peeked | _PeekedHttp | str:
        """Wait (up to ``linger``) for the connection's next request.

        Returns what a peek saw of it (the request is whole in the socket, still
        unread), or why not: "eof", "reclaimed" or "expired".

        The wait is one blocking peek (SO_RCVTIMEO is ``linger``), not a poll of
        the connection and the channel: a system call less per request.  The
        master reclaims the connection with SIGUSR2, whose handler interrupts
        the peek (see :meth:`_on_reclaim`).
        """
        if self._reclaim_signalled:
            self._reclaim_signalled = False
            return "reclaimed"
        self._idle = True  # a SIGTERM now exits at once: the master takes the connection back
        try:
            self._reclaimable = True
            head = conn.recv(_PEEK, _PEEK_WAIT)
            self._reclaimable = False
        except _Reclaimed:
            self._reclaim_signalled = False
            return "reclaimed"
        except BlockingIOError:  # SO_RCVTIMEO: nothing came within linger
            return "expired"
        except OSError:
            return "eof"
        finally:
            self._reclaimable = False  # (also when SIGTERM's SystemExit leaves the wait)
            self._idle = False
        return self._judge_next(conn, head, speaks_http)

    def _on_reclaim(self, signum: int, frame: FrameType | None) -> None:
        # The master wants the connection back.  Raising is what interrupts the blocking peek
        # (PEP 475 would otherwise resume it), so it raises only while the worker waits there;
        # at any other moment the flag is seen before the next wait.  A signal landing in the
        # instant before the peek's system call starts is seen when the peek times out: late
        # by at most `linger`, never lost.
        self._reclaim_signalled = True
        if self._reclaimable:
            self._reclaimable = False
            raise _Reclaimed

    def _judge_next(self, conn: socket.socket, head: bytes, speaks_http: bool) -> _Peeked | _PeekedHttp | str:
        if not head:
            return "eof"
        if speaks_http:
            return self._peek_http(conn, head)
        if head[:2] != protocol.MAGIC:
            return "expired"  # not this connection's protocol: the master refuses it
        # Only an ordinary request that is whole in the socket is served here; anything
        # else (control requests, refusals, a request still arriving) is the master's.
        if len(head) < protocol.HEADER_SIZE:
            return "expired"
        try:
            kind, request_id, length = protocol.parse_header(head[: protocol.HEADER_SIZE])
        except ProtocolError:
            return "expired"
        if kind not in (protocol.CALL, protocol.PING, protocol.LIST) or length > self.config.max_frame:
            return "expired"
        size = protocol.HEADER_SIZE + length
        if len(head) < size and protocol.queued_bytes(conn.fileno()) < size:
            return "expired"
        return _Peeked(head, kind, request_id, length)

    def _peek_http(self, conn: socket.socket, head: bytes) -> _PeekedHttp | str:
        # As above: only a whole call that the master would pass on as it is.
        try:
            framing = http.scan_head(head)
            if framing is None:
                return "expired"
            http.check_route(framing, self.experts, self.config.max_frame)
        except http.HttpRefusal:
            return "expired"  # the master refuses it
        if framing.route not in http.WORKER_ROUTES:
            return "expired"
        if (self.config.token and not http.token_accepted(framing.authorization, self.config.token)
                and conn.getsockopt(socket.SOL_SOCKET, socket.SO_DOMAIN) != socket.AF_UNIX):
            return "expired"  # an http_listen connection without the token: the master refuses it
        if len(head) < framing.size and protocol.queued_bytes(conn.fileno()) < framing.size:
            return "expired"
        return _PeekedHttp(head, framing)

    def _after_request(self) -> str | None:
        """Book-keeping between requests; returns why this worker should retire, if it should."""
        self.requests += 1
        self.board.served(self.requests)
        if self._reopen_logs:
            self._reopen_logs = False
            _reopen_logs_quietly()
        now = time.monotonic()
        if now - self._titled_at >= 1.0:  # keep ps current without paying for it on every request
            self._titled_at = now
            self._set_title("ready")
            if os.getppid() != self._master_pid:  # the master died: stop, even mid-linger
                self._stop_requested = True
        return self._retire_reason()

    def _retire_reason(self) -> str | None:
        """Why this worker should be replaced now (max_requests, max_memory), or None."""
        if self._request_limit and self.requests >= self._request_limit:
            return f"max_requests ({self._request_limit} with jitter)"
        limit = self.config.max_memory
        if not limit:
            return None
        # RSS is cheap to read and bounds USS from above, so nothing more is read
        # while RSS is under the limit.  Past it, the costly USS (smaps) is read
        # again when RSS has grown enough since the last reading for USS to have
        # crossed the limit, or after a second (pages that stop being shared
        # raise USS without raising RSS).
        rss = _rss()
        if rss <= limit:
            return None
        now = time.monotonic()
        grown = rss - self._rss_at_uss_check
        if grown < limit - self._last_uss and now - self._last_uss_check < 1.0:
            return None
        import psutil

        uss = psutil.Process().memory_full_info().uss
        self._last_uss_check, self._last_uss, self._rss_at_uss_check = now, uss, rss
        if uss > limit:
            return f"max_memory (private memory {uss / 2**20:.1f} MiB > {limit / 2**20:.1f} MiB)"
        return None

    def _serve_one(self, conn: socket.socket, frame: bytearray | None,
                   peeked: _Peeked | _PeekedHttp | bytes | None = None) -> tuple[bool, memoryview | None]:
        """Answer one request on ``conn``: read from it, or ``frame`` if the master read it.

        ``peeked`` is what a look at the socket already saw of the request.
        Returns whether the connection must be closed, and the part of the reply
        the client did not take in time (for the master to finish writing).
        """
        started = time.monotonic()
        board = self.board
        if frame is None and peeked is None:
            try:  # the master handed the connection over because a whole request waits in it
                peeked = conn.recv(_PEEK, _PEEK_NOW)
            except OSError as exc:
                return self._give_up(exc)
            if not peeked:  # the client hung up after sending it
                board.writing()
                return True, None
        self._served_http = isinstance(peeked, _PeekedHttp) or (
            not isinstance(peeked, _Peeked) and (frame if frame is not None else peeked)[:2] != protocol.MAGIC)
        if self._served_http:
            return self._serve_http(conn, frame, peeked, started)
        try:
            kind, request_id, body, call = self._take_request(conn, frame, peeked, started)
        except (ProtocolError, RequestTimeout, ConnectionLost, OSError) as exc:
            return self._give_up(exc)
        expert_name = None
        try:
            if kind == protocol.CALL:
                if call is None:  # read whole, not decoded yet
                    call = protocol.decode_call(body)
                    board.begin(started, self._timeouts.get(call[0], self.config.timeout), request_id, call[0])
                elif isinstance(call, BadRequest):
                    raise call
                expert_name, args, kwargs = call
                protocol.check_shape(args, kwargs, self.config.max_args, self.config.max_depth, body)
                reply_kind, reply = protocol.RESULT, _pack_result(expert_name, self._invoke(expert_name, args, kwargs))
            elif kind == protocol.PING:
                reply_kind, reply = protocol.RESULT, protocol.pack(
                    {"pid": os.getpid(), "worker": self.number, "version": __version__, "requests": self.requests}
                )
            elif kind == protocol.LIST:
                reply_kind, reply = protocol.RESULT, protocol.pack([e.describe() for e in self.experts.values()])
            else:
                raise BadRequest(f"unknown request kind 0x{kind:02x}")
            outcome = "ok"
        except RemoteError as exc:
            reply_kind, reply = protocol.ERROR, protocol.pack(exc.to_wire())
            outcome = exc.code
        if kind == protocol.CALL:
            self.recorder.record(expert_name, outcome, time.monotonic() - started)
        close, unsent = self._deliver(conn, protocol.encode_frame(reply_kind, request_id, reply), request_id)
        if close:
            return close, unsent
        if log.isEnabledFor(logging.DEBUG):
            log.debug(
                "request %d %s %.3f ms %s",
                request_id,
                expert_name or {protocol.PING: "(ping)", protocol.LIST: "(list)"}.get(kind, "?"),
                (time.monotonic() - started) * 1000,
                outcome,
            )
        return False, unsent

    def _take_request(self, conn: socket.socket, frame: bytearray | None, peeked: _Peeked | bytes | None,
                      started: float) -> tuple[int, int, bytes | memoryview, tuple | BadRequest | None]:
        """Take the request out of the socket (or the master's frame).

        Returns ``(kind, request_id, body, call)``: call is the decoded call, or
        why it could not be decoded, or None when it is not decoded yet.  The
        slot shows the worker busy before any byte leaves the socket: from then
        on, its death loses a request, and the master must say so.
        """
        board, timeout = self.board, self.config.timeout
        if frame is not None:
            kind, request_id, _length = protocol.parse_header(bytes(frame[: protocol.HEADER_SIZE]))
            board.begin(started, timeout, request_id, "")
            return kind, request_id, memoryview(frame)[protocol.HEADER_SIZE :], None
        if isinstance(peeked, _Peeked):
            head, kind, request_id, length = peeked
        else:
            head = peeked or b""
            if len(head) < protocol.HEADER_SIZE:
                board.begin(started, timeout, 0, "")
                return (*protocol.read_frame(conn, self.config.max_frame), None)
            kind, request_id, length = protocol.parse_header(head[: protocol.HEADER_SIZE])
            if length > self.config.max_frame:
                raise ProtocolError(f"frame body of {length} bytes exceeds max_frame ({self.config.max_frame} bytes)")
        size = protocol.HEADER_SIZE + length
        if len(head) < size:  # a large request: read it whole
            board.begin(started, timeout, request_id, "")
            return kind, request_id, memoryview(protocol.recv_exact(conn, size))[protocol.HEADER_SIZE :], None
        # The usual case: the peek saw it all, so the call is decoded from the peek (nothing
        # read yet), the expert's timeout applies at once, and reading only drains the socket.
        body = head[protocol.HEADER_SIZE : size]
        call: tuple[str, list, dict] | BadRequest | None = None
        expert = ""
        if kind == protocol.CALL:
            try:
                call = protocol.decode_call(body)
                expert = call[0]
            except BadRequest as exc:
                call = exc  # answered once the request is read
        board.begin(started, self._timeouts.get(expert, timeout), request_id, expert)
        if conn.recv_into(self._drain, size, _WAIT_ALL) < size:
            raise ConnectionLost("connection closed while reading a request")
        return kind, request_id, body, call

    def _serve_http(self, conn: socket.socket, frame: bytearray | None, peeked: _PeekedHttp | bytes | None,
                    started: float) -> tuple[bool, memoryview | None]:
        """Answer one HTTP request (see :mod:`expertd.http`); same contract as :meth:`_serve_one`."""
        board, timeout = self.board, self.config.timeout
        request = None
        try:
            if frame is not None:  # gathered by the master
                board.begin(started, timeout, 0, "")
                raw: bytes | bytearray = frame
            else:
                if isinstance(peeked, _PeekedHttp):
                    head, framing = peeked
                else:
                    head = peeked if peeked and _HEAD_END in peeked else conn.recv(http.MAX_HEAD, _PEEK_NOW)
                    framing = http.scan_head(head)
                if framing is None:
                    raise http.HttpRefusal(400, "bad_request", "incomplete request head", close=True)
                board.begin(started, self._timeouts.get(framing.expert, timeout), 0, framing.expert or "")
                raw = protocol.recv_exact(conn, framing.size)
            request = http.parse_request(raw)
        except http.HttpRefusal as refusal:
            response, keep_alive = http.error_response(None, refusal)
            expert, outcome = None, refusal.code
        except (ConnectionLost, RequestTimeout, OSError) as exc:
            return self._give_up(exc)
        if request is not None:
            expert = request.expert
            try:
                args, kwargs = http.call_arguments(request)
                protocol.check_shape(args, kwargs, self.config.max_args, self.config.max_depth)
                result = self._invoke(expert or "", args, kwargs)
                try:
                    body = http.result_body(request, result)
                except BaseException as exc:  # a result's own tolist() may raise anything; deep nesting too
                    raise BadResult(f"{expert} returned a value that cannot be sent as JSON: {_safe_str(exc)}",
                                    expert=expert) from None
                response, keep_alive = http.respond(request, 200, body)
                outcome = "ok"
            except RemoteError as exc:
                response, keep_alive = http.error_response(request, exc)
                outcome = exc.code
        self.recorder.record(expert, outcome, time.monotonic() - started)
        close, unsent = self._deliver(conn, response, "HTTP")
        if close:
            return close, unsent
        if log.isEnabledFor(logging.DEBUG):
            log.debug("HTTP %s %.3f ms %s", expert or "-", (time.monotonic() - started) * 1000, outcome)
        return not keep_alive, unsent  # (with unsent bytes, the master closes once it has written them)

    def _give_up(self, reason: BaseException) -> tuple[bool, None]:
        """The request could not be read: close the connection (the master may only close it)."""
        log.info("closing connection: %s", reason)
        self.board.writing()  # the stream is broken: an error frame from the master would not help
        return True, None

    def _deliver(self, conn: socket.socket, reply: bytes, request: object) -> tuple[bool, memoryview | None]:
        """Write a reply: (close, the part the client did not take in time)."""
        self.board.writing()  # from here on, an error frame from the master would corrupt the stream
        try:
            unsent = _send_briefly(conn, reply)
        except OSError as exc:
            log.info("could not deliver the reply to request %s: %s", request, exc)
            return True, None
        if unsent is None:
            self.board.end()  # else it stays "writing" until the master has the rest
        return False, unsent

    def _invoke(self, name: str, args: list, kwargs: dict) -> Any:
        """Call expert ``name``; its failures, and arguments that do not fit it, become RemoteErrors."""
        expert = self.experts.get(name)
        if expert is None:
            known = ", ".join(sorted(self.experts)) or "none"
            raise UnknownExpert(f"no expert named {name!r}; known experts: {known}", expert=name)
        try:
            return expert.function(*args, **kwargs)
        except BaseException as exc:  # an expert's failure is a reply, never a dead worker
            if isinstance(exc, TypeError):
                _refuse_misfit(expert, args, kwargs, exc)
            raise ExpertFailed(
                f"{type(exc).__name__}: {_safe_str(exc)}",
                remote_type=f"{type(exc).__module__}.{type(exc).__qualname__}",
                remote_traceback=_safe_traceback(exc),
                expert=name,
            ) from None


def _pack_result(name: str, result: Any) -> bytes:
    try:
        body = protocol.pack(result)
    except BaseException as exc:  # a result's own tolist() or __len__ may raise anything
        raise BadResult(
            f"{name} returned a value that cannot be sent: {type(exc).__name__}: {_safe_str(exc)}", expert=name
        ) from None
    if len(body) > protocol.MAX_BODY:
        raise BadResult(f"{name} returned {len(body)} bytes; a reply holds at most {protocol.MAX_BODY}", expert=name)
    return body


def _refuse_misfit(expert: LoadedExpert, args: list, kwargs: dict, exc: TypeError) -> None:
    """Raise BadRequest if ``exc`` came from arguments that do not fit the expert, not from its code.

    Arguments are checked only when a call raised TypeError, so that a call
    that fits pays nothing for the check.  Experts are pure, so calling one with
    arguments its wrapper then refuses does no harm.
    """
    if expert.signature is not None:
        try:
            expert.signature.bind(*args, **kwargs)
        except TypeError as misfit:
            raise BadRequest(f"{expert.name}{expert.signature}: {misfit}", expert=expert.name) from None
    elif exc.__traceback__ is not None and exc.__traceback__.tb_next is None:
        # Raised by the call itself, before any of the expert's code ran.
        raise BadRequest(f"{expert.name}: {_safe_str(exc)}", expert=expert.name) from None


def _reopen_logs_quietly() -> None:
    from expertd.master import reopen_log_files

    try:
        reopen_log_files()
    except OSError:
        pass  # the master logs the failure; a worker keeps serving


def _safe_str(exc: BaseException) -> str:
    try:
        return str(exc)
    except BaseException:  # an exception whose __str__ raises must not take the worker down
        return f"<{type(exc).__name__} whose message cannot be shown>"


def _safe_traceback(exc: BaseException) -> str:
    try:
        return "".join(traceback.format_exception(type(exc), exc, exc.__traceback__.tb_next))
    except BaseException:
        return f"{type(exc).__name__} (traceback unavailable)"


_PEEK = 4096


class _Reclaimed(Exception):
    """Raised by the SIGUSR2 handler to interrupt a lingering worker's wait."""


class _PeekedHttp(NamedTuple):
    """An HTTP request seen whole in the socket by a peek, not yet read."""

    head: bytes
    framing: http.Head


_HEAD_END = b"\n\r\n"  # a peek that holds this holds the whole head (bare-LF heads are looked at again)


class _Peeked(NamedTuple):
    """A request seen whole in the socket by a peek, not yet read."""

    head: bytes  # the frame, perhaps followed by more
    kind: int
    request_id: int
    length: int


# Plain ints: socket's flags are enum.IntFlag members, and ``|`` on those runs Python code.
_PEEK_NOW = int(socket.MSG_PEEK) | int(socket.MSG_DONTWAIT)
_PEEK_WAIT = int(socket.MSG_PEEK)
_TIMEVAL = struct.Struct("@ll")
_NOW = int(socket.MSG_DONTWAIT)
_WAIT_ALL = int(socket.MSG_WAITALL)
# How long a worker waits for a slow client to take its reply before handing the rest to the master.
_WRITE_PATIENCE = 0.05


def _send_briefly(conn: socket.socket, frame: bytes) -> memoryview | None:
    """Write ``frame``; return what the client did not take within a moment (None when all went)."""
    try:
        sent = conn.send(frame, _NOW)
    except BlockingIOError:
        sent = 0
    if sent == len(frame):  # the usual case: it all fits in the socket
        return None
    view = memoryview(frame)[sent:]
    deadline = time.monotonic() + _WRITE_PATIENCE
    try:
        while view:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return view
            conn.settimeout(remaining)
            try:
                sent = conn.send(view)
            except (TimeoutError, BlockingIOError):
                return view
            view = view[sent:]
        return None
    finally:
        # Blocking again: the descriptor's mode is shared with the master, and a lingering
        # wait is a blocking read.
        conn.settimeout(None)


_PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")


def _rss() -> int:
    with open("/proc/self/statm", "rb") as statm:
        return int(statm.read().split()[1]) * _PAGE_SIZE


def _send_quietly(send: Any, *args: Any) -> None:
    try:
        send(*args)
    except OSError:
        pass


def worker_main(
    number: int, config: Config, experts: dict[str, LoadedExpert], channel: socket.socket, close_fds: list[int],
    scoreboard: Scoreboard, board_slot: int, recorder: Recorder,
) -> NoReturn:
    """Entry point in the child right after fork(): drop the master's descriptors, then run."""
    try:
        for fd in close_fds:
            try:
                os.close(fd)
            except OSError:
                pass
        Worker(number, config, experts, channel, scoreboard, board_slot, recorder).run()
    except BaseException as exc:
        sys.stderr.write(f"expertd: worker {number} failed to start: {describe_exception(exc)}\n")
    finally:
        os._exit(1)
