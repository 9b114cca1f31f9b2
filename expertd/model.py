"""Models served by experts: the :class:`Model` handle and config-only model experts.

An expert with its own pre- and post-processing declares its model at module
level; expertd prepares it before fork and loads it in every worker::

    from expertd import Model, expert

    CLASSIFIER = Model("classifier.keras")   # relative to this module's file

    @expert
    def opinion(document):
        ids = tokenize(document["text"])
        return {"score": float(CLASSIFIER.predict(ids)[0, 0])}

``[expert:NAME] model = PATH`` in the config needs no module at all: the
loader wraps the model in :func:`model_expert`.

A Model's life, across processes:

* created when its module is imported, in the master (and in ``--check``);
* :meth:`Model.prepare`, in the master: the cache entry is found or made by
  a child process (:mod:`expertd.modelcache`); nothing here starts a runtime;
* :meth:`Model.load`, in each worker after fork: the runtime maps the
  prepared files, and the worker checks its outputs on the reference inputs
  against the original model's before it takes a request (the correctness
  guard: a worker that disagrees refuses to start);
* :meth:`Model.predict`, per call.

State owned: the registry of Models created by expert modules (read by the
loader once per generation), and each Model's prepared entry and runner.
"""

from __future__ import annotations

import inspect
import logging
import os
import sys
from typing import Any

from expertd import arrays
from expertd.config import DEFAULT_MAX_ROWS
from expertd.errors import BadRequest, ExpertLoadError

log = logging.getLogger("expertd.model")

_created: list[Model] = []



class Model:
    """A saved model (``.keras``, ``.h5``, ``.tflite`` or a SavedModel directory) served from shared memory."""

    def __init__(self, path: str, *, name: str | None = None, max_rows: int = DEFAULT_MAX_ROWS,
                 _register: bool = True) -> None:
        caller = sys._getframe(1).f_globals
        if not os.path.isabs(path) and caller.get("__file__"):
            path = os.path.join(os.path.dirname(os.path.abspath(caller["__file__"])), path)
        self.path = os.path.normpath(path)
        self.name = name or os.path.basename(self.path.rstrip(os.sep))
        self.max_rows = max_rows
        self._expert = name  # the expert a refusal names: a config-only model's own; else the caller's (the worker's)
        self.prepared: Any = None  # modelcache.Prepared, once prepare() ran
        self._runner: Any = None
        self._module = caller.get("__name__", "")
        self._module_dict = caller
        if _register:
            _created.append(self)

    def __repr__(self) -> str:
        state = "loaded" if self._runner is not None else "prepared" if self.prepared is not None else "declared"
        return f"<Model {self.path} ({state})>"

    # ------------------------------------------------------------ master side
    def prepare(self, cache: str, timeout: float, where: str, **options: Any) -> None:
        """Find or make the model's cache entry (a child process does any work; options: see ensure_prepared)."""
        from expertd.modelcache import ensure_prepared

        self.prepared = ensure_prepared(self.path, cache, timeout, where, **options)
        for warning in self.prepared.manifest.get("warnings", []):
            log.warning("%s: %s", where, warning)

    @property
    def inputs(self) -> list[dict[str, Any]]:
        """The model's inputs: name, dtype and shape (-1 for any size; the first dimension is the batch)."""
        return self._manifest()["inputs"]

    @property
    def outputs(self) -> list[dict[str, Any]]:
        """The model's outputs, named as the model names them."""
        renamed = self._manifest().get("output_names", {})
        return [dict(spec, name=renamed.get(spec["name"], spec["name"])) for spec in self._manifest()["outputs"]]

    @property
    def version(self) -> str:
        """A short hash of the model file's content."""
        return self._manifest()["sha256"][:16]

    @property
    def runtime(self) -> str:
        """``litert``, or ``tensorflow-graph`` / ``tensorflow`` (the fallbacks: shared weights / a copy per worker)."""
        return self._manifest()["runtime"]

    def summary(self) -> str:
        """One line for ``expertctl list``: the runtime, inputs and outputs."""
        inputs = ", ".join(f"{s['name']}: {arrays.describe_spec(s)}" for s in self.inputs)
        outputs = ", ".join(f"{s['name']}: {arrays.describe_spec(s)}" for s in self.outputs)
        return f"model on {self.runtime}: inputs {inputs}; outputs {outputs}"

    def _manifest(self) -> dict[str, Any]:
        if self.prepared is None:
            raise RuntimeError(
                f"{self!r} is not prepared yet: its inputs, outputs and version are known once expertd has prepared "
                "it at start-up, after your module is imported; read them inside the expert or an after_fork hook "
                "(and create Models at module level, so that expertd prepares them)")
        return self.prepared.manifest

    # ------------------------------------------------------------ worker side
    def load(self, threads: int) -> None:
        """Start the runtime on the prepared files and check it against the reference outputs."""
        import numpy as np

        from expertd.model_runtimes import TensorFlowGraph, TensorFlowSavedModel, litert_runner
        from expertd.prepare import agree

        self._manifest()  # (raises if the model was never prepared)
        prepared = self.prepared
        if not os.path.isdir(prepared.directory):
            raise ExpertLoadError(f"model {self.path}: its cache entry {prepared.directory} was deleted while the "
                                  "daemon uses it; reload (expertctl reload) to prepare it again")
        if prepared.runtime == "litert":
            runner: Any = litert_runner(prepared.path("model.tflite"), prepared.path("xnnpack.cache"), threads)
        elif prepared.runtime == "tensorflow-graph":
            runner = TensorFlowGraph(prepared.directory)
        else:
            runner = TensorFlowSavedModel(prepared.path("saved_model"))
        with np.load(prepared.path("reference.npz")) as reference:
            given = {key[3:]: reference[key] for key in reference.files if key.startswith("in:")}
            expected = {key[4:]: reference[key] for key in reference.files if key.startswith("out:")}
        got = runner.run(given)
        for name, value in expected.items():
            if name not in got:
                raise ExpertLoadError(f"model {self.path}: the prepared model has no output {name!r}; delete "
                                      f"{prepared.directory} to prepare it again")
            ok, difference = agree(got[name], value)
            if not ok:
                raise ExpertLoadError(
                    f"model {self.path}: the prepared model's output {name!r} differs from the original model's by "
                    f"{difference:.3g} on the reference inputs (tolerance 1e-4 relative); delete {prepared.directory} "
                    "to prepare it again"
                )
        self._runner = runner

    def predict(self, inputs: Any) -> Any:
        """Run the model on a batch: an array (or nested lists) of rows, or a dict of them by input name.

        Returns one output row per input row: an array, or a dict of arrays
        by output name for a model with several outputs.  Inputs that do not
        fit raise :class:`~expertd.errors.BadRequest` naming the input and the
        expected shape.
        """
        import numpy as np

        runner = self._runner
        if runner is None:
            raise RuntimeError(f"{self!r} is not loaded in this process: create Models at module level, so expertd "
                               "loads them in every worker")
        manifest = self.prepared.manifest
        try:
            batch = _check_inputs(self.name, manifest["inputs"], inputs)
            for array in batch.values():
                if array.shape[0] > self.max_rows:
                    raise BadRequest(f"{self.name}: {array.shape[0]} rows in one call; at most {self.max_rows} "
                                     "(max_rows): send them in several calls")
                if array.shape[0] == 0:
                    results = {spec["name"]: np.zeros([0] + [max(d, 0) for d in spec["shape"][1:]], spec["dtype"])
                               for spec in manifest["outputs"]}
                    break
            else:
                try:
                    results = runner.run(batch)
                except (RuntimeError, ValueError) as exc:  # shapes and dtypes fit: the values do not (an id too large)
                    message = " ".join(str(exc).split()).replace("failed to invoke.", "failed to invoke")
                    raise BadRequest(f"{self.name}: the model cannot run on these inputs: {message[:300]}; check "
                                     "their values (ids within the vocabulary, say)") from None
        except BadRequest as refused:
            refused.expert = self._expert
            raise
        if len(results) == 1:
            for value in results.values():
                return value
        renamed = manifest.get("output_names", {})
        return {renamed.get(name, name): value for name, value in results.items()}


    def predict_many(self, calls: list[Any]) -> list[Any]:
        """:meth:`predict` for several callers' inputs at once: their rows run as one batch.

        Returns, per call, what :meth:`predict` would return for it alone, or
        the :class:`~expertd.errors.BadRequest` it would raise: a call whose
        inputs do not fit fails alone.  Batches stay within ``max_rows`` rows
        (more run in turn), and stack only rows of one shape (a dimension an
        input leaves free may differ between calls: those run in turn).  When
        the runtime refuses a batch's values, each of its calls runs alone, so
        that only the culprit fails.
        """
        import numpy as np

        results: list[Any] = [None] * len(calls)
        checked: list[tuple[int, dict[str, Any], int]] = []  # (position, arrays by input name, rows)
        manifest = self.prepared.manifest if self._runner is not None else None
        for position, inputs in enumerate(calls):
            if manifest is None:
                results[position] = self.predict(inputs)  # (raises: not loaded in this process)
                continue
            try:
                batch = _check_inputs(self.name, manifest["inputs"], inputs)
            except BadRequest as refused:
                refused.expert = self._expert
                results[position] = refused
                continue
            rows = next(iter(batch.values())).shape[0]
            if rows == 0 or rows > self.max_rows:
                results[position] = _outcome(self.predict, inputs)  # (its own answer: empty, or refused)
                continue
            checked.append((position, batch, rows))
        chunk: list[tuple[int, dict[str, Any], int]] = []
        total = 0
        for entry in [*checked, None]:
            # Rows stack only with rows of the same shape (an input may leave a dimension free: -1).
            if entry is not None and total + entry[2] <= self.max_rows and (
                    not chunk or _row_shapes(entry[1]) == _row_shapes(chunk[0][1])):
                chunk.append(entry)
                total += entry[2]
                continue
            if len(chunk) == 1:
                position, batch, _rows = chunk[0]
                results[position] = _outcome(self.predict, batch)
            elif chunk:
                stacked = {name: np.concatenate([batch[name] for _p, batch, _r in chunk])
                           for name in chunk[0][1]}
                try:
                    outputs = self.predict(stacked)
                except BadRequest:  # a value the runtime refuses: find whose, by running each alone
                    for position, batch, _rows in chunk:
                        results[position] = _outcome(self.predict, batch)
                else:
                    start = 0
                    for position, _batch, rows in chunk:
                        if isinstance(outputs, dict):
                            results[position] = {key: value[start:start + rows] for key, value in outputs.items()}
                        else:
                            results[position] = outputs[start:start + rows]
                        start += rows
            chunk, total = ([entry], entry[2]) if entry is not None else ([], 0)
        return results


def _row_shapes(batch: dict[str, Any]) -> list[tuple[int, ...]]:
    return [array.shape[1:] for array in batch.values()]


def _outcome(predict: Any, inputs: Any) -> Any:
    try:
        return predict(inputs)
    except BadRequest as refused:
        return refused


def _dtype(name: str) -> Any:
    found = _dtypes.get(name)
    if found is None:
        import numpy as np

        found = _dtypes[name] = np.dtype(name)
    return found


_dtypes: dict[str, Any] = {}


def _check_inputs(model: str, specs: list[dict[str, Any]], inputs: Any) -> dict[str, Any]:
    """``inputs`` as one C-contiguous array per input name, or BadRequest saying what was expected.

    (Model.predict, the caller, sets which expert a refusal names.)
    """
    if len(specs) == 1 and not (isinstance(inputs, dict) and not arrays.is_encoded(inputs)):
        return {specs[0]["name"]: _as_array(model, specs[0], inputs)}  # (the common case, in fewer steps)
    if isinstance(inputs, dict) and not arrays.is_encoded(inputs):
        given = inputs
        expected_names = [spec["name"] for spec in specs]
        if set(given) != set(expected_names):
            raise BadRequest(f"{model}: inputs are {sorted(given)}; this model takes {expected_names} "
                             "(a dict of batches by input name)")
    else:
        names = ", ".join(f"{s['name']}: {arrays.describe_spec(s)}" for s in specs)
        raise BadRequest(f"{model}: this model takes several inputs; send a dict of batches by name ({names})")
    batch: dict[str, Any] = {}
    rows = None
    for spec in specs:
        name = spec["name"]
        array = _as_array(model, spec, given[name])
        if rows is not None and array.shape[0] != rows:
            raise BadRequest(f"{model}: input {name!r} has {array.shape[0]} rows where other inputs have {rows}")
        rows = array.shape[0]
        batch[name] = array
    return batch


def _as_array(model: str, spec: dict[str, Any], value: Any) -> Any:
    """One input's rows as a C-contiguous array of the input's dtype, or BadRequest."""
    import numpy as np

    expected, shape = _dtype(spec["dtype"]), spec["shape"]
    where = f"{model}: input {spec['name']!r}"
    try:
        if arrays.is_encoded(value):
            array = arrays.decode(value, where)
        elif type(value) is np.ndarray:
            array = value
        else:
            array = np.asarray(value)
    except ValueError as exc:
        message = str(exc) if str(exc).startswith(where) else f"{where}: rows are ragged (rows of different lengths)"
        if "too big" in str(exc):
            message = f"{where}: the array is too big"
        raise BadRequest(f"{message}; expected {arrays.describe_spec(spec)}") from None
    if array.size == 0 and array.ndim == 1:  # [] is an empty batch, whatever numpy guessed its dtype to be
        array = np.zeros([0] + [max(d, 0) for d in shape[1:]], expected)
    fits = array.ndim == len(shape) and all(d < 0 or d == g for d, g in zip(shape[1:], array.shape[1:], strict=True))
    if fits and array.dtype == expected and array.flags.c_contiguous:
        return array  # (the common case, checked in one pass)
    if array.dtype.kind not in "biuf" or (expected.kind in "iub" and array.dtype.kind == "f"):
        got = {"f": "floats", "U": "text", "S": "bytes"}.get(array.dtype.kind, "non-numbers")
        raise BadRequest(f"{where}: got {got} ({array.dtype.name}); expected {arrays.describe_spec(spec)}")
    if expected.kind in "iu" and array.dtype.kind in "iu" and array.size and not _fits(array, expected):
        raise BadRequest(f"{where}: values from {array.min()} to {array.max()} do not fit {expected.name}; "
                         f"expected {arrays.describe_spec(spec)}")
    if not fits:
        raise BadRequest(f"{where}: got shape {list(array.shape)}; expected {arrays.describe_spec(spec)} "
                         "(a batch of rows)")
    return np.ascontiguousarray(array, dtype=expected)


def _fits(array: Any, dtype: Any) -> bool:
    """Whether every integer in ``array`` survives conversion to ``dtype`` (numpy would wrap it silently)."""
    import numpy as np

    limits = np.iinfo(dtype)
    return bool(limits.min <= array.min() and array.max() <= limits.max)


def collect() -> list[Model]:
    """The Models created by modules that are still the live ones (a reload replaces modules: theirs drop out)."""
    live = [m for m in _created if getattr(sys.modules.get(m._module), "__dict__", None) is m._module_dict]
    _created[:] = live
    return list(live)


def model_expert(name: str, model: Model) -> Any:
    """The callable that serves ``[expert:NAME] model = PATH``: rows in, one output row per input row out."""

    def serve(inputs: Any, *, arrays: bool = False) -> Any:
        result = model.predict(inputs)
        if arrays:
            return encode_outputs(result)
        if isinstance(result, dict):
            return {key: value.tolist() for key, value in result.items()}
        return result.tolist()

    serve.__name__ = serve.__qualname__ = name
    serve.__signature__ = inspect.Signature([  # type: ignore[attr-defined]
        inspect.Parameter("inputs", inspect.Parameter.POSITIONAL_OR_KEYWORD),
        inspect.Parameter("arrays", inspect.Parameter.KEYWORD_ONLY, default=False),
    ])
    serve.__expertd_model__ = model  # type: ignore[attr-defined]
    return serve


def encode_outputs(result: Any) -> Any:
    if isinstance(result, dict):
        return {key: arrays.encode(value) for key, value in result.items()}
    return arrays.encode(result)
