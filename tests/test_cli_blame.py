"""expertctl blames what failed: a window too large for max_frame is split, a bad target stops the stream
once, a reload that outlasts --timeout exits 4 (timed out), not 1 (failed)."""

from __future__ import annotations

import json
import time

from conftest import ROOT

EXPERTS = {
    "echo": "testexperts:echo",
    "tlen": {"function": "batchexperts:text_length", "max_batch": "16"},
}


def _documents(count: int, big: int | None = None) -> str:
    """``count`` documents of about 300 bytes each (document ``big``: about 3000 bytes, past a 2K max_frame)."""
    return "".join(json.dumps({"n": n, "text": "x" * (3000 if n == big else 280)}) + "\n" for n in range(count))


def _ns(stdout: str) -> list[int]:
    return [json.loads(line)["n"] for line in stdout.splitlines()]


def test_a_window_too_large_for_max_frame_is_split_and_no_document_that_fits_is_blamed(make_daemon):
    daemon = make_daemon(EXPERTS, max_frame="2K")
    for on_error in ("stop", "skip", "record"):
        done = daemon.ctl("opinion", "--lines", "--window", "16", "--on-error", on_error, "tlen",
                          input=_documents(20))
        assert (done.returncode, done.stderr) == (0, ""), on_error
        outputs = [json.loads(line) for line in done.stdout.splitlines()]
        assert [out["n"] for out in outputs] == list(range(20))
        assert all(out["opinions"]["tlen"]["chars"] == 280 and "errors" not in out for out in outputs)


def test_in_a_split_window_only_the_document_too_large_on_its_own_is_blamed(make_daemon):
    daemon = make_daemon(EXPERTS, max_frame="2K")
    skipped = daemon.ctl("opinion", "--lines", "--window", "16", "--on-error", "skip", "tlen",
                         input=_documents(20, big=6))
    assert skipped.returncode == 1
    assert _ns(skipped.stdout) == [n for n in range(20) if n != 6]
    messages = skipped.stderr.splitlines()
    assert messages[0].startswith("expertctl: stdin line 7: ") and messages[0].endswith("[frame_too_large] (skipped)")
    assert messages[1:] == ["expertctl: 1 of 20 documents skipped (--on-error skip); exit status 1"]
    recorded = daemon.ctl("opinion", "--lines", "--window", "16", "--on-error", "record", "tlen",
                          input=_documents(20, big=6))
    assert recorded.returncode == 0, recorded.stderr
    outputs = [json.loads(line) for line in recorded.stdout.splitlines()]
    assert [out["n"] for out in outputs] == list(range(20))
    assert [n for n, out in enumerate(outputs) if "errors" in out] == [6]
    assert outputs[6]["errors"]["_request"]["code"] == "frame_too_large"
    assert outputs[6]["errors"]["_request"]["line"] == 7
    stopped = daemon.ctl("opinion", "--lines", "--window", "16", "tlen", input=_documents(20, big=6))
    assert stopped.returncode == 1 and _ns(stopped.stdout) == list(range(6))
    assert stopped.stderr.startswith("expertctl: stdin line 7: ") and "stopped there, 6 documents written" in \
        stopped.stderr


def test_a_bad_target_stops_the_stream_with_one_line_whatever_on_error_says(make_daemon):
    daemon = make_daemon(EXPERTS)
    for on_error in ("stop", "skip", "record"):
        done = daemon.ctl("opinion", "--lines", "echo,", "tlen", "--on-error", on_error,
                          input='{"text": "a"}\n' * 20)
        assert (done.returncode, done.stdout) == (1, ""), on_error
        assert done.stderr == "expertctl: target 'echo,,tlen': stage 2 is empty; separate stages with one ',' " \
                              "[bad_request]\n", on_error


CODE = '''
import time
from expertd import expert

{extra}

@expert
def version():
    return {mark!r}
'''


def test_reload_past_timeout_exits_4_and_says_the_reload_may_still_succeed(make_daemon, short_dir):
    code = short_dir / "code"
    code.mkdir()
    (code / "versioned.py").write_text(CODE.format(mark="v1", extra=""))
    daemon = make_daemon({"version": "versioned:version"}, pythonpath=f"{code} {ROOT / 'tests' / 'experts'}")
    (code / "versioned.py").write_text(CODE.format(mark="v2", extra="time.sleep(3)"))
    began = time.monotonic()
    done = daemon.ctl("reload", "--timeout", "1")
    assert done.returncode == 4, done.stderr
    assert time.monotonic() - began < 2.9
    assert done.stderr.startswith("expertctl: no reply to the reload within --timeout (1s)")
    assert done.stderr.count("\n") == 1
    deadline = time.monotonic() + 30
    while daemon.client().call("version") != "v2":  # the reload goes on, and succeeds
        assert time.monotonic() < deadline
        time.sleep(0.1)


def test_expertctl_help_lists_every_exit_status_timed_out_too():
    from expertd.cli import build_parser

    text = " ".join(build_parser().format_help().split())
    assert "3 no daemon reached, 4 reload or stop not ended within --timeout" in text


def test_the_progress_line_counts_bytes_read_as_the_inputs_size_does(make_daemon, short_dir):
    """Non-ASCII documents: the share read ends at 100% of the file's bytes (not short of it, as characters were)."""
    import io

    from expertd.cli_documents import STOP, Progress, Tally, input_size
    from expertd.cli_lines import _Stream
    from expertd.cli_windows import window_lines

    daemon = make_daemon(EXPERTS)
    path = short_dir / "docs.jsonl"
    path.write_text("".join(json.dumps({"n": n, "text": "é€😀" * 20}, ensure_ascii=False) + "\n" for n in range(30)),
                    encoding="utf-8")
    size = path.stat().st_size
    for stream in ("windows", "pipeline"):
        with open(path, encoding="utf-8") as source, daemon.client() as client:
            progress = Progress(io.StringIO(), input_size(source))
            assert progress.total == size
            if stream == "windows":
                window_lines(client, ["tlen"], {"tlen"}, 4, source, io.StringIO(), 2, Tally(STOP, progress))
            else:
                _Stream(client, "echo", {"on_error": "stop"}, Tally(STOP, progress), 2, progress).run(source,
                                                                                                       io.StringIO())
        assert (stream, progress.count, progress.taken) == (stream, 30, size)
