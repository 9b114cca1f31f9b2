"""Firefly's HTTP protocol beside expertd's own (``firefly_routes = yes``): routes, metadata, tokens, errors.

Firefly (``firefly -c config.yml``, firefly-python 0.1.15) serves each function
at its path, ``/NAME`` unless the config says otherwise, and its clients
(``firefly.Client``, curl from a Rails app) expect, exactly:

    POST PATH            body: a JSON object of keyword arguments; 200 with the result as JSON
    GET  /               {"app": "firefly", "version", "functions": {NAME: {"path", "doc", "parameters"}}}
    OPTIONS PATH         200, empty (a browser's CORS preflight)
    Authorization: Token TOKEN (when a token is set), else 403 {"error": "Invalid auth token"}
    errors               {"error": MESSAGE}: 400 body not JSON, 422 arguments that do not bind to the
                         function's signature, 500 "ValueError: message" when the function raises, 404
                         "Not found: PATH"

This module holds the pure parts, the same in the master and the workers:
:class:`Routes` (the path table built from a config: which route a request
takes, and what is refused by its head alone), the arguments of a call and
the shape of its reply, and GET /'s metadata.  :mod:`expertd.http` frames and
parses with it (``scan_head(..., firefly)``); the master answers GET / and
OPTIONS (:mod:`expertd.admin`), a worker the calls (:mod:`expertd.worker_http`),
which count, log and keep connections alive as ``/call/NAME`` does.  Where
expertd departs from Firefly, and why, is in docs/firefly.md.

State owned here: none (a Routes is built once per config and never changes).
"""

from __future__ import annotations

import inspect
import json
import re
from typing import Any
from urllib.parse import unquote

import msgpack

from expertd import __version__, http
from expertd.errors import AccessDenied, BadRequest, BadResult, RemoteError

# Head.route of a Firefly request (and what the access log names it by: /firefly/NAME, /firefly_index...).
CALL = "firefly"  # POST PATH: a worker calls the function (one of http.WORKER_ROUTES)
INDEX = "firefly_index"  # GET /: the master answers with the functions' metadata
PREFLIGHT = "firefly_options"  # OPTIONS PATH or /: the master answers 200, empty
MISSING = "firefly_missing"  # no function there (its expert field holds the path, for the 404's message)
MASTER_ROUTES = frozenset({INDEX, PREFLIGHT})
CALL_TARGET = f"/{CALL}/"  # (accesslog.target_of a call: the master's failures of one take Firefly's shape too)
ROUTES = frozenset({CALL, INDEX, PREFLIGHT, MISSING})

_NATIVE_GETS = frozenset(http.MASTER_ROUTES.values())  # GET /health stays the health check; POST /health may call
PREFLIGHT_TYPE = "text/plain; charset=utf-8"
NO_BODY = "the request has no body; send a JSON object of named arguments (curl -d '{\"n\": 5}')"
NO_FILES = ("expertd does not take file uploads (multipart/form-data); send the arguments as a JSON object "
            "(Content-Type: application/json)")


class FireflyRefusal(http.HttpRefusal):
    """A Firefly request refused by its head: Firefly's body, ``{"error": MESSAGE}``."""

    def body(self) -> bytes:
        return http.dumps({"error": self.message})


class FireflyInputError(BadRequest):
    """A Firefly call's input refused with Firefly's status (422: arguments that do not bind; 415: a file upload).

    Never sent over msgpack: only :func:`reply` renders it, with ``status``.
    """

    def __init__(self, status: int, message: str, expert: str | None = None) -> None:
        super().__init__(message, expert=expert)
        self.status = status


class Routes:
    """The Firefly paths of a config's experts, and its CORS headers."""

    __slots__ = ("cors", "origins", "path_of", "paths")

    def __init__(self, paths: dict[str, str], allow_origins: str = "") -> None:
        self.paths = paths  # URL path -> expert name (decoded: a path holds no %, see settings_types)
        self.path_of = {name: path for path, name in paths.items()}
        listed = allow_origins.replace(",", " ").split()
        # Several origins: each response names the request's Origin if listed (a browser takes one origin or
        # *, never a list), so it depends on the request (cors_of).  None: the same headers for all (cors).
        self.origins = frozenset(origin.encode("ascii") for origin in listed) if len(listed) > 1 else None
        self.cors = cors_headers(allow_origins)

    @classmethod
    def of(cls, config: Any) -> Routes:
        """The routes of a :class:`expertd.config.Config` (its experts' ``route_path``, its ``allow_origins``)."""
        return cls({spec.route_path: name for name, spec in config.experts.items()}, config.allow_origins)

    def route(self, method: str, target: str, route: str, expert: str | None) -> tuple[str, str | None]:
        """The route of a request: expertd's own (``route``, ``expert``, as :mod:`expertd.http` found them)
        unless the path is a Firefly one (or no route at all: Firefly's 404)."""
        if route and (method == "GET" or method == "HEAD" or route not in _NATIVE_GETS):
            return route, expert
        path = unquote(target.partition("?")[0])
        name = self.paths.get(path)
        if name is not None:
            return (PREFLIGHT if method == "OPTIONS" else CALL), name
        if path == "/":
            return (PREFLIGHT if method == "OPTIONS" else INDEX), None
        return (route, expert) if route else (MISSING, path)

    def cors_of(self, request: http.Request) -> tuple[tuple[str, str], ...]:
        """The CORS headers of the response to ``request`` (parsed by h11; its Origin read only with several
        allowed origins)."""
        if self.origins is None:
            return self.cors
        return self.cors_for(header(request, b"origin"))

    def cors_for(self, origin: bytes | None) -> tuple[tuple[str, str], ...]:
        """With several allowed origins: the request's ``origin`` echoed if it is one of them (exact match),
        else no Access-Control-Allow-Origin; Vary: Origin either way (caches must keep them apart)."""
        if self.origins is None:
            return self.cors
        if origin is not None and origin in self.origins:
            return (("Access-Control-Allow-Origin", origin.decode("ascii")), *_CORS_REST, _VARY)
        return (_VARY,)

    def refusal(self, head: http.Head, *, tcp: bool, token: str, experts: dict | set,
                max_body: int, raw: bytes = b"") -> http.HttpRefusal | None:
        """Whether a Firefly request (``head.route`` in ROUTES) is refused by its head alone, and how.

        As :func:`expertd.http.admit` for expertd's routes: on http_listen, the
        token (``Token`` or ``Bearer``), or without one a local Host; the Unix
        socket is guarded by its file mode.  A preflight needs no token: a
        browser never sends credentials with one, and it runs nothing.  ``raw``: the request's head, read
        for its Origin with several allowed origins (:class:`expertd.http.Head` does not carry it: the master
        frames every request, and most never need it).
        """
        route, method = head.route, head.method
        if tcp:
            if not token:
                try:
                    http.check_local_origin(head)
                except http.HttpRefusal as refused:
                    return self._refused(raw, head, refused.status, refused.code, refused.message, close=True)
            elif route != PREFLIGHT and not http.token_accepted(head.authorization, token):
                return self._refused(raw, head, 403, "unauthorized", "Invalid auth token", close=True)
        if head.body_size > max_body:
            return self._refused(raw, head, 413, "frame_too_large", f"request body of {head.body_size} bytes exceeds "
                                 f"max_frame ({max_body} bytes)", close=True)
        if route == MISSING:
            return self._refused(raw, head, 404, "not_found", f"Not found: {head.expert}")
        if route == CALL:
            path = self.path_of.get(head.expert or "", "")
            if method != "POST":
                return self._refused(raw, head, 405, "method_not_allowed", f"{method} is not allowed on {path}; "
                                     "POST a JSON object of named arguments", headers=(("Allow", "POST, OPTIONS"),))
            if head.expert not in experts:  # (a reload under way: the path's expert is not served yet)
                return self._refused(raw, head, 404, "unknown_expert", f"Not found: {path}")
            return None
        if route == INDEX and method not in ("GET", "HEAD"):
            return self._refused(raw, head, 405, "method_not_allowed", f"{method} is not allowed on /; use GET",
                                 headers=(("Allow", "GET, HEAD, OPTIONS"),))
        if head.body_size:
            return self._refused(raw, head, 400, "bad_request",
                                 f"{method} {'/' if route == INDEX else 'here'} takes no body")
        return None

    def _refused(self, raw: bytes, head: http.Head, status: int, code: str, message: str, *, close: bool = False,
                 headers: tuple[tuple[str, str], ...] = ()) -> FireflyRefusal:
        # (The Origin is looked for only here, in a refusal: an accepted call's head is never searched.)
        cors = self.cors if self.origins is None else self.cors_for(origin_in(raw[:head.head_size]))
        return FireflyRefusal(status, code, message, close=close, headers=cors + headers)


_CORS_REST = (("Access-Control-Allow-Methods", "GET,POST"),
              ("Access-Control-Allow-Headers", "Content-Type, Authorization"))
_VARY = ("Vary", "Origin")


def cors_headers(allow_origins: str) -> tuple[tuple[str, str], ...]:
    """The CORS headers of a Firefly response when they do not depend on the request: none without allowed
    origins; ``*`` or the one origin allowed, with Authorization allowed too (a browser may send the token
    only if the preflight's answer allows it).  With several origins, only Vary: Origin (Routes.cors_for adds
    the rest for a listed Origin): unlike Firefly, which sends the list, which browsers refuse."""
    if not allow_origins:
        return ()
    if len(allow_origins.replace(",", " ").split()) > 1:
        return (_VARY,)
    return (("Access-Control-Allow-Origin", allow_origins.strip()), *_CORS_REST)


def header(request: http.Request, name: bytes) -> bytes | None:
    """A header of a Firefly request (``name`` in lower case, as h11 gives them), or None."""
    for field, value in request.headers:
        if field == name:
            return value
    return None


_ORIGIN = re.compile(rb"\nOrigin:[ \t]*([^\r\n]*?)[ \t]*\r?\n", re.IGNORECASE)


def origin_in(raw: bytes) -> bytes | None:
    """The Origin header of a request's head (``raw``: its bytes, the head whole), or None."""
    found = _ORIGIN.search(raw)
    return None if found is None else found.group(1)


def call_arguments(request: http.Request, expert: Any) -> tuple[list, dict]:
    """The keyword arguments of a Firefly call (``([], kwargs)``), checked against the expert's signature as
    Firefly checks them; BadRequest (400, the body is not JSON) or FireflyInputError (415, 422) if unusable."""
    if (header(request, b"content-type") or b"")[:19].lower() == b"multipart/form-data":
        raise FireflyInputError(415, NO_FILES, expert=request.expert)
    if not request.body.strip():
        raise BadRequest(NO_BODY, expert=request.expert)
    value = http.json_body(request.body)
    if not isinstance(value, dict):
        raise FireflyInputError(422, f"the body must be a JSON object of named arguments, not {http.json_type(value)} "
                                "(Firefly functions take named arguments only)", expert=request.expert)
    signature = getattr(expert, "signature", None)
    if signature is not None and not expert.batched:  # (a batched function's signature takes the whole batch)
        try:
            signature.bind(**value)
        except TypeError as exc:
            raise FireflyInputError(422, str(exc), expert=request.expert) from None
    return [], value


def reply(request: http.Request, result: Any, cors: tuple[tuple[str, str], ...]) -> tuple[bytes, bool, str]:
    """The response to a Firefly call that returned ``result`` (a RemoteError: it failed): (response,
    keep-alive, outcome).  An error is ``{"error": MESSAGE}`` with Firefly's status, the function's own
    failure ``"ValueError: message"`` with 500; the daemon's (timeout, overload) keep their status."""
    if not isinstance(result, RemoteError):
        try:
            body = http.dumps(result)
        except BaseException as exc:  # a result's own tolist() may raise anything; deep nesting too
            result = BadResult(f"{request.expert} returned a value that cannot be sent as JSON: {_text(exc)}",
                               expert=request.expert)
        else:
            return (*http.respond(request, 200, body, headers=cors), "ok")
    status = result.status if isinstance(result, FireflyInputError) else http.error_status(result)
    headers = (*cors, ("Retry-After", "1")) if result.retryable else cors
    return (*http.respond(request, status, http.dumps({"error": result.message}), headers=headers), result.code)


def refusal_of(error: RemoteError | http.HttpRefusal, cors: tuple[tuple[str, str], ...] = ()) -> http.HttpRefusal:
    """The master's error for a Firefly request (a call in flight: a timeout, a lost worker, a quarantine;
    GET / refused by public_status = no), in Firefly's shape with the same status, with ``cors``; a refusal
    already in that shape as it is."""
    if isinstance(error, FireflyRefusal):
        return error
    if isinstance(error, AccessDenied):
        return FireflyRefusal(403, error.code, error.message, headers=cors)
    if isinstance(error, http.HttpRefusal):
        return FireflyRefusal(error.status, error.code, error.message, close=error.close,
                              headers=cors + error.headers)
    return FireflyRefusal(http.error_status(error), error.code, error.message,
                          headers=(*cors, ("Retry-After", "1")) if error.retryable else cors)


def metadata(expert: Any) -> dict[str, Any]:
    """What GET / says of a loaded expert (:class:`expertd.loader.LoadedExpert`), as Firefly says it of a
    function: its docstring, and its parameters' names, kinds and defaults."""
    parameters = []
    if expert.signature is not None:
        for name, parameter in expert.signature.parameters.items():
            described = {"name": name, "kind": str(parameter.kind)}
            if parameter.default is not inspect.Parameter.empty:
                described["default"] = _sendable(parameter.default)
            parameters.append(described)
    return {"doc": getattr(expert.function, "__doc__", None) or "", "parameters": parameters}


def _sendable(value: Any) -> Any:
    """A default as JSON and msgpack carry it, else its repr (Firefly's own GET / fails on such a default)."""
    try:
        json.dumps(value, allow_nan=False)
        msgpack.packb(value)
    except (TypeError, ValueError, OverflowError, RecursionError):
        return repr(value)
    return value


def index(described: dict[str, dict], routes: Routes) -> dict[str, Any]:
    """GET /: Firefly's metadata of the served experts (``described``: the generation's descriptions, each
    with the ``firefly`` entry of :func:`metadata`).  ``version`` is expertd's: Firefly's client does not read it."""
    functions = {}
    for name, description in described.items():
        meta = description.get("firefly") or {}
        functions[name] = {"path": routes.path_of.get(name, "/" + name), "doc": meta.get("doc", ""),
                           "parameters": meta.get("parameters", [])}
    return {"app": "firefly", "version": __version__, "functions": functions}


def _text(exc: BaseException) -> str:
    try:
        return str(exc)
    except Exception:  # (an exception whose __str__ raises)
        return type(exc).__name__
