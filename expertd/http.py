"""The HTTP/JSON front: the same experts, on the same workers, for curl and other languages.

HTTP/1.1 with JSON bodies is served on the daemon's Unix socket, told apart
from the msgpack protocol by a connection's first bytes, and optionally on a
TCP address (``http_listen``, guarded by a bearer ``token``).  The API, with
its OpenAPI document, is in docs/http.md and docs/openapi.yaml:

    POST /call/NAME       body: JSON array (positional) or object (keyword arguments)
    POST /opinion/NAME    body: a document; reply: it, with opinions.NAME added
    POST /opinion/a,b+c   several experts (or a pipeline's name): the pipeline with those stages
    POST /pipeline/NAME   body: a document; reply: it, with opinions.NAME and errors.NAME of the pipeline's experts
    POST /map/NAME        body: JSON array of items; reply: [{"result": ...} or {"error": {...}}, ...], one per item
    GET  /experts         the served experts
    GET  /health          200 while workers serve, else 503
    GET  /metrics         Prometheus text format (see :mod:`expertd.metrics`)

The split of the work follows the msgpack path.  The master only frames a
request (:func:`scan_head`: where the head ends, how long the body is), so it
knows when a whole request waits and what to refuse before any worker is
involved (bad token, unknown expert or path, body over ``max_frame``); it
answers the cheap GETs itself.  Calls go to a worker, which parses the exact
bytes with h11 (:func:`parse_request`) and replies.  h11 is the parser because
hand-written HTTP parsing is where servers get request smuggling and
keep-alive wrong; the master's framing and h11 must agree on every byte or the
request is refused, so a disagreement can only close a connection.
"""

from __future__ import annotations

import hmac
import re
from collections.abc import Callable
from typing import Any, NamedTuple
from urllib.parse import unquote

import h11

from expertd import accesslog, http_arrays, jsonio
from expertd.errors import BadRequest, BadResult, FrameTooLarge, RemoteError, UnknownExpert
from expertd.http_hints import route_hint, with_hint  # noqa: F401  (re-exported: the HTTP front's words)
from expertd.pipelines import ON_ERROR
from expertd.protocol import MAX_CONTAINERS, MAX_MAP_ITEMS

MAX_HEAD = 16 * 1024  # request line and headers (nginx's default buffers hold 8-32 KiB)
JSON_TYPE = "application/json"
METRICS_TYPE = "text/plain; version=0.0.4; charset=utf-8"
SERVER = "expertd"

MASTER_ROUTES = {"/health": "health", "/experts": "experts", "/metrics": "metrics"}  # (the master answers them)
_NATIVE_PREFIXES = {"call", "opinion", "map", "pipeline"}  # POST /PREFIX/NAME
WORKER_ROUTES = {*_NATIVE_PREFIXES, "firefly"}  # ("firefly": a Firefly function's path, see expertd.firefly)
ON_ERROR_HEADER = b"x-expertd-on-error"  # a pipeline's on_error for this request: stop or continue
REQUEST_ID_HEADER = b"x-request-id"  # the caller's id for the request (logs), returned in the response

_HEAD_END = re.compile(rb"\r?\n\r?\n")
_METHODS = (b"GET ", b"POST", b"PUT ", b"HEAD", b"DELE", b"OPTI", b"PATC", b"CONN", b"TRAC", b"PRI ")


class HttpRefusal(Exception):
    """A request refused before any expert is involved: status, code and message for the JSON error."""

    def __init__(self, status: int, code: str, message: str, *, close: bool = False,
                 headers: tuple[tuple[str, str], ...] = ()) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.close = close  # the stream cannot be trusted past this request
        self.headers = headers

    def body(self) -> bytes:  # (expertd.firefly's refusals have Firefly's shape)
        return error_body(self.code, self.message)


class Head(NamedTuple):
    """What the master needs of a request: framing, route and credentials."""

    method: str
    route: str  # "call", "opinion", "map", "pipeline", "health", "experts", "metrics", a Firefly one, "" (none)

    expert: str | None  # the expert, or for a pipeline the target (a pipeline's name, or stages 'a,b+c')
    head_size: int
    body_size: int
    expects_continue: bool
    authorization: bytes | None
    host: bytes | None
    request_id: str | None = None  # the caller's X-Request-Id, when valid (see accesslog.request_id_of)

    @property
    def size(self) -> int:
        return self.head_size + self.body_size


def looks_like_http(prefix: bytes) -> bool:
    """Whether a connection opened with an HTTP request line."""
    return prefix[:4] in _METHODS


def could_be_http(prefix: bytes) -> bool:
    """Whether fewer than four first bytes may still grow into an HTTP request line."""
    return any(method.startswith(prefix) for method in _METHODS)


def scan_head(data: bytes, firefly: Any = None) -> Head | None:
    """Frame a request from its first bytes; None while its head is still arriving.

    Raises HttpRefusal for what cannot be framed: a malformed head, a chunked
    body, a head over MAX_HEAD.  (The body's size is :func:`check_route`'s.)  ``firefly``
    (:class:`expertd.firefly.Routes`, with firefly_routes) routes the paths that are not expertd's own.
    """
    if not (looks_like_http(data) or (len(data) < 4 and could_be_http(data))):
        raise HttpRefusal(400, "bad_request", "not an HTTP request (this address speaks HTTP only)", close=True)
    end = _HEAD_END.search(data, 0, MAX_HEAD + 4)
    if end is None:
        if len(data) >= MAX_HEAD:
            raise HttpRefusal(431, "headers_too_large", f"the request head exceeds {MAX_HEAD} bytes", close=True)
        return None
    lines = data[: end.start()].split(b"\n")
    request_line = lines[0].rstrip(b"\r").split(b" ")
    if len(request_line) != 3 or not request_line[2].startswith(b"HTTP/1."):
        raise HttpRefusal(400, "bad_request", "malformed request line; expected 'METHOD /path HTTP/1.1'", close=True)
    method, target = request_line[0].decode("ascii", "replace"), request_line[1].decode("ascii", "replace")
    body_size, expects_continue, authorization, host, request_id = None, False, None, None, None
    for line in lines[1:]:
        if line[:1] in (b" ", b"\t"):  # obsolete line folding: h11 would read this header differently
            raise HttpRefusal(400, "bad_request", "folded header lines are not accepted", close=True)
        name, colon, value = line.rstrip(b"\r").partition(b":")
        if not colon:
            raise HttpRefusal(400, "bad_request", "malformed header line (no colon)", close=True)
        name, value = name.strip().lower(), value.strip()
        if name == b"content-length":
            if not value.isdigit() or (body_size is not None and int(value) != body_size):
                raise HttpRefusal(400, "bad_request", "bad or conflicting Content-Length", close=True)
            body_size = int(value)
        elif name == b"transfer-encoding":
            raise HttpRefusal(411, "length_required",
                              "chunked request bodies are not accepted; send the body with Content-Length", close=True)
        elif name == b"expect" and value.lower() == b"100-continue":
            expects_continue = request_line[2] == b"HTTP/1.1"  # never for HTTP/1.0 (RFC 9110)
        elif name == b"authorization":
            authorization = value
        elif name == b"host":
            host = value
        elif name == REQUEST_ID_HEADER:
            request_id = accesslog.request_id_of(value)
    body_size = body_size or 0
    route, expert = _route(target)
    if firefly is not None:
        route, expert = firefly.route(method, target, route, expert)
    return Head(method, route, expert, end.end(), body_size, expects_continue, authorization, host, request_id)


def _route(target: str) -> tuple[str, str | None]:
    path = unquote(target.partition("?")[0])
    if len(path) > 1 and path.endswith("/"):
        path = path[:-1]  # (/call/fib/ is /call/fib: a trailing slash is tolerated)
    if path in MASTER_ROUTES:
        return MASTER_ROUTES[path], None
    parts = path.split("/")
    if len(parts) == 3 and parts[0] == "" and parts[1] in _NATIVE_PREFIXES and parts[2]:
        return parts[1], parts[2]
    return "", None


def is_pipeline(route: str, name: str | None, experts: set[str] | dict) -> bool:
    """Whether a request to ``route`` for ``name`` runs a pipeline: ``POST /pipeline/...``, or ``POST /opinion/...``
    naming anything but one expert (several, or a pipeline)."""
    return route == "pipeline" or (route == "opinion" and name is not None and name not in experts)


def check_route(head: Head, experts: set[str] | dict, max_body: int,
                plan: Callable[[str], object] | None = None) -> None:
    """Refuse (400, 404, 405, 413) what no worker could serve, before one is asked.

    ``plan`` (:meth:`expertd.config.Config.plan`) checks a pipeline's target: an
    unknown name is a 404, a malformed target a 400.  Without it, a target
    that is not an expert's name is refused as unknown.
    """
    if head.body_size > max_body:
        raise HttpRefusal(413, FrameTooLarge.code,
                          f"request body of {head.body_size} bytes exceeds max_frame ({max_body} bytes)", close=True)
    if not head.route:
        raise HttpRefusal(404, "not_found",
                          "no such path; see GET /experts, POST /call/NAME, POST /opinion/NAME, POST /map/NAME, "
                          "POST /pipeline/NAME")
    wanted = "POST" if head.route in WORKER_ROUTES else "GET"
    if head.method != wanted and not (wanted == "GET" and head.method == "HEAD"):
        allow = "POST" if wanted == "POST" else "GET, HEAD"
        raise HttpRefusal(405, "method_not_allowed", f"{head.method} is not allowed here; use {allow}",
                          headers=(("Allow", allow),))
    if head.expert is not None and head.expert not in experts:
        if plan is not None and is_pipeline(head.route, head.expert, experts):
            try:
                plan(head.expert)
            except UnknownExpert as exc:
                raise HttpRefusal(404, exc.code, exc.message) from None
            except BadRequest as exc:
                raise HttpRefusal(400, exc.code, exc.message) from None
            return
        known = ", ".join(sorted(experts)) or "none"
        raise HttpRefusal(404, "unknown_expert", f"no expert named {head.expert!r}; known experts: {known}")


PUBLIC_HEALTH_ROUTES = frozenset({"health", "metrics"})  # (public_health = yes: open on http_listen)


def admit(head: Head, *, tcp: bool, token: str, public_health: bool = False) -> None:
    """Refuse a request that may not be served on its connection: the one check of credentials and origin.

    The master runs it on every request it examines and a lingering worker on
    every request it serves directly, so that no path can skip it.  A request on
    the Unix socket is admitted here (its file mode and allow_uids guard it); on
    http_listen it needs the bearer token, or without one a local Host, except
    GET /health and /metrics with ``public_health`` (load balancers, Prometheus).
    """
    if not tcp or (public_health and head.route in PUBLIC_HEALTH_ROUTES and head.method in ("GET", "HEAD")):
        return
    if token:
        if not token_accepted(head.authorization, token):
            raise HttpRefusal(401, "unauthorized", "send the token: Authorization: Bearer TOKEN",
                              close=True, headers=(("WWW-Authenticate", 'Bearer realm="expertd"'),))
    else:
        check_local_origin(head)


_LOCAL_HOST = re.compile(rb"^(localhost|127(\.\d{1,3}){3}|\[::1\])(:\d+)?$", re.IGNORECASE)


def check_local_origin(head: Head) -> None:
    """On a tokenless loopback listener, refuse requests for other host names.

    A web page can make a browser send requests to 127.0.0.1; with DNS
    rebinding it can even read the replies, but its requests then carry the
    page's own host name, which is refused here.
    """
    if head.host is not None and not _LOCAL_HOST.match(head.host):
        raise HttpRefusal(403, "forbidden_host", f"Host {head.host.decode('ascii', 'replace')!r} is not this "
                          "machine; without a token, http_listen serves only localhost and loopback addresses",
                          close=True)


def token_accepted(authorization: bytes | None, token: str) -> bool:
    """Whether an Authorization header carries ``Bearer <token>`` or Firefly's ``Token <token>`` (constant time)."""
    if authorization is None:
        return False
    scheme, _, credentials = authorization.partition(b" ")
    return scheme.lower() in (b"bearer", b"token") and hmac.compare_digest(credentials.strip(), token.encode())


class Request(NamedTuple):
    """A request parsed by h11, with the connection state that decides keep-alive."""

    method: str
    route: str
    expert: str | None
    body: bytes
    keep_alive: bool  # the client's wish: HTTP/1.1 without Connection: close (as h11 decides it)
    on_error: str | None = None  # the X-Expertd-On-Error header (pipelines)
    request_id: str | None = None  # X-Request-Id if valid (accesslog.request_id_of), else one the daemon made
    headers: Any = ()  # h11's (lower-case name, value) pairs, with Firefly routes only (file uploads, CORS)
    binary: bool = False  # Content-Type: application/octet-stream (a model's rows as bytes: expertd.http_arrays)


def parse_request(raw: bytes | bytearray | memoryview, made_id: str | None = None, firefly: Any = None) -> Request:
    """Parse exactly one request (framed by :func:`scan_head`, the same ``firefly``); HttpRefusal if h11 disagrees.

    Its ``request_id`` is its X-Request-Id if valid, else ``made_id`` (the daemon's own).
    """
    connection = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD)
    connection.receive_data(bytes(raw))
    try:
        event = connection.next_event()
        if not isinstance(event, h11.Request):
            raise HttpRefusal(400, "bad_request", "incomplete or malformed request", close=True)
        body = bytearray()
        while True:
            part = connection.next_event()
            if isinstance(part, h11.Data):
                body += part.data
            elif isinstance(part, h11.EndOfMessage):
                break
            else:  # NEED_DATA: the framing and the parser disagree
                raise HttpRefusal(400, "bad_request", "the request body does not match its Content-Length",
                                  close=True)
        if connection.trailing_data[0]:  # h11 framed fewer bytes than the master did: refuse, never guess
            raise HttpRefusal(400, "bad_request", "the request does not match its framing", close=True)
    except h11.RemoteProtocolError as exc:
        raise HttpRefusal(400, "bad_request", f"malformed HTTP request: {exc}", close=True) from None
    target, method = event.target.decode("ascii", "replace"), event.method.decode("ascii", "replace")
    route, expert = _route(target)
    on_error = request_id = None
    keep_alive, binary = event.http_version >= b"1.1", False
    for name, value in event.headers:
        if name == b"connection" and b"close" in (token.strip() for token in value.lower().split(b",")):
            keep_alive = False
        elif name == ON_ERROR_HEADER:
            on_error = value.decode("latin-1")
        elif name == REQUEST_ID_HEADER:
            request_id = accesslog.request_id_of(value)
        elif name == b"content-type":
            binary = route == "call" and http_arrays.is_binary(value)
    if firefly is None:
        return Request(method, route, expert, bytes(body), keep_alive, on_error, request_id or made_id, (), binary)
    route, expert = firefly.route(method, target, route, expert)
    return Request(method, route, expert, bytes(body), keep_alive, on_error, request_id or made_id, event.headers,
                   binary and route == "call")


def call_arguments(request: Request) -> tuple[list, dict]:
    """The expert's arguments from a request's JSON body (BadRequest when it is not usable)."""
    if request.route == "map":  # (many calls: see map_items)
        raise BadRequest("POST /map/NAME is many calls; it cannot be answered as one", expert=request.expert)
    value = json_body(request.body)
    if request.route == "opinion":
        if not isinstance(value, dict):
            raise BadRequest(f"the document must be a JSON object, not {json_type(value)}", expert=request.expert)
        # The reply adds to the document's opinions: a document where that cannot be done is refused
        # before the expert runs (the caller's error, not the expert's result).
        if "opinions" in value and not isinstance(value["opinions"], dict):
            raise BadRequest(f"the document's 'opinions' is {json_type(value['opinions'])}, not an object",
                             expert=request.expert)
        return [value], {}
    if isinstance(value, list):
        return value, {}
    if isinstance(value, dict):
        return [], value
    raise BadRequest(f"the body must be a JSON array (positional arguments) or object (keyword arguments), "
                     f"not {json_type(value)}", expert=request.expert)


def pipeline_request(request: Request) -> tuple[dict, dict]:
    """The document and options of a pipeline request (BadRequest when they are not usable)."""
    document = json_body(request.body)
    if not isinstance(document, dict):
        raise BadRequest(f"the document must be a JSON object, not {json_type(document)}", expert=request.expert)
    for key in ("opinions", "errors"):  # (the pipeline adds to them: the caller's error, found before any expert runs)
        if key in document and not isinstance(document[key], dict):
            raise BadRequest(f"the document's {key!r} is {json_type(document[key])}, not an object",
                             expert=request.expert)
    if request.on_error is None:
        return document, {}
    if request.on_error not in ON_ERROR:
        raise BadRequest(f"X-Expertd-On-Error must be stop or continue, not {request.on_error!r}",
                         expert=request.expert)
    return document, {"on_error": request.on_error}


def map_items(request: Request) -> list:
    """The items of a ``POST /map/NAME`` request: its body, a JSON array (BadRequest when it is not usable)."""
    value = json_body(request.body)
    if not isinstance(value, list):
        raise BadRequest(f"the body of POST /map/NAME must be a JSON array of items (one call's argument each), "
                         f"not {json_type(value)}", expert=request.expert)
    if len(value) > MAX_MAP_ITEMS:
        raise BadRequest(f"{len(value)} items in one map; the limit is {MAX_MAP_ITEMS}: send them in several "
                         "requests", expert=request.expert)
    return value


def json_body(body: bytes) -> Any:
    if not body.strip():
        raise BadRequest("the request has no body; send JSON (curl -d '[5]' or -d '{\"n\": 5}')")
    # An empty array is two bytes of JSON and ~60 of Python: bound the containers as msgpack bodies are.
    if len(body) > 2 * MAX_CONTAINERS and body.count(b"[") + body.count(b"{") > MAX_CONTAINERS:
        raise BadRequest(f"the body holds more than {MAX_CONTAINERS} arrays and objects")
    try:
        return jsonio.loads(body)
    except (ValueError, RecursionError) as exc:
        message = exc.args[0] if isinstance(exc, ValueError) and exc.args else "nested too deeply"
        raise BadRequest(f"the body is not valid JSON: {message}") from None


def json_type(value: Any) -> str:
    return {str: "a string", int: "a number", float: "a number", bool: "a boolean", type(None): "null",
            list: "an array", dict: "an object"}.get(type(value), type(value).__name__)


def result_body(request: Request, result: Any) -> bytes:
    """The JSON reply to a call: the result, or for an opinion the document with it added; for a map, the outcomes."""
    if request.route == "map":
        return map_body(request.expert, result)
    if request.route == "pipeline":  # (the document as the pipeline returned it: opinions and errors added)
        return dumps(result)
    if request.route == "opinion":
        # The document as sent, not the expert's argument: an expert may return its argument or
        # change it, and a client of `expertctl opinion` would not see either.
        document = jsonio.loads(request.body)
        opinions = document.setdefault("opinions", {})
        if not isinstance(opinions, dict):
            raise BadRequest(f"the document's 'opinions' is {json_type(opinions)}, not an object",
                             expert=request.expert)
        opinions[request.expert] = result
        result = document
    return dumps(result)


def map_body(expert: str | None, outcomes: list) -> bytes:
    """The reply to a map: ``{"result": ...}`` or ``{"error": {...}}`` per item, in order.

    An item whose result JSON cannot carry fails alone, with ``bad_result``.
    """
    entries = [{"error": error_object(outcome)} if isinstance(outcome, RemoteError) else {"result": outcome}
               for outcome in outcomes]
    try:
        return dumps(entries)
    except (TypeError, ValueError, RecursionError):
        pass
    for entry in entries:  # (only when some result cannot be sent: find which)
        if "result" in entry:
            try:
                dumps(entry["result"])
            except (TypeError, ValueError, RecursionError) as exc:
                message = exc.args[0] if isinstance(exc, (TypeError, ValueError)) and exc.args else "nested too deeply"
                entry.clear()
                entry["error"] = error_object(BadResult(
                    f"{expert} returned a value that cannot be sent as JSON: {message}", expert=expert))
    return dumps(entries)


def dumps(value: Any) -> bytes:
    """Encode a reply; what JSON cannot carry (bytes, NaN) is a ValueError or TypeError naming it."""
    return jsonio.dumps(value, _to_json) + b"\n"  # a newline, for curl in a terminal


def _to_json(value: Any) -> Any:
    tolist = getattr(value, "tolist", None)  # numpy scalars and arrays
    if callable(tolist):
        return tolist()
    if isinstance(value, (set, frozenset, tuple)):
        return list(value)
    if isinstance(value, (bytes, bytearray)):
        raise TypeError("bytes cannot be sent as JSON; return text, or call this expert over msgpack")
    raise TypeError(f"values of type {type(value).__module__}.{type(value).__qualname__} cannot be sent as JSON")


def respond(request: Request | None, status: int, body: bytes, content_type: str = JSON_TYPE,
            headers: tuple[tuple[str, str], ...] = (), close: bool = False,
            request_id: str | None = None) -> tuple[bytes, bool]:
    """A whole response; returns it and whether the connection stays open (keep-alive).

    The connection stays open unless the client asked otherwise (HTTP/1.0,
    Connection: close), ``close`` says so, or the request could not be parsed.
    The head is written here rather than by h11 (which parses requests): its
    fields are the daemon's own, and h11's writer cost a third of an HTTP call.
    """
    fields = [("Content-Type", content_type), ("Content-Length", str(len(body))), ("Server", SERVER), *headers]
    request_id = request.request_id if request is not None and request.request_id else request_id
    if request_id:
        fields.append(("X-Request-Id", request_id))
    keep_alive = request is not None and request.keep_alive and not close
    if not keep_alive:
        fields.append(("Connection", "close"))
    head = f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}\r\n" + "".join(f"{k}: {v}\r\n" for k, v in fields)
    return (head + "\r\n").encode("latin-1") + (b"" if request and request.method == "HEAD" else body), keep_alive


def error_status(error: RemoteError) -> int:
    return _STATUS_BY_CODE.get(error.code, 500)


def error_body(code: str, message: str, **extra: Any) -> bytes:
    """The JSON error object every failure is reported with."""
    return dumps({"error": {"code": code, "message": message, **{k: v for k, v in extra.items() if v is not None}}})


def error_object(error: RemoteError) -> dict[str, Any]:
    """What ``{"error": ...}`` holds for a daemon or expert error: code, message, and expert and type when known."""
    found = {"code": error.code, "message": error.message}
    if error.expert is not None:
        found["expert"] = error.expert
    if error.code == "expert_failed" and error.remote_type is not None:
        found["type"] = error.remote_type
    return found


def error_response(request: Request | None, error: RemoteError | HttpRefusal,
                   close: bool = False, request_id: str | None = None) -> tuple[bytes, bool]:
    """The response for a refusal or a daemon error (``request_id``: the X-Request-Id when there is no request)."""
    if isinstance(error, HttpRefusal):
        return respond(request, error.status, error.body(), headers=error.headers,
                       close=close or error.close, request_id=request_id)
    headers = (("Retry-After", "1"),) if error.retryable else ()
    body = dumps({"error": error_object(error)})
    return respond(request, error_status(error), body, headers=headers, close=close, request_id=request_id)


_STATUS_BY_CODE = {
    "bad_request": 400, "unknown_expert": 404, "frame_too_large": 413, "expert_failed": 500, "bad_result": 500,
    "timeout": 504, "worker_lost": 503, "overloaded": 503, "shutting_down": 503, "access_denied": 403,
    "quarantined": 503,
}
_REASONS = {
    100: "Continue", 200: "OK", 400: "Bad Request", 401: "Unauthorized", 403: "Forbidden", 404: "Not Found",
    405: "Method Not Allowed", 411: "Length Required", 413: "Content Too Large", 415: "Unsupported Media Type",
    422: "Unprocessable Content", 431: "Request Header Fields Too Large", 500: "Internal Server Error",
    503: "Service Unavailable", 504: "Gateway Timeout",
}
CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
