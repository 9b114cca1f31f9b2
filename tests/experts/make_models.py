"""Build the small seeded models the model-expert tests serve: ``python make_models.py DIR``.

Run in a child process of the test session, so that the test process itself
never starts TensorFlow's runtime.  Each model comes with ``NAME.npz``: inputs
and Keras' (or TensorFlow's) own outputs for them, which the tests compare the
daemon's answers against.
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras
import numpy as np
import tensorflow as tf


def seeded(model: keras.Model, seed: int) -> keras.Model:
    generator = np.random.default_rng(seed)
    model.set_weights([generator.standard_normal(w.shape).astype(np.float32) * 0.3 for w in model.get_weights()])
    return model


def mlp(seed: int, width: int = 16) -> keras.Model:
    inputs = keras.Input((8,), name="x")
    hidden = keras.layers.Dense(width, activation="relu")(inputs)
    outputs = keras.layers.Dense(3, name="scores")(hidden)
    return seeded(keras.Model(inputs, outputs), seed)


def multi() -> keras.Model:
    features = keras.Input((4,), name="features")
    ids = keras.Input((5,), dtype="int32", name="ids")
    embedded = keras.layers.GlobalAveragePooling1D()(keras.layers.Embedding(10, 3)(ids))
    joined = keras.layers.Concatenate()([features, embedded])
    score = keras.layers.Dense(1, activation="sigmoid", name="score")(joined)
    vector = keras.layers.Dense(2, name="vector")(joined)
    return seeded(keras.Model({"features": features, "ids": ids}, {"score": score, "vector": vector}), 7)


def big() -> keras.Model:
    """64 MiB of float32 weights: enough for sharing between workers to show in their USS."""
    inputs = keras.Input((2048,), name="x")
    hidden = keras.layers.Dense(4096, activation="relu")(inputs)
    outputs = keras.layers.Dense(2048)(hidden)
    return seeded(keras.Model(inputs, outputs), 3)


class Unsupported(tf.Module):
    """A model with an op (Igamma) outside TensorFlow Lite's builtin set: served on TensorFlow."""

    @tf.function(input_signature=[tf.TensorSpec([None, 4], tf.float32, name="x")])
    def serve(self, x):
        return {"y": tf.math.igamma(tf.abs(x) + 1.0, tf.abs(x) + 2.0)}


class UnsupportedBig(tf.Module):
    """64 MiB of weights behind an op LiteRT lacks: the TensorFlow fallback must still share the weights."""

    def __init__(self) -> None:
        super().__init__()
        generator = np.random.default_rng(5)
        self.w = tf.Variable(generator.standard_normal((4096, 4096)).astype(np.float32) * 0.01)

    @tf.function(input_signature=[tf.TensorSpec([None, 4096], tf.float32, name="x")])
    def serve(self, x):
        return {"y": tf.math.igamma(tf.abs(tf.matmul(x, self.w)) + 1.0, 2.0)}


class Log(tf.Module):
    """log1p: NaN for inputs below -1, which the reference inputs (standard normal) contain."""

    @tf.function(input_signature=[tf.TensorSpec([None, 4], tf.float32, name="x")])
    def serve(self, x):
        return {"y": tf.math.log1p(x)}


def main(directory: str) -> None:
    generator = np.random.default_rng(1)
    x = generator.standard_normal((6, 8)).astype(np.float32)
    for name, model in (("mlp", mlp(1)), ("mlp2", mlp(2))):
        model.save(os.path.join(directory, f"{name}.keras"))
        np.savez(os.path.join(directory, f"{name}.npz"), x=x, y=model(x).numpy())
    first = keras.models.load_model(os.path.join(directory, "mlp.keras"))
    first.export(os.path.join(directory, "mlp_saved_model"), verbose=False)
    converter = tf.lite.TFLiteConverter.from_saved_model(os.path.join(directory, "mlp_saved_model"))
    with open(os.path.join(directory, "mlp.tflite"), "wb") as handle:
        handle.write(converter.convert())

    model = multi()
    model.save(os.path.join(directory, "multi.keras"))
    features = generator.standard_normal((4, 4)).astype(np.float32)
    ids = generator.integers(0, 10, (4, 5)).astype(np.int32)
    out = model({"features": features, "ids": ids})
    np.savez(os.path.join(directory, "multi.npz"), features=features, ids=ids,
             score=out["score"].numpy(), vector=out["vector"].numpy())

    model = big()
    model.save(os.path.join(directory, "big.keras"))

    module = Unsupported()
    tf.saved_model.save(module, os.path.join(directory, "unsupported"), signatures={"serving_default": module.serve})
    u = np.abs(generator.standard_normal((3, 4)).astype(np.float32))
    np.savez(os.path.join(directory, "unsupported.npz"), x=u, y=module.serve(u)["y"].numpy())

    module = Log()
    tf.saved_model.save(module, os.path.join(directory, "log1p"), signatures={"serving_default": module.serve})

    module = UnsupportedBig()
    tf.saved_model.save(module, os.path.join(directory, "unsupported_big"),
                        signatures={"serving_default": module.serve})
    u = generator.standard_normal((2, 4096)).astype(np.float32)
    np.savez(os.path.join(directory, "unsupported_big.npz"), x=u, y=module.serve(u)["y"].numpy())


if __name__ == "__main__":
    main(sys.argv[1])
