"""Firefly's two ways of naming what to serve, read into expertd's settings: its YAML file and its command line.

A Firefly user starts ``firefly -c config.yml`` (a YAML map of names to
``module.function``, a token) or ``firefly -b HOST:PORT -t TOKEN
funcs.square``; ``expertd`` takes both unchanged.  Either becomes the same raw
form the INI file is read into: ``{section: {key: raw text}}`` (``expertd``,
``expert:NAME``), together with a function that names where each key came
from, for error messages (``config.yml: functions.square.function``).
:func:`expertd.config.load_config` validates that with the rules of the INI
file, so the two formats cannot drift apart.

What a Firefly source adds to the INI file's defaults (:func:`firefly_defaults`):
``firefly_routes = yes``, ``http_listen = 127.0.0.1:8000`` (Firefly's default
address), the working directory (and the YAML file's directory) on
``pythonpath``, as Firefly puts ``""`` on sys.path, and for a user other than
root a socket in a directory of the user's own (:func:`user_socket`).  A short
token (Firefly's docs use ``abcd1234``) is accepted, with a warning.

No state: pure functions of their arguments (PyYAML is imported only to read
a YAML file).
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from typing import Any

from expertd.errors import ConfigError
from expertd.protocol import DEFAULT_SOCKET
from expertd.settings import EXPERT_PREFIX, MAIN_SECTION
from expertd.settings_types import MIN_TOKEN_LENGTH, TOKEN_HINT

Sections = dict[str, dict[str, str]]
Where = Callable[[str, "str | None"], str]  # (section, key or None) -> "FILE: where", for error messages

COMMAND_LINE = "command line"  # Config.path of a config made from Firefly's command line (no file)
FUNCTIONS = "functions"  # the overrides' key that carries the command line's functions, kept across reloads
FIREFLY_ADDRESS = "127.0.0.1:8000"  # Firefly's default -b
YAML_SUFFIXES = (".yml", ".yaml")
_TOP_KEYS = ("version", "token", "functions", MAIN_SECTION)
_REFERENCE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*\.([A-Za-z_][A-Za-z0-9_]*)")


def is_yaml(path: str) -> bool:
    """Whether ``path`` is read as Firefly's YAML (by its extension) rather than as the INI file."""
    return path.lower().endswith(YAML_SUFFIXES)


def derive_name(reference: str) -> str:
    """The function's name as Firefly derives it from ``module.function``: its last component."""
    return reference.rsplit(".", 1)[-1]


def user_socket(euid: int, environ: Mapping[str, str], tmpdir: str, port: int | None) -> str:
    """Where a Firefly-started daemon puts its Unix socket when the config does not say.

    Named by its HTTP port (``expertd-8000.sock``), so that several daemons
    started the Firefly way on one host (one per port, as Firefly servers
    run) each get their own, and none takes a system daemon's default socket.
    Root: beside expertd's default.  Anyone else cannot create /run/expertd:
    the user's runtime directory ($XDG_RUNTIME_DIR, private to the user), else
    a directory of the user's own under the temporary directory, named by uid
    (the socket-directory checks refuse it, with one line, if another user
    made it first).
    """
    name = f"expertd-{port}.sock" if port else "expertd.sock"
    if euid == 0:
        return os.path.join(os.path.dirname(DEFAULT_SOCKET), name)
    runtime = environ.get("XDG_RUNTIME_DIR", "")
    if runtime.startswith("/"):
        return os.path.join(runtime, "expertd", name)
    return os.path.join(tmpdir, f"expertd-{euid}", name)


def firefly_defaults(main: dict[str, str], directories: list[str]) -> None:
    """Fill in what a Firefly source means where its ``expertd`` settings leave it unsaid (the socket: see
    :func:`user_socket`, named once the address is known)."""
    main.setdefault("firefly_routes", "yes")
    main.setdefault("http_listen", FIREFLY_ADDRESS)
    main.setdefault("pythonpath", " ".join(dict.fromkeys(directories)))  # (once each, in order)


def _scalar(value: Any) -> str | None:
    """A YAML value as the INI file's raw text; None if it is not one (a mapping, say)."""
    if isinstance(value, bool):  # (YAML reads yes/no/true/false as booleans)
        return "yes" if value else "no"
    if value is None:
        return ""
    if isinstance(value, (str, int, float)):
        return str(value)
    if isinstance(value, list) and all(isinstance(item, (str, int, float)) for item in value):
        return " ".join(str(item) for item in value)  # (pythonpath, preload, quiet_loggers as YAML lists)
    return None


def _yaml_where(path: str, top: set[str]) -> Where:
    def where(section: str, key: str | None = None) -> str:
        if section == MAIN_SECTION:
            if key in top:
                return f"{path}: {key}"
            return f"{path}: {MAIN_SECTION}" + (f".{key}" if key else "")
        name = section.partition(":")[2]
        return f"{path}: functions.{name}" + (f".{key}" if key else "")

    return where


def _values(mapping: Any, where: str, what: str) -> dict[str, str]:
    if not isinstance(mapping, dict):
        raise ConfigError(f"{where}: expected a mapping of {what}, found {_kind(mapping)}")
    values = {}
    for key, value in mapping.items():
        raw = _scalar(value)
        if not isinstance(key, str) or raw is None:
            raise ConfigError(f"{where}.{key}: expected a value (text, a number, yes/no or a list), found "
                              f"{_kind(value)}")
        values[key] = raw
    return values


def _kind(value: Any) -> str:
    return {dict: "a mapping", list: "a list", type(None): "nothing"}.get(type(value), f"{type(value).__name__} "
                                                                                       f"{value!r}")


MAX_MERGED_KEYS = 10_000  # a mapping's keys after merge keys (<<) are expanded: merges of merges grow exponentially
_MERGE = "tag:yaml.org,2002:merge"


def _unique_keys_loader(yaml: Any) -> type:
    """yaml.SafeLoader refusing a key given twice in one mapping (it keeps the last; the INI reader refuses too),
    reading numbers and dates as the text written, and bounding what merge keys expand to."""

    class UniqueKeys(yaml.SafeLoader):
        def construct_mapping(self, node: Any, deep: bool = False) -> Any:
            seen: dict[Any, int] = {}
            for key_node, _value in node.value:
                if key_node.tag == _MERGE:  # (merged keys may be overridden: that is what merging is for)
                    continue
                key = self.construct_object(key_node, deep=deep)
                if isinstance(key, (str, int, float, bool)) and key in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"{key} is set twice (first on line {seen[key]}); keep one", key_node.start_mark)
                seen[key] = key_node.start_mark.line + 1
            return super().construct_mapping(node, deep)

        def flatten_mapping(self, node: Any) -> None:
            super().flatten_mapping(node)  # (recursive through this method: every level is bounded)
            if len(node.value) > MAX_MERGED_KEYS:
                raise yaml.constructor.ConstructorError(
                    None, None, f"merge keys (<<) expand to over {MAX_MERGED_KEYS} keys", node.start_mark)

    for tag in ("int", "float", "timestamp"):  # (a token or a name is what was written, not YAML 1.1's number)
        UniqueKeys.add_constructor(f"tag:yaml.org,2002:{tag}", lambda loader, node: loader.construct_scalar(node))
    return UniqueKeys


def read_yaml(path: str, cwd: str) -> tuple[Sections, Where]:
    """Read Firefly's YAML config into sections; ConfigError (one line naming file and key) if it is not one.

    ``cwd`` (the working directory at start) and the file's directory go on
    pythonpath unless the ``expertd`` map sets it.  Scalars are read as the
    text written (``token: 0x1F`` is the token ``0x1F``, not a number; YAML 1.1
    would read it as 31), except yes/no and nothing; merge keys (``<<: *base``)
    work as in ``yaml.safe_load``.
    """
    import yaml  # (only for a YAML file: the INI path and the client never load it)

    try:
        with open(path, encoding="utf-8") as handle:
            text = handle.read()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the config file: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    # An INI file named .yml fails below; say why rather than leave a YAML parser's complaint alone.
    hint = (" (a .yml/.yaml file is read as Firefly's YAML config; name an INI config .conf)"
            if re.match(r"\s*\[\w[^\]\n]*\]\s*$", text.split("\n", 1)[0]) else "")
    try:
        document = yaml.load(text, Loader=_unique_keys_loader(yaml))  # (a SafeLoader: builds plain data only)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        problem = getattr(exc, "problem", None) or str(exc)
        at = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        raise ConfigError(f"{path}: {at}not valid YAML: {' '.join(str(problem).split())}{hint}") from None
    if not isinstance(document, dict):
        raise ConfigError(f"{path}: expected Firefly's config, a mapping with functions: (and token:), found "
                          f"{_kind(document)}{hint}")
    for key in document:
        if key not in _TOP_KEYS:
            raise ConfigError(f"{path}: {key}: unknown key; a Firefly config has {', '.join(_TOP_KEYS)} (expertd's "
                              f"own settings go in the {MAIN_SECTION}: map)")
    main = _values(document.get(MAIN_SECTION) or {}, f"{path}: {MAIN_SECTION}", "expertd settings")
    top = set()
    if document.get("token") is not None:
        if "token" in main:
            raise ConfigError(f"{path}: token: set both here and as {MAIN_SECTION}.token; keep one")
        token = document["token"]
        if not isinstance(token, str):  # (yes, no, on, off... are YAML's booleans: a token must be quoted)
            raise ConfigError(f"{path}: token: expected the token as text, found {_kind(token)}; quote it "
                              "(token: \"...\")")
        main["token"] = token
        top.add("token")
    functions = document.get("functions")
    if not isinstance(functions, dict) or not functions:
        raise ConfigError(f"{path}: functions: expected a mapping of names to {{function: module.function}}, found "
                          f"{_kind(functions) if functions != {} else 'an empty one'}")
    sections: Sections = {MAIN_SECTION: main}
    for name, spec in functions.items():
        where = f"{path}: functions.{name}"
        if not isinstance(name, str):  # (on:, yes:, null: are YAML's booleans and nothing, not names)
            raise ConfigError(f"{where}: a function's name must be text, found {_kind(name)}; quote it")
        values = _values(spec, where, "settings (function: module.function, path: /NAME)")
        if "function" not in values and "model" not in values:
            raise ConfigError(f"{where}: no function; add function: module.function")
        sections[f"{EXPERT_PREFIX}{name}"] = values
    firefly_defaults(main, [os.path.dirname(os.path.abspath(path)), cwd])
    return sections, _yaml_where(path, top)


def _command_line_where(section: str, key: str | None = None) -> str:
    if section == MAIN_SECTION:
        return COMMAND_LINE + (f" {key}" if key else "")
    name = section.partition(":")[2]
    return f"{COMMAND_LINE}: {name}" + (f" {key}" if key and key != "function" else "")


def from_command_line(functions: list[str], cwd: str) -> tuple[Sections, Where]:
    """Firefly's command line (``expertd funcs.square ...``) as sections; ConfigError for a bad one."""
    if not functions:
        raise ConfigError(f"{COMMAND_LINE}: no functions; name them as module.function, e.g. expertd funcs.square")
    sections: Sections = {MAIN_SECTION: {}}
    for reference in functions:
        if not _REFERENCE.fullmatch(reference):
            raise ConfigError(f"{COMMAND_LINE}: {reference!r}: not a function reference; name each function as "
                              "module.function (Firefly's form), e.g. funcs.square")
        name = derive_name(reference)
        section = f"{EXPERT_PREFIX}{name}"
        if section in sections:
            raise ConfigError(f"{COMMAND_LINE}: {sections[section]['function']} and {reference} are both served as "
                              f"/{name} (Firefly names a function by its last part); use a config file to name "
                              "them apart")
        sections[section] = {"function": reference}
    firefly_defaults(sections[MAIN_SECTION], [cwd])
    return sections, _command_line_where


def serving_line(config: Any) -> str:
    """Where a daemon serves, for the line printed at start (as Firefly prints ``http://127.0.0.1:8000/``)."""
    if config.http_listen is None:
        return f"the Unix socket {config.socket}"
    host, port = config.http_listen
    return f"http://{f'[{host}]' if ':' in host else host}:{port}/ and the Unix socket {config.socket}"


def short_token_warning(token: str, where: str) -> str | None:
    """The warning for a Firefly token shorter than expertd asks of its own (accepted, for a drop-in)."""
    if not token or len(token) >= MIN_TOKEN_LENGTH:
        return None
    return (f"{where}: the token is {len(token)} characters, short enough to guess; accepted as Firefly accepts "
            f"it, but make a strong one ({MIN_TOKEN_LENGTH}+ characters, e.g. the output of: {TOKEN_HINT})")
