"""What worker deaths mean (expertd.backoff): respawn backoff and per-expert quarantine, on clocks the test moves."""

import logging

import pytest

from expertd.backoff import (
    BACKOFF,
    BACKOFF_MAX,
    COUNTED,
    DEATH_WINDOW,
    DEATHS_PER_WINDOW,
    QUARANTINE_GROWTH_MAX,
    QUARANTINED,
    QUIET_AFTER_BURST,
    CrashBackoff,
    Quarantines,
)


class Clock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
def backoff(clock):
    return CrashBackoff(clock)


# ---------------------------------------------------------------------------------------- CrashBackoff
def test_a_worker_that_booted_and_died_alone_is_respawned_at_once(backoff, clock):
    backoff.death(booted=True, pool_size=4)
    assert backoff.next_spawn_at == clock.now
    assert backoff.fast_failures == 0


@pytest.mark.parametrize(
    "deaths, delay",
    [(1, 0.1), (2, 0.2), (3, 0.4), (4, 0.8), (5, 1.6), (6, 3.2), (7, 6.4), (8, BACKOFF_MAX), (20, BACKOFF_MAX)],
)
def test_a_worker_that_never_booted_doubles_the_delay_up_to_backoff_max(backoff, clock, deaths, delay):
    for _ in range(deaths):
        backoff.death(booted=False, pool_size=4)
        clock.now += 0.01
    assert backoff.fast_failures == deaths
    assert backoff.next_spawn_at - (clock.now - 0.01) == pytest.approx(delay)


@pytest.mark.parametrize("pool_size, allowed", [(1, DEATHS_PER_WINDOW), (4, DEATHS_PER_WINDOW), (8, 16), (20, 40)])
def test_booted_workers_dying_faster_than_the_pool_could_need_back_off(backoff, clock, pool_size, allowed):
    for _ in range(allowed):  # up to max(DEATHS_PER_WINDOW, 2 × pool) deaths within DEATH_WINDOW: respawned at once
        backoff.death(booted=True, pool_size=pool_size)
        assert backoff.next_spawn_at == clock.now
        clock.now += DEATH_WINDOW / (2 * allowed)
    backoff.death(booted=True, pool_size=pool_size)  # one more within the window
    assert backoff.fast_failures == 1
    assert backoff.next_spawn_at == pytest.approx(clock.now + 0.1)


def test_deaths_spread_wider_than_the_window_never_back_off(backoff, clock):
    for _ in range(100):
        backoff.death(booted=True, pool_size=1)
        assert backoff.next_spawn_at == clock.now and backoff.fast_failures == 0
        clock.now += DEATH_WINDOW / 4  # at most five deaths in any window


def test_a_booted_death_soon_after_a_burst_keeps_the_pace_down(backoff, clock):
    for _ in range(3):
        backoff.death(booted=False, pool_size=4)
    assert backoff.fast_failures == 3
    clock.now += QUIET_AFTER_BURST - 1
    backoff.death(booted=True, pool_size=4)
    assert backoff.fast_failures == 3  # not counted as another quick failure ...
    assert backoff.next_spawn_at == pytest.approx(clock.now + 0.4)  # ... but still the burst's pace


@pytest.mark.parametrize("quiet", [QUIET_AFTER_BURST, QUIET_AFTER_BURST + 0.5, 60.0])
def test_quiet_after_a_burst_resets_the_backoff(backoff, clock, caplog, quiet):
    caplog.set_level(logging.INFO, logger="expertd.master")
    for _ in range(5):
        backoff.death(booted=False, pool_size=4)
    clock.now += quiet
    backoff.death(booted=True, pool_size=4)
    assert backoff.fast_failures == 0
    assert backoff.next_spawn_at == clock.now
    assert "workers stable again after 5 quick failures" in caplog.text
    backoff.death(booted=False, pool_size=4)  # a new burst starts from the shortest delay
    assert backoff.next_spawn_at == pytest.approx(clock.now + 0.1)


def test_a_crash_loop_is_logged_once_per_burst(backoff, clock, caplog):
    caplog.set_level(logging.INFO, logger="expertd.master")
    for _ in range(10):
        backoff.death(booted=False, pool_size=4)
    assert caplog.text.count("workers are dying as fast as they start") == 1
    clock.now += QUIET_AFTER_BURST
    backoff.death(booted=True, pool_size=4)
    backoff.death(booted=False, pool_size=4)
    assert caplog.text.count("workers are dying as fast as they start") == 2


@pytest.mark.parametrize("seconds", [0.5, 1.0, 10.0])
def test_retry_in_puts_the_next_spawn_off(backoff, clock, seconds):
    backoff.retry_in(seconds)
    assert backoff.next_spawn_at == clock.now + seconds
    assert backoff.fast_failures == 0  # a want of descriptors is not a crash


# ---------------------------------------------------------------------------------------- Quarantines
AFTER, WINDOW, LENGTH = 3, 10.0, 30.0
WALL = 1_700_000_000.0


@pytest.fixture
def quarantines(clock):
    wall = Clock(WALL)
    quarantines = Quarantines(clock, wall)
    clock.wall = wall  # moved with the monotonic clock by _advance
    return quarantines


def _advance(clock, seconds):
    clock.now += seconds
    clock.wall.now += seconds


def _crash(quarantines, expert="boom", answered=0, after=AFTER):
    return quarantines.count_crash(expert, answered, after, WINDOW, LENGTH)


def _quarantine(quarantines, clock, expert="boom"):
    outcomes = []
    for _ in range(AFTER):
        outcomes.append(_crash(quarantines, expert))
        _advance(clock, 0.5)
    assert outcomes[-1] == QUARANTINED
    return quarantines.entries[expert]


@pytest.mark.parametrize("after", [1, 2, 3, 5])
def test_an_expert_whose_calls_keep_killing_workers_is_quarantined_after_so_many(quarantines, clock, after):
    for _ in range(after - 1):
        assert _crash(quarantines, after=after) == COUNTED
        assert quarantines.of("boom") is None
        _advance(clock, 1.0)
    assert _crash(quarantines, after=after) == QUARANTINED
    quarantine = quarantines.of("boom")
    assert quarantine is not None
    assert (quarantine.until, quarantine.length, quarantine.wall_until) == (clock.now + LENGTH, LENGTH,
                                                                            clock.wall.now + LENGTH)


def test_crashes_further_apart_than_the_window_never_quarantine(quarantines, clock):
    for _ in range(20):
        assert _crash(quarantines) == COUNTED
        _advance(clock, WINDOW / 2 + 0.5)  # never three within the window
    assert quarantines.of("boom") is None and quarantines.entries == {}


def test_an_expert_that_mostly_answers_counts_toward_the_backoff_instead(quarantines, clock):
    assert _crash(quarantines, answered=0) == COUNTED
    _advance(clock, 1)
    # 50 calls answered since the first crash: its workers were killed from outside (OOM killer, an operator).
    assert _crash(quarantines, answered=50) == BACKOFF
    assert _crash(quarantines, answered=51) == BACKOFF
    assert _crash(quarantines, answered=52) == BACKOFF
    assert quarantines.of("boom") is None


def test_an_expert_answering_no_more_calls_than_it_crashed_is_still_counted(quarantines, clock):
    assert _crash(quarantines, answered=10) == COUNTED
    assert _crash(quarantines, answered=11) == COUNTED  # one answered since, two crashes
    assert _crash(quarantines, answered=13) == QUARANTINED  # three answered, three crashes


def test_a_crash_during_the_quarantine_does_not_lengthen_it(quarantines, clock):
    quarantine = _quarantine(quarantines, clock)
    until = quarantine.until
    for _ in range(10):
        assert _crash(quarantines) == COUNTED  # calls queued before it began
    assert quarantines.entries["boom"] is quarantine and quarantine.until == until


def test_the_quarantine_ends_on_time_and_its_end_is_logged_once(quarantines, clock, caplog):
    caplog.set_level(logging.INFO, logger="expertd.master")
    quarantine = _quarantine(quarantines, clock)
    clock.now = quarantine.until - 0.001
    assert quarantines.of("boom") is quarantine
    clock.now = quarantine.until
    assert quarantines.of("boom") is None
    assert quarantines.of("boom") is None
    assert caplog.text.count("expert boom: quarantine over") == 1


@pytest.mark.parametrize("expert", [None, "", "other", "(unknown)"])
def test_an_expert_never_quarantined_has_no_quarantine(quarantines, clock, expert):
    _quarantine(quarantines, clock, "boom")
    assert quarantines.of(expert) is None


def test_experts_are_quarantined_apart(quarantines, clock):
    _crash(quarantines, "a")
    _crash(quarantines, "b")
    _crash(quarantines, "a")
    assert _crash(quarantines, "b") == COUNTED
    assert _crash(quarantines, "a") == QUARANTINED
    assert quarantines.of("a") is not None and quarantines.of("b") is None


def test_a_quarantine_again_soon_after_the_last_doubles_up_to_its_limit(quarantines, clock):
    lengths = []
    for _ in range(8):
        quarantine = _quarantine(quarantines, clock)
        lengths.append(quarantine.length)
        assert quarantine.until == pytest.approx(clock.now - 0.5 + quarantine.length)
        clock.now = quarantine.until + 1.0  # crashes again within as long as the last one lasted
        clock.wall.now = quarantine.wall_until + 1.0
    assert lengths == [30, 60, 120, 240, 480, 960, 960, 960]
    assert max(lengths) == QUARANTINE_GROWTH_MAX * LENGTH


def test_a_quarantine_long_after_the_last_is_as_short_as_the_first(quarantines, clock):
    first = _quarantine(quarantines, clock)
    _advance(clock, first.until - clock.now + first.length)  # as long after its end as it lasted
    second = _quarantine(quarantines, clock)
    assert second.length == LENGTH and second is not first


def test_the_refusal_says_how_long_is_left_and_why(quarantines, clock):
    quarantine = _quarantine(quarantines, clock)
    clock.now = quarantine.until - 12.2
    assert quarantines.message("boom", quarantine, AFTER, WINDOW) == (
        "boom is quarantined for 12s more: its calls killed 3 workers within 10s; retry after that, "
        "and see the daemon's log")
    clock.now = quarantine.until + 5
    assert "quarantined for 0s more" in quarantines.message("boom", quarantine, AFTER, WINDOW)


def test_status_lists_only_the_quarantines_in_force(quarantines, clock):
    assert quarantines.current() == []
    first = _quarantine(quarantines, clock, "zeta")
    _advance(clock, 20)
    second = _quarantine(quarantines, clock, "alpha")
    assert quarantines.current() == [
        {"expert": "alpha", "until": round(second.wall_until, 1), "seconds_left": round(second.until - clock.now, 1)},
        {"expert": "zeta", "until": round(first.wall_until, 1), "seconds_left": round(first.until - clock.now, 1)},
    ]
    clock.now = first.until
    assert [entry["expert"] for entry in quarantines.current()] == ["alpha"]
    clock.now = second.until
    assert quarantines.current() == []


def test_lingering_is_paused_until_the_last_quarantine_ends(quarantines, clock):
    assert quarantines.linger_paused_until == 0.0
    first = _quarantine(quarantines, clock, "a")
    assert quarantines.linger_paused_until == first.until
    _advance(clock, 5)
    second = _quarantine(quarantines, clock, "b")
    assert quarantines.linger_paused_until == second.until > first.until


def test_a_shorter_quarantine_after_a_longer_one_does_not_resume_lingering_early(quarantines, clock):
    for _ in range(AFTER):
        quarantines.count_crash("long", 0, AFTER, WINDOW, 300.0)
    long_until = quarantines.entries["long"].until
    _advance(clock, 1)
    for _ in range(AFTER):
        quarantines.count_crash("short", 0, AFTER, WINDOW, 30.0)
    assert quarantines.entries["short"].until < long_until
    assert quarantines.linger_paused_until == long_until
