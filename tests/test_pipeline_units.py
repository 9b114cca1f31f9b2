"""Pipelines' parts without a daemon: the fan-out split, ipc HELP, PIPELINE bodies and their hints, the metrics."""

from __future__ import annotations

import os
import signal
import socket
import time

import msgpack
import pytest

from expertd import ipc, protocol
from expertd.errors import BadRequest
from expertd.metrics import AD_HOC, Metrics
from expertd.pipelines import Plan
from expertd.worker_pipeline import FAN_OUT_OVER, PlainExpert, fan_out_split, steps_of

from conftest import open_fds


# ------------------------------------------------------------------------------------------ fan_out_split
@pytest.mark.parametrize("stage, typical, over, offered, kept", [
    # Nothing measured, or one slow expert only: nothing to share.
    (("a", "b", "c"), {}, FAN_OUT_OVER, [], ("a", "b", "c")),
    (("a",), {"a": 1.0}, FAN_OUT_OVER, [], ("a",)),
    (("a", "b"), {"a": 0.05, "b": 0.001}, FAN_OUT_OVER, [], ("a", "b")),
    (("a", "b"), {"a": 0.05}, FAN_OUT_OVER, [], ("a", "b")),
    # The slowest stays (this worker would otherwise only wait); each other slow one is offered alone.
    (("a", "b"), {"a": 0.05, "b": 0.03}, FAN_OUT_OVER, [("b",)], ("a",)),
    (("a", "b"), {"a": 0.03, "b": 0.05}, FAN_OUT_OVER, [("a",)], ("b",)),
    (("a", "b", "c"), {"a": 0.01, "b": 0.05, "c": 0.03}, FAN_OUT_OVER, [("c",), ("a",)], ("b",)),
    # Cheap and unmeasured experts stay, in the stage's order.
    (("cheap", "a", "new", "b"), {"a": 0.05, "b": 0.02, "cheap": 0.0001}, FAN_OUT_OVER, [("b",)],
     ("cheap", "a", "new")),
    # The threshold counts (at it is slow enough), and may be given.
    (("a", "b"), {"a": FAN_OUT_OVER, "b": FAN_OUT_OVER}, FAN_OUT_OVER, [("b",)], ("a",)),
    (("a", "b"), {"a": 0.05, "b": FAN_OUT_OVER * 0.99}, FAN_OUT_OVER, [], ("a", "b")),
    (("a", "b"), {"a": 0.05, "b": 0.05}, 0.1, [], ("a", "b")),
    (("a", "b", "c"), {"a": 0.2, "b": 0.3, "c": 0.01}, 0.1, [("a",)], ("b", "c")),
    # Ties keep the stage's order: the first stays.
    (("a", "b", "c"), {"a": 0.05, "b": 0.05, "c": 0.05}, FAN_OUT_OVER, [("b",), ("c",)], ("a",)),
    # Measurements of experts not in the stage do not matter.
    (("a", "b"), {"x": 9.0, "y": 9.0, "a": 0.05}, FAN_OUT_OVER, [], ("a", "b")),
])
def test_fan_out_split_offers_every_slow_expert_but_the_slowest(stage, typical, over, offered, kept):
    assert fan_out_split(stage, typical, over) == (offered, kept)


def test_fan_out_split_keeps_every_expert_exactly_once():
    stage = tuple("abcdefgh")
    typical = {name: 0.001 * (i * 7 % 5 + 1) for i, name in enumerate(stage)}
    offered, kept = fan_out_split(stage, typical)
    assert all(len(group) == 1 for group in offered)
    assert sorted([*kept, *(group[0] for group in offered)]) == sorted(stage)


# ------------------------------------------------------------------------------------------ ipc HELP
def _plain(name: str) -> PlainExpert:
    return PlainExpert(name, len, name.encode().ljust(48, b"\0"), None)  # type: ignore[arg-type]


@pytest.mark.parametrize(("stages", "plain", "direct", "more"), [
    ((("a",),), {"a"}, ["a"], [False]),
    ((("a",), ("b",), ("c",)), {"a", "b", "c"}, ["a", "b", "c"], [True, True, False]),
    ((("a",), ("batched",)), {"a"}, ["a", None], [True, False]),  # a batched expert: a batch of one, not direct
    ((("a", "b"), ("c",)), {"a", "b", "c"}, [None, "c"], [True, False]),  # a stage of several: never direct
])
def test_a_plans_steps_call_single_plain_experts_directly(stages, plain, direct, more):
    plan = Plan("t", None, stages, "continue", 3.0, tuple(1.0 + i for i in range(len(stages))))
    steps = steps_of(plan, {name: _plain(name) for name in plain})
    assert [step.stage for step in steps] == list(stages)
    assert [step.name for step in steps] == direct
    assert [step.function is len for step in steps] == [name is not None for name in direct]
    assert [step.board_name[:1] for step in steps] == [name.encode()[:1] if name else b"" for name in direct]
    assert [step.limit for step in steps] == list(plan.limits)
    assert [step.more for step in steps] == more


def test_receive_report_returns_help_and_a_descriptor_that_reaches_the_asker(channel):
    master_end, worker_end = channel
    asker, offered = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with asker:
        request = protocol.encode_pipeline(1, "burn_b", {"cpu": 0.05}, {"helper": True})
        asker.sendall(request)
        ipc.send_help(worker_end, offered.fileno())
        offered.close()
        op, fd = ipc.receive_report(master_end)
        assert op == ipc.HELP and isinstance(fd, int)
        with socket.socket(fileno=fd) as adopted:
            adopted.settimeout(5)
            kind, request_id, body = protocol.read_frame(adopted, protocol.MAX_BODY)
            assert (kind, request_id) == (protocol.PIPELINE, 1)
            assert protocol.decode_pipeline(body) == ("burn_b", {"cpu": 0.05}, {"helper": True})
            adopted.sendall(protocol.encode_frame(protocol.RESULT, 1, protocol.pack({"opinions": {"burn_b": 9}})))
            asker.settimeout(5)
            kind, _, body = protocol.read_frame(asker, protocol.MAX_BODY)
            assert kind == protocol.RESULT and protocol.unpack(body) == {"opinions": {"burn_b": 9}}
        assert asker.recv(1) == b""  # the master's end closed: the pair's last other end (the asker sees EOF)
    assert ipc.receive_report(master_end) is None  # (one report, one message)


def test_a_help_report_without_its_descriptor_is_refused_and_extra_descriptors_are_closed(channel):
    master_end, worker_end = channel
    worker_end.send(ipc.HELP)
    with pytest.raises(RuntimeError, match="without its descriptor"):
        ipc.receive_report(master_end)
    first, second = socket.socketpair()
    try:
        before = open_fds()
        socket.send_fds(worker_end, [ipc.HELP], [first.fileno(), second.fileno()])
        op, fd = ipc.receive_report(master_end)
        assert op == ipc.HELP
        assert open_fds() - before == {fd}  # (the second copy was closed)
        os.close(fd)
    finally:
        first.close()
        second.close()


# ------------------------------------------------------------------------------------------ PIPELINE bodies
def _body(value: object) -> bytes:
    return msgpack.packb(value, use_bin_type=True)


@pytest.mark.parametrize("value, decoded", [
    (["mod", {}], ("mod", {}, {})),
    (["language, sentiment + toxicity", {"text": "x"}], ("language, sentiment + toxicity", {"text": "x"}, {})),
    (["a", {"text": "x"}, {"on_error": "stop"}], ("a", {"text": "x"}, {"on_error": "stop"})),
    (["a", {"opinions": {"b": 1}, "errors": {}}, {}], ("a", {"opinions": {"b": 1}, "errors": {}}, {})),
    (["a", {"nested": [1, {"b": b"\x00"}]}], ("a", {"nested": [1, {"b": b"\x00"}]}, {})),
    # (Whether a target and its options make sense is for the plan and the worker: bodies are shapes only.)
    (["", {}], ("", {}, {})),
    (["a", {}, {"unknown": 1}], ("a", {}, {"unknown": 1})),
])
def test_decode_pipeline_reads_target_document_and_options(value, decoded):
    assert protocol.decode_pipeline(_body(value)) == decoded


@pytest.mark.parametrize("body, words", [
    (b"\xc1", "not valid msgpack"),
    (b"\x92\xa1a", "not valid msgpack"),  # (cut short)
    (_body(["a", {}])[:-1] + b"\xd4\x01\x00", "not valid msgpack"),  # an extension type
    (_body([]), "[target, document]"),
    (_body(["a"]), "[target, document]"),
    (_body(["a", {}, {}, {}]), "[target, document]"),
    (_body({"target": "a"}), "[target, document]"),
    (_body("a"), "[target, document]"),
    (_body([1, {}]), "target must be a string"),
    (_body([None, {}]), "target must be a string"),
    (_body([b"a", {}]), "target must be a string"),
    (_body(["a", []]), "document must be a map"),
    (_body(["a", "text"]), "document must be a map"),
    (_body(["a", None]), "document must be a map"),
    (_body(["a", {"opinions": []}]), "'opinions' is a list, not a map"),
    (_body(["a", {"errors": "x"}]), "'errors' is a str, not a map"),
    (_body(["a", {}, []]), "options must be a map"),
    (_body(["a", {}, None]), "options must be a map"),
])
def test_decode_pipeline_refuses_bad_shapes_with_a_bad_request(body, words):
    with pytest.raises(BadRequest) as caught:
        protocol.decode_pipeline(body)
    assert words in caught.value.message


def test_encode_pipeline_makes_a_frame_decode_pipeline_reads():
    frame = protocol.encode_pipeline(42, "a, b + c", {"text": "x"})
    kind, request_id, length = protocol.parse_header(frame[:protocol.HEADER_SIZE])
    body = frame[protocol.HEADER_SIZE:]
    assert (kind, request_id, length) == (protocol.PIPELINE, 42, len(body))
    assert body[:1] == b"\x92"  # without options: [target, document]
    assert protocol.decode_pipeline(body) == ("a, b + c", {"text": "x"}, {})
    assert protocol.encode_pipeline(42, "a", {}, {}) == protocol.encode_pipeline(42, "a", {})
    body = protocol.encode_pipeline(1, "a", {}, {"on_error": "stop"})[protocol.HEADER_SIZE:]
    assert body[:1] == b"\x93" and protocol.decode_pipeline(body) == ("a", {}, {"on_error": "stop"})


# ------------------------------------------------------------------------------------------ named_hint
def _array_head(count: int, encoding: str) -> bytes:
    return {"fixarray": bytes([0x90 | count]), "array16": b"\xdc" + count.to_bytes(2, "big"),
            "array32": b"\xdd" + count.to_bytes(4, "big")}[encoding]


def _str(text: str, encoding: str) -> bytes:
    raw = text.encode()
    head = {"fixstr": bytes([0xA0 | len(raw)]) if len(raw) < 32 else None,
            "str8": b"\xd9" + len(raw).to_bytes(1, "big"), "str16": b"\xda" + len(raw).to_bytes(2, "big"),
            "str32": b"\xdb" + len(raw).to_bytes(4, "big")}[encoding]
    assert head is not None
    return head + raw


ARRAYS = ("fixarray", "array16", "array32")
STRS = ("fixstr", "str8", "str16", "str32")
TARGET = "language, sentiment + tox"  # (short enough for a fixstr)


@pytest.mark.parametrize("array", ARRAYS)
@pytest.mark.parametrize("string", STRS)
@pytest.mark.parametrize("count", [2, 3])
def test_named_hint_reads_a_pipelines_target_in_every_encoding(array, string, count):
    body = _array_head(count, array) + _str(TARGET, string) + _body({"text": "x" * 600})
    if count == 3:
        body += _body({"on_error": "stop"})
    assert protocol.decode_pipeline(body)[0] == TARGET  # (a valid body: msgpack reads any of these encodings)
    assert protocol.named_hint(protocol.PIPELINE, body[:512]) == TARGET
    assert protocol.named_hint(protocol.PIPELINE, body) == TARGET
    # Cut before the name ends: not known yet.
    cut = len(_array_head(count, array)) + len(_str(TARGET, string)) - 1
    assert protocol.named_hint(protocol.PIPELINE, body[:cut]) is None
    # The same bytes as another kind: a CALL is an array of 3, a MAP of 2, others name nothing.
    assert protocol.named_hint(protocol.CALL, body) == (TARGET if count == 3 else None)
    assert protocol.named_hint(protocol.MAP, body) == (TARGET if count == 2 else None)
    assert protocol.named_hint(protocol.PING, body) is None


@pytest.mark.parametrize("body", [
    _body(["a"]),  # (an array of 1)
    _body(["a", {}, {}, {}]),  # (an array of 4)
    _array_head(4, "array16") + _str("a", "fixstr"),
    _body([1, {}]),  # (a target that is not text)
    _body([b"a", {}]),
    _body({"a": 1}),
    b"\x92\xa3\xff\xfe\xfd\x80",  # (not UTF-8)
    b"",
    b"\x92",
    b"\xdc\x00",
])
def test_named_hint_finds_no_target_in_other_shapes(body):
    assert protocol.named_hint(protocol.PIPELINE, body) is None


def test_named_hint_reads_long_and_non_ascii_targets():
    long_target = " , ".join(f"expert_{i}" for i in range(30))  # past a fixstr's 31 bytes
    assert protocol.named_hint(protocol.PIPELINE, _body([long_target, {}])) == long_target
    assert protocol.named_hint(protocol.PIPELINE, _body(["é", {}, {}])) == "é"


# ------------------------------------------------------------------------------------------ metrics
GAUGES = {"workers": {"idle": 2}, "workers_wanted": 2, "memory": {}, "connections": 0, "queued": 0,
          "generation": 1, "uptime": 1.0, "version": "test"}


def _metrics() -> Metrics:
    metrics = Metrics(2, ["language", "polite"], pipelines=["mod", "strict"])
    worker0, worker1 = metrics.recorder(0), metrics.recorder(1)
    worker0.record_pipeline("mod", "ok", 0.003)
    worker1.record_pipeline("mod", "expert_errors", 0.02)
    worker0.record_pipeline(AD_HOC, "timeout", 1.5)
    worker1.record_pipeline("not_a_pipeline", "bad_request", 0.0005)  # (counted with the ad-hoc targets)
    worker0.record("language", "ok", 0.001)
    return metrics


def test_status_shows_each_pipeline_asked_for_with_its_outcomes_and_mean_time():
    metrics = _metrics()
    expected = {
        "mod": {"requests": 2, "outcomes": {"ok": 1, "expert_errors": 1}, "mean_ms": 11.5},
        AD_HOC: {"requests": 2, "outcomes": {"timeout": 1, "bad_request": 1}, "mean_ms": 750.25},
    }
    assert metrics.pipelines([0, 1]) == expected  # (strict was never asked for)
    metrics.retire(1)  # an exited worker's counts are kept
    assert metrics.pipelines([0]) == expected
    assert metrics.pipelines([0, 1]) == expected  # (its slot was cleared: not counted twice)


def test_a_pipeline_added_later_is_counted_by_workers_made_after():
    metrics = Metrics(1, ["language"])
    metrics.recorder(0).record_pipeline("fresh", "ok", 0.01)  # (not known yet: ad hoc)
    metrics.add_pipeline("fresh")
    metrics.recorder(0).record_pipeline("fresh", "ok", 0.01)
    assert {name: entry["requests"] for name, entry in metrics.pipelines([0]).items()} == {AD_HOC: 1, "fresh": 1}


@pytest.mark.parametrize("pipeline", ["mod", AD_HOC, "not_a_pipeline", None])
def test_a_pipelines_counting_in_one_pass_counts_as_a_call_of_each_expert_and_the_request_would(pipeline):
    ran = [("language", "ok", 0.000004), ("polite", "expert_failed", 0.00001), ("polite", "ok", 0.00003),
           ("gone", "timeout", 0.2), ("language", "no_such_code", float("nan")), ("language", "ok", 100.0)]
    one_pass, one_by_one = Metrics(1, ["language", "polite"], pipelines=["mod"]), Metrics(
        1, ["language", "polite"], pipelines=["mod"])
    one_pass.recorder(0).record_run(ran, pipeline, "expert_errors", 0.004)
    recorder = one_by_one.recorder(0)
    for expert, code, seconds in ran:
        recorder.record(expert, code, seconds)
    if pipeline is not None:
        recorder.record_pipeline(pipeline, "expert_errors", 0.004)
    assert str(one_pass.totals([0])) == str(one_by_one.totals([0]))  # (str: NaN == NaN)


def test_metrics_render_pipeline_requests_by_outcome_and_their_duration_histogram():
    lines = _metrics().render([0, 1], GAUGES).splitlines()
    for line in (
        'expertd_pipeline_requests_total{pipeline="mod",outcome="ok"} 1',
        'expertd_pipeline_requests_total{pipeline="mod",outcome="expert_errors"} 1',
        'expertd_pipeline_requests_total{pipeline="strict",outcome="ok"} 0',  # (named: shown before any request)
        'expertd_pipeline_requests_total{pipeline="(ad hoc)",outcome="timeout"} 1',
        'expertd_pipeline_requests_total{pipeline="(ad hoc)",outcome="bad_request"} 1',
        'expertd_pipeline_duration_seconds_bucket{pipeline="mod",le="0.0025"} 0',
        'expertd_pipeline_duration_seconds_bucket{pipeline="mod",le="0.005"} 1',
        'expertd_pipeline_duration_seconds_bucket{pipeline="mod",le="0.025"} 2',
        'expertd_pipeline_duration_seconds_bucket{pipeline="mod",le="+Inf"} 2',
        'expertd_pipeline_duration_seconds_count{pipeline="mod"} 2',
        'expertd_pipeline_duration_seconds_count{pipeline="(ad hoc)"} 2',
        'expertd_pipeline_duration_seconds_bucket{pipeline="(ad hoc)",le="2.5"} 2',
        'expertd_requests_total{expert="language"} 1',
        "# TYPE expertd_pipeline_requests_total counter",
        "# TYPE expertd_pipeline_duration_seconds histogram",
    ):
        assert line in lines, line
    assert any(line.startswith('expertd_pipeline_duration_seconds_sum{pipeline="mod"} 0.023') for line in lines)
    assert 'expertd_pipeline_requests_total{pipeline="(ad hoc)",outcome="ok"} 0' not in lines
    # Pipelines are not experts.
    assert not any("pipeline:" in line for line in lines)
    assert not any(line.startswith("expertd_requests_total") and "mod" in line for line in lines)


# ------------------------------------------------------------------- the stage timer
def _in_a_child(check) -> None:
    """Run ``check`` in a forked child, as in a worker (pytest's own SIGALRM timer stays out of it)."""
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, signal.SIG_DFL)
            check()
            code = 0
        finally:
            os._exit(code)
    _pid, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, status


def test_the_stage_timer_interrupts_only_while_it_means_something_and_off_stops_it():
    from expertd import stage_timer

    def check() -> None:
        assert stage_timer.usable()
        now = time.monotonic()
        stage_timer.arm(now + 0.05, now)
        stage_timer.MEANING[0] = True
        try:
            time.sleep(1)
            raise AssertionError("not interrupted")
        except stage_timer.StageTimeout:
            pass
        assert not stage_timer.MEANING[0]  # (once: a second SIGALRM would not raise)
        now = time.monotonic()
        stage_timer.arm(now + 0.05, now)  # (it went off: armed again though the deadline is near the last)
        started = time.monotonic()
        time.sleep(0.2)  # SIGALRM comes, meaning nothing: the sleep goes on
        assert time.monotonic() - started >= 0.19
        now = time.monotonic()
        stage_timer.arm(now + 0.05, now)
        stage_timer.off()
        assert stage_timer.ALARM_AT[0] == 0.0 and signal.getitimer(signal.ITIMER_REAL)[0] == 0.0

    _in_a_child(check)


def test_the_stage_timer_is_not_taken_when_sigalrm_is_someone_elses():
    from expertd import stage_timer

    def check() -> None:
        signal.signal(signal.SIGALRM, lambda signum, frame: None)
        assert not stage_timer.usable()

    _in_a_child(check)
