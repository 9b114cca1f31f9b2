"""Pipelines from every side a user sees: the Python client, expertctl (one document and --lines), HTTP, the lists."""

from __future__ import annotations

import http.client
import json
import re
import subprocess
import threading
import time

import pytest
from test_http import TOKEN, free_port, request

from expertd.client import Client, target_of
from expertd.errors import BadRequest, UnknownExpert

from conftest import BIN, ROOT, UnixHTTPConnection, wait_until

DOC_EXPERTS = {
    "language": "docexperts:language",
    "polite": "docexperts:polite",
    "length": "docexperts:length",
    "shout": "docexperts:shout",
    "seen": "docexperts:seen",
    "worker_pid": "docexperts:worker_pid",
    "failing": "docexperts:failing",
    "sleeper": "docexperts:sleeper",
    "blen": {"function": "docexperts:batched_length", "batch_delay": "20ms"},
    "echo": "testexperts:echo",
    "reaper": "faceexperts:reaper",
    "tlen": {"function": "batchexperts:text_length", "max_batch": "8"},
    "pipeline:greeting": {"stages": "language, polite"},
    "pipeline:careful": {"stages": "length, failing, shout", "on_error": "stop"},
}


@pytest.fixture
def daemon(make_daemon):
    return make_daemon(DOC_EXPERTS)


def _status(daemon) -> dict:
    done = daemon.ctl("status", "--json")
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


# ------------------------------------------------------------------ Python client
def test_client_opinions_runs_experts_in_stages_and_returns_the_document(daemon):
    client = daemon.client()
    document = client.opinions({"id": 1, "text": "Bonjour le monde"}, ["language", ("polite", "seen"), "length"])
    assert document == {"id": 1, "text": "Bonjour le monde", "opinions": {
        "language": "fr", "polite": True, "seen": ["language"], "length": 16}}  # seen: not polite's, same stage


def test_client_pipeline_runs_a_named_pipeline(daemon):
    client = daemon.client()
    assert client.pipeline("greeting", {"text": "hello there"})["opinions"] == {"language": "en", "polite": True}
    assert client.opinions({"text": "hi"}, ["length", "greeting"])["opinions"] == {
        "length": 2, "language": "en", "polite": False}  # a pipeline's name is a stage of its own


def test_client_a_failing_expert_lands_under_errors_and_on_error_decides_the_rest(daemon):
    client = daemon.client()
    document = client.opinions({"text": "x"}, ["failing", "length"])
    assert document["opinions"] == {"length": 1}  # (continue: the default for experts the caller lists)
    assert document["errors"] == {"failing": {"code": "expert_failed", "type": "builtins.ValueError",
                                              "message": "ValueError: cannot judge 'x'"}}
    stopped = client.opinions({"text": "x"}, ["failing", "length"], on_error="stop")
    assert stopped["opinions"] == {} and stopped["errors"]["length"]["code"] == "skipped"
    # A pipeline's own on_error (careful: stop) holds unless the call overrides it.
    assert client.pipeline("careful", {"text": "x"})["errors"]["shout"]["code"] == "skipped"
    assert client.pipeline("careful", {"text": "x"}, on_error="continue")["opinions"] == {"length": 1, "shout": 0.0}


def test_an_expert_that_returns_its_input_keeps_the_document_as_it_saw_it(daemon):
    document = daemon.client().opinions({"text": "hi"}, ["length", "echo", "shout"])
    assert document["opinions"]["echo"] == {"args": [{"text": "hi", "opinions": {"length": 2}}], "kwargs": {}}
    status, _, replied = request(UnixHTTPConnection(str(daemon.socket)), "POST", "/pipeline/echo", {"text": "hi"})
    assert (status, replied["opinions"]["echo"]["args"]) == (200, [{"text": "hi", "opinions": {}}])


def test_client_request_level_failures_raise(daemon):
    client = daemon.client()
    with pytest.raises(UnknownExpert, match="no expert or pipeline named 'nope'"):
        client.opinions({"text": "x"}, ["language", "nope"])
    with pytest.raises(UnknownExpert):
        client.pipeline("nope", {})
    with pytest.raises(BadRequest, match="named twice"):
        client.opinions({}, ["length", "length"])
    with pytest.raises(BadRequest, match="on_error"):
        client.opinions({}, ["length"], on_error="sometimes")
    with pytest.raises(BadRequest, match="must be a map"):
        client.pipeline("greeting", [1, 2])  # type: ignore[arg-type]
    assert client.opinions({"text": "still serving"}, ["length"])["opinions"] == {"length": 13}


@pytest.mark.parametrize("names", ["language", [], ["a,b"], ["a+b"], [""], [("a", "")], [()], [3], None])
def test_client_refuses_malformed_names_before_sending(names):
    client = Client("/nonexistent/expertd.sock")  # (nothing is sent: no daemon needed)
    with pytest.raises(ValueError, match="name"):
        client.opinions({}, names)


def test_client_names_make_one_target():
    assert target_of(["language", ("sentiment", "toxicity")]) == "language,sentiment+toxicity"
    assert target_of([["a", "b"], "c"]) == "a+b,c"


# ------------------------------------------------------------------ expertctl, one document
def test_opinion_with_several_experts_is_one_request(daemon):
    requests = _status(daemon)["requests"]
    done = daemon.ctl("opinion", "worker_pid", "language", "seen", input='{"text": "hello"}')
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert out["opinions"]["seen"] == ["language", "worker_pid"]  # each stage saw the ones before
    assert out["opinions"]["worker_pid"] in daemon.worker_pids()
    assert wait_until(lambda: _status(daemon)["requests"] == requests + 1)
    assert _status(daemon)["pipelines"]["(ad hoc)"]["requests"] == 1


def test_pipeline_command_runs_a_named_pipeline(daemon):
    done = daemon.ctl("pipeline", "greeting", input='{"text": "bonjour"}')
    assert (done.returncode, done.stderr) == (0, "")
    assert json.loads(done.stdout) == {"text": "bonjour", "opinions": {"language": "fr", "polite": True}}
    assert _status(daemon)["pipelines"]["greeting"]["requests"] == 1


def test_opinion_failure_is_one_line_with_the_words_of_a_call_and_status_1(daemon):
    done = daemon.ctl("opinion", "language", "failing", "length", input='{"text": "hello"}')
    assert (done.returncode, done.stdout) == (1, "")
    assert done.stderr == "expertctl: failing: ValueError: cannot judge 'hello' [expert_failed]\n"
    called = daemon.ctl("call", "failing", '{"text": "hello"}')
    # The same words; a call's error names its request (the pipeline's expert failed inside a request that
    # answered: its id is in the access log's line for it, not in the document).
    assert re.fullmatch(re.escape(done.stderr.rstrip("\n")) + r" \(request \d+-\d+\)\n", called.stderr), called.stderr
    # A pipeline that goes on past failures is stopped by expertctl all the same, unless told to keep going.
    assert daemon.ctl("pipeline", "careful", input='{"text": "hello"}').stderr == done.stderr


def test_keep_going_writes_the_document_with_its_errors_and_exits_0(daemon):
    done = daemon.ctl("opinion", "--keep-going", "language", "failing", "length", input='{"text": "hello"}')
    assert (done.returncode, done.stderr) == (0, "")
    out = json.loads(done.stdout)
    assert out["opinions"] == {"language": "en", "length": 5}
    assert out["errors"]["failing"]["type"] == "builtins.ValueError"


def test_errors_a_document_came_with_are_kept_and_not_this_runs_failure(daemon):
    # The output of a --keep-going run, through another expert: its old error stays, and is not a failure now.
    earlier = daemon.ctl("opinion", "-k", "failing", input='{"text": "hello"}').stdout
    done = daemon.ctl("opinion", "length", input=earlier)
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert out["opinions"] == {"length": 5} and out["errors"]["failing"]["code"] == "expert_failed"
    # ... but the same expert failing again is a failure of this run.
    again = daemon.ctl("opinion", "failing", input=earlier)
    assert again.returncode == 1 and "cannot judge 'hello'" in again.stderr


def test_unknown_expert_in_opinion_is_one_line(daemon):
    done = daemon.ctl("opinion", "language", "nope", input='{"text": "hello"}')
    assert done.returncode == 1 and done.stderr.count("\n") == 1
    assert done.stderr.startswith("expertctl: nope: no expert or pipeline named 'nope'")


# ------------------------------------------------------------------ expertctl --lines
def _lines(documents: list[dict]) -> str:
    return "".join(json.dumps(document) + "\n" for document in documents)


def test_opinion_lines_keeps_the_order_of_many_documents_over_several_connections(make_daemon):
    daemon = make_daemon(DOC_EXPERTS, workers=3)
    documents = [{"n": n, "text": "x" * (n % 17) + (" Bonjour" if n % 3 else "")} for n in range(1500)]
    done = daemon.ctl("opinion", "--lines", "--jobs", "3", "language", "length", "polite", input=_lines(documents))
    assert (done.returncode, done.stderr) == (0, "")
    lines = done.stdout.splitlines()
    assert [json.loads(line)["n"] for line in lines] == list(range(1500))
    for document, line in zip(documents, lines, strict=True):
        assert json.loads(line)["opinions"] == {"language": "fr" if document["n"] % 3 else "en",
                                                "length": len(document["text"]), "polite": bool(document["n"] % 3)}


def test_opinion_lines_has_documents_in_flight_on_every_worker(daemon):
    documents = [{"n": n, "sleep": 0.05} for n in range(24)]
    done = daemon.ctl("opinion", "--lines", "sleeper", "worker_pid", input=_lines(documents))
    assert done.returncode == 0, done.stderr
    outputs = [json.loads(line) for line in done.stdout.splitlines()]
    assert [out["n"] for out in outputs] == list(range(24))
    assert {out["opinions"]["worker_pid"] for out in outputs} == daemon.worker_pids()  # both workers served


def test_opinion_lines_stops_at_a_bad_line_mid_stream_after_writing_the_lines_before(daemon):
    lines = _lines([{"text": f"doc {n}"} for n in range(300)]).splitlines(keepends=True)
    lines[199] = '{"text": \n'
    done = daemon.ctl("opinion", "--lines", "language", "length", input="".join(lines))
    assert done.returncode == 1
    assert [json.loads(line)["text"] for line in done.stdout.splitlines()] == [f"doc {n}" for n in range(199)]
    assert done.stderr.startswith("expertctl: stdin line 200: invalid JSON") and done.stderr.count("\n") == 1


def test_opinion_lines_stops_at_an_experts_failure_mid_stream(daemon):
    # polite reads opinions.language: a document whose language it does not know makes it fail.
    documents = [{"n": n, "opinions": {"language": "de" if n == 150 else "en"}, "text": "hello"} for n in range(300)]
    done = daemon.ctl("opinion", "--lines", "length", "polite", input=_lines(documents))
    assert done.returncode == 1
    assert [json.loads(line)["n"] for line in done.stdout.splitlines()] == list(range(150))
    # The failure names the document's input line and what was written before it stopped.
    assert done.stderr == ("expertctl: stdin line 151: polite: KeyError: 'de' [expert_failed]; stopped there, "
                           "150 documents written (--on-error skip or record goes on)\n")
    # The same words as for that document alone.
    alone = daemon.ctl("opinion", "length", "polite", input=json.dumps(documents[150]))
    assert (alone.returncode, alone.stderr) == (1, "expertctl: polite: KeyError: 'de' [expert_failed]\n")


def test_opinion_lines_keep_going_writes_every_document_with_its_errors(daemon):
    documents = [{"n": n, "opinions": {"language": "de" if n % 100 == 7 else "en"}, "text": "hello"}
                 for n in range(300)]
    done = daemon.ctl("opinion", "--lines", "--keep-going", "length", "polite", input=_lines(documents))
    assert (done.returncode, done.stderr) == (0, "expertctl: 3 of 300 documents written with errors "
                                                 "(under errors.NAME)\n")
    outputs = [json.loads(line) for line in done.stdout.splitlines()]
    assert [out["n"] for out in outputs] == list(range(300))
    failed = [out["n"] for out in outputs if "errors" in out]
    assert failed == [7, 107, 207]
    assert outputs[7]["errors"]["polite"]["message"] == "KeyError: 'de'"
    assert outputs[7]["opinions"] == {"language": "de", "length": 5}
    assert outputs[8]["opinions"] == {"language": "en", "length": 5, "polite": True}


def test_opinion_lines_sends_again_the_documents_a_lost_worker_held(daemon, short_dir):
    documents = [{"n": n, "text": "x" * n} for n in range(60)]
    documents[10]["die_once"] = str(short_dir / "died")  # its worker is killed the first time only
    done = daemon.ctl("opinion", "--lines", "language", "reaper", input=_lines(documents))
    assert (done.returncode, done.stderr) == (0, "")
    assert [json.loads(line)["opinions"]["reaper"] for line in done.stdout.splitlines()] == list(range(60))
    assert (short_dir / "died").exists()


def test_opinion_lines_stops_at_a_document_that_keeps_killing_its_worker(daemon):
    documents = [{"n": n, "text": "x" * n} for n in range(60)]
    documents[5]["die"] = True
    done = daemon.ctl("opinion", "--lines", "language", "reaper", input=_lines(documents))
    assert done.returncode == 1
    assert [json.loads(line)["n"] for line in done.stdout.splitlines()] == list(range(5))
    assert done.stderr.startswith("expertctl: stdin line 6: ") and done.stderr.count("\n") == 1
    assert "[worker_lost]; stopped there, 5 documents written" in done.stderr


def test_opinion_lines_reads_a_file_whose_last_line_has_no_newline(daemon, short_dir):
    path = short_dir / "docs.jsonl"
    path.write_text('{"text": "a"}\n\n{"text": "bonjour"}')
    with path.open() as stdin:
        done = subprocess.run([str(BIN / "expertctl"), "--socket", str(daemon.socket), "opinion", "--lines",
                               "language", "length"], stdin=stdin, capture_output=True, text=True, timeout=30)
    assert (done.returncode, done.stderr) == (0, "")
    assert [json.loads(line)["opinions"] for line in done.stdout.splitlines()] == [
        {"language": "en", "length": 1}, {"language": "fr", "length": 7}]


def test_opinion_lines_writes_each_document_without_waiting_for_the_next_line(daemon):
    ctl = f"{BIN / 'expertctl'} --socket {daemon.socket} opinion --lines length"
    producer = """(echo '{"text": "now"}'; sleep 5; echo '{"text": "later"}')"""
    with subprocess.Popen(["bash", "-c", f"{producer} | {ctl}"], stdout=subprocess.PIPE, text=True) as proc:
        started = time.monotonic()
        first = proc.stdout.readline()
        assert json.loads(first)["opinions"] == {"length": 3}
        assert time.monotonic() - started < 4
        assert json.loads(proc.stdout.readline())["text"] == "later"
    assert proc.returncode == 0


def test_pipeline_lines_streams_a_named_pipeline(daemon):
    done = daemon.ctl("pipeline", "--lines", "greeting", input=_lines([{"text": "bonjour"}, {"text": "hi"}]) + "\n")
    assert (done.returncode, done.stderr) == (0, "")
    assert [json.loads(line)["opinions"] for line in done.stdout.splitlines()] == [
        {"language": "fr", "polite": True}, {"language": "en", "polite": False}]


def test_opinion_lines_with_an_unknown_expert_stops_with_one_line(daemon):
    done = daemon.ctl("opinion", "--lines", "length", "nope", input=_lines([{"text": "a"}] * 20))
    assert (done.returncode, done.stdout) == (1, "")
    assert done.stderr.startswith("expertctl: nope: no expert or pipeline named 'nope'")
    assert done.stderr.count("\n") == 1


def test_opinion_lines_with_one_batched_expert_still_sends_windows(daemon):
    # (the list now ends with the pipelines: expertctl still finds which experts are batched)
    documents = _lines([{"text": "x" * n} for n in range(30)])
    done = daemon.ctl("opinion", "--lines", "--window", "10", "blen", input=documents)
    assert done.returncode == 0, done.stderr
    assert [json.loads(line)["opinions"]["blen"] for line in done.stdout.splitlines()] == list(range(30))
    metrics = request(UnixHTTPConnection(str(daemon.socket)), "GET", "/metrics")[2].splitlines()
    assert 'expertd_requests_total{expert="blen"} 3' in metrics  # three MAP requests of 10


def test_keep_going_over_a_batched_experts_windows_writes_the_failed_items_errors(daemon):
    documents = [{"n": n, "text": "x" * n} for n in range(30)]
    documents[12]["fail"] = "item twelve"
    done = daemon.ctl("opinion", "--lines", "--keep-going", "tlen", input=_lines(documents))
    assert (done.returncode, done.stderr) == (0, "expertctl: 1 of 30 documents written with errors "
                                                 "(under errors.NAME)\n")
    outputs = [json.loads(line) for line in done.stdout.splitlines()]
    assert [out["n"] for out in outputs] == list(range(30))
    assert outputs[12]["errors"] == {"tlen": {"code": "expert_failed", "type": "builtins.ValueError",
                                              "message": "ValueError: asked to fail: item twelve"}}
    assert outputs[12]["opinions"] == {} and outputs[13]["opinions"]["tlen"]["chars"] == 13
    stopped = daemon.ctl("opinion", "--lines", "tlen", input=_lines(documents))
    assert stopped.returncode == 1 and len(stopped.stdout.splitlines()) == 12
    assert stopped.stderr == ("expertctl: stdin line 13: tlen: ValueError: asked to fail: item twelve "
                              "[expert_failed]; stopped there, 12 documents written (--on-error skip or record "
                              "goes on)\n")


# ------------------------------------------------------------------ HTTP
def test_http_pipeline_returns_the_document_with_opinions_and_errors(web):
    status, _, document = request(web, "POST", "/pipeline/greeting", {"id": 3, "text": "hello"})
    assert (status, document) == (200, {"id": 3, "text": "hello", "opinions": {"language": "en", "polite": True}})
    status, _, document = request(web, "POST", "/pipeline/careful", {"text": "hi"})
    assert status == 200  # an expert's failure is the document's, not the request's
    assert document["opinions"] == {"length": 2}
    assert [document["errors"][name]["code"] for name in ("failing", "shout")] == ["expert_failed", "skipped"]


def test_http_opinion_with_several_experts_runs_them_as_stages(web):
    status, _, document = request(web, "POST", "/opinion/language,seen+length", {"text": "bonjour"})
    assert (status, document["opinions"]) == (200, {"language": "fr", "seen": ["language"], "length": 7})
    status, _, document = request(web, "POST", "/opinion/length,failing", {"text": "hi"})
    assert status == 200 and document["errors"]["failing"]["code"] == "expert_failed"
    # One expert: as before pipelines, its failure is the request's.
    status, _, error = request(web, "POST", "/opinion/failing", {"text": "hi"})
    assert status == 500 and error["error"]["code"] == "expert_failed"


def test_http_on_error_header_overrides_the_pipelines(web):
    headers = {"X-Expertd-On-Error": "continue"}
    status, _, document = request(web, "POST", "/pipeline/careful", {"text": "hi"}, headers)
    assert status == 200 and document["opinions"] == {"length": 2, "shout": 0.0}
    headers = {"X-Expertd-On-Error": "stop"}
    status, _, document = request(web, "POST", "/opinion/failing,length", {"text": "hi"}, headers)
    assert document["errors"]["length"]["code"] == "skipped"
    status, _, error = request(web, "POST", "/pipeline/careful", {"text": "hi"}, {"X-Expertd-On-Error": "never"})
    assert status == 400 and "X-Expertd-On-Error" in error["error"]["message"]


@pytest.mark.parametrize(("path", "body", "status", "code"), [
    ("/pipeline/nope", {}, 404, "unknown_expert"),
    ("/opinion/language,nope", {}, 404, "unknown_expert"),
    ("/opinion/language,,length", {}, 400, "bad_request"),
    ("/opinion/length+length", {}, 400, "bad_request"),
    ("/pipeline/greeting", [1], 400, "bad_request"),
    ("/pipeline/greeting", {"opinions": [1]}, 400, "bad_request"),
    ("/opinion/language,length", "text", 400, "bad_request"),
])
def test_http_pipeline_request_errors_use_the_json_error_format(daemon, path, body, status, code):
    web = UnixHTTPConnection(str(daemon.socket))
    got, _, error = request(web, "POST", path, body)
    assert (got, error["error"]["code"]) == (status, code)
    assert request(UnixHTTPConnection(str(daemon.socket)), "POST", "/pipeline/greeting", {"text": "hi"})[0] == 200


def test_the_openapi_document_describes_pipelines():
    spec = (ROOT / "docs" / "openapi.yaml").read_text()
    assert "  /pipeline/{name}:" in spec and "X-Expertd-On-Error" in spec
    assert '$ref: "#/components/schemas/Pipeline"' in spec


def test_http_pipelines_over_tcp_with_the_token(make_daemon):
    port = free_port()
    make_daemon(DOC_EXPERTS, http_listen=f"127.0.0.1:{port}", token=TOKEN)
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    assert request(conn, "POST", "/pipeline/greeting", {"text": "hi"})[0] == 401
    authorized = {"Authorization": f"Bearer {TOKEN}"}
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    for n in range(5):  # kept alive
        status, _, document = request(conn, "POST", "/opinion/length,language", {"text": "x" * n}, authorized)
        assert (status, document["opinions"]) == (200, {"length": n, "language": "en"})
    status, _, document = request(conn, "POST", "/pipeline/greeting", {"text": "bonjour"}, authorized)
    assert (status, document["opinions"]) == (200, {"language": "fr", "polite": True})
    assert request(conn, "POST", "/pipeline/nope", {}, authorized)[0] == 404


def test_http_pipeline_of_a_batched_expert_is_answered_whole_among_batched_calls(daemon):
    # blen is batched (waiting 20 ms for company): calls of it are gathered into batches, a pipeline never is.
    results: dict[str, object] = {}

    def pipeline(n: int) -> None:
        results[f"p{n}"] = request(UnixHTTPConnection(str(daemon.socket)), "POST", "/pipeline/blen",
                                   {"text": "x" * n})[::2]

    def call(n: int) -> None:
        results[f"c{n}"] = daemon.client().call("blen", {"text": "y" * n})

    threads = [threading.Thread(target=target, args=(n,)) for n in range(6) for target in (pipeline, call)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    for n in range(6):
        assert results[f"p{n}"] == (200, {"text": "x" * n, "opinions": {"blen": n}})
        assert results[f"c{n}"] == n


# ------------------------------------------------------------------ the lists
def test_list_shows_the_pipelines_after_the_experts(daemon):
    done = daemon.ctl("list")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[-2].split() == ["greeting", "=", "language,", "polite", "(pipeline;", "on_error", "=", "continue)"]
    assert lines[-1].startswith("careful = length, failing, shout") and lines[-1].endswith("on_error = stop)")
    assert any(line.startswith("language(document)") for line in lines[:-2])
    listed = json.loads(daemon.ctl("list", "--json").stdout)
    assert [entry["name"] for entry in listed if entry.get("pipeline")] == ["greeting", "careful"]
    assert listed[-2] == {"name": "greeting", "pipeline": True, "stages": [["language"], ["polite"]],
                          "on_error": "continue", "timeout": 120.0}  # (two stages of 60 s)


def test_get_experts_shows_the_pipelines_too(daemon, web):
    status, _, listed = request(web, "GET", "/experts")
    assert status == 200
    assert listed == daemon.client().experts()
    careful = next(entry for entry in listed if entry["name"] == "careful")
    assert careful["stages"] == [["length"], ["failing"], ["shout"]] and careful["on_error"] == "stop"
    assert all("signature" in entry for entry in listed if not entry.get("pipeline"))
