"""Gathering calls of batched experts into batches, in the master.

A batched expert (a model expert; a function declared
``@expert(batched=True)``) costs about as much for many inputs as for one, so
concurrent calls of it go to one worker together.  The dispatcher
(:mod:`expertd.dispatch`) asks this module, when it hands out a call of a
batched expert to an idle worker:

* **who comes along** (:meth:`Batcher.gather`): the other calls of the same
  expert waiting in the queue, oldest first, up to the expert's ``max_batch``,
  from any connection, msgpack and HTTP alike;
* **whether to wait for company** (:func:`hold_for_company`, a pure decision):
  the free worker waits, at most ``batch_delay`` and never longer than a batch
  of this expert typically takes to run, only while callers the daemon has
  just answered for this expert have not sent their next call yet.  So a
  lone caller never waits (the only caller it could wait for is itself), and
  under load the callers of one batch come back in time to share the next,
  instead of the batches alternating large and small.

Batches form only when calls queue: a call that finds an idle worker and
nothing else waiting goes at once (a batch of one is a plain hand-over).

State owned: each batched expert's limits (``max_batch``, ``batch_delay``,
read from the serving generation's expert descriptions), the callers answered
recently (whose next call is expected), when a free worker began waiting for
company, and the batch figures shown by status and /metrics (sizes, queueing
delay).
"""

from __future__ import annotations

from collections import OrderedDict, deque
from typing import Any

from expertd.connections import IDLE, QUEUED, Connection
from expertd.ipc import MAX_BATCH_FDS, MAX_INLINE
from expertd.metrics import DELAY_BUCKETS, SIZE_BUCKETS
from expertd.serving import Serving

_NEVER = float("inf")


def batch_target(waiting: int, expected: int, in_flight: int, workers: int, max_batch: int) -> int:
    """How many calls the next batch of an expert takes: its fair share of the expert's callers.

    The callers are those waiting, those expected back (just answered) and
    those in other workers' hands; a worker takes its share of them among the
    ``workers``, at most ``max_batch``.  Without a share, the split of closed-loop
    callers between workers never changes once made (each worker waits for
    the callers it answered), and a worker with 12 of 16 callers runs batches
    twice as long as one with 4.  With it, batches even out within a round.
    """
    share = -(-(waiting + expected + in_flight) // max(1, workers))  # (ceiling)
    return max(1, min(max_batch, share))


def hold_for_company(waiting: int, target: int, expected: int, held_for: float, batch_delay: float) -> bool:
    """Whether a free worker waits before taking the ``waiting`` calls of a batched expert.

    ``target``: the batch it would take (:func:`batch_target`); ``expected``:
    callers just answered for this expert who have not sent their next call
    yet; ``held_for``: how long a free worker has waited for them already.  It
    waits only for callers it expects, never past ``batch_delay``, and never
    once it has its batch.
    """
    return waiting < target and expected > 0 and held_for < batch_delay


class BatchFigures:
    """One expert's batch histograms (sizes, queueing delay) since start."""

    __slots__ = ("batches", "calls", "delay_counts", "delay_sum", "run_sum", "runs", "size_counts")

    def __init__(self) -> None:
        self.batches = 0
        self.calls = 0
        self.size_counts = [0] * (len(SIZE_BUCKETS) + 1)
        self.delay_counts = [0] * (len(DELAY_BUCKETS) + 1)
        self.delay_sum = 0.0
        self.runs = 0  # batches whose worker reported them done, and the seconds they took in all
        self.run_sum = 0.0

    def record(self, size: int, delays: list[float]) -> None:
        self.batches += 1
        self.calls += size
        self.size_counts[_bucket(SIZE_BUCKETS, size)] += 1
        for delay in delays:
            self.delay_counts[_bucket(DELAY_BUCKETS, delay)] += 1
            self.delay_sum += delay

    def summary(self) -> dict[str, Any]:
        """What ``expertctl status`` shows."""
        return {"batches": self.batches, "calls": self.calls,
                "mean_batch": round(self.calls / self.batches, 2) if self.batches else 0.0,
                "mean_queue_delay_ms": round(self.delay_sum / self.calls * 1000, 3) if self.calls else 0.0,
                # From hand-over to the last member's report: the batch's own time in the worker.
                "mean_batch_ms": round(self.run_sum / self.runs * 1000, 3) if self.runs else 0.0,
                "sizes": {str(bound): count for bound, count in zip(SIZE_BUCKETS, self.size_counts, strict=False)
                          if count}}


def _bucket(bounds: tuple, value: float) -> int:
    for index, bound in enumerate(bounds):
        if value <= bound:
            return index
    return len(bounds)


class Batcher:
    """Which queued calls go together, and whether a free worker waits for more."""

    def __init__(self, serving: Serving, typical: dict[str, float] | None = None) -> None:
        self.serving = serving
        # Expert -> typical duration of a hand-over (a batch, for a batched expert), kept by the dispatcher.
        self.typical: dict[str, float] = {} if typical is None else typical
        self._limits: dict[str, tuple[int, float]] = {}  # batched expert -> (max_batch, batch_delay)
        self._limits_for: object = None  # the expert descriptions they were read from
        # Connections answered by a batch, by when (oldest first): their callers' next calls are expected.
        self._answered: OrderedDict[Connection, tuple[str, float]] = OrderedDict()
        self._holding: dict[str, float] = {}  # expert -> since when a free worker waits for its company
        self._held: set[str] = set()  # experts held in the dispatcher's current hand-out
        self.next_wake = _NEVER  # when a wait for company ends (the loop's poll timeout)
        self.figures: dict[str, BatchFigures] = {}

    def batched(self) -> dict[str, tuple[int, float]]:
        """``{expert: (max_batch, batch_delay)}`` for the serving generation's batched experts (empty: none)."""
        experts = self.serving.experts
        if experts is not self._limits_for:  # a new generation: its descriptions say who batches
            self._limits = {name: (int(described["max_batch"]), float(described.get("batch_delay", 0.0)))
                            for name, described in experts.items()
                            if described.get("batched") and int(described.get("max_batch", 1)) > 1}
            self._limits_for = experts
        return self._limits

    def gather(self, lead: Connection, queue: deque[Connection], max_batch: int) -> list[Connection]:
        """``lead`` and the calls of its expert queued behind it, oldest first, up to ``max_batch``.

        Only calls whose request is whole in the socket, or small enough to
        travel inside the batch's message, come along; the states are not
        changed here (the dispatcher does, once the batch is handed over).
        """
        members = [lead]
        expert = lead.expert
        room = MAX_INLINE - (len(lead.inbuf) if lead.inbuf is not None else 0)
        if room < 0:
            return members  # (too large to travel inside a batch: it goes alone, in a memfd)
        limit = min(max_batch, MAX_BATCH_FDS)
        for conn in queue:
            if len(members) >= limit:
                break
            if conn.state != QUEUED or conn.expert != expert or conn is lead or conn.whole_batch:
                continue
            if conn.inbuf is not None:
                if len(conn.inbuf) > room:
                    continue
                room -= len(conn.inbuf)
            members.append(conn)
        return members

    def take(self, expert: str, waiting: int, in_flight: int, workers: int, max_batch: int, batch_delay: float,
             now: float) -> int:
        """How many of the ``waiting`` calls of ``expert`` a free worker takes now; 0: it waits for company.

        ``in_flight``: calls of ``expert`` in other workers' hands; ``workers``: those serving.
        """
        since = self._holding.setdefault(expert, now)
        # Never longer than a batch of this expert takes to run: waiting W to save another run of T pays only
        # while W < T, so an expert that answers in microseconds never waits milliseconds for company.
        batch_delay = min(batch_delay, self.typical.get(expert, batch_delay))
        expected = self._expected(expert, now, batch_delay)
        target = batch_target(waiting, expected, in_flight, workers, max_batch)
        if hold_for_company(waiting, target, expected, now - since, batch_delay):
            self._held.add(expert)
            return 0
        del self._holding[expert]
        return min(waiting, target)

    def end_pass(self, now: float) -> None:
        """The dispatcher's hand-out is over: forget waits no call is held for, and say when the rest end."""
        holding, held = self._holding, self._held
        for expert in [expert for expert in holding if expert not in held]:
            del holding[expert]  # (its calls went, or went away)
        self.next_wake = min((holding[expert] + min(self._limits[expert][1], self.typical.get(expert, _NEVER))
                              for expert in holding if expert in self._limits), default=_NEVER)
        held.clear()

    def handed_out(self, expert: str, members: list[Connection], now: float) -> None:
        """A batch left for a worker: record its figures."""
        self._holding.pop(expert, None)
        figures = self.figures.get(expert)
        if figures is None:
            figures = self.figures[expert] = BatchFigures()
        figures.record(len(members), [now - conn.queued_at for conn in members])

    def ran(self, expert: str, seconds: float) -> None:
        """A batch (or a call of a batched expert alone) of ``expert`` took ``seconds`` in its worker."""
        figures = self.figures.get(expert)
        if figures is not None:
            figures.runs += 1
            figures.run_sum += seconds

    def answered(self, conn: Connection, expert: str, now: float) -> None:
        """``conn``'s call of ``expert`` was answered in a batch: its caller's next call is expected."""
        self._answered.pop(conn, None)
        self._answered[conn] = (expert, now)

    def _expected(self, expert: str, now: float, batch_delay: float) -> int:
        """Callers of ``expert`` answered within ``batch_delay`` whose next call has not arrived."""
        answered = self._answered
        # (Oldest first: drop those too old for any batched expert to wait for, whatever their expert.)
        horizon = max((delay for _max_batch, delay in self._limits.values()), default=0.0)
        while answered:
            conn, (_name, at) = next(iter(answered.items()))
            if now - at <= horizon and conn.state == IDLE:
                break
            answered.popitem(last=False)
        return sum(1 for conn, (name, at) in answered.items()
                   if name == expert and now - at <= batch_delay and conn.state == IDLE)

