"""Bad configurations fail at start-up with one clear line and a non-zero exit."""

from pathlib import Path

import pytest

from conftest import DEFAULT_EXPERTS, run_expertd, write_config

ROOT = Path(__file__).resolve().parent.parent


def _start(directory, text):
    config = directory / "bad.conf"
    config.write_text(text)
    return run_expertd("--config", str(config), "--socket", str(directory / "x.sock")), config


GOOD_EXPERT = "[expert:fib]\nfunction = fibs:fib\n"
PYTHONPATH = f"pythonpath = {ROOT / 'examples'} {ROOT / 'tests' / 'experts'}\n"


@pytest.mark.parametrize(
    "text, status, expected",
    [
        ("[expertd]\nwokers = 2\n" + GOOD_EXPERT, 2, "[expertd] wokers: unknown setting; did you mean 'workers'?"),
        ("[expertd]\nworkers = two\n" + GOOD_EXPERT, 2, "[expertd] workers = 'two': not a whole number"),
        ("[expertd]\nworkers = 0\n" + GOOD_EXPERT, 2, "[expertd] workers = '0': must be at least 1"),
        ("[expertd]\nmax_frame = lots\n" + GOOD_EXPERT, 2, "[expertd] max_frame = 'lots': not a size"),
        ("[expertd]\nread_timeout = soon\n" + GOOD_EXPERT, 2, "[expertd] read_timeout = 'soon': not a duration"),
        ("[expertd]\nlog_level = chatty\n" + GOOD_EXPERT, 2, "[expertd] log_level = 'chatty': unknown log level"),
        ("[expertd]\nsocket_mode = 999\n" + GOOD_EXPERT, 2, "[expertd] socket_mode = '999': not an octal file mode"),
        ("[expertd]\npublic_status = maybe\n" + GOOD_EXPERT, 2, "[expertd] public_status = 'maybe': not yes or no"),
        ("[expertd]\nmax_connections_per_uid = 0\n" + GOOD_EXPERT, 2,
         "[expertd] max_connections_per_uid = '0': must be at least 1"),
        ("[expertd]\ncontrol_uids = no-such-user-here\n" + GOOD_EXPERT, 2,
         "[expertd] control_uids = 'no-such-user-here': no user named 'no-such-user-here' on this system"),
        ("[expertd]\n[expert:fib]\nfunction = fibs:fib\nfuncton = x\n", 2,
         "[expert:fib] functon: unknown setting; did you mean 'function'?"),
        ("[expertd]\n[expert:fib]\n", 2,
         "[expert:fib]: no function or model; add 'function = module:function' or 'model = PATH'"),
        ("[expertd]\n[expert:fib]\nfunction = not a reference\n", 2, "[expert:fib] function = 'not a reference'"),
        ("[expertd]\n[expert:bad name]\nfunction = a:b\n", 2, "bad expert name 'bad name'"),
        ("[expertd]\n[experts:fib]\nfunction = a:b\n", 2, "[experts:fib]: unknown section"),
        ("[expertd]\n", 2, "no [expert:NAME] sections"),
        (GOOD_EXPERT, 2, "no [expertd] section"),
        ("workers = 2\n", 2, "line 1: 'workers = 2' is outside any section; start the file with [expertd]"),
        ("[expertd]\n[expertd]\n", 2, "already exists"),
        ("[expertd]\n" + PYTHONPATH + "[expert:x]\nfunction = nosuchmodule:f\n", 3,
         "[expert:x] function = nosuchmodule:f: no module named 'nosuchmodule'"),
        ("[expertd]\n" + PYTHONPATH + "[expert:x]\nfunction = fibs:fibb\n", 3,
         "module 'fibs' has no attribute 'fibb'"),
        ("[expertd]\n" + PYTHONPATH + "[expert:x]\nfunction = fibs.fibb\n", 3,
         "module 'fibs' has no attribute 'fibb'"),
        ("[expertd]\n" + PYTHONPATH + "[expert:x]\nfunction = raises_on_import:f\n", 3,
         "importing 'raises_on_import' failed: ZeroDivisionError: division by zero (at "),
        ("[expertd]\n" + PYTHONPATH + "[expert:x]\nfunction = badhooks:master_fails\n", 3,
         "before_fork hook badhooks._fail_in_master failed: RuntimeError: cannot read model file"),
        ("[expertd]\n" + PYTHONPATH + "preload = nosuchpreload\n" + GOOD_EXPERT, 3,
         "[expertd] preload: no module named 'nosuchpreload'"),
        ("[expertd]\npythonpath = does/not/exist\n" + GOOD_EXPERT, 3, "does/not/exist is not a directory"),
    ],
)
def test_bad_config_is_one_clear_line(short_dir, text, status, expected):
    done, config = _start(short_dir, text)
    assert done.returncode == status, done.stderr
    assert done.stderr.count("\n") == 1, done.stderr
    assert done.stderr.startswith(f"expertd: {config}"), done.stderr
    assert expected in done.stderr
    assert not (short_dir / "x.sock").exists()  # nothing half-started


def test_missing_config_file(short_dir):
    done = run_expertd("--config", str(short_dir / "absent.conf"))
    assert done.returncode == 2
    assert "absent.conf: cannot read the config file: No such file or directory" in done.stderr


def test_bad_command_line_override(short_dir):
    done = run_expertd("--config", str(write_config(short_dir)), "--workers", "many")
    assert done.returncode == 2
    assert "command line --workers: workers = 'many': not a whole number" in done.stderr


def test_socket_path_too_long(short_dir):
    done = run_expertd("--config", str(write_config(short_dir)), "--socket", "/tmp/" + "s" * 120)
    assert done.returncode == 2 and "Unix sockets allow at most 107" in done.stderr


def test_check_flag_validates_without_serving(short_dir):
    done = run_expertd("--config", str(write_config(short_dir)), "--check")
    assert done.returncode == 0 and f"OK, {len(DEFAULT_EXPERTS)} experts" in done.stdout


def test_shipped_default_config_loads():
    done = run_expertd("--config", str(ROOT / "etc" / "expertd.conf"), "--check")
    assert done.returncode == 0, done.stderr
    for name in ("fib", "square", "keywords", "textstats"):
        assert name in done.stdout
    # Its models loaded and hooks ran in a trial worker, and keywords was called with its example.
    assert "expertd: trial worker: 2 models loaded, 1 after_fork hook ran" in done.stdout
    assert "expertd: trial calls with their examples: keywords (" in done.stdout


def test_relative_pythonpath_is_relative_to_the_config_file(short_dir):
    (short_dir / "mine").mkdir()
    (short_dir / "mine" / "local_expert.py").write_text("def f():\n    return 42\n")
    config = short_dir / "rel.conf"
    config.write_text("[expertd]\npythonpath = mine\n[expert:f]\nfunction = local_expert:f\n")
    done = run_expertd("--config", str(config), "--check")
    assert done.returncode == 0, done.stderr


def test_docs_config_reference_is_generated_from_settings():
    from expertd.config import SETTINGS, render_markdown

    committed = (ROOT / "docs" / "config.md").read_text()
    assert committed == render_markdown()
    for setting in SETTINGS:
        assert f"`{setting.name}`" in committed


def test_help_lists_command_line_settings():
    done = run_expertd("--help")
    assert done.returncode == 0
    for flag in ("--config", "--socket", "--workers", "--log-level", "--check"):
        assert flag in done.stdout


def test_access_and_connection_settings(short_dir):
    from expertd.config import load_config

    defaults = load_config(str(write_config(short_dir)))
    assert (defaults.control_uids, defaults.control_gids, defaults.public_status) == ([], [], True)
    assert (defaults.max_connections, defaults.max_connections_per_uid) == (1000, None)  # None: auto, half
    config = load_config(str(write_config(short_dir, control_uids="root 4242", control_gids="0",
                                          public_status="no", max_connections_per_uid="20")))
    assert (config.control_uids, config.control_gids, config.public_status) == ([0, 4242], [0], False)
    assert config.max_connections_per_uid == 20


@pytest.mark.parametrize(("written", "expected"), [("logs/access.log", "{dir}/logs/access.log"), ("-", "-"), ("", "")])
def test_a_relative_access_log_is_relative_to_the_config_file_like_every_path_in_it(short_dir, written, expected):
    from expertd.config import load_config

    config = short_dir / "access.conf"
    config.write_text(f"[expertd]\naccess_log = {written}\n[expert:add]\nfunction = testexperts:add\n")
    assert load_config(str(config)).access_log == expected.format(dir=short_dir)
