"""One call of a batched expert for many callers, in a worker.

The daemon gathers concurrent calls of a batched expert (see
:mod:`expertd.batching`, the master's side) and a worker answers them with one
call of the expert.  :func:`call_batch` turns the decoded calls into that one
call and its result back into one result, or one error, per caller:

* a function declared ``@expert(batched=True)`` gets the list of the calls'
  single arguments and returns a list of results in the same order; an
  exception in the returned list fails that item alone;
* a model expert (``model = PATH``) gets its calls' input rows stacked into one
  batch (:meth:`expertd.model.Model.predict_many`), and each caller its own rows
  of the outputs.

A call that does not fit (two arguments, inputs of the wrong shape) fails
alone; an expert that raises, or returns the wrong number of results, fails
every call of the batch.  Owns no state.
"""

from __future__ import annotations

import inspect
from typing import Any

from expertd.errors import BadRequest, BadResult, RemoteError
from expertd.loader import LoadedExpert

Call = tuple[list, dict]  # (args, kwargs) of one caller


def call_batch(expert: LoadedExpert, calls: list[Call], failure: Any) -> list[Any]:
    """One result or one :class:`RemoteError` per call, in order.

    ``failure(expert, args, kwargs, exc)`` makes the error of an expert that
    raised (:func:`expertd.calls._failure`: the worker's one way to report it).
    """
    model = getattr(expert.function, "__expertd_model__", None)
    if model is not None:
        return _model_batch(expert, model, calls)
    return _function_batch(expert, calls, failure)


def _function_batch(expert: LoadedExpert, calls: list[Call], failure: Any) -> list[Any]:
    results: list[Any] = [None] * len(calls)
    items: list[Any] = []
    positions: list[int] = []
    first = _first_parameter(expert)
    for position, (args, kwargs) in enumerate(calls):
        if len(args) == 1 and not kwargs:
            item = args[0]
        elif not args and len(kwargs) == 1 and first is not None and first in kwargs:
            item = kwargs[first]
        else:
            results[position] = BadRequest(
                f"{expert.name} is a batched expert: each call passes exactly one argument"
                f"{f' ({first})' if first else ''}; this one passed {len(args)} positional and {len(kwargs)} "
                "named", expert=expert.name)
            continue
        items.append(item)
        positions.append(position)
    if not items:
        return results
    try:
        returned = expert.function(items)
    except BaseException as exc:  # the whole batch failed: every caller in it gets the error
        error = failure(expert, [items], {}, exc)
        for position in positions:
            results[position] = error
        return results
    if not isinstance(returned, (list, tuple)) or len(returned) != len(items):
        count = len(returned) if isinstance(returned, (list, tuple)) else None
        error = BadResult(
            f"{expert.name} returned {type(returned).__name__ if count is None else f'{count} results'} for "
            f"{len(items)} inputs; a batched expert returns a list of one result per input, in order",
            expert=expert.name)
        for position in positions:
            results[position] = error
        return results
    for position, result in zip(positions, returned, strict=True):
        if isinstance(result, BaseException):
            result = result if isinstance(result, RemoteError) else failure(expert, [result], {}, result)
            if result.expert is None:
                result.expert = expert.name
        results[position] = result
    return results


def _first_parameter(expert: LoadedExpert) -> str | None:
    signature = expert.signature
    if signature is None:
        return None
    for parameter in signature.parameters.values():
        if parameter.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY):
            return parameter.name
        return None
    return None


def _model_batch(expert: LoadedExpert, model: Any, calls: list[Call]) -> list[Any]:
    """A model expert's calls: ``(inputs, *, arrays=False)`` each, their rows run as one batch."""
    from expertd.model import encode_outputs

    results: list[Any] = [None] * len(calls)
    inputs: list[Any] = []
    positions: list[int] = []
    as_arrays: list[bool] = []
    for position, (args, kwargs) in enumerate(calls):
        unknown = set(kwargs) - {"inputs", "arrays"}
        given = len(args) + ("inputs" in kwargs)
        if unknown or given != 1 or len(args) > 1:
            what = f"unknown argument {sorted(unknown)[0]!r}" if unknown else f"{given} inputs"
            results[position] = BadRequest(f"{expert.name}(inputs, *, arrays=False): {what}; pass one batch of "
                                           "input rows", expert=expert.name)
            continue
        inputs.append(args[0] if args else kwargs["inputs"])
        positions.append(position)
        as_arrays.append(bool(kwargs.get("arrays", False)))
    for position, output, arrays in zip(positions, model.predict_many(inputs), as_arrays, strict=True):
        if isinstance(output, BaseException):
            results[position] = output
        elif arrays:
            try:
                results[position] = encode_outputs(output)
            except TypeError as exc:  # (an output dtype arrays cannot carry fails this member, not the batch)
                results[position] = BadResult(f"{expert.name}: {exc}", expert=expert.name)
        elif isinstance(output, dict):
            results[position] = {key: value.tolist() for key, value in output.items()}
        else:
            results[position] = output.tolist()
    return results
