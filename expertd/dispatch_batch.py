"""The dispatcher's batches: handing one to a worker, its members' reports, and a worker lost with one.

:class:`BatchDispatching` is mixed into :class:`expertd.dispatch.Dispatcher`
(whose state it works with: the queue, the idle workers, the connection table,
the :class:`expertd.batching.Batcher`).  A batch is the calls of one batched
expert handed to one worker in one message (:func:`expertd.ipc.send_batch`).
Every member is a connection in the BUSY state, recorded in ``slot.batch``
until its DONE comes back; each member's DONE gives its connection back at
once, the last one frees the worker.  Per call inside a batch, as for a call
alone: the expert's timeout (the worker is killed and every member still in
its hands is answered ``timeout``), a lost worker (``worker_lost``, or the
call queued again when the worker never began it), and a member whose call
waited in the queue past its timeout is answered ``timeout`` without running.
"""

from __future__ import annotations

import errno
import logging
from collections import deque
from typing import TYPE_CHECKING

from expertd import ipc
from expertd.connections import BUSY, Connection, ConnectionTable
from expertd.dispatch_losses import still_unread
from expertd.errors import Overloaded, RequestTimeout
from expertd.pool import BUSY as WORKER_BUSY
from expertd.pool import Pool, WorkerSlot, exited_cleanly

if TYPE_CHECKING:
    from expertd.batching import Batcher
    from expertd.metrics import Metrics
    from expertd.scoreboard import Scoreboard
    from expertd.serving import Serving

log = logging.getLogger("expertd.master")


class BatchDispatching:
    """Batches, for :class:`expertd.dispatch.Dispatcher`."""

    serving: Serving
    pool: Pool
    queue: deque[Connection]
    idle: deque[WorkerSlot]
    table: ConnectionTable
    scoreboard: Scoreboard
    metrics: Metrics
    batcher: Batcher

    if TYPE_CHECKING:  # the Dispatcher's
        def _busy(self, slot: WorkerSlot, conn: Connection) -> None: ...
        def _requeue(self, conn: Connection) -> None: ...
        def _conn_done(self, conn: Connection, close: bool, unsent: bytearray | None, unread: bytes | None,
                       lingered: bool) -> None: ...
        def _answer_lost_request(self, conn: Connection, slot: WorkerSlot, how: str, writing: bool,
                                 log_id: str | None = None, started: float | None = None) -> None: ...

    def _batch_of(self, lead: Connection, limits: tuple[int, float]) -> list[Connection] | None:
        """The calls that go with ``lead`` to the next idle worker (``lead`` first), or None: the worker waits
        for company.  Empty when ``lead`` itself waited past its timeout (it is answered so)."""
        expert = lead.expert or ""
        batcher = self.batcher
        if expert in batcher._held:
            return None  # (held already in this hand-out: its calls stay together)
        max_batch, batch_delay = limits
        now = self.serving.now
        members = self._fresh(batcher.gather(lead, self.queue, max_batch), now)
        if not members or members[0] is not lead:
            return []
        in_flight, workers = self._in_hand(expert)
        take = batcher.take(expert, len(members), in_flight, workers, max_batch, batch_delay, now)
        return members[:take] if take else None

    def _in_hand(self, expert: str) -> tuple[int, int]:
        """Calls of ``expert`` in workers' hands, and the workers its calls share (for a batch's fair share):
        the idle ones and those busy with it (a worker busy with another expert's call is not its)."""
        in_flight = workers = 0
        for slot in self.pool.workers.values():
            conn = slot.conn
            if conn is not None and conn.expert == expert and slot.state == WORKER_BUSY:
                in_flight += len(slot.batch) if slot.batch else 1
                workers += 1
        return in_flight, workers + len(self.idle)

    def _fresh(self, members: list[Connection], now: float) -> list[Connection]:
        """``members`` without those that waited in the queue past their expert's timeout (answered so)."""
        timeout = self.serving.config.expert_timeout(members[0].expert or "")
        if now - members[0].queued_at <= timeout:  # (the oldest is first: all are in time)
            return members
        fresh = []
        for number, conn in enumerate(members):
            if now - conn.queued_at <= timeout:
                fresh.append(conn)
                continue
            if number:  # (the first was taken from the queue already)
                self.queue.remove(conn)
            self.metrics.count_failure(conn.expert, RequestTimeout.code)
            self.table.fail(conn, RequestTimeout(
                f"{conn.expert} waited {now - conn.queued_at:.1f}s for a worker, past its {timeout:g}s timeout; "
                "it was not run (the daemon is overloaded: add workers, or retry later)", expert=conn.expert),
                started=conn.queued_at)
        return fresh

    def _hand_out_batch(self, members: list[Connection]) -> None:
        """Hand ``members`` (the first one popped from the queue, the others still in it) to an idle worker."""
        queue, idle = self.queue, self.idle
        slot = idle.popleft()
        self.scoreboard.clear(slot.board)  # before the hand-over: the worker may begin at once
        try:
            ipc.send_batch(slot.channel, [(conn.conn_id, conn.fd, conn.inbuf, conn.speaks == "http")
                                          for conn in members])
        except OSError as exc:
            if exc.errno in (errno.EPIPE, errno.ECONNRESET, errno.ENOTCONN, errno.EBADF):
                queue.appendleft(members[0])  # the worker is gone (SIGCHLD will tell); the rest are still queued
                return
            log.error("cannot hand a batch to worker %d: %s", slot.number, exc.strerror)
            idle.appendleft(slot)
            for conn in members:  # out of descriptors or memory here: keep the worker, refuse these calls
                if conn is not members[0]:
                    queue.remove(conn)
                self.table.fail(conn, Overloaded(f"the daemon is short of resources ({exc.strerror}); retry shortly"))
            return
        now = self.serving.now
        self.batcher.handed_out(members[0].expert or "", members, now)
        slot.batch = {}
        for number, conn in enumerate(members):
            if number:
                queue.remove(conn)  # (cheap enough: a batch is for calls that cost far more than this)
            if conn.inbuf is not None:
                self.table.release_gathered(conn)
            conn.to(BUSY)
            conn.in_batch = True
            slot.batch[conn.conn_id] = conn
        self._busy(slot, members[0])

    def _member_done(self, slot: WorkerSlot, conn_id: int, close: bool, unsent: bytearray | None,
                     unread: bytes | None) -> bool:
        """A member of ``slot``'s batch reported; False when it was the last (the usual DONE path goes on)."""
        batch = slot.batch
        assert batch is not None
        conn = batch.pop(conn_id, None)
        if not batch:
            slot.batch = None
            if conn is not None:
                slot.conn = conn  # (what the usual path hands back)
            return False
        if conn is None:
            log.warning("worker %d reported an unexpected connection %d", slot.number, conn_id)
            return True
        if slot.conn is conn:
            slot.conn = next(iter(batch.values()))  # (the slot's connection is always one still in its hands)
        self._conn_done(conn, close, unsent, unread, False)
        return True

    def _batch_lost(self, slot: WorkerSlot, status: int, how: str, began: bool, writing: bool) -> str | None:
        """A worker died with a batch in hand: see to every member still in it.  Returns the blamed expert."""
        members = list(slot.batch.values())  # type: ignore[union-attr]
        slot.batch, slot.conn = None, None
        expert = members[0].expert
        if not began and exited_cleanly(status):
            # A worker exits cleanly only between requests: it never began this batch (a SIGTERM as it
            # was handed over), so the members' requests are still whole in their sockets, but for those
            # the master had gathered (their bytes went with the batch): they are answered as lost.
            lost = []
            for conn in members:
                conn.in_batch = False
                if still_unread(conn):
                    self._requeue(conn)
                else:
                    lost.append(conn)
            for conn in lost:
                self._answer_lost_request(conn, slot, how, writing, started=conn.queued_at)
            return None
        if slot.leaving is not None:
            log.debug("worker %d (pid %d) %s (%s)", slot.number, slot.pid, how, slot.leaving)
        else:
            log.error("worker %d (pid %d) %s while serving a batch of %d calls of %s (requests %s)", slot.number,
                      slot.pid, how, len(members), expert, " ".join(self.table.log_id(conn) for conn in members))
        for conn in members:
            conn.in_batch = False
            # Once the worker was writing, it may have been writing to any of them: close rather than send
            # an error frame into a reply (a pooled client retries a connection closed before its reply).
            self._answer_lost_request(conn, slot, how, writing, started=conn.queued_at)
        return expert
