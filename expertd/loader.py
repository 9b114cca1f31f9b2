"""Loading experts: imports, function references, hooks and signatures.

The master calls :func:`load_experts` once: it prepends ``pythonpath``,
imports the ``preload`` modules, resolves every ``[expert:NAME]`` function,
checks the named pipelines against the opinions the experts declare they read
(``@expert(reads=...)``), prepares the models and runs the ``before_fork``
hooks.  Each worker calls :func:`run_after_fork`
after fork.  Failures become one-line :class:`ExpertLoadError` messages that
name the config file, section and key.
"""

from __future__ import annotations

import importlib
import inspect
import logging
import os
import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from expertd import runtimes
from expertd.config import EXPERT_PREFIX, MAIN_SECTION, Config, ExpertSpec
from expertd.errors import ExpertLoadError
from expertd.expert import hooks_of
from expertd.model import Model, collect, model_expert
from expertd.modelcache import Prepared, cache_directory
from expertd.pipelines import check_reads

log = logging.getLogger("expertd.loader")


@dataclass
class LoadedExpert:
    """An expert ready to be called: its callable, signature and hooks."""

    name: str
    reference: str
    function: Callable[..., Any]
    signature: inspect.Signature | None
    summary: str
    before_fork: Callable[[], Any] | None
    after_fork: Callable[[], Any] | None
    # Every Model of this generation with its cache entry (the same tuple on each expert): loaded in each
    # worker before the after_fork hooks.
    models: tuple[tuple[Model, Prepared], ...] = ()
    batched: bool = False  # takes its calls in batches (a model expert; @expert(batched=True))
    max_batch: int = 1  # the most calls one batch holds (1: never batched)
    batch_delay: float = 0.0  # how long a free worker may wait for expected company (see expertd.batching)
    reads: tuple[str, ...] = ()  # the opinions it reads from a pipeline's document (@expert(reads=...))
    example: tuple[Any, ...] = ()  # (its example input,) for expertd --check's trial call (@expert(example=...))

    @property
    def is_model(self) -> bool:
        """Whether this is a config-only model expert (``model = PATH``)."""
        return hasattr(self.function, "__expertd_model__")

    def describe(self) -> dict[str, Any]:
        """What ``expertctl list`` shows."""
        if self.batched and self.signature is not None and self.signature.parameters and not self.is_model:
            # Each call passes one item of the list the function takes.
            signature = f"{self.name}({next(iter(self.signature.parameters))}[i])"
        else:
            signature = f"{self.name}{self.signature}" if self.signature else f"{self.name}(...)"
        described = {
            "name": self.name,
            "function": self.reference,
            "signature": signature,
            "doc": self.summary,
            "batched": self.batched,
            "max_batch": self.max_batch,
            "batch_delay": self.batch_delay,
            "reads": list(self.reads),
        }
        model = getattr(self.function, "__expertd_model__", None)
        if model is not None:
            described.update(model=model.path, runtime=model.runtime, version=model.version,
                             inputs=model.inputs, outputs=model.outputs)
        return described


def describe_exception(exc: BaseException) -> str:
    """One line: the exception and the innermost frame outside importlib."""
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if "importlib" not in f.filename]
    where = f" (at {frames[-1].filename}:{frames[-1].lineno})" if frames else ""
    if isinstance(exc, SyntaxError) and exc.filename:
        where = f" (at {exc.filename}:{exc.lineno})"
    message = " ".join(str(exc).split()) or "(no message)"
    return f"{type(exc).__name__}: {message}{where}"


def _check_fork_safety(what: str) -> None:
    """Fail at once, naming the culprit, if a step started a runtime that cannot cross fork()."""
    started = runtimes.started_runtimes()
    if started:
        raise ExpertLoadError(
            f"{what} started {started[0]} in the process that forks the workers, and they would deadlock; "
            "move model building and loading into an after_fork hook (see expertd --help-topic experts)"
        )


def _import(module: str, where: str) -> Any:
    try:
        imported = importlib.import_module(module)
        _check_fork_safety(f"{where}: importing {module!r}")
        return imported
    except ModuleNotFoundError as exc:
        if exc.name and module.startswith(exc.name):
            raise ExpertLoadError(
                f"{where}: no module named {exc.name!r}; check the name, pythonpath and the virtualenv"
            ) from None
        raise ExpertLoadError(f"{where}: importing {module!r} failed: {describe_exception(exc)}") from None
    except ExpertLoadError:
        raise
    except BaseException as exc:  # an expert module may raise anything, SystemExit included
        raise ExpertLoadError(f"{where}: importing {module!r} failed: {describe_exception(exc)}") from None


def _split_reference(reference: str) -> tuple[str, str]:
    if ":" in reference:
        module, _, attribute = reference.partition(":")
    else:  # Firefly's module.function
        module, _, attribute = reference.rpartition(".")
    return module, attribute


def _resolve(spec: ExpertSpec, where: str) -> Callable[..., Any]:
    module_name, attribute = _split_reference(spec.function)
    target: Any = _import(module_name, where)
    for part in attribute.split("."):
        try:
            target = getattr(target, part)
        except AttributeError:
            raise ExpertLoadError(
                f"{where}: module {module_name!r} has no attribute {attribute!r}; check the spelling"
            ) from None
    if not callable(target):
        raise ExpertLoadError(f"{where}: {spec.function} is a {type(target).__name__}, not a function")
    return target


def _signature(function: Callable[..., Any]) -> inspect.Signature | None:
    try:
        return inspect.signature(function)
    except (TypeError, ValueError):  # some builtins and C callables have none
        return None


def _run_hook(hook: Callable[[], Any], where: str) -> None:
    try:
        hook()
    except BaseException as exc:
        raise ExpertLoadError(f"{where}: {describe_exception(exc)}") from None


def preload_libraries(config: Config) -> None:
    """Put ``pythonpath`` on sys.path and import the ``preload`` modules (libraries such as TensorFlow)."""
    for directory in reversed(config.pythonpath):
        if not os.path.isdir(directory):
            raise ExpertLoadError(
                f"{config.where(MAIN_SECTION, 'pythonpath')}: {directory} is not a directory; fix or remove it"
            )
        if directory not in sys.path:
            sys.path.insert(0, directory)
    runtimes.set_native_log_level(config.tf_log_level)
    for module in config.preload:
        _import(module, config.where(MAIN_SECTION, "preload"))


def load_experts(config: Config, keepalive: Callable[[], None] | None = None) -> dict[str, LoadedExpert]:
    """Import everything the config names, prepare its models and run the before-fork hooks, in the calling process.

    ``keepalive`` is called about once a second while a model is being prepared.
    """
    preload_libraries(config)
    experts: dict[str, LoadedExpert] = {}
    served: list[tuple[Model, str]] = []  # each model, with where the config or code declares it
    for spec in config.experts.values():
        if spec.model:
            model = Model(spec.model, name=spec.name, max_rows=spec.max_rows, _register=False)
            served.append((model, f"{config.where(EXPERT_PREFIX + spec.name, 'model')} = {spec.model}"))
            experts[spec.name] = LoadedExpert(
                name=spec.name, reference=f"model:{spec.model}", function=model_expert(spec.name, model),
                signature=None, summary="", before_fork=None, after_fork=None, batched=True,
                max_batch=config.max_batch(spec.name, True), batch_delay=spec.batch_delay)
            continue
        where = f"{config.where(EXPERT_PREFIX + spec.name, 'function')} = {spec.function}"
        function = _resolve(spec, where)
        hooks = hooks_of(function)
        if not hooks.batched and spec.max_batch is not None and spec.max_batch > 1:
            raise ExpertLoadError(f"{config.where(EXPERT_PREFIX + spec.name, 'max_batch')} = {spec.max_batch}: "
                                  f"{spec.function} is not a batched expert; declare it @expert(batched=True) "
                                  "or remove max_batch")
        doc = inspect.getdoc(function) or ""
        experts[spec.name] = LoadedExpert(
            name=spec.name,
            reference=spec.function,
            function=function,
            signature=_signature(function),
            summary=doc.strip().splitlines()[0] if doc.strip() else "",
            before_fork=hooks.before_fork,
            after_fork=hooks.after_fork,
            batched=hooks.batched,
            max_batch=config.max_batch(spec.name, hooks.batched),
            batch_delay=spec.batch_delay,
            reads=hooks.reads,
            example=hooks.example,
        )
    # Before any model is prepared: a pipeline that cannot work fails the load (start-up or reload) at once.
    problem = check_reads(config.pipelines, {name: expert.reads for name, expert in experts.items()})
    if problem:
        raise ExpertLoadError(f"{config.path}: {problem}")

    served += [(model, f"{config.path}: Model({model.path!r}) in {model._module}") for model in collect()]
    cache = cache_directory(config.model_cache)
    for model, where in served:
        # The preparing child imports what registers a Keras model's custom objects: preload and its module.
        imports = [*config.preload, *([model._module] if model._module and model._module != "__main__" else [])]
        model.prepare(cache, config.prepare_timeout, where, keepalive=keepalive, pythonpath=config.pythonpath,
                      imports=imports)
    runtimes_used = {model.runtime for model, _ in served}
    if runtimes_used:
        from expertd.model_runtimes import preload

        # Imported (never started) here, so that every worker shares the libraries.
        _run_hook(lambda: preload(runtimes_used), "importing the model runtimes failed")
        _check_fork_safety("importing the model runtimes")
    for expert in experts.values():
        model = getattr(expert.function, "__expertd_model__", None)
        if model is not None:  # described only now that the model's inputs and outputs are known
            expert.signature = _signature(expert.function)
            expert.summary = model.summary()
        # (Each generation keeps its own entries: a Model of a module a reload does not re-import is
        # prepared again, and a failed reload must leave the old generation's workers on theirs.)
        expert.models = tuple((model, model.prepared) for model, _ in served)

    for hook, names in _distinct_hooks(experts, "before_fork"):
        where = f"{config.path}: [expert:{names[0]}] before_fork hook {_hook_name(hook)}"
        _run_hook(hook, f"{where} failed")
        _check_fork_safety(where)
    runtimes.quiet_python_loggers(config.tf_log_level)
    threads = runtimes.extra_threads()
    if threads:
        log.warning(
            "threads running in the generation's parent will not exist in the workers: %s; start them in an "
            "after_fork hook",
            ", ".join(threads),
        )
    return experts


def run_after_fork(experts: dict[str, LoadedExpert], threads: int = 1) -> None:
    """Load every model, then run every distinct after-fork hook once, in the calling (worker) process."""
    models = next(iter(experts.values())).models if experts else ()
    for model, prepared in models:
        model.prepared = prepared
        try:
            model.load(threads)
        except ExpertLoadError:
            raise
        except BaseException as exc:
            raise ExpertLoadError(f"loading model {model.path} failed: {describe_exception(exc)}") from None
    for hook, names in _distinct_hooks(experts, "after_fork"):
        _run_hook(hook, f"[expert:{names[0]}] after_fork hook {_hook_name(hook)} failed")


def _hook_name(hook: Callable[[], Any]) -> str:
    return f"{getattr(hook, '__module__', '?')}.{getattr(hook, '__qualname__', repr(hook))}"


def _distinct_hooks(experts: dict[str, LoadedExpert], kind: str) -> list[tuple[Callable[[], Any], list[str]]]:
    seen: dict[int, tuple[Callable[[], Any], list[str]]] = {}
    for expert in experts.values():
        hook = getattr(expert, kind)
        if hook is not None:
            seen.setdefault(id(hook), (hook, []))[1].append(expert.name)
    return list(seen.values())
