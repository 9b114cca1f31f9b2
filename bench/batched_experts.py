"""A batched expert for bench/opinion_lines.py: each call of the function gets a list of documents."""

from expertd import expert


@expert(batched=True)
def text_length(documents):
    """The length of each document's text: next to nothing per document, so per-request costs show."""
    return [{"chars": len(document.get("text", ""))} for document in documents]
