"""What an operator reads: the log summary agrees with /metrics, experts' failures leave a trace,
debug is not drowned by libraries, and the latency histogram resolves fast experts (real daemons)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from itertools import takewhile

import pytest

from conftest import ROOT, wait_until
from conftest import metrics_samples as metrics

EXPERTS = {"echo": "testexperts:echo", "boom": "testexperts:boom", "spin": "logexperts:spin",
           "fails": "logexperts:fails", "quotes": "logexperts:quotes",
           "chatty": "logexperts:chatty", "imports": "logexperts:imports_libraries"}
SUMMARY = re.compile(r"last \d+s: (\d+) requests(?: \(([^)]*)\))?"
                     r"(?:, median ([\d.]+) ms, 99th percentile ([\d.]+) ms)?")




def requests_total(daemon) -> int:
    return int(sum(value for key, value in metrics(daemon).items() if key.startswith("expertd_requests_total{")))


def summaries(daemon) -> list[tuple[int, dict[str, int], float | None]]:
    """Each summary line in the log: (requests, by outcome, median ms)."""
    found = []
    for match in SUMMARY.finditer(daemon.log):
        outcomes = {}
        for part in (match.group(2) or "").split(", "):
            if part:
                count, code = part.split(" ")
                outcomes[code] = int(count)
        found.append((int(match.group(1)), outcomes, float(match.group(3)) if match.group(3) else None))
    return found


def test_the_summary_counts_calls_served_on_a_lingering_connection_as_metrics_does(make_daemon):
    # One worker that keeps the connection between calls (linger): the master sees none of them but the first.
    daemon = make_daemon(EXPERTS, workers=1, linger="1s", log_summary_interval="1s")
    with daemon.client() as client:
        for i in range(300):
            assert client.call("echo", i)["args"] == [i]
        for _ in range(5):
            with pytest.raises(Exception, match="ValueError"):
                client.call("boom")
    assert requests_total(daemon) == 305
    assert wait_until(lambda: sum(count for count, _, _ in summaries(daemon)) >= 305, timeout=10), daemon.log
    lines = summaries(daemon)
    assert sum(count for count, _, _ in lines) == 305 == requests_total(daemon)
    outcomes: dict[str, int] = {}
    for _count, by_outcome, _median in lines:
        for code, count in by_outcome.items():
            outcomes[code] = outcomes.get(code, 0) + count
    assert outcomes == {"ok": 300, "expert_failed": 5}
    # The median, from the histogram: an echo takes tens of microseconds in its worker, not milliseconds.
    busiest = max(lines, key=lambda line: line[0])
    assert busiest[2] is not None and busiest[2] < 0.2, busiest
    # status shows the last interval's figures, counted the same way (0 once an interval passes without calls).
    last = daemon.client().status()["last_interval"]
    assert last is not None and last["requests"] in (0, *(count for count, _, _ in lines))
    shown = subprocess.run([sys.executable, "-m", "expertd.cli", "--socket", str(daemon.socket), "status"],
                           cwd=ROOT, capture_output=True, text=True, timeout=30).stdout
    assert SUMMARY.search(shown), shown  # expertctl status: the same line


def test_no_summary_line_when_it_is_off(make_daemon):
    daemon = make_daemon(EXPERTS, workers=1, log_summary_interval="off")
    with daemon.client() as client:
        client.call("echo", 1)
    assert not wait_until(lambda: summaries(daemon), timeout=1.5)
    assert daemon.client().status()["last_interval"] is None


def test_a_failing_expert_logs_its_traceback_once_per_exception_type_then_a_count(make_daemon):
    daemon = make_daemon(EXPERTS, workers=1)
    first: dict[str, str] = {}  # exception kind -> the request id the client was told on its first failure
    with daemon.client() as client:
        for _ in range(100):
            for kind in ("value", "key"):
                with pytest.raises(Exception, match="Error") as raised:
                    client.call("fails", kind)
                first.setdefault(kind, raised.value.request_id)
    assert daemon.stop() == 0  # (the worker writes the counts of what it left out as it exits)
    log = daemon.log
    for kind, error, line in (("value", "ValueError: bad value", "the ValueError line"),
                              ("key", "KeyError: 'no such key'", "the KeyError line")):
        failed = re.escape("expert fails failed (request ") + r"[\w-]+" + re.escape(f"): {error}")
        assert len(re.findall(failed + "\n", log)) == 1, log  # the line written at once...
        assert len(re.findall(failed + re.escape(" (99 more like this in the last 10s)"), log)) == 1, log  # a count
        # ... names the request the client was told about, and comes with its traceback.
        assert f"expert fails failed (request {first[kind]}): {error}\n  | Traceback (most recent call last):" in log
        # The traceback names the expert's file and line, once.
        assert len(re.findall(r'File ".*logexperts\.py", line \d+, in fails\n.*' + line, log)) == 1, log
    assert "[WARNING] expertd.worker: expert fails failed" in log


def test_a_client_cannot_forge_log_lines_through_an_experts_exception_message(make_daemon):
    daemon = make_daemon(EXPERTS, workers=1)
    forged = "2026-11-26 10:44:01,482 [3015] [INFO] expertd.master: FORGED"
    with daemon.client() as client, pytest.raises(Exception, match="client said"):
        client.call("quotes", f"hello\n{forged}\r\x1b[31m")
    assert wait_until(lambda: "expert quotes failed" in daemon.log)
    lines = daemon.log.splitlines()
    assert not [line for line in lines if line.startswith(forged[:20])], daemon.log  # no line passes for a record
    failure = next(line for line in lines if "expert quotes failed" in line)
    assert failure.endswith(f"ValueError: client said: hello\\n{forged}\\r\\x1b[31m"), failure  # escaped, whole
    assert "\x1b" not in daemon.log  # (no terminal escapes either)
    # Every line of the traceback after it is marked as such: the forged text only ever follows the mark.
    traceback = list(takewhile(lambda line: line.startswith("  | "), lines[lines.index(failure) + 1:]))
    assert traceback[0] == "  | Traceback (most recent call last):"
    assert traceback[-2:] == ["  | ValueError: client said: hello", f"  | {forged}\\r\\x1b[31m"], traceback


def test_an_experts_failure_in_the_json_log_carries_the_request_id_its_caller_was_told(make_daemon):
    daemon = make_daemon(EXPERTS, workers=1, log_format="json")
    with daemon.client() as client, pytest.raises(Exception, match="ValueError") as raised:
        client.call("fails", "value")
    assert wait_until(lambda: "expert fails failed" in daemon.log)
    entries = [json.loads(line) for line in daemon.log.splitlines() if line.startswith("{")]
    failure = next(entry for entry in entries if "expert fails failed" in entry["message"])
    assert failure["level"] == "warning" and failure["request_id"] == raised.value.request_id
    assert "\n  | Traceback (most recent call last):\n" in failure["message"]  # (as documented: docs/logging.md)


def test_debug_shows_the_experts_own_lines_not_the_libraries_debug(make_daemon):
    daemon = make_daemon(EXPERTS, workers=1, log_level="debug")
    assert daemon.client().call("chatty") is True
    assert wait_until(lambda: "the expert's own debug line" in daemon.log)
    assert "h5py info: still shown" in daemon.log
    assert "h5py debug" not in daemon.log and "matplotlib debug" not in daemon.log


def test_debug_is_not_flooded_by_h5py_and_tensorflow_imported_in_a_worker(make_daemon):
    pytest.importorskip("h5py")
    pytest.importorskip("tensorflow")
    daemon = make_daemon(EXPERTS, workers=1, log_level="debug")
    assert daemon.client(timeout=120).call("imports") is True
    assert daemon.client().call("chatty") is True  # (a line after the imports': the log has caught up)
    assert wait_until(lambda: "the expert's own debug line" in daemon.log)
    assert "Creating converter" not in daemon.log and "[DEBUG] tensorflow" not in daemon.log, daemon.log
    assert "[DEBUG] expertd." in daemon.log  # debug is on


def test_quiet_loggers_empty_lets_the_libraries_debug_through(make_daemon):
    daemon = make_daemon(EXPERTS, workers=1, log_level="debug", quiet_loggers="")
    assert daemon.client().call("chatty") is True
    assert wait_until(lambda: "h5py debug: creating converter" in daemon.log)


def test_a_fast_experts_calls_land_in_the_microsecond_buckets(make_daemon):
    daemon = make_daemon(EXPERTS, workers=1)
    with daemon.client() as client:
        for _ in range(200):
            client.call("spin", 20)
    seen = metrics(daemon)

    def bucket(le: str) -> float:
        return seen[f'expertd_request_duration_seconds_bucket{{expert="spin",le="{le}"}}']

    assert bucket("+Inf") == 200
    assert bucket("1e-05") == 0  # (each call spins 20 µs)
    assert bucket("5e-05") >= 100, seen  # most of them under 50 µs, as a ~30 µs call should be
