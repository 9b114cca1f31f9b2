"""Running a pipeline in a worker: one document through experts in stages, in one request.

:class:`PipelineServing` is mixed into :class:`expertd.worker.Worker`.  The
worker that receives a PIPELINE request (or ``POST /pipeline/NAME``,
``POST /opinion/a,b``) runs its plan (:mod:`expertd.pipelines`): stages in
order, each expert called with the document as it was before its stage, its
result put under ``opinions.NAME`` once the stage is over, its failure under
``errors.NAME``.  Every expert of the plan ends up under one or the other: an
expert not run (an earlier failure with ``on_error = stop``, or a stage past
its timeout) is ``errors.NAME.code == "skipped"``.

**Stage timeouts.**  A stage may run for its longest expert's timeout (and the
whole plan for the plan's timeout).  Past it, SIGALRM interrupts the expert
in hand; it is marked ``timeout``, the rest ``skipped``, and the document goes
back with what was done.  The worker then retires: code interrupted at an
arbitrary point is not trusted to serve again (the master forks a fresh one).
The master still holds a deadline a little later, for an expert stuck where a
signal cannot reach it (then the caller gets the plain ``timeout`` error).

**Fan-out.**  A stage of several experts that take long enough to pay for it
(as this worker has measured them) may be shared with *idle* workers: the
worker writes a PIPELINE request for one expert into a socket pair, hands one
end to the master (ipc HELP), runs its own share, and then reads the helper's
answer.  The master serves it only if a worker is idle at that moment and no
request waits; otherwise it closes it, and the worker runs that expert
itself, as it does after any failure of the helper path (experts are pure).
Nothing waits for a worker that is busy, so every worker fanning out at once
cannot deadlock.  A helper's request says so (option ``helper``): it is never
fanned out again, and its reply carries only its experts' opinions and errors.

State owned here: each expert's typical duration in this worker (for the
fan-out decision) and whether a stage was interrupted (then the worker
retires).
"""

from __future__ import annotations

import _signal
import logging
import signal
import socket
import time
from collections.abc import Callable
from typing import Any, NamedTuple

from expertd import ipc, protocol, stage_timer
from expertd.calls import _failure, _pack_result
from expertd.config import MAX_PLANS, Config
from expertd.errors import BadRequest, BadResult, ConnectionLost, ProtocolError, RemoteError, RequestTimeout
from expertd.loader import LoadedExpert
from expertd.metrics import Recorder
from expertd.pipelines import Plan
from expertd.scoreboard import SlotWriter, board_name
from expertd.stage_timer import StageTimeout

log = logging.getLogger("expertd.worker")

# A stage's expert is given to another worker only when this worker has seen it take at least this long:
# below it, the hand-over (a socket pair, the master's hop, the document encoded and decoded once more)
# costs more than the parallelism saves.
FAN_OUT_OVER = 0.002
# The worker answers a plan this much before the master's deadline (the plan's timeout), at most a tenth
# of it: the master then kills a worker stuck where SIGALRM cannot reach it.
PIPELINE_GRACE = 0.5
_TYPICAL_WEIGHT = 0.25  # how fast the typical duration follows new measurements (an EWMA)
_HELPER_OPTIONS = {"helper": True}
_monotonic = time.monotonic
_pack, _MAX_BODY = protocol.pack, protocol.MAX_BODY
_SCALARS = frozenset((str, int, float, bool, type(None)))  # results that cannot hold the document
_SKIPPED = "skipped"
_getsignal, _SIGALRM = _signal.getsignal, signal.SIGALRM  # (_signal's: signal's wraps the answer in an enum)
_ON_ALARM, _REARM_SLACK = stage_timer.HANDLER, stage_timer.REARM_SLACK


class PlainExpert(NamedTuple):
    """An expert a stage calls directly: a function that takes the document (not batched)."""

    name: str
    function: Callable[[Any], Any]
    board_name: bytes  # its name as the scoreboard holds it (see SlotWriter.running)
    loaded: LoadedExpert


def plain_experts(experts: dict[str, LoadedExpert]) -> dict[str, PlainExpert]:
    """The experts a pipeline's stage may call directly, by name (a worker's, made once)."""
    return {name: PlainExpert(name, expert.function, board_name(name), expert)
            for name, expert in experts.items() if not expert.batched}


class Step(NamedTuple):
    """One stage of a plan as a worker runs it (see :func:`steps_of`)."""

    stage: tuple[str, ...]
    # The stage's one expert when it is called directly (the usual stage), else None; its function and its
    # name as the scoreboard holds it (see SlotWriter.running).
    name: str | None
    function: Callable[[Any], Any] | None
    board_name: bytes
    limit: float  # what the stage may take: its longest expert's timeout
    more: bool  # stages follow it (a timeout's message says so)


# A step as the stage loop unpacks it: its index, then Step's fields (a plain tuple: a NamedTuple unpacks slower).
Run = tuple[int, tuple[str, ...], "str | None", "Callable[[Any], Any] | None", bytes, float, bool]


def steps_of(plan: Plan, plain: dict[str, PlainExpert]) -> tuple[Step, ...]:
    """``plan``'s stages as a worker runs them, everything a stage needs found once per plan, not per request."""
    steps = []
    for index, (stage, limit) in enumerate(zip(plan.stages, plan.limits, strict=True)):
        expert = plain.get(stage[0]) if len(stage) == 1 else None
        more = index < len(plan.stages) - 1
        if expert is None:
            steps.append(Step(stage, None, None, b"", limit, more))
        else:
            steps.append(Step(stage, expert.name, expert.function, expert.board_name, limit, more))
    return tuple(steps)


class PipelineServing:
    """Running pipelines (a mixin of :class:`expertd.worker.Worker`, whose ``__init__`` sets these)."""

    config: Config
    experts: dict[str, LoadedExpert]
    channel: socket.socket
    _interrupted: str | None  # why this worker must retire (a stage was interrupted), set here
    _typical: dict[str, float]  # expert -> its typical duration here (see _call), set here
    recorder: Recorder
    _ran: list[tuple[str, str, float]]  # the experts the request in hand ran: (name, outcome, seconds), set here
    _timeouts: dict[str, float]  # each expert's own timeout
    _plain: dict[str, PlainExpert]  # the experts a stage calls directly (see plain_experts)
    _running_field: tuple  # self.board.running_field(), found once
    _plans: dict[str, tuple[Plan, tuple[Run, ...], float]]  # target -> its plan, steps, seconds (see _steps), set here
    board: SlotWriter

    def _steps(self, target: str) -> tuple[Plan, tuple[Run, ...], float]:
        """``target``'s plan, steps and time given, made once per target (raises as Config.plan does)."""
        entry = self._plans.get(target)
        if entry is None:
            plan = self.config.plan(target)
            if len(self._plans) >= MAX_PLANS:
                self._plans.clear()  # (clients choose the targets: bounded whatever they send)
            runs = tuple((index, *step) for index, step in enumerate(steps_of(plan, self._plain)))
            entry = self._plans[target] = (plan, runs, plan.timeout - min(PIPELINE_GRACE, plan.timeout / 10))
        return entry

    def _run_pipeline(self, target: str, document: dict, options: dict,
                      started: float) -> tuple[Any, str]:
        """Run ``target``'s plan on ``document``: (the reply's value, its outcome for the metrics).

        The reply is the document with its opinions and errors (a helper's: only
        those of its experts).  The outcome is ``ok``, ``expert_errors`` or
        ``timeout``.
        Request-level problems (unknown names, a bad target, bad options) raise RemoteError.
        """
        entry = self._plans.get(target)  # (_steps, inlined: it is almost always there)
        plan, steps, budget = entry if entry is not None else self._steps(target)
        on_error, helper = _options(options, plan.on_error, target) if options else (plan.on_error, False)
        opinions = document.setdefault("opinions", {})
        errors = document.get("errors")
        came_with_errors = bool(errors)
        ran = self._ran  # (each expert run counts as a call of it: see _count_pipeline)
        # Where SlotWriter.running writes, written here: a method call per stage costs more than the write.
        board, expert_field = self._running_field
        found: dict[str, Any] = {}  # expert -> its result or RemoteError, for the stages not written at once
        outcome = "ok"
        stop: str | None = None  # why the stages left are not run
        deadline = started + budget
        # (The deadlines: see expertd.stage_timer.  Its first test, inlined: the handler is installed.)
        timed = _getsignal(_SIGALRM) is _ON_ALARM or stage_timer.usable()
        arm, meaning, alarm_at = stage_timer.arm, stage_timer.MEANING, stage_timer.ALARM_AT
        index = 0  # the stage in hand (the ones before it are written)
        now = _monotonic()  # (a stage begins when the one before it ended)
        try:
            for index, stage, name, function, board_name, limit, more in steps:
                if stop is not None:
                    for name in stage:
                        _write(document, name, _skipped(name, stop))
                    continue
                until = now + limit
                if until > deadline:
                    until = deadline
                if timed:
                    # stage_timer.arm's own test, inlined (a call per stage costs more than it): with stages'
                    # limits alike, the timer armed for the first stage serves the next ones too.
                    at = alarm_at[0]
                    if at > until or until - at > _REARM_SLACK or at <= now:
                        arm(until, now)
                    meaning[0] = True  # (after arming: a SIGALRM still due from an earlier deadline means nothing)
                if function is not None:  # (the usual stage: one expert, called here)
                    board[expert_field] = board_name  # (SlotWriter.running: a crash now is charged to it)
                    try:
                        result = function(document)
                    except BaseException as exc:  # (its failure is its entry in errors, never a dead worker)
                        result = self._failed(self._plain[name], document, exc, more)  # type: ignore[index]
                    ended = _monotonic()
                    if result.__class__ in _SCALARS:  # (the usual opinion: it cannot hold the document, written now)
                        ran.append((name, "ok", ended - now))
                        opinions[name] = result
                        if errors:
                            errors.pop(name, None)  # (an error the document came with is not this run's)
                        now = ended
                        continue
                    # Anything else is written into a copy below: a result holding what its expert was given
                    # (an expert returning its input) keeps the document as it was, not a cycle that cannot be sent.
                    failed = isinstance(result, RemoteError)
                    ran.append((name, result.code if failed else "ok", ended - now))  # type: ignore[arg-type]
                    results = {name: result}
                elif len(stage) == 1:  # (a batched expert: a batch of one)
                    results = {stage[0]: self._call(stage[0], document, until, timed, more)}
                else:
                    results = self._run_stage(stage, document, until, fan_out=not helper, timed=timed, more=more)
                found.update(results)
                # Written after the stage: each expert of a stage saw the document as it was before it.
                document, opinions, errors = _fresh(document)
                for name in stage:
                    result = results[name]
                    _write(document, name, result)
                    if not isinstance(result, RemoteError):  # (RequestTimeout is one too)
                        continue
                    if result.code == "timeout":
                        outcome = "timeout"
                        stop = stop or f"stage {index + 1} ran past its timeout"
                    elif result.code != _SKIPPED:
                        outcome = outcome if outcome == "timeout" else "expert_errors"
                        if on_error == "stop":
                            stop = stop or f"{name} (stage {index + 1}) failed, and on_error = stop"
                    errors = document.get("errors")
                now = _monotonic()
        except StageTimeout:  # (past the deadline in this module's own code, which may go on: no retiring)
            outcome, late = "timeout", None
            for step in steps[index:]:  # (those before it are written)
                for name in step[1]:
                    if name not in found:
                        found[name] = late = _stage_timeout(name, True) if late is None else _skipped(
                            name, "a stage ran past its timeout")
                    _write(document, name, found[name])
        finally:
            try:
                meaning[0] = False  # (the handler raises only while this is set; the timer runs on)
            except StageTimeout:
                pass
        errors = document.get("errors")
        if helper:  # (only its experts': the asker has the rest)
            mine = {name for stage in plan.stages for name in stage}
            reply: dict[str, Any] = {"opinions": {k: v for k, v in document["opinions"].items() if k in mine}}
            if errors:
                reply["errors"] = {k: v for k, v in errors.items() if k in mine}
            return reply, outcome
        if came_with_errors and not errors:
            del document["errors"]  # (it held only errors of experts that have now answered)
        return document, outcome

    # ------------------------------------------------------------- a stage
    def _run_stage(self, stage: tuple[str, ...], document: dict, deadline: float, fan_out: bool,
                   timed: bool, more: bool) -> dict[str, Any]:
        """Each expert of a stage of several on ``document``: its result or RemoteError, by name.

        ``more``: stages follow this one (what a timeout's message says).
        """
        results: dict[str, Any] = {}
        helpers: list[tuple[tuple[str, ...], socket.socket]] = []
        mine = stage
        late: str | None = None  # why the experts left are not run
        try:
            if fan_out and self.config.workers > 1:
                theirs, mine = fan_out_split(stage, self._typical)
                for group in theirs:
                    sock = self._ask_for_help(group, document)
                    if sock is None:
                        mine += group
                    else:
                        helpers.append((group, sock))
            for name in mine:
                results[name] = _skipped(name, late) if late else self._call(name, document, deadline, timed, more)
                if late is None and results[name].__class__ is RequestTimeout:
                    late = f"{name} ran past its timeout"
            for group, sock in helpers:
                stage_timer.MEANING[0] = False  # (the wait has a deadline of its own: SIGALRM must not cut it)
                answered = self._helper_answer(group, sock, deadline, more)
                if answered is None:  # declined, or the helper was lost: run them here (experts are pure)
                    for name in group:
                        results[name] = _skipped(name, late) if late else self._call(name, document, deadline, timed,
                                                                                     more)
                        if late is None and results[name].__class__ is RequestTimeout:
                            late = f"{name} ran past its timeout"
                else:
                    results.update(answered)
        except StageTimeout:  # (past the stage's deadline in this module's own code: what was done stays)
            for name in stage:
                if name not in results:
                    results[name] = _stage_timeout(name, more) if late is None else _skipped(name, late)
                    late = late or f"{name} ran past its stage's timeout"
        finally:
            for _group, sock in helpers:
                sock.close()
        return results

    def _call(self, name: str, document: dict, deadline: float, timed: bool, more: bool) -> Any:
        """Expert ``name`` of a stage of several, interrupted at its own timeout or the stage's ``deadline``.

        Its result, or RemoteError.  Its duration is kept (the fan-out of stages decides by it).
        """
        started = _monotonic()
        if timed:  # (its own timeout may be shorter than its stage's, or the one before it's was)
            own = started + self._timeouts.get(name, deadline - started)
            stage_timer.arm(own if own < deadline else deadline, started)
            stage_timer.MEANING[0] = True
        result = self._run_expert(name, document, more) if name in self._plain else self._invoke_in_stage(
            name, document, more)
        elapsed = _monotonic() - started
        self._ran.append((name, result.code if isinstance(result, RemoteError) else "ok", elapsed))  # type: ignore
        typical = self._typical
        previous = typical.get(name)
        typical[name] = elapsed if previous is None else previous + (elapsed - previous) * _TYPICAL_WEIGHT
        return result

    def _run_expert(self, name: str, document: dict, more: bool) -> Any:
        """Expert ``name`` (a plain function: see _plain) on ``document``: its result, or RemoteError."""
        expert = self._plain[name]
        self.board.running(expert.board_name)  # (a crash now is charged to it, not to the pipeline)
        try:
            return expert.function(document)
        except BaseException as exc:  # an expert's failure is its entry in errors, never a dead worker
            return self._failed(expert, document, exc, more)

    def _failed(self, expert: PlainExpert, document: dict, exc: BaseException, more: bool) -> RemoteError:
        """What ``expert`` raising ``exc`` on ``document`` leaves under errors.NAME (interrupted: a timeout)."""
        if isinstance(exc, StageTimeout):
            return self._timed_out(expert.name, more)
        failure = _failure(expert.loaded, [document], {}, exc)
        # (An expert that caught the interruption and raised something else was interrupted all the same.)
        return self._timed_out(expert.name, more) if "StageTimeout" in (failure.remote_type or "") else failure

    def _invoke_in_stage(self, name: str, document: dict, more: bool) -> Any:
        """Expert ``name`` (batched: a batch of one) on ``document``: its result, or RemoteError."""
        self.board.running(board_name(name))
        try:
            return self._invoke(name, [document], {})  # type: ignore[attr-defined]
        except StageTimeout:
            return self._timed_out(name, more)
        except RemoteError as exc:
            return self._timed_out(name, more) if "StageTimeout" in (exc.remote_type or "") else exc

    def _count_pipeline(self, label: str | None, outcome: str, seconds: float) -> None:
        """Count a pipeline request (``label``: None for a helper's) and each expert it ran, as a call of it."""
        self.recorder.record_run(self._ran, label, outcome, seconds)
        self._ran.clear()

    def _pack_pipeline_reply(self, target: str, value: dict, outcome: str) -> tuple[bytes, str]:
        """The reply's body, and the outcome: an opinion that cannot be sent becomes its expert's ``bad_result``
        error alone (found only when the whole does not pack), not the request's."""
        try:  # (_pack_result's work, inlined: it is done on every pipeline request, its failures seldom)
            body = _pack(value)
            if len(body) <= _MAX_BODY:
                return body, outcome
        except BaseException:  # (_pack_result's catch: it tells what failed, below)
            pass
        opinions, culprits = value.get("opinions", {}), False
        for name in list(opinions):
            try:
                _pack_result(name, opinions[name])
            except BadResult as exc:
                culprits = True
                del opinions[name]
                value.setdefault("errors", {})[name] = _error_entry(exc)
        if culprits and outcome == "ok":
            outcome = "expert_errors"
        return _pack_result(target, value), outcome  # (still too large, say: the request's error)

    def _timed_out(self, name: str, more: bool) -> RequestTimeout:
        """Expert ``name`` was interrupted at its deadline: this worker retires after the reply."""
        self._interrupted = f"a pipeline's expert was interrupted at its timeout ({name})"
        return _stage_timeout(name, more)

    # ------------------------------------------------------------- fan-out
    def _ask_for_help(self, group: tuple[str, ...], document: dict) -> socket.socket | None:
        """Offer ``group``'s experts to an idle worker; the socket to read its answer from, or None."""
        try:
            frame = protocol.encode_pipeline(1, "+".join(group), document, _HELPER_OPTIONS)
        except (TypeError, ValueError):
            return None
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            # The whole request must be in the socket before the master looks at it (it never waits for the
            # rest of a helper's request): a document too large for the socket's buffer is run here.
            try:
                sent = mine.send(frame, socket.MSG_DONTWAIT)
            except BlockingIOError:
                sent = 0
            if sent != len(frame):
                mine.close()
                return None
            ipc.send_help(self.channel, theirs.fileno())
        except OSError:
            mine.close()
            return None
        finally:
            theirs.close()
        return mine

    def _helper_answer(self, group: tuple[str, ...], sock: socket.socket, deadline: float,
                       more: bool) -> dict[str, Any] | None:
        """What the helper answered for ``group``; None when it did not (declined, lost): run them here."""
        try:
            kind, _request_id, body = protocol.read_frame(sock, protocol.MAX_BODY, deadline)
        except RequestTimeout:  # (first: it is an OSError too)
            return {name: _stage_timeout(name, more) for name in group}
        except (ConnectionLost, ProtocolError, OSError):
            return None
        try:
            value = protocol.unpack(body)
        except (ValueError, TypeError):
            return None
        if kind == protocol.ERROR:
            code = value.get("code") if isinstance(value, dict) else None
            if code == "timeout":
                return {name: _stage_timeout(name, more) for name in group}
            return None  # (worker_lost, shutting_down, overloaded...: not the experts' doing)
        opinions = value.get("opinions", {}) if isinstance(value, dict) else {}
        errors = value.get("errors", {}) if isinstance(value, dict) else {}
        answered: dict[str, Any] = {}
        for name in group:
            if name in opinions:
                answered[name] = opinions[name]
            elif isinstance(errors.get(name), dict):
                answered[name] = _error_from_entry(name, errors[name])
            else:
                return None
        return answered


def fan_out_split(stage: tuple[str, ...], typical: dict[str, float],
                  over: float = FAN_OUT_OVER) -> tuple[list[tuple[str, ...]], tuple[str, ...]]:
    """Which experts of ``stage`` to offer other workers (one each), and which to run here.

    Only experts measured at ``over`` seconds or more are offered; the longest of
    them stays here (this worker would otherwise only wait), as do the cheap
    ones and those never measured.
    """
    slow = [name for name in stage if typical.get(name, 0.0) >= over]
    if len(slow) < 2:
        return [], stage
    offered = sorted(slow, key=lambda n: -typical[n])[1:]
    return [(name,) for name in offered], tuple(name for name in stage if name not in offered)


def _fresh(document: dict) -> tuple[dict, dict, dict | None]:
    """A shallow copy of ``document`` with its own opinions (and errors) maps: (copy, opinions, errors)."""
    copy = {**document, "opinions": {**document["opinions"]}}
    errors = document.get("errors")
    if errors is not None:
        errors = copy["errors"] = {**errors}
    return copy, copy["opinions"], errors


def _options(options: dict, on_error: str, target: str) -> tuple[str, bool]:
    """A request's options: (on_error, whether it is a helper's)."""
    on_error = options.get("on_error", on_error)
    if on_error not in ("continue", "stop"):
        raise BadRequest(f"option on_error must be 'continue' or 'stop', not {on_error!r}", expert=target)
    return on_error, options.get("helper") is True


def _write(document: dict, name: str, result: Any) -> None:
    """Put an expert's result under opinions.NAME, or its failure under errors.NAME (dropping the other)."""
    errors = document.get("errors")
    if isinstance(result, RemoteError):
        document["opinions"].pop(name, None)  # (an opinion the document came with is not this run's)
        if errors is None:
            errors = document["errors"] = {}
        errors[name] = _error_entry(result)
    else:
        document["opinions"][name] = result
        if errors:
            errors.pop(name, None)  # (nor is an error it came with)


def _stage_timeout(name: str, more: bool) -> RequestTimeout:
    after = "; the stages after it were not run" if more else ""
    return RequestTimeout(f"{name} ran past its timeout{after}", expert=name)


def _skipped(name: str, why: str) -> RemoteError:
    error = RemoteError(f"not run: {why}", expert=name)
    error.code, error.remote_type = _SKIPPED, None  # type: ignore[assignment]  (no exception was raised)
    return error


def _error_entry(error: RemoteError) -> dict[str, Any]:
    """What ``errors.NAME`` holds for a failed expert: its code, exception type and message."""
    return {"code": error.code, "type": error.remote_type, "message": error.message}


def _error_from_entry(name: str, entry: dict) -> RemoteError:
    error = RemoteError(str(entry.get("message", "")), remote_type=entry.get("type"), expert=name)
    error.code = str(entry.get("code", "error"))
    return error

