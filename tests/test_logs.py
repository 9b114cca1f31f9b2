"""The rate-limited log lines (expertd.logs.Throttle), on a clock the test moves."""

import logging

import pytest

from expertd.logs import Throttle


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
