"""Requests as they arrive: examine without reading, gather the slow, answer what needs no worker, write the rest.

When bytes arrive on an idle connection, :meth:`Intake.examine` peeks (never
reads) and decides, with :mod:`expertd.framing`, whether a whole request is
waiting.  A whole call joins the dispatcher's queue, still unread in its socket:
the worker reads it.  A request that arrives in pieces is gathered here and
handed over as a frame.  What the master answers itself (STATUS, LIST, control
verbs, GET /health, /experts, /metrics) is read here and answered with the
values :mod:`expertd.admin` returns.  Replies a client is slow to take are
written here as its socket drains.

State owned here: none of its own; it moves connections through their states
(:mod:`expertd.connections`) and appends to the dispatcher's queue.
"""

from __future__ import annotations

import logging
import math
import socket

from expertd import accesslog, http, protocol
from expertd.accept import PEEK_NOW, PEEK_SIZE
from expertd.backoff import Quarantine, Quarantines
from expertd.connections import (
    BUSY,
    ENDED,
    ET_READ,
    IDLE,
    LINGERING,
    PARTIAL,
    QUEUED,
    WAITING,
    WRITING,
    Connection,
    ConnectionTable,
)
from expertd.errors import AccessDenied, BadRequest, Overloaded, Quarantined, RemoteError
from expertd.firefly import MASTER_ROUTES as FIREFLY_MASTER_ROUTES
from expertd.firefly import refusal_of as firefly_refusal
from expertd.framing import BAD_MAGIC, HTTP, MASTER_KINDS, frame_of, http_refusal, sniff
from expertd.metrics import Metrics
from expertd.serving import Serving

log = logging.getLogger("expertd.master")

_GATHER_CHUNK = 256 * 1024
_MAP = protocol.MAP
_PIPELINE = protocol.PIPELINE
_NAMED_KINDS = (protocol.CALL, _MAP, _PIPELINE)  # requests whose body names an expert (or a pipeline's target)
_REFUSED_BODY_WAIT = 64 * 1024  # a refused request's body up to this size is read before the refusal is sent


class Intake:
    """Examines, gathers and answers requests on the master's connections."""

    def __init__(self, serving: Serving, table: ConnectionTable, queue: object, admin: object,
                 quarantines: Quarantines, metrics: Metrics) -> None:
        self.serving = serving
        self.table = table
        self.queue = queue  # the dispatcher's queue of whole requests (a deque)
        self.admin = admin  # control verbs and the master's own HTTP routes (expertd.admin.Admin)
        self.quarantines = quarantines
        self.metrics = metrics

    def on_event(self, conn: Connection, mask: int) -> None:
        state = conn.state
        if state == IDLE or state == PARTIAL:
            self.examine(conn)
            if mask & ENDED and conn.state == PARTIAL:
                self.table.close(conn)  # the client has ended its input: its request can never be whole
        elif state == WRITING:
            self.flush(conn)
        elif state == BUSY or state == LINGERING:
            conn.look_again = True  # bytes came while a worker holds it: look when it comes back

    def examine(self, conn: Connection) -> None:
        """Decide, without reading, whether ``conn`` has a whole request waiting."""
        if conn.inbuf is not None:
            self._gather(conn)
            return
        unread = conn.unread
        ended = False  # the client has sent all it will (end of file after what a worker handed back)
        try:
            # One peek usually sees the whole of a small request, saving the FIONREAD call.
            peeked = conn.sock.recv(PEEK_SIZE, PEEK_NOW)
        except BlockingIOError:
            if not unread:
                return
            peeked = b""  # nothing more yet: what a worker handed back may be whole
        except OSError:
            self.table.close(conn)
            return
        else:
            if not peeked:
                if not unread:
                    self.table.close(conn)  # the client hung up
                    return
                ended = True  # what it sent before ending is still answered
        head = unread + peeked if unread else peeked
        if not conn.speaks:  # a connection's first bytes decide what it speaks, for its whole life
            speaks = sniff(head)
            if speaks is None:
                self.table.fail(conn, BadRequest(BAD_MAGIC))
                return
            if not speaks:
                self._mark_partial(conn)
                return
            conn.speaks = speaks
        if conn.speaks == HTTP:
            self._examine_http(conn, head)
            return
        if len(head) < protocol.HEADER_SIZE:
            self._close_or_wait(conn, ended)
            return
        frame = frame_of(head, self.serving.config.max_frame)
        if frame.request_id is not None:
            conn.request_id = frame.request_id
        conn.expert = frame.expert
        if frame.error is not None:
            conn.frame_size = 0  # (the access log's bytes in: nothing of it is read)
            self.table.fail(conn, frame.error)
            return
        kind = frame.kind
        # (A MAP is a batch already; a PIPELINE's target may name a batched expert, but its worker runs
        # it as a batch of one: neither is gathered with other calls.)
        conn.whole_batch = kind == _MAP or kind == _PIPELINE
        conn.frame_size = size = frame.size
        if len(head) < size and len(peeked) == PEEK_SIZE:
            queued = len(unread) + protocol.queued_bytes(conn.fd)
        else:
            queued = len(head)
        if queued >= size:
            if kind in MASTER_KINDS:
                self._control(conn, kind, conn.request_id)
                return
            if self.quarantines.entries and (kind == protocol.CALL or kind == _MAP or kind == _PIPELINE):
                quarantined = self._quarantined(conn.expert, kind == _PIPELINE)
                if quarantined is not None:
                    self._refuse_quarantined(conn, *quarantined)
                    return
            if not unread:
                conn.look_again = queued != size  # more than this request waits, or may
                conn.queued_at = self.serving.now
                conn.to(QUEUED)  # whole in the socket: the worker reads it
                self.queue.append(conn)  # type: ignore[attr-defined]
                return
        if kind in MASTER_KINDS:
            self._close_or_wait(conn, ended)  # control requests are tiny: wait for the rest
            return
        # Arriving in pieces, or begun in bytes a worker handed back: gathered here and handed
        # over as a frame.  (The socket may never hold all of a request sent in small pieces:
        # they fill the queue's accounting long before its byte count.)
        conn.inbuf, conn.unread = bytearray(), b""
        if not self.table.hold_gathered(conn, len(unread)):
            self.table.fail(conn, Overloaded("too many large requests are arriving slowly; retry in a moment"))
            return
        conn.inbuf += unread
        self._gather(conn)

    def _examine_http(self, conn: Connection, head: bytes) -> None:
        """An HTTP request: refuse, answer here (GETs), or queue for a worker once it is whole."""
        conn.http_id = conn.http_target = None  # (the last request's: the logs must not name this one so)
        conn.frame_size = 0
        config = self.serving.config
        try:
            request = http.scan_head(head, config.firefly)
            if request is None and len(head) == PEEK_SIZE:  # a long head: look further, once it grew
                queued = protocol.queued_bytes(conn.fd)
                if queued <= conn.head_scanned:
                    return
                conn.head_scanned = queued
                head = conn.sock.recv(http.MAX_HEAD, PEEK_NOW)
                request = http.scan_head(head, config.firefly)
            if request is None:
                self._mark_partial(conn)
                return
        except http.HttpRefusal as refusal:  # the framing itself is bad: nothing more can be read
            self.table.fail(conn, refusal)
            return
        except OSError:
            self.table.close(conn)
            return
        conn.request_id, conn.expert, conn.frame_size, conn.head_scanned = 0, request.expert, request.size, 0
        conn.http_id, conn.http_target = request.request_id, accesslog.target_of(request.route, request.expert)
        # (A map is a batch already; a pipeline's worker runs its experts as batches of one: neither is gathered.)
        pipeline = http.is_pipeline(request.route, request.expert, self.serving.experts)
        conn.whole_batch = request.route == "map" or pipeline
        queued = len(head) if len(head) >= request.size else protocol.queued_bytes(conn.fd)
        refusal = http_refusal(request, tcp=conn.tcp, token=config.token, experts=self.serving.experts,
                               max_frame=config.max_frame, plan=config.plan, public_health=config.public_health,
                               firefly=config.firefly, raw=head)
        if refusal is None and self.quarantines.entries:
            quarantined = self._quarantined(request.expert, pipeline)
            if quarantined is not None:
                quarantine, expert = quarantined
                refusal = http.HttpRefusal(
                    503, Quarantined.code, self.quarantines.message(expert, quarantine,
                                                                    config.quarantine_after, config.quarantine_window),
                    headers=(("Retry-After", str(math.ceil(quarantine.until - self.serving.now))),))
        if refusal is not None:
            if queued < request.size and request.body_size <= _REFUSED_BODY_WAIT:
                self._mark_partial(conn)  # read the whole request first, so that closing cannot reset the reply
                return
            if refusal.code == "unknown_expert":
                self.metrics.count_failure(None, refusal.code)
            elif refusal.code == Quarantined.code:
                self.metrics.count_failure(request.expert, refusal.code)
            self.table.fail(conn, refusal)
            return
        if request.route not in http.WORKER_ROUTES:
            if queued >= request.size:
                self._answer_http(conn, request.route)
            else:
                self._mark_partial(conn)
            return
        if queued >= request.size:
            conn.look_again = queued != request.size
            conn.queued_at = self.serving.now
            conn.to(QUEUED)  # whole in the socket: the worker reads it
            self.queue.append(conn)  # type: ignore[attr-defined]
            return
        if request.expects_continue and queued <= request.head_size:
            try:  # curl waits a second for this before sending a body over 1 KiB
                conn.sock.send(http.CONTINUE, socket.MSG_DONTWAIT)
            except OSError:
                pass
        conn.inbuf = bytearray()
        self._gather(conn)

    def _gather(self, conn: Connection) -> None:
        assert conn.inbuf is not None
        conn.last_active = self.serving.now  # (called when bytes arrive: how long a request stalled is seen here)
        while len(conn.inbuf) < conn.frame_size:
            try:
                data = conn.sock.recv(min(_GATHER_CHUNK, conn.frame_size - len(conn.inbuf)), socket.MSG_DONTWAIT)
            except BlockingIOError:
                self._mark_partial(conn)
                return
            except OSError:
                self.table.close(conn)
                return
            if not data:
                self.table.close(conn)
                return
            if not self.table.hold_gathered(conn, len(data)):
                self.table.fail(conn, Overloaded("too many large requests are arriving slowly; retry in a moment"))
                return
            conn.inbuf += data
        if conn.expert is None and conn.speaks != HTTP and conn.inbuf[3] in _NAMED_KINDS:
            # The expert's name came after the first bytes looked at: read it now that all is here (its
            # timeout, quarantine and batches go by it).
            conn.expert = protocol.named_hint(conn.inbuf[3],
                                              bytes(conn.inbuf[protocol.HEADER_SIZE:protocol.HEADER_SIZE + 512]))
        conn.look_again = True  # (the next request may have come in the same edge as this one's last bytes)
        conn.queued_at = self.serving.now
        conn.to(QUEUED)
        self.queue.append(conn)  # type: ignore[attr-defined]

    def _close_or_wait(self, conn: Connection, ended: bool) -> None:
        """A request not whole yet: wait for the rest, unless the client has ended its input."""
        if ended:
            self.table.close(conn)
        else:
            self._mark_partial(conn)

    def _mark_partial(self, conn: Connection) -> None:
        if conn.state != PARTIAL:
            conn.to(PARTIAL)
            conn.partial_since = self.serving.now

    def flush(self, conn: Connection) -> None:
        """Write more of a reply the master holds; the connection is idle again once it is out."""
        assert conn.outbuf is not None
        try:
            while conn.outbuf:
                conn.outbuf = conn.outbuf[conn.sock.send(conn.outbuf, socket.MSG_DONTWAIT):]
        except BlockingIOError:
            return
        except OSError:
            self.table.close(conn)
            return
        self.table.release_reply(conn)
        self.table.epoll.modify(conn.fd, ET_READ)
        if self.serving.stopping or conn.close_when_written:
            self.table.close(conn)
            return
        self.table.rest(conn, self.serving.now)
        self.examine(conn)

    # ------------------------------------------------- requests the master answers
    def take_frame(self, conn: Connection) -> bytes:
        """Read the request in hand (known to be whole) from what a worker handed back, then the socket."""
        unread, size = conn.unread, conn.frame_size
        if len(unread) >= size:
            conn.unread = unread[size:]
            return unread[:size]
        conn.unread = b""
        return unread + conn.sock.recv(size - len(unread), socket.MSG_DONTWAIT)

    def _quarantined(self, target: str | None, pipeline: bool) -> tuple[Quarantine, str] | None:
        """The quarantine a request runs into, and its expert's name: the one it names, or for a pipeline
        the first of its plan's experts in quarantine (a crash is charged to the expert, not the pipeline)."""
        quarantine = self.quarantines.of(target)
        if quarantine is not None or not pipeline or not target:
            return None if quarantine is None else (quarantine, target or "")
        try:
            plan = self.serving.config.plan(target)
        except RemoteError:
            return None  # (the worker says what is wrong with it)
        for stage in plan.stages:
            for name in stage:
                quarantine = self.quarantines.of(name)
                if quarantine is not None:
                    return quarantine, name
        return None

    def _refuse_quarantined(self, conn: Connection, quarantine: Quarantine, expert: str) -> None:
        """Answer a whole request to a quarantined expert with the error; the connection stays open."""
        self.metrics.count_failure(expert, Quarantined.code)
        try:
            frame = self.take_frame(conn)
        except OSError:
            self.table.close(conn)
            return
        if len(frame) != conn.frame_size:
            self.table.close(conn)
            return
        self.table.rest(conn, self.serving.now)
        config = self.serving.config
        error = Quarantined(self.quarantines.message(expert, quarantine, config.quarantine_after,
                                                     config.quarantine_window), expert=expert)
        error.request_id = self.table.log_id(conn)
        reply = protocol.encode_error(conn.request_id, error)
        if accesslog.LOG is not None:
            self.table.log_access(conn, error.request_id, error.code, reply)
        self.table.answer(conn, reply)

    def _control(self, conn: Connection, kind: int, request_id: int) -> None:
        """Answer a request of the master's here: status, list, and (for control_uids/gids) reload, stop, scale."""
        try:
            frame = self.take_frame(conn)
            if len(frame) != conn.frame_size:
                raise ValueError("short read")
            body = protocol.unpack(frame[protocol.HEADER_SIZE:]) if len(frame) > protocol.HEADER_SIZE else None
        except (OSError, ValueError) as exc:
            self.table.fail(conn, BadRequest(f"bad control request: {exc}"))
            return
        self.table.rest(conn, self.serving.now)
        admin = self.admin
        refusal = admin.refusal(kind, conn.uid, conn.gid, conn.groups, conn.pid)  # type: ignore[attr-defined]
        if refusal is not None:
            refusal.request_id = self.table.log_id(conn)
            reply = protocol.encode_error(request_id, refusal)
            if accesslog.LOG is not None:
                self.table.log_access(conn, refusal.request_id, refusal.code, reply, target=_label(kind))
            self.table.answer(conn, reply)
            return
        if kind == protocol.RELOAD:
            log.info("control: RELOAD from uid %d (pid %d)", conn.uid, conn.pid)
            conn.to(WAITING)  # answered with the outcome once the new generation loads or fails
            admin.reload(waiter=(conn, request_id))  # type: ignore[attr-defined]
            return
        try:
            reply, after = admin.command(kind, body, conn.uid, conn.pid)  # type: ignore[attr-defined]
        except BadRequest as exc:
            self.table.fail(conn, exc)
            return
        frame = protocol.encode_frame(protocol.RESULT, request_id, protocol.pack(reply))
        if accesslog.LOG is not None:
            self.table.log_access(conn, self.table.log_id(conn), "ok", frame, target=_label(kind))
        self.table.send_reply(conn, frame)
        if after is not None:
            after()
        elif conn.state == IDLE:
            self.table.recheck.append(conn)  # a request pipelined behind this one: look in the main loop

    def _answer_http(self, conn: Connection, route: str) -> None:
        """GET /health, /experts and /metrics (and Firefly's GET / and preflights), answered here: they need no
        worker."""
        firefly = self.serving.config.firefly
        try:
            raw = conn.sock.recv(conn.frame_size, socket.MSG_DONTWAIT)  # whole in the socket: checked
            request = http.parse_request(raw, self.table.log_id(conn), firefly)
        except OSError:
            self.table.close(conn)
            return
        except http.HttpRefusal as refusal:
            self.table.fail(conn, refusal)
            return
        self.table.rest(conn, self.serving.now)
        try:
            status, body, content_type = self.admin.http_get(  # type: ignore[attr-defined]
                route, conn.uid, conn.gid, conn.groups, conn.pid, conn.tcp)
        except AccessDenied as refused:
            code = refused.code
            if firefly is not None and route in FIREFLY_MASTER_ROUTES:  # (GET /: in Firefly's shape, {"error"})
                refused = firefly_refusal(refused, firefly.cors_of(request))
            reply, keep_alive = http.error_response(request, refused)
        else:
            headers = firefly.cors_of(request) if firefly is not None and route in FIREFLY_MASTER_ROUTES else ()
            reply, keep_alive = http.respond(request, status, body, content_type, headers)
            code = "ok" if status < 400 else "unhealthy"  # (/health's 503)
        if accesslog.LOG is not None:
            self.table.log_access(conn, request.request_id or "-", code, reply)
        conn.close_when_written = not keep_alive
        self.table.send_reply(conn, reply)
        if conn.state == IDLE:
            if keep_alive:
                self.table.recheck.append(conn)  # a request pipelined behind this one: look in the main loop
            else:
                self.table.close(conn)


def _label(kind: int) -> str:
    """What the access log names a request of the master's: "(status)", "(reload)"... (see protocol.KIND_LABELS)."""
    return protocol.KIND_LABELS.get(kind, "(?)")
