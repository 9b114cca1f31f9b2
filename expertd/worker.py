"""A worker process: runs the after-fork hooks, then serves one request at a time.

The worker never accepts connections itself.  The master passes it a client
connection with a complete request waiting (see :mod:`expertd.ipc`); the
worker reads that request, calls the expert, writes the reply, and either
lingers for the connection's next request or hands it back (with any bytes it
read but did not serve) and waits for the next connection.  An expert's exception, bad
arguments or an unserialisable result become structured error replies: a bad
request never kills the worker.

This module is the process and its life: boot, signals, the loop that takes
connections from the master, msgpack connections (reading requests out of the
socket), lingering, and retirement (max_requests, max_memory).  It owns the
worker's state: its channel to the master, scoreboard slot, metrics recorder,
read buffer, request count and the flags its signal handlers set.  Answering a
request is :mod:`expertd.calls`'s; serving HTTP connections is
:mod:`expertd.worker_http`'s (both mixed into :class:`Worker`).
"""

from __future__ import annotations

import _socket
import logging
import os
import random
import signal
import socket
import struct
import sys
import time
from types import FrameType
from typing import Any, NoReturn

from expertd import accesslog, ipc, notify, protocol, runtimes, stage_timer
from expertd.calls import FAILURE_LOG
from expertd.calls import _pack_result as _pack_result  # (bench/hotpath.py imports it from here)
from expertd.config import Config
from expertd.errors import ConnectionLost, ExpertLoadError
from expertd.loader import LoadedExpert, describe_exception, run_after_fork
from expertd.logs import Throttle
from expertd.metrics import Recorder
from expertd.scoreboard import Scoreboard
from expertd.worker_batch import BatchServing
from expertd.worker_pipeline import PipelineServing, plain_experts

_AF_UNIX, _SOCK_STREAM = int(socket.AF_UNIX), int(socket.SOCK_STREAM)
log = logging.getLogger("expertd.worker")

EXIT_BOOT_FAILED = 3


class Worker(BatchServing, PipelineServing):
    """The code that runs in a forked worker process (see :meth:`run`)."""

    def __init__(self, number: int, config: Config, experts: dict[str, LoadedExpert], channel: socket.socket,
                 scoreboard: Scoreboard, board_slot: int, recorder: Recorder, master_pid: int | None = None) -> None:
        self.number = number
        self.recorder = recorder
        self.scoreboard = scoreboard
        self.board = scoreboard.slot(board_slot)
        self._board_slot = board_slot
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
        self._buf = bytearray(_READ_SIZE)  # msgpack input is read here
        self._waiting = False  # waiting on a lingering connection (see _wait)
        self._wait_consumes = False  # ... in a read that takes bytes out of the socket (msgpack), not a peek
        self._reclaim_signalled = False
        # (Forked by its generation's parent through a process that exits at once: the master adopts it.)
        self._master_pid = master_pid or os.getppid()
        self._timeouts = {name: config.expert_timeout(name) for name in experts}
        self._max_args, self._max_depth = config.max_args, config.max_depth
        self._debug = log.isEnabledFor(logging.DEBUG)
        self._throttle = Throttle(log)  # a client can break its connections at will: those lines are rate-limited
        self._access = accesslog.LOG  # (inherited from the master; None: off)
        self._conn_id = 0
        self._lingers = config.linger > 0
        micros = max(1, round(config.linger * 1e6))  # (a zero timeval would mean for ever)
        self._linger_timeval = _TIMEVAL.pack(*divmod(micros, 10**6))
        jitter = config.max_requests_jitter
        if jitter is None:
            jitter = config.max_requests // 10
        # Each worker draws its own limit so that workers do not all recycle at once.
        self._request_limit = config.max_requests + random.randint(0, jitter) if config.max_requests else 0
        self._limits = bool(self._request_limit or config.max_memory)
        self._interrupted: str | None = None  # why this worker is not trusted to serve on (see worker_pipeline)
        self._typical: dict[str, float] = {}  # what experts of a pipeline's stages take here (see worker_pipeline)
        self._ran: list[tuple[str, str, float]] = []  # the experts a pipeline ran, counted after its reply
        self._plain = plain_experts(experts)  # (what a pipeline's stage calls directly)
        self._plans: dict = {}  # a pipeline's target -> its plan and steps (see worker_pipeline)
        self._running_field = self.board.running_field()  # (a pipeline's stages write their running mark there)

    def run(self) -> NoReturn:
        """Boot, serve until told to stop, exit.  Never returns."""
        self._install_signals()
        _die_with_master(self._master_pid)
        self._set_title("booting")
        config = self.config
        intra_op = runtimes.resolve_threads(config.intra_op_threads, config.workers)
        runtimes.apply_worker_threads(intra_op, runtimes.resolve_threads(config.inter_op_threads, config.workers))
        try:
            with runtimes.quiet_native_logs(config.tf_log_level in ("warning", "error")):
                run_after_fork(self.experts, intra_op)
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
        self._throttle.flush(force=True)  # (the counts of lines left out, which would go with the worker)
        FAILURE_LOG.flush(force=True)
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
        # wait is still interrupted: reads with SO_RCVTIMEO are never restarted (signal(7)).
        signal.siginterrupt(signal.SIGUSR2, False)
        signal.signal(_MASTER_GONE, self._on_master_gone)
        signal.siginterrupt(_MASTER_GONE, False)

    def _on_usr1(self, signum: int, frame: FrameType | None) -> None:
        # The master rotated the log file. Reopen now if idle (no logging lock can be
        # held while we wait for work), else right after the request in hand.
        if self._idle or self._waiting:
            _reopen_logs_quietly()
        else:
            self._reopen_logs = True

    def _on_master_gone(self, signum: int, frame: FrameType | None) -> None:
        # The kernel's word that the master died (PR_SET_PDEATHSIG): nobody else will time out the
        # request in hand now.  It may still finish within its timeout (its caller gets the reply);
        # past that, SIGALRM's default action ends the process, whatever the expert is doing, and
        # the caller sees its connection close instead of a late reply.  Costs nothing per request:
        # the timer is armed only here.
        if os.getppid() == self._master_pid:
            return  # sent as the process that forked this worker exited, before the master adopted it
        self._stop_requested = True
        if self._idle or self._interruptible():
            raise SystemExit(0)
        now = time.monotonic()
        began, timeout = self.scoreboard.read(self._board_slot)[:2]
        if began:
            deadline = began + timeout
        else:  # between requests, or one being read: no longer than any call may take
            deadline = now + max(self.config.timeout, *self._timeouts.values())
        signal.signal(signal.SIGALRM, signal.SIG_DFL)
        stage_timer.ALARM_AT[0] = 0.0  # (the timer is this one's now: a pipeline's may not turn it off)
        signal.setitimer(signal.ITIMER_REAL, max(deadline - now, 0.001))
        log.warning("worker %d (pid %d): the master is gone; exiting after the request in hand, "
                    "or at its timeout (%.1fs from now)", self.number, os.getpid(), max(deadline - now, 0.0))

    def _set_title(self, state: str) -> None:
        notify.set_title(f"expertd: worker {self.number} [{state}, {self.requests} requests]")

    def _on_term(self, signum: int, frame: FrameType | None) -> None:
        # Finish the request in hand, then exit; an idle worker exits at once.
        self._stop_requested = True
        if self._idle or self._interruptible():
            raise SystemExit(0)

    def _serve_forever(self) -> None:
        while not self._stop_requested:
            self._throttle.flush()
            FAILURE_LOG.flush()
            self._idle = True
            command = ipc.receive_command(self.channel)
            self._idle = False
            if command is None:  # the master closed our channel: time to go
                return
            self.board.taking_next()
            if command.__class__ is list:  # a batch: its members' DONEs are sent as each reply goes out
                retire = self._serve_batch(command)  # type: ignore[arg-type]
                if retire is not None:
                    log.info("worker %d (pid %d) retiring after %d requests: %s",
                             self.number, os.getpid(), self.requests, retire)
                    return
                continue
            conn_id, fd, frame, speaks_http = command  # type: ignore[misc]
            # No timeout on the socket object: every request handed to us is whole in the socket,
            # so reads never wait, and Python polls before each call on a socket with a timeout.
            # The C socket type itself: socket.socket's Python __init__ and close cost four calls a request.
            conn = _socket.socket(_AF_UNIX, _SOCK_STREAM, 0, fd)
            unread = None
            try:
                if speaks_http:
                    close, unsent, retire, served = self._serve_http_connection(conn_id, conn, frame)
                else:
                    close, unsent, retire, served, unread = self._serve_msgpack_connection(conn_id, conn, frame)
            finally:
                conn.close()
            # Retiring also when stopping: a connection the master handed ahead waits in the channel,
            # and it must know that this worker will not read it.
            ipc.send_done(self.channel, conn_id, close, retiring=retire is not None or self._stop_requested,
                          unsent=unsent, served=served, unread=unread)
            unsent = None  # the master writes it now: an idle worker must not keep a slow reader's reply alive
            if retire is not None:
                log.info("worker %d (pid %d) retiring after %d requests: %s",
                         self.number, os.getpid(), self.requests, retire)
                return

    # ------------------------------------------------------- msgpack connections
    def _serve_msgpack_connection(
        self, conn_id: int, conn: socket.socket, frame: bytearray | None,
    ) -> tuple[bool, memoryview | None, str | None, int, bytes | None]:
        """Serve the request handed over, then linger for the connection's next ones while nobody else waits.

        Input is read in as large pieces as the socket holds, each request's
        bytes taken out of the socket by one read (a peek and a read would be
        two system calls).  What was read but is not served here (a control
        request, a request still arriving, anything after a reclaim) goes back
        to the master, which treats it as the start of the connection's input.

        Returns (close, unsent reply bytes, retire reason, requests served
        since the last DONE, unread bytes).
        """
        self._reclaim_signalled = False  # (a late signal meant for the previous connection)
        self._conn_id = conn_id
        buf = self._buf
        if frame is not None:  # gathered by the master (perhaps followed by more of the input)
            data: bytearray = frame
            end = len(frame)
        else:  # a whole request waits in the socket
            data = buf
            try:
                end = conn.recv_into(buf, 0, _NOW)
            except OSError as exc:
                return (*self._give_up(exc), None, 0, None)
            if not end:  # the client hung up after sending it
                self.board.writing()
                return True, None, None, 0, None
        start = served = total = 0
        close, unsent, retire, lingering = False, None, None, False
        max_frame, header_from = self.config.max_frame, _HEADER.unpack_from
        while True:
            # One request out of data[start:end], or the rest goes back to the master.
            available = end - start
            if available < _HEADER_SIZE:
                break
            magic, version, kind, request_id, length = header_from(data, start)
            if magic != _MAGIC or version != _VERSION or kind not in _WORKER_KINDS or length > max_frame:
                break  # the master answers it (refusals, control requests)
            size = _HEADER_SIZE + length
            if available >= size:
                body = memoryview(data)[start + _HEADER_SIZE : start + size]
                start += size
            else:
                try:
                    whole = self._read_rest(conn, data, start, end, size)
                except OSError as exc:
                    return (*self._give_up(exc), None, served, None)
                if whole is None:
                    break  # still arriving: the master gathers it
                body = memoryview(whole)[_HEADER_SIZE:]
                data, start, end = buf, 0, 0
            close, unsent = self._answer(conn, kind, request_id, body)
            body.release()  # (a view into the read buffer blocks nothing, but it need not outlive its request)
            retire = self._after_request()
            served += 1
            total += 1
            if close or unsent or retire or self._stop_requested or self._reclaim_signalled or not self._may_linger():
                break
            if not lingering:
                lingering = True
                self._start_lingering(conn_id, conn, served)
                served = 0
            if start == end:
                got = self._wait(conn.recv_into, (buf,), True)
                if got.__class__ is str:
                    close = got == "eof"
                    break
                data, start, end = buf, 0, got
        if close or start == end:
            return close, unsent, retire, served, None
        if not total:
            # Handed over for a request a worker serves, yet this one cannot: a worker of the
            # generation before a reload that raised max_frame.  Handing it back would only send
            # it round again, so it is refused here.
            return (*self._refuse(conn, data, start, end), None, 0, None)
        return close, unsent, retire, served, bytes(data[start:end])

    def _wait(self, read: Any, args: tuple, consumes: bool) -> Any:
        """Wait (up to ``linger``, the socket's SO_RCVTIMEO) in ``read(*args)`` for a lingering connection's input.

        Returns what ``read`` returned, or why it returned nothing: "eof",
        "reclaimed" or "expired".  The master reclaims the connection with
        SIGUSR2, whose handler interrupts the read by raising (see
        :meth:`_on_reclaim`); a SIGTERM does the same.  A read that ``consumes``
        (msgpack input, read into the buffer) is interrupted only while the
        buffer's first byte shows that nothing was read: every request begins
        with a non-zero byte, so nothing taken out of the socket is dropped.
        """
        if self._reclaim_signalled:
            self._reclaim_signalled = False
            return "reclaimed"
        if consumes:
            self._buf[0] = 0
        self._wait_consumes = consumes
        self._waiting = True
        try:
            got = read(*args)
        except _Reclaimed:
            self._reclaim_signalled = False
            return "reclaimed"
        except BlockingIOError:  # SO_RCVTIMEO: nothing came within linger
            return "expired"
        except OSError:
            return "eof"
        finally:
            self._waiting = False  # (also when SIGTERM's SystemExit leaves the wait)
        return got or "eof"

    def _interruptible(self) -> bool:
        """Whether a signal may abort the wait on the connection: waiting, and nothing read yet."""
        return self._waiting and not (self._wait_consumes and self._buf[0])

    @staticmethod
    def _read_rest(conn: socket.socket, data: bytearray, start: int, end: int, size: int) -> bytearray | None:
        """The rest of a request larger than what was read, if the socket holds it all (else None)."""
        have = end - start
        if protocol.queued_bytes(conn.fileno()) < size - have:
            return None
        whole = bytearray(size)
        whole[:have] = data[start:end]
        if conn.recv_into(memoryview(whole)[have:], size - have, _WAIT_ALL) < size - have:
            raise ConnectionLost("connection closed while reading a request")
        return whole

    def _start_lingering(self, conn_id: int, conn: socket.socket, served: int) -> None:
        """Tell the master this worker keeps the connection (reporting what it served so far)."""
        ipc.send_done(self.channel, conn_id, False, linger=True, served=served)
        # Waiting is a blocking read that gives up after `linger`; a reclaim interrupts it.
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, self._linger_timeval)

    def _may_linger(self) -> bool:
        # (Its next connection handed ahead, first: under load the answer then costs no clock and no unpacking.)
        return self._lingers and not self.board.next_waiting() and self.scoreboard.may_linger(time.monotonic())

    def _on_reclaim(self, signum: int, frame: FrameType | None) -> None:
        # The master wants the connection back.  Raising is what interrupts the blocking wait
        # (PEP 475 would otherwise resume it), so it raises only while the worker waits there
        # and has read nothing; at any other moment the flag is seen before the next wait.  A
        # signal landing in the instant before the wait's system call starts is seen when the
        # wait times out: late by at most `linger`, never lost.
        self._reclaim_signalled = True
        if self._interruptible():
            self._waiting = False
            raise _Reclaimed

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
        return self._retire_reason() if self._limits or self._interrupted else None

    def _retire_reason(self) -> str | None:
        """Why this worker should be replaced now (max_requests, max_memory, an interrupted stage), or None."""
        if self._interrupted:
            return self._interrupted
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


def _reopen_logs_quietly() -> None:
    from expertd.logfile import reopen_log_files

    try:
        reopen_log_files()
    except OSError:
        pass  # the master logs the failure; a worker keeps serving


_READ_SIZE = 64 * 1024
_HEADER, _HEADER_SIZE, _MAGIC, _VERSION = protocol.HEADER, protocol.HEADER_SIZE, protocol.MAGIC, protocol.VERSION
# The rest are the master's: control requests, and LIST (the master checks who may read it: public_status).
_WORKER_KINDS = frozenset((protocol.CALL, protocol.MAP, protocol.PING, protocol.PIPELINE))


class _Reclaimed(Exception):
    """Raised by the SIGUSR2 handler to interrupt a lingering worker's wait."""


_TIMEVAL = struct.Struct("@ll")
# Plain ints: socket's flags are enum.IntFlag members, and ``|`` on those runs Python code.
_NOW = int(socket.MSG_DONTWAIT)
_WAIT_ALL = int(socket.MSG_WAITALL)


_PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")


def _rss() -> int:
    with open("/proc/self/statm", "rb") as statm:
        return int(statm.read().split()[1]) * _PAGE_SIZE


# Sent by the kernel to a worker when its master dies (see Worker._on_master_gone); otherwise unused.
_MASTER_GONE = signal.SIGRTMIN
_PR_SET_PDEATHSIG = 1


def _die_with_master(master_pid: int) -> None:
    """Have the kernel send _MASTER_GONE when the master dies (and send it now if it already has)."""
    import ctypes

    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, int(_MASTER_GONE))
    if os.getppid() != master_pid:  # it died before the request was in place
        os.kill(os.getpid(), _MASTER_GONE)


def _send_quietly(send: Any, *args: Any) -> None:
    try:
        send(*args)
    except OSError:
        pass


def worker_main(
    number: int, config: Config, experts: dict[str, LoadedExpert], channel: socket.socket, close_fds: list[int],
    scoreboard: Scoreboard, board_slot: int, recorder: Recorder, master_pid: int | None = None,
) -> NoReturn:
    """Entry point in the child right after fork(): drop the master's descriptors, then run."""
    try:
        for fd in close_fds:
            try:
                os.close(fd)
            except OSError:
                pass
        Worker(number, config, experts, channel, scoreboard, board_slot, recorder, master_pid).run()
    except BaseException as exc:
        sys.stderr.write(f"expertd: worker {number} failed to start: {describe_exception(exc)}\n")
    finally:
        os._exit(1)
