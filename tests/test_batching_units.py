"""Batching's pure parts, without a daemon: when a free worker waits, who goes in a batch, the batch
figures, one call of a batched expert for many callers, and a batch over the master-worker channel."""

from __future__ import annotations

import inspect
import os
import socket
import struct
from collections import deque
from types import SimpleNamespace

import pytest

from expertd import expert, ipc
from expertd.batches import call_batch
from expertd.batching import Batcher, BatchFigures, batch_target, hold_for_company
from expertd.calls import _failure
from expertd.config import load_config
from expertd.connections import BUSY, CLOSED, IDLE, QUEUED, Connection
from expertd.errors import BadRequest, BadResult, ExpertFailed
from expertd.loader import LoadedExpert
from expertd.serving import Serving


# ------------------------------------------------------------------------------------------ hold_for_company
@pytest.mark.parametrize("waiting, target, expected, held_for, batch_delay, holds", [
    (1, 32, 0, 0.0, 0.002, False),    # a lone caller: nobody else is expected, it goes at once
    (1, 32, 1, 0.0, 0.002, True),     # a caller just answered has not sent its next call yet
    (4, 32, 3, 0.001, 0.002, True),   # still within batch_delay
    (4, 32, 3, 0.002, 0.002, False),  # waited batch_delay already
    (4, 32, 3, 0.5, 0.002, False),
    (31, 32, 9, 0.0, 0.002, True),
    (32, 32, 9, 0.0, 0.002, False),   # the batch is whole
    (40, 32, 9, 0.0, 0.002, False),
    (1, 1, 1, 0.0, 0.002, False),     # a batch of one: nothing to wait for
    (4, 32, 3, 0.0, 0.0, False),      # batch_delay 0: never waits
])
def test_a_free_worker_waits_only_for_expected_callers_within_batch_delay(waiting, target, expected, held_for,
                                                                         batch_delay, holds):
    assert hold_for_company(waiting, target, expected, held_for, batch_delay) is holds


# ------------------------------------------------------------------------------------------ batch_target
@pytest.mark.parametrize("waiting, expected, in_flight, workers, max_batch, target", [
    (1, 0, 0, 2, 32, 1),      # a lone caller
    (1, 0, 1, 2, 32, 1),      # the other worker has the other caller: one each
    (0, 8, 8, 2, 32, 8),      # 16 closed-loop callers on 2 workers: 8 a batch
    (2, 10, 4, 2, 32, 8),     # a worker that answered 12 takes 8: the 4 left over even out the split
    (14, 1, 1, 2, 32, 8),     # start-up: 16 callers at once
    (16, 0, 0, 1, 32, 16),    # one worker takes them all
    (100, 0, 0, 2, 32, 32),   # never more than max_batch
    (3, 0, 0, 4, 32, 1),      # fewer callers than workers: each goes alone
    (0, 0, 0, 0, 32, 1),      # (no worker counted yet)
])
def test_a_batch_takes_its_fair_share_of_the_experts_callers(waiting, expected, in_flight, workers, max_batch,
                                                              target):
    assert batch_target(waiting, expected, in_flight, workers, max_batch) == target


# ------------------------------------------------------------------------------------------ Batcher.gather
@pytest.fixture
def batcher(tmp_path) -> Batcher:
    config = tmp_path / "expertd.conf"
    config.write_text(f"[expertd]\nsocket = {tmp_path / 'x.sock'}\n[expert:model]\nfunction = m:f\n")
    return Batcher(Serving(load_config(str(config))))


def call(conn_id: int, expert: str = "model", state: str = QUEUED, inbuf: int | None = None) -> Connection:
    """A connection with a call of ``expert`` (``inbuf``: bytes of it the master gathered)."""
    return Connection(conn_id=conn_id, sock=None, fd=-1, state=state, expert=expert,  # type: ignore[arg-type]
                      inbuf=None if inbuf is None else bytearray(inbuf))


def ids(members: list[Connection]) -> list[int]:
    return [conn.conn_id for conn in members]


def test_gather_takes_queued_calls_of_the_same_expert_oldest_first(batcher):
    lead = call(1)
    queue = deque([call(2), call(3, expert="other"), call(4, state=BUSY), call(5), call(6, state=CLOSED),
                   call(7, state=IDLE), call(8, expert=None), call(9)])  # type: ignore[arg-type]
    assert ids(batcher.gather(lead, queue, 32)) == [1, 2, 5, 9]
    assert [conn.state for conn in queue] == [QUEUED, QUEUED, BUSY, QUEUED, CLOSED, IDLE, QUEUED, QUEUED]  # untouched


def test_gather_never_takes_the_lead_twice(batcher):
    lead = call(1)
    queue = deque([lead, call(2), call(3)])  # (the lead may still be in the queue)
    assert ids(batcher.gather(lead, queue, 32)) == [1, 2, 3]


@pytest.mark.parametrize("max_batch, queued, size", [(1, 5, 1), (3, 5, 3), (6, 5, 6), (32, 100, 32),
                                                      (250, 300, 250), (1000, 300, ipc.MAX_BATCH_FDS)])
def test_gather_stops_at_max_batch_and_at_the_descriptors_one_message_carries(batcher, max_batch, queued, size):
    queue = deque(call(number) for number in range(2, queued + 2))
    assert ids(batcher.gather(call(1), queue, max_batch)) == list(range(1, min(size, queued + 1) + 1))


def test_gather_takes_gathered_calls_only_within_the_room_inside_the_message(batcher):
    room = ipc.MAX_INLINE - 40_000
    queue = deque([call(2, inbuf=room - 10_000), call(3, inbuf=10_001), call(4), call(5, inbuf=10_000),
                   call(6, inbuf=1)])
    # 2 fits; 3 would pass the room left (10,000); 4 is whole in its socket; 5 fills the room exactly; 6 is over.
    assert ids(batcher.gather(call(1, inbuf=40_000), queue, 32)) == [1, 2, 4, 5]


def test_a_lead_gathered_beyond_the_room_inside_the_message_goes_alone(batcher):
    queue = deque([call(2), call(3, inbuf=10)])
    assert ids(batcher.gather(call(1, inbuf=ipc.MAX_INLINE + 1), queue, 32)) == [1]


# ------------------------------------------------------------------------------------------ BatchFigures
def test_batch_figures_summary():
    figures = BatchFigures()
    assert figures.summary() == {"batches": 0, "calls": 0, "mean_batch": 0.0, "mean_queue_delay_ms": 0.0,
                                 "mean_batch_ms": 0.0, "sizes": {}}
    figures.record(1, [0.001])
    figures.record(3, [0.002, 0.003, 0.004])
    figures.record(4, [0.0] * 4)
    figures.record(250, [0.0] * 250)
    figures.runs, figures.run_sum = 2, 0.030  # (two of them reported done, by Batcher.ran)
    assert figures.summary() == {"batches": 4, "calls": 258, "mean_batch": 64.5,
                                 "mean_queue_delay_ms": round(0.010 / 258 * 1000, 3), "mean_batch_ms": 15.0,
                                 "sizes": {"1": 1, "4": 2, "250": 1}}  # sizes by bucket: at most this many


# ------------------------------------------------------------------------------------------ call_batch
def loaded(function) -> LoadedExpert:
    return LoadedExpert(name=function.__name__, reference=f"tests:{function.__name__}", function=function,
                        signature=inspect.signature(function), summary="", before_fork=None, after_fork=None,
                        batched=True, max_batch=32)


SEEN: list[list] = []


@expert(batched=True)
def lengths(texts):
    SEEN.append(list(texts))
    return [ValueError(f"{text!r} is too long") if len(text) > 5 else
            BadRequest("empty text") if not text else len(text) for text in texts]


@expert(batched=True)
def one_short(texts):
    return [len(text) for text in texts][1:]


@expert(batched=True)
def not_a_list(texts):
    return {"n": len(texts)}


@expert(batched=True)
def fails(texts):
    raise RuntimeError(f"cannot take {len(texts)} texts")


@pytest.fixture(autouse=True)
def _forget_seen():
    SEEN.clear()


def test_a_batched_function_gets_every_callers_one_argument_and_each_its_own_result():
    results = call_batch(loaded(lengths), [(["ab"], {}), ([], {"texts": "abcd"}), (["a"], {})], _failure)
    assert results == [2, 4, 1] and SEEN == [["ab", "abcd", "a"]]


def test_an_exception_in_the_results_fails_that_caller_alone():
    results = call_batch(loaded(lengths), [(["ab"], {}), (["too long"], {}), ([""], {})], _failure)
    assert results[0] == 2
    assert isinstance(results[1], ExpertFailed) and results[1].remote_type == "builtins.ValueError"
    assert str(results[1]) == "ValueError: 'too long' is too long" and results[1].expert == "lengths"
    assert isinstance(results[2], BadRequest) and str(results[2]) == "empty text" and results[2].expert == "lengths"


@pytest.mark.parametrize("args, kwargs, passed", [
    (["a", "b"], {}, "2 positional and 0 named"),
    ([], {}, "0 positional and 0 named"),
    ([], {"other": "a"}, "0 positional and 1 named"),
    (["a"], {"texts": "b"}, "1 positional and 1 named"),
])
def test_a_call_that_does_not_pass_one_argument_fails_alone(args, kwargs, passed):
    results = call_batch(loaded(lengths), [(["ab"], {}), (args, kwargs), (["abc"], {})], _failure)
    assert results[0] == 2 and results[2] == 3 and SEEN == [["ab", "abc"]]  # the others ran without it
    assert isinstance(results[1], BadRequest) and results[1].expert == "lengths"
    assert str(results[1]) == f"lengths is a batched expert: each call passes exactly one argument (texts); " \
                              f"this one passed {passed}"


def test_a_batch_of_misfits_never_calls_the_expert():
    results = call_batch(loaded(lengths), [(["a", "b"], {}), ([], {})], _failure)
    assert all(isinstance(result, BadRequest) for result in results) and SEEN == []


@pytest.mark.parametrize("function, said", [(one_short, "returned 1 results for 2 inputs"),
                                            (not_a_list, "returned dict for 2 inputs")])
def test_the_wrong_number_of_results_fails_every_caller_with_bad_result(function, said):
    results = call_batch(loaded(function), [(["ab"], {}), (["a", "b"], {}), (["abc"], {})], _failure)
    assert isinstance(results[1], BadRequest)  # (its own refusal stands)
    for result in (results[0], results[2]):
        assert isinstance(result, BadResult) and result.expert == function.__name__
        assert said in str(result) and "a batched expert returns a list of one result per input" in str(result)


def test_an_expert_that_raises_fails_every_caller_of_the_batch():
    results = call_batch(loaded(fails), [(["a"], {}), (["b"], {}), (["c"], {})], _failure)
    for result in results:
        assert isinstance(result, ExpertFailed) and result.remote_type == "builtins.RuntimeError"
        assert str(result) == "RuntimeError: cannot take 3 texts" and result.expert == "fails"
        assert "cannot take" in (result.remote_traceback or "")


# ------------------------------------------------------------------------------------------ the channel
def test_a_batch_of_200_connections_crosses_the_channel_whole():
    master_end, worker_end = ipc.channel_pair()
    pipes = [os.pipe() for _ in range(200)]
    received: list = []
    try:
        members = [(1000 + number, write_end, (b"frame %d " % number) * 20 if number % 3 == 0 else None,
                    number % 5 == 0) for number, (_read_end, write_end) in enumerate(pipes)]
        ipc.send_batch(master_end, members)
        received = ipc.receive_command(worker_end)
        assert isinstance(received, list) and len(received) == 200
        for (conn_id, _fd, frame, speaks_http), got in zip(members, received, strict=True):
            assert (got[0], got[2], got[3]) == (conn_id, frame, speaks_http)
        for number, ((read_end, _write_end), got) in enumerate(zip(pipes, received, strict=True)):
            os.write(got[1], b"%d" % number)  # each descriptor is that member's connection
            assert os.read(read_end, 16) == b"%d" % number
    finally:
        for _conn_id, fd, _frame, _http in received:
            os.close(fd)
        for read_end, write_end in pipes:
            os.close(read_end)
            os.close(write_end)
        master_end.close()
        worker_end.close()


def test_a_batch_whose_count_and_descriptors_disagree_is_refused_and_its_descriptors_closed():
    master_end, worker_end = ipc.channel_pair()
    read_end, write_end = os.pipe()
    try:
        message = ipc.BATCH + struct.pack("!H", 2) + struct.pack("!IBI", 1, 0, 0) + struct.pack("!IBI", 2, 0, 0)
        socket.send_fds(master_end, [message], [write_end])
        with pytest.raises(RuntimeError, match="a batch of 2 members came with 1 descriptors"):
            ipc.receive_command(worker_end)
        os.close(write_end)
        write_end = -1
        assert os.read(read_end, 1) == b""  # the passed copy was closed too: no writer is left
    finally:
        os.close(read_end)
        if write_end >= 0:
            os.close(write_end)
        master_end.close()
        worker_end.close()


# ------------------------------------------------------------------------------------------ Model.predict_many
class SumRunner:
    """A runtime that sums each row (and records the batches it ran)."""

    def __init__(self) -> None:
        self.batches: list[tuple[int, ...]] = []

    def run(self, batch: dict) -> dict:
        import numpy as np

        self.batches.append(batch["x"].shape)
        return {"y": np.asarray(batch["x"], dtype="float32").sum(axis=1, keepdims=True)}


def summing_model(max_rows: int = 64):
    from expertd.model import Model

    model = Model("/nonexistent/sum.tflite", name="sum", max_rows=max_rows, _register=False)
    model.prepared = SimpleNamespace(manifest={
        "inputs": [{"name": "x", "dtype": "float32", "shape": [-1, -1]}],  # rows of any length
        "outputs": [{"name": "y", "dtype": "float32", "shape": [-1, 1]}]})
    model._runner = SumRunner()
    return model


def test_rows_of_different_free_lengths_run_apart_and_each_caller_gets_its_own():
    model = summing_model()
    results = model.predict_many([[[1, 2, 3]], [[1, 2]], [[4, 5, 6], [7, 8, 9]], [[10, 20]]])
    assert [result.tolist() for result in results] == [[[6.0]], [[3.0]], [[15.0], [24.0]], [[30.0]]]
    # Rows stack only with rows of their own shape: [3-long rows], then [2-long], then [3-long x2], then [2-long].
    assert model._runner.batches == [(1, 3), (1, 2), (2, 3), (1, 2)]


def test_calls_of_one_shape_stack_into_one_run_within_max_rows():
    model = summing_model(max_rows=3)
    results = model.predict_many([[[1, 1]], [[2, 2]], [[3, 3]], [[4, 4]], [["x", 1]]])
    assert [result.tolist() for result in results[:4]] == [[[2.0]], [[4.0]], [[6.0]], [[8.0]]]
    assert isinstance(results[4], BadRequest)  # its own refusal; the others are answered
    assert model._runner.batches == [(3, 2), (1, 2)]  # at most max_rows rows a run
