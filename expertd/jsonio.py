"""JSON for HTTP bodies: the standard library's answers at orjson's speed.

Owns no state.  A model's row of 2,048 floats is 42 KB of JSON; the standard
library spends about 1.5 ms reading it and 3 ms writing the reply on this
machine, more than the model's own compute at batch 1 on a small model, and
HTTP callers pay it on every call.  orjson does both in well under a tenth of
that.  It does not give the same answers for every input, though, so it is
used only where it provably does, and the standard library decides the rest:

- Reading: orjson reads an integer with more than 64 bits as a float, where
  the standard library keeps it exact.  A body with a number of 19 or more
  digits before its point goes to the standard library; so does every body orjson refuses (it
  refuses ``NaN``, ``1e400``, lone surrogates and UTF-16 bodies, which the
  standard library accepts), so an error message is always the standard
  library's own.
- Writing: orjson writes NaN and infinity as ``null``, where expertd refuses
  them (``bad_result``: the caller would read a number that is not there), and
  it writes dataclasses, datetimes, enums and subclasses of the built-in
  types by rules of its own.  Those types are passed to the same ``default``
  as the standard library's (which refuses or converts them), and a reply in
  which ``null`` appears at all is written again by the standard library,
  which refuses NaN and writes ``None`` as the same ``null``.  One difference
  is kept: orjson writes an enum or a UUID as its value, which the standard
  library refuses (it has no option to pass them on, and looking for them
  would cost what it saves); a msgpack caller still gets ``bad_result``.
  Subclasses of the built-in types are written by the standard library, and
  ``default`` runs once per object even when both libraries write a reply.

Floats are written in the shortest form that reads back to the same float, as
the standard library does; the two differ only in exponents (``1e-5`` for
``1e-05``), which every JSON reader takes as the same number.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

try:
    import orjson
except ImportError:  # (a dependency; without it, the standard library alone)
    orjson = None

_ZEROS = bytes.maketrans(b"123456789", b"000000000")
_DEEP = 900  # containers: a body with fewer cannot nest as deep as the standard library's recursion limit
_RUN = b"0" * 19


def _exact_in_orjson(body: bytes) -> bool:
    """Whether no number in ``body`` has 19 digits or more before its point (where orjson's reading of
    integers may differ); the digits after a point do not count: a float's shortest form has up to 20
    (0.00012345678901234567).  Every digit masked to 0, then C-speed searches (a regular expression with a
    look-behind took 4 ms on a 42 KB row)."""
    masked = body.translate(_ZEROS)
    start = masked.find(_RUN)
    while start != -1:  # (the leftmost match starts a run of digits)
        if masked[start - 1:start] not in (b".", b"0"):
            return False
        start = masked.find(_RUN, start + len(_RUN))
    return True


_BUILTINS = (str, int, float, list, tuple, dict)
_OPTIONS = 0 if orjson is None else (orjson.OPT_PASSTHROUGH_DATACLASS | orjson.OPT_PASSTHROUGH_DATETIME
                                     | orjson.OPT_PASSTHROUGH_SUBCLASS)


def loads(body: bytes) -> Any:
    """``json.loads(body)``: the same value, or the same ValueError / RecursionError."""
    # (orjson reads 1,024 levels where the standard library stops near its recursion limit: deep bodies, which
    # max_depth refuses anyway, go to the standard library so that the refusal is the same)
    if (orjson is not None and type(body) is bytes and body.count(b"[") + body.count(b"{") < _DEEP
            and _exact_in_orjson(body)):
        try:
            return orjson.loads(body)
        except orjson.JSONDecodeError:
            pass  # (the standard library accepts some of these, and says why it refuses the rest)
    return json.loads(body)


def dumps(value: Any, default: Callable[[Any], Any]) -> bytes:
    """Compact UTF-8 JSON of ``value``, as ``json.dumps(value, ensure_ascii=False, allow_nan=False,
    separators=(",", ":"), default=default).encode()`` writes it, or its TypeError / ValueError."""
    if orjson is not None:
        done: dict[int, tuple[Any, Any]] = {}
        convert = default

        def once(item: Any) -> Any:  # (the standard library may need the same conversion again: do it once)
            if isinstance(item, _BUILTINS):  # a subclass: the standard library writes it as its base type
                raise TypeError("a subclass of a built-in type")
            key = id(item)
            if key not in done:
                done[key] = (item, convert(item))  # (the item kept: its id stays its own meanwhile)
            return done[key][1]

        def again(item: Any) -> Any:
            key = id(item)
            return done[key][1] if key in done else convert(item)

        try:
            body = orjson.dumps(value, default=once, option=_OPTIONS)
        except (TypeError, orjson.JSONEncodeError):
            pass  # (the standard library's message, or its answer for what orjson cannot write)
        else:
            if b"null" not in body:  # (NaN written as null, or a None: either way, the standard library decides)
                return body
        default = again
    return json.dumps(value, ensure_ascii=False, allow_nan=False, separators=(",", ":"),
                      default=default).encode("utf-8")
