"""expertctl, run as a real subprocess against a real daemon."""

import json
import subprocess
import sys
import time

from conftest import BIN


def test_call_with_keyword_and_positional_arguments(daemon):
    done = daemon.ctl("call", "fib", "n=5")
    assert (done.returncode, done.stdout, done.stderr) == (0, "8\n", "")
    assert daemon.ctl("call", "fib", "5").stdout == "8\n"
    assert daemon.ctl("call", "add", "2", "b=3").stdout == "5\n"


def test_call_values_parse_as_json_else_strings(daemon):
    done = daemon.ctl("call", "echo", "[1, 2]", "plain text", 'k={"a": null}', "s=word")
    assert json.loads(done.stdout) == {"args": [[1, 2], "plain text"], "kwargs": {"k": {"a": None}, "s": "word"}}


def test_opinion_adds_results_under_opinions(daemon):
    doc = {"id": 7, "text": "you stupid idiot"}
    done = daemon.ctl("opinion", "keywords", "document_length", input=json.dumps(doc))
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert out["id"] == 7 and out["text"] == doc["text"]
    assert out["opinions"]["keywords"]["flagged"] == ["idiot", "stupid"]
    # Each expert sees the document as it stands, earlier opinions included.
    assert out["opinions"]["document_length"] == {"chars": 16, "seen_opinions": ["keywords"]}


def test_opinion_stages_chain_through_a_shell_pipeline(daemon):
    sock = str(daemon.socket)
    ctl = f"{BIN / 'expertctl'} --socket {sock}"
    pipeline = f"echo '{{\"text\": \"hate\"}}' | {ctl} opinion keywords | {ctl} opinion document_length"
    done = subprocess.run(["bash", "-o", "pipefail", "-c", pipeline], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert out["opinions"]["keywords"]["categories"] == {"hostility": 1}
    assert out["opinions"]["document_length"]["seen_opinions"] == ["keywords"]


def test_opinion_lines_streams_in_order(daemon):
    docs = [{"n": i, "text": "x" * i} for i in range(60)]
    stdin = "\n".join(json.dumps(d) for d in docs) + "\n\n"
    done = daemon.ctl("opinion", "--lines", "--jobs", "4", "document_length", input=stdin)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert len(lines) == 60
    for i, line in enumerate(lines):
        out = json.loads(line)
        assert out["n"] == i and out["opinions"]["document_length"]["chars"] == i
    assert done.stderr == ""  # no progress line when stderr is not a terminal


def test_opinion_lines_bad_line_names_its_number(daemon):
    stdin = '{"text": "a"}\n{"text": \n{"text": "c"}\n'
    done = daemon.ctl("opinion", "--lines", "--jobs", "1", "document_length", input=stdin)
    assert done.returncode == 1
    assert done.stdout.count("\n") == 1  # the good line before it was written
    assert done.stderr.startswith("expertctl: stdin line 2: invalid JSON")
    assert done.stderr.count("\n") == 1


def test_bad_json_on_stdin(daemon):
    done = daemon.ctl("opinion", "keywords", input="{nope")
    assert done.returncode == 1
    assert done.stderr.startswith("expertctl: stdin: invalid JSON") and done.stderr.count("\n") == 1
    done = daemon.ctl("opinion", "keywords", input="[1, 2]")
    assert done.returncode == 1 and "must be a JSON object" in done.stderr


def test_failures_are_one_line_with_non_zero_status(daemon):
    unknown = daemon.ctl("call", "nope")
    assert unknown.returncode == 1 and unknown.stderr.count("\n") == 1
    assert "no expert named 'nope'" in unknown.stderr
    raised = daemon.ctl("call", "boom", "disk on fire")
    assert raised.returncode == 1 and raised.stderr.count("\n") == 1
    assert "ValueError: disk on fire" in raised.stderr
    traced = daemon.ctl("--traceback", "call", "boom")
    assert "Traceback" in traced.stderr and "testexperts.py" in traced.stderr


def test_no_daemon_exit_status_3(short_dir):
    done = subprocess.run([str(BIN / "expertctl"), "--socket", str(short_dir / "x.sock"), "ping"],
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 3
    assert done.stderr.count("\n") == 1 and "no expertd socket at" in done.stderr


def test_environment_variable_selects_the_socket(daemon):
    env = {"EXPERTD_SOCKET": str(daemon.socket), "PATH": "/usr/bin:/bin"}
    done = subprocess.run([str(BIN / "expertctl"), "call", "square", "n=3"], capture_output=True, text=True,
                          env=env, timeout=30)
    assert done.stdout == "9\n", done.stderr


def test_list_and_ping(daemon):
    listing = daemon.ctl("list")
    assert listing.returncode == 0
    assert "fib(n: int) -> int" in listing.stdout and "Naive recursive Fibonacci" in listing.stdout
    as_json = json.loads(daemon.ctl("list", "--json").stdout)
    assert {e["name"] for e in as_json} >= {"fib", "square", "keywords"}
    ping = daemon.ctl("ping")
    assert ping.returncode == 0 and ping.stdout.startswith("pong from worker")


def test_usage_error_exit_status_2(daemon):
    done = daemon.ctl("frobnicate")
    assert done.returncode == 2


def test_one_shot_call_is_fast(daemon):
    # Not a benchmark (see bench/), a guard against importing something heavy.
    start = time.perf_counter()
    done = daemon.ctl("call", "square", "n=2")
    assert done.stdout == "4\n"
    assert time.perf_counter() - start < 2.0


def test_client_import_stays_light():
    code = (
        "import sys, expertd.client, expertd.cli; "
        "print(sorted({m.split('.')[0] for m in sys.modules} & "
        "{'tensorflow', 'keras', 'numpy', 'psutil', 'daemon', 'concurrent', 'asyncio'}))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.stdout.strip() == "[]", done.stdout + done.stderr
