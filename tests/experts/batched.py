"""Batched experts for tests/test_batching.py: every answer says which batch it was computed in."""

import itertools
import json
import os
import time
from pathlib import Path

from expertd import expert

_BATCHES = itertools.count(1)


@expert(batched=True)
def tagged(documents):
    """One answer per document: its x, and the batch it went in (id, size, members' x, worker pid).

    A document is a dict (anything else is its own x) with, optionally:
    ``sleep`` (the whole batch sleeps the longest one asked for), ``fail``
    (that document alone fails with ValueError), ``log`` (a file the batch
    appends one line to: its pid, id and members, before it sleeps), ``reply``
    (that document's answer carries that many bytes more, as ``pad``).
    """
    pid = os.getpid()
    batch = f"{pid}-{next(_BATCHES)}"
    members = [_x(document) for document in documents]
    logs = {document["log"] for document in documents if isinstance(document, dict) and document.get("log")}
    for path in logs:
        with open(path, "a") as log:  # (one short write in append mode: lines of concurrent workers never mix)
            log.write(json.dumps({"pid": pid, "batch": batch, "members": members}) + "\n")
    time.sleep(max((document.get("sleep", 0) for document in documents if isinstance(document, dict)), default=0))
    return [ValueError(f"document {_x(document)} refused") if isinstance(document, dict) and document.get("fail")
            else _answer(document, batch, members, pid) for document in documents]


def _answer(document, batch, members, pid):
    answer = {"x": _x(document), "batch": batch, "size": len(members), "members": members, "pid": pid}
    if isinstance(document, dict) and document.get("reply"):
        answer["pad"] = "r" * document["reply"]
    return answer


@expert(batched=True)
def miscounts(documents):
    """Returns one result too few."""
    return documents[1:]


def gate(path):
    """Unbatched: create PATH.began, then wait (at most 20 s) until PATH exists; the worker is busy meanwhile."""
    Path(path + ".began").touch()
    deadline = time.monotonic() + 20
    while not os.path.exists(path) and time.monotonic() < deadline:
        time.sleep(0.005)
    return os.getpid()


def _x(document):
    return document.get("x") if isinstance(document, dict) else document


def tagged_alone(document):
    """Unbatched: ``tagged``'s answer for one document (a batch of one)."""
    return tagged([document])[0]


def _start_slowly():
    time.sleep(0.5)


@expert(batched=True, after_fork=_start_slowly)
def tagged_slow_start(documents):
    """``tagged``, in workers that take half a second to start."""
    return tagged(documents)
