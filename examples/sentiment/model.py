"""The sentiment model's shape and tokeniser, shared by training (train.py) and serving (__init__.py).

Text is lower-cased and split into words; each word maps to an id from the
vocabulary (vocabulary.txt; 0 pads, 1 is any unknown word); ids are
padded or cut to SEQUENCE_LENGTH.  The Keras model averages word embeddings
(ignoring padding) and scores them with a small dense network: the output is
the probability that the text is positive.

This module imports Keras only inside :func:`build` (training), so serving
never needs TensorFlow: the expert tokenises here and runs the prepared model.
"""

from __future__ import annotations

import re

import numpy as np

SEQUENCE_LENGTH = 64
EMBEDDING_SIZE = 32
HIDDEN_SIZE = 16
PAD, UNKNOWN = 0, 1
_WORD = re.compile(r"[a-z0-9']+")


def tokenize(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def encode(texts: list[str], vocabulary: dict[str, int]) -> np.ndarray:
    """Word ids, shape (len(texts), SEQUENCE_LENGTH), int32."""
    ids = np.zeros((len(texts), SEQUENCE_LENGTH), dtype=np.int32)
    for row, text in enumerate(texts):
        # A text without words reads as one unknown word: an all-padding row would average nothing (NaN).
        words = [vocabulary.get(word, UNKNOWN) for word in tokenize(text)][:SEQUENCE_LENGTH] or [UNKNOWN]
        ids[row, : len(words)] = words
    return ids


def build(vocabulary_size: int):
    """A fresh, untrained Keras model of the shipped shape."""
    import keras

    inputs = keras.Input((SEQUENCE_LENGTH,), dtype="int32", name="word_ids")
    x = keras.layers.Embedding(vocabulary_size, EMBEDDING_SIZE, mask_zero=True, name="embedding")(inputs)
    x = keras.layers.GlobalAveragePooling1D(name="average")(x)
    x = keras.layers.Dense(HIDDEN_SIZE, activation="relu", name="hidden")(x)
    outputs = keras.layers.Dense(1, activation="sigmoid", name="positive")(x)
    return keras.Model(inputs, outputs, name="sentiment")
