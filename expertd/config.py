"""Configuration: every setting declared once, as data.

:data:`SETTINGS` (:mod:`expertd.settings`) is the single source of truth.  Parsing and validation of the
INI file, the ``expertd`` command-line flags and ``--help`` text, and the
reference in docs/config.md (``python -m expertd.config``) are all derived
from it, so they cannot drift apart.

The file has one ``[expertd]`` section, one ``[expert:NAME]`` section per
expert and one ``[pipeline:NAME]`` section per named pipeline (validated and
expanded by :mod:`expertd.pipelines`).  Relative paths in the file are relative to the file's directory.
Every problem is reported as one :class:`~expertd.errors.ConfigError` line
naming the file, the section, the key and what to do.

Firefly's YAML config (a ``.yml``/``.yaml`` file) and Firefly's command line
(``expertd module.function ...``) are read by :mod:`expertd.firefly_config` into
the same raw sections the INI file is read into; :func:`build_config` validates
all three by one set of rules, and each error names the key as its source
writes it (``[expert:x] function``, ``functions.x.function``).

This module holds :class:`Config` and the file's loading and validation; the
settings table is :mod:`expertd.settings` (:data:`SETTINGS`, re-exported
here), and the value types it declares its settings with (sizes, durations,
paths, user lists...) and their parsers are in :mod:`expertd.settings_types`.
No state beyond module-level tables: every :func:`load_config` call builds a new
:class:`Config`, which memoizes the plans of the targets it is asked about
(:meth:`Config.plan`).  docs/config.md is rendered by :mod:`expertd.config_docs`.
"""

from __future__ import annotations

import configparser
import difflib
import ipaddress
import os
import re
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import cached_property
from typing import Any

from expertd.config_docs import render_markdown as _render_markdown
from expertd.errors import BadRequest, ConfigError, UnknownExpert
from expertd.firefly_config import (
    COMMAND_LINE,
    FUNCTIONS,
    Sections,
    Where,
    from_command_line,
    is_yaml,
    read_yaml,
    short_token_warning,
    user_socket,
)
from expertd.pipelines import EXPERT_NAME, NAME_RULE, PIPELINE_PREFIX, PipelineSpec, Plan, load_pipelines, plan_of
from expertd.settings import (  # (re-exported: the table is part of what config means)
    DEFAULT_MAX_BATCH,
    DEFAULT_MAX_ROWS,
    EXPERT_PREFIX,
    MAIN_SECTION,
    SETTINGS,
    Setting,
)
from expertd.settings_types import ACCESS_LOG_PATH, OPTIONAL_PATH, PATH, PATHS, TOKEN, _Invalid, parse_token
from expertd.tokens import resolve_token

MAX_PLANS = 1024  # Config.plan's memo is cleared past this: targets come from clients
# sockaddr_un.sun_path is 108 bytes including the terminating NUL.
MAX_SOCKET_PATH = 107


def is_loopback(host: str) -> bool:
    return host == "localhost" or ipaddress.ip_address(host).is_loopback


_MAIN_KEYS = {s.name: s for s in SETTINGS if s.section == MAIN_SECTION}
_EXPERT_KEYS = {s.name: s for s in SETTINGS if s.section == "expert"}
_PIPELINE_KEYS = {s.name: s for s in SETTINGS if s.section == "pipeline"}


@dataclass(frozen=True)
class ExpertSpec:
    """An ``[expert:NAME]`` section, validated."""

    name: str
    function: str = ""  # module:function, or
    model: str = ""  # the absolute path of a saved model
    max_rows: int = DEFAULT_MAX_ROWS  # (model experts)
    timeout: float | None = None  # None: the [expertd] timeout
    max_batch: int | None = None  # None: auto (DEFAULT_MAX_BATCH for a batched expert, else 1)
    batch_delay: float = 0.002
    path: str = ""  # firefly_routes: the URL path serving it; "" means /NAME (see route_path)

    @property
    def route_path(self) -> str:
        """The URL path of its Firefly route."""
        return self.path or "/" + self.name


class Config:
    """A validated configuration.

    Every ``[expertd]`` setting in :data:`SETTINGS` is an attribute, always
    set by :func:`load_config` (defaults come from SETTINGS alone).
    """

    path: str
    socket: str
    workers: int
    preload: list[str]
    pythonpath: list[str]
    log_level: str
    quiet_loggers: list[str]
    log_summary_interval: float
    log_format: str
    access_log: str
    max_frame: int
    socket_mode: int
    socket_group: int | None
    allow_uids: list[int]
    allow_gids: list[int]
    timeout: float
    max_requests: int
    max_requests_jitter: int | None
    max_memory: int
    http_listen: tuple[str, int] | None
    token: str  # the token in force: token, token_file's content or $EXPERTD_TOKEN (expertd.tokens)
    token_file: str
    public_health: bool
    firefly_routes: bool
    allow_origins: str
    max_depth: int
    max_args: int
    idle_timeout: float
    quarantine_after: int
    quarantine_window: float
    quarantine_time: float
    linger: float
    read_timeout: float
    graceful_timeout: float
    boot_timeout: float
    reload_timeout: float
    max_connections: int
    max_reply_buffer: int
    max_reply_buffer_per_connection: int
    max_connections_per_uid: int | None
    control_uids: list[int]
    control_gids: list[int]
    public_status: bool
    intra_op_threads: int | None
    inter_op_threads: int | None
    tf_log_level: str
    model_cache: str
    prepare_timeout: float

    def __init__(self, path: str, where: Where | None = None) -> None:
        self.path = path  # the config file's absolute path, or "command line" (Firefly's: expertd module.function)
        self.where: Where = where or _ini_where(path)  # (section, key) -> where a key was written, for messages
        self.warnings: list[str] = []  # logged at start (a short Firefly token)
        self.experts: dict[str, ExpertSpec] = {}
        self.pipelines: dict[str, PipelineSpec] = {}  # [pipeline:NAME] sections, nested ones expanded
        self._plans: dict[str, Plan] = {}  # target -> its plan (see plan)

    @cached_property
    def firefly(self) -> Any:
        """Firefly's routes (:class:`expertd.firefly.Routes`) with firefly_routes = yes, else None.

        Built at its first request (read on every HTTP request: once built, an attribute like the others).
        """
        if not self.firefly_routes:
            return None
        from expertd.firefly import Routes  # (only with firefly_routes: `python -m expertd.config` stays light)

        return Routes.of(self)

    def max_batch(self, name: str, batched: bool) -> int:
        """The most calls of expert ``name`` one batch may hold (1: not batched)."""
        spec = self.experts.get(name)
        if spec is not None and spec.max_batch is not None:
            return spec.max_batch if batched else 1
        return DEFAULT_MAX_BATCH if batched else 1

    def expert_timeout(self, name: str) -> float:
        """The request timeout of ``name``; never raises.

        An expert's own, else the daemon's.  A pipeline, or stages (a target with
        ',' or '+') that plan cleanly: the plan's timeout.  Anything else: the
        daemon's (the request fails on its own account).
        """
        spec = self.experts.get(name)
        if spec is not None:
            return spec.timeout if spec.timeout is not None else self.timeout
        if name in self.pipelines or "," in name or "+" in name:
            try:
                return self.plan(name).timeout
            except (BadRequest, UnknownExpert):
                pass
        return self.timeout

    def plan(self, target: str) -> Plan:
        """The plan of a request's target (see :func:`expertd.pipelines.plan_of`, which says what it raises)."""
        plan = self._plans.get(target)
        if plan is None:
            # plan_of asks expert_timeout about experts only, so this does not come back here.
            plan = plan_of(target, self.experts, self.pipelines, self.expert_timeout)
            if len(self._plans) >= MAX_PLANS:
                self._plans.clear()  # clients choose the targets: the memo stays bounded whatever they send
            self._plans[target] = plan
        return plan


def _resolve(path: str, base_dir: str) -> str:
    return os.path.normpath(os.path.join(base_dir, os.path.expanduser(path)))


def _suggest(word: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(word, choices, n=1)
    if close:
        return f"did you mean {close[0]!r}?"
    return "known settings: " + ", ".join(sorted(choices))


def _parse_setting(setting: Setting, raw: str, where: str, parse: Callable[[str], Any] | None = None) -> Any:
    try:
        return (parse or setting.type.parse)(raw)
    except _Invalid as exc:
        # A secret is never echoed: error lines reach terminals, journals and CI logs.
        shown = f"(the token given, {len(raw.strip())} characters)" if setting.type is TOKEN else repr(raw.strip())
        raise ConfigError(f"{where} = {shown}: {exc}") from None


_FIREFLY_FLAGS = {"token": "-t/--token", "http_listen": "-b/--bind"}  # (as a Firefly user typed them)


def _firefly_token(raw: str) -> str:
    """A token from Firefly's config or -t: any length (Firefly's docs use abcd1234), warned about in main."""
    return parse_token(raw, min_length=0)


def _ini_where(path: str) -> Where:
    def where(section: str, key: str | None = None) -> str:
        return f"{path}: [{section}]" + (f" {key}" if key else "")

    return where


_YAML_LINE = re.compile(r"\s*(---|- |[A-Za-z_][\w.-]*\s*:(\s|$))")  # (Firefly's "functions:", "token: x", "- item")


def _read_ini(path: str) -> Sections:
    parser = configparser.ConfigParser(interpolation=None, strict=True, empty_lines_in_values=False)
    parser.optionxform = str  # keep keys as written so misspellings are reported exactly
    try:
        with open(path, encoding="utf-8") as handle:
            parser.read_file(handle, source=path)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the config file: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except configparser.MissingSectionHeaderError as exc:
        # configparser says "File contains no section headers"; say what the line is and what to do.
        hint = ("it looks like YAML: name Firefly's YAML config .yml or .yaml" if _YAML_LINE.match(exc.line)
                else f"start the file with [{MAIN_SECTION}]")
        raise ConfigError(f"{path}: line {exc.lineno}: {exc.line.strip()!r} is outside any section; {hint}") from None
    except configparser.Error as exc:
        message = " ".join(str(exc).split())
        raise ConfigError(f"{path}: {message}") from None
    if MAIN_SECTION not in parser:
        raise ConfigError(f"{path}: no [{MAIN_SECTION}] section; start the file with [{MAIN_SECTION}]")
    return {section: dict(parser.items(section)) for section in parser.sections()}


def load_config(path: str, overrides: Mapping[str, str | None] | None = None) -> Config:
    """Read, validate and return the configuration in ``path``.

    ``overrides`` maps setting names to raw strings from the command line;
    they win over the file and are parsed by the same rules.  A ``.yml`` or
    ``.yaml`` file is Firefly's config; overrides with ``functions`` (and
    ``path`` :data:`~expertd.firefly_config.COMMAND_LINE`) are Firefly's
    command line (:mod:`expertd.firefly_config`).  All three are validated by
    :func:`build_config`.
    """
    overrides = overrides or {}
    cwd = os.getcwd()  # (expertd never changes directory: on reload this is still the directory it started in)
    if overrides.get(FUNCTIONS):
        sections, where = from_command_line((overrides[FUNCTIONS] or "").split(), cwd)
        return build_config(sections, where, COMMAND_LINE, cwd, overrides, firefly=True)
    if is_yaml(path):
        sections, where = read_yaml(path, cwd)
        return build_config(sections, where, path, os.path.dirname(os.path.abspath(path)), overrides, firefly=True)
    return build_config(_read_ini(path), _ini_where(path), path, os.path.dirname(os.path.abspath(path)), overrides)


def build_config(sections: Mapping[str, Mapping[str, str]], where: Where, path: str, base_dir: str,
                 overrides: Mapping[str, str | None], firefly: bool = False) -> Config:
    """Validate raw sections (``{section: {key: text}}``, from any format) into a :class:`Config`.

    ``where(section, key)`` names a key for error messages; relative paths are
    relative to ``base_dir``; ``firefly`` accepts a short token (warned about).
    """
    config = Config(path if path == COMMAND_LINE else os.path.abspath(path), where)
    pipelines: dict[str, dict[str, Any]] = {}  # validated together, once every expert is known
    for section, items in sections.items():
        if section == MAIN_SECTION:
            continue
        if not section.startswith((EXPERT_PREFIX, PIPELINE_PREFIX)):
            raise ConfigError(f"{where(section, None)}: unknown section; use [{MAIN_SECTION}], one "
                              f"[{EXPERT_PREFIX}NAME] per expert and one [{PIPELINE_PREFIX}NAME] per pipeline")
        kind, _, name = section.partition(":")
        if not EXPERT_NAME.match(name):
            raise ConfigError(f"{where(section, None)}: bad {kind} name {name!r}; {NAME_RULE}")
        keys = _PIPELINE_KEYS if kind == "pipeline" else _EXPERT_KEYS
        values = {}
        for key, raw in items.items():
            if key not in keys:
                raise ConfigError(f"{where(section, key)}: unknown setting; {_suggest(key, list(keys))}")
            if raw.strip() or keys[key].default is None:  # an empty optional key means its default
                values[key] = _parse_setting(keys[key], raw, where(section, key))
        if kind == "pipeline":
            pipelines[name] = values
            continue
        if "function" in values and "model" in values:
            raise ConfigError(f"{where(section, None)}: both function and model are set; keep one")
        if "function" not in values and "model" not in values:
            raise ConfigError(f"{where(section, None)}: no function or model; add 'function = module:function' or "
                              "'model = PATH'")
        if "model" in values:
            values["model"] = _resolve(values["model"], base_dir)
        elif "max_rows" in values:
            raise ConfigError(f"{where(section, 'max_rows')}: only model experts take it; remove it (a Python "
                              "expert passes max_rows= to expertd.Model)")
        config.experts[name] = ExpertSpec(name=name, **values)

    main = sections.get(MAIN_SECTION, {})
    for key in main:
        if key not in _MAIN_KEYS:
            raise ConfigError(f"{where(MAIN_SECTION, key)}: unknown setting; {_suggest(key, list(_MAIN_KEYS))}")
    for name, setting in _MAIN_KEYS.items():
        lenient = _firefly_token if firefly and name == "token" else None  # (Firefly's tokens may be short)
        if overrides.get(name) is not None:
            flag = _FIREFLY_FLAGS.get(name, setting.flag) if firefly else setting.flag
            value = _parse_setting(setting, overrides[name] or "", f"command line {flag}: {name}", lenient)
            if setting.type is PATH or (setting.type in (OPTIONAL_PATH, ACCESS_LOG_PATH) and value not in ("", "-")):
                value = os.path.abspath(value)
        else:
            raw = main.get(name, setting.default)
            value = _parse_setting(setting, raw or "", where(MAIN_SECTION, name), lenient)
            if setting.type is PATH or (setting.type in (OPTIONAL_PATH, ACCESS_LOG_PATH) and value not in ("", "-")):
                value = _resolve(value, base_dir)  # (relative to the config file, as every path in it)
            elif setting.type is PATHS:
                value = [_resolve(item, base_dir) for item in value]
        setattr(config, name, value)

    if firefly and "socket" not in sections.get(MAIN_SECTION, {}) and overrides.get("socket") is None:
        port = config.http_listen[1] if config.http_listen is not None else None  # (one socket per Firefly port)
        config.socket = user_socket(os.geteuid(), os.environ, tempfile.gettempdir(), port)
    if len(os.fsencode(config.socket)) > MAX_SOCKET_PATH:
        raise ConfigError(
            f"{where(MAIN_SECTION, 'socket')} = {config.socket!r}: path is {len(os.fsencode(config.socket))} bytes, "
            f"Unix sockets allow at most {MAX_SOCKET_PATH}; choose a shorter path"
        )
    token_given = config.token
    config.token = resolve_token(config.token, config.token_file, where(MAIN_SECTION, None), base_dir)
    if firefly and token_given:
        warning = short_token_warning(token_given, "command line -t" if overrides.get("token") else
                                      where(MAIN_SECTION, "token"))
        if warning:
            config.warnings.append(warning)
    if config.http_listen is not None and not config.token and not is_loopback(config.http_listen[0]):
        how = ("give a token (-t TOKEN, or token: in the YAML; clients send Authorization: Token TOKEN)" if firefly
               else "set token or token_file (clients send Authorization: Bearer TOKEN)")
        raise ConfigError(f"{where(MAIN_SECTION, 'http_listen')} = {config.http_listen[0]}:{config.http_listen[1]}: "
                          f"not a loopback address, and no token is set; {how} or listen on 127.0.0.1")
    if not config.experts:
        raise ConfigError(
            f"{path}: no [{EXPERT_PREFIX}NAME] sections; add one per expert, with function = module:function"
        )
    config.pipelines = load_pipelines(pipelines, path, config.experts)
    check_route_paths(config.experts, where)
    return config


NATIVE_PREFIXES = ("/call/", "/opinion/", "/map/", "/pipeline/")  # expertd's own POST routes


def check_route_paths(experts: Mapping[str, ExpertSpec], where: str | Where) -> None:
    """Refuse two experts on one Firefly path, or a path under one of expertd's own routes.

    ConfigError naming the file (``where``: its path, or a source's naming function), the expert and its path.
    """
    name_of = _ini_where(where) if isinstance(where, str) else where
    taken: dict[str, str] = {}
    # Each default path (/NAME) is its own; a clash is always an explicit path's, which the message names.
    for name, spec in sorted(experts.items(), key=lambda item: bool(item[1].path)):
        route = spec.route_path
        here = f"{name_of(EXPERT_PREFIX + name, 'path')} = {route}"
        if route.startswith(NATIVE_PREFIXES):
            raise ConfigError(f"{here}: under {route[:route.index('/', 1) + 1]}, one of expertd's own routes; "
                              "choose another path")
        if route in taken:
            raise ConfigError(f"{here}: already the path of expert {taken[route]}; give each expert its own path")
        taken[route] = name


def render_markdown() -> str:
    """The configuration reference, as committed in docs/config.md."""
    return _render_markdown(SETTINGS, ((MAIN_SECTION, f"[{MAIN_SECTION}]"), ("expert", f"[{EXPERT_PREFIX}NAME]"),
                                       ("pipeline", f"[{PIPELINE_PREFIX}NAME]")))


if __name__ == "__main__":
    print(render_markdown(), end="")
