"""Batched experts for bench/opinion_lines.py: each call of the function gets a list of documents."""

import sentiment

from expertd import expert


@expert(batched=True)
def sentiment_batched(documents):
    """Sentiment of each document (examples/sentiment): one model run for the whole list."""
    return sentiment.opinions(documents)


@expert(batched=True)
def text_length(documents):
    """The length of each document's text: next to nothing per document, so per-request costs show."""
    return [{"chars": len(document.get("text", ""))} for document in documents]
