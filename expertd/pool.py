"""The worker pool: slots, spawning, retiring, scaling, and what a worker's death means.

Each worker has a :class:`WorkerSlot`: its pid, its channel (the Unix socket
pair end the master hands connections down and reads reports from), its slot
on the scoreboard, and its state, changed only by :meth:`WorkerSlot.to`
against :data:`TRANSITIONS`:

    =========  ============================================================
    booting    forked, running its after_fork hooks; not READY yet
    idle       ready, waiting in its channel for a connection
    busy       serving the connection handed to it (and maybe up to HAND_AHEAD_DEPTH handed ahead)
    lingering  answered, and kept the connection to serve its next request itself
    gone       exited and reaped
    =========  ============================================================

Apart from its state, a worker may be *leaving* (``slot.leaving`` says why:
retiring after max_requests, replaced by a reload, scaled down, timed out):
it finishes what it holds, and its exit is expected, never a crash.

Workers are forked by the serving generation's parent process
(:mod:`expertd.generation`); the pool asks it for one, one per loop iteration
(the poll timeout is then 0), so that clients are served between forks.

State owned here: the slots by pid and by channel descriptor, the worker
numbers and scoreboard slots in use, and the respawn backoff.
"""

from __future__ import annotations

import errno
import logging
import os
import select
import signal
import socket
import time
from collections import deque
from dataclasses import dataclass, field

from expertd import ipc
from expertd.backoff import BACKOFF, QUARANTINED, CrashBackoff, Quarantines
from expertd.connections import Connection
from expertd.generation import RETIRED, Generation, GenerationError
from expertd.logs import Throttle
from expertd.metrics import Metrics
from expertd.scoreboard import MAX_SLOTS, Scoreboard
from expertd.serving import Serving

log = logging.getLogger("expertd.master")

BOOTING, IDLE, BUSY, LINGERING, GONE = "booting", "idle", "busy", "lingering", "gone"
TRANSITIONS: dict[str, frozenset[str]] = {
    BOOTING: frozenset({IDLE, GONE}),
    IDLE: frozenset({BUSY, GONE}),
    BUSY: frozenset({IDLE, BUSY, LINGERING, GONE}),  # (busy again: it goes on with a connection handed ahead)
    LINGERING: frozenset({IDLE, BUSY, LINGERING, GONE}),
    GONE: frozenset(),
}


class StateError(RuntimeError):
    """A worker was moved to a state :data:`TRANSITIONS` does not allow from its own."""


@dataclass(eq=False, slots=True)
class WorkerSlot:
    """The master's record of one worker process."""

    number: int
    pid: int
    channel: socket.socket
    born: float
    generation: int
    board: int  # its slot in the scoreboard
    state: str = BOOTING
    ready_at: float | None = None
    conn: Connection | None = None  # the connection it serves (busy) or keeps (lingering)
    # Handed ahead, in order: each waits in its channel until the worker reports the one before it.
    upcoming: deque[Connection] = field(default_factory=deque)
    upcoming_expected: float = 0.0  # how long those are expected to take in all (their .expected summed)
    # A batch in hand: its members not yet reported, by conn_id (slot.conn is one of them); else None.
    batch: dict[int, Connection] | None = None
    busy_since: float = 0.0
    deadline: float = 0.0  # when the request in hand times out
    reclaim_sent: bool = False
    overdue: float = 0.0  # start time of a lingering request seen past its deadline once
    requests: int = 0
    failure: str | None = None
    memory: tuple[int, int, int] | None = None  # USS, PSS, RSS in bytes, measured after warm-up
    leaving: str | None = None  # why the worker is on its way out (retiring, timed out); not a crash
    last_done: float | None = None

    def to(self, state: str) -> None:
        """Move to ``state``: the one place a worker's state changes."""
        if state not in TRANSITIONS[self.state]:
            raise StateError(f"worker {self.number} (pid {self.pid}): {self.state} -> {state} is not a transition")
        self.state = state


class Pool:
    """The workers: spawned from the serving generation's parent, retired, scaled, reaped."""

    def __init__(self, serving: Serving, epoll: select.epoll, scoreboard: Scoreboard, metrics: Metrics,
                 quarantines: Quarantines, throttle: Throttle, make_room: object) -> None:
        self.serving = serving
        self.epoll = epoll
        self.scoreboard = scoreboard
        self.metrics = metrics
        self.quarantines = quarantines
        self.throttle = throttle
        self.make_room = make_room  # () -> bool: close an idle connection for a descriptor (Acceptor.evict_for_room)
        self.workers: dict[int, WorkerSlot] = {}  # by pid
        self.by_channel: dict[int, WorkerSlot] = {}
        self.backoff = CrashBackoff()
        self.parent: Generation | None = None  # the serving generation's parent: it forks the workers
        self.max_workers = max(64, 8 * (os.cpu_count() or 1))
        self._active: int | None = None  # len(current()), counted again after a change (see changed)
        # Whether the pool is as wanted (no worker missing, a parent to fork them): set by the master's
        # upkeep, cleared by changed() on anything that may change that.
        self.settled = False

    def channel_count(self) -> int:
        return len(self.by_channel)

    def changed(self) -> None:
        """Workers came, went or left, the serving generation or its parent changed, or the number wanted:
        count the active ones again (and look again whether one is missing)."""
        self._active = None
        self.settled = False

    def active(self) -> int:
        """How many of the serving generation's workers are not on their way out (counted once per change)."""
        if self._active is None:
            self._active = len(self.current())
        return self._active

    def current(self) -> list[WorkerSlot]:
        """Workers of the serving generation that are not on their way out."""
        generation = self.serving.generation
        return [slot for slot in self.workers.values() if slot.leaving is None and slot.generation == generation]

    def boards(self) -> list[int]:
        """The scoreboard slots of every worker alive (its metrics' slot too)."""
        return [slot.board for slot in self.workers.values()]

    def ready_count(self) -> int:
        return sum(1 for slot in self.workers.values() if slot.ready_at is not None and slot.leaving is None)

    def can_spawn(self) -> bool:
        """Whether the serving generation has a parent process to fork its workers."""
        parent = self.parent
        return parent is not None and not parent.exited and parent.state != RETIRED

    # ------------------------------------------------------------- spawning
    def spawn(self) -> str | None:
        """Fork one worker of the serving generation; on failure, the reason if it was the parent's fault."""
        used = {slot.number for slot in self.workers.values()}
        number = next(n for n in range(1, len(used) + 2) if n not in used)
        boards = {slot.board for slot in self.workers.values()}
        board = next(b for b in range(MAX_SLOTS) if b not in boards)
        self.scoreboard.clear(board)
        self.scoreboard.slot(board).served(0)
        try:
            master_end, worker_end = self._channel_pair()
        except OSError as exc:
            self.throttle.error("cannot create a worker channel: %s; retrying in a second", exc.strerror)
            self.backoff.retry_in(1.0)
            return None
        assert self.parent is not None
        try:
            pid = self.parent.spawn(number, board, worker_end, self.metrics.index)
        except (OSError, GenerationError) as exc:
            master_end.close()
            log.error("cannot start a worker: %s; retrying in a second", exc)
            self.backoff.retry_in(1.0)
            return str(exc) if isinstance(exc, GenerationError) else None
        finally:
            worker_end.close()
        master_end.setblocking(False)
        slot = WorkerSlot(number=number, pid=pid, channel=master_end, born=self.serving.now,
                          generation=self.serving.generation, board=board)
        self.workers[pid] = slot
        self.changed()
        self.by_channel[master_end.fileno()] = slot
        self.epoll.register(master_end.fileno(), select.EPOLLIN)
        log.debug("worker %d spawned (pid %d)", number, pid)
        return None

    def _channel_pair(self) -> tuple[socket.socket, socket.socket]:
        try:
            return ipc.channel_pair()
        except OSError as exc:
            # Out of descriptors despite the reserve (something else took them): supervision comes
            # first, so two idle connections make room (their clients reconnect).
            if exc.errno not in (errno.EMFILE, errno.ENFILE) or not (self.make_room() and self.make_room()):  # type: ignore[operator]
                raise
        log.warning("out of descriptors for a worker channel: closed two idle connections to make room")
        return ipc.channel_pair()

    def ready(self, slot: WorkerSlot) -> None:
        """Its READY report: it serves from now (unless it was retired while booting)."""
        slot.ready_at = self.serving.now
        slot.to(IDLE)
        log.info("worker %d (pid %d) ready in %.2fs", slot.number, slot.pid, slot.ready_at - slot.born)

    # ------------------------------------------------------------- leaving
    def close_channel(self, slot: WorkerSlot) -> None:
        """Close the master's end of a worker's channel: an idle worker exits when it sees that; a dead
        one's channel, read to its end, is done with."""
        fd = slot.channel.fileno()
        if fd < 0:
            return
        if self.by_channel.pop(fd, None) is not None:
            self.epoll.unregister(fd)
        slot.channel.close()

    def channel_closed(self, slot: WorkerSlot) -> None:
        """The worker's end closed: it is exiting (SIGCHLD follows); stop watching its channel."""
        if self.by_channel.pop(slot.channel.fileno(), None) is not None:
            self.epoll.unregister(slot.channel.fileno())

    def kill(self, slot: WorkerSlot) -> None:
        try:
            os.kill(slot.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def pop(self, pid: int) -> WorkerSlot | None:
        """The slot of a worker that exited (reaped); None if ``pid`` is not a worker's."""
        slot = self.workers.pop(pid, None)
        if slot is not None:
            self.changed()
        return slot

    def leave(self, slot: WorkerSlot, reason: str, override: bool = False) -> bool:
        """Mark a worker as on its way out (the one place ``leaving`` is set); False if it already was.

        ``override``: a timeout says why even of a worker already leaving (its caller is told it timed out).
        """
        if slot.leaving is not None and not override:
            return False
        slot.leaving = reason
        self.changed()
        return True

    def terminate(self, wait: float = 5.0) -> list[int]:
        """Stopping: every worker told to exit (channel closed, SIGTERM), waited for up to ``wait`` seconds, then
        killed.  Returns the pids of other children reaped meanwhile."""
        for slot in list(self.workers.values()):
            self.close_channel(slot)  # an idle worker exits when its channel closes
            try:
                os.kill(slot.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        others = []
        deadline = time.monotonic() + wait
        while self.workers and time.monotonic() < deadline:
            try:
                pid, _status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                time.sleep(0.02)
            elif self.workers.pop(pid, None) is None:
                others.append(pid)
        for slot in list(self.workers.values()):
            self.kill(slot)
            try:
                os.waitpid(slot.pid, 0)
            except ChildProcessError:
                pass
        self.workers.clear()
        return others

    def retire_order(self, workers: int) -> list[WorkerSlot]:
        """The serving generation's workers to retire so that ``workers`` stay: idle first, then the youngest."""
        current = self.current()
        current.sort(key=lambda s: (s.conn is None, s.born))  # busy and oldest first: those stay
        return current[workers:]

    def overdue_boots(self, now: float) -> list[WorkerSlot]:
        """Workers not ready after boot_timeout (stuck in their after_fork hooks): the caller kills them."""
        timeout = self.serving.config.boot_timeout
        late = [slot for slot in self.workers.values() if slot.ready_at is None and now - slot.born > timeout]
        for slot in late:
            log.error("worker %d (pid %d) not ready after %.0fs (boot_timeout); killing it",
                      slot.number, slot.pid, timeout)
            slot.failure = f"worker {slot.number} timed out in its after_fork hooks (boot_timeout)"
        return late

    # ------------------------------------------------------------- deaths
    def exited(self, slot: WorkerSlot, blamed: str | None) -> bool:
        """After an unexpected death (its connection seen to): respawn at once, or after a backoff.

        ``blamed`` is the served expert whose call it died in, if any: its crash
        loop quarantines that expert instead of slowing everyone's respawns.
        True if that death began the expert's quarantine (lingering workers must
        then hand their connections back: their calls never pass the master's check).
        """
        config = self.serving.config
        if blamed in self.serving.experts and config.quarantine_after:
            answered = self.metrics.answered(blamed, [s.board for s in self.workers.values()])
            counted = self.quarantines.count_crash(blamed, answered, config.quarantine_after,
                                                   config.quarantine_window, config.quarantine_time)
            if counted == QUARANTINED:
                self.scoreboard.pause_lingering(self.quarantines.linger_paused_until)
                return True
            if counted != BACKOFF:
                return False  # its quarantine holds that expert back, not everyone's respawn backoff
        # Crash loop: a worker that never became ready, or deaths faster than the
        # pool could plausibly need (an expert that kills its worker on every call).
        self.backoff.death(slot.ready_at is not None, config.workers)
        return False


def describe_status(status: int) -> str:
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        try:
            name = signal.Signals(sig).name
        except ValueError:
            name = f"signal {sig}"
        return f"was killed by {name}"
    return f"exited with status {os.WEXITSTATUS(status)}"


def exited_cleanly(status: int) -> bool:
    return os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
