"""Rate-limited logging, for the lines a client can make the daemon write at will.

A refused user connecting in a loop, a flood of connections past a limit, a
client that keeps breaking its connections: each would otherwise cost a log
line per attempt, and a local user could fill the disk or drown the lines that
matter.  :class:`Throttle` writes the first line of a *cause* at once, then at
most one more line per cause per ``interval``, which carries how many were left
out::

    refused a connection from uid 1001 (pid 4242): not in allow_uids or allow_gids
    refused a connection from uid 1001 (pid 5113): ... (61832 more like this in the last 10s)

A cause is any hashable key (by default the message template): give one per
user, say, so that one user's flood cannot hide another's first line.
:meth:`Throttle.flush` writes the counts of intervals that are over; call it
now and then (the master does from its loop), or they are written with the
cause's next line.

:class:`Summary` is the master's line per minute on the calls it handed over.

State owned here: each cause's window (Throttle); the minute's call durations (Summary).
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass

DEFAULT_INTERVAL = 10.0
_MAX_CAUSES = 256  # past this many causes at once, causes fall back to their message template


@dataclass
class _Window:
    until: float  # the end of the interval that began with the last line written
    left_out: int = 0  # lines held back since that one
    level: int = logging.WARNING
    msg: str = ""
    args: tuple = ()


class Throttle:
    """At most one line per cause per ``interval`` to ``logger``, with the count of those left out."""

    def __init__(self, logger: logging.Logger, interval: float = DEFAULT_INTERVAL,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.logger = logger
        self.interval = interval
        self._clock = clock
        self._windows: dict[Hashable, _Window] = {}
        self._next_flush = float("inf")

    def warning(self, msg: str, *args: object, cause: Hashable = None) -> None:
        self.log(logging.WARNING, msg, *args, cause=cause)

    def info(self, msg: str, *args: object, cause: Hashable = None) -> None:
        self.log(logging.INFO, msg, *args, cause=cause)

    def error(self, msg: str, *args: object, cause: Hashable = None) -> None:
        self.log(logging.ERROR, msg, *args, cause=cause)

    def log(self, level: int, msg: str, *args: object, cause: Hashable = None) -> None:
        """Log ``msg % args`` unless a line of the same cause went out less than ``interval`` ago."""
        if not self.logger.isEnabledFor(level):
            return
        now = self._clock()
        key = msg if cause is None else cause
        window = self._windows.get(key)
        if window is not None and now >= window.until:
            self._close(key, window, now)
            window = self._windows.get(key)
        if window is None:
            if len(self._windows) >= _MAX_CAUSES:
                key = msg
                window = self._windows.get(key)
        if window is None:
            self._windows[key] = _Window(until=now + self.interval)
            self._next_flush = min(self._next_flush, now + self.interval)
            self.logger.log(level, msg, *args)
            return
        window.left_out += 1
        window.level, window.msg, window.args = level, msg, args

    def flush(self, force: bool = False) -> None:
        """Write the count of every interval that is over (every one, with ``force``: at exit)."""
        if not force and self._next_flush == float("inf"):
            return  # nothing left out anywhere: not even the clock is read (this runs every loop iteration)
        now = self._clock()
        if not force and now < self._next_flush:
            return
        self._next_flush = float("inf")
        for key, window in list(self._windows.items()):
            if force or now >= window.until:
                self._close(key, window, now, force)
            else:
                self._next_flush = min(self._next_flush, window.until)

    def _close(self, key: Hashable, window: _Window, now: float, force: bool = False) -> None:
        """An interval is over: write what it left out, if anything (and that starts the next interval)."""
        if not window.left_out:
            del self._windows[key]  # quiet for a whole interval: the cause's next line goes out at once
            return
        self.logger.log(window.level, window.msg + " (%d more like this in the last %gs)", *window.args,
                        window.left_out, self.interval)
        if force:
            del self._windows[key]
        else:
            self._windows[key] = _Window(until=now + self.interval)
            self._next_flush = min(self._next_flush, now + self.interval)


SUMMARY_INTERVAL = 60.0
_SUMMARY_SAMPLES = 10_000  # call durations kept for the summary's percentiles


class Summary:
    """The master's periodic log line: handed-over calls in the last minute, their median and 99th percentile.

    Memory stays bounded at any request rate: past _SUMMARY_SAMPLES durations, a
    uniform sample of them is kept (a reservoir).
    """

    def __init__(self, log: logging.Logger, clock: Callable[[], float] = time.monotonic) -> None:
        self._log = log
        self._durations: list[float] = []
        self._seen = 0
        self.next_at = clock() + SUMMARY_INTERVAL

    def record(self, elapsed: float) -> None:
        self._seen += 1
        if self._seen <= _SUMMARY_SAMPLES:
            self._durations.append(elapsed)
        else:
            kept = int(random.random() * self._seen)  # (randrange costs ten times more)
            if kept < _SUMMARY_SAMPLES:
                self._durations[kept] = elapsed

    def write(self, now: float, connections: int) -> None:
        """Write the line if the minute is over (and anything was handed over in it)."""
        if now < self.next_at:
            return
        self.next_at = now + SUMMARY_INTERVAL
        if self._durations:
            durations = sorted(self._durations)
            self._log.info("last %.0fs: %d requests, median %.2f ms, 99th percentile %.2f ms, %d connections open",
                           SUMMARY_INTERVAL, self._seen, durations[len(durations) // 2] * 1000,
                           durations[min(len(durations) - 1, int(len(durations) * 0.99))] * 1000, connections)
            self._durations, self._seen = [], 0


def plural(count: int, noun: str) -> str:
    """``1 worker``, ``2 workers``: a count with its noun, for messages."""
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"
