"""A model expert with its own pre- and post-processing: the sentiment of a document's ``text``.

The model (sentiment.keras, a small Keras text classifier) is declared once,
at module level, with :class:`expertd.Model`; expertd does the rest (see
docs/experts.md, "Models in Python experts"):

* at start-up the master has it prepared in a child process (converted for
  LiteRT, weights laid out once in the model cache) without starting
  TensorFlow itself;
* every worker maps the prepared files after fork, checks its outputs against
  Keras' own on reference inputs, and serves calls in microseconds.

This module only tokenises (before the model) and turns the probability into
an opinion (after it).  Opinions are deterministic: the same text gives the
same score, in every worker and every batch.
"""

from __future__ import annotations

import os

from expertd import Model, expert
from sentiment.model import encode

HERE = os.path.dirname(os.path.abspath(__file__))

MODEL = Model("sentiment.keras")  # relative to this file
with open(os.path.join(HERE, "vocabulary.txt"), encoding="utf-8") as _words:
    # Word ids start at 2: 0 pads, 1 stands for any unknown word (sentiment/model.py).
    VOCABULARY = {word: index for index, word in enumerate(_words.read().split(), start=2)}


def _scores(texts: list[str]) -> list[float]:
    probabilities = MODEL.predict(encode(texts, VOCABULARY))[:, 0]
    # Rounded so that float noise from thread scheduling can never show.
    return [round(float(p), 4) for p in probabilities]


def _opinion(score: float) -> dict:
    return {"label": "positive" if score >= 0.5 else "negative", "score": score, "model": MODEL.version}


def _text_of(document: object, where: str) -> str:
    if not isinstance(document, dict) or not isinstance(document.get("text"), str):
        raise ValueError(f"{where}: sentiment expects a document with a 'text' string")
    return document["text"]


@expert(batched=True)
def opinion(documents: list) -> list:
    """Sentiment of document['text']: label, score (probability of positive) and model version.

    Batched: each call passes one document, and the daemon gathers concurrent
    calls into one model run.  A document without a 'text' string fails alone.
    """
    results: list = [None] * len(documents)
    texts, positions = [], []
    for position, document in enumerate(documents):
        try:
            texts.append(_text_of(document, "document"))
            positions.append(position)
        except ValueError as exc:
            results[position] = exc  # (this caller's error; the others get their opinions)
    for position, score in zip(positions, _scores(texts) if texts else [], strict=True):
        results[position] = _opinion(score)
    return results


@expert
def opinions(documents: list) -> list:
    """Sentiment of many documents in one batch (same opinions as calling sentiment on each)."""
    if not isinstance(documents, list):
        raise ValueError("sentiment_batch expects a list of documents")
    texts = [_text_of(document, f"documents[{i}]") for i, document in enumerate(documents)]
    return [_opinion(score) for score in _scores(texts)] if texts else []
