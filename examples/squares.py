"""The Firefly example's second function."""


def square(n: float) -> float:
    """The square of n."""
    return n * n
