"""The classic mistake: a model built at import time starts TensorFlow's runtime in the master."""

import keras

MODEL = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])


def opinion(document):
    return MODEL(document)
