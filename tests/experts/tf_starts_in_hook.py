"""A before_fork hook that runs a TensorFlow op in the master."""

from expertd import expert

_state = {}


def load_and_build():
    import tensorflow as tf

    _state["w"] = tf.Variable(tf.zeros((4, 4)))


@expert(before_fork=load_and_build)
def opinion(document):
    return document
