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
callers get their results.

An expert that reads earlier experts' opinions from the document (in a
pipeline, docs/config.md ``[pipeline:NAME]``) says which, so that a pipeline
that does not run them first is refused when the experts load::

    @expert(reads=("language",))   # reads document["opinions"]["language"]
    def opinion(doc): ...

An expert can give an example of its input, which ``expertd --check`` passes
to it in a trial worker (after the after_fork hooks), so that a broken model
fails the check rather than the first request::

    @expert(after_fork=build_model, example={"text": "a short review"})
    def opinion(doc): ...

The example is the call's one argument (a batched expert gets a list of it);
the call must return without raising, and its result must be sendable.

Standard library only; no state beyond the hooks stored on each function.
"""

from __future__ import annotations

TYPE_CHECKING = False  # typing stays out of the runtime import: clients import this package
if TYPE_CHECKING:
    from collections.abc import Callable, Iterable
    from typing import Any

_HOOKS_ATTR = "__expertd_hooks__"
_NO_EXAMPLE = object()  # (None is a fine example input)


class Hooks:
    """An expert's set-up hooks; either may be None."""

    __slots__ = ("after_fork", "batched", "before_fork", "example", "reads")

    def __init__(self, before_fork: Callable[[], Any] | None = None, after_fork: Callable[[], Any] | None = None,
                 batched: bool = False, reads: tuple[str, ...] = (), example: tuple[Any, ...] = ()):
        self.before_fork = before_fork
        self.after_fork = after_fork
        self.batched = batched
        self.reads = reads  # the opinions (expert names) the expert reads from the document
        self.example = example  # (the example input,) for expertd --check's trial call, or () for none


def _opinion_names(reads: Iterable[str]) -> tuple[str, ...]:
    """``reads`` checked: opinion names, each once, in order."""
    if isinstance(reads, (str, bytes)):  # a bare name would be read as its letters
        raise TypeError(f"expert(): reads must be a list or tuple of opinion names, such as ({reads!r},), "
                        f"not a {type(reads).__name__}")
    try:
        names = list(reads)
    except TypeError:
        raise TypeError(f"expert(): reads must be a list or tuple of opinion names, not {type(reads).__name__}"
                        ) from None
    for name in names:
        if not isinstance(name, str):
            raise TypeError(f"expert(): reads holds {name!r}, a {type(name).__name__}; list opinion names (the "
                            "names of the experts whose opinions it reads) as strings")
        if not name.strip() or name != name.strip():
            raise ValueError(f"expert(): reads holds {name!r}; name an expert, without spaces around it")
    return tuple(dict.fromkeys(names))


def expert(
    function: Callable | None = None,
    *,
    before_fork: Callable[[], Any] | None = None,
    after_fork: Callable[[], Any] | None = None,
    batched: bool = False,
    reads: Iterable[str] = (),
    example: Any = _NO_EXAMPLE,
) -> Any:
    """Mark ``function`` as an expert with optional set-up hooks (usable bare or with arguments).

    ``batched=True``: the function takes a list of inputs (one per call) and
    returns a list of results in the same order (see the module docstring).
    ``reads``: the names of the opinions the expert reads from a pipeline's
    document; every pipeline that runs it must run those experts in an earlier
    stage.
    ``example``: an input for ``expertd --check``'s trial call (the call's one argument).
    """
    read_names = _opinion_names(reads)
    if not isinstance(batched, bool):
        raise TypeError(f"expert(): batched must be True or False, not {type(batched).__name__}")
    for label, hook in (("before_fork", before_fork), ("after_fork", after_fork)):
        if hook is not None and not callable(hook):
            raise TypeError(f"expert(): {label} must be callable, not {type(hook).__name__}")

    def mark(target: Callable) -> Callable:
        given = () if example is _NO_EXAMPLE else (example,)
        setattr(target, _HOOKS_ATTR, Hooks(before_fork, after_fork, batched, read_names, given))
        return target

    return mark(function) if function is not None else mark


def hooks_of(function: Callable) -> Hooks:
    """The hooks declared on ``function`` (none for a plain function)."""
    found = getattr(function, _HOOKS_ATTR, None)
    return found if isinstance(found, Hooks) else Hooks()
