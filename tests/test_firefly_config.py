"""Firefly's config file and Firefly's command line, taken unchanged: what a Firefly user types still works.

The YAML reader's errors and the names derived from a command line are table
tests of the pure functions (expertd.firefly_config, expertd.config.load_config);
the rest starts real daemons, from a Firefly YAML file and from Firefly's
command line, and calls them over TCP and over the Unix socket.
"""

from __future__ import annotations

import http.client
import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from expertd.client import Client
from expertd.config import load_config
from expertd.errors import ConfigError
from expertd.firefly_config import COMMAND_LINE, FUNCTIONS, derive_name, user_socket

from conftest import Daemon, free_port, run_expertd, wait_until

FUNCS = "def square(n):\n    return n * n\n\n\ndef cube(n):\n    return n * n * n\n"
SHORT_TOKEN = "abcd1234"  # (Firefly's docs' token: shorter than expertd asks of its own)


def _yaml(directory: Path, text: str, name: str = "config.yml") -> Path:
    path = directory / name
    path.write_text(text)
    return path


def _post(port: int, path: str, body: object, token: str | None) -> tuple[int, object]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {token}"} if token else {})}
        conn.request("POST", path, body=json.dumps(body).encode(), headers=headers)
        response = conn.getresponse()
        return response.status, json.loads(response.read())
    finally:
        conn.close()


GOOD_FUNCTIONS = "functions:\n  square:\n    function: funcs.square\n"


@pytest.mark.parametrize("text, expected", [
    ("functoins:\n  square:\n    function: funcs.square\n",
     "config.yml: functoins: unknown key; a Firefly config has version, token, functions, expertd"),
    ("functions:\n  square:\n    path: /sq\n",
     "config.yml: functions.square: no function; add function: module.function"),
    ("functions:\n  square:\n    function: nodot\n",
     "config.yml: functions.square.function = 'nodot': not a function reference"),
    ("functions:\n  square:\n    function: funcs.square\n    path: sq\n",
     "config.yml: functions.square.path = 'sq': expected a URL path such as /square"),
    ("functions:\n  square:\n    function: funcs.square\n    pth: /sq\n",
     "config.yml: functions.square.pth: unknown setting; did you mean 'path'?"),
    ("functions:\n  - funcs.square\n",
     "config.yml: functions: expected a mapping of names to {function: module.function}, found a list"),
    ("functions: {}\n", "config.yml: functions: expected a mapping of names to {function: module.function}, found an "
                        "empty one"),
    ("token: abc\n",
     "config.yml: functions: expected a mapping of names to {function: module.function}, found nothing"),
    ("functions:\n  square: funcs.square\n", "config.yml: functions.square: expected a mapping of settings"),
    ("functions:\n  square:\n    function: funcs.square\n    path: /x\n  cube:\n    function: funcs.cube\n"
     "    path: /x\n", "config.yml: functions.cube.path = /x: already the path of expert square; give each expert its "
                      "own path"),
    ("functions:\n  cube:\n    function: funcs.cube\n    path: /square\n  square:\n    function: funcs.square\n",
     "config.yml: functions.cube.path = /square: already the path of expert square"),
    ("functions:\n  square:\n    function: funcs.square\n    path: /call/square\n",
     "config.yml: functions.square.path = /call/square: under /call/, one of expertd's own routes; choose another "
     "path"),
    ("functions:\n  bad name:\n    function: funcs.square\n", "config.yml: functions.bad name: bad expert name"),
    ("functions:\n  square:\n    function: {module: funcs}\n",
     "config.yml: functions.square.function: expected a value (text, a number, yes/no or a list), found a mapping"),
    ("functions:\n  square: [\n", "config.yml: line 3, column 1: not valid YAML"),
    ("[expertd]\nworkers = 2\n", "config.yml: line 2, column 1: not valid YAML: expected '<document start>', but "
                                 "found '<scalar>' (a .yml/.yaml file is read as Firefly's YAML config; name an INI "
                                 "config .conf)"),
    ("functions:\n  square:\n    function: funcs.square\n  square:\n    function: funcs.cube\n",
     "config.yml: line 4, column 3: not valid YAML: square is set twice (first on line 2); keep one"),
    ("- funcs.square\n", "config.yml: expected Firefly's config, a mapping with functions: (and token:), found a list"),
    ("[expertd]\n", "config.yml: expected Firefly's config, a mapping with functions: (and token:), found a list (a "
                    ".yml/.yaml file is read as Firefly's YAML config; name an INI config .conf)"),
    ("", "config.yml: expected Firefly's config, a mapping with functions: (and token:), found nothing"),
    ("token: a b c d\n" + GOOD_FUNCTIONS,
     "config.yml: token = (the token given, 7 characters): a token is printable text with no spaces"),
    ("token: yes\n" + GOOD_FUNCTIONS, "config.yml: token: expected the token as text, found bool True; quote it"),
    ("functions:\n  on:\n    function: funcs.square\n",
     "config.yml: functions.True: a function's name must be text, found bool True; quote it"),
    ("base: &b {function: funcs.square}\nfunctions:\n  square: *b\n", "config.yml: base: unknown key"),
    ("expertd:\n  big: &big {" + ", ".join(f"k{i}: 1" for i in range(10_001)) + "}\n  merged: {<<: *big}\n"
     + GOOD_FUNCTIONS, "not valid YAML: merge keys (<<) expand to over 10000 keys"),
    ("token: [abcd1234]\n" + GOOD_FUNCTIONS, "config.yml: token: expected the token as text, found a list"),
    ("token: abcd1234\nexpertd:\n  token: abcd1234\n" + GOOD_FUNCTIONS,
     "config.yml: token: set both here and as expertd.token; keep one"),
    ("expertd:\n  wokers: 2\n" + GOOD_FUNCTIONS,
     "config.yml: expertd.wokers: unknown setting; did you mean 'workers'?"),
    ("expertd:\n  workers: two\n" + GOOD_FUNCTIONS, "config.yml: expertd.workers = 'two': not a whole number"),
    ("expertd: 4\n" + GOOD_FUNCTIONS, "config.yml: expertd: expected a mapping of expertd settings, found str '4'"),
    ("expertd:\n  http_listen: 0.0.0.0:8000\n" + GOOD_FUNCTIONS,
     "config.yml: expertd.http_listen = 0.0.0.0:8000: not a loopback address, and no token is set; give a token "
     "(-t TOKEN, or token: in the YAML; clients send Authorization: Token TOKEN)"),
])
def test_a_firefly_config_with_an_error_is_one_line_naming_the_file_and_the_key(tmp_path, text, expected):
    path = _yaml(tmp_path, text)
    with pytest.raises(ConfigError) as caught:
        load_config(str(path))
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(f"{path}: ")
    assert expected in message, message


def test_a_firefly_config_that_is_not_utf8_is_one_line_naming_the_file(tmp_path):
    path = tmp_path / "config.yml"
    path.write_bytes(b"functions:\n  square:\n    function: funcs.\xff\n")
    with pytest.raises(ConfigError, match=r"config\.yml: not UTF-8 text"):
        load_config(str(path))


@pytest.mark.parametrize("text, hint", [
    ("functions:\n  square:\n    function: funcs.square\n",
     "line 1: 'functions:' is outside any section; it looks like YAML: name Firefly's YAML config .yml or .yaml"),
    ("workers = 2\n", "line 1: 'workers = 2' is outside any section; start the file with [expertd]"),
])
def test_an_ini_file_without_a_section_says_which_line_and_hints_at_yaml(tmp_path, text, hint):
    path = tmp_path / "expertd.conf"
    path.write_text(text)
    with pytest.raises(ConfigError) as caught:
        load_config(str(path))
    assert str(caught.value) == f"{path}: {hint}"


def test_a_firefly_config_turns_on_fireflys_routes_and_defaults(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    elsewhere = tmp_path / "conf"
    elsewhere.mkdir()
    path = _yaml(elsewhere, "version: 1.0\ntoken: abcd1234\nfunctions:\n  square:\n    function: funcs.square\n"
                            "  cube:\n    function: funcs.cube\n    path: /power/3\n")
    config = load_config(str(path))
    assert config.path == str(path)
    assert config.firefly_routes is True
    assert config.http_listen == ("127.0.0.1", 8000)  # Firefly's default address
    assert config.token == SHORT_TOKEN  # accepted as Firefly accepts it...
    assert len(config.warnings) == 1 and "config.yml: token: the token is 8 characters" in config.warnings[0]  # ...said
    assert config.pythonpath == [str(elsewhere), str(tmp_path)]  # the file's directory, then the working directory
    assert {name: (spec.function, spec.route_path) for name, spec in config.experts.items()} == {
        "square": ("funcs.square", "/square"), "cube": ("funcs.cube", "/power/3")}


def test_the_expertd_map_of_a_firefly_config_tunes_the_daemon(tmp_path):
    (tmp_path / "code").mkdir()
    path = _yaml(tmp_path, "token: a-long-enough-token-for-expertd\nexpertd:\n  workers: 3\n  http_listen: "
                           "127.0.0.1:9100\n  pythonpath: [code]\n  public_health: yes\n  firefly_routes: no\n"
                           "  socket: run/x.sock\n" + GOOD_FUNCTIONS + "    timeout: 5s\n")
    config = load_config(str(path))
    assert (config.workers, config.http_listen, config.public_health, config.firefly_routes) == (
        3, ("127.0.0.1", 9100), True, False)
    assert config.pythonpath == [str(tmp_path / "code")]  # set: only what it names, relative to the file
    assert config.socket == str(tmp_path / "run" / "x.sock")
    assert config.experts["square"].timeout == 5.0
    assert config.warnings == []  # a strong token is not warned about


def test_command_line_settings_override_a_firefly_config(tmp_path):
    path = _yaml(tmp_path, "token: abcd1234\n" + GOOD_FUNCTIONS)
    config = load_config(str(path), {"http_listen": "127.0.0.1:9200", "token": "efgh5678", "workers": "2"})
    assert (config.http_listen, config.token, config.workers) == (("127.0.0.1", 9200), "efgh5678", 2)


def test_a_short_token_is_still_refused_in_an_ini_config(tmp_path):
    path = tmp_path / "expertd.conf"
    path.write_text("[expertd]\ntoken = abcd1234\n[expert:square]\nfunction = funcs.square\n")
    with pytest.raises(ConfigError,
                       match=r"\[expertd\] token = \(the token given, 8 characters\): a token needs at least 16"):
        load_config(str(path))


@pytest.mark.parametrize("reference, name", [
    ("funcs.square", "square"),
    ("a.b.c.predict", "predict"),
    ("m._private", "_private"),
])
def test_a_function_on_the_command_line_is_named_by_its_last_part(reference, name):
    assert derive_name(reference) == name


@pytest.mark.parametrize("functions, expected", [
    ("funcs.square", {"square": "/square"}),
    ("funcs.square pkg.mod.cube", {"square": "/square", "cube": "/cube"}),
])
def test_firefly_command_line_serves_each_function_under_its_derived_name(tmp_path, monkeypatch, functions, expected):
    monkeypatch.chdir(tmp_path)
    config = load_config(COMMAND_LINE, {FUNCTIONS: functions, "http_listen": None})
    assert config.path == COMMAND_LINE
    assert {name: spec.route_path for name, spec in config.experts.items()} == expected
    assert config.firefly_routes is True and config.http_listen == ("127.0.0.1", 8000)
    assert config.pythonpath == [str(tmp_path)]


@pytest.mark.parametrize("functions, expected", [
    ("funcs.square other.square", "command line: funcs.square and other.square are both served as /square (Firefly "
                                  "names a function by its last part); use a config file to name them apart"),
    ("funcs", "command line: 'funcs': not a function reference; name each function as module.function (Firefly's "
              "form), e.g. funcs.square"),
    ("funcs.square 1x.f", "command line: '1x.f': not a function reference"),
])
def test_a_bad_firefly_command_line_is_one_line(functions, expected):
    with pytest.raises(ConfigError) as caught:
        load_config(COMMAND_LINE, {FUNCTIONS: functions})
    assert str(caught.value).startswith(expected)


@pytest.mark.parametrize("euid, environ, port, expected", [
    (0, {"XDG_RUNTIME_DIR": "/run/user/0"}, 8000, "/run/expertd/expertd-8000.sock"),  # root: beside the default
    (1000, {"XDG_RUNTIME_DIR": "/run/user/1000"}, 8001, "/run/user/1000/expertd/expertd-8001.sock"),
    (1000, {}, 8000, "/tmp/expertd-1000/expertd-8000.sock"),  # a directory of the user's own in the temp dir
    (1000, {"XDG_RUNTIME_DIR": "relative"}, 8000, "/tmp/expertd-1000/expertd-8000.sock"),
    (1000, {}, None, "/tmp/expertd-1000/expertd.sock"),  # (no http_listen)
])
def test_a_firefly_daemon_started_by_a_user_puts_its_socket_where_the_user_may(euid, environ, port, expected):
    assert user_socket(euid, environ, "/tmp", port) == expected


def test_two_daemons_started_the_firefly_way_on_two_ports_get_two_sockets(tmp_path, monkeypatch):
    """Firefly servers run one per port; expertd started their way must not take one socket for all (nor the
    system daemon's default)."""
    monkeypatch.chdir(tmp_path)
    one = load_config(COMMAND_LINE, {FUNCTIONS: "funcs.square", "http_listen": "127.0.0.1:8001"})
    two = load_config(COMMAND_LINE, {FUNCTIONS: "funcs.square", "http_listen": "127.0.0.1:8002"})
    assert one.socket != two.socket and one.socket.endswith("expertd-8001.sock")
    assert "/run/expertd/expertd.sock" not in (one.socket, two.socket)
    given = load_config(COMMAND_LINE, {FUNCTIONS: "funcs.square", "socket": str(tmp_path / "x.sock")})
    assert given.socket == str(tmp_path / "x.sock")


def test_yaml_numbers_dates_and_merge_keys_read_as_a_firefly_user_wrote_them(tmp_path):
    path = _yaml(tmp_path, "token: 0x1F2E3D4C5B6A7980\nfunctions:\n  square: &base\n    function: funcs.square\n"
                 "    timeout: 5s\n  cube:\n    <<: *base\n    function: funcs.cube\n")
    config = load_config(str(path))
    assert config.token == "0x1F2E3D4C5B6A7980"  # (YAML 1.1 would make it 2246800662264969600)
    assert config.experts["cube"].function == "funcs.cube" and config.experts["cube"].timeout == 5.0
    assert config.experts["square"].function == "funcs.square"
    assert load_config(str(_yaml(tmp_path, "token: 12:30\n" + GOOD_FUNCTIONS))).token == "12:30"  # (not 750)


@pytest.mark.parametrize("source", ["yaml", "command line", "ini"])
def test_a_bad_token_is_never_echoed_in_the_error(tmp_path, source):
    secret = "hunter2 zebra-quokka-walrus"
    if source == "yaml":
        argv = ["-c", str(_yaml(tmp_path, f"token: {secret}\n" + GOOD_FUNCTIONS))]
    elif source == "ini":
        (tmp_path / "e.conf").write_text(f"[expertd]\ntoken = {secret}\n[expert:square]\nfunction = funcs.square\n")
        argv = ["-c", str(tmp_path / "e.conf")]
    else:
        argv = ["-t", secret, "funcs.square"]
    done = run_expertd(*argv, "--check")
    assert done.returncode == 2, done.stderr
    assert "hunter2" not in done.stderr and "quokka" not in done.stderr, done.stderr
    assert "(the token given, 27 characters)" in done.stderr, done.stderr


def test_firefly_command_line_and_a_config_together_are_refused(tmp_path):
    path = _yaml(tmp_path, GOOD_FUNCTIONS)
    done = run_expertd("-c", str(path), "funcs.square")
    assert done.returncode == 2
    assert done.stderr == (f"expertd: both --config {path} and functions (funcs.square) are given; name the functions "
                           "in the config file, or drop --config\n")


@pytest.mark.skipif(Path("/etc/expertd.conf").exists(), reason="this machine has a system config")
def test_neither_a_config_nor_functions_says_how_to_give_either():
    done = run_expertd()
    assert done.returncode == 2
    assert done.stderr == ("expertd: no config: /etc/expertd.conf does not exist; give --config FILE (INI, or "
                           "Firefly's YAML config.yml) or the functions to serve (expertd module.function ...)\n")


class FireflyDaemon(Daemon):
    """expertd started as a Firefly user starts firefly: its own argv, in the directory of their code."""

    def __init__(self, directory: Path, socket_path: Path, *argv: str) -> None:
        super().__init__(directory / "config.yml", socket_path, workers=1)
        self.directory = directory
        self.argv = argv

    def start(self, wait: bool = True, *extra: str) -> FireflyDaemon:
        self._log = open(self.log_path, "ab")
        self._log_start = self._log.tell()
        self.proc = subprocess.Popen([sys.executable, "-m", "expertd", *self.argv, "--socket", str(self.socket),
                                      "--workers", "1", *extra], cwd=self.directory, stdout=self._log,
                                     stderr=subprocess.STDOUT, env=self.env)
        if wait:
            self.wait_ready()
        return self


@pytest.fixture
def firefly_daemons(short_dir):
    started: list[Daemon] = []

    def start(*argv: str) -> Daemon:
        daemon = FireflyDaemon(short_dir, short_dir / f"f{len(started)}.sock", *argv)
        started.append(daemon)
        return daemon.start()

    yield start
    for daemon in started:
        daemon.kill()


def test_a_firefly_yaml_config_with_a_short_token_serves_over_tcp_and_the_unix_socket(short_dir, firefly_daemons):
    (short_dir / "funcs.py").write_text(FUNCS)
    port = free_port()
    _yaml(short_dir, f"version: 1.0\ntoken: {SHORT_TOKEN}\nexpertd:\n  http_listen: 127.0.0.1:{port}\n"
                     + GOOD_FUNCTIONS)
    daemon = firefly_daemons("-c", "config.yml")
    assert _post(port, "/call/square", {"n": 7}, SHORT_TOKEN) == (200, 49)
    assert _post(port, "/call/square", {"n": 7}, None)[0] == 401  # the token guards the TCP address
    assert Client(str(daemon.socket)).square(5) == 25
    assert daemon.log.count("the token is 8 characters, short enough to guess") == 1
    assert f"expertd: serving http://127.0.0.1:{port}/ and the Unix socket {daemon.socket}" in daemon.log


def test_firefly_command_line_serves_a_function_from_the_working_directory(short_dir, firefly_daemons):
    (short_dir / "funcs.py").write_text(FUNCS)
    port = free_port()
    token = "my-token"
    daemon = firefly_daemons("-b", f"127.0.0.1:{port}", "-t", token, "funcs.square", "funcs.cube")
    assert _post(port, "/call/square", {"n": 3}, token) == (200, 9)
    assert _post(port, "/call/cube", [2], token) == (200, 8)
    assert _post(port, "/call/square", {"n": 3}, "wrong-token")[0] == 401
    client = Client(str(daemon.socket))
    assert client.cube(3) == 27
    assert f"expertd: serving http://127.0.0.1:{port}/ and the Unix socket {daemon.socket}" in daemon.log
    assert "command line -t: the token is 8 characters" in daemon.log

    # A reload rebuilds the config from the same command line, and imports the code again.
    (short_dir / "funcs.py").write_text(FUNCS.replace("n * n * n", "n * n * n + 1"))
    done = daemon.ctl("reload")
    assert done.returncode == 0, done.stderr + daemon.log
    assert wait_until(lambda: client.cube(3) == 28)
    status = daemon.ctl("status")
    assert "config command line" in status.stdout, status.stdout
    assert "reloading command line" in daemon.log


def test_reloading_a_changed_firefly_config_adds_its_new_function(short_dir, firefly_daemons):
    (short_dir / "funcs.py").write_text(FUNCS)
    port = free_port()
    path = _yaml(short_dir, f"token: {SHORT_TOKEN}\nexpertd:\n  http_listen: 127.0.0.1:{port}\n" + GOOD_FUNCTIONS)
    daemon = firefly_daemons("-c", str(path))
    client = Client(str(daemon.socket))
    assert [expert["name"] for expert in client.experts()] == ["square"]
    path.write_text(path.read_text() + "  cube:\n    function: funcs.cube\n")
    daemon.send_signal(signal.SIGHUP)
    assert wait_until(lambda: "reload done: generation 2 serving" in daemon.log, timeout=30), daemon.log
    assert sorted(expert["name"] for expert in client.experts()) == ["cube", "square"]
    assert client.cube(2) == 8
    assert _post(port, "/call/cube", {"n": 4}, SHORT_TOKEN) == (200, 64)


def test_a_firefly_config_with_an_error_exits_2_with_one_line_and_leaves_no_socket(short_dir):
    path = _yaml(short_dir, "functions:\n  square:\n    function: funcs.square\n    path: sq\n")
    sock = short_dir / "x.sock"
    done = run_expertd("-c", str(path), "--socket", str(sock))
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1
    assert done.stderr.startswith(f"expertd: {path}: functions.square.path = 'sq': expected a URL path"), done.stderr
    assert not sock.exists()


def test_a_firefly_function_that_does_not_import_names_the_file_and_key(short_dir):
    (short_dir / "funcs.py").write_text(FUNCS)
    path = _yaml(short_dir, "functions:\n  square:\n    function: funcs.sqare\n")
    done = run_expertd("-c", str(path), "--socket", str(short_dir / "x.sock"))
    assert done.returncode == 3
    assert done.stderr == (f"expertd: {path}: functions.square.function = funcs.sqare: module 'funcs' has no "
                           "attribute 'sqare'; check the spelling\n")


def test_firefly_command_line_does_not_read_the_system_config(short_dir):
    (short_dir / "funcs.py").write_text(FUNCS)
    done = subprocess.run([sys.executable, "-m", "expertd", "funcs.square", "--check"], cwd=short_dir,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("expertd: command line: OK, 1 expert: square\n")


# ------------------------------------------------- Firefly's own client against expertd started Firefly's two ways
FIREFLY_DOCS_FUNCS = '''def square(n):
    """Returns the square of a number."""
    return n ** 2


def cube(n):
    return n ** 3


def predict(a):
    if len(a) != 2:
        raise ValueError(f"expected 2 features, got {len(a)}")
    return int(a[0] < a[1])
'''
FIREFLY_DOCS_CONFIG = '''# config.yml, as in Firefly's documentation
version: 1.0
token: "abcd1234"
functions:
  square:
    path: "/square"
    function: "funcs.square"
  cube:
    path: "/cube"
    function: "funcs.cube"
  predict:
    path: "/predict"
    function: "funcs.predict"
'''


@pytest.mark.parametrize("started", ["firefly -c config.yml", "firefly -t TOKEN funcs.square ..."])
def test_fireflys_own_client_works_unchanged_against_expertd_started_as_firefly_is(short_dir, firefly_daemons,
                                                                                   started):
    """Every call Firefly's documentation shows, by firefly-python 0.1.15's own client, with only 'firefly'
    changed to 'expertd' in the command line (plus -b: the tests' port, not Firefly's default 8000)."""
    import firefly
    from firefly.validator import ValidationError

    (short_dir / "funcs.py").write_text(FIREFLY_DOCS_FUNCS)
    (short_dir / "config.yml").write_text(FIREFLY_DOCS_CONFIG)
    port = free_port()
    if started.startswith("firefly -c"):
        firefly_daemons("-c", "config.yml", "-b", f"127.0.0.1:{port}")
    else:
        firefly_daemons("-b", f"127.0.0.1:{port}", "--token", SHORT_TOKEN, "funcs.square", "funcs.cube",
                        "funcs.predict")
    url = f"http://127.0.0.1:{port}/"

    client = firefly.Client(url, auth_token=SHORT_TOKEN)
    assert client.square(n=4) == 16
    assert client.cube(n=3) == 27
    assert client.predict(a=[5, 8]) == 1
    assert client.square.__doc__ == "Returns the square of a number."
    with pytest.raises(ValidationError, match="missing a required argument: 'n'"):
        client.square(m=4)
    with pytest.raises(firefly.client.FireflyError, match=r"^ValueError: expected 2 features, got 3$"):
        client.predict(a=[1, 2, 3])
    with pytest.raises(firefly.client.FireflyError, match="Requested function not found"):
        client.call_func("cubed", n=2)  # (a path GET / does not list: Firefly's client tries /cubed)
    with pytest.raises(firefly.client.FireflyError, match="403"):
        firefly.Client(url, auth_token="not-abcd1234").square(n=4)

    # curl -d '{"n": 4}' -H "Authorization: Token abcd1234" http://127.0.0.1:PORT/square, as Firefly's docs
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request("POST", "/square", body=b'{"n": 4}', headers={"Authorization": f"Token {SHORT_TOKEN}"})
    response = conn.getresponse()
    assert (response.status, json.loads(response.read())) == (200, 16)
    conn.request("POST", "/square", body=b'{"n": 4}')
    response = conn.getresponse()
    assert (response.status, json.loads(response.read())) == (403, {"error": "Invalid auth token"})
    conn.close()
