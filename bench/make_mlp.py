"""Build the model benchmark's model: a 192 MiB float32 Keras MLP, saved as .keras.

    python bench/make_mlp.py [PATH]      # default bench/models/mlp192.keras (make bench-model)

2048 → 4096 → 4096 → 4096 → 2048, ReLU between the layers, a linear output:
50.3M parameters, 192 MiB of float32 weights.  The input is named "x".  The
weights come from a seeded numpy generator and are set with set_weights, so
the file's numbers do not depend on Keras's initialisers or TensorFlow's seed:
the same script writes the same model.  They are scaled (He, √(2 / fan-in)) so
that activations keep unit size through the ReLUs and outputs stay O(1).

Does nothing when PATH exists and is newer than this script.
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

ROOT = Path(__file__).resolve().parent.parent
DEFAULT = ROOT / "bench" / "models" / "mlp192.keras"
SIZES = (2048, 4096, 4096, 4096, 2048)
SEED = 12


def weights(seed: int = SEED) -> list:
    """[kernel, bias, kernel, bias, ...] for SIZES, float32, from a seeded generator."""
    import numpy as np

    rng = np.random.default_rng(seed)
    out = []
    for fan_in, fan_out in itertools.pairwise(SIZES):
        kernel = rng.standard_normal((fan_in, fan_out), dtype=np.float32)
        kernel *= np.float32(np.sqrt(2.0 / fan_in))
        bias = rng.standard_normal(fan_out, dtype=np.float32) * np.float32(0.01)
        out += [kernel, bias]
    return out


def build(seed: int = SEED):
    import keras

    inputs = keras.Input(shape=(SIZES[0],), name="x", dtype="float32")
    hidden = inputs
    last = len(SIZES) - 2
    for i, width in enumerate(SIZES[1:]):
        hidden = keras.layers.Dense(width, activation=None if i == last else "relu", dtype="float32",
                                    name=f"dense{i}" if i < last else "y")(hidden)
    model = keras.Model(inputs, hidden, name="mlp192")
    model.set_weights(weights(seed))
    return model


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("path", nargs="?", default=str(DEFAULT), help=f"where to write it (default {DEFAULT})")
    parser.add_argument("--force", action="store_true", help="rebuild even if the file is up to date")
    options = parser.parse_args()
    path = Path(options.path).resolve()
    if (not options.force and path.exists()
            and path.stat().st_mtime > Path(__file__).resolve().stat().st_mtime):
        print(f"{path} is up to date")
        return 0
    started = time.monotonic()
    model = build()
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.stem}.{os.getpid()}.keras")  # Keras wants the suffix
    try:
        model.save(partial)
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)
    params = model.count_params()
    print(f"wrote {path}: {params / 1e6:.1f}M parameters, {params * 4 / 2**20:.0f} MiB float32 weights, "
          f"{path.stat().st_size / 2**20:.0f} MiB file, in {time.monotonic() - started:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
