"""``expertctl opinion --lines`` and ``expertctl pipeline --lines``: JSON Lines through experts, order kept.

Each document is one PIPELINE request (see :mod:`expertd.cli_documents`),
sent over a few connections (``--jobs``), each carrying a window of requests
in flight (:data:`DEPTH`): the protocol answers a connection's requests in the
order sent, so the next request is on its way while the daemon works on the
one before, and the worker serving the connection finds it waiting.  Replies
are written in input order.  One thread drives it all with ``poll``, stdin
included, so that a document is written as soon as those before it are,
however slowly the input comes.

A bad document (a line that is not a JSON object, an expert's failure, a
document too large) stops the stream there after writing those before it
(``--on-error stop``), or is left out with a line on stderr naming its input
line (``skip``), or is written with its errors under ``errors.NAME``
(``record``, see :func:`expertd.cli_documents.recorded`).  An error that is
not a document's own (an unknown name, a lost daemon) stops the stream
whatever ``--on-error`` says.

A single batched expert (``expertctl list --json``: batched), or ``--window
N``, streams as before pipelines (:mod:`expertd.cli_windows`): windows of
documents, one MAP request per window for a batched expert, so that it gets
real batches.

Standard library + msgpack only, and cheap to import: what only a stream
needs is imported when one starts.
"""

from __future__ import annotations

import os
import sys
import time

from expertd import protocol
from expertd.cli_documents import (
    RECORD,
    SKIP,
    STOP,
    InputError,
    Progress,
    Tally,
    dumps,
    first_failure,
    incoming,
    input_size,
    is_documents_own,
    load_document,
    outgoing,
    pipeline_options,
    recorded,
    stages_of,
    stream_error,
)
from expertd.cli_windows import batched_experts, window_lines
from expertd.client import Client
from expertd.errors import ConnectionLost, ProtocolError, RemoteError, RequestTimeout, error_from_wire

TYPE_CHECKING = False  # typing costs milliseconds to import; annotations here are strings
if TYPE_CHECKING:
    from typing import IO, Any

# Requests in flight on each connection of a stream: enough that a worker serving the connection finds
# the next request already there, few enough that a failure stops the stream soon after it.
DEPTH = 8
_READ_SIZE = 256 * 1024


def document_lines(client: Client, names: list[str] | None, pipeline: str | None, source: IO[str], sink: IO[str],
                   jobs: int, on_error: str = STOP, window: int | None = None) -> int:
    """Stream JSON Lines through experts (``names``) or a pipeline: each document gets its opinions; order kept.

    A single batched expert, or ``window``, goes in MAP windows (:func:`window_lines`);
    anything else in pipelined PIPELINE requests (:class:`_Stream`).  Returns
    the exit status: 1 when documents were skipped (the output lacks them),
    else 0; raises :class:`StreamStopped` where the stream stops.
    """
    progress = Progress(sys.stderr, input_size(source), sink)
    tally = Tally(on_error, progress)
    try:
        if names is not None and (window or len(names) == 1):
            batched, size = batched_experts(client, names, window)
            if batched:
                window_lines(client, names, batched, size, source, sink, jobs, tally)
                return _ending(tally)
        target = pipeline if names is None else stages_of(names)
        _Stream(client, target, pipeline_options(on_error == RECORD), tally, _connections(client, jobs),
                progress).run(source, sink)
    finally:
        progress.done()
    return _ending(tally)


def _ending(tally: Tally) -> int:
    summary = tally.summary()
    if summary:
        tally.progress.say(summary)
    return 1 if tally.skipped else 0


def _connections(client: Client, jobs: int) -> int:
    """How many connections a stream uses: ``jobs``, but no more than the daemon has workers.

    A worker serves a connection's requests one after the other for as long as
    no other connection waits for it; with more connections than workers, the
    workers would instead hand each connection back to the master after every
    request, and serve fewer documents a second (measured: half as many).
    """
    try:
        workers = client.status().get("workers_wanted")
    except RemoteError:  # (STATUS refused: public_status = no)
        return max(jobs, 1)
    return max(min(jobs, workers if isinstance(workers, int) else jobs), 1)


class _Link:
    """One connection of a stream: its requests in flight (oldest first), what is left to send, what came."""

    __slots__ = ("blocked", "flight", "inbuf", "next_id", "outbuf", "sock")

    def __init__(self, sock: Any) -> None:
        self.sock = sock
        self.flight: list[tuple[int, int]] = []  # (document number, request id), in the order sent
        self.outbuf = bytearray()
        self.blocked = False  # the socket took less than all of outbuf: written as poll says it has room
        self.inbuf = bytearray()
        self.next_id = 1


class _Stream:
    """Documents through one target, ``jobs`` connections with up to DEPTH requests in flight on each."""

    def __init__(self, client: Client, target: str, options: dict, tally: Tally, jobs: int,
                 progress: Progress) -> None:
        self.client, self.target, self.options, self.tally = client, target, options, tally
        self.on_error = tally.on_error
        self.jobs, self.progress = jobs, progress
        self.links: list[_Link] = []
        self.documents: dict[int, list] = {}  # number -> [line number, document with errors or None, frame, tries]
        # number -> output line, or what stops the stream there, or (line number, error) for a skipped document
        self.finished: dict[int, str | BaseException | tuple[int, BaseException]] = {}
        self.with_errors: set[int] = set()  # documents written with this run's errors (--on-error record)
        self.linenos: dict[int, int] = {}  # number -> input line, for the documents not written yet
        self.resend: list[int] = []  # documents whose connection was lost before their reply, to send again
        self.read = 0  # documents read so far (numbered from 0)
        self.written = 0  # documents written (or the one that stopped the stream)
        self.stop_at: int | None = None  # the earliest document known to stop the stream
        self.quiet_since = time.monotonic()  # when the last reply bytes came (or the first request went)

    def run(self, source: IO[str], sink: IO[str]) -> None:
        import selectors

        lines = _Lines(source)
        self.poller = poller = selectors.PollSelector()
        listening = False  # whether stdin is in the poller
        timeout = self.client.timeout
        try:
            while True:
                self._write(sink)
                if self.stop_at is not None and self.written >= self.stop_at:
                    raise self.tally.stop(self.linenos.get(self.stop_at), self.finished[self.stop_at])
                if self.written == self.read and ((lines.eof and not lines.ready) or self.stop_at is not None):
                    return
                while self.resend and self._free_link() is not None:
                    self._send(self.resend.pop(0))
                wants_input = False
                while (self.stop_at is None and (lines.ready or not lines.eof) and not self.resend
                       and self.read - self.written < self.jobs * DEPTH * 4 and self._free_link() is not None):
                    if lines.ready:
                        self._take(lines.ready.popleft())
                    elif lines.fd is None:
                        lines.fill()
                    else:
                        wants_input = True
                        break
                for link in [link for link in self.links if link.outbuf and not link.blocked]:
                    self._flush(link)  # (once per turn: the documents taken in this turn go in one write)
                if self.resend:
                    continue  # (a connection was lost as it was written to)
                if wants_input != listening:
                    if wants_input:
                        poller.register(lines.fd, selectors.EVENT_READ, None)  # type: ignore[arg-type]
                    else:
                        poller.unregister(lines.fd)  # type: ignore[arg-type]
                    listening = wants_input
                waiting = any(link.flight for link in self.links)
                if not waiting and not wants_input:
                    continue  # (a document finished by its input alone: written on the next turn)
                limit = None
                if waiting and timeout is not None:
                    limit = max(self.quiet_since + timeout - time.monotonic(), 0)
                events = poller.select(limit)
                if not events and waiting:
                    raise RequestTimeout(f"no reply from expertd at {self.client.socket_path} within {timeout}s")
                for key, mask in events:
                    link = key.data
                    if link is None:
                        lines.fill()
                    elif link in self.links:  # (not lost meanwhile)
                        if mask & selectors.EVENT_WRITE:
                            self._flush(link)
                        if mask & selectors.EVENT_READ and link in self.links:
                            self._receive(link)
        finally:
            for link in self.links:
                link.sock.close()
            poller.close()

    # ------------------------------------------------------------- input
    def _take(self, line: tuple[int, bytes | str]) -> None:
        """Send one line's document; a bad one is where the stream stops."""
        lineno, text = line
        number = self.read
        self.read += 1
        self.linenos[number] = lineno
        # Bytes, as the input's size counts them (a str line, with its newline: an in-process caller's).
        self.progress.taken += len(text) + 1 if isinstance(text, bytes) else len(text.encode(errors="replace"))
        where = f"stdin line {lineno}"
        try:
            sent, came = outgoing(load_document(text, where), where)
            frame = protocol.pack([self.target, sent, self.options])
        except InputError as exc:
            self._finish(number, exc)
            return
        except (TypeError, ValueError, OverflowError) as exc:  # (integers past 64 bits)
            self._finish(number, InputError(f"{where}: the document cannot be sent: {exc}"))
            return
        self.documents[number] = [lineno, came, frame, 0]
        self._send(number)

    # ------------------------------------------------------------- connections
    def _free_link(self) -> _Link | None:
        """An idle connection, else a new one while fewer than ``jobs`` are open, else the least busy with room."""
        best = min(self.links, key=lambda link: len(link.flight), default=None)
        if best is None or (best.flight and len(self.links) < self.jobs):
            return self._open()
        return best if len(best.flight) < DEPTH else None

    def _open(self) -> _Link:
        import selectors

        link = _Link(self.client._connect())
        link.sock.setblocking(False)
        self.links.append(link)
        self.poller.register(link.sock, selectors.EVENT_READ, link)
        return link

    def _send(self, number: int) -> None:
        link = self._free_link()
        assert link is not None
        entry = self.documents[number]
        # Request ids count up on each connection: the reply to the oldest request in flight carries its id.
        request_id = link.next_id
        link.next_id = request_id % protocol.MAX_REQUEST_ID + 1
        body = entry[2]
        if not any(other.flight for other in self.links):
            self.quiet_since = time.monotonic()  # (the reply timeout counts from here, or from the last bytes read)
        link.outbuf += protocol.HEADER.pack(protocol.MAGIC, protocol.VERSION, protocol.PIPELINE, request_id, len(body))
        link.outbuf += body
        link.flight.append((number, request_id))

    def _flush(self, link: _Link) -> None:
        import selectors

        try:
            while link.outbuf:
                del link.outbuf[:link.sock.send(link.outbuf)]
        except BlockingIOError:
            pass
        except OSError:
            self._lost(link, None)
            return
        if link.blocked != bool(link.outbuf):  # (poll for room to write only while the socket is full)
            link.blocked = bool(link.outbuf)
            self.poller.modify(link.sock, selectors.EVENT_READ | (selectors.EVENT_WRITE if link.blocked else 0), link)

    def _receive(self, link: _Link) -> None:
        """Read what came on ``link`` and finish the documents answered."""
        try:
            data = link.sock.recv(_READ_SIZE)
        except BlockingIOError:
            return
        except OSError as exc:
            self._lost(link, exc.strerror or str(exc))
            return
        if not data:
            self._lost(link, "closed with no reply")
            return
        self.quiet_since = time.monotonic()
        inbuf = link.inbuf
        inbuf += data
        at = 0
        while len(inbuf) - at >= protocol.HEADER_SIZE:
            magic, version, kind, reply_id, length = protocol.HEADER.unpack_from(inbuf, at)
            if magic != protocol.MAGIC or version != protocol.VERSION:
                protocol.parse_header(bytes(inbuf[at:at + protocol.HEADER_SIZE]))  # raises: says which is wrong
            if len(inbuf) - at < protocol.HEADER_SIZE + length:
                break
            body = bytes(inbuf[at + protocol.HEADER_SIZE:at + protocol.HEADER_SIZE + length])
            at += protocol.HEADER_SIZE + length
            if not link.flight:
                raise ProtocolError(f"a reply (id {reply_id}) came with no request in flight")
            self._reply(link, kind, reply_id, body)
            if link not in self.links:
                return
        del inbuf[:at]

    def _reply(self, link: _Link, kind: int, reply_id: int, body: bytes) -> None:
        try:
            value = protocol.unpack(body)
        except ValueError as exc:
            raise ProtocolError(f"reply body is not valid msgpack: {exc}") from None
        if kind == protocol.ERROR:
            error = error_from_wire(value)
            if reply_id == 0:  # the daemon refusing the connection itself (overloaded, access denied)
                if error.retryable:
                    self._lost(link, error.message)
                    return
                raise error
            number = self._answered(link, reply_id)
            entry = self.documents[number]
            if error.retryable and entry[3] < self.client.retries:
                entry[3] += 1
                self._lost(link, None, first=number)  # (the daemon closes after it: the rest go again too)
                return
            # (A bad target or option is every document's: it stops the stream, with one line.)
            self._finish(number, stream_error(error, self.target) or error)
            return
        if kind != protocol.RESULT:
            raise ProtocolError(f"unknown reply kind 0x{kind:02x}")
        number = self._answered(link, reply_id)
        _lineno, came, _frame, _tries = self.documents.pop(number)
        if not isinstance(value, dict):
            raise ProtocolError(f"a pipeline's reply must be a map, not {type(value).__name__}")
        document, fresh = incoming(value, came)
        failure = first_failure(fresh) if self.on_error != RECORD else None
        if fresh and failure is None:
            self.with_errors.add(number)
        self._finish(number, failure if failure is not None else dumps(document))

    @staticmethod
    def _answered(link: _Link, reply_id: int) -> int:
        number, request_id = link.flight.pop(0)
        if reply_id != request_id:
            raise ProtocolError(f"reply for request {reply_id} arrived while waiting for {request_id}")
        return number

    def _lost(self, link: _Link, why: str | None, first: int | None = None) -> None:
        """``link`` is closed or cannot be trusted: its documents in flight go again on another connection."""
        self.links.remove(link)
        self.poller.unregister(link.sock)
        link.sock.close()
        again = ([first] if first is not None else []) + [number for number, _id in link.flight]
        for number in again:
            entry = self.documents.get(number)
            if entry is None:
                continue
            if why is not None:
                entry[3] += 1
                if entry[3] > 1 + self.client.retries:  # (each connection lost before its reply: give up)
                    self._finish(number, ConnectionLost(
                        f"expertd at {self.client.socket_path} closed the connection before replying: {why}"))
                    continue
            self.resend.append(number)
        self.resend.sort()

    # ------------------------------------------------------------- output
    def _finish(self, number: int, outcome: str | BaseException) -> None:
        entry = self.documents.pop(number, None)
        if isinstance(outcome, BaseException) and self.on_error != STOP and is_documents_own(outcome):
            lineno = self.linenos[number]
            if self.on_error == SKIP:
                self.finished[number] = (lineno, outcome)
                return
            document = None
            if entry is not None:  # (refused as a whole: the document as it came, from the frame sent)
                document = entry[1] if entry[1] is not None else protocol.unpack(entry[2])[1]
            self.with_errors.add(number)
            outcome = recorded(document, outcome, lineno)
        if isinstance(outcome, BaseException):
            if self.stop_at is not None and self.stop_at < number:
                return  # (the stream stops before it anyway)
            self.stop_at = number
            self.resend = [n for n in self.resend if n < number]
        self.finished[number] = outcome

    def _write(self, sink: IO[str]) -> None:
        finished, written, tally = self.finished, self.written, self.tally
        while written in finished and written != self.stop_at:
            outcome = finished.pop(written)
            if isinstance(outcome, tuple):
                tally.skip(*outcome)
            else:
                sink.write(outcome + "\n")  # type: ignore[operator]
                tally.written += 1
                if written in self.with_errors:
                    self.with_errors.discard(written)
                    tally.with_errors += 1
            del self.linenos[written]
            written += 1
            self.progress.tick()
        if written != self.written:
            self.written = written
            sink.flush()


class _Lines:
    """Lines of stdin as they come: read from its descriptor when poll says so (or from any iterable of lines)."""

    def __init__(self, source: IO[str]) -> None:
        from collections import deque

        self.ready: deque[tuple[int, bytes | str]] = deque()  # (line number, text), blank lines left out
        self.lineno = 0
        self.eof = False
        self._rest: list[bytes] = []  # the pieces of a line not ended yet
        try:
            # Read only when poll says there is something (a regular file: always), so the descriptor stays
            # blocking: its mode is shared with whoever else holds it (the shell, for a terminal).
            self.fd: int | None = source.fileno()
        except (AttributeError, OSError, ValueError):
            self.fd = None  # (not a file: an in-process caller's text)
            self._lines = iter(source)

    def fill(self) -> None:
        """Read what is there (a line, for a source without a descriptor)."""
        if self.fd is None:
            line = next(self._lines, None)
            if line is None:
                self.eof = True
            else:
                self._add(line)
            return
        try:
            data = os.read(self.fd, _READ_SIZE)
        except BlockingIOError:
            return
        if not data:
            self.eof = True
            if self._rest:
                self._add(b"".join(self._rest))
            return
        *whole, last = data.split(b"\n")
        if whole:  # (a long line comes in many reads: its pieces are joined once)
            self._rest.append(whole[0])
            whole[0] = b"".join(self._rest)
            self._rest = []
            for line in whole:
                self._add(line)
        if last:
            self._rest.append(last)

    def _add(self, line: bytes | str) -> None:
        self.lineno += 1
        if line.strip():
            self.ready.append((self.lineno, line))
