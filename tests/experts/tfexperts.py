"""TensorFlow experts for the tests: big enough ops that TensorFlow shards them across its thread pool."""

import numpy as np

from expertd import expert

_inputs = {}
_compiled = {}


def _prepare():
    # Master, before fork: plain numpy only.
    rng = np.random.default_rng(7)
    _inputs["x"] = rng.random((256, 512), dtype=np.float32)
    _inputs["w"] = rng.random((512, 1024), dtype=np.float32)


def _build():
    # Worker, after fork: start the runtime, trace, warm up.
    import tensorflow as tf

    w = tf.constant(_inputs["w"])
    _compiled["f"] = tf.function(lambda x: tf.reduce_sum(tf.nn.relu(tf.matmul(x, w)), axis=1))
    _compiled["f"](tf.constant(_inputs["x"]))


@expert(before_fork=_prepare, after_fork=_build)
def matmul(scale: float = 1.0) -> float:
    """A 256x512 @ 512x1024 matmul under tf.function; returns a checksum."""
    import tensorflow as tf

    return round(float(tf.reduce_sum(_compiled["f"](tf.constant(_inputs["x"] * scale))).numpy()), -2)


@expert(before_fork=_prepare, after_fork=_build)
def eager_matmul(scale: float = 1.0) -> float:
    """The same product, computed eagerly."""
    import tensorflow as tf

    x = tf.constant(_inputs["x"] * scale)
    return round(float(tf.reduce_sum(tf.nn.relu(tf.matmul(x, tf.constant(_inputs["w"])))).numpy()), -2)


def threads() -> dict:
    """The worker's TensorFlow thread settings."""
    import os

    import tensorflow as tf

    return {
        "intra": tf.config.threading.get_intra_op_parallelism_threads(),
        "inter": tf.config.threading.get_inter_op_parallelism_threads(),
        "env_intra": os.environ.get("TF_NUM_INTRAOP_THREADS"),
    }


def _fail_after_building():
    import tensorflow as tf

    tf.ones((2, 2))
    raise RuntimeError("model file is corrupt")


@expert(after_fork=_fail_after_building)
def broken_model(document):
    """Never serves: its after_fork hook raises."""
    return document
