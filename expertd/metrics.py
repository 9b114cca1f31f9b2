"""Request metrics: counted by the workers in shared memory, exported by the master (GET /metrics).

Each worker counts the calls it answers (outcome, latency histogram, total
time) per expert, in its own slot of an anonymous shared map the master
creates before forking.  One writer per slot means no locks, and counting is
three increments of a memoryview: no system call, nothing sent.  When a worker
exits, the master folds its slot into totals of its own, so counters never go
back.  Failures only the master sees (timeouts, lost workers) it counts itself.

:func:`render` writes the Prometheus text exposition format (version 0.0.4):
requests and errors per expert, a latency histogram per expert, workers,
connections, queue and memory.
"""

from __future__ import annotations

import mmap
from bisect import bisect_left
from collections.abc import Iterable
from typing import NamedTuple

# Upper bounds (seconds) of the latency histogram's buckets; +Inf is implicit.  From 10 µs: a fast
# expert's call takes tens of microseconds, and a histogram that starts at 0.5 ms reads all of them as
# 0.25 ms.  21 buckets: each record in the shared map, and each expert's lines in /metrics, grow with them.
BUCKETS = (0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
           0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
# A call's outcome: "ok" or an error code (docs/protocol.md).  Workers see the first few; the
# master counts the failures it answers itself (timeout, worker_lost, ...) apart.
# A pipeline's outcome is "ok", "expert_errors" (it answered, with some experts' errors in the document),
# "timeout" (a stage ran past its timeout, or the whole) or the request's error code.
OUTCOMES = ("ok", "bad_request", "unknown_expert", "frame_too_large", "expert_failed", "bad_result", "timeout",
            "worker_lost", "overloaded", "shutting_down", "access_denied", "expert_errors", "error")
UNKNOWN_EXPERT = "(unknown)"  # requests that named no served expert
# Pipelines have records of their own in the same table, under this prefix; requests for a plan that is not
# one named pipeline (experts listed by the caller) are counted together.
PIPELINE_PREFIX = "pipeline:"
AD_HOC = "(ad hoc)"
_OUTCOME_INDEX = {name: i for i, name in enumerate(OUTCOMES)}
_OTHER = _OUTCOME_INDEX["error"]
_FIRST_BUCKET = len(OUTCOMES)
_SUM = _FIRST_BUCKET + len(BUCKETS) + 1
_RECORD = _SUM + 1  # counters per outcome, per bucket (and +Inf), then the sum of seconds
_AD_HOC_KEY = PIPELINE_PREFIX + AD_HOC
_FIRST_BOUND = BUCKETS[0]


class Metrics:
    """The shared counters; the master owns the expert indices and the totals of exited workers."""

    def __init__(self, slots: int, experts: Iterable[str], capacity: int = 0, pipelines: Iterable[str] = ()) -> None:
        names = [UNKNOWN_EXPERT, *experts, *(PIPELINE_PREFIX + name for name in (AD_HOC, *pipelines))]
        self.capacity = max(capacity, 16, 2 * len(names))  # room for experts a reload adds
        self.slots = slots
        size = slots * self.capacity * _RECORD * 8
        self._map = mmap.mmap(-1, size)  # MAP_SHARED | MAP_ANONYMOUS; untouched pages cost nothing
        self._counts = memoryview(self._map).cast("Q")
        self._seconds = memoryview(self._map).cast("d")
        self.index: dict[str, int] = {}
        self._retired = [0] * (self.capacity * _RECORD)
        self._retired_seconds = [0.0] * self.capacity
        self._master_errors: dict[tuple[str, str], int] = {}
        for name in names:
            self.add_expert(name)

    # master side
    def add_expert(self, name: str) -> None:
        """Give an expert its counters (before forking the workers that serve it)."""
        if name not in self.index and len(self.index) < self.capacity:
            self.index[name] = len(self.index)  # past capacity it is counted as unknown

    def add_pipeline(self, name: str) -> None:
        """Give a pipeline its counters (before forking the workers that run it)."""
        self.add_expert(PIPELINE_PREFIX + name)

    def retire(self, slot: int) -> None:
        """Fold an exited worker's counters into the totals and clear its slot for the next one."""
        base = slot * self.capacity * _RECORD
        counts, seconds = self._counts, self._seconds
        for expert in range(self.capacity):
            record = base + expert * _RECORD
            if not counts[record : record + _SUM].tobytes().strip(b"\0"):
                continue
            for i in range(_SUM):
                self._retired[expert * _RECORD + i] += counts[record + i]
                counts[record + i] = 0
            self._retired_seconds[expert] += seconds[record + _SUM]
            seconds[record + _SUM] = 0.0

    def count_failure(self, expert: str | None, code: str) -> None:
        """A request that failed in the master's hands (timeout, lost worker, refused)."""
        if expert in self.index:
            name = expert
        elif expert and PIPELINE_PREFIX + expert in self.index:  # a pipeline's request (its target names it)
            name = PIPELINE_PREFIX + expert
        elif expert and ("," in expert or "+" in expert):  # experts the caller listed: a pipeline's target
            name = _AD_HOC_KEY
        else:
            name = UNKNOWN_EXPERT
        key = (name, code)
        self._master_errors[key] = self._master_errors.get(key, 0) + 1

    def answered(self, expert: str, live_slots: Iterable[int]) -> int:
        """Calls to ``expert`` that workers answered (any outcome), live and exited workers together."""
        index = self.index.get(expert)
        if index is None:
            return 0
        total = sum(self._retired[index * _RECORD : index * _RECORD + _FIRST_BUCKET])
        for slot in live_slots:
            record = (slot * self.capacity + index) * _RECORD
            total += sum(self._counts[record : record + _FIRST_BUCKET])
        return total

    def recorder(self, slot: int) -> Recorder:
        """What the worker in ``slot`` counts with."""
        return Recorder(self._counts, self._seconds, slot * self.capacity * _RECORD, dict(self.index))

    def totals(self, live_slots: Iterable[int]) -> dict[str, tuple[list[int], float]]:
        """Per expert name: (counters as laid out in a record, seconds), summed over live and exited workers."""
        by_index = [list(self._retired[e * _RECORD : (e + 1) * _RECORD]) for e in range(self.capacity)]
        seconds = list(self._retired_seconds)
        for slot in live_slots:
            base = slot * self.capacity * _RECORD
            for expert in range(len(self.index)):
                record = base + expert * _RECORD
                values = self._counts[record : record + _SUM].tolist()
                if any(values):
                    row = by_index[expert]
                    for i, value in enumerate(values):
                        row[i] += value
                    seconds[expert] += self._seconds[record + _SUM]
        return {name: (by_index[i], seconds[i]) for name, i in self.index.items()}

    def pipelines(self, live_slots: Iterable[int]) -> dict[str, dict]:
        """Per pipeline that was asked for: requests, their outcomes (those seen) and mean time (``status``)."""
        summary = {}
        for name, (counters, seconds) in self.totals(live_slots).items():
            if not name.startswith(PIPELINE_PREFIX):
                continue
            failed = self._master_errors  # (what the master answered itself: timeout, worker_lost)
            outcomes = {code: counters[i] + failed.get((name, code), 0) for code, i in _OUTCOME_INDEX.items()}
            answered = sum(counters[:_FIRST_BUCKET])
            requests = sum(outcomes.values())
            if requests:
                summary[name[len(PIPELINE_PREFIX):]] = {
                    "requests": requests,
                    "outcomes": {code: count for code, count in outcomes.items() if count},
                    "mean_ms": round(seconds / answered * 1000, 3) if answered else None,  # (as its workers timed it)
                }
        return summary

    def calls_so_far(self, live_slots: Iterable[int]) -> CallCounts:
        """Every call counted so far, as /metrics counts them (the log summary's differences of these agree).

        By outcome: the workers' counts and the master's failures (expertd_requests_total over the
        experts); the latency buckets of the calls workers answered (expertd_request_duration_seconds);
        and pipeline requests (expertd_pipeline_requests_total), apart.
        """
        outcomes = dict.fromkeys(OUTCOMES, 0)
        buckets = [0] * (len(BUCKETS) + 1)
        pipelines = 0
        for name, (counters, _seconds) in self.totals(live_slots).items():
            if name.startswith(PIPELINE_PREFIX):
                pipelines += sum(counters[:_FIRST_BUCKET])
                continue
            for code, i in _OUTCOME_INDEX.items():
                outcomes[code] += counters[i]
            for i, count in enumerate(counters[_FIRST_BUCKET:_SUM]):
                buckets[i] += count
        for (name, code), count in self._master_errors.items():
            if name.startswith(PIPELINE_PREFIX):
                pipelines += count
            else:
                outcomes[code] = outcomes.get(code, 0) + count
        return CallCounts(outcomes, buckets, pipelines)

    def render(self, live_slots: Iterable[int], gauges: dict[str, object]) -> str:
        """The Prometheus text exposition of every counter and of ``gauges`` (see :func:`render`)."""
        return render(self.totals(live_slots), self._master_errors, gauges)


class CallCounts(NamedTuple):
    """Calls counted up to a moment (:meth:`Metrics.calls_so_far`); the summary subtracts two of them."""

    outcomes: dict[str, int]  # outcome -> calls
    buckets: list[int]  # calls per latency bucket (BUCKETS, then +Inf), not cumulative
    pipelines: int  # pipeline requests

    def since(self, before: CallCounts) -> CallCounts:
        """What was counted between ``before`` and these (never below 0: counters never go back, and a
        bug that made one would show as nothing rather than as a negative count)."""
        return CallCounts({code: max(0, count - before.outcomes.get(code, 0)) for code, count in self.outcomes.items()},
                          [max(0, now - then) for now, then in zip(self.buckets, before.buckets, strict=True)],
                          max(0, self.pipelines - before.pipelines))


def quantile(q: float, buckets: list[int], bounds: tuple[float, ...] = BUCKETS) -> float | None:
    """Estimate the ``q`` quantile (0..1) of durations counted in ``buckets`` (per bucket of ``bounds``, then +Inf).

    As Prometheus' histogram_quantile does: linear within the bucket the rank falls in (the first
    from 0); in the +Inf bucket, the largest finite bound.  None when nothing was counted.
    """
    total = sum(buckets)
    if not total:
        return None
    rank = q * total
    below = 0
    for i, count in enumerate(buckets):
        if count and below + count >= rank:
            if i == len(bounds):
                return bounds[-1]
            lower = bounds[i - 1] if i else 0.0
            return lower + (bounds[i] - lower) * max(0.0, rank - below) / count
        below += count
    return bounds[-1]  # (q > 1)


class Recorder:
    """One worker's counters: written by that worker alone, read by the master."""

    __slots__ = ("_base", "_counts", "_index", "_seconds")

    def __init__(self, counts: memoryview, seconds: memoryview, base: int, index: dict[str, int]) -> None:
        self._counts, self._seconds, self._base, self._index = counts, seconds, base, index

    def record(self, expert: str | None, outcome: str, seconds: float) -> None:
        record = self._base + self._index.get(expert, 0) * _RECORD  # type: ignore[arg-type]
        counts = self._counts
        counts[record + _OUTCOME_INDEX.get(outcome, _OTHER)] += 1
        counts[record + _FIRST_BUCKET + bisect_left(BUCKETS, seconds)] += 1
        self._seconds[record + _SUM] += seconds

    def record_pipeline(self, pipeline: str, outcome: str, seconds: float) -> None:
        """Count a pipeline request (``pipeline``: its name, or AD_HOC)."""
        key = PIPELINE_PREFIX + pipeline
        self.record(key if key in self._index else _AD_HOC_KEY, outcome, seconds)

    def record_run(self, ran: list[tuple[str, str, float]], pipeline: str | None, outcome: str,
                   seconds: float) -> None:
        """Count what a pipeline request ran and the request: each of ``ran`` ((expert, outcome, seconds)) as
        :meth:`record` counts a call, then, unless ``pipeline`` is None (a helper's request), the request as
        :meth:`record_pipeline` does.

        The experts' counts in one pass: for a pipeline of cheap experts, a method call per expert cost more
        than the counting.  (The request is counted once: by record_pipeline itself.)
        """
        counts, sums, base, index = self._counts, self._seconds, self._base, self._index
        for expert, code, elapsed in ran:
            record = base + index.get(expert, 0) * _RECORD
            counts[record + _OUTCOME_INDEX.get(code, _OTHER)] += 1
            # (bisect_left's answer for anything up to the first bound, without the search: a cheap expert's)
            counts[record + _FIRST_BUCKET + (bisect_left(BUCKETS, elapsed) if elapsed > _FIRST_BOUND else 0)] += 1
            sums[record + _SUM] += elapsed
        if pipeline is not None:
            self.record_pipeline(pipeline, outcome, seconds)


# Batched experts' histograms (figures kept by expertd.batching): calls per batch, seconds queued.
SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 250)
DELAY_BUCKETS = (0.0001, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


def _histogram(name: str, expert: str, bounds: tuple, counts: list[int], total: float, count: int,
               label: str = "expert") -> list[str]:
    lines, cumulative = [], 0
    for bound, bucket in zip((*bounds, float("inf")), counts, strict=True):
        cumulative += bucket
        le = "+Inf" if bound == float("inf") else repr(bound)
        lines.append(f"{name}_bucket{_labels(**{label: expert}, le=le)} {cumulative}")
    lines.append(f"{name}_sum{_labels(**{label: expert})} {_number(total)}")
    lines.append(f"{name}_count{_labels(**{label: expert})} {count}")
    return lines


def _labels(**labels: object) -> str:
    return "{" + ",".join(f'{k}="{_escape(str(v))}"' for k, v in labels.items()) + "}"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _number(value: float) -> str:
    return repr(float(value)) if isinstance(value, float) else str(value)


def render(totals: dict[str, tuple[list[int], float]], master_errors: dict[tuple[str, str], int],
           gauges: dict[str, object]) -> str:
    """Prometheus text format.

    ``gauges`` holds: workers (by state), workers_wanted, connections, queued,
    generation, memory (by process and kind), uptime, version, and batches (expert ->
    expertd.batching.BatchFigures, may be absent).
    """
    out: list[str] = []

    def family(name: str, kind: str, help_text: str) -> None:
        out.extend((f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"))

    pipelines = {name[len(PIPELINE_PREFIX):]: row for name, row in totals.items() if name.startswith(PIPELINE_PREFIX)}
    totals = {name: row for name, row in totals.items() if not name.startswith(PIPELINE_PREFIX)}
    pipeline_failures = {(name[len(PIPELINE_PREFIX):], code): count for (name, code), count in master_errors.items()
                         if name.startswith(PIPELINE_PREFIX)}
    master_errors = {key: count for key, count in master_errors.items() if not key[0].startswith(PIPELINE_PREFIX)}
    requests, errors = {}, {}
    for expert, (counters, _seconds) in totals.items():
        requests[expert] = sum(counters[:_FIRST_BUCKET])
        for code, i in _OUTCOME_INDEX.items():
            if code != "ok" and counters[i]:
                errors[(expert, code)] = counters[i]
    for (expert, code), count in master_errors.items():
        requests[expert] = requests.get(expert, 0) + count
        errors[(expert, code)] = errors.get((expert, code), 0) + count

    family("expertd_requests_total", "counter", "Calls answered (or failed), by expert.")
    for expert, count in sorted(requests.items()):
        if count or expert != UNKNOWN_EXPERT:
            out.append(f"expertd_requests_total{_labels(expert=expert)} {count}")
    family("expertd_errors_total", "counter",
           "Calls that failed, by expert and error code (expertd --help-topic protocol).")
    for (expert, code), count in sorted(errors.items()):
        out.append(f"expertd_errors_total{_labels(expert=expert, code=code)} {count}")
    family("expertd_request_duration_seconds", "histogram",
           "Time a worker spent on a call, from taking the request to writing the reply, by expert.")
    for expert, (counters, seconds) in sorted(totals.items()):
        if expert == UNKNOWN_EXPERT:
            continue
        cumulative = 0
        for bound, count in zip((*BUCKETS, float("inf")), counters[_FIRST_BUCKET:_SUM], strict=True):
            cumulative += count
            le = "+Inf" if bound == float("inf") else repr(bound)
            out.append(f"expertd_request_duration_seconds_bucket{_labels(expert=expert, le=le)} {cumulative}")
        out.append(f"expertd_request_duration_seconds_sum{_labels(expert=expert)} {_number(seconds)}")
        out.append(f"expertd_request_duration_seconds_count{_labels(expert=expert)} {cumulative}")

    family("expertd_pipeline_requests_total", "counter",
           "Pipeline requests, by pipeline ((ad hoc): experts the caller listed) and outcome: ok, expert_errors "
           "(answered, some experts' errors in the document), timeout, or the request's error code.")
    for pipeline, (counters, _seconds) in sorted(pipelines.items()):
        for code, i in _OUTCOME_INDEX.items():
            count = counters[i] + pipeline_failures.get((pipeline, code), 0)  # (with the master's: timeout, lost)
            if count or (code == "ok" and pipeline != AD_HOC):
                out.append(f"expertd_pipeline_requests_total{_labels(pipeline=pipeline, outcome=code)} {count}")
    family("expertd_pipeline_duration_seconds", "histogram",
           "Time a worker spent on a pipeline request, from taking it to writing the reply, by pipeline.")
    for pipeline, (counters, seconds) in sorted(pipelines.items()):
        out.extend(_histogram("expertd_pipeline_duration_seconds", pipeline, BUCKETS, counters[_FIRST_BUCKET:_SUM],
                              seconds, sum(counters[_FIRST_BUCKET:_SUM]), label="pipeline"))

    batches = gauges.get("batches") or {}
    if batches:
        family("expertd_batch_size", "histogram", "Calls per batch handed to a worker, by batched expert.")
        for expert, figures in sorted(batches.items()):  # type: ignore[attr-defined]
            out.extend(_histogram("expertd_batch_size", expert, SIZE_BUCKETS, figures.size_counts,
                                  figures.calls, figures.batches))
        family("expertd_batch_queue_delay_seconds", "histogram",
               "Time a call of a batched expert waited in the queue before its batch went, by expert.")
        for expert, figures in sorted(batches.items()):  # type: ignore[attr-defined]
            out.extend(_histogram("expertd_batch_queue_delay_seconds", expert, DELAY_BUCKETS, figures.delay_counts,
                                  figures.delay_sum, figures.calls))
        family("expertd_batch_duration_seconds", "summary",
               "Time a batch took in its worker, from hand-over to its last member's report, by expert.")
        for expert, figures in sorted(batches.items()):  # type: ignore[attr-defined]
            out.append(f"expertd_batch_duration_seconds_sum{_labels(expert=expert)} {_number(figures.run_sum)}")
            out.append(f"expertd_batch_duration_seconds_count{_labels(expert=expert)} {figures.runs}")
    family("expertd_workers", "gauge", "Worker processes, by state.")
    for state, count in sorted(gauges["workers"].items()):  # type: ignore[attr-defined]
        out.append(f"expertd_workers{_labels(state=state)} {count}")
    family("expertd_workers_wanted", "gauge", "Workers the daemon keeps running (workers, TTIN/TTOU, expertctl).")
    out.append(f"expertd_workers_wanted {gauges['workers_wanted']}")
    family("expertd_memory_bytes", "gauge",
           "Memory of the master and of all workers together; pss counts shared pages once across the group.")
    for (process, kind), value in sorted(gauges["memory"].items()):  # type: ignore[attr-defined]
        out.append(f"expertd_memory_bytes{_labels(process=process, kind=kind)} {value}")
    family("expertd_connections", "gauge", "Client connections open.")
    out.append(f"expertd_connections {gauges['connections']}")
    family("expertd_queued_requests", "gauge", "Whole requests waiting for a free worker.")
    out.append(f"expertd_queued_requests {gauges['queued']}")
    family("expertd_generation", "gauge", "Worker generation; each reload (HUP) starts a new one.")
    out.append(f"expertd_generation {gauges['generation']}")
    family("expertd_uptime_seconds", "gauge", "Seconds since the master started.")
    out.append(f"expertd_uptime_seconds {_number(float(gauges['uptime']))}")  # type: ignore[arg-type]
    family("expertd_build_info", "gauge", "Always 1; the version is a label.")
    out.append(f"expertd_build_info{_labels(version=gauges['version'])} 1")
    return "\n".join(out) + "\n"
