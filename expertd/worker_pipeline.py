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

import logging
import signal
import socket
import time
from typing import Any

from expertd import ipc, protocol
from expertd.config import Config
from expertd.errors import BadRequest, ConnectionLost, ProtocolError, RemoteError, RequestTimeout

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
_SKIPPED = "skipped"


class _StageTimeout(BaseException):
    """Raised in an expert's code by SIGALRM at its stage's deadline (a BaseException: ``except Exception``
    in an expert must not swallow it)."""


class PipelineServing:
    """Running pipelines (a mixin of :class:`expertd.worker.Worker`, whose ``__init__`` sets these)."""

    config: Config
    channel: socket.socket
    _interrupted: str | None

    def _run_pipeline(self, target: str, document: dict, options: dict,
                      started: float) -> tuple[Any, str]:
        """Run ``target``'s plan on ``document``: (the reply's value, its outcome for the metrics).

        The reply is the document with its opinions and errors (a helper's: only
        those of its experts).  The outcome is ``ok``, ``expert_errors`` or
        ``timeout``.
        Request-level problems (unknown names, a bad target, bad options) raise RemoteError.
        """
        plan = self.config.plan(target)
        on_error = options.get("on_error", plan.on_error)
        if on_error not in ("continue", "stop"):
            raise BadRequest(f"option on_error must be 'continue' or 'stop', not {on_error!r}", expert=target)
        helper = options.get("helper") is True
        opinions = document.setdefault("opinions", {})
        errors = document.get("errors")
        came_with_errors = bool(errors)
        outcome = "ok"
        stop: str | None = None  # why the stages left are not run
        deadline = started + plan.timeout - min(PIPELINE_GRACE, plan.timeout / 10)
        for index, stage in enumerate(plan.stages):
            if stop is not None:
                results: dict[str, Any] = {name: _skipped(name, stop) for name in stage}
            else:
                results = self._run_stage(stage, document, min(deadline, time.monotonic() + self._stage_limit(stage)),
                                          fan_out=not helper and len(stage) > 1)
            # Written after the stage: each expert of a stage saw the document as it was before it.  Into new
            # dicts (shallow copies), so that a result holding what its expert was given (an expert returning
            # its input) keeps the document as it was, instead of a reference cycle that cannot be sent.
            document = {**document, "opinions": {**opinions}}
            opinions = document["opinions"]
            if errors is not None:
                errors = document["errors"] = {**errors}
            for name in stage:
                result = results[name]
                if isinstance(result, RemoteError):
                    if result.code == "timeout":
                        outcome = "timeout"
                        stop = stop or f"stage {index + 1} ran past its timeout"
                    elif result.code != _SKIPPED:
                        outcome = outcome if outcome == "timeout" else "expert_errors"
                        if on_error == "stop":
                            stop = stop or f"{name} (stage {index + 1}) failed, and on_error = stop"
                    opinions.pop(name, None)  # (an opinion the document came with is not this run's)
                    if errors is None:
                        errors = document["errors"] = {}
                    errors[name] = _error_entry(result)
                else:
                    opinions[name] = result
                    if errors:
                        errors.pop(name, None)  # (nor is an error it came with)
        if helper:
            asked = {name for stage in plan.stages for name in stage}
            reply: dict[str, Any] = {"opinions": {k: v for k, v in opinions.items() if k in asked}}
            if errors:
                reply["errors"] = {k: v for k, v in errors.items() if k in asked}
            return reply, outcome
        if came_with_errors and not errors:
            del document["errors"]  # (it held only errors of experts that have now answered)
        return document, outcome

    def _stage_limit(self, stage: tuple[str, ...]) -> float:
        return max(self.config.expert_timeout(name) for name in stage)

    # ------------------------------------------------------------- a stage
    def _run_stage(self, stage: tuple[str, ...], document: dict, deadline: float,
                   fan_out: bool) -> dict[str, Any]:
        """Each expert of ``stage`` on ``document``: its result or RemoteError, by name."""
        results: dict[str, Any] = {}
        helpers: list[tuple[tuple[str, ...], socket.socket]] = []
        mine = stage
        if fan_out and self.config.workers > 1:
            theirs, mine = fan_out_split(stage, self._typical_durations())
            for group in theirs:
                sock = self._ask_for_help(group, document)
                if sock is None:
                    mine += group
                else:
                    helpers.append((group, sock))
        timed_out = False
        for name in mine:
            if timed_out:
                results[name] = _skipped(name, "its stage ran past its timeout")
                continue
            results[name] = self._call_in_time(name, document, deadline)
            timed_out = results[name].__class__ is RequestTimeout
        for group, sock in helpers:
            try:
                answered = self._helper_answer(group, sock, deadline)
            finally:
                sock.close()
            if answered is None:  # declined, or the helper was lost: run them here (experts are pure)
                for name in group:
                    if timed_out:
                        results[name] = _skipped(name, "its stage ran past its timeout")
                        continue
                    results[name] = self._call_in_time(name, document, deadline)
                    timed_out = results[name].__class__ is RequestTimeout
            else:
                results.update(answered)
        return results

    def _call_in_time(self, name: str, document: dict, deadline: float) -> Any:
        """Expert ``name`` on ``document``, interrupted at ``deadline``: its result, or RemoteError."""
        started = time.monotonic()
        limit = deadline - started
        if limit <= 0:
            return _stage_timeout(name)
        armed = signal.getsignal(signal.SIGALRM) is _alarm or _arm_alarm_handler()
        if armed:
            signal.setitimer(signal.ITIMER_REAL, limit)
        try:
            try:
                result = self._invoke(name, [document], {})  # type: ignore[attr-defined]
            finally:
                if armed:
                    signal.setitimer(signal.ITIMER_REAL, 0)
        except _StageTimeout:
            result = _stage_timeout(name)
        except RemoteError as exc:
            result = exc
        if result.__class__ is RequestTimeout or (
                isinstance(result, RemoteError) and "_StageTimeout" in (result.remote_type or "")):
            # (An expert that caught the interruption and raised something else was interrupted all the same.)
            self._interrupted = f"a pipeline stage was interrupted at its timeout ({name})"
            return _stage_timeout(name)
        elapsed = time.monotonic() - started
        typical = self._typical_durations()
        previous = typical.get(name)
        typical[name] = elapsed if previous is None else previous + (elapsed - previous) * _TYPICAL_WEIGHT
        return result

    def _typical_durations(self) -> dict[str, float]:
        typical: dict[str, float] | None = getattr(self, "_typical", None)
        if typical is None:
            typical = self._typical = {}  # type: ignore[misc]
        return typical

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

    def _helper_answer(self, group: tuple[str, ...], sock: socket.socket,
                       deadline: float) -> dict[str, Any] | None:
        """What the helper answered for ``group``; None when it did not (declined, lost): run them here."""
        try:
            kind, _request_id, body = protocol.read_frame(sock, protocol.MAX_BODY, deadline)
        except (ConnectionLost, ProtocolError, OSError):
            return None
        except RequestTimeout:
            return {name: _stage_timeout(name) for name in group}
        try:
            value = protocol.unpack(body)
        except (ValueError, TypeError):
            return None
        if kind == protocol.ERROR:
            code = value.get("code") if isinstance(value, dict) else None
            if code == "timeout":
                return {name: _stage_timeout(name) for name in group}
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
    slow = sorted((name for name in stage if typical.get(name, 0.0) >= over), key=lambda n: -typical[n])
    if len(slow) < 2:
        return [], stage
    offered = slow[1:]
    return [(name,) for name in offered], tuple(name for name in stage if name not in offered)


def _alarm(signum: int, frame: object) -> None:
    raise _StageTimeout


def _arm_alarm_handler() -> bool:
    """Install the stage-timeout handler, unless SIGALRM is taken (the master is gone: see Worker)."""
    if signal.getsignal(signal.SIGALRM) not in (signal.SIG_DFL, None):
        return False
    if signal.getitimer(signal.ITIMER_REAL)[0]:
        return False  # (a timer is running: the worker's own, for a master that is gone)
    signal.signal(signal.SIGALRM, _alarm)
    return True


def _stage_timeout(name: str) -> RequestTimeout:
    return RequestTimeout(f"{name} ran past its stage's timeout; the stages after it were not run", expert=name)


def _skipped(name: str, why: str) -> RemoteError:
    error = RemoteError(f"not run: {why}", expert=name)
    error.code = _SKIPPED
    return error


def _error_entry(error: RemoteError) -> dict[str, Any]:
    """What ``errors.NAME`` holds for a failed expert: its code, exception type and message."""
    return {"code": error.code, "type": error.remote_type, "message": error.message}


def _error_from_entry(name: str, entry: dict) -> RemoteError:
    error = RemoteError(str(entry.get("message", "")), remote_type=entry.get("type"), expert=name)
    error.code = str(entry.get("code", "error"))
    return error

