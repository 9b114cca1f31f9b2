"""HTTP errors that point at the route meant: a document to /call, an array to a batched expert's /call; a trailing
slash tolerated.  Successful requests are unchanged."""

from __future__ import annotations

import pytest
from test_http import request

from expertd.errors import BadRequest
from expertd.http_hints import route_hint, with_hint

from conftest import UnixHTTPConnection

EXPERTS = {
    "length": "docexperts:length",
    "add": "testexperts:add",
    "tlen": {"function": "batchexperts:text_length", "max_batch": "8"},
}


@pytest.fixture
def web(make_daemon):
    daemon = make_daemon(EXPERTS)
    conn = UnixHTTPConnection(daemon.socket)
    yield conn
    conn.close()


def test_a_document_posted_to_call_of_a_document_expert_says_to_use_opinion(web):
    status, _, reply = request(web, "POST", "/call/length", {"text": "hello"})
    assert status == 400 and reply["error"]["code"] == "bad_request"
    message = reply["error"]["message"]
    assert message.startswith("length(document): missing a required argument: 'document'; ")
    assert "length takes one document: POST /opinion/length with the document as the body" in message
    assert "\n" not in message
    # The route meant answers, and a document as the one argument of /call still works.
    assert request(web, "POST", "/opinion/length", {"text": "hello"})[2] == {"text": "hello",
                                                                             "opinions": {"length": 5}}
    assert request(web, "POST", "/call/length", [{"text": "hello"}])[:3:2] == (200, 5)


def test_keyword_arguments_that_do_not_fit_get_no_route_hint(web):
    status, _, reply = request(web, "POST", "/call/add", {"x": 1})
    assert status == 400 and "opinion" not in reply["error"]["message"]
    assert request(web, "POST", "/call/add", {"a": 2, "b": 3})[:3:2] == (200, 5)


def test_an_array_posted_to_call_of_a_batched_expert_says_how_to_pass_it(web):
    status, _, reply = request(web, "POST", "/call/tlen", [{"text": "a"}, {"text": "bb"}])
    assert status == 400 and reply["error"]["code"] == "bad_request"
    message = reply["error"]["message"]
    assert "tlen is batched and takes one item a call: POST /call/tlen with [ITEM], or POST /map/tlen" in message
    assert request(web, "POST", "/call/tlen", [{"text": "bb"}])[2] == {"chars": 2, "seen_opinions": []}
    status, _, items = request(web, "POST", "/map/tlen", [{"text": "a"}, {"text": "bb"}])
    assert status == 200 and [item["result"]["chars"] for item in items] == [1, 2]


def test_a_trailing_slash_is_tolerated(web):
    assert request(web, "POST", "/call/add/", [2, 3])[:3:2] == (200, 5)
    assert request(web, "POST", "/opinion/length/", {"text": "hi"})[2]["opinions"] == {"length": 2}
    status, _, experts = request(web, "GET", "/experts/")
    assert status == 200 and {entry["name"] for entry in experts} >= {"add", "length", "tlen"}
    assert request(web, "GET", "/health/")[0] == 200
    assert request(web, "POST", "/call//", [1])[0] == 404  # (a missing name is still no path)


@pytest.mark.parametrize(("route", "body", "batched", "takes_one", "meant"), [
    ("call", {"text": "x"}, False, True, "POST /opinion/e"),
    ("call", {"text": "x"}, False, False, None),  # (keyword arguments that did not fit: no other route)
    ("call", {"text": "x"}, True, True, None),
    ("call", [1, 2], True, True, "POST /map/e"),
    ("call", [], True, True, "POST /map/e"),
    ("call", [1], True, True, None),  # (one item: the right route; its error is the item's)
    ("call", [1, 2], False, True, None),
    ("opinion", {"text": "x"}, False, True, None),
    ("map", [1, 2], True, True, None),
])
def test_route_hint_table(route, body, batched, takes_one, meant):
    hint = route_hint(route, "e", body, batched, takes_one)
    assert (hint if meant is None else meant in hint) == (None if meant is None else True)


def test_a_hint_keeps_the_errors_class_code_and_expert():
    hinted = with_hint(BadRequest("bad", expert="e"), "try this")
    assert (type(hinted), hinted.code, hinted.expert, hinted.message) == (BadRequest, "bad_request", "e",
                                                                         "bad; try this")
