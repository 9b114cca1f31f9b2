"""What worker deaths mean: the daemon-wide respawn backoff and per-expert quarantine.

Both are decisions over a clock, nothing else: they take the clock as an
argument (tests pass a fake one, tests/test_backoff.py) and touch no process.

* :class:`CrashBackoff`: workers dying as fast as they start (a worker that
  never became ready, or more deaths within a second than the pool could
  plausibly need) slow respawning down, doubling up to ``BACKOFF_MAX``; after
  ``QUIET_AFTER_BURST`` without a quick failure the pace is normal again.
* :class:`Quarantines`: an expert whose calls keep killing their workers is
  refused for a while instead, so that it holds back its own callers, not
  everyone's respawns.

State owned here: the backoff's recent deaths and pace; each expert's recent
crashes and its quarantine, current or last.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

log = logging.getLogger("expertd.master")

# More unexpected worker deaths than this (or twice the pool) within the window is a crash loop.
DEATH_WINDOW = 1.0
DEATHS_PER_WINDOW = 10
BACKOFF_MAX = 10.0
# A crash burst ends after this long without a quick failure.
QUIET_AFTER_BURST = 5.0
QUARANTINE_GROWTH_MAX = 32  # a repeated quarantine doubles, up to this many times quarantine_time

# What a worker's death counted toward (Quarantines.count_crash).
BACKOFF, COUNTED, QUARANTINED = "backoff", "counted", "quarantined"


class CrashBackoff:
    """When the next worker may be spawned, after deaths that look like a crash loop."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self.next_spawn_at = 0.0
        self.fast_failures = 0
        self._last_fast_failure = 0.0
        self._recent_deaths: deque[float] = deque()
        self._logged = False

    def delay(self) -> float:
        return min(BACKOFF_MAX, 0.1 * 2 ** (self.fast_failures - 1))

    def death(self, booted: bool, pool_size: int) -> None:
        """A worker died unexpectedly (``booted``: after it was ready); sets :attr:`next_spawn_at`."""
        now = self._clock()
        self._recent_deaths.append(now)
        while self._recent_deaths and now - self._recent_deaths[0] > DEATH_WINDOW:
            self._recent_deaths.popleft()
        if not booted or len(self._recent_deaths) > max(DEATHS_PER_WINDOW, 2 * pool_size):
            self.fast_failures += 1
            self._last_fast_failure = now
            self.next_spawn_at = now + self.delay()
            if not self._logged:
                log.error("workers are dying as fast as they start; respawning with backoff (up to %.0fs)",
                          BACKOFF_MAX)
                self._logged = True
        elif self.fast_failures and now - self._last_fast_failure < QUIET_AFTER_BURST:
            self.next_spawn_at = now + self.delay()  # the burst is not over: keep the pace down
        else:
            if self._logged:
                log.info("workers stable again after %d quick failures", self.fast_failures)
            self.fast_failures = 0
            self._logged = False
            self.next_spawn_at = now

    def retry_in(self, seconds: float) -> None:
        """Spawning failed for want of something (descriptors, the generation's parent): try again later."""
        self.next_spawn_at = self._clock() + seconds


@dataclass(eq=False)
class Quarantine:
    """An expert refused for a while: its calls kept killing their workers."""

    until: float  # monotonic
    length: float  # seconds; a repeat soon after doubles it
    wall_until: float  # the same moment by the wall clock, for expertctl status
    over: bool = False  # its end has been logged


class Quarantines:
    """Each expert's recent crashes, and the quarantines they led to.

    :attr:`entries` is keyed by served expert names only (never a name a
    client sent that is not served); it is empty while no expert was ever
    quarantined, which the hot path checks first.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic, wall: Callable[[], float] = time.time) -> None:
        self._clock, self._wall = clock, wall
        self.entries: dict[str, Quarantine] = {}  # expert -> its quarantine, current or last
        # expert -> (when its call killed a worker, how many of its calls had been answered then)
        self._crashes: dict[str, deque[tuple[float, int]]] = {}
        self.linger_paused_until = 0.0  # lingering is off while an expert is quarantined

    def count_crash(self, expert: str, answered: int, after: int, window: float, length: float) -> str:
        """A call to ``expert`` killed its worker: is that the expert's crash loop?

        It is while, since its first crash within ``window``, the expert answered
        no more calls than it crashed (kill_worker-like experts answer none).
        Then the crash counts toward the expert's quarantine (COUNTED); ``after``
        of them quarantine it for ``length`` seconds (QUARANTINED), twice as
        long as last time if that was recent.  An expert that mostly answers had
        its workers killed from outside (an operator, the OOM killer): those
        deaths count toward the daemon-wide respawn backoff instead (BACKOFF).
        """
        now = self._clock()
        quarantine = self.entries.get(expert)
        if quarantine is not None and now < quarantine.until:
            return COUNTED  # a call queued before the quarantine began
        crashes = self._crashes.setdefault(expert, deque())
        crashes.append((now, answered))
        while now - crashes[0][0] > window:
            crashes.popleft()
        if answered - crashes[0][1] > len(crashes):
            return BACKOFF
        if len(crashes) < after:
            return COUNTED
        crashes.clear()
        if quarantine is not None and now - quarantine.until < quarantine.length:  # again, soon after the last
            length = min(2 * quarantine.length, QUARANTINE_GROWTH_MAX * length)
        self.entries[expert] = Quarantine(now + length, length, self._wall() + length)
        log.error("expert %s: its calls killed %d workers within %gs; refusing calls to it for %gs (quarantine)",
                  expert, after, window, length)
        # Calls a lingering worker serves never pass the master's check: no lingering until it ends.
        self.linger_paused_until = max(self.linger_paused_until, now + length)
        return QUARANTINED

    def of(self, expert: str | None) -> Quarantine | None:
        """The quarantine ``expert`` is in now, if any (its end is logged once)."""
        quarantine = self.entries.get(expert)  # type: ignore[arg-type]
        if quarantine is None or quarantine.over:
            return None
        if self._clock() < quarantine.until:
            return quarantine
        quarantine.over = True
        log.info("expert %s: quarantine over; serving its calls again", expert)
        return None

    def message(self, expert: str, quarantine: Quarantine, after: int, window: float) -> str:
        left = max(0.0, quarantine.until - self._clock())
        return (f"{expert} is quarantined for {left:.0f}s more: its calls killed {after} "
                f"workers within {window:g}s; retry after that, and see the daemon's log")

    def current(self) -> list[dict]:
        """The quarantines in force, for status."""
        now = self._clock()
        return [{"expert": name, "until": round(q.wall_until, 1), "seconds_left": round(q.until - now, 1)}
                for name, q in sorted(self.entries.items()) if now < q.until]
