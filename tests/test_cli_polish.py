"""What a user meets first: --version, --help that explains arguments, usage errors, the messages' words."""

from __future__ import annotations

import argparse
import json
import subprocess

import pytest

from expertd import __version__
from expertd.cli import build_parser
from expertd.text import plural

from conftest import BIN, EXAMPLES, run_expertd, write_config


def _ctl(*args: str, **options: object) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "expertctl"), *args], capture_output=True, text=True, timeout=30, **options)


def test_version_on_both_commands():
    assert _ctl("--version").stdout == f"expertd {__version__}\n"
    done = run_expertd("--version")
    assert (done.returncode, done.stdout) == (0, f"expertd {__version__}\n")


def _subcommands() -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


@pytest.mark.parametrize("name", sorted(_subcommands()))
def test_every_subcommands_help_explains_it_and_its_arguments(name):
    command = _subcommands()[name]
    assert command.description, f"expertctl {name} --help has no description"
    for action in command._actions:
        if not isinstance(action, argparse._HelpAction):
            assert action.help and len(action.help) > 10, f"expertctl {name}: {action.dest} is not explained"


def test_call_help_on_the_command_line_says_how_arguments_are_read():
    done = _ctl("call", "--help")
    assert done.returncode == 0
    text = " ".join(done.stdout.split())  # (as wrapped for the terminal)
    assert "each parsed as JSON where it parses" in text and "KEY=VALUE is the keyword argument KEY" in text


@pytest.mark.parametrize("count", ["0", "-1", "two"])
def test_workers_needs_a_positive_number_or_it_is_a_usage_error(count, short_dir):
    done = _ctl("--socket", str(short_dir / "none.sock"), "workers", count)
    assert done.returncode == 2  # (refused before any daemon is asked: none listens there)
    assert f"expected a positive whole number, not {count!r}" in done.stderr


def test_no_daemon_message_names_the_socket_option(short_dir):
    done = _ctl("--socket", str(short_dir / "x.sock"), "ping")
    assert done.returncode == 3
    assert "--socket PATH or $EXPERTD_SOCKET" in done.stderr and "socket=" not in done.stderr


def test_check_counts_one_expert_in_the_singular(short_dir):
    done = run_expertd("--config", str(write_config(short_dir, {"add": "testexperts:add"})), "--check")
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[0].endswith(": OK, 1 expert: add")
    assert "trial worker: 0 models loaded, 0 after_fork hooks ran" in done.stdout  # (the trial worker's line too)


def test_plural_table():
    assert [plural(n, "document") for n in (0, 1, 2)] == ["0 documents", "1 document", "2 documents"]


def test_the_readmes_docs_jsonl_goes_through_the_example_experts(make_daemon):
    daemon = make_daemon({"keywords": "keywords:opinion", "textstats": "textstats:opinion"})
    with (EXAMPLES / "docs.jsonl").open() as stdin:
        done = _ctl("--socket", str(daemon.socket), "opinion", "--lines", "keywords", "textstats", stdin=stdin)
    assert (done.returncode, done.stderr) == (0, "")
    outputs = [json.loads(line) for line in done.stdout.splitlines()]
    assert len(outputs) == 5 and all(set(out["opinions"]) == {"keywords", "textstats"} for out in outputs)
    assert outputs[1]["opinions"]["keywords"]["flagged"] == ["idiot", "stupid"]
