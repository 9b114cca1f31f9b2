"""Can forked workers share model weights instead of each holding a copy?

    python bench/weight_sharing.py

The master prepares an 80 MiB float32 weight matrix as a plain numpy array
(as a before_fork hook would), freezes the GC and forks.  Each child turns the
array into TensorFlow state in one of three ways, runs a tf.function over it
20 times, and reports how much its private memory (USS) and PSS grew:

* ``keras``   — a Dense layer and ``set_weights`` (what most Keras code does);
* ``convert`` — ``tf.convert_to_tensor(array)`` captured by the tf.function;
* ``dlpack``  — ``tf.experimental.dlpack.from_dlpack(array.__dlpack__())`` on a
  64-byte-aligned array: TensorFlow wraps the master's buffer without copying.

Only the child touches TensorFlow's runtime; the parent never starts it.
"""

from __future__ import annotations

import gc
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
import psutil
import tensorflow as tf

MIB = 2**20
SHAPE = (4096, 5120)


def aligned_array(shape: tuple[int, ...], dtype=np.float32, alignment: int = 64) -> np.ndarray:
    """An uninitialised array whose data starts on an ``alignment``-byte boundary (TensorFlow needs 64)."""
    size = int(np.prod(shape)) * np.dtype(dtype).itemsize
    raw = np.empty(size + alignment, dtype=np.uint8)
    offset = (-raw.ctypes.data) % alignment
    return raw[offset : offset + size].view(dtype).reshape(shape)


def child(method: str, weights: np.ndarray) -> None:
    import keras

    process = psutil.Process()
    x = tf.constant(np.ones((8, SHAPE[0]), dtype=np.float32))
    tf.matmul(x, tf.ones((SHAPE[0], 2)))  # start the runtime before the baseline
    before = process.memory_full_info()
    if method == "keras":
        layer = keras.layers.Dense(SHAPE[1], use_bias=False)
        layer.build((None, SHAPE[0]))
        layer.set_weights([weights])
        function = tf.function(lambda t: layer(t))
    else:
        if method == "dlpack":
            tensor = tf.experimental.dlpack.from_dlpack(weights.__dlpack__())
        else:
            tensor = tf.convert_to_tensor(weights)
        function = tf.function(lambda t: tf.matmul(t, tensor))
    for _ in range(20):
        result = function(x)
    after = process.memory_full_info()
    checksum = float(tf.reduce_sum(result))
    uss, pss = (after.uss - before.uss) / MIB, (after.pss - before.pss) / MIB
    print(f"| {method} | {uss:.0f} | {pss:.0f} | {checksum:.4g} |", flush=True)


def main() -> int:
    weights = aligned_array(SHAPE)
    weights[:] = np.random.default_rng(0).random(SHAPE, dtype=np.float32)
    gc.freeze()
    print(f"weights: {weights.nbytes / MIB:.0f} MiB float32, prepared in the parent before fork")
    print()
    print("| method | worker USS growth (MiB) | worker PSS growth (MiB) | checksum |")
    print("| --- | --- | --- | --- |")
    for method in ("keras", "convert", "dlpack"):
        pid = os.fork()
        if pid == 0:
            try:
                child(method, weights)
            finally:
                os._exit(0)
        os.waitpid(pid, 0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
