"""The master process: owns the socket and the connections, supervises the workers.

Modelled on gunicorn's arbiter: one plain loop; signal handlers only queue
the signal (the wakeup fd makes ``epoll`` return), and the loop handles it;
an explicit worker table.  Unlike gunicorn the master also owns every client
connection, which is what keeps idle and slow clients from pinning workers:

* connections sit in the master's epoll set, costing nothing while idle;
* when one has a *complete* request waiting (checked by peeking at the
  12-byte header and the bytes queued, never by reading), it joins a FIFO
  queue, and the next idle worker gets its descriptor (:mod:`expertd.ipc`);
* the worker answers that one request and hands the connection back;
* when every worker is busy, each gets its next connection ahead, so that it
  need not wait a round trip through the master between requests.

N workers thus serve any number of connected clients fairly, in arrival
order.  Because the master knows which request each worker holds, a worker
that dies mid-request still gets its caller a ``worker_lost`` error reply
instead of a hang.
"""

from __future__ import annotations

import errno
import gc
import logging
import math
import os
import random
import resource
import select
import signal
import socket
import struct
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass

from expertd import __version__, http, ipc, notify, protocol
from expertd.config import Config
from expertd.errors import (
    AccessDenied,
    BadRequest,
    ConfigError,
    FrameTooLarge,
    Overloaded,
    Quarantined,
    RemoteError,
    RequestTimeout,
    ShuttingDown,
    WorkerLost,
)
from expertd.generation import (
    FAILED,
    KEEPALIVE,
    LOADED,
    RETIRED,
    SERVING,
    Generation,
    GenerationError,
    become_subreaper,
)
from expertd.listener import Listener, bind_tcp
from expertd.logfile import reopen_log_files
from expertd.logs import Throttle
from expertd.metrics import Metrics
from expertd.notify import Notifier
from expertd.scoreboard import MAX_SLOTS, Scoreboard

log = logging.getLogger("expertd.master")

EXIT_WORKER_BOOT_FAILED = 3

# Requests that do not arrive whole are gathered by the master, up to this many bytes in all.
_GATHER_BUDGET_FRAMES = 4
# When that budget is spent, a request that has sent nothing for this long gives its room up to one
# that is arriving (a few stalled senders must not deny large requests to everyone else).
_GATHER_STALLED = 0.5
_GATHER_CHUNK = 256 * 1024
# EPOLLRDHUP: a client that ends its input with a request still incomplete is closed at once, not at
# read_timeout (a peek sees the bytes it sent, not that nothing more will follow).
_ET_READ_WRITE = select.EPOLLIN | select.EPOLLOUT | select.EPOLLRDHUP | select.EPOLLET
_ENDED = select.EPOLLRDHUP | select.EPOLLHUP
_PEEK_SIZE = 4096
_PEERCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid
_ET_READ = select.EPOLLIN | select.EPOLLRDHUP | select.EPOLLET
_ET_QUIET = select.EPOLLET  # only hang-ups and errors, once each
# More unexpected worker deaths than this (or twice the pool) within the window is a crash loop.
_DEATH_WINDOW = 1.0
_DEATHS_PER_WINDOW = 10
_BACKOFF_MAX = 10.0
# A crash burst ends after this long without a quick failure.
_QUIET_AFTER_BURST = 5.0
_EXPIRY_INTERVAL = 0.25
_SUMMARY_INTERVAL = 60.0
_PARENT_RETRY = 10.0  # seconds between attempts to replace a lost generation parent whose replacement failed
_SUMMARY_SAMPLES = 10_000  # call durations kept for the summary's percentiles
# systemd's STATUS line: at most this often (it counts requests; a message per request would
# cost the master a system call and the service manager a wake-up per request).
_STATUS_INTERVAL = 1.0
# A busy worker is handed its next connection ahead only while the request in hand is short: an
# expert whose calls typically take less than this, running for less than this (see _hand_ahead).
_HAND_AHEAD_UNDER = 0.002
# Plain ints: socket's flags are enum.IntFlag members, and ``|`` on those runs Python code.
_PEEK_NOW = int(socket.MSG_PEEK) | int(socket.MSG_DONTWAIT)
_LINGER_PAUSE = 0.1
_QUARANTINE_GROWTH_MAX = 32  # a repeated quarantine doubles, up to this many times quarantine_time
_METRICS_MEMORY_TTL = 5.0
# STATUS shares memory readings for this long: reading a process's smaps takes milliseconds, and a
# client looping STATUS would otherwise keep the master reading them instead of serving.
_STATUS_MEMORY_TTL = 1.0
_REFUSED_BODY_WAIT = 64 * 1024  # a refused request's body up to this size is read before the refusal is sent
# A peer refused by allow_uids is answered in the protocol its first bytes show; they are awaited this
# long at most, for this many peers at once (past that, or then, the refusal goes out as a msgpack frame).
_REFUSAL_WAIT = 0.2
_REFUSAL_PEN = 32
# Connections that root and the daemon's own user (and control_uids) may hold past the connection limits
# when nothing idle can make room: expertctl keeps working when every connection is busy.
_CONTROL_RESERVE = 4
# Descriptors kept free beyond those counted (/proc reads, log files, a reload's imports, sd_notify).
_FD_MARGIN = 24
_NO_PEER = -1  # the uid, gid and pid of a connection without credentials (http_listen)
# A connection that has not sent its first request is not closed for room until this long after accept:
# its client is about to send it (and would not know to send it again on a new connection).
_FRESH_GRACE = 1.0
# Read by the master itself: open to every caller unless public_status = no.  Every other control
# kind (RELOAD, STOP, SCALE, any added later) needs control_uids / control_gids.
_READ_KINDS = frozenset({protocol.STATUS, protocol.LIST})
_MASTER_KINDS = protocol.CONTROL_KINDS | {protocol.LIST}
_KIND_NAMES = {protocol.STATUS: "STATUS", protocol.LIST: "LIST", protocol.RELOAD: "RELOAD", protocol.STOP: "STOP",
               protocol.SCALE: "SCALE"}

_IDLE, _PARTIAL, _QUEUED, _BUSY, _WRITING, _CLOSED = "idle", "partial", "queued", "busy", "writing", "closed"
_LINGERING = "lingering"  # a worker holds the connection to serve its next request directly
_WAITING = "waiting"  # a RELOAD request waits for the new generation to load (or fail)


@dataclass(eq=False)
class _Connection:
    conn_id: int
    sock: socket.socket
    fd: int
    state: str = _IDLE
    request_id: int = 0
    expert: str | None = None  # of the request waiting or in progress, when it is a call
    partial_since: float = 0.0
    last_active: float = 0.0  # idle since; while a request is gathered, when its last bytes came
    frame_size: int = 0
    inbuf: bytearray | None = None  # a request the master is gathering from a slow sender
    unread: bytes = b""  # input a worker read but did not serve: it comes before the socket's
    outbuf: memoryview | None = None  # the rest of a reply the client was slow to take
    held: int = 0  # bytes of outbuf counted against max_reply_buffer (see _hold_reply)
    write_deadline: float = 0.0
    tcp: bool = False  # accepted on http_listen: HTTP only, and the token applies
    speaks: str = ""  # "msgpack" or "http", from the connection's first bytes; "" until they arrive
    close_when_written: bool = False  # a reply of the master's that ends the connection
    head_scanned: int = 0  # bytes of a long HTTP head looked at so far (a head is rescanned only as it grows)
    # The peer's credentials (SO_PEERCRED), read once at accept; _NO_PEER (-1) on http_listen (TCP),
    # whose connections share uid -1 for max_connections_per_uid.
    uid: int = _NO_PEER
    gid: int = _NO_PEER
    pid: int = _NO_PEER
    groups: frozenset[int] = frozenset()  # supplementary groups at connect (read only when a gid list is set)


@dataclass(eq=False)
class _WorkerSlot:
    """The master's record of one worker process."""

    number: int
    pid: int
    channel: socket.socket
    born: float
    ready_at: float | None = None
    conn: _Connection | None = None
    busy_since: float = 0.0
    deadline: float = 0.0  # when the request in hand times out
    board: int = 0  # its slot in the scoreboard
    lingering: bool = False  # it holds slot.conn after answering, for the connection's next request
    next_conn: _Connection | None = None  # handed ahead: waits in its channel until it reports slot.conn
    reclaim_sent: bool = False
    overdue: float = 0.0  # start time of a lingering request seen past its deadline once
    requests: int = 0
    failure: str | None = None
    memory: tuple[int, int, int] | None = None  # USS, PSS, RSS in bytes, measured after warm-up
    leaving: str | None = None  # why the worker is on its way out (retiring, timed out); not a crash
    generation: int = 1
    last_done: float | None = None


@dataclass(eq=False)
class _Quarantine:
    """An expert refused for a while: its calls kept killing their workers."""

    until: float  # monotonic
    length: float  # seconds; a repeat soon after doubles it
    wall_until: float  # the same moment by the wall clock, for expertctl status
    over: bool = False  # its end has been logged


class Master:
    """Supervises workers and dispatches requests; :meth:`run` returns the exit status."""

    def __init__(self, config: Config, *, overrides: dict[str, str] | None = None,
                 on_ready: Callable[[], None] | None = None) -> None:
        self.config = config
        self.experts: dict[str, dict] = {}  # name -> description, from the serving generation's parent
        self.overrides = overrides or {}  # command-line settings, kept across reloads
        self.on_ready = on_ready  # called once, when the first generation is serving (pidfile)
        self.notifier = Notifier()
        self.generation = 1
        self.started_at = time.time()
        self.requests_served = 0
        self.last_reload: dict | None = None
        self._reload: _Reload | None = None  # a loaded generation starting its workers: what it replaces
        self._parent: Generation | None = None  # the serving generation's parent: it forks the workers
        self._loading: Generation | None = None  # a generation whose parent is loading its experts
        self._generations: dict[int, Generation] = {}  # every generation parent alive, by pid
        self._by_control: dict[int, Generation] = {}  # a loading parent's control socket, watched by epoll
        self._reload_pending = False  # a reload asked for while another ran: it runs when that one ends
        self._next_parent_try = 0.0  # when to load a generation whose parent was lost again, after a failure
        self._pending_waiters: list[tuple[_Connection, int]] = []  # RELOAD requests for that pending reload
        self._durations: list[float] = []  # a uniform sample of this minute's handed-over calls (reservoir)
        self._durations_seen = 0
        self._next_summary = time.monotonic() + _SUMMARY_INTERVAL
        self._next_status = 0.0
        self._typical: dict[str, float] = {}  # expert name -> typical duration of a handed-over call (EWMA)
        self.listener: Listener | None = None
        self.scoreboard = Scoreboard()
        self.metrics = Metrics(MAX_SLOTS, config.experts)
        self.http_listener: socket.socket | None = None
        self._status_cache: tuple[float, dict] | None = None
        self._memory_readings: tuple[float, dict[int, dict]] = (0.0, {})  # (when, by pid) for status()
        self.epoll = select.epoll()
        # Sockets passed by socket activation: taken now (from the environment, which forked processes then
        # do not see), adopted in run(); no generation's parent or worker may hold them.
        self._activated = notify.listen_fds()
        self.workers: dict[int, _WorkerSlot] = {}  # by pid
        self._by_channel: dict[int, _WorkerSlot] = {}
        self._idle_workers: deque[_WorkerSlot] = deque()
        self.connections: dict[int, _Connection] = {}  # by fd
        self._queue: deque[_Connection] = deque()
        self._next_conn_id = 1
        self._signals: list[int] = []
        self._wakeup_r, self._wakeup_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._stop_deadline: float | None = None
        self._exit_status = 0
        self._announced_ready = False
        self._fast_failures = 0
        self._last_fast_failure = 0.0
        self._next_spawn_at = 0.0
        self._backoff_logged = False
        self._next_expiry_check = 0.0
        self._recent_deaths: deque[float] = deque()
        # Keyed by served expert names only (never a name a client sent that is not served).
        self._crashes: dict[str, deque[tuple[float, int]]] = {}  # expert -> (when its call killed a worker,
        # how many of its calls had been answered then)
        self._quarantined: dict[str, _Quarantine] = {}  # expert -> its quarantine, current or last
        self._linger_paused_until = 0.0  # lingering is off while an expert is quarantined
        self._gathered = 0  # bytes held in connections' inbufs
        self._held_replies = 0  # bytes held in connections' outbufs
        # The same two counts by peer uid: one user may hold at most half of each (_hold_gathered, _hold_reply).
        self._gathered_by_uid: dict[int, int] = {}
        self._held_by_uid: dict[int, int] = {}
        self._recheck: deque[_Connection] = deque()
        self._max_workers = max(64, 8 * (os.cpu_count() or 1))
        self._accept_paused_until = 0.0
        # Open connections by the peer's uid, each in the order it last fell idle (longest idle first).
        self._by_uid: dict[int, OrderedDict[int, _Connection]] = {}
        # Peers refused by allow_uids, by fd: (socket, until when their first bytes are awaited, refusal).
        self._refusing: dict[int, tuple[socket.socket, float, AccessDenied]] = {}
        self._throttle = Throttle(log)  # for the lines a client can make the master write at will
        self._spare_fd: int | None = None  # given up for a moment to answer clients when out of descriptors
        self._fd_limit = 1 << 20
        self._fd_base = 0  # descriptors open before the first worker and connection
        self._access_of: tuple[Config, _Access] | None = None

    # ----------------------------------------------------------------- run
    def load_first_generation(self, keepalive: Callable[[], None] | None = None) -> None:
        """Load the experts in generation 1's parent, waiting for it (start-up: no loop runs yet).

        Raises ExpertLoadError with the reason when they do not load: nothing was bound yet.
        """
        become_subreaper()  # before any worker is forked: they must become the master's children
        self._fd_limit = raise_file_limit()  # (before forking: the generation's processes inherit it)
        self._install_signals()  # queued until the loop runs (a HUP then reloads), except a stop:
        parent = self._start_generation(1, self.config)
        try:
            self.experts = parent.wait_loaded(keepalive, interrupted=self._stop_signal_queued)
        finally:
            if parent.exited or parent.state != SERVING:
                self._generations.pop(parent.pid, None)
        self._parent = parent

    def _stop_signal_queued(self) -> None:
        """Stopping while the first generation loads: end the way the signal's default action would."""
        for signum in self._signals:
            if signum in (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT):
                signal.set_wakeup_fd(-1)
                signal.signal(signum, signal.SIG_DFL)
                log.info("%s before the experts loaded: stopping", signal.Signals(signum).name)
                os.kill(os.getpid(), signum)

    def run(self) -> int:
        """Bind, fork the workers and serve until stopped (after :meth:`load_first_generation`)."""
        # What the master loaded (preloaded libraries) is shared with every generation; freezing
        # it keeps the collector from touching (and so copying) those pages in each of them.
        gc.freeze()
        if self.config.http_listen is not None:  # first: a port in use must not leave the Unix socket behind
            self.http_listener = bind_tcp(*self.config.http_listen)
        inherited = self._activated
        if inherited:
            self.listener = Listener.inherit(inherited[0])
        else:
            self.listener = Listener.bind(self.config.socket, self.config.socket_mode, self.config.socket_group)
        self.epoll.register(self.listener.fileno(), select.EPOLLIN)
        if self.http_listener is not None:
            self.epoll.register(self.http_listener.fileno(), select.EPOLLIN)
        self.epoll.register(self._wakeup_r, select.EPOLLIN)
        self._spare_fd = _open_spare()
        self._fd_base = _open_descriptors() or 64
        notify.set_title(f"expertd: master [{self.config.path}]")
        log.info(
            "expertd master %d %s %s; starting %d workers for %d experts",
            os.getpid(), "serving the socket activated on" if inherited else "listening on",
            self.listener.path, self.config.workers, len(self.experts),
        )
        if self.http_listener is not None:
            host, port = self.config.http_listen  # type: ignore[misc]
            log.info("HTTP also on %s:%d (%s)", host, port,
                     "bearer token required" if self.config.token else "no token: loopback only")
        limit = self._connection_limit()
        if limit < self.config.max_connections:
            log.warning("the open-file limit (%d) leaves room for %d connections, fewer than max_connections (%d); "
                        "raise LimitNOFILE (ulimit -n) to allow more", self._fd_limit, limit,
                        self.config.max_connections)
        try:
            while True:
                self._maintain_workers()
                events = self.epoll.poll(self._poll_timeout())
                for fd, mask in events:
                    self._on_event(fd, mask)
                self._handle_signals()
                # Fair turns: one request per connection per iteration.  A connection answered here
                # (a pipelined GET /health, a STATUS loop) goes back on the list for the next
                # iteration, after epoll, signals and timeouts, never round again in this one.
                if self._recheck:
                    # Each connection once (an event may have listed one again), so the list stays short.
                    turns = dict.fromkeys(self._recheck)
                    self._recheck.clear()
                    for conn in turns:
                        if conn.state == _IDLE:
                            self._examine(conn)
                self._dispatch()
                self._expire()
                self._housekeeping()
                if self._stop_deadline is not None and self._stopped():
                    break
        finally:
            self._shutdown()
        return self._exit_status

    def _housekeeping(self) -> None:
        """Watchdog pings, the service status line and the periodic log summary."""
        now = time.monotonic()
        self.notifier.watchdog(now)
        self._throttle.flush()
        if (now >= self._next_status and self._announced_ready and self._reload is None
                and self._stop_deadline is None):
            self._next_status = now + _STATUS_INTERVAL
            ready = sum(1 for slot in self.workers.values() if slot.ready_at is not None and slot.leaving is None)
            self.notifier.status(f"{ready} workers ready, {self.requests_served} requests served, "
                                 f"generation {self.generation}")
        if now >= self._next_summary:
            self._next_summary = now + _SUMMARY_INTERVAL
            if self._durations:
                durations = sorted(self._durations)
                log.info("last %.0fs: %d requests, median %.2f ms, 99th percentile %.2f ms, %d connections open",
                         _SUMMARY_INTERVAL, self._durations_seen, durations[len(durations) // 2] * 1000,
                         durations[min(len(durations) - 1, int(len(durations) * 0.99))] * 1000,
                         len(self.connections))
                self._durations, self._durations_seen = [], 0

    def _on_event(self, fd: int, mask: int) -> None:
        conn = self.connections.get(fd)
        if conn is not None:
            if conn.state in (_IDLE, _PARTIAL):
                self._examine(conn)
                if mask & _ENDED and conn.state == _PARTIAL:
                    self._close(conn)  # the client has ended its input: its request can never be whole
            elif conn.state == _WRITING:
                self._flush(conn)
        elif fd in self._by_control:
            self._read_generation(self._by_control[fd])
        elif fd in self._by_channel:
            # One report per event: the channel is level-triggered, so epoll reports it again while
            # more wait, and reading until empty would cost a failed read per report.
            self._read_reports(self._by_channel[fd], drain=False)
        elif fd == self._wakeup_r:
            try:
                while os.read(self._wakeup_r, 512):
                    pass
            except BlockingIOError:
                pass
        elif self.listener is not None and fd == self.listener.fileno():
            self._accept(self.listener.sock, tcp=False)
        elif self.http_listener is not None and fd == self.http_listener.fileno():
            self._accept(self.http_listener, tcp=True)
        elif fd in self._refusing:
            self._settle_refusal(fd, expired=False)

    def _poll_timeout(self) -> float:
        if self._recheck:
            return 0.0  # connections wait for their next turn: look at the others, then come back at once
        if self._stop_deadline is not None:
            return 0.1
        now = time.monotonic()
        timeout = 1.0
        if self.notifier.watchdog_interval:
            timeout = min(timeout, self.notifier.watchdog_interval / 4)
        if self._active_workers() < self.config.workers and self._can_spawn():
            timeout = min(timeout, self._next_spawn_at - now)
        for slot in self.workers.values():
            if slot.lingering:
                timeout = min(timeout, _EXPIRY_INTERVAL)  # its requests' deadlines are on the scoreboard
            elif slot.conn is not None:
                timeout = min(timeout, slot.deadline - now)
        if self._refusing:
            timeout = min(timeout, min(until for _sock, until, _error in self._refusing.values()) - now)
        return max(0.0, timeout)

    def _active_workers(self) -> int:
        """Workers of the current generation that are not on their way out."""
        return sum(1 for slot in self.workers.values() if slot.leaving is None and slot.generation == self.generation)

    # ------------------------------------------------------------- signals
    def _install_signals(self) -> None:
        signal.set_wakeup_fd(self._wakeup_w, warn_on_full_buffer=False)
        signal.signal(signal.SIGUSR2, signal.SIG_IGN)  # the master's word to its workers, not to it
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, signal.SIGCHLD, signal.SIGHUP,
                    signal.SIGTTIN, signal.SIGTTOU, signal.SIGUSR1):
            signal.signal(sig, self._queue_signal)

    def _queue_signal(self, signum: int, frame: object) -> None:
        self._signals.append(signum)

    def _handle_signals(self) -> None:
        while self._signals:
            signum = self._signals.pop(0)
            if signum == signal.SIGCHLD:
                self._reap()
            elif signum in (signal.SIGTERM, signal.SIGINT):
                self._begin_stop(graceful=self._stop_deadline is None, reason=signal.Signals(signum).name)
            elif signum == signal.SIGQUIT:
                self._begin_stop(graceful=False, reason="SIGQUIT")
            elif signum == signal.SIGHUP:
                self.reload()
            elif signum == signal.SIGTTIN:
                self.scale(self.config.workers + 1)
            elif signum == signal.SIGTTOU:
                self.scale(self.config.workers - 1)
            elif signum == signal.SIGUSR1:
                self._reopen_logs()
        self._reap()  # also catches exits whose SIGCHLD coalesced with another

    # ------------------------------------------------------------- workers
    def _maintain_workers(self) -> None:
        if self._stop_deadline is not None:
            return
        now = time.monotonic()
        if self._accept_paused_until and now >= self._accept_paused_until:
            self._accept_paused_until = 0.0
            for listener in (self.listener, self.http_listener):
                if listener is not None:
                    self.epoll.register(listener.fileno(), select.EPOLLIN)
        if not self._can_spawn():
            # Its parent is gone and a replacement is loading, or failed to load: try again now and
            # then (the workers still alive serve meanwhile).
            if (self._loading is None and self._reload is None and self._announced_ready
                    and now >= self._next_parent_try):
                self._next_parent_try = now + _PARENT_RETRY
                log.error("generation %d has no parent process to fork its workers; loading it again",
                          self.generation)
                self.reload()
            return
        if self._active_workers() < self.config.workers and now >= self._next_spawn_at:
            # One a loop iteration (the poll timeout is then 0): a spawn waits for two forks of the
            # generation's parent, and clients are served between them.
            self._spawn()

    def _can_spawn(self) -> bool:
        """Whether the serving generation has a parent process to fork its workers."""
        return self._parent is not None and not self._parent.exited and self._parent.state != RETIRED

    def _spawn(self) -> None:
        used = {slot.number for slot in self.workers.values()}
        number = next(n for n in range(1, len(used) + 2) if n not in used)
        boards = {slot.board for slot in self.workers.values()}
        board = next(b for b in range(MAX_SLOTS) if b not in boards)
        self.scoreboard.clear(board)
        self.scoreboard.slot(board).served(0)
        try:
            master_end, worker_end = self._channel_pair()
        except OSError as exc:
            self._throttle.error("cannot create a worker channel: %s; retrying in a second", exc.strerror)
            self._next_spawn_at = time.monotonic() + 1.0
            return
        assert self._parent is not None
        try:
            pid = self._parent.spawn(number, board, worker_end, self.metrics.index)
        except (OSError, GenerationError) as exc:
            master_end.close()
            log.error("cannot start a worker: %s; retrying in a second", exc)
            self._next_spawn_at = time.monotonic() + 1.0
            if isinstance(exc, GenerationError):
                self._replace_parent(str(exc))
            return
        finally:
            worker_end.close()
        master_end.setblocking(False)
        slot = _WorkerSlot(number=number, pid=pid, channel=master_end, born=time.monotonic(),
                           generation=self.generation, board=board)
        self.workers[pid] = slot
        self._by_channel[master_end.fileno()] = slot
        self.epoll.register(master_end.fileno(), select.EPOLLIN)
        log.debug("worker %d spawned (pid %d)", number, pid)

    def _channel_pair(self) -> tuple[socket.socket, socket.socket]:
        try:
            return ipc.channel_pair()
        except OSError as exc:
            # Out of descriptors despite the reserve (something else took them): supervision comes
            # first, so two idle connections make room (their clients reconnect).
            if exc.errno not in (errno.EMFILE, errno.ENFILE) or not (self._evict_for_room() and self._evict_for_room()):
                raise
        log.warning("out of descriptors for a worker channel: closed two idle connections to make room")
        return ipc.channel_pair()

    def _read_reports(self, slot: _WorkerSlot, drain: bool = True) -> None:
        while True:
            try:
                report = ipc.receive_report(slot.channel)
            except RuntimeError as exc:
                log.error("worker %d (pid %d): %s; killing it", slot.number, slot.pid, exc)
                self._kill(slot)
                return
            if report is None:
                return
            op, value = report
            if op == ipc.DONE:
                self._on_done(slot, *value)
            elif op == ipc.READY:
                slot.ready_at = time.monotonic()
                log.info("worker %d (pid %d) ready in %.2fs", slot.number, slot.pid, slot.ready_at - slot.born)
                if slot.leaving is None:
                    self._idle_workers.append(slot)
                else:
                    self._close_channel(slot)
                self._maybe_announce_ready()
            elif op == ipc.FAILED:
                slot.failure = str(value)
            elif op == ipc.MEMORY:
                slot.memory = value
                uss, pss, rss = (round(n / 2**20, 1) for n in value)
                log.info("worker %d (pid %d) memory after warm-up: USS %.1f MiB, PSS %.1f MiB, RSS %.1f MiB",
                         slot.number, slot.pid, uss, pss, rss)
            else:  # the worker's end closed: it is exiting; SIGCHLD will follow
                if self._by_channel.pop(slot.channel.fileno(), None) is not None:
                    self.epoll.unregister(slot.channel.fileno())
                return
            if not drain:
                return

    def _maybe_announce_ready(self) -> None:
        if self._stop_deadline is not None:
            return
        current = [s for s in self.workers.values() if s.generation == self.generation and s.leaving is None]
        ready = sum(1 for s in current if s.ready_at is not None)
        if ready < self.config.workers:
            return
        status = f"{ready} workers ready, generation {self.generation}"
        if self._reload is not None:
            self._finish_reload()
            self.notifier.ready(status)
        elif not self._announced_ready:
            self._announced_ready = True
            log.info("expertd ready: %d workers serving %s", ready, ", ".join(sorted(self.experts)))
            self.notifier.ready(status)
            if self.on_ready is not None:
                self.on_ready()
            self._run_pending_reload()  # one asked for while starting

    def _on_done(self, slot: _WorkerSlot, conn_id: int, close: bool, retiring: bool, linger: bool, served: int,
                 unsent: bytearray | None, unread: bytes | None) -> None:
        slot.requests += served
        self.requests_served += served
        slot.last_done = time.monotonic()
        if not slot.lingering:
            elapsed = slot.last_done - slot.busy_since
            self._durations_seen += 1
            if self._durations_seen <= _SUMMARY_SAMPLES:
                self._durations.append(elapsed)
            else:  # the summary's memory stays bounded at any request rate: a uniform sample (reservoir)
                kept = int(random.random() * self._durations_seen)  # (randrange costs ten times more)
                if kept < _SUMMARY_SAMPLES:
                    self._durations[kept] = elapsed
            if slot.conn is not None and served == 1:
                name = slot.conn.expert or ""
                typical = self._typical.get(name)
                if typical is not None:
                    self._typical[name] = typical + (elapsed - typical) / 8
                elif name in self.experts:  # a name the client sent: only served experts get an entry
                    self._typical[name] = elapsed
        if linger and slot.conn is not None and slot.conn.conn_id == conn_id:
            # The worker keeps the connection for its next request; it hands it back with another DONE.
            slot.lingering, slot.reclaim_sent = True, False
            slot.conn.state = _LINGERING
            # Its requests are the worker's now: an edge per request would wake the master for nothing.
            self.epoll.modify(slot.conn.fd, _ET_QUIET)
            if slot.leaving is not None or self._queue or slot.next_conn is not None or self._stop_deadline is not None:
                self._reclaim(slot)
            return
        conn, slot.conn = slot.conn, None
        upcoming = self._take_next(slot)
        if upcoming is not None:
            if retiring:  # it exits without reading its channel: the request is still whole in its socket
                self._requeue(upcoming)
            else:  # it goes on with the connection handed ahead at once
                slot.conn = upcoming
                slot.busy_since = slot.last_done
                slot.deadline = slot.busy_since + self.config.expert_timeout(upcoming.expert or "")
        if slot.lingering and conn is not None:
            self.epoll.modify(conn.fd, _ET_READ)
        slot.lingering = False
        if retiring:
            slot.leaving = slot.leaving or "retiring"  # it exits now; its replacement is spawned at once
        elif slot.conn is not None:
            pass  # busy with the connection handed ahead
        elif slot.leaving is not None:
            self._close_channel(slot)  # retired while busy (reload, scale down): it may go now
        else:
            self._idle_workers.append(slot)
        if conn is None or conn.conn_id != conn_id:
            log.warning("worker %d reported an unexpected connection %d", slot.number, conn_id)
            return
        conn.unread = unread or b""
        if unsent:
            # The client is slow to take its reply: finish writing it here, not in the worker.
            refusal = self._hold_reply(conn, memoryview(unsent))
            if refusal is not None:
                # Part of the reply is out: an error frame would corrupt the stream; the log says why.
                log.warning("closing connection %d: its client is not taking its reply, and the %d bytes left "
                            "would take the master past %s; raise it if such replies are expected",
                            conn.conn_id, len(unsent), refusal)
                self._close(conn)
                return
            conn.close_when_written = close
            conn.state = _WRITING
            conn.write_deadline = time.monotonic() + self.config.read_timeout
            self.epoll.modify(conn.fd, _ET_READ_WRITE)
            self._flush(conn)
        elif close or self._stop_deadline is not None:
            self._close(conn)
        else:
            self._rest(conn, time.monotonic())
            # Anything that arrived while the worker held the connection raised
            # its edge then; look now rather than wait for another.
            self._examine(conn)

    def _reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            slot = self.workers.pop(pid, None)
            if slot is not None:
                self._on_worker_exit(slot, status)
                continue
            parent = self._generations.pop(pid, None)
            if parent is not None:
                self._on_parent_exit(parent, status)

    def _on_worker_exit(self, slot: _WorkerSlot, status: int) -> None:
        now = time.monotonic()
        if slot.channel.fileno() >= 0:
            self._read_reports(slot)  # a DONE sent just before dying still counts
        fd = slot.channel.fileno()
        if fd in self._by_channel:
            self.epoll.unregister(fd)
            del self._by_channel[fd]
        slot.channel.close()
        if slot in self._idle_workers:
            self._idle_workers.remove(slot)
        how = _describe_status(status)
        upcoming = self._take_next(slot)
        if upcoming is not None:  # never reached: a worker reports the connection in hand before reading the next
            self._requeue(upcoming)
        self.metrics.retire(slot.board)
        began, _timeout, request_id, writing, expert = self.scoreboard.read(slot.board)
        # A lingering worker that was only waiting on its connection was serving nothing.
        serving = slot.conn is not None and (not slot.lingering or began)
        if serving and not slot.lingering and not began and _exited_cleanly(status) and slot.conn.state == _BUSY \
                and self._still_unread(slot.conn):
            # A worker exits cleanly only between connections, so it never started this one (a
            # SIGTERM as it was handed over): the request is still whole in its socket.
            conn, slot.conn = slot.conn, None
            self._requeue(conn)
            serving = False
        # The expert whose call the worker died in (a served one only: names come from clients).
        # The name the worker decoded (on the scoreboard) over the master's hint from the header.
        blamed = (expert or (None if slot.lingering else slot.conn.expert)) if serving else None
        if slot.leaving is not None:
            log.debug("worker %d (pid %d) %s (%s)", slot.number, slot.pid, how, slot.leaving)
        elif serving:
            log.error("worker %d (pid %d) %s while serving request %d", slot.number, slot.pid, how,
                      request_id if slot.lingering else slot.conn.request_id)
        elif self._stop_deadline is None:
            log.warning("worker %d (pid %d) %s", slot.number, slot.pid, how)
        if slot.conn is not None:
            conn, slot.conn = slot.conn, None
            if slot.lingering:
                self.epoll.modify(conn.fd, _ET_READ)
            if not serving and slot.lingering and conn.speaks == "msgpack" and not _exited_cleanly(status):
                # A lingering worker's wait reads the socket: a request it had just taken out may
                # have died with it.  Closing makes the client send it again (a pooled connection
                # closed before any reply byte is retried at once); taking it back would leave the
                # client waiting for a reply that never comes.
                self._close(conn)
            elif not serving:  # the client lost nothing: the master takes the connection back
                self._rest(conn, now)
                self._recheck.append(conn)
            else:
                if slot.lingering:
                    conn.request_id, conn.expert = request_id, expert or None
                self._answer_lost_request(conn, slot, how, writing)
        if self._stop_deadline is not None:
            return

        booted = slot.ready_at is not None
        if slot.leaving is not None:
            return  # retired, scaled down or killed on purpose: replaced without backoff
        if not booted and self._reload is not None and slot.generation == self.generation:
            self._abort_reload(slot.failure or f"a new worker {how} before it was ready")
            return
        if not booted and not self._announced_ready:
            # A bad expert must not half-start the daemon: stop with its message.
            log.error("%s", slot.failure or f"worker {slot.number} {how} before it was ready")
            self._exit_status = EXIT_WORKER_BOOT_FAILED
            self._begin_stop(graceful=False, reason="a worker failed to start")
            return
        if blamed in self.experts and self.config.quarantine_after and self._count_crash(blamed, now):
            return  # its quarantine holds that expert back, not everyone's respawn backoff
        # Crash loop: a worker that never became ready, or deaths faster than the
        # pool could plausibly need (an expert that kills its worker on every call).
        self._recent_deaths.append(now)
        while self._recent_deaths and now - self._recent_deaths[0] > _DEATH_WINDOW:
            self._recent_deaths.popleft()
        if not booted or len(self._recent_deaths) > max(_DEATHS_PER_WINDOW, 2 * self.config.workers):
            self._fast_failures += 1
            self._last_fast_failure = now
            self._next_spawn_at = now + self._backoff_delay()
            if not self._backoff_logged:
                log.error("workers are dying as fast as they start; respawning with backoff (up to %.0fs)",
                          _BACKOFF_MAX)
                self._backoff_logged = True
        elif self._fast_failures and now - self._last_fast_failure < _QUIET_AFTER_BURST:
            self._next_spawn_at = now + self._backoff_delay()  # the burst is not over: keep the pace down
        else:
            if self._backoff_logged:
                log.info("workers stable again after %d quick failures", self._fast_failures)
            self._fast_failures = 0
            self._backoff_logged = False
            self._next_spawn_at = now

    def _count_crash(self, expert: str, now: float) -> bool:
        """A call to ``expert`` killed its worker: is that the expert's crash loop?

        It is while, since its first crash within quarantine_window, the expert
        answered no more calls than it crashed (kill_worker-like experts answer
        none).  Then the crash counts toward the expert's quarantine (True);
        quarantine_after of them quarantine it.  An expert that mostly answers
        had its workers killed from outside (an operator, the OOM killer): those
        deaths count toward the daemon-wide respawn backoff instead (False).
        """
        quarantine = self._quarantined.get(expert)
        if quarantine is not None and now < quarantine.until:
            return True  # a call queued before the quarantine began
        answered = self.metrics.answered(expert, [slot.board for slot in self.workers.values()])
        crashes = self._crashes.setdefault(expert, deque())
        crashes.append((now, answered))
        while now - crashes[0][0] > self.config.quarantine_window:
            crashes.popleft()
        if answered - crashes[0][1] > len(crashes):
            return False
        if len(crashes) < self.config.quarantine_after:
            return True
        crashes.clear()
        length = self.config.quarantine_time
        if quarantine is not None and now - quarantine.until < quarantine.length:  # again, soon after the last
            length = min(2 * quarantine.length, _QUARANTINE_GROWTH_MAX * self.config.quarantine_time)
        self._quarantined[expert] = _Quarantine(now + length, length, time.time() + length)
        log.error("expert %s: its calls killed %d workers within %gs; refusing calls to it for %gs (quarantine)",
                  expert, self.config.quarantine_after, self.config.quarantine_window, length)
        # Calls a lingering worker serves never pass the master's check: no lingering until it ends.
        self._linger_paused_until = max(self._linger_paused_until, now + length)
        self.scoreboard.pause_lingering(self._linger_paused_until)
        for slot in self.workers.values():
            if slot.lingering:
                self._reclaim(slot)
        return True

    def _quarantine_of(self, expert: str | None) -> _Quarantine | None:
        """The quarantine ``expert`` is in now, if any."""
        quarantine = self._quarantined.get(expert)  # type: ignore[arg-type]
        if quarantine is None or quarantine.over:
            return None
        if time.monotonic() < quarantine.until:
            return quarantine
        quarantine.over = True
        log.info("expert %s: quarantine over; serving its calls again", expert)
        return None

    def _quarantine_message(self, expert: str, quarantine: _Quarantine) -> str:
        left = max(0.0, quarantine.until - time.monotonic())
        return (f"{expert} is quarantined for {left:.0f}s more: its calls killed {self.config.quarantine_after} "
                f"workers within {self.config.quarantine_window:g}s; retry after that, and see the daemon's log")

    def _refuse_quarantined(self, conn: _Connection, quarantine: _Quarantine) -> None:
        """Answer a whole call to a quarantined expert with the error; the connection stays open."""
        expert = conn.expert or ""
        self.metrics.count_failure(expert, Quarantined.code)
        try:
            frame = self._take_frame(conn)
        except OSError:
            self._close(conn)
            return
        if len(frame) != conn.frame_size:
            self._close(conn)
            return
        self._rest(conn, time.monotonic())
        error = Quarantined(self._quarantine_message(expert, quarantine), expert=expert)
        self._answer(conn, protocol.encode_error(conn.request_id, error))

    def _backoff_delay(self) -> float:
        return min(_BACKOFF_MAX, 0.1 * 2 ** (self._fast_failures - 1))

    def _time_out(self, slot: _WorkerSlot) -> None:
        conn = slot.conn
        assert conn is not None
        log.error("worker %d (pid %d) exceeded the %gs timeout of %s (request %d); killing and replacing it",
                  slot.number, slot.pid, self.config.expert_timeout(conn.expert or ""),
                  conn.expert or "(request)", conn.request_id)
        slot.leaving = "timed out"
        self._kill_and_reap(slot)

    def _kill_and_reap(self, slot: _WorkerSlot) -> None:
        """SIGKILL a worker and handle its exit now, so that nothing it writes can follow our reply."""
        self._kill(slot)
        try:
            _pid, status = os.waitpid(slot.pid, 0)
        except ChildProcessError:
            status = 0
        if self.workers.pop(slot.pid, None) is not None:
            self._on_worker_exit(slot, status)

    # ------------------------------------------------ generations, scaling
    def _reclaim(self, slot: _WorkerSlot) -> None:
        """Ask a lingering worker to hand its connection back (it answers with DONE)."""
        if slot.reclaim_sent or slot.channel.fileno() < 0:
            return
        slot.reclaim_sent = True
        # More clients than idle workers: lingering would only make workers change hands
        # twice per request, so it pauses for a moment.
        self.scoreboard.pause_lingering(max(time.monotonic() + _LINGER_PAUSE, self._linger_paused_until))
        try:
            os.kill(slot.pid, signal.SIGUSR2)  # interrupts the worker's wait on the connection (see ipc)
        except OSError:
            pass  # it is exiting; its exit returns the connection

    def _close_channel(self, slot: _WorkerSlot) -> None:
        """Tell an idle worker to exit: it does when its channel closes."""
        fd = slot.channel.fileno()
        if fd < 0:
            return
        if self._by_channel.pop(fd, None) is not None:
            self.epoll.unregister(fd)
        slot.channel.close()

    def _retire(self, slot: _WorkerSlot, reason: str) -> None:
        """Take a worker out of service; it finishes the request in hand first."""
        if slot.leaving is not None:
            return
        slot.leaving = reason
        if slot in self._idle_workers:
            self._idle_workers.remove(slot)
        if slot.lingering:
            self._reclaim(slot)  # it hands the connection back, then its channel is closed
        elif slot.conn is None and slot.ready_at is not None:
            self._close_channel(slot)
        elif slot.ready_at is None:
            self._kill(slot)  # still booting: nothing to finish

    def scale(self, workers: int) -> None:
        """Run ``workers`` workers from now on (TTIN/TTOU, expertctl workers N)."""
        workers = max(1, workers)
        if workers == self.config.workers:
            return
        log.info("scaling from %d to %d workers", self.config.workers, workers)
        self.config.workers = workers
        if self._loading is not None:
            self._loading.config.workers = workers  # the operator's word holds for the generation loading too
        if self._reload is not None:
            self._reload.config.workers = workers  # ... and for the old one, should the new one fail to start
        current = [s for s in self.workers.values() if s.generation == self.generation and s.leaving is None]
        # Retire the idle ones first, then the youngest.
        current.sort(key=lambda s: (s.conn is not None, -s.born))
        for slot in current[workers:]:
            self._retire(slot, "scaled down")
        self._maybe_announce_ready()  # fewer workers to wait for, during start-up or a reload

    def reload(self, waiter: tuple[_Connection, int] | None = None) -> None:
        """HUP or RELOAD: re-read the config and load the experts into a new generation.

        A new generation's parent process loads the experts while this loop goes on
        serving with the old one; once loaded, its workers start, and the old
        generation retires when every new worker is ready (finishing the requests
        in hand).  If the config or the experts fail to load, loading takes longer
        than reload_timeout, or a new worker fails to start, the old generation
        keeps serving.  A reload asked for while one runs is remembered (once) and
        runs when that one ends, so that an edit made after the first HUP is not
        lost.  ``waiter``, a RELOAD request, is answered when its load ends.
        """
        if waiter is not None:
            self._pending_waiters.append(waiter)
        if self._stop_deadline is not None:
            return
        if not self._announced_ready or self._loading is not None or self._reload is not None:
            if not self._reload_pending:
                log.info("reload requested %s; it runs when that ends",
                         "while one is in progress" if self._announced_ready
                         else "before the daemon finished starting")
            self._reload_pending = True
            return
        self._begin_reload()

    def _run_pending_reload(self) -> None:
        if (self._reload_pending and self._loading is None and self._reload is None and self._announced_ready
                and self._stop_deadline is None):
            self._begin_reload()

    def _begin_reload(self) -> None:
        from expertd.config import load_config

        self._reload_pending = False
        waiters, self._pending_waiters = self._pending_waiters, []
        self.notifier.reloading()
        log.info("reloading %s", self.config.path)
        try:
            config = load_config(self.config.path, self.overrides)
        except ConfigError as exc:
            self._reload_failed(str(exc), waiters)
            return
        if config.socket != self.config.socket:
            log.warning("the socket path changed to %s; that takes a restart, keeping %s",
                        config.socket, self.config.socket)
            config.socket = self.config.socket
        if (config.http_listen, config.token) != (self.config.http_listen, self.config.token):
            log.warning("http_listen or token changed; that takes a restart, keeping the listener and "
                        "token in force")
            config.http_listen, config.token = self.config.http_listen, self.config.token
        try:
            loading = self._start_generation(self.generation + 1, config)
        except OSError as exc:
            self._reload_failed(f"cannot start a process to load the new generation: {exc.strerror}", waiters)
            return
        loading.waiters = waiters
        self._loading = loading
        self._by_control[loading.control.fileno()] = loading
        self.epoll.register(loading.control.fileno(), select.EPOLLIN)

    def _start_generation(self, number: int, config: Config) -> Generation:
        """Fork the parent process that loads generation ``number`` (it holds none of the master's descriptors)."""
        own = [self.epoll.fileno(), self._wakeup_r, self._wakeup_w, *self.connections, *self._refusing,
               *self._by_channel, *self._by_control]
        own += [self._spare_fd] if self._spare_fd is not None else []
        own += self._activated  # (socket activation: adopted only later, in run, for generation 1)
        own += [listener.fileno() for listener in (self.listener, self.http_listener) if listener is not None]
        own += [parent.control.fileno() for parent in self._generations.values() if parent.control.fileno() >= 0]
        parent = Generation.start(number, config, (self.scoreboard, self.metrics), own)
        self._generations[parent.pid] = parent
        log.debug("generation %d loading in process %d", number, parent.pid)
        return parent

    def _read_generation(self, loading: Generation) -> None:
        """Reports of a parent loading its generation: keep-alives, then LOADED or FAILED."""
        while loading is self._loading:
            report = loading.receive()
            if report is None:
                return
            op, value = report
            if op == KEEPALIVE:
                self.notifier.keep_waiting()  # preparing a model: systemd waits on
            elif op == LOADED:
                self._loaded(loading)
            elif op == FAILED:
                self._load_failed(loading, str(value))
            else:  # its end closed: it exited, and its exit status (reaped next) says how
                self._stop_watching(loading)
                return

    def _stop_watching(self, parent: Generation) -> None:
        if self._by_control.pop(parent.control.fileno(), None) is not None:
            self.epoll.unregister(parent.control.fileno())

    def _loaded(self, loading: Generation) -> None:
        self._stop_watching(loading)
        self._loading = None
        self._reload = _Reload(self.config, self.experts, self._parent, self.generation)
        self.config, self.experts, self._parent = loading.config, loading.experts, loading
        for name in self.experts:
            self.metrics.add_expert(name)  # before the new generation forks: its workers count it
        self.generation = loading.number
        log.info("generation %d loaded (%d experts) in %.1fs; starting %d workers", self.generation,
                 len(self.experts), time.monotonic() - loading.started, self.config.workers)
        self._answer_waiters(loading.waiters, {"generation": self.generation, "reloading": True,
                                               "last_reload": self.last_reload})

    def _load_failed(self, loading: Generation, reason: str) -> None:
        if loading is not self._loading:
            return
        self._stop_watching(loading)
        self._loading = None
        loading.kill()  # it may be stuck in an import: nothing it holds is needed
        self._reload_failed(reason, loading.waiters)

    def _finish_reload(self) -> None:
        assert self._reload is not None
        old = [slot for slot in self.workers.values() if slot.generation < self.generation]
        for slot in old:
            self._retire(slot, f"replaced by generation {self.generation}")
        saved, self._reload = self._reload, None
        if saved.parent is not None:
            saved.parent.close()  # it forks no more workers: it exits, and its modules and models with it
        self.last_reload = {"ok": True, "at": time.time(), "generation": self.generation, "error": None}
        self._count_base_descriptors()  # the new experts' modules may keep files open here
        log.info("reload done: generation %d serving; %d old workers retiring", self.generation, len(old))
        self._run_pending_reload()

    def _count_base_descriptors(self) -> None:
        """Count again the descriptors open besides connections, refused peers and channels."""
        count = _open_descriptors()
        if count is not None:
            self._fd_base = count - len(self.connections) - len(self._refusing) - len(self._by_channel)

    def _abort_reload(self, reason: str) -> None:
        assert self._reload is not None
        saved, self._reload = self._reload, None
        for slot in [s for s in self.workers.values() if s.generation == self.generation]:
            self._retire(slot, "reload aborted")
        if self._parent is not None:
            self._parent.kill()
        self.config, self.experts, self._parent, self.generation = (
            saved.config, saved.experts, saved.parent, saved.generation)
        self._reload_failed(reason)

    def _reload_failed(self, reason: str, waiters: list[tuple[_Connection, int]] = ()) -> None:
        log.error("reload failed; generation %d keeps serving: %s", self.generation, reason)
        self.last_reload = {"ok": False, "at": time.time(), "generation": self.generation, "error": reason}
        self.notifier.ready(f"reload failed: {reason}"[:200])
        self._answer_waiters(waiters, {"generation": self.generation, "reloading": False,
                                       "last_reload": self.last_reload})
        self._run_pending_reload()

    def _answer_waiters(self, waiters: list[tuple[_Connection, int]], reply: dict) -> None:
        for conn, request_id in waiters:
            if conn.state != _WAITING:
                continue  # closed meanwhile
            self._rest(conn, time.monotonic())
            self._answer(conn, protocol.encode_frame(protocol.RESULT, request_id, protocol.pack(reply)))

    def _on_parent_exit(self, parent: Generation, status: int) -> None:
        parent.exited = True
        how = _describe_status(status)
        if parent is self._loading:
            self._read_generation(parent)  # its last words come first: FAILED, or LOADED just before it died
            if parent is self._loading:
                self._load_failed(parent, f"the process loading generation {parent.number} {how}")
        if parent is self._parent and parent.state != RETIRED and self._stop_deadline is None:
            self._replace_parent(f"generation {parent.number}'s parent process {how}")
        elif parent is not self._parent:
            log.debug("generation %d's parent (pid %d) %s", parent.number, parent.pid, how)
        if parent.control.fileno() >= 0:
            self._stop_watching(parent)
            parent.close()

    def _replace_parent(self, reason: str) -> None:
        """The serving generation's parent is gone or stuck: load the config again to get a new one."""
        if self._parent is None or self._parent.state == RETIRED or self._stop_deadline is not None:
            return
        self._parent.kill()
        if not self._announced_ready:  # starting: there is no generation to fall back on
            log.error("%s before the workers were ready", reason)
            self._exit_status = EXIT_WORKER_BOOT_FAILED
            self._begin_stop(graceful=False, reason="the experts' process failed")
        elif self._reload is not None:  # a new generation starting its workers: the old one takes over again
            self._abort_reload(reason)
        else:
            log.error("%s; loading the generation again to fork its workers", reason)
            self.reload()

    def _reopen_logs(self) -> None:
        """USR1: reopen log files (after logrotate moved them), here and in every worker."""
        try:
            reopen_log_files()
        except OSError as exc:
            log.error("cannot reopen the log file %s: %s", exc.filename, exc.strerror)
            return
        for pid in [*self.workers, *self._generations]:  # (a generation's parent: for the workers it forks later)
            try:
                os.kill(pid, signal.SIGUSR1)
            except ProcessLookupError:
                pass
        log.info("log files reopened")

    def _answer_lost_request(self, conn: _Connection, slot: _WorkerSlot, how: str, writing: bool) -> None:
        """Tell the caller why its request died with its worker, unless reply bytes may be out already."""
        if conn.expert is not None and not writing:  # once writing, the worker has counted the call
            self.metrics.count_failure(conn.expert, "timeout" if slot.leaving == "timed out" else "worker_lost")
        if writing:
            self._close(conn)  # part of a reply may be out: an error frame would corrupt the stream
        elif slot.leaving == "timed out":
            limit = self.config.expert_timeout(conn.expert or "")
            self._fail(conn, RequestTimeout(
                f"{conn.expert or 'the request'} did not answer within its {limit:g}s timeout; "
                "the worker was replaced", expert=conn.expert))
        elif self._stop_deadline is not None:
            self._fail(conn, ShuttingDown("the daemon stopped before answering; retry when it is back"))
        else:
            self._fail(conn, WorkerLost(f"the worker serving this request {how}; the request can be retried"))

    def _kill(self, slot: _WorkerSlot) -> None:
        try:
            os.kill(slot.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    # --------------------------------------------------------- connections
    def _accept(self, listener: socket.socket, tcp: bool) -> None:
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
                pid = uid = gid = _NO_PEER
                groups: frozenset[int] = frozenset()
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # replies are whole: send at once
            else:
                try:
                    pid, uid, gid = _PEERCRED.unpack(
                        sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size))
                except OSError:
                    sock.close()
                    continue
                # Supplementary groups as the kernel recorded them at connect (never looked up later by
                # pid, which another process may have by then); read only when a gid list is set.
                groups = _peer_groups(sock) if self._access.uses_groups else frozenset()
                refusal = self._peer_refusal(uid, gid, pid, groups)
                if refusal is not None:
                    self._refuse_peer(sock, refusal)
                    continue
            if not self._make_room(uid, gid, groups):
                self._refuse_at_accept(sock, tcp, Overloaded(
                    "the daemon holds as many connections as it may, none of them idle; retry shortly"))
                continue
            # The descriptor stays blocking: every read and write of the master passes
            # MSG_DONTWAIT instead, and the file's blocking mode (shared with the worker it
            # is handed to) is what lets a lingering worker wait in a plain read. No Python
            # timeout either (an expert module may have set a default one): with a timeout,
            # Python polls before each call, MSG_DONTWAIT or not.
            sock.settimeout(None)
            conn = _Connection(conn_id=self._next_conn_id, sock=sock, fd=sock.fileno(), last_active=time.monotonic(),
                               tcp=tcp, speaks="http" if tcp else "", uid=uid, gid=gid, pid=pid, groups=groups)
            self._next_conn_id += 1
            self.connections[conn.fd] = conn
            bucket = self._by_uid.get(uid)
            if bucket is None:
                bucket = self._by_uid[uid] = OrderedDict()
            bucket[conn.fd] = conn
            self.epoll.register(conn.fd, _ET_READ)

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
        self._throttle.error("cannot accept connections: %s, with %d open (raise the open-file limit or lower "
                             "max_connections)", exc.strerror, len(self.connections))
        if exc.errno == errno.EMFILE:
            # Every descriptor is in use (the limit may have been lowered: prlimit): what is not a
            # connection, a refused peer or a channel is the base.
            self._fd_limit = file_limit()
            self._fd_base = max(self._fd_base, self._fd_limit - len(self.connections) - len(self._refusing)
                                - len(self._by_channel))
            limit = self._connection_limit()
            freed = False
            while len(self.connections) >= limit and self._evict_for_room():
                freed = True
            if freed:
                return True
        sock = None
        if self._spare_fd is not None:
            os.close(self._spare_fd)
            try:
                sock, _addr = listener.accept()
            except OSError:
                pass
            if sock is not None:
                self._refuse_at_accept(sock, tcp, Overloaded("the daemon is out of file descriptors; retry shortly"))
            self._spare_fd = _open_spare()
        if sock is not None and self._spare_fd is not None:
            return True
        if self._spare_fd is None:
            for paused in (self.listener, self.http_listener):
                if paused is not None and not self._accept_paused_until:
                    self.epoll.unregister(paused.fileno())
            self._accept_paused_until = time.monotonic() + 1.0
        return False

    def _peer_refusal(self, uid: int, gid: int, pid: int, groups: frozenset[int]) -> AccessDenied | None:
        """Check a Unix peer's credentials against allow_uids/allow_gids: None, or its refusal (logged)."""
        if self._access.allows(uid, gid, groups):
            return None
        self._throttle.warning("refused a connection from uid %d (pid %d): not in allow_uids or allow_gids",
                               uid, pid, cause=("refused", uid))
        return AccessDenied(f"uid {uid} may not use this expertd; ask for it to be added to allow_uids or allow_gids")

    def _refuse_peer(self, sock: socket.socket, refusal: AccessDenied) -> None:
        """Answer a refused peer and close: at once if its first bytes say its protocol, else soon.

        It has not necessarily sent anything yet, and the refusal should go out in
        the protocol it speaks (an HTTP client reads a msgpack frame as garbage).
        So it waits, up to _REFUSAL_WAIT, outside the connection table (it never
        counts against max_connections), with at most _REFUSAL_PEN others;
        past either bound it gets the msgpack frame, which the client library
        reports as AccessDenied.
        """
        head = _peek_now(sock)
        if head is not None and _undecided(head) and len(self._refusing) < _REFUSAL_PEN:
            sock.settimeout(None)
            self._refusing[sock.fileno()] = (sock, time.monotonic() + _REFUSAL_WAIT, refusal)
            self.epoll.register(sock.fileno(), _ET_READ)
            return
        _answer_and_close(sock, refusal, head)

    def _settle_refusal(self, fd: int, expired: bool) -> None:
        """A refused peer sent something (or its wait is over): answer it and close."""
        sock, _until, refusal = self._refusing[fd]
        head = _peek_now(sock)
        if not expired and head is not None and _undecided(head):
            return
        del self._refusing[fd]
        try:
            self.epoll.unregister(fd)
        except (OSError, ValueError):
            pass
        _answer_and_close(sock, refusal, head)

    def _refuse_at_accept(self, sock: socket.socket, tcp: bool, error: RemoteError) -> None:
        """Refuse a connection just accepted, in the protocol its first bytes say (if any arrived yet)."""
        _answer_and_close(sock, error, b"GET " if tcp else _peek_now(sock))

    # ----------------------------------------------------- connection limits
    def _connection_limit(self) -> int:
        """max_connections, or fewer where the open-file limit leaves less room.

        Kept free: what was open before serving, a channel per worker (twice the
        pool: a reload runs two generations), a channel pair being made, the
        refused peers awaited, the control reserve and a margin.
        """
        workers = max(self.config.workers, len(self.workers))
        room = (self._fd_limit - self._fd_base - 2 * workers - 2 - _REFUSAL_PEN - _CONTROL_RESERVE - _FD_MARGIN)
        return max(1, min(self.config.max_connections, room))

    def _per_uid_limit(self, limit: int) -> int:
        per_uid = self.config.max_connections_per_uid
        return max(1, limit // 2) if per_uid is None else min(per_uid, limit)

    def _make_room(self, uid: int, gid: int, groups: frozenset[int]) -> bool:
        """Whether a new connection of ``uid`` may be held, after closing an idle one if it must."""
        limit = self._connection_limit()
        per_uid = self._per_uid_limit(limit)
        bucket = self._by_uid.get(uid)
        held = len(bucket) if bucket is not None else 0
        if held >= per_uid:
            if bucket is not None and self._evict_idle(bucket):
                self._throttle.warning("uid %d holds max_connections_per_uid (%d) connections: closing its "
                                       "longest-idle connection for each new one", uid, per_uid,
                                       cause=("per uid", uid))
            elif not self._may_overflow(uid, gid, groups, held, per_uid):
                self._throttle.warning("uid %d holds max_connections_per_uid (%d) connections, none of them idle: "
                                       "refusing its new ones (overloaded)", uid, per_uid, cause=("per uid", uid))
                return False
        if len(self.connections) >= limit:
            if self._evict_for_room():
                self._throttle.warning("max_connections (%d) reached: closing the longest-idle connection of the "
                                       "user holding the most for each new one", limit, cause="max_connections")
            elif not self._may_overflow(uid, gid, groups, len(self.connections), limit):
                self._throttle.warning("max_connections (%d) reached with no connection idle: refusing new "
                                       "connections (overloaded)", limit, cause="max_connections")
                return False
        return True

    def _may_overflow(self, uid: int, gid: int, groups: frozenset[int], held: int, limit: int) -> bool:
        """Whether a controller's connection may pass a limit, into the few kept for expertctl."""
        return (uid != _NO_PEER and held < limit + _CONTROL_RESERVE
                and self._access.controls(uid, gid, groups))

    def _evict_for_room(self) -> bool:
        """Close one idle connection: the longest-idle of the user holding the most connections (then the next)."""
        for bucket in sorted(self._by_uid.values(), key=len, reverse=True):
            if self._evict_idle(bucket):
                return True
        return False

    def _evict_idle(self, bucket: OrderedDict[int, _Connection]) -> bool:
        """Close the longest-idle connection in ``bucket``; False if none of them is idle.

        Its client sees the connection closed with no request in flight: the
        client library reconnects and sends its next request on a new one.  A
        connection whose next request has begun to arrive is not idle, nor is
        one that has not sent its first request yet, for _FRESH_GRACE.
        """
        victim = None
        fresh_since = time.monotonic() - _FRESH_GRACE
        for conn in bucket.values():
            if conn.state != _IDLE or conn.unread or (conn.frame_size == 0 and conn.last_active > fresh_since):
                continue
            try:
                arrived = conn.sock.recv(1, _PEEK_NOW)
            except BlockingIOError:
                arrived = b""
            except OSError:
                victim = conn
                break
            if arrived:
                self._recheck.append(conn)  # a request is arriving: the loop looks at it
                continue
            victim = conn
            break
        if victim is None:
            return False
        log.debug("closing connection %d of uid %d, idle for %.1fs, to make room", victim.conn_id, victim.uid,
                  time.monotonic() - victim.last_active)
        self._close(victim)
        return True

    def _rest(self, conn: _Connection, now: float) -> None:
        """The connection is idle from ``now``: the last of its user's connections to be closed for room."""
        conn.state = _IDLE
        conn.last_active = now
        try:
            self._by_uid[conn.uid].move_to_end(conn.fd)
        except KeyError:
            pass

    @property
    def _access(self) -> _Access:
        """Who may connect, control and read status, by the config in force (reloads change it)."""
        if self._access_of is None or self._access_of[0] is not self.config:
            self._access_of = (self.config, _Access(self.config))
        return self._access_of[1]

    def _examine(self, conn: _Connection) -> None:
        """Decide, without reading, whether ``conn`` has a whole request waiting."""
        if conn.inbuf is not None:
            self._gather(conn)
            return
        unread = conn.unread
        ended = False  # the client has sent all it will (end of file after what a worker handed back)
        try:
            # One peek usually sees the whole of a small request, saving the FIONREAD call.
            peeked = conn.sock.recv(_PEEK_SIZE, _PEEK_NOW)
        except BlockingIOError:
            if not unread:
                return
            peeked = b""  # nothing more yet: what a worker handed back may be whole
        except OSError:
            self._close(conn)
            return
        else:
            if not peeked:
                if not unread:
                    self._close(conn)  # the client hung up
                    return
                ended = True  # what it sent before ending is still answered
        head = unread + peeked if unread else peeked
        if not conn.speaks:  # a connection's first bytes decide what it speaks, for its whole life
            if protocol.MAGIC.startswith(head[:2]):
                conn.speaks = "msgpack"
            elif http.looks_like_http(head):
                conn.speaks = "http"
            elif len(head) < 4 and http.could_be_http(head):
                self._mark_partial(conn)
                return
            else:
                self._fail(conn, BadRequest("bad frame magic: this socket speaks the expertd protocol "
                                            "(docs/protocol.md) and HTTP (docs/http.md)"))
                return
        if conn.speaks == "http":
            self._examine_http(conn, head)
            return
        if len(head) < protocol.HEADER_SIZE:
            self._close_or_wait(conn, ended)
            return
        try:
            kind, request_id, length = protocol.parse_header(head[: protocol.HEADER_SIZE])
        except protocol.ProtocolError as exc:
            self._fail(conn, BadRequest(str(exc)))
            return
        conn.request_id = request_id
        conn.expert = protocol.expert_name_hint(head[protocol.HEADER_SIZE:]) if kind == protocol.CALL else None
        if kind not in protocol.REQUEST_KINDS:
            self._fail(conn, BadRequest(f"unknown request kind 0x{kind:02x}; see docs/protocol.md"))
            return
        if length > self.config.max_frame:
            self._fail(conn, FrameTooLarge(
                f"request body of {length} bytes exceeds max_frame ({self.config.max_frame} bytes)"
            ))
            return
        conn.frame_size = protocol.HEADER_SIZE + length
        if len(head) < conn.frame_size and len(peeked) == _PEEK_SIZE:
            queued = len(unread) + protocol.queued_bytes(conn.fd)
        else:
            queued = len(head)
        if queued >= conn.frame_size and kind in _MASTER_KINDS:
            self._control(conn, kind, request_id)
            return
        if queued >= conn.frame_size and self._quarantined and kind == protocol.CALL:
            quarantine = self._quarantine_of(conn.expert)
            if quarantine is not None:
                self._refuse_quarantined(conn, quarantine)
                return
        if queued >= conn.frame_size and not unread:
            conn.state = _QUEUED  # whole in the socket: the worker reads it
            self._queue.append(conn)
            return
        if kind in _MASTER_KINDS:
            self._close_or_wait(conn, ended)  # control requests are tiny: wait for the rest
            return
        # Arriving in pieces, or begun in bytes a worker handed back: gathered here and handed
        # over as a frame.  (The socket may never hold all of a request sent in small pieces:
        # they fill the queue's accounting long before its byte count.)
        conn.inbuf, conn.unread = bytearray(), b""
        if not self._hold_gathered(conn, len(unread)):
            self._fail(conn, Overloaded("too many large requests are arriving slowly; retry in a moment"))
            return
        conn.inbuf += unread
        self._gather(conn)

    def _examine_http(self, conn: _Connection, head: bytes) -> None:
        """An HTTP request: refuse, answer here (GETs), or queue for a worker once it is whole."""
        try:
            request = http.scan_head(head)
            if request is None and len(head) == _PEEK_SIZE:  # a long head: look further, once it grew
                queued = protocol.queued_bytes(conn.fd)
                if queued <= conn.head_scanned:
                    return
                conn.head_scanned = queued
                head = conn.sock.recv(http.MAX_HEAD, _PEEK_NOW)
                request = http.scan_head(head)
            if request is None:
                self._mark_partial(conn)
                return
        except http.HttpRefusal as refusal:  # the framing itself is bad: nothing more can be read
            self._fail(conn, refusal)
            return
        except OSError:
            self._close(conn)
            return
        conn.request_id, conn.expert, conn.frame_size, conn.head_scanned = 0, request.expert, request.size, 0
        queued = len(head) if len(head) >= request.size else protocol.queued_bytes(conn.fd)
        try:
            http.admit(request, tcp=conn.tcp, token=self.config.token)
            http.check_route(request, self.experts, self.config.max_frame)
            quarantine = self._quarantine_of(request.expert) if self._quarantined else None
            if quarantine is not None:
                raise http.HttpRefusal(503, Quarantined.code, self._quarantine_message(request.expert, quarantine),
                                       headers=(("Retry-After", str(math.ceil(quarantine.until - time.monotonic()))),))
            if request.route not in http.WORKER_ROUTES and request.body_size:
                raise http.HttpRefusal(400, "bad_request", f"{request.method} /{request.route} takes no body")
        except http.HttpRefusal as refusal:
            if queued < request.size and request.body_size <= _REFUSED_BODY_WAIT:
                self._mark_partial(conn)  # read the whole request first, so that closing cannot reset the reply
                return
            if refusal.code == "unknown_expert":
                self.metrics.count_failure(None, refusal.code)
            elif refusal.code == Quarantined.code:
                self.metrics.count_failure(request.expert, refusal.code)
            self._fail(conn, refusal)
            return
        if request.route not in http.WORKER_ROUTES:
            if queued >= request.size:
                self._answer_http(conn, request.route)
            else:
                self._mark_partial(conn)
            return
        if queued >= request.size:
            conn.state = _QUEUED  # whole in the socket: the worker reads it
            self._queue.append(conn)
            return
        if request.expects_continue and queued <= request.head_size:
            try:  # curl waits a second for this before sending a body over 1 KiB
                conn.sock.send(http.CONTINUE, socket.MSG_DONTWAIT)
            except OSError:
                pass
        conn.inbuf = bytearray()
        self._gather(conn)

    def _drain(self, conn: _Connection) -> None:
        # Closing a socket with unread input resets the connection, and the reply with it.
        try:
            for _ in range(16):
                if not conn.sock.recv(65536, socket.MSG_DONTWAIT):
                    break
        except OSError:
            pass

    def _answer_http(self, conn: _Connection, route: str) -> None:
        """GET /health, /experts and /metrics, answered here: they need no worker."""
        try:
            raw = conn.sock.recv(conn.frame_size, socket.MSG_DONTWAIT)  # whole in the socket: checked
            request = http.parse_request(raw)
        except OSError:
            self._close(conn)
            return
        except http.HttpRefusal as refusal:
            self._fail(conn, refusal)
            return
        self._rest(conn, time.monotonic())
        if not self._access.reads(conn.uid, conn.gid, conn.groups):
            self._throttle.warning("refused GET /%s from uid %d (pid %d): public_status = no", route, conn.uid,
                                   conn.pid, cause=("control refused", conn.uid))
            who = "connections on http_listen" if conn.tcp else f"uid {conn.uid}"
            reply, keep_alive = http.error_response(request, AccessDenied(
                f"{who} may not read /{route} (public_status = no: only control_uids / control_gids, root and the "
                "daemon's user may)"))
            self._finish_http(conn, reply, keep_alive)
            return
        status, content_type = 200, http.JSON_TYPE
        if route == "health":
            ready = sum(1 for s in self.workers.values() if s.ready_at is not None and s.leaving is None)
            healthy = ready > 0 and self._stop_deadline is None
            status = 200 if healthy else 503
            body = http.dumps({"status": "ok" if healthy else "unavailable", "workers_ready": ready,
                               "workers_wanted": self.config.workers, "generation": self.generation,
                               "stopping": self._stop_deadline is not None})
        elif route == "experts":
            body = http.dumps(list(self.experts.values()))
        else:
            body, content_type = self._metrics_text().encode("utf-8"), http.METRICS_TYPE
        reply, keep_alive = http.respond(request, status, body, content_type)
        self._finish_http(conn, reply, keep_alive)

    def _finish_http(self, conn: _Connection, reply: bytes, keep_alive: bool) -> None:
        conn.close_when_written = not keep_alive
        self._send_reply(conn, reply)
        if conn.state == _IDLE:
            if keep_alive:
                self._recheck.append(conn)  # a request pipelined behind this one: look in the main loop
            else:
                self._close(conn)

    def _metrics_text(self) -> str:
        # Reading every process's smaps takes milliseconds: scrapes share a reading for a few seconds.
        now = time.monotonic()
        if self._status_cache is None or now - self._status_cache[0] > _METRICS_MEMORY_TTL:
            self._status_cache = (now, self.status())
        status = self._status_cache[1]
        states = {"booting": 0, "idle": 0, "busy": 0, "retiring": 0}
        for slot in self.workers.values():
            states[self._worker_state(slot)] += 1
        memory = {("workers", kind): status["memory"][f"workers_{kind}"] for kind in ("rss", "pss", "uss")}
        memory.update({("master", kind): status["master"].get(kind, 0) for kind in ("rss", "pss", "uss")})
        return self.metrics.render([slot.board for slot in self.workers.values()], {
            "workers": states, "workers_wanted": self.config.workers, "connections": len(self.connections),
            "queued": sum(1 for conn in self._queue if conn.state == _QUEUED), "generation": self.generation,
            "memory": memory, "uptime": time.time() - self.started_at, "version": __version__,
        })

    def _control(self, conn: _Connection, kind: int, request_id: int) -> None:
        """Answer a request of the master's here: status, list, and (for control_uids/gids) reload, stop, scale."""
        try:
            frame = self._take_frame(conn)
            if len(frame) != conn.frame_size:
                raise ValueError("short read")
            body = protocol.unpack(frame[protocol.HEADER_SIZE:]) if len(frame) > protocol.HEADER_SIZE else None
        except (OSError, ValueError) as exc:
            self._fail(conn, BadRequest(f"bad control request: {exc}"))
            return
        self._rest(conn, time.monotonic())
        refusal = self._control_refusal(conn, kind)
        if refusal is not None:
            self._answer(conn, protocol.encode_error(request_id, refusal))
            return
        after = None
        if kind == protocol.STATUS:
            reply = self.status()
        elif kind == protocol.LIST:
            reply = list(self.experts.values())
        elif kind == protocol.RELOAD:
            log.info("control: RELOAD from uid %d (pid %d)", conn.uid, conn.pid)
            conn.state = _WAITING  # answered with the outcome once the new generation loads or fails
            self.reload(waiter=(conn, request_id))
            return
        elif kind == protocol.SCALE:
            if not isinstance(body, int) or isinstance(body, bool) or not 1 <= body <= self._max_workers:
                self._fail(conn, BadRequest(f"workers N needs a whole number 1 ≤ N ≤ {self._max_workers}"))
                return
            log.info("control: SCALE to %d workers from uid %d (pid %d)", body, conn.uid, conn.pid)
            self.scale(body)
            reply = {"workers": self.config.workers}
        else:  # STOP
            log.info("control: STOP from uid %d (pid %d)", conn.uid, conn.pid)
            reply = {"stopping": True, "pid": os.getpid()}
            after = lambda: self._begin_stop(graceful=True, reason="expertctl stop")  # noqa: E731
        self._send_reply(conn, protocol.encode_frame(protocol.RESULT, request_id, protocol.pack(reply)))
        if after is not None:
            after()
        elif conn.state == _IDLE:
            self._recheck.append(conn)  # a request pipelined behind this one: look in the main loop

    def _control_refusal(self, conn: _Connection, kind: int) -> AccessDenied | None:
        """None if the peer may send this request; else the refusal (logged, rate-limited)."""
        access = self._access
        if kind in _READ_KINDS:
            if access.reads(conn.uid, conn.gid, conn.groups):
                return None
            setting = "public_status = no: only control_uids / control_gids, root and the daemon's user may read it"
        elif access.controls(conn.uid, conn.gid, conn.groups):
            return None
        else:
            setting = "control requests need root, the daemon's user, or control_uids / control_gids"
        name = _KIND_NAMES.get(kind, f"0x{kind:02x}")
        self._throttle.warning("control: refused %s from uid %d (pid %d): not in control_uids or control_gids",
                               name, conn.uid, conn.pid, cause=("control refused", conn.uid))
        return AccessDenied(f"uid {conn.uid} may not send {name} to this expertd ({setting}); "
                            f"ask for uid {conn.uid} to be added to control_uids")

    def _take_frame(self, conn: _Connection) -> bytes:
        """Read the request in hand (known to be whole) from what a worker handed back, then the socket."""
        unread, size = conn.unread, conn.frame_size
        if len(unread) >= size:
            conn.unread = unread[size:]
            return unread[:size]
        conn.unread = b""
        return unread + conn.sock.recv(size - len(unread), socket.MSG_DONTWAIT)

    def _answer(self, conn: _Connection, frame: bytes) -> None:
        """Send a reply of the master's own; the connection then takes its next turn (a request pipelined behind)."""
        self._send_reply(conn, frame)
        if conn.state == _IDLE:
            self._recheck.append(conn)  # looked at in the main loop, after the others

    def _send_reply(self, conn: _Connection, frame: bytes) -> None:
        """Write a reply of the master's own; what the socket does not take now goes out as it drains."""
        try:
            sent = conn.sock.send(frame, socket.MSG_DONTWAIT)
        except BlockingIOError:
            sent = 0
        except OSError:
            self._close(conn)
            return
        if sent < len(frame):
            refusal = self._hold_reply(conn, memoryview(frame)[sent:])
            if refusal is not None:
                log.warning("closing connection %d: its client is not taking the master's reply, and holding "
                            "the rest would take the master past %s", conn.conn_id, refusal)
                self._close(conn)
                return
            conn.state = _WRITING
            conn.write_deadline = time.monotonic() + self.config.read_timeout
            self.epoll.modify(conn.fd, _ET_READ_WRITE)

    def _worker_state(self, slot: _WorkerSlot) -> str:
        if slot.leaving is not None:
            return "retiring"
        if slot.ready_at is None:
            return "booting"
        if slot.lingering:
            return "busy" if self.scoreboard.read(slot.board)[0] else "idle"
        return "busy" if slot.conn is not None else "idle"

    def status(self) -> dict:
        """What ``expertctl status`` shows: the master, every worker, memory shared and private."""
        import psutil

        now = time.monotonic()
        workers, totals = [], {"rss": 0, "pss": 0, "uss": 0}
        for slot in sorted(self.workers.values(), key=lambda s: (s.generation, s.number)):
            state = self._worker_state(slot)
            memory = self._memory_reading(slot.pid, now)
            for key in totals:
                totals[key] += memory.get(key, 0)
            workers.append({
                "number": slot.number, "pid": slot.pid, "generation": slot.generation, "state": state,
                "requests": max(slot.requests, self.scoreboard.requests(slot.board)),
                "age_s": round(now - slot.born, 1),
                "last_request_age_s": None if slot.last_done is None else round(now - slot.last_done, 3),
                "handed_ahead": slot.next_conn is not None,  # its next connection waits in its channel
                **memory,
            })
        parents, others = [], {"rss": 0, "pss": 0, "uss": 0}  # the generations' parents, then the master
        for parent in sorted(self._generations.values(), key=lambda p: p.number):
            memory = self._memory_reading(parent.pid, now)
            for key in others:
                others[key] += memory.get(key, 0)
            parents.append({"generation": parent.number, "pid": parent.pid, "state": parent.state,
                            "age_s": round(now - parent.started, 1), **memory})
        master = self._memory_reading(os.getpid(), now)
        for key in others:
            others[key] += master.get(key, 0)
        return {
            "pid": os.getpid(), "version": __version__, "config": self.config.path,
            "socket": self.listener.path if self.listener else self.config.socket,
            "http_listen": "{}:{}".format(*self.config.http_listen) if self.config.http_listen else None,
            "uptime_s": round(time.time() - self.started_at, 1), "generation": self.generation,
            "experts": sorted(self.experts), "workers_wanted": self.config.workers,
            "requests": self.requests_served + sum(  # what lingering workers served and have not reported yet
                max(0, self.scoreboard.requests(s.board) - s.requests) for s in self.workers.values() if s.lingering),
            "connections": len(self.connections),
            "max_connections": (limit := self._connection_limit()),
            "max_connections_per_uid": self._per_uid_limit(limit),
            "last_reload": self.last_reload, "reloading": self._loading is not None or self._reload is not None,
            "workers": workers, "generation_parents": parents, "master": master,
            "quarantined": [{"expert": name, "until": round(q.wall_until, 1), "seconds_left": round(q.until - now, 1)}
                            for name, q in sorted(self._quarantined.items()) if now < q.until],
            "memory": {
                "workers_rss": totals["rss"], "workers_pss": totals["pss"], "workers_uss": totals["uss"],
                # Counted once across the master, the generations' parents and the workers: what the
                # group really costs.
                "total_pss": totals["pss"] + others["pss"],
                "private": totals["uss"] + others["uss"],
                "shared": totals["pss"] + others["pss"] - totals["uss"] - others["uss"],
            },
            "cpu_count": psutil.cpu_count(),
        }

    def _memory_reading(self, pid: int, now: float) -> dict:
        """Process ``pid``'s memory figures, read at most once per _STATUS_MEMORY_TTL."""
        taken, readings = self._memory_readings
        if now - taken > _STATUS_MEMORY_TTL:
            readings = {}  # (also forgets the pids of workers gone since)
            self._memory_readings = (now, readings)
        memory = readings.get(pid)
        if memory is None:
            memory = readings[pid] = _memory_of(pid)
        return memory

    def _gather(self, conn: _Connection) -> None:
        assert conn.inbuf is not None
        conn.last_active = time.monotonic()  # (called when bytes arrive: how long a request stalled is seen here)
        while len(conn.inbuf) < conn.frame_size:
            try:
                data = conn.sock.recv(min(_GATHER_CHUNK, conn.frame_size - len(conn.inbuf)), socket.MSG_DONTWAIT)
            except BlockingIOError:
                self._mark_partial(conn)
                return
            except OSError:
                self._close(conn)
                return
            if not data:
                self._close(conn)
                return
            if not self._hold_gathered(conn, len(data)):
                self._fail(conn, Overloaded("too many large requests are arriving slowly; retry in a moment"))
                return
            conn.inbuf += data
        conn.state = _QUEUED
        self._queue.append(conn)

    def _flush(self, conn: _Connection) -> None:
        """Write more of a reply the worker handed back; the connection is idle again once it is out."""
        assert conn.outbuf is not None
        try:
            while conn.outbuf:
                conn.outbuf = conn.outbuf[conn.sock.send(conn.outbuf, socket.MSG_DONTWAIT):]
        except BlockingIOError:
            return
        except OSError:
            self._close(conn)
            return
        self._release_reply(conn)
        self.epoll.modify(conn.fd, _ET_READ)
        if self._stop_deadline is not None or conn.close_when_written:
            self._close(conn)
            return
        self._rest(conn, time.monotonic())
        self._examine(conn)

    def _close_or_wait(self, conn: _Connection, ended: bool) -> None:
        """A request not whole yet: wait for the rest, unless the client has ended its input."""
        if ended:
            self._close(conn)
        else:
            self._mark_partial(conn)

    def _mark_partial(self, conn: _Connection) -> None:
        if conn.state != _PARTIAL:
            conn.state = _PARTIAL
            conn.partial_since = time.monotonic()

    def _dispatch(self) -> None:
        self._hand_out()
        if self._queue:  # requests wait and no worker is idle: take back the lingering ones
            for slot in self.workers.values():
                if slot.lingering:
                    self._reclaim(slot)
            self._hand_ahead()
        self.scoreboard.set_queued(len(self._queue))

    def _hand_out(self) -> None:
        while self._queue and self._idle_workers:
            conn = self._queue.popleft()
            if conn.state != _QUEUED:
                continue
            if self._quarantined and conn.expert in self._quarantined:
                quarantine = self._quarantine_of(conn.expert)
                if quarantine is not None:  # gathered, or queued before its expert was quarantined
                    self.metrics.count_failure(conn.expert, Quarantined.code)
                    self._fail(conn, Quarantined(self._quarantine_message(conn.expert, quarantine),
                                                 expert=conn.expert))
                    continue
            slot = self._idle_workers.popleft()
            self.scoreboard.clear(slot.board)  # before the hand-over: the worker may begin at once
            try:
                ipc.send_serve(slot.channel, conn.conn_id, conn.fd, conn.inbuf, conn.speaks == "http")
            except OSError as exc:
                if exc.errno in (errno.EPIPE, errno.ECONNRESET, errno.ENOTCONN, errno.EBADF):
                    self._queue.appendleft(conn)  # the worker is gone; SIGCHLD will tell
                    continue
                # Out of descriptors or memory here: keep the worker, refuse this request.
                log.error("cannot hand a request to worker %d: %s", slot.number, exc.strerror)
                self._idle_workers.appendleft(slot)
                self._fail(conn, Overloaded(f"the daemon is short of resources ({exc.strerror}); retry shortly"))
                continue
            self._release_gathered(conn)
            conn.state = _BUSY
            slot.conn = conn
            slot.busy_since = time.monotonic()
            slot.deadline = slot.busy_since + self.config.expert_timeout(conn.expert or "")

    def _hand_ahead(self) -> None:
        """Every worker is busy and requests wait: give each busy worker its next connection now.

        The worker finds it in its channel the moment it reports the one in
        hand, instead of waiting a round trip through the master for it: with
        more clients than workers, that round trip is a large part of each
        request.  Only a request whole in the socket is handed ahead (one the
        master gathered would die with a worker that dies before reaching it;
        this one goes back to the queue), one per worker, and never to a
        worker that lingers or is on its way out.

        Only a worker busy with a short request gets one: an expert whose
        calls typically take under _HAND_AHEAD_UNDER, running for less than
        that.  The connection waits for that request to end, even if another
        worker falls idle first; for short requests that wait is shorter
        than the round trip it saves, and a long one keeps its queue.
        """
        if self._quarantined:
            return  # a call queued for a quarantined expert must meet _hand_out's refusal, not a busy worker
        now = time.monotonic()
        for slot in self.workers.values():
            while self._queue and self._queue[0].state != _QUEUED:
                self._queue.popleft()
            if not self._queue or self._queue[0].inbuf is not None:
                return  # (first come, first served: a gathered request waits for an idle worker)
            if (slot.conn is None or slot.next_conn is not None or slot.lingering or slot.leaving is not None
                    or slot.channel.fileno() < 0 or now - slot.busy_since > _HAND_AHEAD_UNDER
                    or self._typical.get(slot.conn.expert or "", _HAND_AHEAD_UNDER) >= _HAND_AHEAD_UNDER):
                continue
            conn = self._queue[0]
            try:
                ipc.send_serve(slot.channel, conn.conn_id, conn.fd, None, conn.speaks == "http")
            except OSError:
                return  # the worker is gone (SIGCHLD will tell) or the master is short of resources: it waits
            self._queue.popleft()
            conn.state = _BUSY
            slot.next_conn = conn
            self.scoreboard.set_next(slot.board, True)

    def _take_next(self, slot: _WorkerSlot) -> _Connection | None:
        """The connection handed ahead to ``slot``, if any, no longer recorded as waiting there."""
        upcoming, slot.next_conn = slot.next_conn, None
        if upcoming is not None:
            self.scoreboard.set_next(slot.board, False)
        return upcoming

    def _still_unread(self, conn: _Connection) -> bool:
        """Whether the connection's request is still whole in its socket (no worker read any of it)."""
        try:
            return conn.frame_size > 0 and protocol.queued_bytes(conn.fd) >= conn.frame_size
        except OSError:
            return False

    def _requeue(self, conn: _Connection) -> None:
        """A connection handed ahead that its worker never reached: first in the queue again."""
        if conn.state == _BUSY:
            conn.state = _QUEUED
            self._queue.appendleft(conn)

    def _fail(self, conn: _Connection, error: RemoteError | http.HttpRefusal) -> None:
        """Answer the connection's current request with ``error`` (HTTP refusals: HTTP only) and close it."""
        if conn.speaks == "http":
            self._drain(conn)
            self._send_and_close(conn, http.error_response(None, error)[0])
        else:
            self._send_and_close(conn, protocol.encode_error(conn.request_id, error))

    def _send_and_close(self, conn: _Connection, data: bytes) -> None:
        try:
            conn.sock.send(data, socket.MSG_DONTWAIT)
        except OSError:
            pass  # the client is gone or not reading: closing is all that is left
        self._close(conn)

    def _hold_gathered(self, conn: _Connection, size: int) -> bool:
        """Count ``size`` more bytes gathered for ``conn``; False if they do not fit in the gathering budget.

        The accounting of gathered bytes is here and in :meth:`_release_gathered`
        alone.  When the budget is spent, room is made rather than ``conn``
        (which is sending) refused: first gathered requests that have sent
        nothing for _GATHER_STALLED give it up, the longest stalled first; then,
        if ``conn``'s user (peer uid; http_listen's connections are one) holds
        less than half of the budget, the requests of a user holding more than
        half do, even while they trickle in: one user can use the whole budget
        while nobody else needs it, but never keep others from their half.
        """
        budget = _GATHER_BUDGET_FRAMES * self.config.max_frame
        while self._gathered + size > budget:
            gathering = [other for other in self.connections.values()
                         if other.inbuf is not None and other.state == _PARTIAL and other is not conn]
            now = time.monotonic()
            stalled = min(gathering, key=lambda other: other.last_active, default=None)
            if stalled is not None and now - stalled.last_active >= _GATHER_STALLED:
                why = f"its request stalled for {now - stalled.last_active:.1f}s"
                told = f"request stalled for {now - stalled.last_active:.1f}s"
            else:
                stalled = _over_half(gathering, self._gathered_by_uid, conn.uid, budget)
                if stalled is None:
                    return False
                why = f"uid {stalled.uid} holds more than half of it"
                told = "request incomplete while this user held more than half of the room for requests arriving " \
                       "in pieces"
            log.info("closing connection %d: %s while the gathering budget (%d bytes) was needed",
                     stalled.conn_id, why, budget)
            self._fail(stalled, Overloaded(
                f"{told}, and others needed the room it held; send a request without pausing, or retry"))
        self._gathered += size
        self._gathered_by_uid[conn.uid] = self._gathered_by_uid.get(conn.uid, 0) + size
        return True

    def _hold_reply(self, conn: _Connection, rest: memoryview) -> str | None:
        """Keep ``rest`` of a reply to write as ``conn``'s client takes it; else the limit it would break.

        The accounting of bytes held for slow readers is here and in
        :meth:`_release_reply` alone (a per-uid share would be checked here
        too).  A connection holds one reply at most: while it is written, the
        connection's next requests wait in its socket (backpressure).
        """
        size = rest.nbytes
        if size > self.config.max_reply_buffer_per_connection:
            return f"max_reply_buffer_per_connection ({self.config.max_reply_buffer_per_connection} bytes)"
        while self._held_replies + size > self.config.max_reply_buffer:
            # A user holding more than half for slow readers gives way to one holding less (its
            # replies would be cut off like this one otherwise): nobody is kept from their half.
            hog = _over_half([other for other in self.connections.values() if other.held and other is not conn],
                             self._held_by_uid, conn.uid, self.config.max_reply_buffer)
            if hog is None:
                return (f"max_reply_buffer ({self.config.max_reply_buffer} bytes, "
                        f"{self._held_replies} held for other slow readers)")
            self._throttle.warning("dropping the rest of a %d-byte reply for connection %d: uid %d holds more than "
                                   "half of max_reply_buffer (%d bytes) while another user needs room",
                                   hog.held, hog.conn_id, hog.uid, self.config.max_reply_buffer,
                                   cause=("reply over half", hog.uid))
            self._close(hog)
        conn.outbuf, conn.held = rest, size
        self._held_replies += size
        self._held_by_uid[conn.uid] = self._held_by_uid.get(conn.uid, 0) + size
        return None

    def _release_reply(self, conn: _Connection) -> None:
        if conn.held:
            self._held_replies -= conn.held
            _take_from(self._held_by_uid, conn.uid, conn.held)
        conn.outbuf, conn.held = None, 0

    def _release_gathered(self, conn: _Connection) -> None:
        if conn.inbuf is not None:
            self._gathered -= len(conn.inbuf)
            _take_from(self._gathered_by_uid, conn.uid, len(conn.inbuf))
            conn.inbuf = None

    def _close(self, conn: _Connection) -> None:
        if conn.state == _CLOSED:
            return
        self._release_gathered(conn)
        self._release_reply(conn)
        conn.unread = b""
        conn.state = _CLOSED
        self.connections.pop(conn.fd, None)
        bucket = self._by_uid.get(conn.uid)
        if bucket is not None:
            bucket.pop(conn.fd, None)
            if not bucket:
                del self._by_uid[conn.uid]
        try:
            self.epoll.unregister(conn.fd)
        except (OSError, ValueError):
            pass
        conn.sock.close()

    def _expire(self) -> None:
        """Kill workers past their request timeout; close stalled and idle connections; kill stuck boots and loads."""
        now = time.monotonic()
        if self._loading is not None and now > self._loading.deadline:
            self._load_failed(self._loading, (
                f"loading generation {self._loading.number} took longer than reload_timeout "
                f"({self._loading.config.reload_timeout:g}s) and was abandoned; find what hangs at import or in a "
                "before_fork hook, or raise reload_timeout"))
        if self._refusing:
            for fd in [fd for fd, (_sock, until, _error) in self._refusing.items() if now >= until]:
                self._settle_refusal(fd, expired=True)
        for slot in list(self.workers.values()):
            if slot.conn is None:
                continue
            if slot.lingering:
                began, timeout, request_id, _writing, expert = self.scoreboard.read(slot.board)
                # The scoreboard is read without a lock; as a second line of defence against a
                # read that overlapped a write, act only on a request seen overdue at two scans.
                if began and timeout > 0 and now > began + timeout:
                    if slot.overdue == began:
                        slot.conn.request_id, slot.conn.expert = request_id, expert or None
                        self._time_out(slot)
                    slot.overdue = began
                else:
                    slot.overdue = 0.0
            elif now > slot.deadline:
                self._read_reports(slot)  # a report already waiting means it finished in time
                if slot.conn is not None and not slot.lingering and now > slot.deadline:
                    self._time_out(slot)
        if now < self._next_expiry_check:
            return  # a scan of every connection is too dear to run on every loop iteration
        self._next_expiry_check = now + _EXPIRY_INTERVAL
        self._fd_limit = file_limit()  # (prlimit may change it from outside)
        idle_timeout = self.config.idle_timeout
        for conn in list(self.connections.values()):
            if conn.state == _PARTIAL and now - conn.partial_since > self.config.read_timeout:
                self._throttle.info("closing connection %d of uid %d: request incomplete after %.0fs",
                                    conn.conn_id, conn.uid, self.config.read_timeout, cause=("incomplete", conn.uid))
                self._close(conn)
            elif conn.state == _WRITING and now > conn.write_deadline:
                self._throttle.info("closing connection %d of uid %d: the client did not take its reply within %.0fs",
                                    conn.conn_id, conn.uid, self.config.read_timeout, cause=("not taken", conn.uid))
                self._close(conn)
            elif conn.state == _IDLE and idle_timeout and now - conn.last_active > idle_timeout:
                log.debug("closing connection %d: idle for %.0fs", conn.conn_id, idle_timeout)
                self._close(conn)
        for slot in self.workers.values():
            if slot.ready_at is None and now - slot.born > self.config.boot_timeout:
                log.error("worker %d (pid %d) not ready after %.0fs (boot_timeout); killing it",
                          slot.number, slot.pid, self.config.boot_timeout)
                slot.failure = f"worker {slot.number} timed out in its after_fork hooks (boot_timeout)"
                self._kill(slot)

    # ------------------------------------------------------------ stopping
    def _begin_stop(self, graceful: bool, reason: str) -> None:
        now = time.monotonic()
        if self._stop_deadline is None:
            grace = f" (graceful, up to {self.config.graceful_timeout:.0f}s)" if graceful else ""
            log.info("%s: stopping%s", reason, grace)
            self.notifier.stopping()
            if self.listener is not None:
                if not self._accept_paused_until:  # a pause (EMFILE) already took it out of epoll
                    self.epoll.unregister(self.listener.fileno())
                self.listener.close()
                self.listener = None
            if self.http_listener is not None:
                if not self._accept_paused_until:
                    self.epoll.unregister(self.http_listener.fileno())
                self.http_listener.close()
                self.http_listener = None
            for conn in list(self.connections.values()):
                if conn.state in (_IDLE, _PARTIAL, _WAITING):
                    self._close(conn)
            for fd in list(self._refusing):
                self._settle_refusal(fd, expired=True)
            for slot in self.workers.values():
                if slot.lingering:
                    self._reclaim(slot)
            if self._loading is not None:
                self._stop_watching(self._loading)
                self._loading.kill()
                self._loading = None
        self._stop_deadline = now + self.config.graceful_timeout if graceful else now

    def _stopped(self) -> bool:
        assert self._stop_deadline is not None
        in_flight = any(slot.conn is not None for slot in self.workers.values()) or any(
            conn.state == _WRITING for conn in self.connections.values())
        waiting = any(conn.state == _QUEUED for conn in self._queue) and bool(self.workers)
        return not (in_flight or waiting) or time.monotonic() >= self._stop_deadline

    def _shutdown(self) -> None:
        if self.listener is not None:
            self.listener.close()
            self.listener = None
        if self.http_listener is not None:
            self.http_listener.close()
            self.http_listener = None
        if self._stop_deadline is None:
            self._stop_deadline = time.monotonic()  # (an exception ended the loop)
        # Past the grace period a busy worker is killed and reaped first, so that its
        # caller gets shutting_down only if no reply byte can have gone out.
        for slot in [s for s in self.workers.values() if s.conn is not None]:
            self._kill_and_reap(slot)
        for conn in list(self.connections.values()):
            if conn.state == _QUEUED:  # never reached a worker
                self._fail(conn, ShuttingDown("the daemon stopped before answering; retry when it is back"))
            else:
                self._close(conn)
        for slot in list(self.workers.values()):
            self._close_channel(slot)  # an idle worker exits when its channel closes
            try:
                os.kill(slot.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 5.0
        while self.workers and time.monotonic() < deadline:
            try:
                pid, _status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                time.sleep(0.02)
            else:
                self.workers.pop(pid, None)
                parent = self._generations.pop(pid, None)
                if parent is not None:
                    parent.exited = True  # (reaped: its pid is no longer ours to signal)
        for slot in list(self.workers.values()):
            self._kill(slot)
            try:
                os.waitpid(slot.pid, 0)
            except ChildProcessError:
                pass
        self.workers.clear()
        for parent in self._generations.values():  # they hold nothing to save: loaded experts, a load in progress
            if parent.exited:
                continue
            parent.kill()
            try:
                os.waitpid(parent.pid, 0)
            except ChildProcessError:
                pass
        self._generations.clear()
        for fd in list(self._refusing):
            self._settle_refusal(fd, expired=True)
        if self._spare_fd is not None:
            os.close(self._spare_fd)
            self._spare_fd = None
        signal.set_wakeup_fd(-1)
        self.epoll.close()
        os.close(self._wakeup_r)
        os.close(self._wakeup_w)
        self._throttle.flush(force=True)
        log.info("expertd stopped")


@dataclass
class _Reload:
    """What a loaded generation starting its workers replaces, to put back if they fail."""

    config: Config
    experts: dict[str, dict]
    parent: Generation | None
    generation: int


def _over_half(holders: list[_Connection], held_by_uid: dict[int, int], uid: int, budget: int,
               ) -> _Connection | None:
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


def _memory_of(pid: int) -> dict:
    import psutil

    try:
        info = psutil.Process(pid).memory_full_info()
    except (psutil.Error, OSError):
        return {}
    return {"rss": info.rss, "pss": info.pss, "uss": info.uss}


class _Access:
    """Who may connect (allow_uids/gids), send control requests (control_uids/gids) and read status."""

    def __init__(self, config: Config) -> None:
        own = {0, os.getuid()}  # root and the daemon's own user: always
        # None: no allow-list, anyone who can open the socket may connect.
        self.allowed_uids = set(config.allow_uids) | own if config.allow_uids or config.allow_gids else None
        self.allowed_gids = set(config.allow_gids)
        self.control_uids = set(config.control_uids) | own
        self.control_gids = set(config.control_gids)
        self.public_status = config.public_status
        self.uses_groups = bool(self.allowed_gids or self.control_gids)

    def allows(self, uid: int, gid: int, groups: frozenset[int]) -> bool:
        return (self.allowed_uids is None or uid in self.allowed_uids
                or _in_groups(self.allowed_gids, gid, groups))

    def controls(self, uid: int, gid: int, groups: frozenset[int]) -> bool:
        return uid != _NO_PEER and (uid in self.control_uids or _in_groups(self.control_gids, gid, groups))

    def reads(self, uid: int, gid: int, groups: frozenset[int]) -> bool:
        """Whether the peer may read the daemon's state (STATUS, LIST, /health, /experts, /metrics)."""
        return self.public_status or self.controls(uid, gid, groups)


def _in_groups(gids: set[int], gid: int, groups: frozenset[int]) -> bool:
    """Whether a peer (primary ``gid``, supplementary ``groups``) is in one of ``gids``."""
    return bool(gids) and (gid in gids or bool(gids & groups))


_SO_PEERGROUPS = getattr(socket, "SO_PEERGROUPS", 59)  # Linux 4.13


def _peer_groups(sock: socket.socket) -> frozenset[int]:
    """The supplementary groups of a Unix socket's peer, as the kernel recorded them when it connected."""
    for count in (256, 65536):  # (NGROUPS_MAX is 65536; most users have a few)
        try:
            raw = sock.getsockopt(socket.SOL_SOCKET, _SO_PEERGROUPS, 4 * count)
        except OSError as exc:
            if exc.errno == errno.ERANGE:
                continue
            return frozenset()
        return frozenset(struct.unpack(f"{len(raw) // 4}I", raw[: len(raw) // 4 * 4]))
    return frozenset()


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


def _open_descriptors() -> int | None:
    """How many descriptors this process has open (None if /proc cannot tell)."""
    try:
        return len(os.listdir("/proc/self/fd")) - 1  # (less the one listdir opened)
    except OSError:
        return None


def _open_spare() -> int | None:
    """A descriptor to give up when out of them, to accept a client and answer it (None if none is free)."""
    try:
        return os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None


def _peek_now(sock: socket.socket) -> bytes | None:
    """The first bytes waiting on a new connection: b"" if none yet, None if the peer is gone."""
    try:
        return sock.recv(_PEEK_SIZE, _PEEK_NOW) or None
    except BlockingIOError:
        return b""
    except OSError:
        return None


def _undecided(head: bytes) -> bool:
    """Whether a connection's first bytes do not yet say which protocol it speaks."""
    return not head or (len(head) < 4 and not protocol.MAGIC.startswith(head[:2]) and http.could_be_http(head))


def _answer_and_close(sock: socket.socket, error: RemoteError, head: bytes | None) -> None:
    """Refuse a connection the master holds no record of: ``error`` in the protocol ``head`` shows, then close.

    msgpack (request id 0, the daemon's own) unless the first bytes are HTTP's.  What the
    client sent is read first, so that closing cannot reset the connection, reply and all.
    """
    if head is not None:
        reply = http.error_response(None, error)[0] if http.looks_like_http(head) else protocol.encode_error(0, error)
        try:
            for _ in range(16):
                if not sock.recv(65536, socket.MSG_DONTWAIT):
                    break
        except OSError:
            pass
        try:
            sock.send(reply, socket.MSG_DONTWAIT)
        except OSError:
            pass  # the client is gone or not reading: closing is all that is left
    sock.close()


def _exited_cleanly(status: int) -> bool:
    return os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0


def _describe_status(status: int) -> str:
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        try:
            name = signal.Signals(sig).name
        except ValueError:
            name = f"signal {sig}"
        return f"was killed by {name}"
    return f"exited with status {os.WEXITSTATUS(status)}"
