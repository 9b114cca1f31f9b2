"""A batched expert for bench/opinion_lines.py: each call of the function gets a list of documents."""

from expertd import expert


@expert(batched=True)
def text_length(documents):
    """The length of each document's text: next to nothing per document, so per-request costs show."""
    return [{"chars": len(document.get("text", ""))} for document in documents]


@expert(batched=True)
def fixed_plus_per_item(items):
    """Sleeps 10 ms + 4 ms per item, like a model's batch (no CPU: the batching policy alone shows).

    Each answer is the size of the batch it went in, so a caller knows its batch's own time.
    """
    import time

    time.sleep(0.010 + 0.004 * len(items))
    return [len(items)] * len(items)
