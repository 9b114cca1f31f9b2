"""Firefly's protocol as pure decisions (expertd.firefly): routes, refusals, tokens, arguments, replies, metadata."""

from __future__ import annotations

import inspect
import json
from types import SimpleNamespace

import h11
import pytest

from expertd import __version__, firefly, http
from expertd.config import ExpertSpec, check_route_paths
from expertd.errors import BadRequest, ConfigError, ExpertFailed, Overloaded
from expertd.settings_types import ORIGINS, URL_PATH

ROUTES = firefly.Routes({"/square": "square", "/sum": "total", "/health": "probe"}, "https://app.example")
TOKEN = "s3cret-token-for-the-firefly-tests"
EXPERTS = {"square", "total", "probe"}


def head(method: str, target: str, *headers: str, body: bytes = b"", routes=ROUTES) -> http.Head:
    lines = [f"{method} {target} HTTP/1.1", "Host: 127.0.0.1:8000", *headers]
    if body:
        lines.append(f"Content-Length: {len(body)}")
    return http.scan_head(("\r\n".join(lines) + "\r\n\r\n").encode() + body, routes)


@pytest.mark.parametrize(("method", "target", "route", "expert"), [
    ("POST", "/square", firefly.CALL, "square"),
    ("POST", "/sum?x=1", firefly.CALL, "total"),  # (the query is not the path)
    ("POST", "/s%75m", firefly.CALL, "total"),  # (percent-decoded, as Firefly's path_info)
    ("POST", "/squ%61re", firefly.CALL, "square"),  # (decoded as expertd's own routes are...)
    ("POST", "/c%61ll/square", "call", "square"),  # (... so an encoded native path stays expertd's)
    ("POST", "/he%61lth", firefly.CALL, "probe"),
    ("POST", "/squ%2561re", firefly.MISSING, "/squ%61re"),  # (decoded once, never twice)
    ("GET", "/square", firefly.CALL, "square"),  # (refused later: 405)
    ("OPTIONS", "/square", firefly.PREFLIGHT, "square"),
    ("OPTIONS", "/", firefly.PREFLIGHT, None),
    ("GET", "/", firefly.INDEX, None),
    ("HEAD", "/", firefly.INDEX, None),
    ("POST", "/", firefly.INDEX, None),  # (refused later: 405)
    ("POST", "/square/", firefly.MISSING, "/square/"),  # (Firefly's paths are exact)
    ("POST", "/nowhere", firefly.MISSING, "/nowhere"),
    ("POST", "/health", firefly.CALL, "probe"),  # a function's path equal to a native GET route: POST calls
    ("GET", "/health", "health", None),  # ... and GET is still the health check
    ("POST", "/metrics", "metrics", None),  # (not a Firefly path: expertd's route, which refuses POST)
    ("POST", "/call/square", "call", "square"),  # expertd's own routes are untouched
    ("OPTIONS", "/call/square", "call", "square"),
    ("GET", "/experts", "experts", None),
])
def test_a_request_takes_the_firefly_route_only_where_expertd_has_none(method, target, route, expert):
    assert head(method, target)[1:3] == (route, expert)


def test_without_firefly_routes_the_same_paths_are_expertds_404():
    assert head("POST", "/square", routes=None).route == ""
    assert head("GET", "/", routes=None).route == ""


@pytest.mark.parametrize(("authorization", "accepted"), [
    (f"Token {TOKEN}", True),
    (f"token   {TOKEN}  ", True),
    (f"Bearer {TOKEN}", True),
    (f"BEARER {TOKEN}", True),
    (f"Token {TOKEN}x", False),
    (f"Basic {TOKEN}", False),
    (TOKEN, False),
    ("Token", False),
    (None, False),
])
def test_the_token_comes_as_firefly_or_bearer(authorization, accepted):
    assert http.token_accepted(None if authorization is None else authorization.encode(), TOKEN) is accepted


@pytest.mark.parametrize(("request_head", "tcp", "token", "refused"), [
    (("POST", "/square", f"Authorization: Token {TOKEN}"), True, TOKEN, None),
    (("POST", "/square", f"Authorization: Bearer {TOKEN}"), True, TOKEN, None),
    (("POST", "/square"), True, TOKEN, (403, "Invalid auth token")),
    (("GET", "/"), True, TOKEN, (403, "Invalid auth token")),
    (("POST", "/nowhere"), True, TOKEN, (403, "Invalid auth token")),  # (the token first, as Firefly)
    (("POST", "/square", "Authorization: Token wrong"), True, TOKEN, (403, "Invalid auth token")),
    (("OPTIONS", "/square"), True, TOKEN, None),  # a browser's preflight carries no token
    (("POST", "/square"), False, TOKEN, None),  # the Unix socket: its file mode guards it
    (("POST", "/square"), True, "", None),  # a tokenless loopback listener, a local Host
    (("POST", "/nowhere"), False, "", (404, "Not found: /nowhere")),
    (("GET", "/square"), False, "", (405, "GET is not allowed on /square; POST a JSON object of named arguments")),
    (("PUT", "/sum"), False, "", (405, "PUT is not allowed on /sum; POST a JSON object of named arguments")),
    (("POST", "/"), False, "", (405, "POST is not allowed on /; use GET")),
    (("GET", "/"), False, "", None),
])
def test_firefly_requests_are_refused_by_their_head_in_firefly_shape(request_head, tcp, token, refused):
    refusal = ROUTES.refusal(head(*request_head), tcp=tcp, token=token, experts=EXPERTS, max_body=1000)
    if refused is None:
        assert refusal is None
    else:
        assert refusal is not None and (refusal.status, json.loads(refusal.body())) == (refused[0],
                                                                                         {"error": refused[1]})
        assert ("Access-Control-Allow-Origin", "https://app.example") in refusal.headers


def test_a_foreign_host_without_a_token_and_big_or_misplaced_bodies_are_refused():
    refusal = ROUTES.refusal(head("POST", "/square")._replace(host=b"evil.example"), tcp=True, token="",
                             experts=EXPERTS, max_body=1000)
    assert refusal.status == 403 and "evil.example" in json.loads(refusal.body())["error"]
    refusal = ROUTES.refusal(head("POST", "/square", body=b"x" * 20), tcp=False, token="", experts=EXPERTS,
                             max_body=10)
    assert refusal.status == 413 and refusal.close and "max_frame" in json.loads(refusal.body())["error"]
    refusal = ROUTES.refusal(head("OPTIONS", "/square", body=b"x"), tcp=False, token="", experts=EXPERTS,
                             max_body=10)
    assert refusal.status == 400
    refusal = ROUTES.refusal(head("POST", "/square"), tcp=False, token="", experts={"total"}, max_body=10)
    assert (refusal.status, json.loads(refusal.body())) == (404, {"error": "Not found: /square"})


ALLOWED = (("Access-Control-Allow-Methods", "GET,POST"),
           ("Access-Control-Allow-Headers", "Content-Type, Authorization"))
TWO = "https://a.example, https://b.example"


@pytest.mark.parametrize(("origins", "origin", "headers"), [
    ("", None, ()),
    ("", b"https://a.example", ()),
    ("*", None, (("Access-Control-Allow-Origin", "*"), *ALLOWED)),
    ("*", b"https://x.example", (("Access-Control-Allow-Origin", "*"), *ALLOWED)),
    ("https://a.example", b"https://x.example", (("Access-Control-Allow-Origin", "https://a.example"), *ALLOWED)),
    # Several: never the list (browsers refuse it), the request's Origin when listed, exactly.
    (TWO, b"https://b.example", (("Access-Control-Allow-Origin", "https://b.example"), *ALLOWED, ("Vary", "Origin"))),
    (TWO, b"https://a.example", (("Access-Control-Allow-Origin", "https://a.example"), *ALLOWED, ("Vary", "Origin"))),
    (TWO, b"https://c.example", (("Vary", "Origin"),)),
    (TWO, b"https://a.example.evil", (("Vary", "Origin"),)),
    (TWO, b"HTTPS://A.EXAMPLE", (("Vary", "Origin"),)),
    (TWO, b"null", (("Vary", "Origin"),)),
    (TWO, None, (("Vary", "Origin"),)),
])
def test_cors_headers_name_one_allowed_origin_or_star(origins, origin, headers):
    routes = firefly.Routes({"/square": "square"}, origins)
    assert routes.cors_for(origin) == headers
    raw = b"POST /square HTTP/1.1\r\nHost: x\r\n" + (b"" if origin is None else b"Origin: " + origin + b"\r\n")
    request = http.parse_request(raw + b"Content-Length: 2\r\n\r\n{}", "id-1", routes)
    assert routes.cors_of(request) == headers  # (a worker's reply and the master's answers)
    refused = routes.refusal(http.scan_head(raw + b"\r\n", routes), tcp=True, token=TOKEN, experts=EXPERTS,
                             max_body=10, raw=raw + b"\r\n")
    assert refused.status == 403 and refused.headers == headers  # (the master's refusals by the head)


def test_an_origin_is_read_from_the_head_only():
    assert firefly.origin_in(b"POST / HTTP/1.1\r\nHost: x\r\norigin:  https://a.example \r\n\r\n") == \
        b"https://a.example"
    assert firefly.origin_in(b"POST / HTTP/1.1\r\nX-Origin: https://a.example\r\n\r\n") is None
    head = b"POST / HTTP/1.1\r\nContent-Length: 30\r\n\r\n"
    routes = firefly.Routes({"/square": "square"}, TWO)
    raw = head.replace(b"POST /", b"POST /nowhere") + b"x\nOrigin: https://a.example\r\n"  # (in the body)
    refused = routes.refusal(http.scan_head(raw, routes), tcp=False, token="", experts=EXPERTS, max_body=100,
                             raw=raw)
    assert refused.status == 404 and refused.headers == (("Vary", "Origin"),)


# ------------------------------------------------------------------------------------------ calls
def square(n):
    return n * n


def greet(name, greeting="Hello"):
    return f"{greeting}, {name}"


def loaded(function, batched=False):
    return SimpleNamespace(function=function, signature=inspect.signature(function), batched=batched)


def parsed(body: bytes, content_type: str = "application/json", target: str = "/square") -> http.Request:
    raw = (f"POST {target} HTTP/1.1\r\nHost: x\r\nContent-Type: {content_type}\r\n"
           f"Content-Length: {len(body)}\r\n\r\n").encode() + body
    return http.parse_request(raw, "id-1", ROUTES)


@pytest.mark.parametrize(("body", "function", "kwargs"), [
    (b'{"n": 3}', square, {"n": 3}),
    (b'{"name": "Ada"}', greet, {"name": "Ada"}),
    (b'{"name": "Ada", "greeting": "Hi"}', greet, {"name": "Ada", "greeting": "Hi"}),
    (b'{"items": 3}', None, {"items": 3}),  # (unknown here: the call says what is wrong)
])
def test_a_call_takes_the_json_object_as_named_arguments(body, function, kwargs):
    expert = None if function is None else loaded(function)
    assert firefly.call_arguments(parsed(body), expert) == ([], kwargs)


@pytest.mark.parametrize(("body", "content_type", "function", "status", "message"), [
    (b'{"m": 3}', "application/json", square, 422, "missing a required argument: 'n'"),
    (b'{"n": 3, "m": 1}', "application/json", square, 422, "got an unexpected keyword argument 'm'"),
    (b'{}', "application/json", greet, 422, "missing a required argument: 'name'"),
    (b"[3]", "application/json", square, 422, "the body must be a JSON object of named arguments, not an array "
                                              "(Firefly functions take named arguments only)"),
    (b"3", "application/json", square, 422, "the body must be a JSON object of named arguments, not a number "
                                            "(Firefly functions take named arguments only)"),
    (b"{nope", "application/json", square, 400, "the body is not valid JSON: Expecting property name enclosed in "
                                                "double quotes: line 1 column 2 (char 1)"),
    (b"", "application/json", square, 400, firefly.NO_BODY),
    (b"--b--", "multipart/form-data; boundary=b", square, 415, firefly.NO_FILES),
    (b"--b--", "Multipart/Form-Data; boundary=b", square, 415, firefly.NO_FILES),
])
def test_a_call_whose_input_does_not_fit_is_refused_with_firefly_status(body, content_type, function, status,
                                                                         message):
    with pytest.raises(BadRequest) as raised:
        firefly.call_arguments(parsed(body, content_type), loaded(function))
    error = raised.value
    assert (getattr(error, "status", 400), error.message) == (status, message)


def test_a_batched_experts_arguments_are_not_bound_to_its_batch_signature():
    assert firefly.call_arguments(parsed(b'{"item": 2}'), loaded(square, batched=True)) == ([], {"item": 2})


def _status_and_body(response: bytes) -> tuple[int, dict, bytes]:
    client = h11.Connection(h11.CLIENT)
    client.send(h11.Request(method="POST", target="/", headers=[("Host", "x"), ("Content-Length", "0")]))
    client.send(h11.EndOfMessage())
    client.receive_data(response)
    head, data = client.next_event(), client.next_event()
    return head.status_code, dict(head.headers), json.loads(data.data)


@pytest.mark.parametrize(("result", "status", "body", "outcome"), [
    (49, 200, 49, "ok"),
    ({"a": [1, 2]}, 200, {"a": [1, 2]}, "ok"),
    (None, 200, None, "ok"),
    (ExpertFailed("ValueError: boom", expert="square"), 500, {"error": "ValueError: boom"}, "expert_failed"),
    (firefly.FireflyInputError(422, "missing a required argument: 'n'"), 422,
     {"error": "missing a required argument: 'n'"}, "bad_request"),
    (BadRequest("the body is not valid JSON: x"), 400, {"error": "the body is not valid JSON: x"}, "bad_request"),
    (Overloaded("too busy"), 503, {"error": "too busy"}, "overloaded"),
    (b"bytes", 500, {"error": "square returned a value that cannot be sent as JSON: bytes cannot be sent as JSON; "
                              "return text, or call this expert over msgpack"}, "bad_result"),
])
def test_a_calls_reply_has_firefly_shape_and_status(result, status, body, outcome):
    request = parsed(b'{"n": 7}')
    response, keep_alive, got_outcome = firefly.reply(request, result, ROUTES.cors)
    got_status, headers, got_body = _status_and_body(response)
    assert (got_status, got_body, got_outcome, keep_alive) == (status, body, outcome, True)
    assert headers[b"content-type"] == b"application/json"  # (Firefly's client reads a 500's message only then)
    assert headers[b"access-control-allow-origin"] == b"https://app.example"
    assert (b"retry-after" in headers) is (status == 503)


# ------------------------------------------------------------------------------------------ GET /
_SENTINEL = object()


def documented(text, count=3, *more, scale=1.5, when=_SENTINEL, **options):
    """Documented.

    At length."""


def test_metadata_is_firefly_shaped_and_always_sendable():
    meta = firefly.metadata(loaded(documented))
    assert meta["doc"] == "Documented.\n\n    At length."
    kinds = [(p["name"], p["kind"], p.get("default", "-")) for p in meta["parameters"]]
    assert kinds[:5] == [("text", "POSITIONAL_OR_KEYWORD", "-"), ("count", "POSITIONAL_OR_KEYWORD", 3),
                         ("more", "VAR_POSITIONAL", "-"), ("scale", "KEYWORD_ONLY", 1.5),
                         ("when", "KEYWORD_ONLY", kinds[4][2])]
    assert kinds[4][2].startswith("<object object at ")  # (not JSON: its repr, where Firefly's GET / would fail)
    assert kinds[5] == ("options", "VAR_KEYWORD", "-")
    assert firefly.metadata(SimpleNamespace(function=len, signature=None, batched=False)) == {
        "doc": len.__doc__, "parameters": []}


def test_index_names_each_expert_with_its_path():
    described = {"square": {"name": "square", "firefly": firefly.metadata(loaded(square))},
                 "total": {"name": "total", "firefly": {"doc": "Sums.", "parameters": []}},
                 "model": {"name": "model"}}  # (described before firefly_routes was on: still listed)
    assert firefly.index(described, ROUTES) == {"app": "firefly", "version": __version__, "functions": {
        "square": {"path": "/square", "doc": "", "parameters": [{"name": "n", "kind": "POSITIONAL_OR_KEYWORD"}]},
        "total": {"path": "/sum", "doc": "Sums.", "parameters": []},
        "model": {"path": "/model", "doc": "", "parameters": []}}}


# ------------------------------------------------------------------------------------------ config
@pytest.mark.parametrize(("paths", "problem"), [
    ({"a": "", "b": ""}, None),
    ({"a": "/x", "b": "/y"}, None),
    ({"a": "/health", "b": "/metrics"}, None),  # (functions are POSTs: GET /health stays the health check)
    ({"a": "/b", "b": ""}, "[expert:a] path = /b: already the path of expert b; give each expert its own path"),
    ({"a": "", "b": "/a"}, "[expert:b] path = /a: already the path of expert a; give each expert its own path"),
    ({"a": "/x", "b": "/x"}, "[expert:b] path = /x: already the path of expert a; give each expert its own path"),
    ({"a": "/opinion/a"}, "[expert:a] path = /opinion/a: under /opinion/, one of expertd's own routes; choose "
                          "another path"),
    ({"a": "/pipeline/x/y"}, "[expert:a] path = /pipeline/x/y: under /pipeline/"),
    ({"a": "/map/"}, "[expert:a] path = /map/: under /map/"),
    ({"a": "/calls"}, None),
])
def test_firefly_paths_are_checked_when_the_config_loads(paths, problem):
    experts = {name: ExpertSpec(name=name, function="m:f", path=path) for name, path in paths.items()}
    if problem is None:
        check_route_paths(experts, "x.conf")
        return
    with pytest.raises(ConfigError) as raised:
        check_route_paths(experts, "x.conf")
    assert str(raised.value).startswith(f"x.conf: {problem}")


@pytest.mark.parametrize(("setting", "raw", "parsed"), [
    (URL_PATH, "/square", "/square"),
    (URL_PATH, "/café", "/café"),
    (URL_PATH, "/c%61ll/square", "write the path decoded, without %-escapes (/café, not /caf%C3%A9)"),
    (URL_PATH, "/100%", "write the path decoded, without %-escapes (/café, not /caf%C3%A9)"),
    (ORIGINS, "*", "*"),
    (ORIGINS, "https://a.example,https://b.example", "https://a.example, https://b.example"),
    (ORIGINS, "*, https://a.example", "* allows every origin: write it alone, or list the origins without it"),
])
def test_paths_are_written_decoded_and_star_stands_alone(setting, raw, parsed):
    try:
        got = setting.parse(raw)
    except ValueError as exc:
        got = str(exc)
    assert got == parsed
