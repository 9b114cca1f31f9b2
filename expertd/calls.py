"""Answering calls in a worker: from a request's bytes to its reply, written.

:class:`Answering` is mixed into :class:`expertd.worker.Worker`.  It decodes a
msgpack call (or a MAP: many items for one expert, each item's outcome in the
reply), calls the expert and packs the result into a reply frame; an
expert's exception, arguments that do not fit it, or a result that cannot be
sent become structured error replies instead (a bad request never kills the
worker).  It writes the reply, handing the master whatever a slow client did
not take at once.  It owns no state: it works with the Worker's (scoreboard
slot, metrics recorder, config, experts, timeouts), declared on the class.
The HTTP side (:mod:`expertd.worker_http`) calls experts through it too.
"""

from __future__ import annotations

import logging
import os
import socket
import struct
import time
import traceback
from typing import Any

from expertd import __version__, accesslog, protocol, stage_timer
from expertd.batches import call_batch
from expertd.config import Config
from expertd.errors import BadRequest, BadResult, ExpertFailed, FrameTooLarge, RemoteError, UnknownExpert
from expertd.loader import LoadedExpert
from expertd.logs import Throttle, one_line
from expertd.metrics import AD_HOC, Recorder
from expertd.scoreboard import SlotWriter

log = logging.getLogger("expertd.worker")  # the worker's own logger: its lines keep their name
# Experts' failures, logged with their tracebacks: each worker's own (made before fork, kept per process).
FAILURE_LOG = Throttle(log)
_LOGGED_MESSAGE = 500  # an exception's message past this many characters is cut in the log (the reply has it all)
# The request in hand, for an expert's failure line (see _failure): (the msgpack connection's serial, the
# frame's id), or (an HTTP request's id, None); a batch's is its first member's.  Two stores a request, so
# that the id is formatted only when a failure is logged.
IN_HAND: list = ["-", None]


class Answering:
    """Answering one request (a mixin of :class:`expertd.worker.Worker`, whose ``__init__`` sets these)."""

    number: int
    requests: int
    config: Config
    experts: dict[str, LoadedExpert]
    board: SlotWriter
    recorder: Recorder
    _timeouts: dict[str, float]
    _max_args: int
    _max_depth: int
    _debug: bool
    _throttle: Throttle
    _access: accesslog.AccessLog | None  # the access log, None when off (then nothing about it is done)
    _conn_id: int  # the master's serial of the connection served (a msgpack request's log id begins with it)

    def _answer(self, conn: socket.socket, kind: int, request_id: int,
                body: memoryview) -> tuple[bool, memoryview | None]:
        """Answer one msgpack request whose bytes are read; (close, the part of the reply not taken in time)."""
        started = time.monotonic()
        board = self.board
        expert_name = None
        label: str | None = AD_HOC  # (a pipeline's, for its metrics)
        IN_HAND[0], IN_HAND[1] = self._conn_id, request_id
        if _TIMER_AT[0] and kind != _PIPELINE:
            stage_timer.off()  # (a pipeline's timer, left running for the next: nothing else may see SIGALRM)
        try:
            if kind == _CALL:
                try:
                    expert_name, args, kwargs = protocol.decode_call(body)
                finally:  # (the master must see the request begin even when it is refused)
                    board.begin(started, self._timeouts.get(expert_name, self.config.timeout), request_id,
                                expert_name or "")
                # The limits are checked in full only where a cheap look says they might bite.
                if len(body) >= self._max_depth or len(args) + len(kwargs) > self._max_args:
                    protocol.check_shape(args, kwargs, self._max_args, self._max_depth, body)
                reply_kind, reply = _RESULT, _pack_result(expert_name, self._invoke(expert_name, args, kwargs))
            elif kind == _MAP:
                try:
                    expert_name, items = protocol.decode_map(body)
                finally:
                    board.begin(started, self._timeouts.get(expert_name, self.config.timeout), request_id,
                                expert_name or "")
                if len(body) >= self._max_depth:  # (each item is a call's argument: nested as deep as one)
                    protocol.check_shape(items, {}, len(items), self._max_depth, body)
                reply_kind, reply = _RESULT, _pack_outcomes(expert_name, self._map(expert_name, items))
            elif kind == _PIPELINE:
                try:
                    expert_name, document, options = protocol.decode_pipeline(body)
                finally:  # (the target until its first expert runs: then that expert's name, see SlotWriter.running)
                    known = self._plans.get(expert_name)  # type: ignore[attr-defined]  (see PipelineServing._steps)
                    board.begin(started, known[0].timeout if known else self.config.expert_timeout(expert_name or ""),
                                request_id, expert_name or "")
                if len(body) >= self._max_depth:
                    protocol.check_shape([document], options, 1 + len(options), self._max_depth, body)
                if options and options.get("helper") is True:
                    if sent_by_a_worker(conn):
                        label = None  # (a helper's request is part of another's: its experts count, not it)
                    else:
                        del options["helper"]  # (a worker's word: from a client, an option like any unknown one)
                if label is not None:
                    label = expert_name if expert_name in self.config.pipelines else AD_HOC
                value, outcome = self._run_pipeline(expert_name, document, options, started)  # type: ignore
                reply_kind, reply, outcome = _RESULT, *self._pack_pipeline_reply(  # type: ignore[attr-defined]
                    expert_name, value, outcome)
            else:
                board.begin(started, self.config.timeout, request_id, "")
                reply_kind = _RESULT  # PING
                reply = protocol.pack({"pid": os.getpid(), "worker": self.number, "version": __version__,
                                       "requests": self.requests})
            if kind != _PIPELINE:
                outcome = "ok"
        except RemoteError as exc:
            exc.request_id = accesslog.msgpack_id(self._conn_id, request_id)  # (matched to the logs' lines)
            reply_kind, reply = _ERROR, protocol.pack(exc.to_wire())
            outcome = exc.code
        if kind == _CALL or kind == _MAP:  # (a MAP counts as one request of its expert, whatever its items did)
            self.recorder.record(expert_name, outcome, time.monotonic() - started)
        elif kind == _PIPELINE:  # (counted once the reply is out: the caller need not wait for it)
            elapsed = time.monotonic() - started
        close, unsent = self._deliver(conn, _HEADER.pack(_MAGIC, _VERSION, reply_kind, request_id, len(reply)) + reply,
                                      request_id)
        if kind == _PIPELINE:
            self._count_pipeline(label, outcome, elapsed)  # type: ignore[attr-defined]
        if self._access is not None:
            self._access.write(accesslog.msgpack_id(self._conn_id, request_id), accesslog.peer_of(conn), "msgpack",
                               expert_name if expert_name is not None else _KIND_LABELS.get(kind), outcome, None,
                               time.monotonic() - started, _HEADER_SIZE + len(body), _HEADER_SIZE + len(reply))
        if self._debug and not close:
            log.debug("request %d %s %.3f ms %s", request_id,
                      expert_name or _KIND_LABELS.get(kind, "?"),
                      (time.monotonic() - started) * 1000, outcome)
        return close, unsent

    def _refuse(self, conn: socket.socket, data: bytearray, start: int, end: int) -> tuple[bool, None]:
        """Answer the request at data[start:end] with an error and close the connection."""
        request_id, length = 0, 0
        if end - start >= _HEADER_SIZE:
            _magic, _version, _kind, request_id, length = _HEADER.unpack_from(data, start)
        if length > self.config.max_frame:
            error: RemoteError = FrameTooLarge(
                f"request body of {length} bytes exceeds max_frame ({self.config.max_frame} bytes)")
        else:
            error = BadRequest("this request could not be read whole")
        error.request_id = accesslog.msgpack_id(self._conn_id, request_id)
        log.info("refusing request %s: %s", error.request_id, error, extra={"request_id": error.request_id})
        reply = protocol.encode_error(request_id, error)
        self._deliver(conn, reply, request_id)
        if self._access is not None:
            self._access.write(error.request_id, accesslog.peer_of(conn), "msgpack", None, error.code, None, 0.0,
                               end - start, len(reply))
        return True, None

    def _give_up(self, reason: BaseException) -> tuple[bool, None]:
        """The request could not be read: close the connection (the master may only close it)."""
        self._throttle.info("closing connection: %s", reason)
        self.board.writing()  # the stream is broken: an error frame from the master would not help
        return True, None

    def _deliver(self, conn: socket.socket, reply: bytes, request: object,
                 patience: float | None = None) -> tuple[bool, memoryview | None]:
        """Write a reply: (close, the part the client did not take within ``patience`` (default: a moment)).

        ``request``: its log id, or a msgpack frame's id on this worker's connection (made a log id only here,
        should the write fail: the hot path formats nothing).
        """
        self.board.writing()  # from here on, an error frame from the master would corrupt the stream
        try:
            unsent = _send_briefly(conn, reply, _WRITE_PATIENCE if patience is None else patience)
        except OSError as exc:
            if request.__class__ is int:
                request = accesslog.msgpack_id(self._conn_id, request)  # type: ignore[arg-type]
            self._throttle.log(logging.INFO, "could not deliver the reply to request %s: %s", request, exc,
                               extra={"request_id": request})
            return True, None
        if unsent is None:
            self.board.end()  # else it stays "writing" until the master has the rest
        return False, unsent

    def _invoke(self, name: str, args: list, kwargs: dict) -> Any:
        """Call expert ``name``; its failures, and arguments that do not fit it, become RemoteErrors."""
        expert = self.experts.get(name)
        if expert is None:
            raise self._unknown(name)
        if expert.batched and not expert.is_model:
            # A batched function takes a list of inputs: a call alone is a batch of one.
            result = call_batch(expert, [(args, kwargs)], _failure)[0]
            if isinstance(result, RemoteError):
                raise result
            return result
        try:
            return expert.function(*args, **kwargs)
        except BaseException as exc:  # an expert's failure is a reply, never a dead worker
            raise _failure(expert, args, kwargs, exc) from None


    def _map(self, name: str, items: list) -> list[Any]:
        """Call expert ``name`` on each item (its one positional argument): one result or RemoteError per item.

        A batched expert takes the items in batches of its ``max_batch``; any
        other is called once per item.  An item's failure is its own: the
        others are still called.
        """
        expert = self.experts.get(name)
        if expert is None:
            raise self._unknown(name)
        outcomes: list[Any] = []
        if expert.batched:
            size = max(expert.max_batch, 1)
            for start in range(0, len(items), size):
                outcomes += call_batch(expert, [([item], {}) for item in items[start : start + size]], _failure)
            return outcomes
        function = expert.function
        for item in items:
            try:
                outcomes.append(function(item))
            except BaseException as exc:  # an expert's failure is this item's outcome, never a dead worker
                outcomes.append(_failure(expert, [item], {}, exc))
        return outcomes

    def _unknown(self, name: str) -> UnknownExpert:
        known = ", ".join(sorted(self.experts)) or "none"
        return UnknownExpert(f"no expert named {name!r}; known experts: {known}", expert=name)


def sent_by_a_worker(conn: socket.socket) -> bool:
    """Whether the peer of ``conn`` is another worker of this daemon (a process with this one's parent).

    Only a worker's request may say ``helper`` (one stage's part, answered with its opinions alone):
    from anyone else, the option is ignored.
    """
    try:
        pid = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))[0]
        with open(f"/proc/{pid}/stat", "rb") as stat:
            ppid = int(stat.read().rsplit(b")", 1)[1].split()[1])  # (the name, in parentheses, may hold spaces)
    except (OSError, ValueError, IndexError):
        return False
    return ppid == os.getppid() and pid != os.getpid()


def _pack_outcomes(name: str, outcomes: list[Any]) -> bytes:
    """A MAP reply's body: ``[0, result]`` or ``[1, error]`` per item; a result that cannot be sent fails alone."""
    entries = [[_ITEM_FAILED, outcome.to_wire()] if isinstance(outcome, RemoteError) else [_ITEM_OK, outcome]
               for outcome in outcomes]
    try:
        return _pack_result(name, entries)
    except RemoteError:
        pass
    for entry in entries:  # (only when some result cannot be sent: find which)
        if entry[0] == _ITEM_OK:
            try:
                _pack_result(name, entry[1])
            except RemoteError as exc:
                entry[:] = [_ITEM_FAILED, exc.to_wire()]
    return _pack_result(name, entries)


def _pack_result(name: str, result: Any) -> bytes:
    try:
        body = protocol.pack(result)
    except BaseException as exc:  # a result's own tolist() or __len__ may raise anything
        raise BadResult(
            f"{name} returned a value that cannot be sent: {type(exc).__name__}: {_safe_str(exc)}", expert=name
        ) from None
    if len(body) > protocol.MAX_BODY:
        raise BadResult(f"{name} returned {len(body)} bytes; a reply holds at most {protocol.MAX_BODY}", expert=name)
    return body


def _failure(expert: LoadedExpert, args: list, kwargs: dict, exc: BaseException) -> RemoteError:
    """The error reply for an expert call that raised ``exc``."""
    if isinstance(exc, BadRequest):  # the expert's own refusal of its input (a model expert's, say) goes as is
        if exc.expert is None:
            exc.expert = expert.name
        return exc
    if isinstance(exc, TypeError):
        try:
            _refuse_misfit(expert, args, kwargs, exc)
        except BadRequest as misfit:
            return misfit
    failed = ExpertFailed(
        f"{type(exc).__name__}: {_safe_str(exc)}",
        remote_type=f"{type(exc).__module__}.{type(exc).__qualname__}",
        remote_traceback=_safe_traceback(exc),
        expert=expert.name,
    )
    if isinstance(exc, stage_timer.StageTimeout):
        return failed  # (a pipeline's stage ran out of time: its caller gets a timeout, not a failure)
    # The operator's trace of it (the caller has the traceback too): rate-limited per expert and exception
    # type, so that an expert failing on every call writes a line group per interval and a count, not a flood.
    message = one_line(failed.message if len(failed.message) <= _LOGGED_MESSAGE
                       else failed.message[:_LOGGED_MESSAGE] + "...")  # (it may quote a client's input)
    request = IN_HAND[0] if IN_HAND[1] is None else accesslog.msgpack_id(*IN_HAND)
    FAILURE_LOG.warning("expert %s failed (request %s): %s", expert.name, request, message,
                        cause=(expert.name, failed.remote_type), detail=failed.remote_traceback,
                        extra={"request_id": request})
    return failed


def _refuse_misfit(expert: LoadedExpert, args: list, kwargs: dict, exc: TypeError) -> None:
    """Raise BadRequest if ``exc`` came from arguments that do not fit the expert, not from its code.

    Arguments are checked only when a call raised TypeError, so that a call
    that fits pays nothing for the check.  Experts are pure, so calling one with
    arguments its wrapper then refuses does no harm.
    """
    if expert.signature is not None:
        try:
            expert.signature.bind(*args, **kwargs)
        except TypeError as misfit:
            raise BadRequest(f"{expert.name}{expert.signature}: {misfit}", expert=expert.name) from None
    elif exc.__traceback__ is not None and exc.__traceback__.tb_next is None:
        # Raised by the call itself, before any of the expert's code ran.
        raise BadRequest(f"{expert.name}: {_safe_str(exc)}", expert=expert.name) from None


def _safe_str(exc: BaseException) -> str:
    try:
        return str(exc)
    except BaseException:  # an exception whose __str__ raises must not take the worker down
        return f"<{type(exc).__name__} whose message cannot be shown>"


def _safe_traceback(exc: BaseException) -> str:
    try:
        return "".join(traceback.format_exception(type(exc), exc, exc.__traceback__.tb_next))
    except BaseException:
        return f"{type(exc).__name__} (traceback unavailable)"


_HEADER, _HEADER_SIZE, _MAGIC, _VERSION = protocol.HEADER, protocol.HEADER_SIZE, protocol.MAGIC, protocol.VERSION
_CALL, _MAP, _RESULT, _ERROR = protocol.CALL, protocol.MAP, protocol.RESULT, protocol.ERROR
_PIPELINE = protocol.PIPELINE
_KIND_LABELS = protocol.KIND_LABELS  # the access log's target for a request that names no expert (PING)
_TIMER_AT = stage_timer.ALARM_AT
_ITEM_OK, _ITEM_FAILED = protocol.ITEM_OK, protocol.ITEM_FAILED
_NOW = int(socket.MSG_DONTWAIT)  # (a plain int, as in expertd.worker)
# How long a worker waits for a slow client to take its reply before handing the rest to the master.
_WRITE_PATIENCE = 0.05


def _send_briefly(conn: socket.socket, frame: bytes, patience: float = _WRITE_PATIENCE) -> memoryview | None:
    """Write ``frame``; return what the client did not take within ``patience`` seconds (None when all went)."""
    try:
        sent = conn.send(frame, _NOW)
    except BlockingIOError:
        sent = 0
    if sent == len(frame):  # the usual case: it all fits in the socket
        return None
    view = memoryview(frame)[sent:]
    deadline = time.monotonic() + patience
    try:
        while view:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return view
            conn.settimeout(remaining)
            try:
                sent = conn.send(view)
            except (TimeoutError, BlockingIOError):
                return view
            view = view[sent:]
        return None
    finally:
        # Blocking again: the descriptor's mode is shared with the master, and a lingering
        # wait is a blocking read.
        conn.settimeout(None)
