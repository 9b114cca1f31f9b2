"""A document expert: flags words from a lexicon in a document's ``text``.

It shows the two set-up hooks on something light: the lexicon file is read
once in the master (``before_fork``) and shared by every worker; each worker
compiles its matcher after fork (``after_fork``), where per-process state
belongs.  A TensorFlow expert has the same shape, with model weights in place
of the lexicon.
"""

from __future__ import annotations

import os
import re

from expertd import expert

LEXICON_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "lexicon.txt")
LEXICON: dict[str, str] = {}
_MATCHER: re.Pattern | None = None


def read_lexicon() -> None:
    """Master, before fork: read the lexicon into plain memory."""
    with open(LEXICON_FILE, encoding="utf-8") as handle:
        for line in handle:
            line = line.split("#", 1)[0].strip()
            if line:
                word, _, category = line.partition(" ")
                LEXICON[word.lower()] = category.strip() or "flagged"


def compile_matcher() -> None:
    """Worker, after fork: build the per-process matcher."""
    global _MATCHER
    words = sorted(LEXICON, key=len, reverse=True)
    _MATCHER = re.compile(r"\b(" + "|".join(map(re.escape, words)) + r")\b", re.IGNORECASE)


# example=: `expertd --check` calls it once with this document, after the hooks, in a trial worker.
@expert(before_fork=read_lexicon, after_fork=compile_matcher, example={"text": "what a stupid idea"})
def opinion(document: dict) -> dict:
    """Flag lexicon words in document['text']: which, by category, and a score in [0, 1]."""
    if not isinstance(document, dict) or not isinstance(document.get("text"), str):
        raise ValueError("keywords expects a document with a 'text' string")
    text = document["text"]
    assert _MATCHER is not None, "after_fork hook has not run"
    found = [match.group(0).lower() for match in _MATCHER.finditer(text)]
    words = max(1, len(re.findall(r"\w+", text)))
    categories: dict[str, int] = {}
    for word in found:
        categories[LEXICON[word]] = categories.get(LEXICON[word], 0) + 1
    return {
        "flagged": sorted(set(found)),
        "categories": categories,
        "score": round(min(1.0, 3 * len(found) / words), 3),
        "words": words,
    }
