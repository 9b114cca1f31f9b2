"""Generations as the master sees them (expertd.reloads.Reloads), with fake generation parents: no process forked."""

import itertools
import logging
import select
import socket
import time
from collections import deque

import pytest

from expertd import protocol
from expertd.config import load_config
from expertd.connections import IDLE, WAITING, ConnectionTable
from expertd.generation import FAILED, KEEPALIVE, LOADED, LOADING, RETIRED, SERVING
from expertd.logs import Throttle
from expertd.metrics import Metrics
from expertd.pool import WorkerSlot
from expertd.reloads import Reloads
from expertd.scoreboard import Scoreboard
from expertd.serving import Serving

SQUARE = {"name": "square", "doc": "Squares a number."}
CUBE = {"name": "cube", "doc": "Cubes a number."}
_pids = itertools.count(60_000)


class FakeGeneration:
    """Stands in for expertd.generation.Generation: its reports are scripted, its process imaginary."""

    def __init__(self, number, config) -> None:
        self.number = number
        self.config = config
        self.pid = next(_pids)
        self.control, self.peer = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.state = LOADING
        self.experts: dict = {}
        self.started = time.monotonic()
        self.deadline = self.started + config.reload_timeout
        self.exited = False
        self.waiters: list = []
        self.reports: deque = deque()
        self.killed = False

    def receive(self):
        if not self.reports:
            return None
        op, value = self.reports.popleft()
        if op == LOADED:  # (as the real one does)
            self.experts, self.state = value, SERVING
        return op, value

    def wait_loaded(self, keepalive, interrupted):
        self.experts, self.state = {"square": SQUARE}, SERVING
        return self.experts

    def close(self) -> None:
        self.state = RETIRED
        if self.control.fileno() >= 0:
            self.control.close()

    def kill(self) -> None:
        self.killed = True
        self.close()


class Starter:
    """The start_parent factory: records what it was asked to start."""

    def __init__(self) -> None:
        self.started: list[FakeGeneration] = []
        self.close_fds: list[list[int]] = []
        self.error: OSError | None = None

    def __call__(self, number, config, shared, close_fds):
        if self.error is not None:
            raise self.error
        generation = FakeGeneration(number, config)
        self.started.append(generation)
        self.close_fds.append(close_fds)
        return generation


class FakePool:
    def __init__(self, serving) -> None:
        self.serving = serving
        self.parent = None
        self.workers: dict[int, WorkerSlot] = {}
        self.changes = 0

    def current(self):
        return [s for s in self.workers.values() if s.leaving is None and s.generation == self.serving.generation]

    def changed(self) -> None:
        self.changes += 1


class FakeDispatcher:
    def __init__(self) -> None:
        self.retired: list[tuple[WorkerSlot, str]] = []

    def retire(self, slot, reason) -> None:
        self.retired.append((slot, reason))
        slot.leaving = reason


class FakeNotifier:
    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def reloading(self) -> None:
        self.calls.append(("reloading",))

    def ready(self, status) -> None:
        self.calls.append(("ready", status))

    def keep_waiting(self) -> None:
        self.calls.append(("keep_waiting",))

    def status(self, text) -> None:
        self.calls.append(("status", text))


class Harness:
    def __init__(self, directory) -> None:
        self.path = directory / "expertd.conf"
        self.socket = str(directory / "x.sock")
        self.write()
        self.serving = Serving(load_config(str(self.path)))
        self.epoll = select.epoll()
        self.pool = FakePool(self.serving)
        self.dispatcher = FakeDispatcher()
        self.table = ConnectionTable(self.serving, self.epoll, Throttle(logging.getLogger("t")))
        self.notifier = FakeNotifier()
        self.metrics = Metrics(4, self.serving.config.experts)
        self.shared = (Scoreboard(4), self.metrics)
        self.starter = Starter()
        self.events: list = []
        self.reloads = Reloads(
            self.serving, self.pool, self.dispatcher, self.table, self.epoll, self.notifier, self.shared,
            own_fds=lambda: [901, 902], overrides={}, on_first_ready=lambda: self.events.append("first ready"),
            on_start_failed=lambda *why: self.events.append(("start failed", *why)),
            on_reloaded=lambda: self.events.append("reloaded"), start_parent=self.starter)
        self._numbers = itertools.count(1)
        self._sockets: list[socket.socket] = []

    def write(self, workers: int = 2, experts=("square",), extra: str = "") -> None:
        lines = ["[expertd]", f"socket = {self.socket}", f"workers = {workers}", "reload_timeout = 30s", extra]
        for name in experts:
            lines += [f"[expert:{name}]", f"function = shapes:{name}"]
        self.path.write_text("\n".join(lines) + "\n")

    def generation(self, number: int) -> FakeGeneration:
        return next(g for g in self.starter.started if g.number == number)

    def start(self) -> FakeGeneration:
        """Start-up: generation 1 loaded, its workers all ready, the daemon announced."""
        self.reloads.load_first(None, lambda: None)
        self.ready_workers(1, self.serving.config.workers)
        assert self.reloads.announced
        return self.generation(1)

    def ready_workers(self, generation: int, count: int) -> list[WorkerSlot]:
        slots = []
        for _ in range(count):
            number = next(self._numbers)
            slot = WorkerSlot(number=number, pid=70_000 + number, channel=None, born=0.0, generation=generation,
                              board=0, ready_at=1.0)
            self.pool.workers[slot.pid] = slot
            slots.append(slot)
            self.reloads.worker_ready()
        return slots

    def waiter(self, request_id: int):
        """A RELOAD request waiting for its outcome: its connection, and the client's end."""
        ours, theirs = socket.socketpair()
        ours.setblocking(False)
        theirs.setblocking(False)
        self._sockets += [ours, theirs]
        conn = self.table.add(ours, tcp=False, uid=0, gid=0, pid=1, groups=frozenset())
        conn.to(WAITING)
        return (conn, request_id), theirs

    @staticmethod
    def answer(client: socket.socket):
        try:
            data = client.recv(65536)
        except BlockingIOError:
            return None
        kind, request_id, _length = protocol.parse_header(data[: protocol.HEADER_SIZE])
        assert kind == protocol.RESULT
        return request_id, protocol.unpack(data[protocol.HEADER_SIZE:])

    def close(self) -> None:
        for generation in self.starter.started:
            generation.close()
            generation.peer.close()
        for sock in self._sockets:
            sock.close()
        self.epoll.close()


@pytest.fixture
def h(tmp_path):
    harness = Harness(tmp_path)
    yield harness
    harness.close()


def _watched(h, generation) -> bool:
    """Whether the loop wakes for the generation's reports."""
    generation.peer.send(KEEPALIVE)
    try:
        return any(fd == generation.control.fileno() for fd, _mask in h.epoll.poll(0))
    finally:
        generation.control.recv(16)


# ---------------------------------------------------------------------------------------- start-up
def test_the_first_generation_serves_once_loaded(h):
    h.reloads.load_first(None, lambda: None)
    first = h.generation(1)
    assert h.serving.experts == {"square": SQUARE} and h.pool.parent is first
    assert h.reloads.parents == {first.pid: first}
    assert h.starter.close_fds == [[901, 902]]  # the master's descriptors: the parent must not hold them


def test_the_daemon_is_announced_once_every_worker_is_ready(h):
    h.reloads.load_first(None, lambda: None)
    h.ready_workers(1, 1)
    assert not h.reloads.announced and h.events == []
    h.ready_workers(1, 1)
    assert h.reloads.announced and h.events == ["first ready"]
    assert h.notifier.calls == [("ready", "2 workers ready, generation 1")]
    h.ready_workers(1, 1)  # a replacement later: not announced again
    assert h.events == ["first ready"]


def test_a_reload_before_the_daemon_is_ready_runs_once_it_is(h):
    h.reloads.load_first(None, lambda: None)
    h.reloads.reload()
    h.reloads.reload()
    assert h.reloads.pending and len(h.starter.started) == 1
    h.ready_workers(1, 2)
    assert [g.number for g in h.starter.started] == [1, 2] and not h.reloads.pending
    assert h.reloads.loading is h.generation(2)


# ---------------------------------------------------------------------------------------- reloading
def test_a_reload_rereads_the_config_and_loads_a_new_generation(h):
    first = h.start()
    h.write(workers=3, experts=("square", "cube"))
    h.reloads.reload()
    second = h.generation(2)
    assert h.reloads.loading is second and h.reloads.reloading
    assert second.config.workers == 3 and set(second.config.experts) == {"square", "cube"}
    assert h.serving.config.workers == 2 and h.serving.generation == 1  # generation 1 serves meanwhile
    assert ("reloading",) in h.notifier.calls
    assert _watched(h, second)
    assert first.control.fileno() in h.starter.close_fds[-1]  # nor any other generation's control socket
    assert {901, 902} <= set(h.starter.close_fds[-1])


def test_keepalives_while_loading_tell_systemd_to_wait(h):
    h.start()
    h.reloads.reload()
    second = h.generation(2)
    second.reports.extend([(KEEPALIVE, None), (KEEPALIVE, None)])
    h.reloads.read(second)
    assert h.notifier.calls.count(("keep_waiting",)) == 2
    assert h.reloads.loading is second


def test_a_failed_load_keeps_the_old_generation_serving(h):
    first = h.start()
    old_config = h.serving.config
    h.write(workers=3)
    waiter, client = h.waiter(17)
    h.reloads.reload(waiter)
    second = h.generation(2)
    second.reports.append((FAILED, "importing 'shapes' failed: ImportError: no module named 'numpy'"))
    h.reloads.read(second)
    assert h.reloads.loading is None and not h.reloads.reloading
    assert h.serving.generation == 1 and h.serving.config is old_config and h.pool.parent is first
    assert second.killed and not first.killed
    last = h.reloads.last_reload
    assert last == {"ok": False, "at": last["at"], "generation": 1,
                    "error": "importing 'shapes' failed: ImportError: no module named 'numpy'", "reload": 1}
    assert abs(last["at"] - time.time()) < 60
    assert h.notifier.calls[-1] == ("ready", "reload failed: importing 'shapes' failed: ImportError: no module "
                                             "named 'numpy'")
    assert h.answer(client) == (17, {"generation": 1, "reloading": False, "last_reload": last, "reload": 1})
    assert waiter[0].state == IDLE


def test_a_config_typo_fails_the_reload_and_starts_no_process(h):
    h.start()
    h.write(extra="wokers = 3")
    waiter, client = h.waiter(3)
    h.reloads.reload(waiter)
    assert len(h.starter.started) == 1 and h.reloads.loading is None
    error = f"{h.path}: [expertd] wokers: unknown setting; did you mean 'workers'?"
    assert h.reloads.last_reload["ok"] is False and h.reloads.last_reload["error"] == error
    assert h.answer(client)[1]["last_reload"]["error"] == error


def test_a_reload_that_cannot_fork_fails_with_the_reason(h):
    h.start()
    h.starter.error = OSError(11, "Resource temporarily unavailable")
    h.reloads.reload()
    assert h.reloads.loading is None and h.reloads.last_reload["error"] == (
        "cannot start a process to load the new generation: Resource temporarily unavailable")


def test_a_loaded_generation_serves_at_once(h):
    first = h.start()
    h.write(workers=3, experts=("square", "cube"))
    waiter, client = h.waiter(8)
    h.reloads.reload(waiter)
    second = h.generation(2)
    changes = h.pool.changes
    second.reports.append((LOADED, {"square": SQUARE, "cube": CUBE}))
    h.reloads.read(second)
    assert h.serving.generation == 2 and h.serving.experts == {"square": SQUARE, "cube": CUBE}
    assert h.serving.config is second.config and h.serving.config.workers == 3
    assert h.pool.parent is second and h.pool.changes > changes
    assert "cube" in h.metrics.index  # counted before its workers fork
    assert h.reloads.loading is None and h.reloads.reloading  # its workers are starting
    assert not first.killed and first.state == SERVING  # it may be needed back
    assert not _watched(h, second)  # nothing more to hear from it while it serves
    assert h.answer(client) == (8, {"generation": 2, "reloading": True, "last_reload": None, "reload": 1})


def test_a_reload_ends_when_the_new_workers_are_all_ready(h):
    first = h.start()
    old_workers = list(h.pool.workers.values())
    h.reloads.reload()
    h.generation(2).reports.append((LOADED, {"square": SQUARE}))
    h.reloads.read(h.generation(2))
    h.ready_workers(2, 1)
    assert h.reloads.reloading and h.dispatcher.retired == []  # one of two
    h.ready_workers(2, 1)
    assert not h.reloads.reloading
    assert h.dispatcher.retired == [(slot, "replaced by generation 2") for slot in old_workers]
    assert first.state == RETIRED and not first.killed  # it exits, finishing nothing
    assert h.reloads.last_reload["ok"] is True and h.reloads.last_reload["generation"] == 2
    assert h.reloads.last_reload["reload"] == 1  # the number its RELOAD reply carried
    assert h.events[-1] == "reloaded" and h.notifier.calls[-1] == ("ready", "2 workers ready, generation 2")


def test_a_second_reload_during_one_is_remembered_once_and_runs_after(h):
    h.start()
    h.reloads.reload()
    h.reloads.reload()
    h.reloads.reload()
    assert h.reloads.pending and [g.number for g in h.starter.started] == [1, 2]
    h.generation(2).reports.append((FAILED, "boom"))
    h.reloads.read(h.generation(2))
    assert [g.number for g in h.starter.started] == [1, 2, 2]  # once, for the three asked for during it
    assert not h.reloads.pending and h.reloads.loading is h.starter.started[-1]
    # Each reload has its number (expertctl reload waits for its own): the failed one's is 1, the next is 2.
    assert h.reloads.last_reload["reload"] == 1 and h.reloads.count == 2


def test_a_reload_asked_for_while_new_workers_start_runs_once_they_are_ready(h):
    h.start()
    h.reloads.reload()
    h.generation(2).reports.append((LOADED, {"square": SQUARE}))
    h.reloads.read(h.generation(2))
    h.write(workers=2, experts=("square", "cube"))  # an edit after the first HUP
    h.reloads.reload()
    assert h.reloads.pending and len(h.starter.started) == 2
    h.ready_workers(2, 2)
    third = h.starter.started[-1]
    assert third.number == 3 and "cube" in third.config.experts and h.reloads.loading is third


def test_each_reload_answers_the_requests_that_asked_for_it(h):
    h.start()
    first_waiter, first_client = h.waiter(1)
    h.reloads.reload(first_waiter)
    second_waiter, second_client = h.waiter(2)
    h.reloads.reload(second_waiter)  # during the first: answered by the reload that runs after
    h.generation(2).reports.append((FAILED, "boom"))
    h.reloads.read(h.generation(2))
    assert h.answer(first_client)[1]["last_reload"]["error"] == "boom"
    assert h.answer(second_client) is None and second_waiter[0].state == WAITING
    retry = h.starter.started[-1]
    retry.reports.append((LOADED, {"square": SQUARE}))
    h.reloads.read(retry)
    assert h.answer(second_client) == (2, {"generation": 2, "reloading": True,
                                           "last_reload": h.reloads.last_reload, "reload": 2})


def test_a_waiter_whose_connection_closed_is_not_answered(h):
    h.start()
    waiter, client = h.waiter(4)
    h.reloads.reload(waiter)
    h.table.close(waiter[0])
    h.generation(2).reports.append((FAILED, "boom"))
    h.reloads.read(h.generation(2))  # no error: it is skipped
    assert waiter[0].state == "closed" and client.recv(100) == b""  # nothing but the end


def test_a_load_past_reload_timeout_is_abandoned(h):
    h.start()
    h.reloads.reload()
    second = h.generation(2)
    h.reloads.expire(second.deadline)
    assert h.reloads.loading is second
    h.reloads.expire(second.deadline + 0.1)
    assert h.reloads.loading is None and second.killed and h.serving.generation == 1
    assert h.reloads.last_reload["error"].startswith(
        "loading generation 2 took longer than reload_timeout (30s) and was abandoned; find what hangs at "
        "import or in a before_fork hook, or raise reload_timeout")


def test_an_aborted_reload_puts_the_old_generation_back(h):
    first = h.start()
    old_config, old_experts = h.serving.config, h.serving.experts
    h.write(experts=("square", "cube"))
    h.reloads.reload()
    second = h.generation(2)
    second.reports.append((LOADED, {"square": SQUARE, "cube": CUBE}))
    h.reloads.read(second)
    new_workers = h.ready_workers(2, 1)
    changes = h.pool.changes
    h.reloads.abort("worker 5 of generation 2 exited with status 1 before it was ready")
    assert (h.serving.generation, h.serving.config, h.serving.experts) == (1, old_config, old_experts)
    assert h.pool.parent is first and not first.killed and second.killed
    assert h.dispatcher.retired == [(slot, "reload aborted") for slot in new_workers]
    assert h.pool.changes > changes and not h.reloads.reloading
    assert h.reloads.last_reload == {"ok": False, "at": h.reloads.last_reload["at"], "generation": 1,
                                     "error": "worker 5 of generation 2 exited with status 1 before it was ready",
                                     "reload": 1}


def test_a_reload_while_stopping_does_nothing(h):
    h.start()
    h.serving.stopping = True
    h.reloads.reload()
    assert len(h.starter.started) == 1 and not h.reloads.pending


def test_stopping_abandons_a_load_in_progress(h):
    h.start()
    h.reloads.reload()
    h.reloads.stop()
    assert h.reloads.loading is None and h.generation(2).killed


def test_the_socket_path_is_kept_across_a_reload(h, caplog):
    h.start()
    h.socket = h.socket + ".new"
    h.write()
    h.reloads.reload()
    assert h.generation(2).config.socket == h.serving.config.socket != h.socket
    assert "the socket path changed" in caplog.text


# ---------------------------------------------------------------------------------------- parents exiting
def test_a_loading_process_that_dies_without_a_word_fails_the_reload_with_how_it_ended(h):
    h.start()
    h.reloads.reload()
    second = h.generation(2)
    h.reloads.parent_exited(second, 9)  # (a wait status: killed by signal 9)
    assert h.reloads.loading is None and h.serving.generation == 1
    assert h.reloads.last_reload["error"] == "the process loading generation 2 was killed by SIGKILL"


def test_a_loading_process_that_failed_and_exited_is_failed_by_its_last_words(h):
    h.start()
    h.reloads.reload()
    second = h.generation(2)
    second.reports.append((FAILED, "SyntaxError in shapes.py"))
    h.reloads.parent_exited(second, 1 << 8)  # exit status 1
    assert h.reloads.last_reload["error"] == "SyntaxError in shapes.py"


def test_a_lost_serving_parent_is_replaced_by_loading_the_generation_again(h):
    first = h.start()
    h.reloads.parent_exited(first, 9)
    assert first.killed
    assert h.reloads.loading is h.generation(2)  # the config loaded again, for a parent to fork workers


def test_a_serving_parent_lost_before_the_daemon_was_ready_fails_the_start(h):
    h.reloads.load_first(None, lambda: None)
    h.reloads.parent_exited(h.generation(1), 9)
    assert h.events == [("start failed", "generation 1's parent process was killed by SIGKILL before the workers "
                                         "were ready", "the experts' process failed")]


def test_a_lost_parent_is_retried_now_and_then(h):
    first = h.start()
    first.close()
    h.reloads.retry_lost_parent(100.0)
    assert len(h.starter.started) == 2
    h.generation(2).reports.append((FAILED, "boom"))
    h.reloads.read(h.generation(2))
    h.reloads.retry_lost_parent(105.0)
    assert len(h.starter.started) == 2  # not before _PARENT_RETRY
    h.reloads.retry_lost_parent(110.0)
    assert len(h.starter.started) == 3
