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
user, say, so that one user's flood cannot hide another's first line.  A line
may carry a ``detail`` (an expert's traceback) that only the lines written at
once show.
:meth:`Throttle.flush` writes the counts of intervals that are over; call it
now and then (the master does from its loop), or they are written with the
cause's next line.

:class:`Summary` is the master's line per minute on the calls served, from the
counters /metrics shows.

State owned here: each cause's window (Throttle); the counters as the last summary read them (Summary).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass

from expertd.metrics import CallCounts, quantile
from expertd.text import interval_summary, plural

DEFAULT_INTERVAL = 10.0
_MAX_CAUSES = 256  # past this many causes at once, causes fall back to their message template
# Line breaks and other control characters, escaped in text a client may have chosen (an expert's exception
# message can quote its input): a forged line must not read as a record of its own.
_CONTROLS = {code: f"\\x{code:02x}" for code in (*range(32), 127)} | {10: "\\n", 13: "\\r", 9: "\\t"}
DETAIL_PREFIX = "  | "  # before each line of a detail (a traceback): no continuation line can pass for a record


def one_line(text: str) -> str:
    """``text`` with its line breaks and control characters escaped: one log line, whatever a client sent."""
    return text.translate(_CONTROLS)


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

    def warning(self, msg: str, *args: object, cause: Hashable = None, detail: str | None = None,
                extra: dict | None = None) -> None:
        self.log(logging.WARNING, msg, *args, cause=cause, detail=detail, extra=extra)

    def info(self, msg: str, *args: object, cause: Hashable = None) -> None:
        self.log(logging.INFO, msg, *args, cause=cause)

    def error(self, msg: str, *args: object, cause: Hashable = None) -> None:
        self.log(logging.ERROR, msg, *args, cause=cause)

    def log(self, level: int, msg: str, *args: object, cause: Hashable = None, detail: str | None = None,
            extra: dict | None = None) -> None:
        """Log ``msg % args`` unless a line of the same cause went out less than ``interval`` ago.

        ``detail`` (a traceback, say) follows the line on lines of its own when it goes out, each
        after DETAIL_PREFIX; the count of those left out is one line, without it.  ``extra`` goes
        with the line written (a request's id, for the JSON log), not with the count.
        """
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
            if detail:
                lines = "\n".join(DETAIL_PREFIX + one_line(line) for line in detail.rstrip("\n").split("\n"))
                self.logger.log(level, msg + "\n%s", *args, lines, extra=extra)
            else:
                self.logger.log(level, msg, *args, extra=extra)
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


class Summary:
    """The master's line every ``interval`` on the calls served in it, from the counters /metrics shows.

    Workers count every call in shared memory (:mod:`expertd.metrics`), those served on
    a lingering connection too, which the master never sees; the summary reads those
    counters (``read``) at the end of each interval and writes the differences::

        last 60s: 610620 requests (610600 ok, 20 expert_failed), median 0.026 ms, 99th percentile 0.094 ms, ...

    The percentiles are estimated from the latency histogram's buckets (see
    :func:`expertd.metrics.quantile`), as Prometheus' histogram_quantile would.
    ``figures`` keeps the last interval's, for ``status``.
    """

    def __init__(self, log: logging.Logger, interval: float, read: Callable[[], CallCounts],
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._log = log
        self.interval = interval  # 0: off (nothing is read)
        self._read = read
        self._last_at = clock()
        self._last = read() if interval else None
        self.next_at = self._last_at + interval if interval else float("inf")
        self.figures: dict | None = None

    def write(self, now: float, connections: int) -> None:
        """Write the line if the interval is over (and anything was served in it)."""
        if now < self.next_at:
            return
        counts = self._read()
        served = counts.since(self._last)  # type: ignore[arg-type]
        self.figures = summary_figures(served, now - self._last_at)
        self._last, self._last_at, self.next_at = counts, now, now + self.interval
        line = summary_line(self.figures, connections)
        if line is not None:
            self._log.info("%s", line)


def summary_figures(served: CallCounts, seconds: float) -> dict:
    """What the summary says of ``served`` (calls counted over ``seconds``): also ``status``'s last_interval."""
    p50, p99 = quantile(0.5, served.buckets), quantile(0.99, served.buckets)
    return {
        "seconds": round(seconds, 1),
        "requests": sum(served.outcomes.values()),
        "outcomes": {code: count for code, count in served.outcomes.items() if count},
        "median_ms": None if p50 is None else round(p50 * 1000, 3),
        "p99_ms": None if p99 is None else round(p99 * 1000, 3),
        "pipeline_requests": served.pipelines,
    }


def summary_line(figures: dict, connections: int) -> str | None:
    """The summary's log line for ``figures`` (:func:`summary_figures`); None when nothing was served."""
    if not figures["requests"] and not figures["pipeline_requests"]:
        return None
    return f"{interval_summary(figures)}, {plural(connections, 'connection')} open"
