"""A document expert with no set-up: plain statistics of a document's ``text``."""

import re


def opinion(document: dict) -> dict:
    """Word and sentence counts of document['text'], and how much of it is shouted."""
    if not isinstance(document, dict) or not isinstance(document.get("text"), str):
        raise ValueError("textstats expects a document with a 'text' string")
    text = document["text"]
    words = re.findall(r"[^\W\d_]+", text)
    shouted = [w for w in words if len(w) > 1 and w.isupper()]
    return {
        "words": len(words),
        "sentences": len([s for s in re.split(r"[.!?]+", text) if s.strip()]),
        "shouting": round(len(shouted) / len(words), 3) if words else 0.0,
    }
