"""The settings table: every configuration key, declared once as data (:data:`SETTINGS`).

Each :class:`Setting` says where its key lives (the ``[expertd]`` section, or
each ``[expert:NAME]`` / ``[pipeline:NAME]`` section), its type (from
:mod:`expertd.settings_types`), its default and its documentation.  Parsing
the file and the command line (:mod:`expertd.config`, :mod:`expertd.main`),
``--help`` and docs/config.md (:mod:`expertd.config_docs`) are derived from
it.  No state: module-level constants only.
"""

from __future__ import annotations

from dataclasses import dataclass

from expertd.protocol import DEFAULT_SOCKET
from expertd.settings_types import (
    ACCESS_LOG_PATH,
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
    LOG_FORMAT,
    LOG_LEVEL,
    MAX_BATCH,
    MODE,
    MODULES,
    ON_ERROR_MODE,
    OPTIONAL_PATH,
    ORIGINS,
    PATH,
    PATHS,
    PER_UID,
    SIZE,
    SIZE_OR_OFF,
    STAGES,
    THREADS,
    TOKEN,
    TOKEN_FILE,
    URL_PATH,
    USERS,
    _int_at_least,
    _Type,
)

MAIN_SECTION = "expertd"
EXPERT_PREFIX = "expert:"
DEFAULT_MAX_ROWS = 4096  # a model expert's max_rows
DEFAULT_MAX_BATCH = 32  # a batched expert's max_batch = auto


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
            "(expertd --help-topic experts)."),
    Setting("pythonpath", MAIN_SECTION, PATHS, "",
            "Directories prepended to sys.path before importing experts; relative ones are relative "
            "to the config file."),
    Setting("log_level", MAIN_SECTION, LOG_LEVEL, "info",
            "Logging threshold. debug logs one line per request (and keeps the loggers named in quiet_loggers "
            "at info).", cli=True),
    Setting("quiet_loggers", MAIN_SECTION, MODULES,
            "tensorflow h5py absl matplotlib PIL numba urllib3 filelock fsspec jax keras asyncio",
            "Libraries' loggers held at info or above when log_level = debug, so that debug shows expertd's "
            "lines and the experts' own rather than a flood of the libraries' (h5py logs a line per dtype "
            "conversion). A logger an expert sets a level on keeps it; TensorFlow's follows tf_log_level; empty "
            "lets every library's debug lines through."),
    Setting("log_summary_interval", MAIN_SECTION, DURATION_OR_OFF, "60s",
            "How often the master logs a line on the calls served since the last one: requests by outcome, "
            "median and 99th percentile, from the same counters as /metrics (so the two agree; percentiles "
            "are estimated from the latency histogram's buckets). Nothing is written for an interval without "
            "requests. off (or 0): no summary."),
    Setting("log_format", MAIN_SECTION, LOG_FORMAT, "text",
            "Format of the log and of the access log: text (one readable line per event), or json (one JSON "
            "object per line with stable keys: time, level, pid, logger, message, and request_id where a line "
            "is about a request; see expertd --help-topic logging).", cli=True),
    Setting("access_log", MAIN_SECTION, ACCESS_LOG_PATH, "",
            "Write one line per request here (empty: no access log, at no cost; -: stderr): both protocols, the "
            "requests the master refuses or answers itself included, with time, request id, peer, protocol, "
            "expert or route, outcome, duration and bytes in and out (expertd --help-topic logging). Opened like "
            "--log-file (a symlink, or a file that is not the daemon's own, is refused) and reopened on SIGUSR1; "
            "read at start-up only (a reload keeps the file the daemon started with).", cli=True),
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
            "those routes are refused there (public_health opens /health and /metrics there)."),
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
            "Also serve the HTTP/JSON API (expertd --help-topic http) on this TCP address, e.g. 127.0.0.1:8000. "
            "The Unix socket serves it in any case. A non-loopback address needs token.", cli=True),
    Setting("token", MAIN_SECTION, TOKEN, "",
            "Bearer token that HTTP requests on http_listen must send (Authorization: Bearer TOKEN). "
            "Keep the config file unreadable to others, or use token_file. The Unix socket is guarded by its file "
            "mode, socket_group and allow_uids instead. With neither token nor token_file set, the environment "
            "variable EXPERTD_TOKEN is the token, if set. A new token takes effect on reload (HUP).",
            cli=True),
    Setting("token_file", MAIN_SECTION, TOKEN_FILE, "",
            "Read the token from this file (the token alone; surrounding whitespace is ignored) instead of "
            "writing it in the config: at start, where a missing or unreadable file stops start-up with one line, "
            "and on every reload (HUP, expertctl reload), so rotating the token is writing the new one into the "
            "file and reloading; a reload that cannot read it fails, and the old token stays in force. "
            "credential:NAME reads $CREDENTIALS_DIRECTORY/NAME, for systemd's LoadCredential=NAME:PATH "
            "(systemd/expertd.service). A relative path is relative to the config file. Set token or "
            "token_file, not both."),
    Setting("public_health", MAIN_SECTION, BOOL, "no",
            "yes serves GET /health and GET /metrics on http_listen without the token (and whatever "
            "public_status says), for load balancers' health checks and Prometheus; every other request there "
            "still needs the token."),
    Setting("firefly_routes", MAIN_SECTION, BOOL, "no",
            "Also serve Firefly's HTTP protocol (expertd --help-topic firefly): POST PATH with a JSON object of "
            "keyword arguments for each expert's path, GET / with the functions' metadata, Authorization: Token "
            "TOKEN beside Bearer, and Firefly's error bodies ({\"error\": MESSAGE}; 400, 403, 404, 422, 500). The "
            "native routes stay available beside them. yes when the config is Firefly's YAML or Firefly's command "
            "line (expertd module.function ...)."),
    Setting("allow_origins", MAIN_SECTION, ORIGINS, "",
            "Firefly routes: the origins allowed to call them from a browser (CORS; Firefly's --allow-origins), "
            "* for any; empty allows none (no CORS headers are sent). With several, an answer names the "
            "request's Origin when it is listed (exact match), with Vary: Origin.",
            cli=True),
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
            "or a .tflite file (expertd --help-topic experts, \"Model experts\"). A call takes a batch of input "
            "rows and returns one output row per input row. Give either function or model."),
    Setting("max_rows", "expert", _int_at_least(1), str(DEFAULT_MAX_ROWS),
            "Model experts: the most input rows one call may carry; more get a bad_request error. A runtime keeps "
            "the memory of the largest batch it has run, so this bounds what one caller can make every worker "
            "hold. (expertd.Model takes max_rows= likewise.)"),
    Setting("path", "expert", URL_PATH, "",
            "With firefly_routes: the URL path that serves this expert (Firefly's path), written decoded "
            "(no %-escapes: requests' paths are decoded before they are matched); empty means /NAME."),
    Setting("timeout", "expert", DURATION, "",
            "Longest a request to this expert may run; empty means the [expertd] timeout."),
    Setting("max_batch", "expert", MAX_BATCH, "auto",
            "Batched experts (model experts, and functions declared @expert(batched=True)): the most calls "
            "the daemon gathers into one batch for one worker. auto is 32; 1 turns batching off. A lone call "
            "never waits for company (expertd --help-topic experts, \"Batching\")."),
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
