"""The Firefly example's first function: naive recursive Fibonacci."""


def fib(n: int) -> int:
    """Naive recursive Fibonacci, with fib(0) = fib(1) = 1."""
    if n == 0 or n == 1:
        return 1
    return fib(n - 1) + fib(n - 2)
