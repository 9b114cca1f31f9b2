"""The timer that interrupts a pipeline's expert at its deadline: SIGALRM from one interval timer.

A stage of a pipeline (:mod:`expertd.worker_pipeline`) may run for its
longest expert's timeout, and each expert for its own.  Past it, SIGALRM
raises :class:`StageTimeout` in the expert's code.  The timer is armed once
for a plan and re-armed only when a deadline is earlier than the one it holds,
later by more than REARM_SLACK, or past (it went off while it meant nothing):
with timeouts alike, a stream of pipeline requests costs a system call every
REARM_SLACK of busy time, not two a request (which cost a cheap pipeline
about a fifth of its round trip).  SIGALRM means something only while
:func:`meaning` is on, so a late one is harmless there.

It is turned off (:func:`off`) before the worker runs anything else — a call,
a map, a batch — because Python installs the handler without SA_RESTART:
native code in a later call would see EINTR from a timer left running.

State owned here: when the timer goes off next (as last armed), and whether
SIGALRM now means a deadline.  One per process (a worker).
"""

from __future__ import annotations

import _signal
import signal
import time

# A deadline may come this much earlier than asked, to spare re-arming the timer.
REARM_SLACK = 0.01
ALARM_AT = [0.0]  # when the interval timer goes off next (time.monotonic()), as last armed; 0.0: off
MEANING = [False]  # whether SIGALRM now means a deadline (see _on_alarm)
_getsignal, _SIGALRM = _signal.getsignal, signal.SIGALRM  # (_signal's: signal's wraps the answer in an enum)
_setitimer, _ITIMER_REAL = signal.setitimer, signal.ITIMER_REAL
_monotonic = time.monotonic


class StageTimeout(BaseException):
    """Raised in an expert's code by SIGALRM at its deadline (a BaseException: ``except Exception`` in an
    expert must not swallow it)."""


def usable() -> bool:
    """Whether the timer may be used: the handler is installed now if SIGALRM is free.

    It is not when SIGALRM is taken: a worker whose master is gone arms its own (see expertd.worker).
    """
    if _getsignal(_SIGALRM) is _on_alarm:
        return True
    if signal.getsignal(signal.SIGALRM) not in (signal.SIG_DFL, None) or signal.getitimer(signal.ITIMER_REAL)[0]:
        return False
    signal.signal(signal.SIGALRM, _on_alarm)
    return True


def arm(until: float, now: float) -> None:
    """Have SIGALRM come at ``until`` (up to REARM_SLACK earlier), re-arming the timer only when it must."""
    at = ALARM_AT[0]
    if at > until or until - at > REARM_SLACK or at <= now:  # (the last: it went off while meaning nothing)
        _setitimer(_ITIMER_REAL, max(until - now, 1e-6))
        ALARM_AT[0] = until


def off() -> None:
    """No more SIGALRM (before anything but a pipeline runs)."""
    MEANING[0] = False
    if ALARM_AT[0]:
        _setitimer(_ITIMER_REAL, 0)
        ALARM_AT[0] = 0.0


def _on_alarm(signum: int, frame: object) -> None:
    if MEANING[0] and _monotonic() >= ALARM_AT[0] - REARM_SLACK:
        MEANING[0] = False
        raise StageTimeout


# The handler usable() installs: ``signal.getsignal(SIGALRM) is HANDLER`` is its first test, which a pipeline's
# hot path makes itself (expertd.worker_pipeline), as it makes arm's.
HANDLER = _on_alarm
