"""``expertctl opinion`` and ``expertctl pipeline`` on one document: one PIPELINE request, failures reported.

The experts named on the command line are the stages, in order (``opinion a b
c`` asks for the target ``a,b,c``; ``pipeline NAME`` for the pipeline).  The
CLI asks the daemon to stop at the first failing expert (``on_error = stop``)
and reports that failure as a call's error would be reported (the same line
on stderr, exit status 1); with ``--keep-going`` it asks for ``continue`` and
writes the document with its ``errors.NAME``.  The helpers here (reading a
document, telling this run's errors from those a document came with) serve
the streams of :mod:`expertd.cli_lines` too.

Standard library + msgpack only, and cheap to import (``expertctl call``
imports it).
"""

from __future__ import annotations

import json
import time

from expertd.client import Client
from expertd.errors import ProtocolError, RemoteError, error_from_wire

TYPE_CHECKING = False  # typing costs milliseconds to import; annotations here are strings
if TYPE_CHECKING:
    from typing import IO, Any

_SKIPPED = "skipped"


class InputError(Exception):
    """Bad input on stdin; the message names where."""


def json_default(value: Any) -> Any:
    if isinstance(value, (bytes, bytearray)):
        try:
            return bytes(value).decode("utf-8")
        except UnicodeDecodeError:
            import base64

            return {"base64": base64.b64encode(value).decode("ascii")}
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, default=json_default)


def load_document(text: str | bytes, where: str) -> dict:
    """A JSON object from ``text`` (InputError if it is not one)."""
    try:
        document = json.loads(text)
    except ValueError as exc:
        raise InputError(f"{where}: invalid JSON: {exc}") from None
    if not isinstance(document, dict):
        raise InputError(f"{where}: the document must be a JSON object, not {type(document).__name__}")
    return document


def check_document(document: dict, where: str) -> None:
    """InputError unless the document's ``opinions`` and ``errors`` (if any) are objects: the daemon adds to them."""
    for key in ("opinions", "errors"):
        if key in document and not isinstance(document[key], dict):
            raise InputError(f"{where}: the document's {key!r} is a {type(document[key]).__name__}, not an object")


def outgoing(document: dict, where: str) -> tuple[dict, dict | None]:
    """What to send for ``document``, and the document itself when it came with errors (else None).

    A document is sent without the errors it came with (an earlier
    ``--keep-going`` run's, say), so that every error in the reply is this
    run's; :func:`incoming` puts them back as the daemon would have kept them.
    """
    check_document(document, where)
    if not document.get("errors"):
        return document, None
    return {key: value for key, value in document.items() if key != "errors"}, document


def incoming(returned: dict, came: dict | None) -> tuple[dict, dict]:
    """The document to write and this run's errors, from the daemon's reply (see :func:`outgoing`)."""
    fresh = returned.get("errors")
    fresh = fresh if isinstance(fresh, dict) else {}
    if came is None:
        return returned, fresh
    before = came.get("opinions") or {}
    answered = {name for name in returned.get("opinions", ()) if name not in before}
    errors = {name: entry for name, entry in came["errors"].items() if name not in answered}
    errors.update(fresh)
    document = {}
    for key in came:
        if key == "errors":
            if errors:
                document["errors"] = errors
        else:
            document[key] = returned.get(key, came[key])
    for key, value in returned.items():
        if key not in document and key != "errors":
            document[key] = value
    return document, fresh


def first_failure(errors: dict) -> RemoteError | None:
    """This run's first failing expert as the error a call of it would have raised (the skipped ones come last)."""
    if not errors:
        return None
    name, entry = next(((n, e) for n, e in errors.items() if isinstance(e, dict) and e.get("code") != _SKIPPED),
                       next(iter(errors.items())))
    entry = entry if isinstance(entry, dict) else {"message": str(entry)}
    error = error_from_wire({**entry, "expert": name})
    error.code = str(entry.get("code", error.code))
    return error


def pipeline_options(keep_going: bool) -> dict:
    return {"on_error": "continue" if keep_going else "stop"}


def one_document(client: Client, target: str, document: dict, where: str, keep_going: bool) -> dict:
    """``document`` through ``target`` in one request; raises the first expert's failure unless ``keep_going``."""
    sent, came = outgoing(document, where)
    returned = client._pipeline(target, sent, pipeline_options(keep_going)["on_error"])
    if not isinstance(returned, dict):
        raise ProtocolError(f"a pipeline's reply must be a map, not {type(returned).__name__}")
    document, fresh = incoming(returned, came)
    failure = None if keep_going else first_failure(fresh)
    if failure is not None:
        raise failure
    return document


class Progress:
    """A self-overwriting progress line on stderr, only when it is a terminal."""

    def __init__(self, stream: IO[str]) -> None:
        self.stream = stream
        self.enabled = stream.isatty()
        self.count = 0
        self.started = self.shown = time.monotonic()

    def tick(self) -> None:
        self.count += 1
        if not self.enabled:
            return
        now = time.monotonic()
        if now - self.shown >= 0.2:
            self.shown = now
            rate = self.count / max(now - self.started, 1e-9)
            self.stream.write(f"\r{self.count} documents, {rate:.0f}/s ")
            self.stream.flush()

    def done(self) -> None:
        if self.enabled and self.count:
            self.stream.write(f"\r{self.count} documents in {time.monotonic() - self.started:.1f}s\n")
            self.stream.flush()


def stages_of(names: list[str]) -> str:
    """The target the command line's NAMEs write: each a stage, in order (``a+b``: one stage of two).

    The daemon checks the names and the syntax, and says in one line what is wrong.
    """
    return ",".join(name.strip() for name in names)
