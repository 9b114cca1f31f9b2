"""Hand-ahead on the dispatcher's seam: a real Dispatcher, Pool and ConnectionTable, a worker's channel
as a socket pair, and no daemon.

With every worker busy on short requests, the master hands each one its next
connections ahead, up to HAND_AHEAD_DEPTH deep, one to each busy worker before
a second to any, the second and more only while what waits ahead of them is
expected to take under HAND_AHEAD_BUDGET.  What a worker never reached goes
back to the front of the queue in its order.  (tests/test_linger.py drives the same on a real daemon.)
"""

from __future__ import annotations

import logging
import select
import socket
from collections import deque

import pytest

from expertd import ipc
from expertd.backoff import Quarantines
from expertd.config import load_config
from expertd.connections import BUSY, QUEUED, ConnectionTable
from expertd.dispatch import HAND_AHEAD_DEPTH, Dispatcher
from expertd.logs import Throttle
from expertd.metrics import Metrics
from expertd.pool import IDLE, Pool, WorkerSlot
from expertd.scoreboard import Scoreboard
from expertd.serving import Serving

SHORT = 0.00003  # a typical call of square: well under HAND_AHEAD_UNDER, 8 of them under HAND_AHEAD_BUDGET
LONG = 5.0  # and of slow


class Harness:
    def __init__(self, directory, workers: int) -> None:
        path = directory / "expertd.conf"
        path.write_text(f"[expertd]\nsocket = {directory / 'x.sock'}\nworkers = {workers}\n"
                        "[expert:square]\nfunction = squares:square\n[expert:slow]\nfunction = squares:square\n")
        self.serving = Serving(load_config(str(path)), experts={"square": {"name": "square", "doc": ""},
                                                                 "slow": {"name": "slow", "doc": ""}})
        self.serving.now = 100.0
        throttle = Throttle(logging.getLogger("test.hand_ahead"))
        self.epoll = select.epoll()
        self.scoreboard = Scoreboard(workers)
        self.metrics = Metrics(workers, self.serving.config.experts)
        self.pool = Pool(self.serving, self.epoll, self.scoreboard, self.metrics, Quarantines(), throttle,
                         make_room=lambda: False)
        self.table = ConnectionTable(self.serving, self.epoll, throttle)
        self.queue: deque = deque()
        self.examined: list = []
        self.dispatcher = Dispatcher(self.serving, self.pool, self.table, self.queue, self.scoreboard,
                                     self.metrics, Quarantines(), on_ready=lambda: None,
                                     kill_and_reap=lambda slot: None, examine=self.examined.append)
        self.dispatcher.typical.update(square=SHORT, slow=LONG)
        self.workers = []  # (slot, the worker's end of its channel)
        self._open: list[socket.socket] = []
        for number in range(workers):
            ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            slot = WorkerSlot(number=number, pid=80_000 + number, channel=ours, born=0.0, generation=1,
                              board=number, state=IDLE, ready_at=0.0)
            self.pool.workers[slot.pid] = slot
            self.dispatcher.idle.append(slot)
            self.workers.append((slot, theirs))
            self._open += [ours, theirs]

    def request(self, expert: str = "square", whole_batch: bool = False):
        """A client connection whose CALL of ``expert`` (a MAP: ``whole_batch``) is whole in its socket, queued
        as intake would."""
        client, served = socket.socketpair()
        self._open += [client, served]
        conn = self.table.add(served, tcp=False, uid=0, gid=0, pid=1, groups=frozenset())
        conn.speaks, conn.expert, conn.whole_batch = "msgpack", expert, whole_batch
        conn.to(QUEUED)
        self.queue.append(conn)
        return conn

    def served(self, worker: int) -> list[int]:
        """The conn_ids waiting in a worker's channel, in the order it would read them."""
        theirs = self.workers[worker][1]
        ids = []
        theirs.setblocking(False)
        try:
            while True:
                conn_id, fd, _frame, _http = ipc.receive_command(theirs)  # type: ignore[misc]
                socket.close(fd)
                ids.append(conn_id)
        except BlockingIOError:
            return ids

    def done(self, worker: int, conn, retiring: bool = False) -> None:
        slot, theirs = self.workers[worker]
        ipc.send_done(theirs, conn.conn_id, close=False, retiring=retiring)
        self.dispatcher.read_reports(slot)

    def close(self) -> None:
        for sock in self._open:
            sock.close()
        self.epoll.close()


@pytest.fixture
def harness(tmp_path):
    made: list[Harness] = []

    def make(workers: int) -> Harness:
        made.append(Harness(tmp_path, workers))
        return made[-1]

    yield make
    for harness in made:
        harness.close()


def test_a_busy_worker_gets_its_next_connections_ahead_up_to_the_depth(harness):
    h = harness(workers=1)
    conns = [h.request() for _ in range(HAND_AHEAD_DEPTH + 2)]
    h.dispatcher.dispatch()
    slot = h.workers[0][0]
    assert h.served(0) == [conn.conn_id for conn in conns[: HAND_AHEAD_DEPTH + 1]]  # in hand, then ahead
    assert slot.conn is conns[0] and list(slot.upcoming) == conns[1 : HAND_AHEAD_DEPTH + 1]
    assert all(conn.state == BUSY for conn in conns[: HAND_AHEAD_DEPTH + 1])
    assert list(h.queue) == conns[HAND_AHEAD_DEPTH + 1 :] and conns[-1].state == QUEUED
    assert h.scoreboard.slot(0).next_waiting()


def test_each_report_moves_the_worker_on_and_refills_what_waits_ahead(harness):
    h = harness(workers=1)
    conns = [h.request() for _ in range(HAND_AHEAD_DEPTH + 2)]
    h.dispatcher.dispatch()
    h.served(0)
    h.done(0, conns[0])
    slot = h.workers[0][0]
    assert slot.conn is conns[1] and conns[0].state == "idle" and h.examined == [conns[0]]
    h.dispatcher.dispatch()
    assert h.served(0) == [conns[-1].conn_id]
    assert list(slot.upcoming) == conns[2:] and not h.queue


def test_busy_workers_each_get_one_ahead_before_any_gets_a_second(harness):
    h = harness(workers=2)
    conns = [h.request() for _ in range(5)]
    h.dispatcher.dispatch()
    first, second = h.served(0), h.served(1)
    assert first[:2] == [conns[0].conn_id, conns[2].conn_id] and second[:2] == [conns[1].conn_id, conns[3].conn_id]
    assert first[2:] == [conns[4].conn_id] and second[2:] == []


def test_connections_a_retiring_worker_never_reached_go_back_first_in_their_order(harness):
    h = harness(workers=1)
    conns = [h.request() for _ in range(HAND_AHEAD_DEPTH + 2)]
    h.dispatcher.dispatch()
    h.done(0, conns[0], retiring=True)
    assert list(h.queue)[: HAND_AHEAD_DEPTH] == conns[1 : HAND_AHEAD_DEPTH + 1]
    assert list(h.queue)[-1] is conns[-1]
    assert all(conn.state == QUEUED for conn in conns[1:])
    assert not h.workers[0][0].upcoming and not h.scoreboard.slot(0).next_waiting()


@pytest.mark.parametrize(("typical", "ahead"), [
    (SHORT, HAND_AHEAD_DEPTH),  # (the depth, not the budget, stops it)
    (0.00012, 4),  # the fourth waits for 4 x 0.12 ms: under HAND_AHEAD_BUDGET (0.5 ms); a fifth would wait 0.6
    (0.0002, 2),
    (0.0003, 1),  # the first needs only the call in hand to be short
    (0.0015, 1),
    (0.0025, 0),  # the call in hand is not short
])
def test_a_worker_is_handed_more_than_one_ahead_only_while_they_wait_for_little(harness, typical, ahead):
    # Beyond the first, what waits ahead of a connection in a worker's channel is expected to take under
    # HAND_AHEAD_BUDGET in all: the depth that very short calls need never makes a longer one wait long.
    h = harness(workers=1)
    h.dispatcher.typical["square"] = typical
    conns = [h.request() for _ in range(HAND_AHEAD_DEPTH + 2)]
    h.dispatcher.dispatch()
    assert h.served(0) == [conn.conn_id for conn in conns[: ahead + 1]]
    assert list(h.workers[0][0].upcoming) == conns[1 : ahead + 1] and list(h.queue) == conns[ahead + 1 :]


@pytest.mark.parametrize(("running", "more"), [(0.0001, True), (0.0006, False)])
def test_a_call_running_past_the_budget_gets_nothing_more_ahead(harness, running, more):
    # Typically 30 µs, but this one has run for 0.6 ms: maybe one of its rare long ones, so what is
    # already in its channel is all that waits it out.
    h = harness(workers=1)
    first = [h.request() for _ in range(2)]
    h.dispatcher.dispatch()
    assert h.served(0) == [conn.conn_id for conn in first]
    h.serving.now += running
    later = [h.request() for _ in range(2)]
    h.dispatcher.dispatch()
    assert h.served(0) == ([conn.conn_id for conn in later] if more else [])
    assert list(h.queue) == ([] if more else later)


def test_a_worker_whose_requests_are_long_is_handed_nothing_ahead(harness):
    h = harness(workers=1)
    h.dispatcher.typical["square"] = 0.5
    conns = [h.request() for _ in range(3)]
    h.dispatcher.dispatch()
    assert h.served(0) == [conns[0].conn_id] and list(h.queue) == conns[1:]


def test_nothing_is_handed_ahead_behind_a_long_call_handed_ahead_before_it(harness):
    # Worker 0 gets slow's call second in its channel: what came after must not wait behind it there,
    # where another worker falls idle long before it would be reached.
    h = harness(workers=2)
    _a, b, slow, d, e = h.request(), h.request(), h.request("slow"), h.request(), h.request()
    h.dispatcher.dispatch()
    assert list(h.workers[0][0].upcoming) == [slow] and list(h.workers[1][0].upcoming) == [d, e]
    h.served(0), h.served(1)
    h.done(1, b), h.done(1, d), h.done(1, e)
    assert h.workers[1][0].state == IDLE and not h.queue  # (e went to worker 1, which is free now)


def test_nothing_is_handed_ahead_behind_a_map(harness):
    h = harness(workers=1)
    first = h.request(whole_batch=True)  # many calls of square in one request: not short, whatever square is
    rest = [h.request() for _ in range(2)]
    h.dispatcher.dispatch()
    assert h.served(0) == [first.conn_id] and list(h.queue) == rest
