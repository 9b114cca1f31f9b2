"""Experts for the operator's log and metrics tests (tests/test_operator_logs.py)."""

import logging
import time


def spin(microseconds=20):
    """Busy for ``microseconds`` (a fast expert: tens of microseconds a call)."""
    until = time.perf_counter() + microseconds / 1e6
    while time.perf_counter() < until:
        pass
    return microseconds


def fails(kind="value"):
    """Raise ValueError or KeyError, as asked."""
    if kind == "key":
        raise KeyError("no such key")  # the KeyError line
    raise ValueError("bad value")  # the ValueError line


def quotes(text):
    """Raise with the caller's text in the message (as many experts do: "cannot judge {text!r}")."""
    raise ValueError("client said: " + text)


def chatty():
    """Log at debug on libraries' loggers and on its own."""
    logging.getLogger("h5py._conv").debug("h5py debug: creating converter from 7 to 5")
    logging.getLogger("matplotlib.font_manager").debug("matplotlib debug: findfont")
    logging.getLogger("h5py._conv").info("h5py info: still shown")
    logging.getLogger("logexperts").debug("the expert's own debug line")
    return True


def imports_libraries():
    """Import h5py and TensorFlow in the worker (as a model expert's after_fork hook would): both log at debug."""
    import h5py  # noqa: F401  (its converters log a debug line each as it loads)
    import tensorflow  # noqa: F401

    return True
