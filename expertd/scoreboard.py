"""The scoreboard: state the master and its workers share without messages.

An anonymous shared memory map created by the master before it forks any
worker (so every worker inherits the same pages).  The master writes how many
requests are waiting; each worker writes, in its own slot, the request it is
serving, when it began and its timeout, and whether it has begun writing the
reply; for an HTTP request, its route and the caller's own X-Request-Id (the
master names a request a lingering worker took itself by them, should the
worker die or time out).  Reading or writing it is a memory access, not a system call, which is
what lets a worker serve a connection's next request directly (see
:mod:`expertd.worker`, "lingering") while the master still enforces timeouts
and knows whether an error frame may be sent.

Values are written field by field, so a reader may see a slot mid-update.
The order of writes makes that safe where it matters: a request's timeout is
written before its start time, so a slot that shows a start shows its timeout.
Every write is a slice assignment of packed bytes, never ``struct.pack_into``:
pack_into zero-fills its destination before writing, so rewriting a live field
with the same value would briefly show zero to the other process.
"""

from __future__ import annotations

import mmap
import struct

_HEADER = struct.Struct("=Id")  # requests waiting in the master's queue; lingering paused until (monotonic)
_PAUSED = struct.Struct("=d")
_COUNT = struct.Struct("=I")
# began (monotonic, 0 = idle), timeout, request id, writing, expert, requests served by the worker in
# all, next connection waiting in the worker's channel; then, HTTP only: the request's route, and the caller's
# X-Request-Id with the request number it belongs to (a stale one, of an earlier request, shows another number)
_SLOT = struct.Struct("=ddIB47sIB7x8sI64s4x")
_SERVING = struct.Struct("=ddIB47s")  # the slot's first fields (see read)
_REQUESTS = struct.Struct("=I")
_BEGAN = struct.Struct("=d")
_TAIL = struct.Struct("=dIB47s")
_REQUESTS_AT = 68
_NEXT_AT = 72
_ROUTE_AT = 80
_CALLER_AT = 88
_CALLER = struct.Struct("=I64s")
ROUTE_SIZE = 8  # bytes of an HTTP route's name ("pipeline" is the longest)
CALLER_ID_SIZE = 64  # the longest X-Request-Id kept (accesslog.request_id_of): a slot holds it whole
_IDLE = _BEGAN.pack(0.0)
MAX_SLOTS = 4096
EXPERT_SIZE = 47  # bytes of an expert's name kept in a slot


def board_name(expert: str) -> bytes:
    """``expert`` as a slot holds it: UTF-8, cut or NUL-padded to EXPERT_SIZE bytes."""
    return expert.encode("utf-8", "replace")[:EXPERT_SIZE].ljust(EXPERT_SIZE, b"\0")


class Scoreboard:
    """Shared per-worker state, indexed by slot number."""

    def __init__(self, slots: int = MAX_SLOTS) -> None:
        self.slots = slots
        self._map = mmap.mmap(-1, _HEADER.size + slots * _SLOT.size)  # MAP_SHARED | MAP_ANONYMOUS

    # master side
    def set_queued(self, count: int) -> None:
        """How many requests wait in the master; written when that crosses zero, which is all workers read."""
        self._map[0:4] = _COUNT.pack(count)

    def pause_lingering(self, until: float) -> None:
        """Workers do not linger before ``until``: the master had to take one back (contention)."""
        self._map[4:12] = _PAUSED.pack(until)

    def clear(self, slot: int) -> None:
        """Reset the request fields of an idle worker's slot (its request count stays)."""
        offset = self._offset(slot)
        self._map[offset : offset + _REQUESTS_AT] = bytes(_REQUESTS_AT)

    def set_next(self, slot: int, waiting: bool) -> None:
        """Whether a connection handed ahead waits in the worker's channel (it must not linger then)."""
        self._map[_HEADER.size + slot * _SLOT.size + _NEXT_AT] = 1 if waiting else 0  # (twice a handed-over request)

    def requests(self, slot: int) -> int:
        """How many requests the worker in ``slot`` has served (it keeps this current itself)."""
        return _REQUESTS.unpack_from(self._map, self._offset(slot) + _REQUESTS_AT)[0]

    def read(self, slot: int) -> tuple[float, float, int, bool, str]:
        """``(began, timeout, request_id, writing, expert)``; began is 0.0 when the worker is not serving."""
        began, timeout, request_id, writing, expert = _SERVING.unpack_from(self._map, self._offset(slot))
        return began, timeout, request_id, bool(writing), expert.rstrip(b"\0").decode("utf-8", "replace")

    def http_request(self, slot: int, request_id: int) -> tuple[str | None, str | None]:
        """``(route, caller's id)`` of the HTTP request ``request_id`` (the scoreboard's request number) the
        worker in ``slot`` serves, as far as it wrote them: None for what it did not (yet)."""
        offset = self._offset(slot)
        route = self._map[offset + _ROUTE_AT : offset + _ROUTE_AT + ROUTE_SIZE].rstrip(b"\0").decode("ascii", "replace")
        number, caller = _CALLER.unpack_from(self._map, offset + _CALLER_AT)
        caller_id = caller.rstrip(b"\0").decode("ascii", "replace") if number == request_id and caller[0] else None
        return route or None, caller_id

    def slot(self, slot: int) -> SlotWriter:
        """The writer a worker uses for its own slot."""
        return SlotWriter(self._map, self._offset(slot))

    # worker side
    def may_linger(self, now: float) -> bool:
        """No request waiting in the master, and lingering not paused."""
        queued, paused_until = _HEADER.unpack_from(self._map, 0)
        return queued == 0 and now >= paused_until

    def _offset(self, slot: int) -> int:
        return _HEADER.size + slot * _SLOT.size


class SlotWriter:
    """One worker's slot, written by that worker on every request (so: no lookups on the way)."""

    __slots__ = ("_began", "_caller", "_expert", "_map", "_next", "_requests", "_route", "_tail", "_writing")

    def __init__(self, shared: mmap.mmap, offset: int) -> None:
        self._map = shared
        self._began = slice(offset, offset + 8)
        self._tail = slice(offset + 8, offset + 8 + _TAIL.size)
        self._writing = offset + 20
        self._expert = slice(offset + 21, offset + 21 + EXPERT_SIZE)
        self._next = offset + _NEXT_AT
        self._requests = slice(offset + _REQUESTS_AT, offset + _REQUESTS_AT + 4)
        self._route = slice(offset + _ROUTE_AT, offset + _ROUTE_AT + ROUTE_SIZE)
        self._caller = slice(offset + _CALLER_AT, offset + _CALLER_AT + _CALLER.size)

    def begin(self, began: float, timeout: float, request_id: int, expert: str) -> None:
        """The worker took a request out of its socket (or the master's frame)."""
        # The other fields first, ``began`` last: a reader that sees a request begin sees its
        # timeout too.
        self._map[self._tail] = _TAIL.pack(timeout, request_id, 0, expert.encode("utf-8", "replace")[:47])
        self._map[self._began] = _BEGAN.pack(began)

    def http_route(self, route: str) -> None:
        """The HTTP request in hand came on ``route`` ("call", "opinion"...): its access line names it."""
        self._map[self._route] = route.encode("ascii", "replace")[:ROUTE_SIZE].ljust(ROUTE_SIZE, b"\0")

    def caller_id(self, request_id: int, caller_id: str) -> None:
        """The HTTP request ``request_id`` (its number on the scoreboard) brought its own X-Request-Id.

        Written only for those: the request number tells the master whether what it reads is this
        request's (requests without one of their own are named by their number).
        """
        self._map[self._caller] = _CALLER.pack(request_id, caller_id.encode("ascii", "replace")[:CALLER_ID_SIZE])

    def running(self, expert: bytes) -> None:
        """The request in hand runs ``expert`` now (a pipeline's, one after another): a crash is charged to it.

        ``expert`` is the name as :func:`board_name` makes it (EXPERT_SIZE bytes, padded).
        """
        self._map[self._expert] = expert

    def running_field(self) -> tuple[mmap.mmap, slice]:
        """Where :meth:`running` writes: ``(the map, the field)``, for a loop that marks one expert after another
        itself (a pipeline's stages: a method call per stage costs more than the write).  Write only what
        :func:`board_name` makes there, as running does: the master reads the same bytes either way."""
        return self._map, self._expert

    def writing(self) -> None:
        """Reply bytes may be on their way: the master must not write an error frame now."""
        self._map[self._writing] = 1

    def end(self) -> None:
        """The reply is out; the worker serves nothing."""
        self._map[self._began] = _IDLE

    def next_waiting(self) -> bool:
        """The master handed this worker its next connection ahead (see Scoreboard.set_next)."""
        return self._map[self._next] != 0

    def taking_next(self) -> None:
        """A new connection: the last reply's "writing" mark no longer says anything about it."""
        self._map[self._writing] = 0

    def served(self, requests: int) -> None:
        self._map[self._requests] = _REQUESTS.pack(requests)
