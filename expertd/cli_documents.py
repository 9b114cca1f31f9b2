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
from expertd.text import plural

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


# --on-error: what a bad document does to a stream (--lines).
STOP, SKIP, RECORD = "stop", "skip", "record"
ON_ERROR = (STOP, SKIP, RECORD)

# Errors that are one document's own (its line, its experts' failures, its size): with --on-error skip or
# record the stream goes on past them.  Any other (an unknown name, access denied, a lost daemon) would
# fail every document alike, and stops the stream whatever --on-error says.  The one list of them: the
# PIPELINE streams (cli_lines) and the MAP windows (cli_windows) both decide by it.
DOCUMENT_CODES = frozenset({"expert_failed", "bad_result", "timeout", "frame_too_large", "bad_request",
                            "worker_lost"})


def is_documents_own(error: BaseException, target: str | None = None) -> bool:
    """Whether ``error`` is one document's own (see DOCUMENT_CODES), not the stream's.

    ``target``: the request's target, when ``error`` answered a request as a
    whole.  A bad request is then the document's own only if it names one of
    the target's experts: one that names no expert, or the whole target (its
    syntax, an unknown option), would be every document's, and is the
    stream's.  (Decided by what the error says it concerns, never by its text.)
    """
    if isinstance(error, InputError):
        return True
    if not isinstance(error, RemoteError) or error.code not in DOCUMENT_CODES:
        return False
    return not (target is not None and error.code == "bad_request" and error.expert in (None, target))


def stream_error(error: BaseException, target: str) -> StreamStopped | None:
    """What stops the stream when ``error``, answering a request for ``target`` as a whole, is not a
    document's own (whatever --on-error says); None when it is one document's."""
    if is_documents_own(error, target) or not is_documents_own(error):
        return None  # (the document's own, or an error that no document would own anyway)
    return StreamStopped(describe(error), error)


def describe(error: BaseException) -> str:
    """One line for an error, as expertctl prints it after ``expertctl: ``."""
    if isinstance(error, RemoteError):
        label = f"{error.expert}: " if error.expert else ""
        return f"{label}{error.message} [{error.code}]"
    return str(error)


def at_line(lineno: int, error: BaseException) -> str:
    """``error`` with the input line it belongs to (an InputError names it already)."""
    return describe(error) if isinstance(error, InputError) else f"stdin line {lineno}: {describe(error)}"


def error_entry(error: BaseException, lineno: int | None = None) -> dict:
    """How --on-error record writes ``error`` under ``errors.NAME``: {code, type, message} (and line)."""
    if isinstance(error, RemoteError):
        entry = {"code": error.code, "type": error.remote_type, "message": error.message}
    else:
        entry = {"code": "bad_input", "type": type(error).__name__, "message": str(error)}
    if lineno is not None:
        entry["line"] = lineno
    return entry


def recorded(document: dict | None, error: BaseException, lineno: int) -> str:
    """The output line for a document the stream could not run (--on-error record).

    A line that is not a JSON object becomes ``{"errors": {"_input": {...}}}``;
    a document refused as a whole (too large, say) is written as it came with
    ``errors._request``.  Either entry names the input line.
    """
    if document is None or isinstance(error, InputError):
        return dumps({"errors": {"_input": error_entry(error, lineno)}})
    errors = document.get("errors")
    errors = dict(errors) if isinstance(errors, dict) else {}
    errors["_request"] = error_entry(error, lineno)
    return dumps({**document, "errors": errors})


class StreamStopped(Exception):
    """A stream stopped at a document (--on-error stop, or an error that is not a document's own)."""

    def __init__(self, message: str, cause: BaseException) -> None:
        super().__init__(message)
        self.cause = cause


class Tally:
    """What a stream did: documents written, skipped or written with errors; the messages on stderr."""

    def __init__(self, on_error: str, progress: Progress) -> None:
        self.on_error, self.progress = on_error, progress
        self.written = self.skipped = self.with_errors = 0

    def stop(self, lineno: int | None, error: BaseException) -> StreamStopped:
        """The exception that stops the stream at ``error`` (at ``lineno``, when it is that document's own)."""
        if isinstance(error, StreamStopped):  # (decided where it came: see stream_error)
            return error
        if lineno is None or not is_documents_own(error):
            return StreamStopped(describe(error), error)
        return StreamStopped(f"{at_line(lineno, error)}; stopped there, {plural(self.written, 'document')} written "
                             f"(--on-error skip or record goes on)", error)

    def skip(self, lineno: int, error: BaseException) -> None:
        self.skipped += 1
        self.progress.say(f"expertctl: {at_line(lineno, error)} (skipped)")

    def summary(self) -> str | None:
        """The last line on stderr when documents were skipped or recorded with errors (else None)."""
        if self.skipped:
            return (f"expertctl: {self.skipped} of {plural(self.written + self.skipped, 'document')} skipped "
                    f"(--on-error skip); exit status 1")
        if self.with_errors:
            return (f"expertctl: {self.with_errors} of {plural(self.written, 'document')} written with errors "
                    f"(under errors.NAME)")
        return None


def _clock(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


class Progress:
    """A self-overwriting progress line on stderr, only when stderr is a terminal and stdout is not.

    (With stdout on the same terminal, the line would be mixed into the
    documents written there.)  ``total`` is the input's size in bytes when it
    is known (a regular file on stdin): the line then shows how far the input
    has been read and an estimate of the time left.
    """

    def __init__(self, stream: IO[str], total: int | None = None, output: IO[str] | None = None) -> None:
        self.stream = stream
        self.enabled = _isatty(stream) and not (output is not None and _isatty(output))
        self.total = total
        self.count = 0
        self.taken = 0  # bytes of input taken so far
        self.started = self.shown = time.monotonic()
        self.showing = False

    def tick(self) -> None:
        self.count += 1
        if not self.enabled:
            return
        now = time.monotonic()
        if now - self.shown >= 0.2:
            self.shown = now
            self.stream.write(f"\r{self.line(now)}\x1b[K")
            self.stream.flush()
            self.showing = True

    def line(self, now: float) -> str:
        elapsed = max(now - self.started, 1e-9)
        text = f"{plural(self.count, 'document')}, {self.count / elapsed:.0f}/s"
        if self.total:
            done = min(self.taken / self.total, 1.0)
            text += f", {done:.0%} of {self.total / 2**20:.1f} MiB"
            if self.taken:
                text += f", {_clock(elapsed * (self.total - self.taken) / self.taken)} left"
        return text

    def say(self, message: str) -> None:
        """A line on stderr (a skipped document's), not mixed into the progress line."""
        if self.showing:
            self.stream.write("\r\x1b[K")
            self.showing = False
        self.stream.write(message + "\n")
        self.stream.flush()

    def done(self) -> None:
        if self.enabled and self.count:
            if self.showing:
                self.stream.write("\r\x1b[K")
            self.stream.write(f"{plural(self.count, 'document')} in {time.monotonic() - self.started:.1f}s\n")
            self.stream.flush()
            self.showing = False


def _isatty(stream: IO[str]) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def input_size(source: IO[str]) -> int | None:
    """The bytes left to read on ``source`` when it is a regular file (for the progress line), else None."""
    import os
    import stat

    try:
        fd = source.fileno()
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            return None
        return max(info.st_size - os.lseek(fd, 0, os.SEEK_CUR), 0)
    except (AttributeError, OSError, ValueError):
        return None


def stages_of(names: list[str]) -> str:
    """The target the command line's NAMEs write: each a stage, in order (``a+b``: one stage of two).

    The daemon checks the names and the syntax, and says in one line what is wrong.
    """
    return ",".join(name.strip() for name in names)
