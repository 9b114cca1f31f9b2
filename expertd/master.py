"""The master process: one loop over epoll, signals, listeners, and stopping.

Modelled on gunicorn's arbiter: one plain loop; signal handlers only queue
the signal (the wakeup fd makes ``epoll`` return), and the loop handles it.
Unlike gunicorn the master also owns every client connection, which is what
keeps idle and slow clients from pinning workers:

* connections sit in the master's epoll set, costing nothing while idle;
* when one has a *complete* request waiting (checked by peeking, never by
  reading: :mod:`expertd.intake`), it joins a FIFO queue, and the next idle
  worker gets its descriptor (:mod:`expertd.dispatch`);
* the worker answers that one request and hands the connection back;
* when every worker is busy, each gets its next connection ahead, so that it
  need not wait a round trip through the master between requests.

N workers thus serve any number of connected clients fairly, in arrival order.  Because the master
knows which request each worker holds, a worker that dies mid-request still gets its caller a
``worker_lost`` error reply instead of a hang.

The parts, each passed what it needs when it is made (see ``__init__``):
:mod:`~expertd.accept` lets connections in, :mod:`~expertd.intake` examines
their requests, :mod:`~expertd.dispatch` hands them to workers,
:mod:`~expertd.pool` keeps the workers, :mod:`~expertd.reloads` switches
generations, :mod:`~expertd.admin` answers the master's own requests.

State owned here: the epoll object, the wakeup pipe and the signals queued,
the listeners, and the stop in progress (its deadline and exit status).
"""

from __future__ import annotations

import gc
import logging
import os
import select
import signal
import time
from collections import deque
from collections.abc import Callable

from expertd import notify
from expertd.accept import Acceptor, file_limit, open_descriptors, open_spare, raise_file_limit
from expertd.admin import Admin
from expertd.backoff import Quarantines
from expertd.config import Config
from expertd.connections import IDLE, PARTIAL, QUEUED, WAITING, Connection, ConnectionTable
from expertd.dispatch import Dispatcher
from expertd.errors import ShuttingDown
from expertd.generation import become_subreaper
from expertd.intake import Intake
from expertd.listener import Listener, bind_tcp
from expertd.logfile import reopen_log_files
from expertd.logs import Summary, Throttle
from expertd.metrics import Metrics
from expertd.notify import Notifier
from expertd.pool import Pool, WorkerSlot, describe_status
from expertd.reloads import Reloads
from expertd.scoreboard import MAX_SLOTS, Scoreboard
from expertd.serving import Serving
from expertd.text import plural

log = logging.getLogger("expertd.master")

EXIT_WORKER_BOOT_FAILED = 3
_EXPIRY_INTERVAL = 0.25  # how often connections, boots and the open-file limit are checked
_HOUSEKEEPING_INTERVAL = 0.05  # watchdog, the log throttle's counts, the status line and the summary
# systemd's STATUS line: at most this often (it counts requests; a message per request would
# cost the master a system call and the service manager a wake-up per request).
_STATUS_INTERVAL = 1.0
_UNWATCHED_WAIT = 0.002  # the longest a connection waits to be looked at while the master wakes for workers only
_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT)


class Master:
    """Supervises workers and dispatches requests; :meth:`run` returns the exit status."""

    def __init__(self, config: Config, *, overrides: dict[str, str] | None = None,
                 on_ready: Callable[[], None] | None = None) -> None:
        self.serving = serving = Serving(config)
        self.notifier = Notifier()
        self.epoll = epoll = select.epoll()
        # Connections have an epoll set of their own, watched through the master's (its descriptor is in
        # it) except while nothing a connection sends could be served before a worker reports (see
        # _watch_connections): the master then wakes for workers only, and looks at connections then.
        self._conn_epoll = select.epoll()
        self._watching, self._look_by = False, 0.0  # (not watching: look at connections by _look_by at the latest)
        self._signals: list[int] = []
        self._wakeup_r, self._wakeup_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        # Sockets passed by socket activation: taken now (from the environment, which forked processes then
        # do not see), adopted in run(); no generation's parent or worker may hold them.
        self._activated = notify.listen_fds()
        self.listener: Listener | None = None
        self.http_listener = None
        self._stop_deadline: float | None = None
        self._exit_status, self.start_failure = 0, ""  # (why the first generation failed: for --daemon's launcher)
        self._next_expiry_check = self._next_housekeeping = self._next_status = 0.0
        self._short = False  # fewer workers than wanted, and one can be forked (set by _maintain)
        self.throttle = throttle = Throttle(log)  # for the lines a client can make the master write at will
        self.scoreboard = scoreboard = Scoreboard()
        self.metrics = metrics = Metrics(MAX_SLOTS, config.experts, pipelines=config.pipelines)
        quarantines = Quarantines()
        self.table = table = ConnectionTable(serving, self._conn_epoll, throttle)
        self.pool = pool = Pool(serving, epoll, scoreboard, metrics, quarantines, throttle,
                                make_room=lambda: self.acceptor.evict_for_room())
        self.acceptor = Acceptor(serving, table, epoll, throttle, pool)
        self.summary = Summary(log, config.log_summary_interval, lambda: metrics.calls_so_far(pool.boards()))
        queue: deque[Connection] = deque()
        self.dispatcher = dispatcher = Dispatcher(serving, pool, table, queue, scoreboard, metrics, quarantines,
                                                  on_ready=lambda: self.reloads.worker_ready(),
                                                  kill_and_reap=self._kill_and_reap, examine=None)
        self.reloads = reloads = Reloads(serving, pool, dispatcher, table, epoll, self.notifier,
                                         (scoreboard, metrics), self._own_fds, overrides or {},
                                         on_first_ready=on_ready or (lambda: None), on_start_failed=self._fail_start,
                                         on_reloaded=self.acceptor.count_base_descriptors)
        self.admin = admin = Admin(serving, pool, dispatcher, table, self.acceptor, reloads, scoreboard, metrics,
                                   quarantines, throttle, self.summary, stop=lambda why: self._begin_stop(True, why),
                                   socket_path=lambda: self.listener.path if self.listener else config.socket)
        self.intake = Intake(serving, table, queue, admin, quarantines, metrics)
        dispatcher.examine = self.intake.examine  # (a connection handed back may have a request waiting)
        dispatcher.adopt = self.acceptor.adopt  # (a worker's request for help with a pipeline's stage)

    # ----------------------------------------------------------------- run
    def load_first_generation(self, keepalive: Callable[[], None] | None = None) -> None:
        """Load the experts in generation 1's parent, waiting for it (start-up: no loop runs yet).

        Raises ExpertLoadError with the reason when they do not load: nothing was bound yet.
        """
        become_subreaper()  # before any worker is forked: they must become the master's children
        self.acceptor.fd_limit = raise_file_limit()  # (before forking: the generation's processes inherit it)
        self._install_signals()  # queued until the loop runs (a HUP then reloads), except a stop:
        self.reloads.load_first(keepalive, interrupted=self._stop_signal_queued)

    def _stop_signal_queued(self) -> None:
        """Stopping while the first generation loads: end the way the signal's default action would."""
        for signum in self._signals:
            if signum in _STOP_SIGNALS:
                signal.set_wakeup_fd(-1)
                signal.signal(signum, signal.SIG_DFL)
                log.info("%s before the experts loaded: stopping", signal.Signals(signum).name)
                os.kill(os.getpid(), signum)

    def run(self) -> int:
        """Bind, fork the workers and serve until stopped (after :meth:`load_first_generation`)."""
        self._listen()
        serving, table, intake, dispatcher = self.serving, self.table, self.intake, self.dispatcher
        by_fd, by_channel, recheck = table.by_fd, self.pool.by_channel, table.recheck
        poll, monotonic, pool = self.epoll.poll, time.monotonic, self.pool
        conn_poll, conn_epoll_fd = self._conn_epoll.poll, self._conn_epoll.fileno()
        serving.tick()  # (loading the first generation took a while)
        try:
            while True:
                if not pool.settled or self.acceptor.paused_until:
                    self._maintain()  # a worker to spawn, a generation parent to replace, accepting to resume
                self._watch_connections()
                events = poll(self._poll_timeout())
                serving.now = now = monotonic()  # the iteration's clock (see Serving.now)
                # Not watched: looked at when the queue runs short (a request per worker or fewer; more may
                # wait in the workers' channels), replies are being written, or the look is due.
                connections = not self._watching and (len(dispatcher.queue) <= len(pool.workers)
                                                      or table.held_replies or now >= self._look_by)
                for fd, _mask in events:
                    if fd in by_channel:
                        # One report per event: the channel is level-triggered, so epoll reports it again
                        # while more wait, and reading until empty would cost a failed read per report.
                        dispatcher.read_reports(by_channel[fd], drain=False)
                    elif fd == conn_epoll_fd:
                        connections = True
                    else:
                        self._on_other(fd)
                if connections:
                    self._look_by = now + _UNWATCHED_WAIT
                    for fd, mask in conn_poll(0):
                        conn = by_fd.get(fd)
                        if conn is not None:  # (else closed by an event before it)
                            intake.on_event(conn, mask)
                if self._signals:
                    self._handle_signals()
                # Fair turns: one request per connection per iteration.  A connection answered here
                # (a pipelined GET /health, a STATUS loop) goes back on the list for the next
                # iteration, after epoll, signals and timeouts, never round again in this one.
                if recheck:
                    turns = dict.fromkeys(recheck)  # each once (an event may have listed one again)
                    recheck.clear()
                    for conn in turns:
                        if conn.state == IDLE:
                            intake.examine(conn)
                if dispatcher.queue or dispatcher.queued_shown:
                    dispatcher.dispatch()
                if now > dispatcher.next_deadline or dispatcher.lingering:
                    dispatcher.expire(now)
                if self.reloads.loading is not None or self.acceptor.refusing or now >= self._next_expiry_check:
                    self._expire(now)
                if now >= self._next_housekeeping:
                    self._housekeeping(now)
                if self._stop_deadline is not None and (  # stopping: once nothing is in flight, or at the deadline
                        not dispatcher.in_flight() or time.monotonic() >= self._stop_deadline):
                    break
        finally:
            self._shutdown()
        return self._exit_status

    def _watch_connections(self) -> None:
        """Watch the connections' epoll set, unless nothing they send could be served before a worker reports.

        With requests queued and no worker idle, a request arriving now waits behind them whatever the
        master does, so the master need not wake for it: it wakes for the workers' reports (which free a
        worker) and looks at the connections then, once the queue is down to a request per worker or replies
        it holds are being written, and at least every _UNWATCHED_WAIT (a look per wake-up would cost a
        poll per request).  That halves its wake-ups per request under load.  Requests the master answers
        itself (status, health), hang-ups and requests arriving in pieces wait at most that long.
        """
        dispatcher = self.dispatcher
        watch = not dispatcher.queue or bool(dispatcher.idle) or self._stop_deadline is not None
        if watch != self._watching:
            if watch:
                self.epoll.register(self._conn_epoll.fileno(), select.EPOLLIN)
            else:
                self.epoll.unregister(self._conn_epoll.fileno())
            self._watching = watch

    def _listen(self) -> None:
        # What the master loaded (preloaded libraries) is shared with every generation; freezing
        # it keeps the collector from touching (and so copying) those pages in each of them.
        gc.freeze()
        config = self.serving.config
        if config.http_listen is not None:  # first: a port in use must not leave the Unix socket behind
            self.http_listener = bind_tcp(*config.http_listen)
        inherited = self._activated
        if inherited:
            self.listener = Listener.inherit(inherited[0], instead_of=config.socket)
        else:
            self.listener = Listener.bind(config.socket, config.socket_mode, config.socket_group)
        self.acceptor.listeners = [self.listener.sock] + ([self.http_listener] if self.http_listener else [])
        for listener in self.acceptor.listeners:
            self.epoll.register(listener.fileno(), select.EPOLLIN)
        self.epoll.register(self._wakeup_r, select.EPOLLIN)
        self.acceptor.spare_fd = open_spare()
        self.acceptor.fd_base = open_descriptors() or 64
        notify.set_title(f"expertd: master [{config.path}]")
        log.info("expertd master %d %s %s; starting %s for %s", os.getpid(), "serving the socket activated on" if
                 inherited else "listening on", self.listener.path, plural(config.workers, "worker"),
                 plural(len(self.serving.experts), "expert"))
        if self.http_listener is not None:
            host, port = config.http_listen  # type: ignore[misc]
            log.info("HTTP also on %s:%d (%s)", host, port,
                     "bearer token required" if config.token else "no token: loopback only")
        limit = self.acceptor.connection_limit()
        if limit < config.max_connections:
            log.warning("the open-file limit (%d) leaves room for %d connections, fewer than max_connections (%d); "
                        "raise LimitNOFILE (ulimit -n) to allow more", self.acceptor.fd_limit, limit,
                        config.max_connections)

    def _on_other(self, fd: int) -> None:
        """An event on something other than a connection or a worker channel."""
        if fd in self.reloads.by_control:
            self.reloads.read(self.reloads.by_control[fd])
        elif fd == self._wakeup_r:
            try:
                while os.read(self._wakeup_r, 512):
                    pass
            except BlockingIOError:
                pass
        elif self.listener is not None and fd == self.listener.fileno():
            self.acceptor.accept(self.listener.sock, tcp=False)
        elif self.http_listener is not None and fd == self.http_listener.fileno():
            self.acceptor.accept(self.http_listener, tcp=True)
        elif fd in self.acceptor.refusing:
            self.acceptor.settle(fd, expired=False)

    def _poll_timeout(self) -> float:
        if self.table.recheck:
            return 0.0  # connections wait for their next turn: look at the others, then come back at once
        if self._stop_deadline is not None:
            return 0.1
        now = self.serving.now
        timeout = self.dispatcher.next_deadline - now  # (inf while no request is in hand)
        if timeout > 1.0:
            timeout = 1.0
        if self.notifier.watchdog_interval:
            timeout = min(timeout, self.notifier.watchdog_interval / 4)
        if self._short:
            timeout = min(timeout, self.pool.backoff.next_spawn_at - now)
        if self.dispatcher.lingering:
            timeout = min(timeout, _EXPIRY_INTERVAL)  # their requests' deadlines are on the scoreboard
        if self.acceptor.refusing:
            timeout = min(timeout, self.acceptor.next_deadline() - now)  # type: ignore[operator]
        if not self._watching:
            timeout = min(timeout, self._look_by - now)  # (the next look at the connections is due then)
        dispatcher = self.dispatcher
        if dispatcher.batcher.next_wake < now + timeout and dispatcher.idle and dispatcher.queue:
            timeout = dispatcher.batcher.next_wake - now  # a free worker waits for company until then
        return timeout if timeout > 0.0 else 0.0

    def _maintain(self) -> None:
        """Spawn a missing worker (one a loop iteration), resume accepting, replace a lost generation parent."""
        if self._stop_deadline is not None:
            return
        now = self.serving.now
        if self.acceptor.paused_until:
            self.acceptor.resume_if_due(now)
        pool = self.pool
        if not pool.can_spawn():
            self._short = pool.settled = False  # (so: looked at again on every iteration)
            self.reloads.retry_lost_parent(now)
            return
        self._short = pool.active() < self.serving.config.workers  # (read by _poll_timeout: wake to spawn)
        if self._short and now >= pool.backoff.next_spawn_at:
            # One a loop iteration (the poll timeout is then 0): a spawn waits for two forks of the
            # generation's parent, and clients are served between them.
            lost = pool.spawn()
            if lost is not None:
                self.reloads.replace_parent(lost)
            self._short = pool.active() < self.serving.config.workers and pool.can_spawn()
        # Nothing to do here until the pool changes (a worker comes or goes, a parent is lost, a
        # reload or a scale): the loop skips this call meanwhile.
        pool.settled = not self._short and pool.can_spawn()

    def _expire(self, now: float) -> None:
        """Abandoned loads and refused peers; a few times a second, connections and boots.  (Request
        timeouts are the dispatcher's: the loop asks it only when the earliest deadline may have passed.)"""
        if self.reloads.loading is not None:
            self.reloads.expire(now)
        if self.acceptor.refusing:
            self.acceptor.expire(now)
        if now < self._next_expiry_check:
            return  # a scan of every connection is too dear to run on every loop iteration
        self._next_expiry_check = now + _EXPIRY_INTERVAL
        self.acceptor.fd_limit = file_limit()  # (prlimit may change it from outside)
        self.table.expire(now)
        for slot in self.pool.overdue_boots(now):
            self.pool.kill(slot)

    def _housekeeping(self, now: float) -> None:
        """Watchdog pings, the log throttle's counts, the service status line and the periodic log summary."""
        self._next_housekeeping = now + _HOUSEKEEPING_INTERVAL
        self.notifier.watchdog(now)
        self.throttle.flush()
        if (now >= self._next_status and self.reloads.announced and not self.reloads.reloading
                and self._stop_deadline is None):
            self._next_status = now + _STATUS_INTERVAL
            ready, served = plural(self.pool.ready_count(), "worker"), plural(self.serving.requests_served, "request")
            self.notifier.status(f"{ready} ready, {served} served, generation {self.serving.generation}")
        self.summary.write(now, len(self.table))

    # ------------------------------------------------------------- signals
    def _install_signals(self) -> None:
        signal.set_wakeup_fd(self._wakeup_w, warn_on_full_buffer=False)
        signal.signal(signal.SIGUSR2, signal.SIG_IGN)  # the master's word to its workers, not to it
        for sig in (*_STOP_SIGNALS, signal.SIGCHLD, signal.SIGHUP, signal.SIGTTIN, signal.SIGTTOU, signal.SIGUSR1):
            signal.signal(sig, self._queue_signal)

    def _queue_signal(self, signum: int, frame: object) -> None:
        self._signals.append(signum)

    def _handle_signals(self) -> None:
        while self._signals:
            signum = self._signals.pop(0)
            if signum == signal.SIGCHLD:
                self._reap()  # (only then: waitpid on every loop iteration cost a system call a request)
            elif signum in (signal.SIGTERM, signal.SIGINT):
                self._begin_stop(graceful=self._stop_deadline is None, reason=signal.Signals(signum).name)
            elif signum == signal.SIGQUIT:
                self._begin_stop(graceful=False, reason="SIGQUIT")
            elif signum == signal.SIGHUP:
                self.admin.reload()
            elif signum == signal.SIGTTIN:
                self.admin.scale(self.serving.config.workers + 1)
            elif signum == signal.SIGTTOU:
                self.admin.scale(self.serving.config.workers - 1)
            elif signum == signal.SIGUSR1:
                self._reopen_logs()

    def _reap(self) -> None:
        """Every child that exited (one SIGCHLD may stand for several)."""
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            slot = self.pool.pop(pid)
            if slot is not None:
                self._worker_exited(slot, status)
            elif (parent := self.reloads.pop_parent(pid)) is not None:
                self.reloads.parent_exited(parent, status)

    def _worker_exited(self, slot: WorkerSlot, status: int) -> None:
        how = describe_status(status)
        blamed = self.dispatcher.worker_exited(slot, status, how)
        if self._stop_deadline is not None or slot.leaving is not None:
            return  # stopping, or retired, scaled down or killed on purpose: replaced without backoff
        if slot.ready_at is None and self.reloads.replacing is not None and slot.generation == self.serving.generation:
            self.reloads.abort(slot.failure or f"a new worker {how} before it was ready")
        elif slot.ready_at is None and not self.reloads.announced:
            # A bad expert must not half-start the daemon: stop with its message.
            self._fail_start(slot.failure or f"worker {slot.number} {how} before it was ready",
                             "a worker failed to start")
        elif self.pool.exited(slot, blamed):
            self.dispatcher.reclaim_lingering()  # their calls would not pass the quarantine's check

    def _kill_and_reap(self, slot: WorkerSlot) -> None:
        """SIGKILL a worker and handle its exit now, so that nothing it writes can follow our reply."""
        self.pool.kill(slot)
        try:
            _pid, status = os.waitpid(slot.pid, 0)
        except ChildProcessError:
            status = 0
        if self.pool.pop(slot.pid) is not None:
            self._worker_exited(slot, status)

    def _fail_start(self, message: str, reason: str) -> None:
        """The first generation cannot serve: stop, with its message, and exit status 3."""
        log.error("%s", message)
        self._exit_status, self.start_failure = EXIT_WORKER_BOOT_FAILED, message
        self._begin_stop(graceful=False, reason=reason)

    def _reopen_logs(self) -> None:
        """USR1: reopen log files (after logrotate moved them), here and in every worker."""
        try:
            reopen_log_files()
        except OSError as exc:
            log.error("cannot reopen the log file %s: %s", exc.filename, exc.strerror)
            return
        for pid in [*self.pool.workers, *self.reloads.parents]:  # (a parent: for the workers it forks later)
            try:
                os.kill(pid, signal.SIGUSR1)
            except ProcessLookupError:
                pass
        log.info("log files reopened")

    def _own_fds(self) -> list[int]:
        """The master's descriptors, which a generation's parent closes."""
        own = [self.epoll.fileno(), self._conn_epoll.fileno(), self._wakeup_r, self._wakeup_w, *self.table.by_fd,
               *self.acceptor.refusing,
               *self.pool.by_channel, *self._activated]  # (socket activation: adopted only later, in run)
        own += [self.acceptor.spare_fd] if self.acceptor.spare_fd is not None else []
        own += [listener.fileno() for listener in (self.listener, self.http_listener) if listener is not None]
        return own

    # ------------------------------------------------------------ stopping
    def _begin_stop(self, graceful: bool, reason: str) -> None:
        now = time.monotonic()
        if self._stop_deadline is None:
            grace = f" (graceful, up to {self.serving.config.graceful_timeout:.0f}s)" if graceful else ""
            log.info("%s: stopping%s", reason, grace)
            self.notifier.stopping()
            self.serving.stopping = True
            self._close_listeners()
            for conn in list(self.table.by_fd.values()):
                if conn.state in (IDLE, PARTIAL, WAITING):
                    self.table.close(conn)
            self.acceptor.settle_all()
            self.dispatcher.reclaim_lingering()
            self.reloads.stop()
        self._stop_deadline = now + self.serving.config.graceful_timeout if graceful else now

    def _close_listeners(self) -> None:
        if not self.acceptor.paused_until:  # a pause (EMFILE) already took them out of epoll
            for listener in self.acceptor.listeners:
                self.epoll.unregister(listener.fileno())
        self.acceptor.listeners = []
        if self.listener is not None:
            self.listener.close()
            self.listener = None
        if self.http_listener is not None:
            self.http_listener.close()
            self.http_listener = None

    def _shutdown(self) -> None:
        self._close_listeners()  # (already closed, unless an exception ended the loop)
        if self._stop_deadline is None:
            self._stop_deadline = time.monotonic()  # (an exception ended the loop)
            self.serving.stopping = True
        pool = self.pool
        # Past the grace period a busy worker is killed and reaped first, so that its
        # caller gets shutting_down only if no reply byte can have gone out.
        for slot in [s for s in pool.workers.values() if s.conn is not None]:
            self._kill_and_reap(slot)
        for conn in list(self.table.by_fd.values()):
            if conn.state == QUEUED:  # never reached a worker
                self.table.fail(conn, ShuttingDown("the daemon stopped before answering; retry when it is back"))
            else:
                self.table.close(conn)
        for pid in pool.terminate():  # (children reaped meanwhile that were not workers: generation parents)
            parent = self.reloads.parents.pop(pid, None)
            if parent is not None:
                parent.exited = True  # (reaped: its pid is no longer ours to signal)
        self.reloads.kill_all()
        self.acceptor.settle_all()
        if self.acceptor.spare_fd is not None:
            os.close(self.acceptor.spare_fd)
            self.acceptor.spare_fd = None
        signal.set_wakeup_fd(-1)
        self.epoll.close()
        self._conn_epoll.close()
        os.close(self._wakeup_r)
        os.close(self._wakeup_w)
        self.throttle.flush(force=True)
        log.info("expertd stopped")
