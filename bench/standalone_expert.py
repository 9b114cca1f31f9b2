"""One independent process serving the sentiment model: what expertd replaces.

Imports TensorFlow, loads the shipped Keras model and traces it, answers once, prints
"ready", then waits for stdin to close (bench/memory.py runs several side by
side).  With ``--once TEXT`` it prints the opinion on TEXT and exits: the
fresh-process expert of a stdin/stdout pipeline (bench/compare.py times it).
"""

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
HERE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "examples")
sys.path.insert(0, HERE)

import keras  # noqa: E402
import tensorflow as tf  # noqa: E402
from sentiment.model import SEQUENCE_LENGTH, encode  # noqa: E402

# What a script without expertd does: load the Keras model and trace it.
model = keras.models.load_model(os.path.join(HERE, "sentiment", "sentiment.keras"))
predict = tf.function(lambda ids: model(ids, training=False),
                      input_signature=[tf.TensorSpec([None, SEQUENCE_LENGTH], tf.int32)])
with open(os.path.join(HERE, "sentiment", "vocabulary.txt"), encoding="utf-8") as words:
    vocabulary = {word: index for index, word in enumerate(words.read().split(), start=2)}


def opinion(document: dict) -> dict:
    score = round(float(predict(encode([document["text"]], vocabulary)).numpy()[0, 0]), 4)
    return {"label": "positive" if score >= 0.5 else "negative", "score": score}


if sys.argv[1:2] == ["--once"]:
    # The stdin/stdout expert expertd replaces: one document in, one opinion out, exit.
    print(opinion({"text": " ".join(sys.argv[2:]) or "what a wonderful day"}), flush=True)
    sys.exit(0)
opinion({"text": "warming up"})
print("ready", flush=True)
sys.stdin.read()
