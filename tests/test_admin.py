"""The master's own answers (expertd.admin.Admin): who may ask what, the control verbs, health and status."""

import argparse
import json
import logging
import os
import re
import select
import time
from collections import deque

import pytest
from prometheus_client.parser import text_string_to_metric_families

from expertd import cli, firefly, http, protocol
from expertd.access import NO_PEER
from expertd.admin import Admin
from expertd.backoff import Quarantines
from expertd.batching import Batcher
from expertd.config import load_config
from expertd.connections import QUEUED, Connection
from expertd.errors import AccessDenied, BadRequest
from expertd.logs import Summary, Throttle
from expertd.metrics import Metrics
from expertd.pool import BOOTING, BUSY, IDLE, LINGERING, Pool, WorkerSlot
from expertd.scoreboard import Scoreboard
from expertd.serving import Serving

OWN = os.getuid()
OTHER = 54321 if OWN != 54321 else 54322  # neither root nor the daemon's user nor in control_uids
CONTROLLER, CONTROL_GROUP = 2000, 3000  # control_uids, control_gids


class FakeDispatcher:
    batcher: Batcher

    def __init__(self, pool: Pool) -> None:
        self.pool = pool
        self.queue: deque[Connection] = deque()
        self.retired: list[tuple[WorkerSlot, str]] = []

    def retire(self, slot: WorkerSlot, reason: str) -> None:
        self.retired.append((slot, reason))
        self.pool.leave(slot, reason)  # (as the dispatcher does)


class FakeTable:
    def __init__(self) -> None:
        self.open = 0

    def __len__(self) -> int:
        return self.open


class FakeAcceptor:
    def connection_limit(self) -> int:
        return 900

    def per_uid_limit(self, limit: int) -> int:
        return limit // 2


class FakeReloads:
    def __init__(self) -> None:
        self.loading = None
        self.replacing = None
        self.parents: dict = {}
        self.last_reload = None
        self.reloading = False
        self.ready_calls = 0
        self.reloads: list = []

    def worker_ready(self) -> None:
        self.ready_calls += 1

    def reload(self, waiter=None) -> None:
        self.reloads.append(waiter)


class Harness:
    def __init__(self, directory, **settings: str) -> None:
        path = directory / "expertd.conf"
        settings = {"socket": str(directory / "x.sock"), "workers": "4", "control_uids": str(CONTROLLER),
                    "control_gids": str(CONTROL_GROUP), **settings}
        lines = ["[expertd]", *(f"{key} = {value}" for key, value in settings.items()),
                 "[expert:square]", "function = squares:square", "[expert:fib]", "function = fibs:fib"]
        path.write_text("\n".join(lines) + "\n")
        config = load_config(str(path))
        self.serving = Serving(config, experts={"fib": {"name": "fib", "doc": "Fibonacci"},
                                                "square": {"name": "square", "doc": "Squares"}})
        self.epoll = select.epoll()
        self.scoreboard = Scoreboard(4)
        self.metrics = Metrics(4, config.experts)
        self.quarantines = Quarantines()
        throttle = Throttle(logging.getLogger("test.admin"))
        self.pool = Pool(self.serving, self.epoll, self.scoreboard, self.metrics, self.quarantines, throttle,
                         make_room=lambda: False)
        self.dispatcher = FakeDispatcher(self.pool)
        self.dispatcher.batcher = Batcher(self.serving)
        self.table = FakeTable()
        self.reloads = FakeReloads()
        self.stops: list[str] = []
        self.summary = Summary(logging.getLogger("test.admin"), 60.0,
                               lambda: self.metrics.calls_so_far(self.pool.boards()))
        self.admin = Admin(self.serving, self.pool, self.dispatcher, self.table, FakeAcceptor(), self.reloads,
                           self.scoreboard, self.metrics, self.quarantines, throttle, self.summary,
                           socket_path=lambda: str(directory / "x.sock"), stop=self.stops.append)

    def worker(self, number: int, *, born: float | None = None, state: str = IDLE, ready: bool = True,
               busy: bool = False, generation: int = 1, pid: int | None = None) -> WorkerSlot:
        slot = WorkerSlot(number=number, pid=pid or 100_000 + number, channel=None,
                          born=float(number) if born is None else born, generation=generation, board=number - 1,
                          ready_at=1.0 if ready else None)
        slot.state = BOOTING if not ready else BUSY if busy else state
        if busy:
            slot.conn = Connection(conn_id=number, sock=None, fd=-1)
        self.pool.workers[slot.pid] = slot
        return slot


@pytest.fixture
def harness(tmp_path):
    made = []

    def make(**settings: str) -> Harness:
        made.append(Harness(tmp_path, **settings))
        return made[-1]

    yield make
    for each in made:
        each.epoll.close()


@pytest.fixture
def h(harness):
    return harness()


# ---------------------------------------------------------------------------------------- who may
CONTROL = [protocol.RELOAD, protocol.STOP, protocol.SCALE]
READ = [protocol.STATUS, protocol.LIST]
NAMES = {protocol.RELOAD: "RELOAD", protocol.STOP: "STOP", protocol.SCALE: "SCALE", protocol.STATUS: "STATUS",
         protocol.LIST: "LIST"}


@pytest.mark.parametrize(
    "uid, gid, groups",
    [
        (0, 0, frozenset()),  # root
        (OWN, OWN, frozenset()),  # the daemon's user
        (CONTROLLER, 100, frozenset()),  # control_uids
        (OTHER, CONTROL_GROUP, frozenset()),  # control_gids, as the primary group
        (OTHER, 100, frozenset({5, CONTROL_GROUP})),  # ... or a supplementary one
    ],
)
@pytest.mark.parametrize("kind", CONTROL + READ, ids=lambda kind: NAMES[kind])
def test_root_the_daemons_user_and_control_uids_and_gids_may_send_anything(h, kind, uid, gid, groups):
    assert h.admin.refusal(kind, uid, gid, groups, 4242) is None


@pytest.mark.parametrize("uid", [OTHER, NO_PEER])
@pytest.mark.parametrize("kind", CONTROL, ids=lambda kind: NAMES[kind])
def test_another_user_may_not_reload_stop_or_scale(h, kind, uid):
    refusal = h.admin.refusal(kind, uid, 100, frozenset({101}), 4242)
    assert isinstance(refusal, AccessDenied)
    assert refusal.message == (f"uid {uid} may not send {NAMES[kind]} to this expertd (control requests need root, "
                               f"the daemon's user, or control_uids / control_gids); ask for uid {uid} to be added "
                               "to control_uids")


@pytest.mark.parametrize("uid", [OTHER, NO_PEER])
@pytest.mark.parametrize("kind", READ, ids=lambda kind: NAMES[kind])
def test_anyone_may_read_status_and_the_experts_list_by_default(h, kind, uid):
    assert h.admin.refusal(kind, uid, 100, frozenset(), 4242) is None


@pytest.mark.parametrize("uid", [OTHER, NO_PEER])
@pytest.mark.parametrize("kind", READ, ids=lambda kind: NAMES[kind])
def test_with_public_status_no_only_controllers_may_read_status(harness, kind, uid):
    h = harness(public_status="no")
    refusal = h.admin.refusal(kind, uid, 100, frozenset(), 4242)
    assert isinstance(refusal, AccessDenied) and "public_status = no" in refusal.message
    assert h.admin.refusal(kind, CONTROLLER, 100, frozenset(), 4242) is None
    assert h.admin.refusal(kind, 0, 0, frozenset(), 4242) is None


def test_an_unknown_control_kind_needs_control_access(h):
    refusal = h.admin.refusal(0x1F, OTHER, 100, frozenset(), 1)
    assert isinstance(refusal, AccessDenied) and "may not send 0x1f" in refusal.message
    assert h.admin.refusal(0x1F, 0, 0, frozenset(), 1) is None


def test_refusals_are_logged_once_per_user_per_interval(h, caplog):
    caplog.set_level(logging.WARNING, logger="test.admin")
    for pid in range(50):
        h.admin.refusal(protocol.STOP, OTHER, 100, frozenset(), pid)
    h.admin.refusal(protocol.STOP, OTHER + 1, 100, frozenset(), 7)
    lines = [record.getMessage() for record in caplog.records]
    assert lines == [f"control: refused STOP from uid {OTHER} (pid 0): not in control_uids or control_gids",
                     f"control: refused STOP from uid {OTHER + 1} (pid 7): not in control_uids or control_gids"]


def test_a_reload_picks_up_a_new_control_list(h):
    assert h.admin.refusal(protocol.STOP, OTHER, 100, frozenset(), 1) is not None
    config = h.serving.config
    replacement = load_config(config.path)
    replacement.control_uids = [OTHER]
    h.serving.config = replacement
    assert h.admin.refusal(protocol.STOP, OTHER, 100, frozenset(), 1) is None


# ---------------------------------------------------------------------------------------- verbs
@pytest.mark.parametrize("body", [0, -1, True, False, "3", 3.0, None, [3], {"workers": 3}, "many", 10**6])
def test_scale_needs_a_whole_number_of_workers_in_range(h, body):
    for number in range(1, 5):
        h.worker(number)
    with pytest.raises(BadRequest, match=f"workers N needs a whole number 1 ≤ N ≤ {h.pool.max_workers}"):
        h.admin.command(protocol.SCALE, body, 0, 1)
    assert h.serving.config.workers == 4 and h.dispatcher.retired == []


def test_scale_accepts_the_pools_largest_size(h):
    reply, after = h.admin.command(protocol.SCALE, h.pool.max_workers, 0, 1)
    assert reply == {"workers": h.pool.max_workers} and after is None
    with pytest.raises(BadRequest):
        h.admin.command(protocol.SCALE, h.pool.max_workers + 1, 0, 1)


def test_scaling_down_retires_as_many_workers_of_the_serving_generation_as_are_too_many(h, caplog):
    caplog.set_level(logging.INFO, logger="expertd.master")
    slots = [h.worker(number) for number in range(1, 5)]
    old = h.worker(9, generation=0)  # a previous generation's, retiring anyway
    leaving = h.worker(10)
    h.pool.leave(leaving, "max_requests")
    reply, after = h.admin.command(protocol.SCALE, 3, 0, 4242)
    assert reply == {"workers": 3} and after is None
    assert h.serving.config.workers == 3
    retired = [slot for slot, reason in h.dispatcher.retired]
    assert len(retired) == 1 and retired[0] in slots and old not in retired and leaving not in retired
    assert {reason for _slot, reason in h.dispatcher.retired} == {"scaled down"}
    assert h.reloads.ready_calls == 1  # fewer workers to wait for
    assert "control: SCALE to 3 workers from uid 0 (pid 4242)" in caplog.text
    assert "scaling from 4 to 3 workers" in caplog.text


def test_scaling_down_retires_idle_workers_first_then_the_youngest(h):
    # Pool.retire_order's docstring (and the comment in the master before the split): "idle first, then the
    # youngest".  Retiring an idle worker frees its memory at once; a busy one first finishes its request.
    # Workers 1 and 3 are idle, 2 and 4 busy; the higher the number, the younger.
    for number in (1, 2, 3, 4):
        h.worker(number, busy=number % 2 == 0)
    h.admin.command(protocol.SCALE, 3, 0, 1)
    assert [slot.number for slot, _ in h.dispatcher.retired] == [3]  # the youngest idle one
    h.admin.command(protocol.SCALE, 1, 0, 1)
    assert {slot.number for slot, _ in h.dispatcher.retired} == {3, 1, 4}  # the idle ones, then the youngest


def test_scaling_up_retires_nobody(h):
    for number in range(1, 5):
        h.worker(number)
    h.admin.command(protocol.SCALE, 8, 0, 1)
    assert h.serving.config.workers == 8 and h.dispatcher.retired == []


def test_scaling_to_the_same_size_changes_nothing(h):
    h.worker(1)
    h.admin.command(protocol.SCALE, 4, 0, 1)
    assert h.dispatcher.retired == [] and h.reloads.ready_calls == 0


def test_scaling_during_a_reload_holds_for_the_generation_loading_and_the_one_replaced(h):
    class Loading:
        def __init__(self) -> None:
            self.config = load_config(h.serving.config.path)

    h.reloads.loading, h.reloads.replacing = Loading(), Loading()
    h.admin.command(protocol.SCALE, 2, 0, 1)
    assert h.reloads.loading.config.workers == 2 and h.reloads.replacing.config.workers == 2


def test_stop_answers_first_then_stops(h):
    reply, after = h.admin.command(protocol.STOP, None, 0, 1)
    assert reply == {"stopping": True, "pid": os.getpid()}
    assert h.stops == []  # not before the reply is sent
    after()
    assert h.stops == ["expertctl stop"]


def test_list_answers_the_experts_descriptions(h):
    reply, after = h.admin.command(protocol.LIST, None, OTHER, 1)
    assert sorted(reply, key=lambda d: d["name"]) == [{"name": "fib", "doc": "Fibonacci"},
                                                      {"name": "square", "doc": "Squares"}]
    assert after is None


def test_status_is_answered_with_the_status(h):
    reply, after = h.admin.command(protocol.STATUS, None, OTHER, 1)
    assert reply["pid"] == os.getpid() and after is None


def test_reload_goes_to_the_reloads_with_its_waiter(h):
    h.admin.reload(("conn", 5))
    h.admin.reload()
    assert h.reloads.reloads == [("conn", 5), None]


# ---------------------------------------------------------------------------------------- HTTP GETs
def _get(h, route, uid=OTHER, tcp=False):
    status, body, content_type = h.admin.http_get(route, uid, 100, frozenset(), 4242, tcp)
    return status, (json.loads(body) if content_type == http.JSON_TYPE else body.decode()), content_type


def test_health_is_503_while_no_worker_is_ready(h):
    h.worker(1, ready=False)
    status, body, _ = _get(h, "health")
    assert status == 503
    assert body == {"status": "unavailable", "workers_ready": 0, "workers_wanted": 4, "generation": 1,
                    "stopping": False}


def test_health_is_200_once_a_worker_is_ready(h):
    h.worker(1, ready=False)
    h.worker(2)
    status, body, content_type = _get(h, "health")
    assert (status, body["status"], body["workers_ready"], content_type) == (200, "ok", 1, http.JSON_TYPE)


def test_a_ready_worker_on_its_way_out_does_not_make_the_daemon_healthy(h):
    h.pool.leave(h.worker(1), "max_requests")
    assert _get(h, "health")[0] == 503


def test_health_is_503_while_stopping(h):
    h.worker(1)
    h.serving.stopping = True
    status, body, _ = _get(h, "health")
    assert status == 503 and body["stopping"] is True and body["status"] == "unavailable"


def test_get_experts_lists_the_served_experts(h):
    status, body, _ = _get(h, "experts")
    assert status == 200 and {d["name"] for d in body} == {"fib", "square"}


def test_get_metrics_is_prometheus_text(h):
    h.worker(1)
    h.worker(2, busy=True)
    h.worker(3, ready=False)
    h.table.open = 7
    conn = Connection(conn_id=1, sock=None, fd=-1)
    conn.to(QUEUED)
    h.dispatcher.queue.extend([conn, Connection(conn_id=2, sock=None, fd=-1)])  # (one gone meanwhile: idle)
    status, text, content_type = _get(h, "metrics")
    assert status == 200 and content_type == http.METRICS_TYPE
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in text_string_to_metric_families(text) for s in family.samples}
    assert samples[("expertd_workers", (("state", "idle"),))] == 1
    assert samples[("expertd_workers", (("state", "busy"),))] == 1
    assert samples[("expertd_workers", (("state", "booting"),))] == 1
    assert samples[("expertd_workers_wanted", ())] == 4
    assert samples[("expertd_connections", ())] == 7
    assert samples[("expertd_queued_requests", ())] == 1
    assert samples[("expertd_generation", ())] == 1
    assert ("expertd_requests_total", (("expert", "square"),)) in samples


@pytest.mark.parametrize("route", ["health", "experts", "metrics"])
def test_with_public_status_no_another_user_may_not_get(harness, route):
    h = harness(public_status="no")
    with pytest.raises(AccessDenied, match=f"uid {OTHER} may not read /{route} \\(public_status = no"):
        h.admin.http_get(route, OTHER, 100, frozenset(), 4242, False)
    with pytest.raises(AccessDenied, match=f"connections on http_listen may not read /{route}"):
        h.admin.http_get(route, NO_PEER, NO_PEER, frozenset(), NO_PEER, True)
    assert h.admin.http_get(route, CONTROLLER, 100, frozenset(), 4242, False)[0] in (200, 503)


@pytest.mark.parametrize(("token", "uid", "tcp", "refused"), [
    ("t" * 32, NO_PEER, True, None),  # on http_listen with the token (checked before): firefly.Client's first read
    ("", NO_PEER, True, "connections on http_listen may not read GET / (public_status = no"),
    ("t" * 32, OTHER, False, f"uid {OTHER} may not read GET / (public_status = no"),  # (the socket: as before)
    ("t" * 32, CONTROLLER, False, None),
])
def test_with_public_status_no_firefly_get_root_is_read_with_the_token_and_named_as_get_root(
        harness, token, uid, tcp, refused):
    h = harness(public_status="no", firefly_routes="yes", **({"token": token} if token else {}))
    if refused is None:
        assert _get(h, firefly.INDEX, uid=uid, tcp=tcp)[1]["app"] == "firefly"
        return
    with pytest.raises(AccessDenied) as raised:
        _get(h, firefly.INDEX, uid=uid, tcp=tcp)
    assert raised.value.message.startswith(refused) and "firefly_index" not in raised.value.message


# ---------------------------------------------------------------------------------------- status
@pytest.mark.parametrize(
    "state, busy, leaving, serving_now, shown",
    [
        (BOOTING, False, None, False, "booting"),
        (IDLE, False, None, False, "idle"),
        (BUSY, True, None, False, "busy"),
        (BUSY, True, "max_requests", False, "retiring"),
        (IDLE, False, "scaled down", False, "retiring"),
        (LINGERING, True, None, True, "busy"),  # serving the connection's next request itself
        (LINGERING, True, None, False, "idle"),  # waiting for it
    ],
)
def test_a_workers_state_as_status_shows_it(h, state, busy, leaving, serving_now, shown):
    slot = h.worker(1, ready=state != BOOTING, busy=busy)
    slot.state, slot.leaving = state, leaving
    if serving_now:
        h.scoreboard.slot(slot.board).begin(123.0, 60.0, 1, "square")
    assert h.admin.worker_state(slot) == shown


STATUS_KEYS = {"pid", "version", "config", "socket", "http_listen", "uptime_s", "generation", "experts",
               "workers_wanted", "requests", "connections", "max_connections", "max_connections_per_uid",
               "last_reload", "reloading", "workers", "generation_parents", "master", "quarantined", "memory",
               "cpu_count", "last_interval"}


def test_status_has_what_expertctl_status_reads(h):
    h.worker(1, pid=os.getpid())  # a process whose memory can be read
    h.worker(2, busy=True)
    h.table.open = 3
    status = h.admin.status()
    assert set(status) >= STATUS_KEYS
    assert status["pid"] == os.getpid() and status["config"] == h.serving.config.path
    assert status["experts"] == ["fib", "square"] and status["workers_wanted"] == 4
    assert (status["connections"], status["max_connections"], status["max_connections_per_uid"]) == (3, 900, 450)
    assert (status["generation"], status["reloading"], status["last_reload"]) == (1, False, None)
    assert status["quarantined"] == [] and status["http_listen"] is None
    assert set(status["memory"]) == {"workers_rss", "workers_pss", "workers_uss", "total_pss", "private", "shared"}
    assert status["memory"]["total_pss"] >= status["memory"]["workers_pss"] > 0
    assert [(w["number"], w["state"]) for w in status["workers"]] == [(1, "idle"), (2, "busy")]
    assert protocol.unpack(protocol.pack(status)) == json.loads(json.dumps(status))  # it travels


def test_expertctl_status_prints_what_status_returns(h, capsys):
    h.worker(1, pid=os.getpid())
    h.reloads.last_reload = {"ok": False, "at": 1_700_000_000.0, "generation": 1, "error": "typo"}
    for _ in range(3):
        h.quarantines.count_crash("square", 0, 3, 10.0, 30.0)

    class Client:
        def status(self) -> dict:
            return protocol.unpack(protocol.pack(h.admin.status()))

    assert cli._cmd_status(Client(), argparse.Namespace(json=False)) == 0
    out = capsys.readouterr().out
    assert f"master pid {os.getpid()}" in out and "experts: fib, square" in out
    assert "quarantined: square" in out and "last reload: FAILED: typo" in out
    assert not re.search(r"^last \d+s: ", out, re.M)  # no interval of the log summary is over yet


def test_expertctl_status_shows_the_log_summarys_last_interval(h, capsys):
    worker = h.worker(1, pid=os.getpid())
    recorder = h.metrics.recorder(worker.board)
    for _ in range(3):
        recorder.record("square", "ok", 0.00003)
    recorder.record("fib", "expert_failed", 0.00003)
    h.summary.write(time.monotonic() + 60, connections=0)  # the interval is over

    class Client:
        def status(self) -> dict:
            return protocol.unpack(protocol.pack(h.admin.status()))

    assert h.admin.status()["last_interval"]["requests"] == 4
    assert cli._cmd_status(Client(), argparse.Namespace(json=False)) == 0
    # (the same words as the summary's log line: "3 ok", not "ok: 3")
    assert re.search(r"^last 6\ds: 4 requests \(3 ok, 1 expert_failed\), median 0.038 ms, 99th percentile 0.050 ms$",
                     capsys.readouterr().out, re.M)


def test_status_counts_requests_lingering_workers_have_not_reported_yet(h):
    h.serving.requests_served = 100
    lingering = h.worker(1, busy=True)
    lingering.state, lingering.requests = LINGERING, 10
    h.scoreboard.slot(lingering.board).served(15)  # five served since its last report
    idle = h.worker(2)
    idle.requests = 3
    h.scoreboard.slot(idle.board).served(3)
    status = h.admin.status()
    assert status["requests"] == 105
    assert [w["requests"] for w in status["workers"]] == [15, 3]


def test_status_lists_quarantines_and_generation_parents(h):
    for _ in range(3):
        h.quarantines.count_crash("square", 0, 3, 10.0, 30.0)

    class Parent:
        number, pid, state, started = 2, os.getpid(), "serving", 0.0

    h.reloads.parents = {os.getpid(): Parent()}
    status = h.admin.status()
    assert [q["expert"] for q in status["quarantined"]] == ["square"]
    assert [(p["generation"], p["state"]) for p in status["generation_parents"]] == [(2, "serving")]


def test_status_and_metrics_show_each_batched_experts_batches(h):
    batcher = h.dispatcher.batcher
    first, second, third = (Connection(conn_id=n, sock=None, fd=-1, queued_at=0.0) for n in (1, 2, 3))
    batcher.handed_out("square", [first, second, third], 0.004)  # a batch of 3, each queued 4 ms
    batcher.handed_out("square", [first], 0.0)  # a batch of 1, not queued
    batcher.ran("square", 0.010)
    batcher.ran("square", 0.020)
    assert h.admin.status()["batches"] == {"square": {
        "batches": 2, "calls": 4, "mean_batch": 2.0, "mean_queue_delay_ms": 3.0, "mean_batch_ms": 15.0,
        "sizes": {"1": 1, "4": 1}}}
    _status, text, _type = _get(h, "metrics")
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in text_string_to_metric_families(text) for s in family.samples}
    assert samples[("expertd_batch_size_bucket", (("expert", "square"), ("le", "1")))] == 1
    assert samples[("expertd_batch_size_bucket", (("expert", "square"), ("le", "4")))] == 2
    assert samples[("expertd_batch_size_count", (("expert", "square"),))] == 2
    assert samples[("expertd_batch_size_sum", (("expert", "square"),))] == 4
    assert samples[("expertd_batch_queue_delay_seconds_count", (("expert", "square"),))] == 4
    assert samples[("expertd_batch_queue_delay_seconds_bucket", (("expert", "square"), ("le", "0.005")))] == 4
    assert samples[("expertd_batch_duration_seconds_count", (("expert", "square"),))] == 2
    assert samples[("expertd_batch_duration_seconds_sum", (("expert", "square"),))] == pytest.approx(0.030)
