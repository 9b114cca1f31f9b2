"""HTTP connections in a worker: serving the requests handed over, and lingering for the next.

:class:`HttpServing` is mixed into :class:`expertd.worker.Worker`.  Unlike
msgpack connections, an HTTP connection's input is never read ahead: the
worker peeks to find a whole request (the same checks as the master's, see
:mod:`expertd.http`), reads just that request, and answers it through
:class:`expertd.calls.Answering`.  It owns no state: it works with the
Worker's (config, experts, scoreboard slot, recorder, timeouts) and calls the
Worker's lingering and book-keeping methods (``_start_lingering``,
``_may_linger``, ``_wait``, ``_after_request``).
"""

from __future__ import annotations

import logging
import random
import socket
import time
from typing import TYPE_CHECKING, Any, NamedTuple

from expertd import accesslog, firefly, http, http_arrays, jsonio, protocol, stage_timer
from expertd.calls import IN_HAND, Answering, _safe_str
from expertd.errors import BadRequest, BadResult, ConnectionLost, RemoteError, RequestTimeout
from expertd.metrics import AD_HOC

log = logging.getLogger("expertd.worker")  # the worker's own logger: its lines keep their name


class HttpServing(Answering):
    """Serving HTTP connections (a mixin of :class:`expertd.worker.Worker`)."""

    _stop_requested: bool
    _reclaim_signalled: bool
    _http_id: str  # the request id of the HTTP request in hand (its X-Request-Id, or one made here)
    _http_in: int  # ... and its size in bytes, once read

    if TYPE_CHECKING:  # the Worker's, for the reader and type checkers
        def _start_lingering(self, conn_id: int, conn: socket.socket, served: int) -> None: ...
        def _may_linger(self) -> bool: ...
        def _wait(self, read: Any, args: tuple, consumes: bool) -> Any: ...
        def _after_request(self) -> str | None: ...

    def _serve_http_connection(self, conn_id: int, conn: socket.socket,
                               frame: bytearray | None) -> tuple[bool, memoryview | None, str | None, int]:
        """Serve the HTTP request handed over, then linger for the connection's next ones while nobody else waits.

        Unlike msgpack connections, waits are peeks: an HTTP request's end is
        found by looking at its head, and nothing is read that is not served.
        Returns (close, unsent reply bytes, retire reason, requests served since the last DONE).
        """
        self._reclaim_signalled = False  # (a late signal meant for the previous connection)
        close, unsent = self._serve_http_request(conn, frame)
        retire = self._after_request()
        served, lingering, tcp = 1, False, False
        while not (close or unsent or retire or self._stop_requested) and self._may_linger():
            if not lingering:
                lingering = True
                self._start_lingering(conn_id, conn, served)
                served = 0
                # Whether the connection came in on http_listen (http.admit then checks token or Host):
                # asked once per connection, and only where there is such a listener.
                tcp = (self.config.http_listen is not None
                       and conn.getsockopt(socket.SOL_SOCKET, socket.SO_DOMAIN) != socket.AF_UNIX)
            waiting = self._await_next(conn, tcp)
            if isinstance(waiting, str):
                close = waiting == "eof"
                break
            close, unsent = self._serve_http_request(conn, None, waiting)
            retire = self._after_request()
            served += 1
        return close, unsent, retire, served

    def _await_next(self, conn: socket.socket, tcp: bool) -> _PeekedHttp | str:
        """Wait (up to ``linger``) for the connection's next HTTP request.

        Returns what a peek saw of it (the request is whole in the socket, still
        unread), or why not: "eof", "reclaimed" or "expired".
        """
        head = self._wait(conn.recv, (_PEEK, _PEEK_WAIT), False)
        if head.__class__ is str:
            return head
        return self._peek_http(conn, head, tcp)

    def _peek_http(self, conn: socket.socket, head: bytes, tcp: bool) -> _PeekedHttp | str:
        # Only a whole call that the master would pass on as it is: the same checks as the master's.
        try:
            framing = http.scan_head(head, self.config.firefly)
            if framing is None:
                return "expired"
            http.admit(framing, tcp=tcp, token=self.config.token)
            http.check_route(framing, self.experts, self.config.max_frame, self.config.plan)
        except http.HttpRefusal:
            return "expired"  # the master refuses it
        if framing.route not in http.WORKER_ROUTES:
            return "expired"
        if len(head) < framing.size and protocol.queued_bytes(conn.fileno()) < framing.size:
            return "expired"
        return _PeekedHttp(head, framing)

    def _serve_http_request(self, conn: socket.socket, frame: bytearray | None,
                            peeked: _PeekedHttp | None = None) -> tuple[bool, memoryview | None]:
        """Answer one HTTP request on ``conn``: read from it, or ``frame`` if the master read it.

        ``peeked`` is what a look at the socket already saw of the request.
        Returns whether the connection must be closed, and the part of the reply
        the client did not take in time (for the master to finish writing).
        """
        started = time.monotonic()
        head: _PeekedHttp | bytes | None = peeked
        if frame is None and peeked is None:
            try:  # the master handed the connection over because a whole request waits in it
                head = conn.recv(_PEEK, _PEEK_NOW)
            except OSError as exc:
                return self._give_up(exc)
            if not head:  # the client hung up after sending it
                self.board.writing()
                return True, None
        return self._serve_http(conn, frame, head, started)

    def _read_http(self, conn: socket.socket, frame: bytearray | None, peeked: _PeekedHttp | bytes | None,
                   started: float) -> tuple[http.Request | None, tuple[bytes, bool, str] | None]:
        """Read and parse one HTTP request: ``(request, None)``, or ``(None, (response, keep_alive, code))``.

        Raises ConnectionLost, RequestTimeout or OSError when the connection broke.
        """
        board, timeout = self.board, self.config.timeout
        # The id made for a request that brings no X-Request-Id: its number goes on the scoreboard, so that
        # the master names it too if the request times out or its worker dies (accesslog.generated_id).
        number = _random_bits(32) or 1
        self._http_id, self._http_in = accesslog.generated_id(number), 0
        try:
            if frame is not None:  # gathered by the master
                board.begin(started, timeout, number, "")
                raw: bytes | bytearray = frame
            else:
                if isinstance(peeked, _PeekedHttp):
                    head, framing = peeked
                else:
                    head = peeked if peeked and _HEAD_END in peeked else conn.recv(http.MAX_HEAD, _PEEK_NOW)
                    framing = http.scan_head(head, self.config.firefly)
                if framing is None:
                    raise http.HttpRefusal(400, "bad_request", "incomplete request head", close=True)
                limit = self._timeouts.get(framing.expert)  # (None: a pipeline's target, whose plan says)
                # Before begin: a master that sees the request begin sees its route (it never saw a request
                # taken while lingering: its access line names the route from here).
                board.http_route(framing.route)
                board.begin(started, self.config.expert_timeout(framing.expert or "") if limit is None else limit,
                            number, framing.expert or "")
                raw = protocol.recv_exact(conn, framing.size)
            self._http_in = len(raw)
            request = http.parse_request(raw, self._http_id, self.config.firefly)
            if request.request_id != self._http_id:  # the caller's own: the master must name it so too
                self._http_id = request.request_id  # type: ignore[assignment]
                board.caller_id(number, self._http_id)
            IN_HAND[0], IN_HAND[1] = self._http_id, None
            return request, None
        except http.HttpRefusal as refusal:
            return None, (*http.error_response(None, refusal, request_id=self._http_id), refusal.code)

    def _serve_http(self, conn: socket.socket, frame: bytearray | None, peeked: _PeekedHttp | bytes | None,
                    started: float) -> tuple[bool, memoryview | None]:
        """Answer one HTTP request (see :mod:`expertd.http`); same contract as :meth:`_serve_http_request`."""
        try:
            request, refused = self._read_http(conn, frame, peeked, started)
        except (ConnectionLost, RequestTimeout, OSError) as exc:
            return self._give_up(exc)
        if refused is not None:
            response, keep_alive, outcome = refused
            expert = target = None
        else:
            assert request is not None
            expert = request.expert
            target = accesslog.target_of(request.route, expert)
            if http.is_pipeline(request.route, expert, self.experts):
                request = request._replace(route="pipeline")  # (POST /opinion/a,b: the reply is the pipeline's)
                response, keep_alive, outcome = self._http_pipeline(request, started)
                elapsed = time.monotonic() - started
                delivered = self._http_delivered(conn, response, keep_alive, target, started, outcome)
                self._count_pipeline(  # type: ignore[attr-defined]  (it and its experts, once the reply is out)
                    expert if expert in self.config.pipelines else AD_HOC, outcome, elapsed)
                return delivered
            if stage_timer.ALARM_AT[0]:
                stage_timer.off()  # (a pipeline's timer, left running for the next: a call must not see SIGALRM)
            try:
                if request.route == "map":  # many items, one call each: the reply holds each one's outcome
                    items = http.map_items(request)
                    protocol.check_shape(items, {}, len(items), self.config.max_depth)
                    result = self._map(expert or "", items)
                else:
                    args, kwargs = self._http_call(request)
                    result = self._invoke(expert or "", args, kwargs)
            except RemoteError as exc:
                result = exc
            response, keep_alive, outcome = self._http_reply(request, result)
        self.recorder.record(expert, outcome, time.monotonic() - started)
        return self._http_delivered(conn, response, keep_alive, target, started, outcome)

    def _http_pipeline(self, request: http.Request, started: float) -> tuple[bytes, bool, str]:
        """Run a pipeline request: (response, keep-alive, outcome: ok, expert_errors, timeout or an error code)."""
        try:
            document, options = http.pipeline_request(request)
            protocol.check_shape([document], options, 1 + len(options), self.config.max_depth)
            result, outcome = self._run_pipeline(request.expert or "", document, options,  # type: ignore[attr-defined]
                                                 started)
        except RemoteError as exc:
            return self._http_reply(request, exc)
        response, keep_alive, code = self._http_reply(request, result)
        return response, keep_alive, outcome if code == "ok" else code

    def _http_delivered(self, conn: socket.socket, response: bytes, keep_alive: bool, target: str | None,
                        started: float, outcome: str) -> tuple[bool, memoryview | None]:
        close, unsent = self._deliver(conn, response, self._http_id)
        if self._access is not None:
            self._access.write(self._http_id, accesslog.peer_of(conn), "http", target, outcome,
                               accesslog.status_of(response),
                               time.monotonic() - started, self._http_in, len(response))
        if close:
            return close, unsent
        if log.isEnabledFor(logging.DEBUG):
            log.debug("HTTP %s %.3f ms %s", target or "-", (time.monotonic() - started) * 1000, outcome)
        return not keep_alive, unsent  # (with unsent bytes, the master closes once it has written them)


    def _http_call(self, request: http.Request) -> tuple[list, dict]:
        """The arguments of a call (``POST /call/NAME``, or a Firefly path's); RemoteError if they are not usable."""
        if request.binary:  # (a model's rows as raw bytes: no JSON, no nesting to check)
            expert = self.experts.get(request.expert or "")  # type: ignore[attr-defined]
            if expert is None:  # (gone in a reload since the master framed it)
                raise self._unknown(request.expert or "")  # type: ignore[attr-defined]
            return http_arrays.call_arguments(request.body, expert, request.expert or "")
        if request.route == "firefly":
            args, kwargs = firefly.call_arguments(request, self.experts.get(request.expert or ""))  # type: ignore[attr-defined]
        else:
            args, kwargs = http.call_arguments(request)
        protocol.check_shape(args, kwargs, self.config.max_args, self.config.max_depth, request.body, json=True)
        return args, kwargs

    def _http_reply(self, request: http.Request, result: Any) -> tuple[bytes, bool, str]:
        """The response to ``request`` whose call returned ``result`` (a RemoteError: it failed)."""
        if request.route == "firefly":  # (Firefly's shapes: {"error": MESSAGE}, its statuses)
            routes = self.config.firefly  # (the Origin is read only with several allowed origins)
            return firefly.reply(request, result, routes.cors if routes.origins is None else routes.cors_of(request))
        if isinstance(result, BadRequest):  # (perhaps the wrong route: the error says which is meant)
            result = self._hinted(request, result)
        if not isinstance(result, RemoteError):
            try:
                body, headers = (http_arrays.reply(result) if request.binary
                                 else (http.result_body(request, result), ()))
            except BaseException as exc:  # a result's own tolist() may raise anything; deep nesting too
                result = BadResult(f"{request.expert} returned a value that cannot be sent as "
                                   f"{'raw bytes' if request.binary else 'JSON'}: "
                                   f"{_safe_str(exc)}", expert=request.expert)
            else:
                return (*http.respond(request, 200, body, http_arrays.OCTET_STREAM if request.binary
                                      else http.JSON_TYPE, headers), "ok")
        return (*http.error_response(request, result), result.code)

    def _hinted(self, request: http.Request, error: BadRequest) -> RemoteError:
        """``error`` with a hint at the route meant, when its request's body suggests another (else as it is)."""
        expert = self.experts.get(request.expert or "")  # type: ignore[attr-defined]
        if expert is None or request.route != "call" or request.binary:
            return error
        try:
            body = jsonio.loads(request.body)
        except (ValueError, RecursionError):  # (a body nested too deeply was refused for it: no hint)
            return error
        takes_one = False  # (a document expert: one parameter, which one positional argument fills)
        if expert.signature is not None and len(expert.signature.parameters) == 1:
            try:
                expert.signature.bind(None)
                takes_one = True
            except TypeError:
                pass
        hint = http.route_hint(request.route, expert.name, body, expert.batched, takes_one)
        return error if hint is None else http.with_hint(error, hint)


_random_bits = random.getrandbits  # (reseeded in every forked process by the random module itself)
_PEEK = 4096


class _PeekedHttp(NamedTuple):
    """An HTTP request seen whole in the socket by a peek, not yet read."""

    head: bytes
    framing: http.Head


_HEAD_END = b"\n\r\n"  # a peek that holds this holds the whole head (bare-LF heads are looked at again)

# Plain ints: socket's flags are enum.IntFlag members, and ``|`` on those runs Python code.
_PEEK_NOW = int(socket.MSG_PEEK) | int(socket.MSG_DONTWAIT)
_PEEK_WAIT = int(socket.MSG_PEEK)
