"""Configuration: every setting declared once, as data.

:data:`SETTINGS` is the single source of truth.  Parsing and validation of the
INI file, the ``expertd`` command-line flags and ``--help`` text, and the
reference in docs/config.md (``python -m expertd.config``) are all derived
from it, so they cannot drift apart.

The file has one ``[expertd]`` section, one ``[expert:NAME]`` section per
expert and one ``[pipeline:NAME]`` section per named pipeline (validated and
expanded by :mod:`expertd.pipelines`).  Relative paths in the file are relative to the file's directory.
Every problem is reported as one :class:`~expertd.errors.ConfigError` line
naming the file, the section, the key and what to do.

This module holds the settings table, :class:`Config` and the file's
loading and validation; the value types the table declares its settings with
(sizes, durations, paths, user lists...) and their parsers are in
:mod:`expertd.settings_types` (re-exported here).  No state beyond those
module-level tables: every :func:`load_config` call builds a new
:class:`Config`, which memoizes the plans of the targets it is asked about
(:meth:`Config.plan`).  docs/config.md is rendered by :mod:`expertd.config_docs`.
"""

from __future__ import annotations

import configparser
import difflib
import ipaddress
import os
from dataclasses import dataclass
from typing import Any

from expertd.config_docs import render_markdown as _render_markdown
from expertd.errors import BadRequest, ConfigError, UnknownExpert
from expertd.pipelines import EXPERT_NAME, NAME_RULE, PIPELINE_PREFIX, PipelineSpec, Plan, load_pipelines, plan_of
from expertd.protocol import DEFAULT_SOCKET
from expertd.settings_types import (
    ADDRESS_OR_OFF,
    BATCH_DELAY,
    BOOL,
    DURATION,
    DURATION_OR_OFF,
    FUNCTION,
    GROUP,
    GROUPS,
    INT_WORKERS,
    JITTER,
    LOG_LEVEL,
    MAX_BATCH,
    MODE,
    MODULES,
    ON_ERROR_MODE,
    OPTIONAL_PATH,
    PATH,
    PATHS,
    PER_UID,
    SIZE,
    SIZE_OR_OFF,
    STAGES,
    THREADS,
    TOKEN,
    USERS,
    _int_at_least,
    _Invalid,
    _Type,
)

MAIN_SECTION = "expertd"
EXPERT_PREFIX = "expert:"
DEFAULT_MAX_ROWS = 4096  # a model expert's max_rows
DEFAULT_MAX_BATCH = 32  # a batched expert's max_batch = auto
MAX_PLANS = 1024  # Config.plan's memo is cleared past this: targets come from clients
# sockaddr_un.sun_path is 108 bytes including the terminating NUL.
MAX_SOCKET_PATH = 107


def is_loopback(host: str) -> bool:
    return host == "localhost" or ipaddress.ip_address(host).is_loopback


@dataclass(frozen=True)
class Setting:
    """One configuration key: where it lives, its type, default and documentation."""

    name: str
    section: str  # MAIN_SECTION, or "expert"/"pipeline" for keys of [expert:NAME]/[pipeline:NAME] sections
    type: _Type
    default: str | None  # as written in the file; None means required
    help: str
    cli: bool = False  # also settable as --NAME on the expertd command line

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")


SETTINGS: tuple[Setting, ...] = (
    Setting("socket", MAIN_SECTION, PATH, DEFAULT_SOCKET,
            "Path of the listening Unix socket. Clients find it through EXPERTD_SOCKET or this default. "
            "A stale socket file left by a dead daemon is replaced; a live daemon on the path is refused. "
            "Its directory is created (mode 0755) if missing. Only root and the daemon's user may be able "
            "to write to it, or to any directory above it except sticky ones such as /tmp (which cannot be "
            "the socket's own directory): one owned by another user, or writable by others or by a group "
            "(but the owner's private group), stops start-up with one line naming it, since whoever can "
            "write there could swap the socket. The file is created mode 0600 and then given socket_group "
            "and socket_mode without following a symlink.",
            cli=True),
    Setting("workers", MAIN_SECTION, INT_WORKERS, "auto",
            "Number of worker processes forked from the master; auto means one per CPU core.",
            cli=True),
    Setting("preload", MAIN_SECTION, MODULES, "",
            "Modules imported once in the master before the experts (e.g. tensorflow), so that every "
            "worker shares them copy-on-write. Importing is safe; starting TensorFlow's runtime is not "
            "(see docs/experts.md)."),
    Setting("pythonpath", MAIN_SECTION, PATHS, "",
            "Directories prepended to sys.path before importing experts; relative ones are relative "
            "to the config file."),
    Setting("log_level", MAIN_SECTION, LOG_LEVEL, "info",
            "Logging threshold. debug logs one line per request.", cli=True),
    Setting("max_frame", MAIN_SECTION, SIZE, "16M",
            "Largest request body accepted. Checked from the frame header before the body is read; "
            "a larger request gets a frame_too_large error and the connection is closed."),
    Setting("socket_mode", MAIN_SECTION, MODE, "0660",
            "File mode of the socket file. Anyone who can write to the socket can call every expert."),
    Setting("socket_group", MAIN_SECTION, GROUP, "",
            "Group given to the socket file (with socket_mode 0660, its members may call the experts); "
            "empty keeps the daemon's own group."),
    Setting("allow_uids", MAIN_SECTION, USERS, "",
            "If set (with or without allow_gids), only these users may connect, checked with SO_PEERCRED "
            "on accept; root and the daemon's own user are always allowed. A refused peer is answered with "
            "access_denied and closed at once (it never counts against max_connections), and logged with its uid "
            "and pid, at most one line per uid per 10s with the count of those left out."),
    Setting("allow_gids", MAIN_SECTION, GROUPS, "",
            "If set, members of these groups (primary or supplementary) may connect too."),
    Setting("control_uids", MAIN_SECTION, USERS, "",
            "Users who may send control requests (expertctl reload, stop, workers N), besides root and the "
            "daemon's own user, who always may; others get access_denied. Every control action is logged with "
            "the requester's uid and pid."),
    Setting("control_gids", MAIN_SECTION, GROUPS, "",
            "Members of these groups (primary or supplementary) may send control requests too."),
    Setting("public_status", MAIN_SECTION, BOOL, "yes",
            "Whether every caller who may connect can read the daemon's state: expertctl status and list, and "
            "HTTP /health, /experts and /metrics. no limits them to the users who may send control requests "
            "(control_uids, control_gids, root, the daemon's user); http_listen connections carry no user, so "
            "those routes are refused there."),
    Setting("timeout", MAIN_SECTION, DURATION, "60s",
            "Longest a request may run in an expert. Past it the worker is killed and replaced and the "
            "caller gets a timeout error. [expert:NAME] timeout overrides it per expert."),
    Setting("max_requests", MAIN_SECTION, _int_at_least(0), "0",
            "A worker that has served this many requests finishes the one in hand and is replaced "
            "(0: never). Guards against slow leaks."),
    Setting("max_requests_jitter", MAIN_SECTION, JITTER, "auto",
            "Each worker adds a random 0..jitter to max_requests, so that workers do not all recycle "
            "at once; auto is a tenth of max_requests."),
    Setting("max_memory", MAIN_SECTION, SIZE_OR_OFF, "0",
            "A worker whose private memory (USS) exceeds this after a request is replaced, with no "
            "request lost (0: never). RSS is checked after every request, USS at most once a second."),
    Setting("max_depth", MAIN_SECTION, _int_at_least(1), "64",
            "Deepest nesting of lists and maps accepted in a request's arguments."),
    Setting("max_args", MAIN_SECTION, _int_at_least(1), "64",
            "Most positional plus keyword arguments accepted in one call."),
    Setting("linger", MAIN_SECTION, DURATION_OR_OFF, "5ms",
            "How long a worker that just answered keeps the connection to serve its next request directly "
            "(saving the master's hand-over), while no other request waits; the master takes it back at once "
            "when one does. 0 turns it off."),
    Setting("quarantine_after", MAIN_SECTION, _int_at_least(0), "3",
            "An expert whose calls kill the worker serving them this many times within quarantine_window is "
            "quarantined: its calls are refused (error quarantined) for quarantine_time, so that a caller in a "
            "crash loop holds back that expert, not everyone's workers. 0: never (such deaths then count "
            "toward the daemon-wide respawn backoff)."),
    Setting("quarantine_window", MAIN_SECTION, DURATION, "10s",
            "The window in which quarantine_after crashes of one expert's calls quarantine it."),
    Setting("quarantine_time", MAIN_SECTION, DURATION, "30s",
            "How long a quarantine lasts. An expert quarantined again within as long after its last "
            "quarantine ended gets twice the last one's time, up to 32 times this."),
    Setting("idle_timeout", MAIN_SECTION, DURATION_OR_OFF, "300s",
            "A client connection idle this long is closed (0: never). Clients reconnect transparently."),
    Setting("read_timeout", MAIN_SECTION, DURATION, "10s",
            "Longest a request may take to arrive once its first byte is in, and a reply to be taken "
            "by the client. Slower connections are closed so that they cannot hold a worker."),
    Setting("graceful_timeout", MAIN_SECTION, DURATION, "30s",
            "On SIGTERM or SIGINT, how long in-flight requests may run before their workers are killed."),
    Setting("boot_timeout", MAIN_SECTION, DURATION, "120s",
            "How long a new worker may spend in its after-fork hooks (building models, warming up) "
            "before it is killed."),
    Setting("reload_timeout", MAIN_SECTION, DURATION, "600s",
            "How long loading a generation of experts may take (imports, preparing models, before-fork hooks, "
            "in a process of its own) before it is abandoned: at start-up expertd then exits; on reload the "
            "old generation keeps serving and the reload is reported failed."),
    Setting("max_connections", MAIN_SECTION, _int_at_least(1), "1000",
            "Most client connections held open at once. Fewer if the open-file limit leaves less room: the "
            "daemon raises its soft limit to the hard one at start and keeps descriptors for its workers and for "
            "control (root and the daemon's user may go a few connections past the limit). At the limit a new "
            "connection closes the longest-idle connection of the user who holds the most (clients reconnect "
            "transparently); if none of them is idle, the newcomer gets an overloaded error. Connections refused "
            "by allow_uids do not count."),
    Setting("max_connections_per_uid", MAIN_SECTION, PER_UID, "auto",
            "Most connections one user may hold open at once (http_listen connections count as one user); auto "
            "is half of max_connections, so that one user can never hold more than half. At the limit the user's "
            "own longest-idle connection is closed to admit the new one; if none is idle, the new one gets an "
            "overloaded error."),
    Setting("max_reply_buffer", MAIN_SECTION, SIZE, "256M",
            "Most bytes of replies the master holds, in all, for clients slow to read them (a worker hands "
            "over what its client did not take at once). A reply that would take the master past it is "
            "dropped and its connection closed, with a log line: the daemon's memory stays bounded whatever "
            "clients do. A connection holds one reply at most; its next requests wait until it is taken."),
    Setting("max_reply_buffer_per_connection", MAIN_SECTION, SIZE, "64M",
            "Most bytes of one reply the master holds for a slow reader; a larger rest of a reply is dropped "
            "and its connection closed, as above. A reply larger than this reaches only a client that takes all "
            "but this much of it within 50 ms of its being ready."),
    Setting("intra_op_threads", MAIN_SECTION, THREADS, "auto",
            "Threads each worker gives TensorFlow (and OpenMP/torch) for one op, set after fork before the "
            "runtime starts; auto shares the cores among the workers (cores // workers, at least 1)."),
    Setting("inter_op_threads", MAIN_SECTION, THREADS, "auto",
            "Threads each worker gives TensorFlow for running independent ops at once; auto as above."),
    Setting("tf_log_level", MAIN_SECTION, LOG_LEVEL, "error",
            "Threshold for TensorFlow's own log (native and Python). The default keeps its start-up "
            "notices out of the log; info or debug lets them through."),
    Setting("http_listen", MAIN_SECTION, ADDRESS_OR_OFF, "",
            "Also serve the HTTP/JSON API (docs/http.md) on this TCP address, e.g. 127.0.0.1:8000. "
            "The Unix socket serves it in any case. A non-loopback address needs token.", cli=True),
    Setting("token", MAIN_SECTION, TOKEN, "",
            "Bearer token that HTTP requests on http_listen must send (Authorization: Bearer TOKEN). "
            "Keep the config file unreadable to others. The Unix socket is guarded by its file mode, "
            "socket_group and allow_uids instead."),
    Setting("model_cache", MAIN_SECTION, OPTIONAL_PATH, "",
            "Directory where model experts' files are prepared (converted for the serving runtime, weights "
            "laid out once for every worker to map) and kept, by content hash, across restarts and reloads. "
            "Empty: $CACHE_DIRECTORY (systemd's CacheDirectory=), else ~/.cache/expertd. Daemons of one user may "
            "share it; entries writable by other users are refused. Delete an entry only when no running daemon "
            "serves it (or reload afterwards): it is prepared again when next needed."),
    Setting("prepare_timeout", MAIN_SECTION, DURATION, "600s",
            "Longest the preparation of one model (conversion, weight layout, reference outputs) may take "
            "at start-up or reload; it runs in a child process, never in the master."),
    Setting("function", "expert", FUNCTION, "",
            "The expert's callable as module:function (module.function, Firefly's form, also works). "
            "The module is imported in the master. Give either function or model."),
    Setting("model", "expert", PATH, "",
            "Serve a saved model with no Python code: a Keras .keras file, an exported SavedModel directory "
            "or a .tflite file (docs/experts.md, \"Model experts\"). A call takes a batch of input rows and "
            "returns one output row per input row. Give either function or model."),
    Setting("max_rows", "expert", _int_at_least(1), str(DEFAULT_MAX_ROWS),
            "Model experts: the most input rows one call may carry; more get a bad_request error. A runtime keeps "
            "the memory of the largest batch it has run, so this bounds what one caller can make every worker "
            "hold. (expertd.Model takes max_rows= likewise.)"),
    Setting("timeout", "expert", DURATION, "",
            "Longest a request to this expert may run; empty means the [expertd] timeout."),
    Setting("max_batch", "expert", MAX_BATCH, "auto",
            "Batched experts (model experts, and functions declared @expert(batched=True)): the most calls "
            "the daemon gathers into one batch for one worker. auto is 32; 1 turns batching off. A lone call "
            "never waits for company (docs/experts.md, \"Batching\")."),
    Setting("batch_delay", "expert", BATCH_DELAY, "2ms",
            "Batched experts: how long a free worker may wait for the callers just answered to send their "
            "next call, so that they share a batch; never longer, never longer than a batch of the expert "
            "takes to run, and never for a caller the daemon does not expect. 0 sends whatever waits at once; "
            "at most 1s."),
    Setting("stages", "pipeline", STAGES, None,
            "The stages, in order, separated by ',': each an expert, experts joined by '+' (one stage), or another "
            "pipeline alone. A request gets the document back with opinions.NAME for every expert that answered "
            "and errors.NAME for every one that failed or was not run."),
    Setting("on_error", "pipeline", ON_ERROR_MODE, "continue",
            "After an expert fails: continue runs the later stages anyway; stop skips them (their experts are "
            "marked skipped). A request may override it."),
    Setting("timeout", "pipeline", DURATION, "",
            "Longest the whole pipeline may run; empty means the sum over its stages of each stage's longest "
            "expert timeout. Each expert still keeps its own timeout."),
)

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
    token: str
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

    def __init__(self, path: str) -> None:
        self.path = path
        self.experts: dict[str, ExpertSpec] = {}
        self.pipelines: dict[str, PipelineSpec] = {}  # [pipeline:NAME] sections, nested ones expanded
        self._plans: dict[str, Plan] = {}  # target -> its plan (see plan)

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


def _parse_setting(setting: Setting, raw: str, where: str) -> Any:
    try:
        return setting.type.parse(raw)
    except _Invalid as exc:
        raise ConfigError(f"{where} {setting.name} = {raw.strip()!r}: {exc}") from None


def load_config(path: str, overrides: dict[str, str] | None = None) -> Config:
    """Read, validate and return the configuration in ``path``.

    ``overrides`` maps setting names to raw strings from the command line;
    they win over the file and are parsed by the same rules.
    """
    parser = configparser.ConfigParser(interpolation=None, strict=True, empty_lines_in_values=False)
    parser.optionxform = str  # keep keys as written so misspellings are reported exactly
    try:
        with open(path, encoding="utf-8") as handle:
            parser.read_file(handle, source=path)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the config file: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except configparser.Error as exc:
        message = " ".join(str(exc).split())
        raise ConfigError(f"{path}: {message}") from None

    base_dir = os.path.dirname(os.path.abspath(path))
    config = Config(os.path.abspath(path))
    if MAIN_SECTION not in parser:
        raise ConfigError(f"{path}: no [{MAIN_SECTION}] section; start the file with [{MAIN_SECTION}]")

    pipelines: dict[str, dict[str, Any]] = {}  # validated together, once every expert is known
    for section in parser.sections():
        if section == MAIN_SECTION:
            continue
        if not section.startswith((EXPERT_PREFIX, PIPELINE_PREFIX)):
            raise ConfigError(f"{path}: [{section}]: unknown section; use [{MAIN_SECTION}], one "
                              f"[{EXPERT_PREFIX}NAME] per expert and one [{PIPELINE_PREFIX}NAME] per pipeline")
        kind, _, name = section.partition(":")
        if not EXPERT_NAME.match(name):
            raise ConfigError(f"{path}: [{section}]: bad {kind} name {name!r}; {NAME_RULE}")
        keys = _PIPELINE_KEYS if kind == "pipeline" else _EXPERT_KEYS
        values = {}
        for key, raw in parser.items(section):
            if key not in keys:
                raise ConfigError(f"{path}: [{section}] {key}: unknown setting; {_suggest(key, list(keys))}")
            if raw.strip() or keys[key].default is None:  # an empty optional key means its default
                values[key] = _parse_setting(keys[key], raw, f"{path}: [{section}]")
        if kind == "pipeline":
            pipelines[name] = values
            continue
        if "function" in values and "model" in values:
            raise ConfigError(f"{path}: [{section}]: both function and model are set; keep one")
        if "function" not in values and "model" not in values:
            raise ConfigError(
                f"{path}: [{section}]: no function or model; add 'function = module:function' or 'model = PATH'"
            )
        if "model" in values:
            values["model"] = _resolve(values["model"], base_dir)
        elif "max_rows" in values:
            raise ConfigError(f"{path}: [{section}] max_rows: only model experts take it; remove it (a Python "
                              "expert passes max_rows= to expertd.Model)")
        config.experts[name] = ExpertSpec(name=name, **values)

    main = parser[MAIN_SECTION]
    for key in main:
        if key not in _MAIN_KEYS:
            raise ConfigError(f"{path}: [{MAIN_SECTION}] {key}: unknown setting; {_suggest(key, list(_MAIN_KEYS))}")
    for name, setting in _MAIN_KEYS.items():
        if overrides and overrides.get(name) is not None:
            value = _parse_setting(setting, overrides[name], f"command line {setting.flag}:")
            if setting.type is PATH or (setting.type is OPTIONAL_PATH and value):
                value = os.path.abspath(value)
        else:
            raw = main.get(name, setting.default)
            value = _parse_setting(setting, raw, f"{path}: [{MAIN_SECTION}]")
            if setting.type is PATH or (setting.type is OPTIONAL_PATH and value):
                value = _resolve(value, base_dir)
            elif setting.type is PATHS:
                value = [_resolve(item, base_dir) for item in value]
        setattr(config, name, value)

    if len(os.fsencode(config.socket)) > MAX_SOCKET_PATH:
        raise ConfigError(
            f"{path}: [{MAIN_SECTION}] socket = {config.socket!r}: path is {len(os.fsencode(config.socket))} bytes, "
            f"Unix sockets allow at most {MAX_SOCKET_PATH}; choose a shorter path"
        )
    if config.http_listen is not None and not config.token and not is_loopback(config.http_listen[0]):
        raise ConfigError(
            f"{path}: [{MAIN_SECTION}] http_listen = {config.http_listen[0]}:{config.http_listen[1]}: "
            "not a loopback address, and no token is set; set token (clients send Authorization: Bearer TOKEN) "
            "or listen on 127.0.0.1"
        )
    if not config.experts:
        raise ConfigError(
            f"{path}: no [{EXPERT_PREFIX}NAME] sections; add one per expert, with function = module:function"
        )
    config.pipelines = load_pipelines(pipelines, path, config.experts)
    return config


def render_markdown() -> str:
    """The configuration reference, as committed in docs/config.md."""
    return _render_markdown(SETTINGS, ((MAIN_SECTION, f"[{MAIN_SECTION}]"), ("expert", f"[{EXPERT_PREFIX}NAME]"),
                                       ("pipeline", f"[{PIPELINE_PREFIX}NAME]")))


if __name__ == "__main__":
    print(render_markdown(), end="")
