"""What the dispatcher does when a worker dies or overruns: answer, or queue again, what it held.

:class:`Losses` is mixed into :class:`expertd.dispatch.Dispatcher`, whose
state it works with (the pool, the idle and lingering workers, the connection
table, the deadlines).  A worker that dies hands back every connection it held:
one it never began is queued again; one whose call died with it is answered
``worker_lost`` (or ``timeout`` when the master killed it for its timeout, or
``shutting_down``), unless reply bytes may be out already (then it is closed).
Timeouts: a busy worker past its request's deadline (the master's clock), or a
lingering one past its scoreboard deadline, is killed and replaced.
"""

from __future__ import annotations

import logging
from collections import deque
from typing import TYPE_CHECKING

from expertd import accesslog, protocol
from expertd.connections import BUSY, ET_READ, Connection, ConnectionTable
from expertd.errors import RequestTimeout, ShuttingDown, WorkerLost
from expertd.pool import BUSY as WORKER_BUSY
from expertd.pool import GONE, LINGERING, Pool, WorkerSlot, exited_cleanly

if TYPE_CHECKING:
    from collections.abc import Callable

    from expertd.metrics import Metrics
    from expertd.scoreboard import Scoreboard
    from expertd.serving import Serving

log = logging.getLogger("expertd.master")
_NEVER = float("inf")


class Losses:
    """Dead and overdue workers, for :class:`expertd.dispatch.Dispatcher`."""

    serving: Serving
    pool: Pool
    table: ConnectionTable
    scoreboard: Scoreboard
    metrics: Metrics
    idle: deque[WorkerSlot]
    lingering: set[WorkerSlot]
    next_deadline: float
    kill_and_reap: Callable[[WorkerSlot], None]

    if TYPE_CHECKING:  # the Dispatcher's
        def read_reports(self, slot: WorkerSlot, drain: bool = True) -> None: ...
        def _requeue_upcoming(self, slot: WorkerSlot) -> None: ...
        def _requeue(self, conn: Connection) -> None: ...
        def _batch_lost(self, slot: WorkerSlot, status: int, how: str, began: bool, writing: bool) -> str | None: ...

    # ------------------------------------------------------------- deaths
    def worker_exited(self, slot: WorkerSlot, status: int, how: str) -> str | None:
        """See to what a dead worker held: its connections and their callers.  Returns the served expert
        whose call it died in, if any (for its quarantine)."""
        if slot.channel.fileno() >= 0:
            self.read_reports(slot)  # a DONE sent just before dying still counts
        self.pool.close_channel(slot)
        if slot in self.idle:
            self.idle.remove(slot)
        lingering = slot.state == LINGERING
        self.lingering.discard(slot)
        if slot.upcoming:  # never reached: a worker reports the connection in hand before reading the next
            self._requeue_upcoming(slot)
        self.metrics.retire(slot.board)
        began, _timeout, request_id, writing, expert = self.scoreboard.read(slot.board)
        if slot.batch:
            blamed = self._batch_lost(slot, status, how, bool(began), writing)
            slot.to(GONE)
            return blamed
        # A lingering worker that was only waiting on its connection was serving nothing.
        serving = slot.conn is not None and (not lingering or bool(began))
        if (serving and not lingering and not began and exited_cleanly(status) and slot.conn.state == BUSY
                and still_unread(slot.conn)):
            # A worker exits cleanly only between connections, so it never started this one (a
            # SIGTERM as it was handed over): the request is still whole in its socket.
            conn, slot.conn = slot.conn, None
            self._requeue(conn)
            serving = False
        # The expert whose call the worker died in (a served one only: names come from clients).
        # The name the worker decoded (on the scoreboard) over the master's hint from the header.
        blamed = (expert or (None if lingering else slot.conn.expert)) if serving else None  # type: ignore[union-attr]
        lost = self._request_of(slot, lingering, request_id, expert) if serving else "-"
        if slot.leaving is not None:
            log.debug("worker %d (pid %d) %s (%s)", slot.number, slot.pid, how, slot.leaving)
        elif serving:
            log.error("worker %d (pid %d) %s while serving request %s", slot.number, slot.pid, how, lost,
                      extra={"request_id": lost})
        elif not self.serving.stopping:
            log.warning("worker %d (pid %d) %s", slot.number, slot.pid, how)
        conn = slot.conn
        if conn is not None:
            slot.conn = None
            if lingering:
                self.table.epoll.modify(conn.fd, ET_READ)
            if not serving and lingering and conn.speaks == "msgpack" and not exited_cleanly(status):
                # A lingering worker's wait reads the socket: a request it had just taken out may
                # have died with it.  Closing makes the client send it again (a pooled connection
                # closed before any reply byte is retried at once); taking it back would leave the
                # client waiting for a reply that never comes.
                self.table.close(conn)
            elif not serving:  # the client lost nothing: the master takes the connection back
                self.table.rest(conn, self.serving.now)
                self.table.recheck.append(conn)
            else:
                self._answer_lost_request(conn, slot, how, writing, lost, began or conn.queued_at)
        slot.to(GONE)
        return blamed

    def _answer_lost_request(self, conn: Connection, slot: WorkerSlot, how: str, writing: bool,
                             log_id: str | None = None, started: float | None = None) -> None:
        """Tell the caller why its request died with its worker, unless reply bytes may be out already.

        ``log_id`` is the request's id in the logs (default: the connection's), ``started`` when it began
        (the access log's duration).
        """
        timed_out = slot.leaving == "timed out"
        if conn.expert is not None and not writing:  # once writing, the worker has counted the call
            self.metrics.count_failure(conn.expert, "timeout" if timed_out else "worker_lost")
        if writing:
            self.table.close(conn)  # part of a reply may be out: an error frame would corrupt the stream
        elif timed_out:
            limit = self.serving.config.expert_timeout(conn.expert or "")
            self.table.fail(conn, RequestTimeout(
                f"{conn.expert or 'the request'} did not answer within its {limit:g}s timeout; "
                "the worker was replaced", expert=conn.expert), started=started, log_id=log_id)
        elif self.serving.stopping:
            self.table.fail(conn, ShuttingDown("the daemon stopped before answering; retry when it is back"),
                            started=started, log_id=log_id)
        else:
            self.table.fail(conn, WorkerLost(f"the worker serving this request {how}; the request can be retried"),
                            started=started, log_id=log_id)

    def _request_of(self, slot: WorkerSlot, lingering: bool, request_id: int, expert: str) -> str:
        """The log id of the request ``slot``'s worker held when it died or timed out (its own access line is
        never written), ``request_id`` and ``expert`` as the scoreboard shows them.

        A request the worker took itself while lingering, which the master never saw, is recorded on the
        connection as the worker wrote it on the scoreboard: a msgpack frame's id; an HTTP request's route
        and own X-Request-Id, or else the number of the id the worker made for it; its size is not known (0).
        """
        conn = slot.conn
        assert conn is not None
        if lingering:
            conn.request_id, conn.expert, conn.frame_size = request_id, expert or None, 0
            if conn.speaks == "http":
                route, caller_id = self.scoreboard.http_request(slot.board, request_id)
                conn.http_id = caller_id or (accesslog.generated_id(request_id) if request_id else None)
                conn.http_target = accesslog.target_of(route, expert or None) if route else None
        elif conn.speaks == "http" and conn.http_id is None and request_id:
            conn.http_id = accesslog.generated_id(request_id)  # (the id the worker made: its lines name it)
        return ConnectionTable.log_id(conn)

    # ------------------------------------------------------------- timeouts
    def expire(self, now: float) -> None:
        """Kill workers past their request's timeout (busy: by the master's deadline; lingering: by the scoreboard)."""
        if now > self.next_deadline:
            for slot in list(self.pool.workers.values()):
                if slot.state == WORKER_BUSY and now > slot.deadline:
                    self.read_reports(slot)  # a report already waiting means it finished in time
                    if slot.state == WORKER_BUSY and now > slot.deadline:
                        self._time_out(slot)
            self.next_deadline = min((slot.deadline for slot in self.pool.workers.values()
                                      if slot.state == WORKER_BUSY), default=_NEVER)
        for slot in list(self.lingering):
            began, timeout = self.scoreboard.read(slot.board)[:2]
            # The scoreboard is read without a lock; as a second line of defence against a
            # read that overlapped a write, act only on a request seen overdue at two scans.
            if began and timeout > 0 and now > began + timeout:
                if slot.overdue == began and slot.conn is not None:
                    self._time_out(slot)
                slot.overdue = began
            else:
                slot.overdue = 0.0

    def _time_out(self, slot: WorkerSlot) -> None:
        conn = slot.conn
        assert conn is not None
        _began, _timeout, request_id, _writing, expert = self.scoreboard.read(slot.board)
        lost = self._request_of(slot, slot.state == LINGERING, request_id, expert)
        log.error("worker %d (pid %d) exceeded the %gs timeout of %s (request %s); killing and replacing it",
                  slot.number, slot.pid, self.serving.config.expert_timeout(conn.expert or ""),
                  conn.expert or "(request)", lost, extra={"request_id": lost})
        self.pool.leave(slot, "timed out", override=True)
        self.kill_and_reap(slot)


def still_unread(conn: Connection) -> bool:
    """Whether the connection's request is still whole in its socket (no worker read any of it)."""
    try:
        return conn.frame_size > 0 and protocol.queued_bytes(conn.fd) >= conn.frame_size
    except OSError:
        return False
