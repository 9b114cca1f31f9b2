"""``expertctl opinion --lines --on-error stop|skip|record``, and its progress line, against a real daemon."""

from __future__ import annotations

import json
import os
import pty
import select
import subprocess
import time

import pytest

from conftest import BIN

EXPERTS = {
    "language": "docexperts:language",
    "polite": "docexperts:polite",
    "length": "docexperts:length",
    "sleeper": "docexperts:sleeper",
    "tlen": {"function": "batchexperts:text_length", "max_batch": "8"},
}


@pytest.fixture
def daemon(make_daemon):
    return make_daemon(EXPERTS, max_frame="4K")


def _input(count: int = 1001) -> list[str]:
    """``count`` lines of documents, three of them bad: invalid JSON, not an object, an expert's failure."""
    lines = [json.dumps({"n": n, "text": "hello", "opinions": {"language": "en"}}) for n in range(count)]
    lines[2] = '{"n": 2, "text": '  # line 3: not JSON
    lines[9] = "[1, 2]"  # line 10: not an object
    lines[499] = json.dumps({"n": 499, "text": "hello", "opinions": {"language": "de"}})  # line 500: polite fails
    return lines


def _ns(stdout: str) -> list[int]:
    return [json.loads(line)["n"] for line in stdout.splitlines()]


def test_on_error_skip_leaves_out_bad_documents_names_their_lines_and_exits_1(daemon):
    done = daemon.ctl("opinion", "--lines", "--on-error", "skip", "length", "polite",
                      input="\n".join(_input()) + "\n")
    assert done.returncode == 1  # the output lacks documents
    assert _ns(done.stdout) == [n for n in range(1001) if n not in (2, 9, 499)]
    messages = done.stderr.splitlines()
    assert messages[0].startswith("expertctl: stdin line 3: invalid JSON") and messages[0].endswith("(skipped)")
    assert messages[1].startswith("expertctl: stdin line 10: the document must be a JSON object")
    assert messages[2] == "expertctl: stdin line 500: polite: KeyError: 'de' [expert_failed] (skipped)"
    assert messages[3:] == ["expertctl: 3 of 1001 documents skipped (--on-error skip); exit status 1"]


def test_on_error_record_writes_a_line_for_every_document_with_its_errors(daemon):
    done = daemon.ctl("opinion", "--lines", "--on-error", "record", "length", "polite",
                      input="\n".join(_input()) + "\n")
    assert done.returncode == 0, done.stderr
    outputs = [json.loads(line) for line in done.stdout.splitlines()]
    assert len(outputs) == 1001
    assert outputs[2] == {"errors": {"_input": {
        "code": "bad_input", "type": "InputError", "line": 3,
        "message": outputs[2]["errors"]["_input"]["message"]}}}
    assert outputs[2]["errors"]["_input"]["message"].startswith("stdin line 3: invalid JSON")
    assert outputs[9]["errors"]["_input"]["line"] == 10
    assert outputs[499]["errors"]["polite"]["message"] == "KeyError: 'de'"
    assert outputs[499]["opinions"] == {"language": "de", "length": 5}
    assert [out["n"] for out in outputs if "n" in out] == [n for n in range(1001) if n not in (2, 9)]
    assert done.stderr == "expertctl: 3 of 1001 documents written with errors (under errors.NAME)\n"


def test_on_error_stop_is_the_default_and_names_the_line_and_what_was_written(daemon):
    done = daemon.ctl("opinion", "--lines", "length", "polite", input="\n".join(_input()[10:]) + "\n")
    assert done.returncode == 1
    assert _ns(done.stdout) == list(range(10, 499))
    assert done.stderr == ("expertctl: stdin line 490: polite: KeyError: 'de' [expert_failed]; stopped there, "
                           "489 documents written (--on-error skip or record goes on)\n")


def test_a_document_too_large_is_skipped_or_recorded_and_the_stream_goes_on(daemon):
    lines = [json.dumps({"n": n, "text": "x" * (9000 if n == 4 else n)}) for n in range(40)]
    skipped = daemon.ctl("opinion", "--lines", "--on-error", "skip", "language", "length",
                         input="\n".join(lines) + "\n")
    assert skipped.returncode == 1
    assert _ns(skipped.stdout) == [n for n in range(40) if n != 4]
    assert skipped.stderr.startswith("expertctl: stdin line 5: ") and "[frame_too_large] (skipped)" in skipped.stderr
    recorded = daemon.ctl("opinion", "--lines", "--on-error", "record", "language", "length",
                          input="\n".join(lines) + "\n")
    assert recorded.returncode == 0, recorded.stderr
    outputs = [json.loads(line) for line in recorded.stdout.splitlines()]
    assert [out["n"] for out in outputs] == list(range(40))
    assert outputs[4]["errors"]["_request"]["code"] == "frame_too_large"
    assert outputs[4]["errors"]["_request"]["line"] == 5 and len(outputs[4]["text"]) == 9000
    assert outputs[5]["opinions"] == {"language": "en", "length": 5}


def test_on_error_over_a_batched_experts_windows(daemon):
    lines = [json.dumps({"n": n, "text": "x" * n}) for n in range(30)]
    lines[12] = json.dumps({"n": 12, "text": "x", "fail": "item twelve"})
    lines[20] = "not json"
    text = "\n".join(lines) + "\n"
    skipped = daemon.ctl("opinion", "--lines", "--on-error", "skip", "tlen", input=text)
    assert skipped.returncode == 1
    assert _ns(skipped.stdout) == [n for n in range(30) if n not in (12, 20)]
    messages = skipped.stderr.splitlines()
    assert messages[0] == ("expertctl: stdin line 13: tlen: ValueError: asked to fail: item twelve [expert_failed] "
                           "(skipped)")
    assert messages[1].startswith("expertctl: stdin line 21: invalid JSON") and messages[1].endswith("(skipped)")
    assert messages[2:] == ["expertctl: 2 of 30 documents skipped (--on-error skip); exit status 1"]
    recorded = daemon.ctl("opinion", "--lines", "--on-error", "record", "tlen", input=text)
    assert recorded.returncode == 0, recorded.stderr
    outputs = [json.loads(line) for line in recorded.stdout.splitlines()]
    assert len(outputs) == 30
    assert outputs[12]["errors"]["tlen"]["code"] == "expert_failed"
    assert outputs[20]["errors"]["_input"]["line"] == 21
    assert outputs[21]["opinions"]["tlen"]["chars"] == 21
    assert recorded.stderr == "expertctl: 2 of 30 documents written with errors (under errors.NAME)\n"
    stopped = daemon.ctl("opinion", "--lines", "tlen", input=text)
    assert stopped.returncode == 1 and _ns(stopped.stdout) == list(range(12))
    assert stopped.stderr.startswith("expertctl: stdin line 13: tlen: ValueError")


def test_an_unknown_expert_stops_the_stream_whatever_on_error_says(daemon):
    done = daemon.ctl("opinion", "--lines", "--on-error", "record", "length", "nope",
                      input='{"text": "a"}\n' * 20)
    assert (done.returncode, done.stdout) == (1, "")
    assert done.stderr.startswith("expertctl: nope: no expert or pipeline named 'nope'")
    assert done.stderr.count("\n") == 1


def _run_on_terminals(daemon, stdin_path, stdout_is_terminal: bool) -> tuple[str, str, int]:
    """expertctl --lines with stderr on a pseudo-terminal (and stdout too, or a pipe): (stderr, stdout, status)."""
    err_master, err_slave = pty.openpty()
    out_master, out_slave = pty.openpty() if stdout_is_terminal else (None, None)
    with open(stdin_path) as stdin:
        proc = subprocess.Popen([str(BIN / "expertctl"), "--socket", str(daemon.socket), "opinion", "--lines",
                                 "sleeper", "length"], stdin=stdin, stderr=err_slave,
                                stdout=out_slave if stdout_is_terminal else subprocess.PIPE)
    os.close(err_slave)
    if out_slave is not None:
        os.close(out_slave)
    seen = {err_master: b"", out_master: b""}
    fds = [fd for fd in (err_master, out_master) if fd is not None]
    if proc.stdout is not None:
        fds.append(proc.stdout.fileno())
        seen[proc.stdout.fileno()] = b""
    deadline = time.monotonic() + 30
    while fds and time.monotonic() < deadline:
        for fd in select.select(fds, [], [], 1)[0]:
            try:
                data = os.read(fd, 65536)
            except OSError:  # (a pseudo-terminal whose other end closed)
                data = b""
            if data:
                seen[fd] += data
            else:
                fds.remove(fd)
    status = proc.wait(timeout=10)
    out = seen[out_master] if stdout_is_terminal else seen[proc.stdout.fileno()]
    for fd in (err_master, out_master):
        if fd is not None:
            os.close(fd)
    if proc.stdout is not None:
        proc.stdout.close()
    return seen[err_master].decode(), out.decode(), status


def test_progress_shows_on_a_terminal_with_share_and_time_left_never_in_the_output(daemon, short_dir):
    path = short_dir / "docs.jsonl"
    path.write_text("".join(json.dumps({"n": n, "sleep": 0.05, "text": "hi"}) + "\n" for n in range(40)))
    err, out, status = _run_on_terminals(daemon, path, stdout_is_terminal=False)
    assert status == 0, err
    assert _ns(out) == list(range(40))  # stdout holds the documents alone
    assert "% of 0.0 MiB" in err and " left" in err and "/s" in err
    assert err.rstrip().endswith("s") and "40 documents in " in err


def test_no_progress_when_stdout_is_the_same_terminal(daemon, short_dir):
    path = short_dir / "docs.jsonl"
    path.write_text("".join(json.dumps({"n": n, "sleep": 0.05, "text": "hi"}) + "\n" for n in range(20)))
    err, out, status = _run_on_terminals(daemon, path, stdout_is_terminal=True)
    assert (status, err) == (0, "")
    assert len(out.splitlines()) == 20
