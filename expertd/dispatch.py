"""Dispatch: whole requests to idle workers, in arrival order, and what comes back.

* **Hand-out**: a connection whose request is whole joins the queue; the next
  idle worker gets its descriptor over its channel (:mod:`expertd.ipc`) and
  answers the client itself.
* **Hand-ahead**: when every worker is busy, a worker busy with short requests
  gets its next connections at once (up to HAND_AHEAD_DEPTH, the second and
  more only while very short requests wait ahead of them), waiting in its
  channel, so that it need not wait a round trip through the master between
  requests.
* **Linger**: a worker that answered may keep the connection for its next
  request (fewer clients than workers); when requests queue, the master takes
  lingering connections back (**reclaim**: SIGUSR2, answered by a DONE).
* **Reports**: DONE hands the connection back (with any reply left to write
  and input read but not served); READY, FAILED and MEMORY concern the worker.
* **Batches**: calls of a batched expert go to one worker together
  (:mod:`expertd.batching` decides who and when, :mod:`expertd.dispatch_batch`
  hands them over and takes each member back).
* **Lost requests** (:mod:`expertd.dispatch_losses`): a worker that dies
  holding a request gets its caller a ``worker_lost`` (or ``timeout``) error,
  unless reply bytes may be out.

The per-request work here does not grow with the number of workers: idle
workers wait in a deque, busy workers that may take a connection ahead in
another (in the order they became busy), and deadlines are scanned only when
the earliest one may have passed.

State owned here: the queue of whole requests (shared with
:mod:`expertd.intake`, which appends), the idle and lingering workers, the
candidates for hand-ahead, the earliest request deadline, and each expert's
typical call duration.
"""

from __future__ import annotations

import errno
import logging
import os
import signal
from collections import deque
from collections.abc import Callable

from expertd import ipc
from expertd.backoff import Quarantines
from expertd.batching import Batcher
from expertd.connections import (
    BUSY,
    ET_QUIET,
    ET_READ,
    QUEUED,
    WRITING,
    Connection,
    ConnectionTable,
)
from expertd.connections import LINGERING as CONN_LINGERING
from expertd.dispatch_batch import BatchDispatching
from expertd.dispatch_losses import Losses
from expertd.errors import Overloaded, Quarantined
from expertd.metrics import Metrics
from expertd.pool import BOOTING, IDLE, LINGERING, Pool, WorkerSlot
from expertd.pool import BUSY as WORKER_BUSY
from expertd.scoreboard import Scoreboard
from expertd.serving import Serving

log = logging.getLogger("expertd.master")

# A busy worker is handed its next connection ahead only while the request in hand is short: an
# expert whose calls typically take less than this, running for less than this (see _hand_ahead).
HAND_AHEAD_UNDER = 0.002
# A second and further ones only while what waits ahead of the connection there (the request in hand
# and those handed ahead before it) is expected to take less than this in all: enough to cover the
# master's turn for very short requests, and never much of a wait for a connection committed to one
# worker while another may fall idle.
HAND_AHEAD_BUDGET = 0.0005
# The most connections that may wait in a busy worker's channel.  One is not enough when requests
# are as short as the master's turn (tens of µs): the master hands the next one ahead when it reads
# the worker's DONE, and the worker is often done before that, and sleeps on its channel until the
# master gets there.  With several it never waits, and the master, woken by one DONE, finds the next
# ones waiting too and serves them in the same wake-up (16 callers of a 30 µs expert, 1 worker, 2 CPUs:
# 8 deep served 1.28x the calls/s of 2 deep, with 14% less of the master's CPU per call; see
# bench/ab_processes.py).  The price: a connection in a channel cannot be taken back, so when one of an
# expert's calls that typically take 30 µs runs for 100 ms, up to 8 connections wait it out even if another
# worker falls idle (2 before); one handed ahead once the call ran past 0.5 ms is not among them.  Each
# connection in a channel is one that a dying worker hands back to the queue.
HAND_AHEAD_DEPTH = 8
_LINGER_PAUSE = 0.1
_NEVER = float("inf")


class Dispatcher(BatchDispatching, Losses):
    """Hands whole requests to workers and takes their connections back."""

    def __init__(self, serving: Serving, pool: Pool, table: ConnectionTable, queue: deque[Connection],
                 scoreboard: Scoreboard, metrics: Metrics, quarantines: Quarantines,
                 on_ready: Callable[[], None], kill_and_reap: Callable[[WorkerSlot], None],
                 examine: Callable[[Connection], None] | None) -> None:
        self.serving = serving
        self.pool = pool
        self.table = table
        self.queue = queue
        self.scoreboard = scoreboard
        self.metrics = metrics
        self.quarantines = quarantines
        self.on_ready = on_ready  # a worker became ready (the generation may now be complete)
        self.kill_and_reap = kill_and_reap  # SIGKILL a worker and see to its exit at once
        self.examine = examine  # look at a connection handed back (expertd.intake.Intake.examine; set once made)
        # take in a connection a worker made (expertd.accept.Acceptor.adopt; set once made)
        self.adopt: Callable[[int, int], Connection | None] | None = None
        self.idle: deque[WorkerSlot] = deque()
        self.lingering: set[WorkerSlot] = set()
        self._ahead: deque[tuple[WorkerSlot, float]] = deque()  # (busy worker, busy since), oldest first
        self.next_deadline = _NEVER  # no busy worker's request times out before this (maybe later)
        self.typical: dict[str, float] = {}  # expert name -> typical duration of a handed-over call (EWMA)
        self.queued_shown = 0  # the queue length last written to the scoreboard (when it last crossed zero)
        self.batcher = Batcher(serving, self.typical)

    # ------------------------------------------------------------- hand-out
    def dispatch(self) -> None:
        if self.queue:
            if self.idle:
                self._hand_out()
            if self.queue and not self.idle:  # requests wait and no worker is idle: take back the lingering ones
                # (With a worker idle, what still waits are calls whose worker waits for company: see batching.)
                if self.lingering:
                    self.reclaim_lingering()
                if self._ahead:
                    self._hand_ahead()
        if bool(self.queue) != bool(self.queued_shown):  # (workers read only whether any wait: a write per change
            self.queued_shown = len(self.queue)           # of the count would be a write per request under load)
            self.scoreboard.set_queued(self.queued_shown)

    def _hand_out(self) -> None:
        queue, idle, quarantines = self.queue, self.idle, self.quarantines
        batched = self.batcher.batched()
        held: list[Connection] = []  # calls of batched experts whose free worker waits for company
        while queue and idle:
            conn = queue.popleft()
            if conn.state != QUEUED:
                continue
            if quarantines.entries and conn.expert in quarantines.entries:
                quarantine = quarantines.of(conn.expert)
                if quarantine is not None:  # gathered, or queued before its expert was quarantined
                    config = self.serving.config
                    self.metrics.count_failure(conn.expert, Quarantined.code)
                    self.table.fail(conn, Quarantined(quarantines.message(
                        conn.expert, quarantine, config.quarantine_after, config.quarantine_window),  # type: ignore
                        expert=conn.expert))
                    continue
            if batched and conn.expert in batched and not conn.whole_batch:  # (a MAP is a batch already)
                members = self._batch_of(conn, batched[conn.expert])
                if members is None:
                    held.append(conn)
                    continue
                if not members:
                    continue  # (it waited past its timeout, and was answered so)
                if len(members) > 1:
                    self._hand_out_batch(members)
                    continue
            slot = idle.popleft()
            self.scoreboard.clear(slot.board)  # before the hand-over: the worker may begin at once
            try:
                ipc.send_serve(slot.channel, conn.conn_id, conn.fd, conn.inbuf, conn.speaks == "http")
            except OSError as exc:
                if exc.errno in (errno.EPIPE, errno.ECONNRESET, errno.ENOTCONN, errno.EBADF):
                    queue.appendleft(conn)  # the worker is gone; SIGCHLD will tell
                    continue
                # Out of descriptors or memory here: keep the worker, refuse this request.
                log.error("cannot hand a request to worker %d: %s", slot.number, exc.strerror)
                idle.appendleft(slot)
                self.table.fail(conn, Overloaded(f"the daemon is short of resources ({exc.strerror}); retry shortly"))
                continue
            if conn.inbuf is not None:
                self.table.release_gathered(conn)
            conn.to(BUSY)
            self._busy(slot, conn)
            if batched and conn.expert in batched:
                self.batcher.handed_out(conn.expert, [conn], self.serving.now)  # (a batch of one: a plain hand-over)
        if batched:
            queue.extendleft(reversed(held))  # (first come, first served: they stay at the front)
            self.batcher.end_pass(self.serving.now)

    def _busy(self, slot: WorkerSlot, conn: Connection) -> None:
        """``slot`` serves ``conn`` from now (handed out, or handed ahead and reached)."""
        now = self.serving.now
        slot.conn = conn
        slot.busy_since = now
        slot.deadline = deadline = now + self.serving.config.expert_timeout(conn.expert or "")
        slot.to(WORKER_BUSY)
        if deadline < self.next_deadline:
            self.next_deadline = deadline
        ahead = self._ahead
        while ahead and now - ahead[0][1] > HAND_AHEAD_UNDER:
            ahead.popleft()  # (busy too long by now to be handed anything ahead)
        ahead.append((slot, now))

    def _hand_ahead(self) -> None:
        """Every worker is busy and requests wait: give busy workers their next connection now.

        The worker finds it in its channel the moment it reports the one in
        hand, instead of waiting a round trip through the master for it: with
        more clients than workers, that round trip is a large part of each
        request.  Only a request whole in the socket is handed ahead (one the
        master gathered would die with a worker that dies before reaching it;
        this one goes back to the queue), up to HAND_AHEAD_DEPTH per worker
        (one to each before a second to any), and never to a worker that
        lingers or is on its way out.

        Only a worker busy with a short request gets one: a call (not a MAP
        or a pipeline) of an expert whose calls typically take under
        HAND_AHEAD_UNDER, running for less than that; a second and more only
        while what waits ahead of the connection there, the call in hand and
        those handed ahead before it, is expected to take under
        HAND_AHEAD_BUDGET in all.  The connection waits for the requests
        before it to end, even if another worker falls idle first; for short
        requests that wait is shorter than the round trips it saves, and a long
        one keeps its queue.
        """
        if self.quarantines.entries:
            return  # a call queued for a quarantined expert must meet _hand_out's refusal, not a busy worker
        queue, ahead, now, batched = self.queue, self._ahead, self.serving.now, self.batcher.batched()
        while ahead:
            while queue and queue[0].state != QUEUED:
                queue.popleft()
            if not queue or queue[0].inbuf is not None:
                return  # (first come, first served: a gathered request waits for an idle worker)
            if batched and queue[0].expert in batched:
                return  # (a call of a batched expert waits to go with its company)
            slot, since = ahead.popleft()
            conn = slot.conn
            if (slot.state != WORKER_BUSY or slot.busy_since != since or conn is None
                    or len(slot.upcoming) >= HAND_AHEAD_DEPTH or slot.leaving is not None
                    or slot.batch or slot.channel.fileno() < 0):
                continue
            # What waits ahead of the next one there: the request in hand (what it has run already if that is
            # more than its expert's typical call: a call that runs long may be one of its rare long ones), then
            # those handed ahead.  (A call in hand running for HAND_AHEAD_UNDER or more gets nothing: in_hand.)
            in_hand = max(self._expected(conn), now - since)
            if in_hand >= HAND_AHEAD_UNDER or (slot.upcoming and in_hand + slot.upcoming_expected >= HAND_AHEAD_BUDGET):
                continue
            upcoming = queue[0]
            try:
                ipc.send_serve(slot.channel, upcoming.conn_id, upcoming.fd, None, upcoming.speaks == "http")
            except OSError:
                return  # the worker is gone (SIGCHLD will tell) or the master is short of resources: it waits
            queue.popleft()
            upcoming.to(BUSY)
            upcoming.expected = self._expected(upcoming)
            slot.upcoming_expected += upcoming.expected
            slot.upcoming.append(upcoming)
            if len(slot.upcoming) == 1:
                self.scoreboard.set_next(slot.board, True)
            if len(slot.upcoming) < HAND_AHEAD_DEPTH and in_hand + slot.upcoming_expected < HAND_AHEAD_BUDGET:
                ahead.append((slot, since))  # one to each busy worker before a second to any

    def _expected(self, conn: Connection) -> float:
        """How long ``conn``'s request is expected to take: its expert's typical call; HAND_AHEAD_UNDER
        (never short) for a MAP or a pipeline, or an expert not timed yet."""
        return HAND_AHEAD_UNDER if conn.whole_batch else self.typical.get(conn.expert or "", HAND_AHEAD_UNDER)

    def _take_next(self, slot: WorkerSlot) -> Connection | None:
        """The first connection handed ahead to ``slot``, if any, no longer recorded as waiting there."""
        if not slot.upcoming:
            return None
        upcoming = slot.upcoming.popleft()
        if slot.upcoming:
            slot.upcoming_expected -= upcoming.expected
        else:
            slot.upcoming_expected = 0.0  # (exactly: no rounding left over from the sums)
            self.scoreboard.set_next(slot.board, False)
        return upcoming

    def _requeue_upcoming(self, slot: WorkerSlot) -> None:
        """Every connection handed ahead to ``slot``, which will never reach them: first in the queue again."""
        while slot.upcoming:
            self._requeue(slot.upcoming.pop())  # (the last first: each goes to the front, so their order stays)
        slot.upcoming_expected = 0.0
        self.scoreboard.set_next(slot.board, False)

    def _requeue(self, conn: Connection) -> None:
        """A connection handed ahead that its worker never reached: first in the queue again."""
        if conn.state == BUSY:
            conn.to(QUEUED)
            self.queue.appendleft(conn)

    def reclaim(self, slot: WorkerSlot) -> None:
        """Ask a lingering worker to hand its connection back (it answers with DONE)."""
        if slot.reclaim_sent or slot.channel.fileno() < 0:
            return
        slot.reclaim_sent = True
        # More clients than idle workers: lingering would only make workers change hands
        # twice per request, so it pauses for a moment.
        self.scoreboard.pause_lingering(max(self.serving.now + _LINGER_PAUSE, self.quarantines.linger_paused_until))
        try:
            os.kill(slot.pid, signal.SIGUSR2)  # interrupts the worker's wait on the connection (see ipc)
        except OSError:
            pass  # it is exiting; its exit returns the connection

    def reclaim_lingering(self) -> None:
        """Ask every lingering worker for its connection back (requests wait, a quarantine began, stopping)."""
        for slot in self.lingering:  # (reclaim changes nothing in the set: its DONE does, later)
            self.reclaim(slot)

    def retire(self, slot: WorkerSlot, reason: str) -> None:
        """Take a worker out of service; it finishes the request in hand first."""
        if not self.pool.leave(slot, reason):
            return
        if slot in self.idle:
            self.idle.remove(slot)
        if slot.state == LINGERING:
            self.reclaim(slot)  # it hands the connection back, then its channel is closed
        elif slot.conn is None and slot.ready_at is not None:
            self.pool.close_channel(slot)
        elif slot.ready_at is None:
            self.pool.kill(slot)  # still booting: nothing to finish

    # ------------------------------------------------------------- reports
    def read_reports(self, slot: WorkerSlot, drain: bool = True) -> None:
        while True:
            try:
                report = ipc.receive_report(slot.channel)
            except RuntimeError as exc:
                log.error("worker %d (pid %d): %s; killing it", slot.number, slot.pid, exc)
                self.pool.kill(slot)
                return
            if report is None:
                return
            op, value = report
            if (op == ipc.DONE and slot.state != WORKER_BUSY and slot.state != LINGERING) or (
                    op == ipc.READY and slot.state != BOOTING):
                # Not a report this worker can send now (something else wrote to its channel: expert code
                # with a stray descriptor): the worker is broken, and its word is worth nothing.
                log.error("worker %d (pid %d) sent %s while %s; killing it", slot.number, slot.pid,
                          "DONE" if op == ipc.DONE else "READY", slot.state)
                self.pool.kill(slot)
                return
            if op == ipc.DONE:
                self._on_done(slot, *value)  # type: ignore[misc]
            elif op == ipc.READY:
                self.pool.ready(slot)
                if slot.leaving is None:
                    self.idle.append(slot)
                else:
                    self.pool.close_channel(slot)
                self.on_ready()
            elif op == ipc.HELP:
                self._help(slot, value)  # type: ignore[arg-type]
            elif op == ipc.FAILED:
                slot.failure = str(value)
            elif op == ipc.MEMORY:
                slot.memory = value  # type: ignore[assignment]
                uss, pss, rss = (round(n / 2**20, 1) for n in value)  # type: ignore[attr-defined]
                log.info("worker %d (pid %d) memory after warm-up: USS %.1f MiB, PSS %.1f MiB, RSS %.1f MiB",
                         slot.number, slot.pid, uss, pss, rss)
            else:  # the worker's end closed: it is exiting; SIGCHLD will follow
                self.pool.channel_closed(slot)
                return
            if not drain:
                return

    def _help(self, slot: WorkerSlot, fd: int) -> None:
        """A worker running a pipeline offers part of a stage (ipc HELP): an idle worker serves it, or nobody.

        It is served only if a worker is idle now and no request waits: the asking worker waits for
        the answer, and a request that queued behind others (or for a busy worker) could wait on the
        asker itself, a deadlock.  Declined, the descriptor is closed, and the asker runs that part
        itself (experts are pure: whatever was begun may be run again).
        """
        if ((slot.state != WORKER_BUSY and slot.state != LINGERING) or self.queue or not self.idle
                or self.serving.stopping or self.adopt is None):
            os.close(fd)
            return
        conn = self.adopt(fd, slot.pid)
        if conn is None:
            return
        self.examine(conn)  # type: ignore[misc]  (whole already: it joins the queue, alone)
        if conn.state == QUEUED:
            self._hand_out()  # now, while that worker is idle
        if conn.state != BUSY:  # (that worker was gone: never to wait for one, which may be the asker itself)
            if conn.state == QUEUED:
                self.queue.remove(conn)
            self.table.close(conn)  # (the asker reads the end of the socket, and runs the request itself)

    def _on_done(self, slot: WorkerSlot, conn_id: int, close: bool, retiring: bool, linger: bool, served: int,
                 unsent: bytearray | None, unread: bytes | None) -> None:
        serving = self.serving
        now = serving.now
        slot.requests += served
        serving.requests_served += served
        slot.last_done = now
        lingered = slot.state == LINGERING
        if slot.batch is not None and self._member_done(slot, conn_id, close, unsent, unread):
            return  # others of its batch are still in the worker's hands
        conn = slot.conn
        if not lingered:
            elapsed = now - slot.busy_since
            if conn is not None and served == 1:  # (a batch's last member: the batch's duration)
                name = conn.expert or ""
                if self.batcher.figures and name in self.batcher.figures:
                    self.batcher.ran(name, elapsed)
                typical = self.typical.get(name)
                if typical is not None:
                    self.typical[name] = typical + (elapsed - typical) / 8
                elif name in serving.experts:  # a name the client sent: only served experts get an entry
                    self.typical[name] = elapsed
        if linger and conn is not None and conn.conn_id == conn_id:
            # The worker keeps the connection for its next request; it hands it back with another DONE.
            slot.to(LINGERING)
            slot.reclaim_sent = False
            self.lingering.add(slot)
            conn.to(CONN_LINGERING)
            # What the master knew of its last request says nothing of the next ones, which the worker
            # reads itself (if one dies with its worker, the scoreboard tells what it was: see
            # Losses._request_of, which also zeroes frame_size; zeroed here, it would make the
            # connection look new to accept's eviction of idle connections).
            conn.http_id = conn.http_target = None
            # Its requests are the worker's now: an edge per request would wake the master for nothing.
            self.table.epoll.modify(conn.fd, ET_QUIET)
            if slot.leaving is not None or self.queue or slot.upcoming or serving.stopping:
                self.reclaim(slot)
            return
        slot.conn = None
        if lingered:
            self.lingering.discard(slot)
            if conn is not None:
                self.table.epoll.modify(conn.fd, ET_READ)
        if retiring:
            if slot.upcoming:  # it exits without reading its channel: their requests are still whole in their sockets
                self._requeue_upcoming(slot)
        elif slot.upcoming:
            self._busy(slot, self._take_next(slot))  # type: ignore[arg-type]  (it goes on with the next at once)
        if slot.conn is None:
            slot.to(IDLE)
            if retiring:
                self.pool.leave(slot, "retiring")  # it exits now; its replacement is spawned at once
            elif slot.leaving is not None:
                self.pool.close_channel(slot)  # retired while busy (reload, scale down): it may go now
            else:
                self.idle.append(slot)
        if conn is None or conn.conn_id != conn_id:
            log.warning("worker %d reported an unexpected connection %d", slot.number, conn_id)
            return
        self._conn_done(conn, close, unsent, unread, lingered)

    def _conn_done(self, conn: Connection, close: bool, unsent: bytearray | None, unread: bytes | None,
                   lingered: bool) -> None:
        """A worker handed ``conn`` back: write the rest of its reply, close it, or let it rest."""
        serving = self.serving
        now = serving.now
        if conn.in_batch:
            conn.in_batch = False
            conn.look_again = True  # (the worker read its request alone: one may wait behind it, edge spent)
        batched = self.batcher.batched()
        if batched and conn.expert in batched and not close and not conn.whole_batch:
            self.batcher.answered(conn, conn.expert, now)  # (its caller's next call is expected: see batching)
        conn.unread = unread or b""
        if unsent:
            # The client is slow to take its reply: finish writing it here, not in the worker.
            refusal = self.table.hold_reply(conn, memoryview(unsent))
            if refusal is not None:
                # Part of the reply is out: an error frame would corrupt the stream; the log says why.
                log.warning("closing connection %d: its client is not taking its reply, and the %d bytes left "
                            "would take the master past %s; raise it if such replies are expected",
                            conn.conn_id, len(unsent), refusal)
                self.table.close(conn)
                return
            conn.close_when_written = close
            self.table.start_writing(conn)  # (epoll reports the socket writable: the loop writes what it takes)
        elif close or serving.stopping:
            self.table.close(conn)
        else:
            self.table.rest(conn, now)
            if lingered or conn.look_again or conn.unread:
                # Something may wait in it without a new edge (a request pipelined behind, input the
                # worker handed back, anything sent while a lingering worker held it): look now.
                self.examine(conn)  # type: ignore[misc]

    def in_flight(self) -> bool:
        """Whether any request is being served, written or waits for a worker (stopping waits for them)."""
        return (any(slot.conn is not None for slot in self.pool.workers.values())
                or any(conn.state == WRITING for conn in self.table.by_fd.values())
                or (any(conn.state == QUEUED for conn in self.queue) and bool(self.pool.workers)))
