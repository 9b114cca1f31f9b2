"""Experts used by the test-suite: each one exercises a path through the daemon."""

import functools
import os
import signal
import time

from expertd import expert

BOOTED_IN = {"master": None, "worker": None}


def echo(*args, **kwargs):
    """Return the arguments as received."""
    return {"args": list(args), "kwargs": kwargs}


def add(a, b=0):
    """a + b."""
    return a + b


def boom(message="kaboom"):
    """Raise ValueError(message)."""
    raise ValueError(message)


def type_error(text):
    """Raise TypeError from inside the expert (a failure, not a misfit of arguments)."""
    return len(text) + "one"


def _logged(function):
    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        return function(*args, **kwargs)

    return wrapper


@_logged
def wrapped(text, times=1):
    """A decorated expert: its arguments are checked against the signature under the wrapper."""
    return text * times


def deep(levels=100_000):
    """A result nested deeper than any encoder goes."""
    value = []
    for _ in range(levels):
        value = [value]
    return value


def slow(seconds):
    """Sleep, then return the worker's pid."""
    time.sleep(seconds)
    return os.getpid()


def pid():
    """The pid of the worker serving the call."""
    return os.getpid()


def kill_worker():
    """Kill the worker serving the call, mid-request."""
    os.kill(os.getpid(), signal.SIGKILL)


def exit_worker():
    """Call sys.exit() inside an expert (must not kill the worker)."""
    raise SystemExit(7)


def unsendable():
    """Return something msgpack cannot carry."""
    return object()


def document_length(document):
    """A document expert: the length of document['text']."""
    return {"chars": len(document["text"]), "seen_opinions": sorted(document.get("opinions", {}))}


def _master_hook():
    BOOTED_IN["master"] = os.getpid()


def _worker_hook():
    BOOTED_IN["worker"] = os.getpid()


@expert(before_fork=_master_hook, after_fork=_worker_hook)
def hooks():
    """Where each hook ran, and who answers."""
    return {"master": BOOTED_IN["master"], "worker": BOOTED_IN["worker"], "me": os.getpid(), "parent": os.getppid()}


_LEAKED = []


def leak(megabytes=8):
    """Keep megabytes of touched memory for ever (a leaking model cache); returns the worker's pid."""
    _LEAKED.append(bytearray(b"x" * (megabytes * 2**20)))
    return os.getpid()


class _Unprintable(Exception):
    def __str__(self):
        raise RuntimeError("cannot print me")


def unprintable():
    """Raise an exception whose message itself raises."""
    raise _Unprintable()


class _BadArray:
    def tolist(self):
        raise RuntimeError("tolist failed")


def bad_array():
    """Return an array-like whose conversion raises."""
    return _BadArray()


def blob(size):
    """size bytes."""
    return b"\x01" * size


_FILES = {}


def _open_file():
    _FILES["handle"] = open(__file__, encoding="utf-8")


@expert(before_fork=_open_file)
def read_open_file():
    """Read from a file the master opened before fork (it must survive daemonizing)."""
    _FILES["handle"].seek(0)
    return _FILES["handle"].readline().strip()


def _slow_boot():
    time.sleep(1.0)


@expert(after_fork=_slow_boot)
def slow_boot():
    """Answers after a worker that took a second to start."""
    return "up"


def rows_doubled(rows):
    """Model-like: one output row per input row, each number doubled (Client.predict over HTTP)."""
    return [[2 * x for x in row] for row in rows]
