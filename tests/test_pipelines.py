"""Pipelines end to end: one PIPELINE request carries a document through experts in stages (issue #16).

Every test runs a real daemon and speaks the msgpack protocol by hand
(protocol.encode_pipeline, read_frame, unpack): the reply is the document with
``opinions.NAME`` for each expert that answered and ``errors.NAME`` for each one
that did not, or an ERROR frame for a request-level problem.  The experts are in
tests/experts/docexperts.py.
"""

from __future__ import annotations

import os
import signal
import socket
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import msgpack
import pytest

from expertd import protocol
from expertd.client import Client

from conftest import Daemon, raw_connection, run_expertd, wait_until, write_config
from conftest import metrics_samples as metrics

EXPERTS = {
    "language": "docexperts:language",
    "polite": "docexperts:polite",
    "length": "docexperts:length",
    "shout": "docexperts:shout",
    "seen_first": "docexperts:seen",
    "seen_later": "docexperts:seen",
    "failing": "docexperts:failing",
    "worker_pid": "docexperts:worker_pid",
    "pipeline:mod": {"stages": "language, polite"},
    "pipeline:lenient": {"stages": "language, failing, polite + length"},
    "pipeline:strict": {"stages": "language, failing, polite + length", "on_error": "stop"},
}
BURNERS = {
    "burn_a": "docexperts:burn_a",
    "burn_b": "docexperts:burn_b",
    "burn_c": "docexperts:burn_c",
    "worker_pid": "docexperts:worker_pid",
    "pipeline:par": {"stages": "burn_a + burn_b + burn_c"},
}
PARALLEL, SEQUENTIAL = "burn_a + burn_b + burn_c", "burn_a, burn_b, burn_c"


# ------------------------------------------------------------------------------------------ helpers
def ask(sock: socket.socket, target: str, document: object, options: dict | None = None,
        request_id: int = 7) -> tuple[str, object]:
    """Send one PIPELINE request: ("result", the document) or ("error", the error map)."""
    sock.sendall(protocol.encode_pipeline(request_id, target, document, options))  # type: ignore[arg-type]
    return reply_of(sock, request_id)


def ask_raw(sock: socket.socket, body: object, request_id: int = 7) -> tuple[str, object]:
    """A PIPELINE request whose body is ``body`` as given (for shapes encode_pipeline would not make)."""
    sock.sendall(protocol.encode_frame(protocol.PIPELINE, request_id, msgpack.packb(body, use_bin_type=True)))
    return reply_of(sock, request_id)


def reply_of(sock: socket.socket, request_id: int) -> tuple[str, object]:
    kind, got_id, body = protocol.read_frame(sock, protocol.MAX_BODY)
    assert got_id == request_id
    assert kind in (protocol.RESULT, protocol.ERROR)
    return ("result" if kind == protocol.RESULT else "error"), protocol.unpack(body)


def result(sock: socket.socket, target: str, document: dict, options: dict | None = None) -> dict:
    kind, value = ask(sock, target, document, options)
    assert kind == "result", value
    return value  # type: ignore[return-value]


def timed(sock: socket.socket, target: str, document: dict) -> tuple[float, dict]:
    began = time.monotonic()
    value = result(sock, target, document)
    return time.monotonic() - began, value




def status(daemon: Daemon) -> dict:
    return Client(str(daemon.socket)).status()


def error_entry(document: dict, name: str) -> dict:
    entry = document["errors"][name]
    assert set(entry) == {"code", "type", "message"}, entry
    return entry


# ------------------------------------------------------------------------------------------ opinions
def test_a_named_pipeline_gives_every_experts_opinion_and_leaves_the_rest_of_the_document_alone(make_daemon):
    daemon = make_daemon(EXPERTS)
    sock = raw_connection(daemon)
    document = {"text": "Bonjour le monde", "id": 7, "meta": {"tags": ["a", "b"], "score": 0.5}, "blob": b"\x00\xff"}
    # polite (stage 2) reads language's opinion (stage 1): it greets in French.
    assert result(sock, "mod", document) == {**document, "opinions": {"language": "fr", "polite": True}}
    assert result(sock, "mod", {"text": "hello there"}) == {"text": "hello there",
                                                            "opinions": {"language": "en", "polite": True}}
    assert result(sock, "mod", {"text": "bonjour"})["opinions"]["polite"] is True
    assert result(sock, "mod", {})["opinions"] == {"language": "en", "polite": False}


def test_an_ad_hoc_target_runs_its_stages_in_order_and_a_stage_does_not_see_its_own_opinions(make_daemon):
    daemon = make_daemon(EXPERTS)
    sock = raw_connection(daemon)
    # seen_first shares a stage with language: it sees the document as it was before the stage.
    answer = result(sock, "language + seen_first, seen_later", {"text": "Hi"})
    assert answer["opinions"] == {"language": "en", "seen_first": [], "seen_later": ["language", "seen_first"]}
    answer = result(sock, " seen_first ,language+ length ,seen_later", {"text": "Hi", "opinions": {"given": 1}})
    assert answer["opinions"] == {"given": 1, "seen_first": ["given"], "language": "en", "length": 2,
                                  "seen_later": ["given", "language", "length", "seen_first"]}
    # A single expert is a plan of one stage; a pipeline may be a stage of an ad-hoc target.
    assert result(sock, "length", {"text": "abc"}) == {"text": "abc", "opinions": {"length": 3}}
    answer = result(sock, "mod, seen_later", {"text": "hello"})
    assert answer["opinions"] == {"language": "en", "polite": True, "seen_later": ["language", "polite"]}


def test_an_opinion_or_error_the_document_came_with_for_an_expert_of_the_plan_is_replaced(make_daemon):
    daemon = make_daemon(EXPERTS)
    sock = raw_connection(daemon)
    old_error = {"code": "expert_failed", "type": "x", "message": "from an earlier run"}
    document = {"text": "hello", "opinions": {"language": "xx", "other": [1]},
                "errors": {"polite": old_error, "unrelated": old_error}}
    answer = result(sock, "mod", document)
    assert answer["opinions"] == {"language": "en", "polite": True, "other": [1]}
    assert answer["errors"] == {"unrelated": old_error}  # (an error of an expert not in the plan stays)
    # Errors only of experts that now answered: the errors map goes.
    answer = result(sock, "mod", {"text": "hello", "errors": {"polite": old_error}})
    assert answer == {"text": "hello", "opinions": {"language": "en", "polite": True}}
    # An opinion of an expert that now fails goes, and its error takes its place.
    answer = result(sock, "failing", {"text": "t", "opinions": {"failing": "old opinion"}})
    assert answer["opinions"] == {}
    assert error_entry(answer, "failing")["code"] == "expert_failed"


# ------------------------------------------------------------------------------------------ errors per expert
def test_a_failing_expert_has_its_error_in_the_document_and_on_error_continue_runs_later_stages(make_daemon):
    daemon = make_daemon(EXPERTS)
    sock = raw_connection(daemon)
    answer = result(sock, "lenient", {"text": "hello"})
    assert answer["opinions"] == {"language": "en", "polite": True, "length": 5}
    assert error_entry(answer, "failing") == {"code": "expert_failed", "type": "builtins.ValueError",
                                              "message": "ValueError: cannot judge 'hello'"}
    assert set(answer["errors"]) == {"failing"}
    # An ad-hoc target continues past a failure too.
    answer = result(sock, "failing, length", {"text": "abc"})
    assert answer["opinions"] == {"length": 3} and error_entry(answer, "failing")["code"] == "expert_failed"
    # An expert that fails on this document (polite with no language opinion: a KeyError) is an error alone.
    answer = result(sock, "polite + length", {"text": "abc"})
    assert answer["opinions"] == {"length": 3}
    assert error_entry(answer, "polite")["type"] == "builtins.KeyError"


def test_on_error_stop_marks_the_experts_of_later_stages_skipped(make_daemon):
    daemon = make_daemon(EXPERTS)
    sock = raw_connection(daemon)
    answer = result(sock, "strict", {"text": "hello"})
    assert answer["opinions"] == {"language": "en"}
    assert error_entry(answer, "failing")["code"] == "expert_failed"
    for name in ("polite", "length"):
        entry = error_entry(answer, name)
        assert entry["code"] == "skipped" and "failing" in entry["message"] and "stop" in entry["message"]
    # Every expert of the plan is under opinions or errors.
    assert set(answer["opinions"]) | set(answer["errors"]) == {"language", "failing", "polite", "length"}


def test_the_requests_on_error_overrides_the_pipelines(make_daemon):
    daemon = make_daemon(EXPERTS)
    sock = raw_connection(daemon)
    answer = result(sock, "lenient", {"text": "hello"}, {"on_error": "stop"})
    assert answer["opinions"] == {"language": "en"}
    assert {name: entry["code"] for name, entry in answer["errors"].items()} == {
        "failing": "expert_failed", "polite": "skipped", "length": "skipped"}
    answer = result(sock, "strict", {"text": "hello"}, {"on_error": "continue"})
    assert answer["opinions"] == {"language": "en", "polite": True, "length": 5}
    assert set(answer["errors"]) == {"failing"}
    answer = result(sock, "failing, length", {"text": "abc"}, {"on_error": "stop"})  # (ad hoc: continue by default)
    assert answer["opinions"] == {} and answer["errors"]["length"]["code"] == "skipped"


def test_a_bad_on_error_option_is_a_bad_request(make_daemon):
    daemon = make_daemon(EXPERTS, workers=1)
    sock = raw_connection(daemon)
    for options in ({"on_error": "halt"}, {"on_error": 1}, {"on_error": None}, {"on_error": ["stop"]}):
        kind, error = ask(sock, "mod", {"text": "hello"}, options)
        assert kind == "error" and error["code"] == "bad_request" and "on_error" in error["message"], error
        assert result(sock, "mod", {"text": "hello"})["opinions"]["polite"] is True


def test_an_opinion_that_cannot_be_sent_is_that_experts_error_alone(make_daemon):
    daemon = make_daemon({**EXPERTS, "unsendable": "docexperts:unsendable"})
    sock = raw_connection(daemon)
    kind, answer = ask(sock, "language, unsendable, length", {"text": "hello"})
    assert kind == "result", answer
    assert answer["opinions"] == {"language": "en", "length": 5}
    assert answer["errors"]["unsendable"]["code"] == "bad_result"


# ------------------------------------------------------------------------------------------ request-level errors
REQUEST_PROBLEMS = [  # (body, error code, words of its message)
    (["language, nosuch", {"text": "x"}], "unknown_expert", ["'nosuch'", "known:", "language", "mod"]),
    (["lenguage", {"text": "x"}], "unknown_expert", ["did you mean 'language'"]),
    (["language,,polite", {"text": "x"}], "bad_request", ["stage 2 is empty"]),
    (["language + ", {"text": "x"}], "bad_request", ["empty name"]),
    (["", {"text": "x"}], "bad_request", ["empty"]),
    (["bad name!", {"text": "x"}], "bad_request", ["not a name"]),
    (["language, length + language", {"text": "x"}], "bad_request", ["language is named twice"]),
    (["mod, language", {"text": "x"}], "bad_request", ["language is named twice"]),
    (["mod + length", {"text": "x"}], "bad_request", ["cannot share a stage"]),
    (["mod", ["not", "a", "map"]], "bad_request", ["document must be a map"]),
    (["mod", "text"], "bad_request", ["document must be a map"]),
    (["mod", {"opinions": ["a"]}], "bad_request", ["'opinions'", "not a map"]),
    (["mod", {"errors": 3}], "bad_request", ["'errors'", "not a map"]),
    (["mod", {"text": "x"}, ["stop"]], "bad_request", ["options must be a map"]),
    ([3, {"text": "x"}], "bad_request", ["target must be a string"]),
    (["mod"], "bad_request", ["[target, document]"]),
    (["mod", {}, {}, {}], "bad_request", ["[target, document]"]),
    ({"target": "mod"}, "bad_request", ["[target, document]"]),
]


def test_a_request_level_problem_is_an_error_frame_and_the_daemon_keeps_serving(make_daemon):
    daemon = make_daemon(EXPERTS, workers=1)
    (pid,) = daemon.wait_workers(1)
    sock = raw_connection(daemon)
    for body, code, words in REQUEST_PROBLEMS:  # (on one connection: it goes on after each)
        kind, error = ask_raw(sock, body)
        assert kind == "error" and error["code"] == code, (body, error)
        for word in words:
            assert word in error["message"], (body, error["message"])
        assert result(sock, "mod", {"text": "hello"})["opinions"] == {"language": "en", "polite": True}
    assert daemon.worker_pids() == {pid}  # (none of them cost a worker)


# ------------------------------------------------------------------------------------------ timeouts
def test_a_stage_past_its_timeout_answers_with_what_was_done_and_its_worker_is_replaced(make_daemon):
    daemon = make_daemon({**EXPERTS, "sleeper": {"function": "docexperts:sleeper", "timeout": "1s"},
                          "pipeline:slow": {"stages": "worker_pid + language, sleeper, polite"}}, workers=2)
    sock = raw_connection(daemon)
    before = daemon.wait_workers(2)
    began = time.monotonic()
    answer = result(sock, "slow", {"text": "hello", "sleep": 30})
    took = time.monotonic() - began
    assert 0.9 <= took < 3, took  # the sleeper's own 1s timeout, not the plan's (60s + 1s + 60s)
    assert answer["opinions"]["language"] == "en"
    interrupted = answer["opinions"]["worker_pid"]
    assert interrupted in before
    assert error_entry(answer, "sleeper")["code"] == "timeout"
    assert error_entry(answer, "polite")["code"] == "skipped"
    # The interrupted worker retires; a fresh one takes its place.
    after = daemon.wait_workers(2, exclude={interrupted})
    assert interrupted not in after and len(after & before) == 1
    assert wait_until(lambda: "interrupted" in daemon.log)
    # The same connection goes on, with another worker.
    assert result(sock, "worker_pid, mod", {"text": "hello"})["opinions"]["worker_pid"] in after
    # A stage that ends in time is not interrupted.
    assert result(raw_connection(daemon), "language, sleeper", {"sleep": 0.05})["opinions"]["sleeper"] == "woke"


def test_an_expert_that_swallows_the_interruption_gets_the_masters_timeout_and_the_daemon_recovers(make_daemon):
    daemon = make_daemon({**EXPERTS, "stubborn": {"function": "docexperts:stubborn", "timeout": "1s"},
                          "pipeline:stuck": {"stages": "language, stubborn", "timeout": "2s"}}, workers=2)
    before = daemon.wait_workers(2)
    sock = raw_connection(daemon)
    began = time.monotonic()
    kind, error = ask(sock, "stuck", {"text": "hello"})
    took = time.monotonic() - began
    assert kind == "error" and error["code"] == "timeout", error
    assert 1.9 <= took < 5, took  # the pipeline's own 2s timeout
    # The worker was killed and replaced.
    assert wait_until(lambda: len(daemon.worker_pids()) == 2 and len(daemon.worker_pids() & before) == 1,
                      timeout=20), (before, daemon.worker_pids())
    assert result(raw_connection(daemon), "mod", {"text": "hello"})["opinions"]["polite"] is True


def test_a_pipelines_own_timeout_cuts_the_stage_in_hand_and_answers_what_was_done(make_daemon):
    daemon = make_daemon({**EXPERTS, "sleeper": "docexperts:sleeper",
                          "pipeline:capped": {"stages": "language, sleeper, length", "timeout": "1.5s"}})
    began = time.monotonic()
    kind, answer = ask(raw_connection(daemon), "capped", {"text": "hello", "sleep": 30})
    took = time.monotonic() - began
    assert kind == "result", answer  # (before the master's deadline: a reply, not a timeout error)
    assert 1.0 <= took < 1.5, took
    assert answer["opinions"] == {"language": "en"}  # type: ignore[index]
    assert {name: entry["code"] for name, entry in answer["errors"].items()} == {  # type: ignore[index]
        "sleeper": "timeout", "length": "skipped"}


def test_an_expert_past_its_own_timeout_is_interrupted_even_in_a_stage_with_a_longer_one(make_daemon):
    daemon = make_daemon({**EXPERTS, "sleeper": {"function": "docexperts:sleeper", "timeout": "0.5s"}},
                         workers=1, timeout="2s")
    began = time.monotonic()
    answer = result(raw_connection(daemon), "language, length + sleeper", {"text": "hello", "sleep": 30})
    took = time.monotonic() - began
    assert answer["opinions"] == {"language": "en", "length": 5}
    assert answer["errors"]["sleeper"]["code"] == "timeout"
    assert took < 1.5, took  # sleeper's own 0.5s, as when a helper runs it; not length's 2s


# ------------------------------------------------------------------------------------------ fan-out
def cores_free_now(seconds: float = 0.05) -> float:
    """How many cores two CPU-bound processes get at this moment (about 1 to 2 on a 2-core machine)."""
    began = time.monotonic()
    children = []
    for _ in range(2):
        pid = os.fork()
        if pid == 0:  # (the child burns and leaves at once, running nothing of pytest's)
            end = time.thread_time() + seconds
            while time.thread_time() < end:
                pass
            os._exit(0)
        children.append(pid)
    for pid in children:
        os.waitpid(pid, 0)
    return 2 * seconds / (time.monotonic() - began)


def test_a_stage_of_slow_experts_runs_on_several_idle_workers_in_less_than_the_sum(make_daemon):
    daemon = make_daemon(BURNERS, workers=3)
    sock = raw_connection(daemon)
    document = {"cpu": 0.05}
    for _ in range(3):  # each worker measures the experts before it offers them to others
        result(sock, SEQUENTIAL, document)
        result(sock, PARALLEL, document)
    # The machine is shared: while a neighbour holds one of its two cores nothing CPU-bound runs in parallel,
    # here or anywhere.  Rounds are measured until one is clearly faster than the sum; the test fails if a
    # round that had a second core free from its start to its end was not (it is skipped if none had one).
    # In every round, sharing must cost little.
    rounds = []
    for _ in range(5):
        cores = cores_free_now()
        parallel, sequential, spread = [], [], []
        for _ in range(5):  # interleaved: the machine's load falls on both alike
            took, answer = timed(sock, PARALLEL, document)
            parallel.append(took)
            spread.append(len(set(answer["opinions"].values())))
            took, answer = timed(sock, SEQUENTIAL, document)
            sequential.append(took)
            assert len(set(answer["opinions"].values())) == 1  # (a stage of one expert is never shared)
        cores = min(cores, cores_free_now())
        assert max(spread) > 1, spread  # (shared with other workers: the answers come from several)
        medians = statistics.median(parallel), statistics.median(sequential)
        rounds.append((round(cores, 2), *(round(median, 3) for median in medians)))
        assert medians[0] < 1.25 * medians[1], rounds
        if medians[0] < 0.8 * medians[1]:
            return
    if all(cores < 1.5 for cores, _, _ in rounds):  # (two processes got clearly less than two cores)
        pytest.skip(f"no second core was free throughout a round: (cores, parallel, sequential) {rounds}")
    pytest.fail(f"a shared stage never took clearly less than the sum: (cores, parallel, sequential) {rounds}")


def test_with_one_worker_a_parallel_stage_runs_in_that_worker(make_daemon):
    daemon = make_daemon(BURNERS, workers=1)
    (pid,) = daemon.wait_workers(1)
    sock = raw_connection(daemon)
    for _ in range(4):
        answer = result(sock, PARALLEL, {"cpu": 0.005, "id": 1})
        assert answer == {"cpu": 0.005, "id": 1, "opinions": {"burn_a": pid, "burn_b": pid, "burn_c": pid}}


def test_with_no_idle_worker_the_stage_is_not_shared_and_still_answers(make_daemon):
    daemon = make_daemon({**BURNERS, "sleeper": "docexperts:sleeper"}, workers=2, linger="0")
    sock = raw_connection(daemon)
    for _ in range(4):  # both workers measure the experts (with linger off, requests alternate between them)
        result(sock, PARALLEL, {"cpu": 0.01})
    assert any(len(set(result(sock, PARALLEL, {"cpu": 0.01})["opinions"].values())) > 1 for _ in range(5))
    # One worker sleeps: the other, asked the same stage, finds no idle worker and runs it all.
    holder = raw_connection(daemon)
    holder.sendall(protocol.encode_call(1, "sleeper", [{"sleep": 1.0}], {}))
    assert wait_until(lambda: any(w["state"] == "busy" for w in status(daemon)["workers"]))
    began = time.monotonic()
    for _ in range(3):
        assert len(set(result(sock, PARALLEL, {"cpu": 0.01})["opinions"].values())) == 1
    assert time.monotonic() - began < 1.0  # (all three answered while the other worker slept)
    assert protocol.unpack(protocol.read_frame(holder, protocol.MAX_BODY)[2]) == "woke"


def test_a_shared_expert_past_its_timeout_retires_its_helper_and_not_the_asker(make_daemon):
    daemon = make_daemon({**BURNERS, "sleeper": {"function": "docexperts:sleeper", "timeout": "0.5s"}},
                         workers=2, linger="0")
    sock = raw_connection(daemon)
    for _ in range(4):  # both workers measure burn_a (~50 ms, kept) and sleeper (~10 ms, offered)
        result(sock, "burn_a + sleeper", {"cpu": 0.05, "sleep": 0.01})
    workers = daemon.wait_workers(2)
    began = time.monotonic()
    answer = result(sock, "burn_a + sleeper", {"cpu": 0.05, "sleep": 30})
    assert time.monotonic() - began < 2
    asker = answer["opinions"]["burn_a"]
    assert answer["errors"]["sleeper"]["code"] == "timeout"
    (helper,) = workers - {asker}
    after = daemon.wait_workers(2, exclude={helper})
    assert asker in after  # (the asker's own code was never interrupted: it serves on)
    assert "interrupted at its timeout (sleeper)" in daemon.log


def test_a_document_too_large_to_hand_over_at_once_is_run_by_the_asker_alone(make_daemon):
    daemon = make_daemon(BURNERS, workers=3)
    sock = raw_connection(daemon)
    for _ in range(4):
        result(sock, PARALLEL, {"cpu": 0.005})
    assert any(len(set(result(sock, PARALLEL, {"cpu": 0.005})["opinions"].values())) > 1 for _ in range(5))
    big = {"cpu": 0.005, "text": "x" * (4 << 20), "items": list(range(1000))}
    for _ in range(3):
        answer = result(sock, PARALLEL, big)
        assert answer["text"] == big["text"] and answer["items"] == big["items"]
        assert len(set(answer["opinions"].values())) == 1  # (it does not fit in a socket pair's buffer)


def test_no_deadlock_when_every_worker_runs_a_parallel_stage_at_once(make_daemon):
    daemon = make_daemon(BURNERS, workers=2)
    document = {"cpu": 0.01}

    def client(number: int) -> list[dict]:
        sock = raw_connection(daemon, timeout=60)
        try:
            return [result(sock, PARALLEL, {**document, "client": number, "round": i}) for i in range(10)]
        finally:
            sock.close()

    warm = raw_connection(daemon)
    for _ in range(4):
        result(warm, PARALLEL, document)
    with ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(client, number) for number in range(8)]
        answers = [future.result(timeout=90) for future in futures]
    pids = daemon.worker_pids()
    for number, rounds in enumerate(answers):
        assert len(rounds) == 10
        for i, answer in enumerate(rounds):
            assert answer["client"] == number and answer["round"] == i
            assert set(answer["opinions"]) == {"burn_a", "burn_b", "burn_c"}
            assert set(answer["opinions"].values()) <= pids
    assert daemon.proc.poll() is None


def test_a_helper_that_dies_mid_request_leaves_the_asker_to_run_its_experts(make_daemon):
    # exit_in_helper exits its worker when a helper runs it (not the worker that ran stage 1), so the first
    # request that shares the stage loses its helper, every time.
    daemon = make_daemon({**BURNERS, "exit_in_helper": "docexperts:exit_in_helper"}, workers=2, linger="0")
    target = "worker_pid, burn_a + exit_in_helper"
    first = daemon.wait_workers(2)
    sock = raw_connection(daemon)
    lost = False
    for _ in range(6):
        answer = result(sock, target, {"cpu": 0.03})
        opinions = answer["opinions"]
        assert set(opinions) == {"worker_pid", "burn_a", "exit_in_helper"} and "errors" not in answer
        assert opinions["exit_in_helper"] == opinions["worker_pid"]  # (run by the asker)
        if daemon.worker_pids() != first:
            lost = True
            break
    assert lost, "no helper ever ran exit_in_helper: the stage was never shared"
    daemon.wait_workers(2, exclude=first - daemon.worker_pids())
    assert result(sock, target, {"cpu": 0.03})["opinions"]["burn_a"] in daemon.worker_pids()


def test_a_helper_killed_mid_request_leaves_the_asker_to_run_its_experts(make_daemon, short_dir):
    daemon = make_daemon({**BURNERS, "note_pid": "docexperts:note_pid"}, workers=2, linger="0")
    sock = raw_connection(daemon)
    for _ in range(4):  # both workers measure the experts
        result(sock, "burn_a + burn_b", {"cpu": 0.01})
    pid_file = short_dir / "asker.pid"
    document = {"cpu": 0.5, "pid_file": str(pid_file)}
    workers = daemon.wait_workers(2)
    answers: list[dict] = []
    caller = threading.Thread(target=lambda: answers.append(result(sock, "note_pid, burn_a + burn_b", document)))
    caller.start()
    try:
        # Stage 1 names the worker that runs the request; the other one, busy too, is its helper for stage 2.
        assert wait_until(pid_file.exists)
        (helper,) = workers - {int(pid_file.read_text())}
        assert wait_until(lambda: all(w["state"] == "busy" for w in status(daemon)["workers"]), timeout=2)
        os.kill(helper, signal.SIGKILL)
    finally:
        caller.join(30)
    assert not caller.is_alive() and len(answers) == 1
    asker = answers[0]["opinions"]["note_pid"]
    assert answers[0]["opinions"] == {"note_pid": asker, "burn_a": asker, "burn_b": asker}
    assert "errors" not in answers[0]
    daemon.wait_workers(2, exclude={helper})


# ------------------------------------------------------------------------------------------ reads=, reloads
def test_a_pipeline_whose_reader_comes_before_what_it_reads_stops_start_up_with_one_line(short_dir):
    config = write_config(short_dir, {**EXPERTS, "pipeline:backwards": {"stages": "polite, language"}})
    done = run_expertd("--config", str(config), "--socket", str(short_dir / "x.sock"))
    assert done.returncode == 3, done.stderr
    assert done.stderr == (f"expertd: {config}: [pipeline:backwards] stages: polite (stage 1) reads "
                           "opinions.language, which only a later stage (2) writes; put language in an earlier stage\n")
    assert not (short_dir / "x.sock").exists()


def _reload(daemon: Daemon, generation: int | None) -> dict:
    daemon.send_signal(signal.SIGHUP)
    assert wait_until(lambda: (status(daemon)["last_reload"] or {}).get("ok") is not None
                      and not status(daemon)["reloading"], timeout=30)
    if generation is not None:
        assert wait_until(lambda: status(daemon)["generation"] == generation, timeout=30)
    return status(daemon)["last_reload"]


def test_a_reload_whose_pipeline_reads_too_early_keeps_the_old_generation_serving(make_daemon):
    daemon = make_daemon(EXPERTS)
    write_config(daemon.config.parent, {**EXPERTS, "pipeline:mod": {"stages": "polite, language"}})
    last = _reload(daemon, None)
    assert last["ok"] is False
    assert "[pipeline:mod] stages: polite (stage 1) reads opinions.language" in last["error"]
    assert "reload failed; generation 1 keeps serving" in daemon.log
    assert status(daemon)["generation"] == 1
    assert result(raw_connection(daemon), "mod", {"text": "hello"})["opinions"] == {"language": "en", "polite": True}


def test_a_reloaded_pipeline_runs_its_new_stages(make_daemon):
    daemon = make_daemon(EXPERTS)
    sock = raw_connection(daemon)
    assert set(result(sock, "mod", {"text": "hello"})["opinions"]) == {"language", "polite"}
    write_config(daemon.config.parent, {**EXPERTS, "pipeline:mod": {"stages": "language, length + shout"},
                                        "pipeline:fresh": {"stages": "length"}})
    assert _reload(daemon, 2)["ok"] is True
    assert wait_until(lambda: set(result(raw_connection(daemon), "mod", {"text": "Hi"})["opinions"]) ==
                      {"language", "length", "shout"}, timeout=20)
    assert result(raw_connection(daemon), "fresh", {"text": "Hi"})["opinions"] == {"length": 2}
    assert result(raw_connection(daemon), "mod", {"text": "Hi"})["opinions"] == {"language": "en", "length": 2,
                                                                                  "shout": 0.5}
    # A pipeline the reload added is counted under its name (by the worker, once the reply is out: this
    # status may come first, so it is asked until it shows).
    assert wait_until(lambda: status(daemon)["pipelines"].get("fresh", {}).get("requests") == 1, timeout=5)


# ------------------------------------------------------------------------------------------ metrics, status
def test_pipeline_requests_are_counted_by_pipeline_and_outcome_in_metrics_and_status(make_daemon):
    daemon = make_daemon({**EXPERTS, "sleeper": {"function": "docexperts:sleeper", "timeout": "0.5s"},
                          "pipeline:slow": {"stages": "language, sleeper, polite"}}, workers=2)
    sock = raw_connection(daemon)
    result(sock, "mod", {"text": "hello"})
    result(sock, "mod", {"text": "bonjour"})
    result(sock, "lenient", {"text": "hello"})
    result(sock, "language, length", {"text": "hello"})
    assert ask(sock, "language, nosuch", {})[1]["code"] == "unknown_expert"  # type: ignore[index]
    assert result(sock, "slow", {"sleep": 10})["errors"]["sleeper"]["code"] == "timeout"
    seen = metrics(daemon)
    requests = 'expertd_pipeline_requests_total{pipeline="%s",outcome="%s"}'
    assert seen[requests % ("mod", "ok")] == 2
    assert seen[requests % ("lenient", "expert_errors")] == 1
    assert seen[requests % ("slow", "timeout")] == 1
    assert seen[requests % ("(ad hoc)", "ok")] == 1
    assert seen[requests % ("(ad hoc)", "unknown_expert")] == 1
    assert seen[requests % ("strict", "ok")] == 0  # (a named pipeline is shown before it is asked for)
    assert seen['expertd_pipeline_duration_seconds_count{pipeline="mod"}'] == 2
    assert seen['expertd_pipeline_duration_seconds_bucket{pipeline="mod",le="+Inf"}'] == 2
    assert seen['expertd_pipeline_duration_seconds_sum{pipeline="mod"}'] > 0
    assert seen['expertd_pipeline_duration_seconds_count{pipeline="(ad hoc)"}'] == 2
    pipelines = status(daemon)["pipelines"]
    assert {name: (entry["requests"], entry["outcomes"]) for name, entry in pipelines.items()} == {
        "mod": (2, {"ok": 2}), "lenient": (1, {"expert_errors": 1}), "slow": (1, {"timeout": 1}),
        "(ad hoc)": (2, {"ok": 1, "unknown_expert": 1})}
    assert all(entry["mean_ms"] > 0 for entry in pipelines.values())
    assert pipelines["slow"]["mean_ms"] >= 400


def test_each_expert_run_inside_a_pipeline_counts_as_a_call_of_that_expert(make_daemon):
    daemon = make_daemon(EXPERTS, workers=1)
    sock = raw_connection(daemon)
    for _ in range(3):
        result(sock, "mod", {"text": "hello"})
    result(sock, "strict", {"text": "hello"})  # language and failing run; polite and length are skipped
    seen = metrics(daemon)
    assert seen['expertd_requests_total{expert="language"}'] == 4
    assert seen['expertd_requests_total{expert="polite"}'] == 3
    assert seen['expertd_requests_total{expert="failing"}'] == 1
    assert seen['expertd_errors_total{expert="failing",code="expert_failed"}'] == 1
    assert seen['expertd_requests_total{expert="length"}'] == 0
    assert seen['expertd_request_duration_seconds_count{expert="language"}'] == 4


def test_a_shared_stage_counts_one_pipeline_request_not_one_per_helper(make_daemon):
    daemon = make_daemon(BURNERS, workers=3)
    sock = raw_connection(daemon)
    shared = 0
    for _ in range(8):
        shared += len(set(result(sock, "par", {"cpu": 0.01})["opinions"].values())) > 1
    assert shared  # (else this test shows nothing)
    pipelines = status(daemon)["pipelines"]
    assert pipelines["par"]["requests"] == 8
    assert "(ad hoc)" not in pipelines, pipelines


def test_a_pipeline_timed_out_by_the_master_counts_as_that_pipelines_timeout(make_daemon):
    daemon = make_daemon({**EXPERTS, "stubborn": {"function": "docexperts:stubborn", "timeout": "0.5s"},
                          "pipeline:stuck": {"stages": "language, stubborn", "timeout": "1s"}}, workers=1)
    assert ask(raw_connection(daemon), "stuck", {"text": "hello"})[1]["code"] == "timeout"  # type: ignore[index]
    seen = metrics(daemon)
    assert seen.get('expertd_errors_total{expert="(unknown)",code="timeout"}', 0) == 0
    assert seen['expertd_pipeline_requests_total{pipeline="stuck",outcome="timeout"}'] == 1


# ------------------------------------------------------------------------------------------ batched experts
def test_a_pipeline_of_a_batched_expert_is_never_gathered_into_a_batch_of_calls(make_daemon):
    daemon = make_daemon({"batched_length": "docexperts:batched_length", "sleeper": "docexperts:sleeper",
                          "pipeline:blen": {"stages": "batched_length"}}, workers=1)
    holder = raw_connection(daemon)
    holder.sendall(protocol.encode_call(1, "sleeper", [{"sleep": 1.0}], {}))  # the only worker sleeps meanwhile

    def pipeline(n: int) -> object:
        return ask(raw_connection(daemon, timeout=30), "blen" if n % 2 else "batched_length", {"text": "x" * n})

    def call(n: int) -> object:
        sock = raw_connection(daemon, timeout=30)
        sock.sendall(protocol.encode_call(n, "batched_length", [{"text": "x" * n}], {}))
        return reply_of(sock, n)

    with ThreadPoolExecutor(12) as pool:
        pipelines = [pool.submit(pipeline, n) for n in range(1, 7)]
        calls = [pool.submit(call, n) for n in range(11, 17)]
        assert protocol.unpack(protocol.read_frame(holder, protocol.MAX_BODY)[2]) == "woke"
        for n, future in zip(range(1, 7), pipelines, strict=True):
            assert future.result(timeout=30) == ("result", {"text": "x" * n, "opinions": {"batched_length": n}})
        for n, future in zip(range(11, 17), calls, strict=True):
            assert future.result(timeout=30) == ("result", n)


# ------------------------------------------------------------------- review findings
def test_an_expert_that_kills_its_worker_inside_pipelines_is_quarantined_and_so_are_pipelines_that_run_it(
        make_daemon):
    daemon = make_daemon({**EXPERTS, "crash": "docexperts:crash", "pipeline:fatal": {"stages": "language, crash"}},
                         quarantine_after=3, quarantine_window="30s", quarantine_time="30s")
    for target in ("fatal", "language,crash", "language, crash"):  # (the crash is the expert's, whatever names it)
        with raw_connection(daemon) as sock:  # (a connection whose worker died mid-request is closed)
            kind, error = ask(sock, target, {"text": "hello"})
            assert kind == "error" and error["code"] == "worker_lost"  # type: ignore[index]

    def refused() -> bool:
        with raw_connection(daemon) as sock:
            return ask(sock, "fatal", {"text": "hello"})[1].get("code") == "quarantined"  # type: ignore[union-attr]

    assert wait_until(refused, timeout=10)
    with raw_connection(daemon) as sock:
        kind, error = ask(sock, "language , crash", {"text": "hello"})
        assert kind == "error" and error["code"] == "quarantined" and error["expert"] == "crash"  # type: ignore
        assert "crash" in error["message"]  # type: ignore[index]
        assert result(sock, "mod", {"text": "hello"})["opinions"] == {"language": "en", "polite": True}
    assert "quarantine" in daemon.log and "crash" in daemon.log


def test_in_a_stage_of_two_the_second_expert_gets_its_own_timeout_not_the_first_ones(make_daemon):
    daemon = make_daemon({"nap": {"function": "docexperts:nap", "timeout": "1s"},
                          "snooze": {"function": "docexperts:snooze", "timeout": "10s"}}, workers=1)
    with raw_connection(daemon) as sock:
        started = time.monotonic()
        document = result(sock, "nap + snooze", {"naps": {"nap": 0.05, "snooze": 1.5}})
    assert document["opinions"] == {"nap": "nap done", "snooze": "snooze done"}, document
    assert "errors" not in document and time.monotonic() - started >= 1.5


def test_a_helper_past_its_timeout_is_the_one_marked_and_the_askers_own_opinion_is_kept(make_daemon):
    daemon = make_daemon({"nap": {"function": "docexperts:nap", "timeout": "1s"},
                          "snooze": {"function": "docexperts:snooze", "timeout": "1s"},
                          "worker_pid": "docexperts:worker_pid"}, workers=3)
    with raw_connection(daemon) as sock:
        for _ in range(3):  # (each worker learns that both take long enough to share)
            result(sock, "nap + snooze", {"naps": {"nap": 0.1, "snooze": 0.05}})
        document = result(sock, "nap + snooze", {"naps": {"nap": 0.1, "snooze": 5}})
    # The longer one (nap, as measured) stays with the asker; snooze goes to a helper and runs past its timeout.
    assert document["opinions"] == {"nap": "nap done"}, document
    assert document["errors"]["snooze"]["code"] == "timeout"


def test_a_call_after_a_pipeline_is_not_cut_short_by_the_pipelines_timer(make_daemon):
    daemon = make_daemon({"nap": {"function": "docexperts:nap", "timeout": "1s"},
                          "native_sleep": "docexperts:native_sleep"}, workers=1)
    with raw_connection(daemon) as sock:
        assert result(sock, "nap", {})["opinions"] == {"nap": "nap done"}
        sock.sendall(protocol.encode_call(8, "native_sleep", [{"seconds": 2}], {}))
        kind, _id, body = protocol.read_frame(sock, protocol.MAX_BODY)
    assert kind == protocol.RESULT and protocol.unpack(body) >= 1.9  # (a timer left running cut it at 1s)


def test_a_client_cannot_ask_for_a_helpers_reply(make_daemon):
    daemon = make_daemon(EXPERTS)
    with raw_connection(daemon) as sock:
        document = result(sock, "mod", {"text": "hello", "id": 42}, {"helper": True})
    assert document["id"] == 42 and document["opinions"] == {"language": "en", "polite": True}
    assert metrics(daemon).get('expertd_pipeline_requests_total{pipeline="mod",outcome="ok"}') == 1
