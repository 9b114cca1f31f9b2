"""Train the sentiment model from corpus.tsv and write sentiment.keras and vocabulary.txt.

    cd examples && python -m sentiment.train      (or: make model)

The Keras file is what the expert serves (``Model("sentiment.keras")``:
expertd prepares it for LiteRT); the vocabulary is one word per line, word
ids counting from 2.  Training is seeded and deterministic, so re-running it
reproduces the committed files' opinions.
"""

from __future__ import annotations

import argparse
import collections
import os
import time

import numpy as np

from sentiment.model import PAD, UNKNOWN, build, encode, tokenize

HERE = os.path.dirname(os.path.abspath(__file__))
SEED = 20261125
MAX_VOCABULARY = 4000
LEARNING_RATE = 0.003


def read_corpus(path: str) -> tuple[list[str], np.ndarray]:
    texts, labels = [], []
    with open(path, encoding="utf-8") as handle:
        header = handle.readline().rstrip("\n").split("\t")
        if header != ["label", "text"]:
            raise SystemExit(f"{path}: the first line must be 'label<TAB>text'")
        for lineno, line in enumerate(handle, 2):
            label, sep, text = line.rstrip("\n").partition("\t")
            if not sep or label not in ("positive", "negative"):
                raise SystemExit(f"{path}:{lineno}: expected 'positive|negative<TAB>text'")
            texts.append(text)
            labels.append(1.0 if label == "positive" else 0.0)
    return texts, np.array(labels, dtype=np.float32)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", default=os.path.join(HERE, "corpus.tsv"))
    parser.add_argument("--output", default=os.path.join(HERE, "sentiment.keras"))
    parser.add_argument("--vocabulary", default=os.path.join(HERE, "vocabulary.txt"))
    parser.add_argument("--epochs", type=int, default=10)
    options = parser.parse_args()

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import keras
    import tensorflow as tf

    keras.utils.set_random_seed(SEED)
    tf.config.experimental.enable_op_determinism()
    started = time.monotonic()

    texts, labels = read_corpus(options.corpus)
    order = np.random.default_rng(SEED).permutation(len(texts))
    held_out = set(order[: len(texts) // 5].tolist())
    train_idx = [i for i in range(len(texts)) if i not in held_out]
    test_idx = sorted(held_out)

    counts = collections.Counter(word for i in train_idx for word in tokenize(texts[i]))
    words = [word for word, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))][:MAX_VOCABULARY]
    vocabulary = {word: index for index, word in enumerate(words, start=2)}  # 0 pads, 1 is unknown
    assert PAD == 0 and UNKNOWN == 1

    def fit(indices: list[int]):
        model = build(len(vocabulary) + 2)
        model.compile(optimizer=keras.optimizers.Adam(LEARNING_RATE), loss="binary_crossentropy", metrics=["accuracy"])
        x = encode([texts[i] for i in indices], vocabulary)
        model.fit(x, labels[indices], epochs=options.epochs, batch_size=32, verbose=0, shuffle=True)
        return model

    model = fit(train_idx)
    _, held_out_accuracy = model.evaluate(encode([texts[i] for i in test_idx], vocabulary), labels[test_idx], verbose=0)
    # The shipped model learns from every example, with the vocabulary of all of them.
    counts = collections.Counter(word for text in texts for word in tokenize(text))
    words = [word for word, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))][:MAX_VOCABULARY]
    vocabulary = {word: index for index, word in enumerate(words, start=2)}
    keras.utils.set_random_seed(SEED)
    model = fit(list(range(len(texts))))
    _, train_accuracy = model.evaluate(encode(texts, vocabulary), labels, verbose=0)

    model.save(options.output)
    with open(options.vocabulary, "w", encoding="utf-8") as handle:
        handle.write("\n".join(words) + "\n")
    size = os.path.getsize(options.output)
    print(f"{len(texts)} examples, {len(vocabulary)} words; held-out accuracy {held_out_accuracy:.3f} "
          f"(80/20 split), training accuracy {train_accuracy:.3f}; wrote {options.output} ({size} bytes) "
          f"in {time.monotonic() - started:.1f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
