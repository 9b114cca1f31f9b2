"""A TensorFlow expert: the sentiment of a document's ``text``.

Set-up follows the fork rule (docs/experts.md):

* ``read_model`` runs once in the master, before fork: it reads model.npz
  into plain numpy arrays and hashes the file for the model version.  No
  TensorFlow op runs, so the runtime is not started and every worker shares
  these pages copy-on-write.
* ``build_model`` runs in every worker, after fork: it builds the Keras
  model from those arrays, traces one ``tf.function`` (any batch size) and
  warms it up, before the worker takes requests.

Opinions are deterministic: the same text gives the same score.
"""

from __future__ import annotations

import hashlib
import io
import os

import numpy as np

from expertd import expert
from sentiment.model import encode

MODEL_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "model.npz")

_vocabulary: dict[str, int] = {}
_weights: list[np.ndarray] = []
_version = ""
_predict = None  # the traced tf.function, per worker


def read_model() -> None:
    """Master, before fork: read the weights and vocabulary into numpy arrays."""
    global _version
    with open(MODEL_FILE, "rb") as handle:
        data = handle.read()
    _version = hashlib.sha256(data).hexdigest()[:16]
    with np.load(io.BytesIO(data)) as arrays:
        words = arrays["vocabulary"].tolist()
        count = sum(1 for name in arrays.files if name.startswith("weight_"))
        _weights[:] = [arrays[f"weight_{i}"] for i in range(count)]
    _vocabulary.clear()
    _vocabulary.update((word, index) for index, word in enumerate(words, start=2))


def build_model() -> None:
    """Worker, after fork: build the model, trace the tf.function, warm it up."""
    global _predict
    import tensorflow as tf

    from sentiment.model import SEQUENCE_LENGTH, build

    model = build(len(_vocabulary) + 2)
    model.set_weights(_weights)
    _predict = tf.function(
        lambda ids: model(ids, training=False),
        input_signature=[tf.TensorSpec([None, SEQUENCE_LENGTH], tf.int32)],
        reduce_retracing=True,
    )
    for batch in (1, 64):  # the first calls allocate; do them before taking requests
        _predict(tf.zeros((batch, SEQUENCE_LENGTH), tf.int32))


def _scores(texts: list[str]) -> list[float]:
    probabilities = _predict(encode(texts, _vocabulary)).numpy()[:, 0]
    # Rounded so that float noise from thread scheduling can never show.
    return [round(float(p), 4) for p in probabilities]


def _opinion(score: float) -> dict:
    return {"label": "positive" if score >= 0.5 else "negative", "score": score, "model": _version}


def _text_of(document: object, where: str) -> str:
    if not isinstance(document, dict) or not isinstance(document.get("text"), str):
        raise ValueError(f"{where}: sentiment expects a document with a 'text' string")
    return document["text"]


@expert(before_fork=read_model, after_fork=build_model)
def opinion(document: dict) -> dict:
    """Sentiment of document['text']: label, score (probability of positive) and model version."""
    return _opinion(_scores([_text_of(document, "document")])[0])


@expert(before_fork=read_model, after_fork=build_model)
def opinions(documents: list) -> list:
    """Sentiment of many documents in one batch (same opinions as calling sentiment on each)."""
    if not isinstance(documents, list):
        raise ValueError("sentiment_batch expects a list of documents")
    texts = [_text_of(document, f"documents[{i}]") for i, document in enumerate(documents)]
    return [_opinion(score) for score in _scores(texts)] if texts else []
