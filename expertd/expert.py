"""The small API an expert module uses to declare its set-up hooks.

A plain function needs nothing: ``function = fibs:fib`` serves it as is.  An
expert with heavy state splits its set-up in two, because the master forks
its workers and some libraries' runtimes do not survive fork()::

    from expertd import expert

    def read_weights():            # before fork, once, in the master
        global WEIGHTS             # import, read files into plain memory:
        WEIGHTS = numpy.load(...)  # shared copy-on-write by every worker

    def build_model():             # after fork, in every worker
        global MODEL               # start runtimes, build and warm up models
        MODEL = make_model(WEIGHTS)

    @expert(before_fork=read_weights, after_fork=build_model)
    def opinion(doc):
        return {"label": ...}

A hook shared by several experts runs once.  A worker accepts requests only
after every ``after_fork`` hook has returned.

An expert whose cost hardly grows with the number of inputs (a model) can
take its calls in batches: the daemon gathers concurrent calls into one::

    @expert(batched=True)
    def opinion(documents):        # one document per call, in arrival order
        scores = MODEL.predict(encode(documents))
        return [{"score": float(s)} for s in scores]   # one result per document, same order

Each call still passes one argument and gets its own result.  To fail one
item alone, put an exception in its place in the returned list; the other
callers get their results.  Standard library only.
"""

from __future__ import annotations

TYPE_CHECKING = False  # typing stays out of the runtime import: clients import this package
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any

_HOOKS_ATTR = "__expertd_hooks__"


class Hooks:
    """An expert's set-up hooks; either may be None."""

    __slots__ = ("after_fork", "batched", "before_fork")

    def __init__(self, before_fork: Callable[[], Any] | None = None, after_fork: Callable[[], Any] | None = None,
                 batched: bool = False):
        self.before_fork = before_fork
        self.after_fork = after_fork
        self.batched = batched


def expert(
    function: Callable | None = None,
    *,
    before_fork: Callable[[], Any] | None = None,
    after_fork: Callable[[], Any] | None = None,
    batched: bool = False,
) -> Any:
    """Mark ``function`` as an expert with optional set-up hooks (usable bare or with arguments).

    ``batched=True``: the function takes a list of inputs (one per call) and
    returns a list of results in the same order (see the module docstring).
    """
    if not isinstance(batched, bool):
        raise TypeError(f"expert(): batched must be True or False, not {type(batched).__name__}")
    for label, hook in (("before_fork", before_fork), ("after_fork", after_fork)):
        if hook is not None and not callable(hook):
            raise TypeError(f"expert(): {label} must be callable, not {type(hook).__name__}")

    def mark(target: Callable) -> Callable:
        setattr(target, _HOOKS_ATTR, Hooks(before_fork, after_fork, batched))
        return target

    return mark(function) if function is not None else mark


def hooks_of(function: Callable) -> Hooks:
    """The hooks declared on ``function`` (none for a plain function)."""
    found = getattr(function, _HOOKS_ATTR, None)
    return found if isinstance(found, Hooks) else Hooks()
