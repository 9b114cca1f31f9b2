"""Functions as a Firefly user serves them (tests/test_firefly_*.py): named arguments, docstrings, defaults."""

import time

from expertd import expert


def square(n):
    """Returns the square of a number."""
    return n * n


def greet(name, greeting="Hello", punctuation="!"):
    """Greets someone by name.

    The greeting and the punctuation can be changed."""
    return f"{greeting}, {name}{punctuation}"


def total(values):
    """The sum of a list of numbers (served at a path of its own, /sum)."""
    return sum(values)


def fails(message="boom"):
    raise ValueError(message)


def raw_bytes():
    return b"\x00\x01"


_SENTINEL = object()


def odd_default(when=_SENTINEL, limit=10**30, ratio=float("inf"), tags=("a", "b"), *rest, flag=False, **options):
    return "ok"


@expert(batched=True)
def doubled(items):
    """A batched expert: each call is one item of the list."""
    return [2 * item for item in items]


def nap(seconds):
    """Sleeps (past its timeout, in the tests)."""
    time.sleep(seconds)
    return seconds
