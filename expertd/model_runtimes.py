"""The runtimes a prepared model runs on, in a worker (or in the preparing child process).

* :class:`LiteRT` — for models of :data:`SMALL_MODEL` bytes or more:
  LiteRT's CompiledModel on XNNPACK, whose
  packed weights live in the cache entry's ``xnnpack.cache`` file.  Every
  worker maps that file read-only, so the weights exist once in the page cache
  however many workers there are, and a call costs microseconds of framework
  overhead instead of TensorFlow's half a millisecond.
* :class:`LiteRTInterpreter` — for smaller models: LiteRT's interpreter with
  its builtin kernels, which read the weights from the mapped model file
  (shared too) and cost less per call.
* :class:`TensorFlowGraph` — the fallback for models LiteRT cannot express:
  TensorFlow runs the frozen serving graph, its weights mapped from the cache
  entry and handed over without a copy (shared between workers).
* :class:`TensorFlowSavedModel` — the last resort, for a serving function
  that cannot be frozen: the SavedModel as saved; each worker holds its own
  copy of the weights.

A runner owns its runtime objects and the buffers of the batch size it ran
last (resizing costs tens of microseconds, so a run of calls at one size pays
it once).  ``run`` takes arrays already checked against the model's inputs
(see :mod:`expertd.model`) and returns one array per output name.

Imports of the runtimes happen in ``__init__``: this module is imported by
the master, which must not start them.
"""

from __future__ import annotations

import os
import tempfile
from typing import Any

import numpy as np

# A converted model this large or larger runs on CompiledModel with XNNPACK; smaller ones on the interpreter.
SMALL_MODEL = 4 * 2**20


class LiteRT:
    """A ``.tflite`` model on LiteRT's CompiledModel with XNNPACK's weight cache."""

    def __init__(self, model_path: str, weight_cache: str, threads: int) -> None:
        from ai_edge_litert.compiled_model import CompiledModel
        from ai_edge_litert.cpu_options import CpuOptions
        from ai_edge_litert.environment import Environment, EnvironmentOptions
        from ai_edge_litert.hardware_accelerator import HardwareAccelerator
        from ai_edge_litert.options import Options

        # Plugin and dispatch paths point at an empty directory of our own: otherwise LiteRT tries to load
        # every NPU vendor's plugin it ships (and logs each failure) on every worker start.  Never a
        # directory others can write: LiteRT loads any plugin library it finds there.
        with tempfile.TemporaryDirectory(prefix="expertd-litert-") as empty:
            environment = Environment.create(options=EnvironmentOptions(
                runtime_path=os.path.dirname(os.path.abspath(_package_file())),
                compiler_plugin_path=empty, dispatch_library_path=empty,
            ))
        options = Options(hardware_accelerators=HardwareAccelerator.CPU,
                          cpu_options=CpuOptions(num_threads=threads, xnnpack_weight_cache_path=weight_cache))
        self._model = CompiledModel.from_file(model_path, options=options, environment=environment)
        signatures = self._model.get_signature_list()
        self.signature = signature_key(signatures)
        self._index = self._model.get_signature_index(self.signature)
        self.input_names: list[str] = list(signatures[self.signature]["inputs"])
        self.output_names: list[str] = list(signatures[self.signature]["outputs"])
        self._shapes: list[tuple[int, ...]] | None = None
        self._inputs: list[Any] = []
        self._outputs: list[Any] = []
        from ai_edge_litert import tensor_buffer

        self._write = tensor_buffer._tb.WriteTensorBuffer
        self._read = tensor_buffer._tb.ReadTensorToBuffer
        self._run = self._model._model.RunByIndex

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        arrays = [inputs[name] for name in self.input_names]
        shapes = [array.shape for array in arrays]
        if shapes != self._shapes:
            self._resize(shapes)
        # The buffers' own write/read/run wrappers re-normalise dtypes on every call (a third of a
        # small model's cost); the same native calls are made here with what _resize worked out once.
        write, read = self._write, self._read
        for capsule, array, dtype in zip(self._input_capsules, arrays, self._input_dtypes, strict=True):
            write(capsule, array.reshape(-1), dtype)
        self._run(self._index, self._input_capsules, self._output_capsules)
        results = {}
        for name, capsule, (dtype, np_dtype, shape, count) in zip(
                self.output_names, self._output_capsules, self._output_layout, strict=True):
            result = np.empty(count, dtype=np_dtype)
            read(capsule, result, dtype)
            results[name] = result.reshape(shape)
        return results

    def _resize(self, shapes: list[tuple[int, ...]]) -> None:
        from ai_edge_litert.tensor_buffer import TensorBuffer

        model = self._model
        for index, shape in enumerate(shapes):
            model.resize_input_tensor(index, list(shape), self._index, strict=False)
        self._inputs = model.create_input_buffers(self._index)  # (kept: they own the capsules)
        self._outputs = model.create_output_buffers(self._index)
        self._input_capsules = [buffer.capsule for buffer in self._inputs]
        self._output_capsules = [buffer.capsule for buffer in self._outputs]
        self._input_dtypes = [TensorBuffer._normalize_dtype(buffer.get_tensor_details()["dtype"])[0]
                              for buffer in self._inputs]
        self._output_layout = []
        for buffer in self._outputs:
            details = buffer.get_tensor_details()
            dtype, np_dtype = TensorBuffer._normalize_dtype(details["dtype"])
            count = 1
            for dimension in details["shape"]:
                count *= dimension
            self._output_layout.append((dtype, np_dtype, tuple(details["shape"]), count))
        self._shapes = shapes


class LiteRTInterpreter:
    """A small ``.tflite`` model on LiteRT's interpreter with its builtin kernels.

    Measured in a worker serving the shipped sentiment model: 30 µs less per
    call than CompiledModel (its call path crosses fewer layers, which matters
    when a call starts with cold caches after a socket round trip).  The
    builtin kernels read the weights straight from the mapped model file, so
    they are shared between workers as well; XNNPACK's packed kernels are
    worth more only for larger models (twice as fast at batch 32 on a 192 MiB
    MLP), which use :class:`LiteRT`.
    """

    def __init__(self, model_path: str, threads: int) -> None:
        from ai_edge_litert.interpreter import Interpreter, OpResolverType

        self._interpreter = Interpreter(
            model_path=model_path, num_threads=threads,
            experimental_op_resolver_type=OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES)
        runner = self._interpreter.get_signature_runner(signature_key(self._interpreter.get_signature_list()))
        inputs, outputs = runner.get_input_details(), runner.get_output_details()
        self.input_names = list(inputs)
        self.output_names = list(outputs)
        self._input_indices = [inputs[name]["index"] for name in self.input_names]
        self._output_indices = [outputs[name]["index"] for name in self.output_names]
        self._shapes: list[tuple[int, ...]] | None = None
        # The wrapper's set_tensor/invoke/get_tensor add a Python call each (and invoke a check for
        # views from tensor(), which is never used here): the native methods are called directly.
        native = self._interpreter._interpreter
        self._set, self._invoke, self._get = native.SetTensor, native.Invoke, native.GetTensor
        self._single = (self._input_indices[0], self.input_names[0]) if len(self.input_names) == 1 else None
        self._outputs = list(zip(self.output_names, self._output_indices, strict=True))

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self._single is not None:  # (the common case, in fewer steps)
            index, name = self._single
            array = inputs[name]
            if [array.shape] != self._shapes:
                self._resize([array.shape])
            self._set(index, array)
        else:
            arrays = [inputs[name] for name in self.input_names]
            shapes = [array.shape for array in arrays]
            if shapes != self._shapes:
                self._resize(shapes)
            for index, array in zip(self._input_indices, arrays, strict=True):
                self._set(index, array)
        self._invoke()
        get = self._get
        return {name: get(index, 0) for name, index in self._outputs}

    def _resize(self, shapes: list[tuple[int, ...]]) -> None:
        # (Natively too: the wrapper refuses to reallocate while anything, the bound methods
        # kept above included, holds a reference to the native interpreter.  Nothing here keeps
        # a view of its buffers: GetTensor copies.)
        native = self._interpreter._interpreter
        for index, shape in zip(self._input_indices, shapes, strict=True):
            native.ResizeInputTensor(index, np.array(shape, dtype=np.int32), False)
        native.AllocateTensors()
        self._shapes = shapes


class TensorFlowGraph:
    """A frozen serving graph whose weights are mapped from ``weights.bin`` (prepared by expertd.prepare).

    The weights reach TensorFlow as DLPack tensors over a copy-on-write map
    of the file: TensorFlow aliases DLPack memory, so every worker reads the
    same page-cache pages (measured: 25 MiB private per worker, runtime
    included, for 64 MiB of weights).  The map is private (``mode="c"``)
    because numpy exports no read-only array through DLPack; nothing writes
    to it.
    """

    def __init__(self, directory: str) -> None:
        import json

        import tensorflow as tf

        self._tf = tf
        with open(os.path.join(directory, "graph.json"), encoding="utf-8") as handle:
            index = json.load(handle)
        graph_def = tf.compat.v1.GraphDef()
        with open(os.path.join(directory, "graph.pb"), "rb") as handle:
            graph_def.ParseFromString(handle.read())
        wrapped = tf.compat.v1.wrap_function(lambda: tf.compat.v1.import_graph_def(graph_def, name=""), [])
        graph = wrapped.graph
        self.input_names = list(index["inputs"])
        self.output_names = list(index["outputs"])
        feeds = [graph.get_tensor_by_name(index["inputs"][name]) for name in self.input_names]
        feeds += [graph.get_tensor_by_name(weight["tensor"]) for weight in index["weights"]]
        fetches = [graph.get_tensor_by_name(index["outputs"][name]) for name in self.output_names]
        self._function = wrapped.prune(feeds=feeds, fetches=fetches)
        blob = np.memmap(os.path.join(directory, "weights.bin"), dtype=np.uint8, mode="c") if index["weights"] else None
        self._weights = []
        for weight in index["weights"]:
            dtype = np.dtype(weight["dtype"]).newbyteorder("<")
            size = dtype.itemsize
            for dimension in weight["shape"]:
                size *= dimension
            array = blob[weight["offset"] : weight["offset"] + size].view(dtype).reshape(weight["shape"])
            self._weights.append(tf.experimental.dlpack.from_dlpack(array.__dlpack__()))

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        constant = self._tf.constant
        outputs = self._function(*[constant(inputs[name]) for name in self.input_names], *self._weights)
        return {name: value.numpy() for name, value in zip(self.output_names, outputs, strict=True)}


class TensorFlowSavedModel:
    """A SavedModel's serving signature, traced by TensorFlow (the fallback runtime)."""

    def __init__(self, directory: str, signature: str = "serving_default") -> None:
        import tensorflow as tf

        self._tf = tf
        self._loaded = tf.saved_model.load(directory)
        self._function = self._loaded.signatures[signature]
        _, keywords = self._function.structured_input_signature
        self.input_names = list(keywords)
        self.output_names = list(self._function.structured_outputs)

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        outputs = self._function(**{name: self._tf.constant(inputs[name]) for name in self.input_names})
        return {name: outputs[name].numpy() for name in self.output_names}


def signature_key(signatures: dict) -> str:
    """The signature served (by every runner and expertd.prepare): serving_default, else the first."""
    return "serving_default" if "serving_default" in signatures else next(iter(signatures))


def litert_runner(model_path: str, weight_cache: str, threads: int) -> LiteRT | LiteRTInterpreter:
    """The LiteRT runner for a converted model: the interpreter below :data:`SMALL_MODEL` bytes, else CompiledModel."""
    if os.path.getsize(model_path) < SMALL_MODEL:
        return LiteRTInterpreter(model_path, threads)
    return LiteRT(model_path, weight_cache, threads)


def preload(runtimes: set[str]) -> None:
    """Import the runtimes' modules, in the master, so that every worker shares them.

    Importing loads the libraries and starts nothing (no thread, no
    environment, no TensorFlow runtime).  Measured with two workers serving
    two LiteRT models: 9 MiB private per worker instead of 17 (each worker
    otherwise relocates LiteRT's libraries in private pages), and ready 0.04 s
    after fork instead of 0.15 s; TensorFlow imported in each worker instead
    costs about 170 MiB private per worker.
    """
    if runtimes & {"tensorflow", "tensorflow-graph"}:
        import tensorflow  # noqa: F401
    if "litert" not in runtimes:
        return
    import ai_edge_litert.compiled_model
    import ai_edge_litert.cpu_options
    import ai_edge_litert.environment
    import ai_edge_litert.hardware_accelerator
    import ai_edge_litert.interpreter
    import ai_edge_litert.options
    import ai_edge_litert.tensor_buffer  # noqa: F401


def _package_file() -> str:
    import ai_edge_litert

    return ai_edge_litert.__file__
