"""Hints after a failed HTTP call whose body suggests another route was meant: pure functions.

``POST /call/NAME`` with a document for an expert that takes one, or with an
array of items for a batched expert, fails as a call; the reply then says
which route was meant (``/opinion/NAME``, ``/map/NAME``).  Only a failed call
is looked at, so successful ones cost nothing more.  No state.
"""

from __future__ import annotations

from typing import Any

from expertd.errors import RemoteError


def route_hint(route: str, name: str, body: Any, batched: bool, takes_one: bool) -> str | None:
    """What to say after a ``bad_request`` of ``POST /ROUTE/NAME`` whose body suggests another route, or None.

    A document (an object) sent to ``/call/NAME`` of an expert that takes one
    argument is passed as keyword arguments: ``/opinion/NAME`` is what was
    meant.  An array sent to ``/call/NAME`` of a batched expert is that many
    arguments, not that many items: ``/map/NAME`` is for many items.  (Only
    a failed call is looked at: successful ones cost nothing more.)
    """
    if route != "call":
        return None
    if isinstance(body, dict) and takes_one and not batched:
        return (f"{name} takes one document: POST /opinion/{name} with the document as the body adds its opinion "
                f"to it; POST /call/{name} passes an object's keys as keyword arguments (send [DOCUMENT] to pass "
                "it as the one argument)")
    if isinstance(body, list) and batched and len(body) != 1:
        return (f"{name} is batched and takes one item a call: POST /call/{name} with [ITEM], or POST /map/{name} "
                f"with the JSON array of items to have many at once")
    return None


def with_hint(error: RemoteError, hint: str) -> RemoteError:
    """``error`` with ``hint`` after its message (the same class and expert)."""
    hinted = type(error)(f"{error.message}; {hint}", remote_type=error.remote_type, expert=error.expert)
    hinted.code = error.code
    return hinted
