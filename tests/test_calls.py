"""Calling experts through the real client against a real daemon."""

import threading

import pytest

from expertd.client import Client
from expertd.errors import BadRequest, BadResult, ExpertFailed, RemoteError, UnknownExpert


def test_positional_and_keyword_calls(daemon):
    client = daemon.client()
    assert client.call("fib", 5) == 8
    assert client.call("fib", n=5) == 8
    assert client.fib(5) == 8
    assert client.fib(n=5) == 8
    assert client.add(2, b=3) == 5
    assert client.square(n=2) == 4


def test_values_round_trip(daemon):
    value = {
        "bytes": b"\x00\xffraw",
        "nested": [[1, [2, [3, {"deep": [None, True, False]}]]]],
        "map": {"a": 1.5, "b": "ünïcode", "c": -(2**63)},
        "empty": [{}, [], "", b""],
    }
    result = daemon.client().call("echo", value, 7, key=value)
    assert result == {"args": [value, 7], "kwargs": {"key": value}}


def test_many_requests_on_one_connection(daemon):
    client = daemon.client(pool_size=1)
    for i in range(500):
        assert client.call("add", i, 1) == i + 1
    assert len(client._pool) == 1  # the same connection served all of them


def test_opinion_method(daemon):
    assert daemon.client().opinion("document_length", {"text": "four"}) == {"chars": 4, "seen_opinions": []}


def test_unknown_expert_is_a_structured_error(daemon):
    with pytest.raises(UnknownExpert) as caught:
        daemon.client().call("nonexistent", 1)
    assert caught.value.code == "unknown_expert"
    assert "nonexistent" in str(caught.value) and "fib" in str(caught.value)


def test_expert_exception_carries_type_and_remote_traceback(daemon):
    client = daemon.client()
    with pytest.raises(ExpertFailed) as caught:
        client.call("boom", "the model is on fire")
    error = caught.value
    assert error.remote_type == "builtins.ValueError"
    assert "the model is on fire" in error.message
    assert error.expert == "boom"
    assert "testexperts.py" in error.remote_traceback and "raise ValueError" in error.remote_traceback
    assert client.call("add", 1, 1) == 2  # the worker survived


def test_wrong_arity_is_rejected_before_the_call(daemon):
    with pytest.raises(BadRequest) as caught:
        daemon.client().call("fib", 1, 2, 3)
    assert "fib(n: int) -> int" in str(caught.value)
    with pytest.raises(BadRequest):
        daemon.client().call("fib", m=1)


def test_type_error_inside_an_expert_is_its_failure_not_a_bad_request(daemon):
    client = daemon.client()
    with pytest.raises(ExpertFailed) as caught:
        client.call("type_error", "abc")
    assert caught.value.remote_type == "builtins.TypeError"
    assert "testexperts.py" in caught.value.remote_traceback
    with pytest.raises(BadRequest) as caught:
        client.call("type_error")  # missing argument: the call itself does not fit
    assert "type_error(text)" in str(caught.value)


def test_arguments_are_checked_under_a_decorator(daemon):
    client = daemon.client()
    assert client.call("wrapped", "ab", times=2) == "abab"
    with pytest.raises(BadRequest) as caught:
        client.call("wrapped", "ab", colour="red")
    assert "wrapped(text, times=1)" in str(caught.value) and "colour" in str(caught.value)


def test_system_exit_inside_an_expert_does_not_kill_the_worker(daemon):
    client = daemon.client()
    before = daemon.worker_pids()
    with pytest.raises(ExpertFailed):
        client.call("exit_worker")
    assert client.call("add", 2, 2) == 4
    assert daemon.worker_pids() == before


def test_unsendable_result_is_reported(daemon):
    with pytest.raises(BadResult) as caught:
        daemon.client().call("unsendable")
    assert "cannot be sent" in str(caught.value)


def test_remote_errors_share_one_base(daemon):
    with pytest.raises(RemoteError):
        daemon.client().call("boom")


def test_hooks_run_before_fork_in_the_generation_parent_and_after_fork_in_the_worker(daemon):
    info = daemon.client().call("hooks")
    # before_fork ran in the process that loaded the generation and forks its workers, never in the master
    assert info["master"] in daemon.generation_parent_pids() and info["master"] != daemon.proc.pid
    assert info["worker"] == info["me"]  # after_fork ran in the worker that answers
    assert info["parent"] == daemon.proc.pid  # workers are the master's children: it supervises them


def test_concurrent_clients_use_several_workers(make_daemon):
    daemon = make_daemon(workers=3)
    pids, errors = set(), []

    def caller():
        try:
            client = daemon.client()
            for _ in range(5):
                pids.add(client.call("slow", 0.05))
        except Exception as exc:  # collected, asserted below
            errors.append(exc)

    threads = [threading.Thread(target=caller) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    assert len(pids) == 3


def test_one_client_shared_between_threads(daemon):
    client = daemon.client()
    results, errors = {}, []

    def caller(k):
        try:
            results[k] = [client.call("add", k, i) for i in range(100)]
        except Exception as exc:
            errors.append(exc)

    threads = [threading.Thread(target=caller, args=(k,)) for k in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    assert results == {k: [k + i for i in range(100)] for k in range(8)}


def test_idle_connections_do_not_pin_workers(make_daemon):
    """Many connected, idle clients must not take the (few) workers out of service."""
    daemon = make_daemon(workers=2)
    idle = [daemon.client() for _ in range(20)]
    for client in idle:
        client.ping()  # each holds an open connection from now on
    busy = daemon.client()
    assert [busy.call("add", i, 1) for i in range(50)] == [i + 1 for i in range(50)]
    for client in idle:  # and every idle client still works afterwards
        assert client.call("add", 1, 1) == 2


def test_client_survives_fork(daemon):
    import os

    client = daemon.client()
    assert client.call("add", 1, 2) == 3
    child = os.fork()
    if child == 0:
        try:
            os._exit(0 if client.call("add", 20, 22) == 42 else 1)
        except BaseException:
            os._exit(2)
    _, status = os.waitpid(child, 0)
    assert os.WEXITSTATUS(status) == 0
    assert client.call("add", 2, 3) == 5  # the parent's pooled connection is intact


def test_client_reconnects_after_daemon_closes_idle_connection(make_daemon):
    daemon = make_daemon(workers=1)
    client = daemon.client()
    assert client.call("add", 1, 1) == 2
    # Restart the daemon on the same socket: the pooled connection is now dead.
    assert daemon.stop() == 0
    daemon.start()
    assert client.call("add", 2, 2) == 4


def test_no_daemon_gives_a_clear_connect_error(short_dir):
    from expertd.errors import ConnectError

    missing = short_dir / "nothing.sock"
    with pytest.raises(ConnectError) as caught:
        Client(str(missing)).ping()
    assert str(missing) in str(caught.value) and "daemon running" in str(caught.value)
