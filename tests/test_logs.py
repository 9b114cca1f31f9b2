"""The rate-limited log lines (expertd.logs.Throttle) and the periodic summary (expertd.logs.Summary, from
expertd.metrics' counters), on a clock the test moves."""

import logging

import pytest

from expertd.logs import Summary, Throttle, summary_line
from expertd.metrics import BUCKETS, Metrics, quantile


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def throttled(caplog):
    caplog.set_level(logging.INFO, logger="test.throttle")
    clock = Clock()
    throttle = Throttle(logging.getLogger("test.throttle"), interval=10.0, clock=clock)

    def lines() -> list[str]:
        return [record.getMessage() for record in caplog.records]

    return throttle, clock, lines


def test_one_line_per_cause_per_interval_then_the_count(throttled):
    throttle, clock, lines = throttled
    for pid in range(1000):
        throttle.warning("refused uid %d (pid %d)", 1001, pid, cause=("refused", 1001))
        clock.now += 0.001
    assert lines() == ["refused uid 1001 (pid 0)"]
    throttle.flush()
    assert len(lines()) == 1  # the interval is not over
    clock.now += 10
    throttle.flush()
    assert lines() == ["refused uid 1001 (pid 0)", "refused uid 1001 (pid 999) (999 more like this in the last 10s)"]


def test_a_flood_that_goes_on_writes_one_line_per_interval(throttled):
    throttle, clock, lines = throttled
    for _ in range(60 * 100):  # a minute, 100 a second
        throttle.warning("max_connections reached")
        clock.now += 0.01
        throttle.flush()
    assert 6 <= len(lines()) <= 7
    assert all("more like this" in line for line in lines()[1:])
    counted = sum(int(line.split("(")[1].split()[0]) for line in lines()[1:])
    assert counted + 1 <= 6000 and counted + 1 >= 6000 - 10 * 100  # the last interval is still open


def test_causes_are_limited_apart(throttled):
    throttle, _clock, lines = throttled
    for _ in range(50):
        throttle.warning("refused uid %d", 1001, cause=("refused", 1001))
        throttle.warning("refused uid %d", 1002, cause=("refused", 1002))
    assert lines() == ["refused uid 1001", "refused uid 1002"]


def test_a_quiet_interval_lets_the_next_line_through_at_once(throttled):
    throttle, clock, lines = throttled
    throttle.info("closing connection %d", 1)
    clock.now += 10.5
    throttle.flush()  # nothing was left out: nothing to write
    throttle.info("closing connection %d", 2)
    assert lines() == ["closing connection 1", "closing connection 2"]


def test_the_count_goes_out_with_the_causes_next_line_without_a_flush(throttled):
    throttle, clock, lines = throttled
    throttle.info("could not deliver %d", 1)
    throttle.info("could not deliver %d", 2)
    clock.now += 11
    throttle.info("could not deliver %d", 3)
    assert lines() == ["could not deliver 1", "could not deliver 2 (1 more like this in the last 10s)"]
    throttle.flush(force=True)  # at exit
    assert lines()[-1] == "could not deliver 3 (1 more like this in the last 10s)"


def test_lines_below_the_threshold_cost_nothing(throttled, caplog):
    throttle, _clock, lines = throttled
    caplog.set_level(logging.WARNING, logger="test.throttle")
    throttle.info("quiet")
    assert not throttle._windows and not lines()


def test_a_detail_goes_with_the_line_written_at_once_not_with_the_count(throttled):
    throttle, clock, lines = throttled
    for i in range(3):
        throttle.warning("expert %s failed: %s", "f", i, cause=("f", "ValueError"), detail="Traceback ...\n  line 3\n")
    clock.now += 10
    throttle.flush()
    assert lines() == ["expert f failed: 0\n  | Traceback ...\n  |   line 3",
                       "expert f failed: 2 (2 more like this in the last 10s)"]


# ------------------------------------------------------------------ the summary
NO_BUCKETS = [0] * (len(BUCKETS) + 1)


def _buckets(**by_bound: int) -> list[int]:
    """Counts per bucket, given as le_<bound in µs>=count ('inf' for +Inf)."""
    counts = list(NO_BUCKETS)
    for key, count in by_bound.items():
        bound = key.removeprefix("le_")
        counts[len(BUCKETS) if bound == "inf" else BUCKETS.index(float(bound) / 1e6)] = count
    return counts


@pytest.mark.parametrize(("q", "counts", "expected"), [
    (0.5, NO_BUCKETS, None),  # nothing counted
    (0.5, _buckets(le_25=10), 0.0000175),  # halfway through the 10..25 µs bucket
    (0.99, _buckets(le_25=10), 0.00002485),
    (0.5, _buckets(le_10=4), 0.000005),  # the first bucket starts at 0
    (0.5, _buckets(le_25=50, le_1000=50), 0.000025),  # the rank ends the first bucket
    (0.99, _buckets(le_25=90, le_1000=10), 0.00095),  # 9 of the 10 in 0.5..1 ms
    (0.99, _buckets(le_25=1, le_inf=99), 60.0),  # past the last bound: the largest finite one
    (0.0, _buckets(le_50=3), 0.000025),  # the lowest: the bottom of the first bucket used
])
def test_percentiles_are_estimated_within_the_histograms_buckets(q, counts, expected):
    found = quantile(q, counts)
    assert found == pytest.approx(expected) if expected is not None else found is None


def test_calls_so_far_count_what_metrics_shows_workers_and_master_failures_pipelines_apart():
    metrics = Metrics(2, ["echo", "slow"], pipelines=["mod"])
    first, second = metrics.recorder(0), metrics.recorder(1)
    for _ in range(3):
        first.record("echo", "ok", 0.00002)
    second.record("slow", "expert_failed", 0.3)
    second.record_pipeline("mod", "ok", 0.004)
    metrics.count_failure("slow", "timeout")  # answered by the master: no duration
    metrics.count_failure("mod", "worker_lost")  # a pipeline's
    counts = metrics.calls_so_far([0, 1])
    assert {code: n for code, n in counts.outcomes.items() if n} == {"ok": 3, "expert_failed": 1, "timeout": 1}
    assert counts.buckets[BUCKETS.index(0.000025)] == 3 and counts.buckets[BUCKETS.index(0.5)] == 1
    assert sum(counts.buckets) == 4 and counts.pipelines == 2
    text = metrics.render([0, 1], {"workers": {}, "workers_wanted": 2, "memory": {}, "connections": 0, "queued": 0,
                                   "generation": 1, "uptime": 1.0, "version": "test"})
    total = sum(int(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith("expertd_requests_total{"))
    assert total == sum(counts.outcomes.values()) == 5
    metrics.retire(0)  # a worker exits: its counts stay in the totals
    assert metrics.calls_so_far([1]) == counts


def test_the_summary_writes_the_intervals_differences_and_keeps_them_for_status(caplog):
    caplog.set_level(logging.INFO, logger="test.summary")
    clock = Clock()
    metrics = Metrics(1, ["echo"])
    worker = metrics.recorder(0)
    summary = Summary(logging.getLogger("test.summary"), 60.0, lambda: metrics.calls_so_far([0]), clock)
    for _ in range(99):
        worker.record("echo", "ok", 0.00003)
    worker.record("echo", "bad_request", 0.002)
    clock.now += 59
    summary.write(clock.now, connections=3)
    assert not caplog.records and summary.figures is None  # the interval is not over
    clock.now += 1
    summary.write(clock.now, connections=3)
    assert [r.getMessage() for r in caplog.records] == [
        "last 60s: 100 requests (99 ok, 1 bad_request), median 0.038 ms, 99th percentile 0.050 ms, 3 connections open"]
    assert summary.figures == {"seconds": 60.0, "requests": 100, "outcomes": {"ok": 99, "bad_request": 1},
                               "median_ms": 0.038, "p99_ms": 0.05, "pipeline_requests": 0}
    clock.now += 60
    summary.write(clock.now, connections=3)  # a quiet minute: no line, and status says so
    assert len(caplog.records) == 1 and summary.figures["requests"] == 0


def test_the_summary_line_says_one_in_the_singular():
    figures = {"seconds": 60.0, "requests": 1, "outcomes": {"ok": 1}, "median_ms": None, "p99_ms": None,
               "pipeline_requests": 1}
    assert summary_line(figures, 1) == "last 60s: 1 request (1 ok), 1 pipeline request, 1 connection open"
    assert summary_line({**figures, "requests": 0, "outcomes": {}}, 0) == \
        "last 60s: 0 requests, 1 pipeline request, 0 connections open"


def test_a_summary_that_is_off_reads_nothing():
    reads = []
    summary = Summary(logging.getLogger("test.summary"), 0.0, lambda: reads.append(1), Clock())
    summary.write(1e9, connections=0)
    assert not reads and summary.figures is None


def test_the_summary_line_names_pipelines_and_leaves_out_latency_when_none_was_timed():
    figures = {"seconds": 60.0, "requests": 2, "outcomes": {"overloaded": 2}, "median_ms": None, "p99_ms": None,
               "pipeline_requests": 7}
    assert summary_line(figures, 1) == "last 60s: 2 requests (2 overloaded), 7 pipeline requests, 1 connection open"
    assert summary_line({**figures, "requests": 0, "outcomes": {}, "pipeline_requests": 0}, 1) is None
