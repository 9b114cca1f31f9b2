"""Words for messages: plurals, and the summary of an interval's calls that the log and ``expertctl status`` share.

Pure functions over plain values; standard library only (nothing at all), so
that ``expertctl`` imports it at no cost.  State owned here: none.
"""

from __future__ import annotations


def plural(count: int, noun: str) -> str:
    """``1 worker``, ``2 workers``, ``0 workers``: a count with its noun, for messages."""
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


def interval_summary(figures: dict) -> str:
    """The words for an interval's calls (``expertd.logs.summary_figures``; ``status``'s last_interval).

    ``last 60s: 100 requests (99 ok, 1 bad_request), median 0.038 ms, 99th percentile 0.050 ms``,
    then the pipeline requests, if any.  The summary's log line adds the connections open.
    """
    outcomes = ", ".join(f"{count} {code}" for code, count in figures["outcomes"].items())
    text = f"last {figures['seconds']:.0f}s: {plural(figures['requests'], 'request')}"
    if outcomes:
        text += f" ({outcomes})"
    if figures["median_ms"] is not None:
        text += f", median {figures['median_ms']:.3f} ms, 99th percentile {figures['p99_ms']:.3f} ms"
    if figures["pipeline_requests"]:
        text += f", {plural(figures['pipeline_requests'], 'pipeline request')}"
    return text
