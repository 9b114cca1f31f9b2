"""Prepare a model for serving, in a child process: ``python -m expertd.prepare SOURCE OUTDIR``.

Run by :mod:`expertd.modelcache` (never imported by the master: this starts
TensorFlow's runtime).  Into OUTDIR it writes

1. the model in the serving format: Keras files are exported as a SavedModel,
   a SavedModel is converted to ``model.tflite`` with TensorFlow Lite's
   builtin ops only; a ``.tflite`` file is copied;
2. ``reference.npz``: a few seeded input rows and the *original* model's
   outputs for them (Keras' own call, or the SavedModel's serving function),
   which every worker checks its own outputs against before serving;
3. ``xnnpack.cache``: XNNPACK's packed weights, built here once so that the
   workers only map it (its first builder would otherwise write it while
   others read it);
4. ``manifest.json``: runtime, inputs and outputs (name, dtype, shape with
   -1 for any size), warnings.

A model LiteRT cannot express (ops outside the builtin set), or whose
converted outputs differ from the original's, runs on TensorFlow instead, with
a warning naming why: as a frozen graph whose weights lie in ``weights.bin``
for the workers to map (shared), or, when the function cannot be frozen, as
the SavedModel itself (each worker then holds its own copy).  Errors end the process
with one line on stderr: ``expertd.prepare: error: ...``.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import re
import shutil
import sys
import tempfile
import time
from typing import Any

import numpy as np

from expertd.modelcache import FORMAT, MANIFEST, model_kind

REFERENCE_ROWS = 3
DYNAMIC_SIZE = 8  # any non-batch dimension of unknown size in the reference inputs
# Outputs must agree with the original model's within this (relative to the outputs' largest magnitude).
TOLERANCE = 1e-4


class PrepareError(Exception):
    """Preparation failed; the message is the one line the daemon shows."""


def agree(got: np.ndarray, expected: np.ndarray) -> tuple[bool, float]:
    """Whether ``got`` matches ``expected`` within :data:`TOLERANCE`, and the largest difference.

    NaN and infinities must stand at the same places with the same signs (a
    model may well compute them, e.g. log of a negative input); the finite
    values must agree within the tolerance.
    """
    if got.shape != expected.shape:
        return False, float("inf")
    if got.size == 0:
        return True, 0.0
    got, expected = got.astype(np.float64), expected.astype(np.float64)
    finite = np.isfinite(expected)
    if not np.array_equal(np.isfinite(got), finite) or not np.array_equal(got[~finite], expected[~finite],
                                                                          equal_nan=True):
        return False, float("inf")
    if not finite.any():
        return True, 0.0
    difference = float(np.max(np.abs(got[finite] - expected[finite])))
    scale = max(1.0, float(np.max(np.abs(expected[finite]))))
    return difference <= TOLERANCE * scale, difference


def _spec(name: str, dtype: Any, shape: Any) -> dict[str, Any]:
    dims = [-1 if d is None else int(d) for d in (shape.as_list() if hasattr(shape, "as_list") else shape)]
    return {"name": name, "dtype": np.dtype(dtype).name, "shape": dims}


def reference_inputs(inputs: list[dict[str, Any]], rows: int = REFERENCE_ROWS) -> dict[str, np.ndarray]:
    """Seeded inputs of every declared input: normal floats, 0/1 integers (valid ids for any embedding)."""
    generator = np.random.default_rng(20261125)
    made = {}
    for spec in inputs:
        shape = [rows] + [DYNAMIC_SIZE if d < 0 else d for d in spec["shape"][1:]]
        dtype = np.dtype(spec["dtype"])
        if dtype.kind == "f":
            made[spec["name"]] = generator.standard_normal(shape).astype(dtype)
        elif dtype.kind in "iub":
            made[spec["name"]] = generator.integers(0, 2, size=shape).astype(dtype)
        else:
            raise PrepareError(f"input {spec['name']!r} has dtype {dtype.name}, which model experts do not serve")
    return made


def _saved_model_signature(directory: str) -> tuple[Any, list[dict], list[dict]]:
    import tensorflow as tf

    loaded = tf.saved_model.load(directory)
    if "serving_default" not in loaded.signatures:
        raise PrepareError(f"{directory} has no serving_default signature; export it with one")
    function = loaded.signatures["serving_default"]
    _, keywords = function.structured_input_signature
    # Sorted by name: the order a SavedModel lists them in varies from one export to the next.
    inputs = [_spec(name, spec.dtype.as_numpy_dtype, spec.shape) for name, spec in sorted(keywords.items())]
    outputs = [_spec(name, spec.dtype.as_numpy_dtype, spec.shape)
               for name, spec in sorted(function.structured_outputs.items())]
    _check_batch_dimension(inputs, "export the model with a batch dimension of any size (None)")
    return loaded, inputs, outputs


def _run_signature(loaded: Any, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    import tensorflow as tf

    outputs = loaded.signatures["serving_default"](**{name: tf.constant(value) for name, value in inputs.items()})
    return {name: value.numpy() for name, value in outputs.items()}


def _keras_to_saved_model(source: str, out: str) -> tuple[str, Any]:
    import keras

    try:
        model = keras.models.load_model(source, compile=False)
    except Exception as exc:
        raise PrepareError(f"Keras cannot load {source}: {type(exc).__name__}: {_one_line(exc)}") from None
    exported = os.path.join(out, "saved_model")
    try:
        model.export(exported, format="tf_saved_model", verbose=False)
    except Exception as exc:
        raise PrepareError(f"exporting {source} as a SavedModel failed: {type(exc).__name__}: {_one_line(exc)}"
                           ) from None
    return exported, model


def _keras_reference(model: Any, inputs: dict[str, np.ndarray], outputs: list[dict],
                     exported: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Keras' own outputs by the export's output names, and the export's names -> Keras' names where they differ.

    A dict of outputs is exported under its keys; a list (or one output) as
    ``output_0``, ``output_1``, ... in order.  Where the two cannot be matched
    the export's own outputs are the reference.
    """
    given = inputs if len(inputs) > 1 else next(iter(inputs.values()))
    got = model(given, training=False)
    names = [spec["name"] for spec in outputs]
    if isinstance(got, dict):
        if set(got) == set(names):
            return {name: np.asarray(got[name]) for name in names}, {}
        return exported, {}
    values = list(got) if isinstance(got, (list, tuple)) else [got]
    numbered = sorted(names, key=lambda n: int(n.rsplit("_", 1)[1]) if re.fullmatch(r"output_\d+", n) else -1)
    if len(values) != len(names) or not all(re.fullmatch(r"output_\d+", n) for n in names):
        return exported, {}
    keras_names = list(getattr(model, "output_names", []))
    renamed = dict(zip(numbered, keras_names, strict=True)) if len(keras_names) == len(names) else {}
    return {name: np.asarray(value) for name, value in zip(numbered, values, strict=True)}, renamed


LIFTED_MIN_BYTES = 1024  # constants at least this large are weights, mapped from weights.bin


def _lift_weights(loaded: Any, out: str, reference_in: dict[str, np.ndarray],
                  reference_out: dict[str, np.ndarray]) -> dict | None:
    """The serving function as a frozen graph whose weights are inputs, and the weights in one file.

    Writes ``graph.pb`` (the graph, weights replaced by placeholders),
    ``weights.bin`` (each weight 64-byte aligned: TensorFlow's alignment) and
    ``graph.json`` (names, and where each weight lies).  A worker maps
    weights.bin and hands TensorFlow the mapped memory through DLPack, which
    TensorFlow uses without copying (``tf.constant`` and ``convert_to_tensor``
    always copy), so the weights stay in the page cache, once.  Returns the
    index, or None when the function cannot be frozen or the result differs
    from the original.
    """
    import tensorflow as tf
    from tensorflow.python.framework import tensor_util
    from tensorflow.python.framework.convert_to_constants import convert_variables_to_constants_v2_as_graph

    function = loaded.signatures["serving_default"]
    try:
        frozen, graph = convert_variables_to_constants_v2_as_graph(function)
    except Exception:
        return None
    _, keywords = function.structured_input_signature
    input_names = sorted(keywords)  # the order the frozen function's inputs take (tf.nest sorts keys)
    output_names = tf.nest.flatten({name: name for name in function.structured_outputs})
    if len(input_names) != len(frozen.inputs) or len(output_names) != len(frozen.outputs):
        return None
    weights, offset = [], 0
    with open(os.path.join(out, "weights.bin"), "wb") as blob:
        for node in graph.node:
            if node.op != "Const":
                continue
            value = tensor_util.MakeNdarray(node.attr["value"].tensor)
            if value.nbytes < LIFTED_MIN_BYTES or value.dtype.kind not in "biuf":
                continue
            pad = -offset % 64
            blob.write(b"\0" * pad)
            offset += pad
            blob.write(np.ascontiguousarray(value).astype(value.dtype.newbyteorder("<")).tobytes())
            weights.append({"tensor": f"{node.name}:0", "dtype": value.dtype.name, "shape": list(value.shape),
                            "offset": offset})
            offset += value.nbytes
            node.op = "Placeholder"
            del node.attr["value"]
            node.attr["shape"].shape.CopyFrom(tf.TensorShape(value.shape).as_proto())
    with open(os.path.join(out, "graph.pb"), "wb") as handle:
        handle.write(graph.SerializeToString())
    index = {"inputs": {name: tensor.name for name, tensor in zip(input_names, frozen.inputs, strict=True)},
             "outputs": {name: tensor.name for name, tensor in zip(output_names, frozen.outputs, strict=True)},
             "weights": weights}
    with open(os.path.join(out, "graph.json"), "w", encoding="utf-8") as handle:
        json.dump(index, handle)
    from expertd.model_runtimes import TensorFlowGraph

    try:
        got = TensorFlowGraph(out).run(reference_in)
    except Exception:
        got = {}
    if not all(agree(got.get(name, np.empty(0)), value)[0] for name, value in reference_out.items()):
        for name in ("graph.pb", "graph.json", "weights.bin"):
            os.remove(os.path.join(out, name))
        return None
    return index


def _convert(saved_model: str) -> tuple[bytes | None, str]:
    """The TFLite flatbuffer (builtin ops only), or None and why not."""
    import tensorflow as tf

    converter = tf.lite.TFLiteConverter.from_saved_model(saved_model)
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
    try:
        return converter.convert(), ""
    except Exception as exc:
        message = _one_line(exc)
        ops = sorted(set(re.findall(r"'(tf\.[A-Za-z0-9_]+)'", message))) or sorted(
            set(re.findall(r"\b(tf\.[A-Z][A-Za-z0-9_]+)", message)))
        why = f"ops outside TensorFlow Lite's builtin set: {', '.join(ops)}" if ops else message[:300]
        return None, why


def _litert_outputs(out: str, inputs: dict[str, np.ndarray], threads: int = 1) -> dict[str, np.ndarray]:
    """The converted model's outputs, on the runner workers will use (building XNNPACK's weight cache for it)."""
    from expertd.model_runtimes import litert_runner

    return litert_runner(os.path.join(out, "model.tflite"), os.path.join(out, "xnnpack.cache"), threads).run(inputs)


def _litert_specs(model_path: str) -> tuple[list[dict], list[dict]]:
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_path=model_path)
    signatures = interpreter.get_signature_list()
    if not signatures:
        raise PrepareError(f"{model_path} has no signature; convert it with TFLiteConverter.from_saved_model or "
                           "from_keras_model, which give it one (serving_default)")
    from expertd.model_runtimes import signature_key

    runner = interpreter.get_signature_runner(signature_key(signatures))
    inputs = [_spec(name, d["dtype"], d.get("shape_signature", d["shape"]))
              for name, d in sorted(runner.get_input_details().items())]
    outputs = [_spec(name, d["dtype"], d.get("shape_signature", d["shape"]))
               for name, d in sorted(runner.get_output_details().items())]
    _check_batch_dimension(inputs, "convert the model with a batch dimension of any size (None)")
    return inputs, outputs


def _check_batch_dimension(inputs: list[dict], what_to_do: str) -> None:
    for spec in inputs:
        if not spec["shape"] or spec["shape"][0] != -1:
            raise PrepareError(f"input {spec['name']!r} has shape {spec['shape']}: its first dimension must be the "
                               f"batch, of any size; {what_to_do}")


def _copy_source(source: str, out: str, sha256: str) -> str:
    """A private copy of the model to prepare from, checked against the hash the entry is named by.

    The daemon hashed the file before starting this process; a file replaced
    in between (a deploy landing) would otherwise be cached under the old
    content's name.
    """
    from expertd.modelcache import content_hash

    copy = os.path.join(out, "source" + ("" if os.path.isdir(source) else os.path.splitext(source)[1]))
    if os.path.isdir(source):
        shutil.copytree(source, copy)
    else:
        shutil.copyfile(source, copy)
    if content_hash(copy) != sha256:
        raise PrepareError(f"{source} changed while it was being prepared; start or reload again once it is "
                           "written whole (deploy model files by renaming them into place)")
    return copy


def prepare(source: str, out: str, sha256: str) -> dict[str, Any]:
    """Prepare ``source`` into ``out``; returns the manifest (also written there)."""
    started = time.monotonic()
    kind = model_kind(source)
    warnings: list[str] = []
    output_names: dict[str, str] = {}
    original, source = source, _copy_source(source, out, sha256)
    try:
        runtime, inputs, outputs, reference_in, reference_out, output_names, why = _prepare_from(
            source, kind, out, original)
    except ModuleNotFoundError as exc:
        raise PrepareError(f"preparing models needs {exc.name}, which is not installed; install expertd with the "
                           "tensorflow extra: pip install 'expertd[tensorflow]'") from None
    except Exception as exc:  # messages name the original, not the private copy
        prefix = "" if isinstance(exc, PrepareError) else f"{type(exc).__name__}: "
        raise PrepareError(prefix + _one_line(exc).replace(source, original)) from None
    finally:
        if os.path.isdir(source):
            shutil.rmtree(source)
        else:
            os.remove(source)
    if why:
        warnings.append(f"{original} runs on TensorFlow, not LiteRT ({why}); " + (
            "the weights are still shared by every worker, but calls cost TensorFlow's overhead"
            if runtime == "tensorflow-graph" else
            "each worker holds its own copy of the weights and calls cost TensorFlow's overhead"))
    source = original
    np.savez(os.path.join(out, "reference.npz"),
             **{f"in:{k}": v for k, v in reference_in.items()}, **{f"out:{k}": v for k, v in reference_out.items()})
    manifest = {
        "format": FORMAT,
        "runtime": runtime,
        "source": source,
        "kind": kind,
        "sha256": sha256,
        "inputs": inputs,
        "outputs": outputs,
        "output_names": output_names,  # runtime name -> the model's own name, where they differ
        "warnings": warnings,
        "prepared_at": time.time(),
        "prepare_seconds": round(time.monotonic() - started, 3),
    }
    with open(os.path.join(out, MANIFEST), "w", encoding="utf-8") as handle:
        json.dump(manifest, handle, indent=1)
    return manifest


def _prepare_from(source: str, kind: str, out: str, original: str) -> tuple:
    """(runtime, inputs, outputs, reference inputs, reference outputs, output names, why not LiteRT)."""
    output_names: dict[str, str] = {}
    why = ""
    if kind == "tflite":
        shutil.copyfile(source, os.path.join(out, "model.tflite"))
        inputs, outputs = _litert_specs(os.path.join(out, "model.tflite"))
        reference_in = reference_inputs(inputs)
        # The original is the converted model itself: the reference guards the copy in the cache.
        reference_out = _litert_outputs(out, reference_in)
        runtime = "litert"
    else:
        with tempfile.TemporaryDirectory(dir=out) as scratch:
            if kind == "keras":
                saved_model, keras_model = _keras_to_saved_model(source, scratch)
            else:
                saved_model, keras_model = source, None
            loaded, inputs, outputs = _saved_model_signature(saved_model)
            reference_in = reference_inputs(inputs)
            reference_out = _run_signature(loaded, reference_in)
            if keras_model is not None:
                # The reference comes from Keras itself, not from the export being checked.
                reference_out, output_names = _keras_reference(keras_model, reference_in, outputs, reference_out)
            flatbuffer, why = _convert(saved_model)
            runtime = "litert"
            if flatbuffer is not None:
                with open(os.path.join(out, "model.tflite"), "wb") as handle:
                    handle.write(flatbuffer)
                try:
                    got = _litert_outputs(out, reference_in)
                except Exception as exc:  # e.g. an output whose shape depends on the data
                    got, why = {}, f"LiteRT cannot run it: {_one_line(exc)[:200]}"
                    flatbuffer = None
                for name, expected in reference_out.items() if flatbuffer is not None else ():
                    ok, difference = agree(got.get(name, np.empty(0)), expected)
                    if not ok:
                        why = f"LiteRT's output {name!r} differs from the original's by {difference:.3g}"
                        flatbuffer = None
                        break
            if flatbuffer is None:
                for name in ("model.tflite", "xnnpack.cache"):
                    if os.path.exists(os.path.join(out, name)):
                        os.remove(os.path.join(out, name))
                lifted = _lift_weights(loaded, out, reference_in, reference_out)
                if lifted is None:
                    runtime = "tensorflow"
                    shutil.copytree(saved_model, os.path.join(out, "saved_model"))
                else:
                    runtime = "tensorflow-graph"
    return runtime, inputs, outputs, reference_in, reference_out, output_names, why


def _die_with(parent: int) -> None:
    """A master killed mid-preparation takes this process with it (set here, not between fork and exec)."""
    import ctypes
    import signal

    ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG
    if os.getppid() != parent:  # it was gone before the line above took effect
        sys.exit(1)


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m expertd.prepare", description=__doc__.splitlines()[0])
    parser.add_argument("source", help="a .keras/.h5/.tflite file or a SavedModel directory")
    parser.add_argument("out", help="an empty directory to prepare into")
    parser.add_argument("--sha256", required=True, help="the source's content hash, recorded in the manifest")
    parser.add_argument("--parent", type=int, help="exit when this process (the daemon's master) is gone")
    parser.add_argument("--import", dest="imports", action="append", default=[], metavar="MODULE",
                        help="import MODULE first (the expert modules, which register a Keras model's custom objects)")
    args = parser.parse_args(argv)
    if args.parent:
        _die_with(args.parent)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    try:
        for module in args.imports:
            try:
                importlib.import_module(module)
            except Exception as exc:
                raise PrepareError(f"importing {module} (for the model's custom objects) failed: "
                                   f"{type(exc).__name__}: {_one_line(exc)}") from None
        prepare(os.path.abspath(args.source), args.out, args.sha256)
    except (PrepareError, ValueError, OSError) as exc:
        print(f"expertd.prepare: error: {_one_line(exc)}", file=sys.stderr)
        return 1
    except Exception as exc:
        print(f"expertd.prepare: error: {type(exc).__name__}: {_one_line(exc)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
