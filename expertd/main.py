"""The ``expertd`` command: parse the command line, load config and experts, run the master.

Exit status: 0 after a clean stop; 2 for a bad command line or config; 3 when
an expert fails to import or a hook fails (before fork, or in the first
workers); 1 when the socket cannot be set up or the master fails otherwise.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from expertd import __version__
from expertd.config import SETTINGS, load_config
from expertd.errors import ConfigError, ExpertLoadError
from expertd.firefly_config import COMMAND_LINE, FUNCTIONS, serving_line
from expertd.listener import ListenerError
from expertd.runtimes import quiet_library_loggers
from expertd.text import plural

DEFAULT_CONFIG = "/etc/expertd.conf"
EXIT_CONFIG = 2
EXIT_EXPERT = 3
DEFAULT_DAEMON_LOG = "expertd.log"  # --daemon without --log-file: this file in the socket's directory
FIREFLY_FLAGS = {"http_listen": ("-b", "--bind"), "token": ("-t",)}  # Firefly's names for our settings' flags


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="expertd",
        usage="%(prog)s [--config FILE | [-b HOST:PORT] [-t TOKEN] module.function ...] [options]",
        description="Serve Python experts from a prefork worker daemon over a Unix socket. The config is an INI "
                    "file, or Firefly's YAML config (a .yml or .yaml file), or Firefly's command line: functions "
                    "named module.function, each served as its last part (funcs.square as square, at /square), "
                    "with Firefly's HTTP routes on 127.0.0.1:8000 unless -b says otherwise (expertd --help-topic "
                    "firefly).",
        epilog="Every setting is described in `expertd --help-topic config`; `expertd --help-topic` lists the "
               "other pages (experts, protocol, http...). Signals: TERM/INT stop gracefully, QUIT stops at "
               "once, HUP reloads config and experts, TTIN/TTOU add or remove a worker, USR1 reopens the log file.",
    )
    parser.add_argument("functions", nargs="*", metavar="module.function",
                        help="Firefly's command line: serve these functions with no config file (not with --config)")
    parser.add_argument("--config", "-c", metavar="FILE",
                        help=f"configuration file, INI or Firefly's YAML (.yml, .yaml) (default: {DEFAULT_CONFIG}, "
                             "unless functions are named)")
    for setting in SETTINGS:
        if setting.cli:
            parser.add_argument(*FIREFLY_FLAGS.get(setting.name, ()), setting.flag, dest=setting.name,
                                metavar=setting.name.upper(),
                                help=f"{setting.help} Overrides [expertd] {setting.name} ({setting.type.name}).")
    parser.add_argument("--check", action="store_true",
                        help="load the config, import the experts and run their before_fork hooks, then their "
                             "after_fork hooks and a call of each expert with an example in a trial worker; exit 0 "
                             "if all is well, else print the first failure")
    parser.add_argument("--daemon", action="store_true",
                        help="detach and run in the background: the command returns once the daemon serves (exit "
                             "0), or prints why it could not start and exits non-zero. The working directory is "
                             f"kept; without --log-file it logs to {DEFAULT_DAEMON_LOG} in the socket's directory")
    parser.add_argument("--pidfile", metavar="PATH",
                        help="write the master's pid here once serving (replaced by rename, never written "
                             "through a symlink)")
    parser.add_argument("--log-file", metavar="PATH",
                        help="log here instead of stderr (with --daemon, instead of expertd.log in the socket's "
                             "directory; SIGUSR1 reopens it, for logrotate); a symlink, or "
                             "a file that is not the daemon's own, is refused")
    parser.add_argument("--version", action="version", version=f"expertd {__version__}")
    parser.add_argument("--help-topic", nargs="?", const="", metavar="TOPIC",
                        help="print a documentation page the package carries (config, experts, protocol, http, "
                             "...) and exit; with no TOPIC, list them")
    return parser


def _help_topic(name: str) -> int:
    from expertd.help_topics import listing, page

    try:
        sys.stdout.write(page(name) if name else listing())
    except LookupError as exc:
        print(f"expertd: {exc.args[0]}", file=sys.stderr)
        return EXIT_CONFIG
    return 0


def _setup_logging(level: str, log_file: str | None, log_format: str = "text") -> logging.Handler:
    if log_file:
        from expertd.logfile import LogFileHandler

        handler: logging.Handler = LogFileHandler(log_file)
    else:
        handler = logging.StreamHandler(sys.stderr)
    if log_format == "json":
        from expertd.accesslog import JsonFormatter

        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s [%(process)d] [%(levelname)s] %(name)s: %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(getattr(logging, level.upper()))
    return handler


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_intermixed_args(argv)  # (Firefly's functions may come before or after options)
    if args.help_topic is not None:
        return _help_topic(args.help_topic)
    overrides = {s.name: getattr(args, s.name) for s in SETTINGS if s.cli}
    path = args.config or DEFAULT_CONFIG
    if args.functions:  # Firefly's command line: the functions are the config, rebuilt from it on reload
        if args.config:
            print(f"expertd: both --config {args.config} and functions ({' '.join(args.functions)}) are given; "
                  "name the functions in the config file, or drop --config", file=sys.stderr)
            return EXIT_CONFIG
        overrides[FUNCTIONS] = " ".join(args.functions)
        path = COMMAND_LINE
    elif not args.config and not os.path.lexists(DEFAULT_CONFIG):
        print(f"expertd: no config: {DEFAULT_CONFIG} does not exist; give --config FILE (INI, or Firefly's YAML "
              "config.yml) or the functions to serve (expertd module.function ...)", file=sys.stderr)
        return EXIT_CONFIG
    try:
        config = load_config(path, overrides)
    except ConfigError as exc:
        print(f"expertd: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    pidfile = os.path.abspath(args.pidfile) if args.pidfile else None
    log_file = args.log_file
    if args.daemon and not args.check and not log_file:
        from expertd.listener import check_socket_directory

        # Detached, stderr goes nowhere: log to a file beside the socket, in the run directory that only the
        # daemon's user may write (checked here). A file, not syslog: native libraries write to fd 2 too.
        directory = os.path.dirname(config.socket) or "."
        try:
            check_socket_directory(directory, create=True)
        except ListenerError as exc:
            print(f"expertd: {exc}", file=sys.stderr)
            return 1
        log_file = os.path.join(os.path.abspath(directory), DEFAULT_DAEMON_LOG)
    try:
        handler = _setup_logging(config.log_level, log_file, config.log_format)
    except OSError as exc:
        print(f"expertd: cannot open log file {log_file}: {exc.strerror}", file=sys.stderr)
        return EXIT_CONFIG
    quiet_library_loggers(config.quiet_loggers, config.log_level)  # (before any expert's import logs)
    for warning in config.warnings:
        logging.getLogger("expertd").warning("%s", warning)
    access_fds: list[int] = []
    if config.access_log and not args.check:
        from expertd.accesslog import open_access_log

        try:
            access = open_access_log(config.access_log, config.log_format)
        except OSError as exc:
            print(f"expertd: cannot open access log {config.access_log} ([expertd] access_log): {exc.strerror}",
                  file=sys.stderr)
            return EXIT_CONFIG
        if access is not None and access.fd != 2:
            access_fds.append(access.fd)
    if pidfile:
        from expertd.daemon_mode import PidfileError, check_pidfile

        try:
            check_pidfile(pidfile)
        except PidfileError as exc:
            print(f"expertd: {exc}", file=sys.stderr)
            return 1

    launcher = None
    if not args.check and not os.environ.get("LISTEN_FDS"):
        from expertd.listener import check_socket_directory, check_socket_free

        # Fail here, before the experts load and (daemon mode) on the terminal, not in a log file.
        try:
            check_socket_directory(os.path.dirname(config.socket) or ".")
            if args.daemon:
                check_socket_free(config.socket)
        except ListenerError as exc:
            print(f"expertd: {exc}", file=sys.stderr)
            return 1
    if args.daemon and not args.check:
        from expertd.daemon_mode import detach

        # Detach before the experts load: detaching closes every descriptor it was not
        # told about, and files an expert opens must survive. Their errors still reach
        # the terminal, through the launcher.
        launcher = detach(handler.stream if isinstance(handler, logging.FileHandler) else None, log_file,
                          access_fds)

    def tell_launcher(word: str) -> None:
        nonlocal launcher
        if launcher is None:
            return
        try:
            launcher.write(f"{' '.join(word.split())}\n".encode())  # one line: the launcher reads one
            launcher.close()
        except OSError:
            pass  # the launcher is gone (interrupted): nobody is waiting for the word
        launcher = None

    def fail(message: str, status: int) -> int:
        if launcher is not None:
            logging.getLogger("expertd").error("%s", message)
            tell_launcher(f"{status} {message}")  # (the launcher prints the message and exits with the status)
        else:
            print(f"expertd: {message}", file=sys.stderr)
        return status

    # Imported here so that --help and config errors stay fast.
    from expertd.loader import load_experts, preload_libraries
    from expertd.notify import extend_start_timeout
    from expertd.runtimes import quiet_native_logs

    if args.check:  # in this process: nothing is served, and a traceback-free report is all it gives
        try:
            with quiet_native_logs(config.tf_log_level in ("warning", "error")):
                experts = load_experts(config, keepalive=extend_start_timeout)
            from expertd.check import trial_worker

            checked = trial_worker(config, experts)  # the after_fork hooks and example calls, in a forked child
        except ExpertLoadError as exc:
            return fail(str(exc), EXIT_EXPERT)
        print(f"expertd: {config.path}: OK, {plural(len(experts), 'expert')}: {', '.join(sorted(experts))}")
        for line in checked:
            print(f"expertd: {line}")
        return 0

    from expertd.master import Master

    def on_ready() -> None:
        if pidfile:
            from expertd.daemon_mode import write_pidfile

            try:
                write_pidfile(pidfile)
            except OSError as exc:
                logging.getLogger("expertd").error("cannot write pidfile %s: %s", pidfile, exc.strerror)
        tell_launcher("ready")
        if config.firefly_routes:  # (as Firefly prints its URL; once the listeners are bound and workers serve)
            print(f"expertd: serving {serving_line(config)}", flush=True)

    master = Master(config, overrides=overrides, on_ready=on_ready)
    try:
        # The libraries named in preload, imported here, are shared by every generation; the experts load
        # in a process of their own (expertd.generation): the master never runs expert code.
        with quiet_native_logs(config.tf_log_level in ("warning", "error")):
            preload_libraries(config)
        master.load_first_generation(keepalive=extend_start_timeout)
    except ExpertLoadError as exc:
        return fail(str(exc), EXIT_EXPERT)
    except OSError as exc:
        return fail(f"cannot start the process that loads the experts: {exc.strerror}", 1)
    try:
        status = master.run()
    except ListenerError as exc:
        return fail(str(exc), 1)
    finally:
        if pidfile:
            from expertd.daemon_mode import remove_pidfile

            remove_pidfile(pidfile)
    if launcher is not None:  # (not ready: the first generation failed, or a signal stopped it)
        tell_launcher(f"{status or 1} {master.start_failure or 'the daemon stopped before it was ready'}")
    return status


if __name__ == "__main__":
    sys.exit(main())
