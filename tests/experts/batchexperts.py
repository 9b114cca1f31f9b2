"""Batched experts for the tests of MAP requests and batching: each call of the function gets a list of inputs."""

import os
import signal

from expertd import expert


@expert(batched=True)
def text_length(documents):
    """Per document: the length of its text.  A document with "fail" fails alone (ValueError)."""
    results = []
    for document in documents:
        if "fail" in document:
            results.append(ValueError(f"asked to fail: {document['fail']}"))
        else:
            results.append({"chars": len(document["text"]), "seen_opinions": sorted(document.get("opinions", {}))})
    return results


@expert(batched=True)
def batch_size(items):
    """Per item: how many items the function was given in the same call."""
    return [len(items)] * len(items)


@expert(batched=True)
def all_or_nothing(items):
    """Doubles every item, or raises for the whole batch when one of them is negative."""
    if any(item < 0 for item in items):
        raise ArithmeticError("a negative item spoils the batch")
    return [2 * item for item in items]


def reciprocal(x):
    """1 / x: an unbatched expert (ZeroDivisionError for 0)."""
    return 1 / x


def sendable(item):
    """The item back, except "object": an object() that no reply can carry."""
    return object() if item == "object" else item


def killed_by(item):
    """The item back; ["kill", PATH] appends a line to PATH and kills the worker serving it."""
    if isinstance(item, list) and item[:1] == ["kill"]:
        with open(item[1], "a") as record:
            record.write("killed\n")
        os.kill(os.getpid(), signal.SIGKILL)
    return item
