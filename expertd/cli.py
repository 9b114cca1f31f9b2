"""``expertctl``: call experts from the shell.  Standard library + msgpack only.

    expertctl call fib n=5                       # -> 8
    expertctl opinion a b c < doc.json           # one request: a, then b (seeing a's opinion), then c
    expertctl pipeline moderation < doc.json     # a [pipeline:NAME] of the daemon's config
    expertctl opinion --lines a b < docs.jsonl > opinions.jsonl   # a stream, order kept
    expertctl opinion --lines --on-error record a b < docs.jsonl  # failures under errors.NAME, not fatal
    expertctl opinion --lines --on-error skip a b < docs.jsonl    # bad documents left out, one line each on stderr
    expertctl opinion --lines --window 64 NAME < docs.jsonl   # NAME batched: 64 documents a request
    expertctl list
    expertctl ping
    expertctl status [--json] | reload [--no-wait] | stop [--no-wait] | workers N

Exit status: 0 on success, 1 when the daemon or an expert reports an error or
the input is bad (or a reload failed), 2 for a bad command line, 3 when no
daemon can be reached, 4 when reload or stop did not end within --timeout.
Every failure is one line on stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from expertd import __version__
from expertd.cli_documents import (
    ON_ERROR,
    RECORD,
    STOP,
    InputError,
    StreamStopped,
    dumps,
    load_document,
    one_document,
    stages_of,
)
from expertd.cli_lines import document_lines
from expertd.client import Client, default_socket
from expertd.errors import ConnectError, ExpertdError, RemoteError, RequestTimeout
from expertd.text import interval_summary, plural

TYPE_CHECKING = False  # typing costs milliseconds to import; annotations here are strings
if TYPE_CHECKING:
    from typing import Any

EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_UNREACHABLE = 3
EXIT_TIMEOUT = 4


def _parse_value(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text


def _split_call_arguments(words: list[str]) -> tuple[list[Any], dict[str, Any]]:
    args: list[Any] = []
    kwargs: dict[str, Any] = {}
    for word in words:
        key, sep, value = word.partition("=")
        if sep and key.isidentifier():
            kwargs[key] = _parse_value(value)
        else:
            if kwargs:
                raise InputError(f"positional argument {word!r} after keyword arguments")
            args.append(_parse_value(word))
    return args, kwargs


def _cmd_call(client: Client, options: argparse.Namespace) -> int:
    args, kwargs = _split_call_arguments(options.arguments)
    print(dumps(client.call(options.name, *args, **kwargs)))
    return 0


def _cmd_opinion(client: Client, options: argparse.Namespace) -> int:
    return _documents(client, options, options.names, None)


def _cmd_pipeline(client: Client, options: argparse.Namespace) -> int:
    return _documents(client, options, None, options.name)


def _documents(client: Client, options: argparse.Namespace, names: list[str] | None, pipeline: str | None) -> int:
    """``opinion`` and ``pipeline``: a document on stdin, or JSON Lines, through one request per document."""
    on_error = options.on_error or (RECORD if options.keep_going else STOP)
    if options.lines:
        if client.remote:  # (the stream pipelines msgpack frames)
            raise InputError(f"--lines streams over the daemon's Unix socket, not over HTTP ({client.socket_path}): "
                             "run it on the daemon's machine, or send the documents one per expertctl call")
        return document_lines(client, names, pipeline, sys.stdin, sys.stdout, options.jobs, on_error,
                              getattr(options, "window", None))
    target = pipeline if names is None else stages_of(names)
    document = load_document(sys.stdin.read(), "stdin")
    print(dumps(one_document(client, target, document, "stdin", on_error == RECORD)))
    return 0


def _cmd_list(client: Client, options: argparse.Namespace) -> int:
    experts = client.experts()
    if options.json:
        print(dumps(experts))
        return 0
    rows = []
    for entry in experts:
        if entry.get("pipeline"):  # (named pipelines come after the experts)
            stages = ", ".join(" + ".join(stage) for stage in entry.get("stages", ()))
            rows.append((f"{entry['name']} = {stages}", f"(pipeline; on_error = {entry.get('on_error')})"))
        else:
            rows.append((entry.get("signature") or entry.get("name", "?"), entry.get("doc") or ""))
    width = max((len(left) for left, _ in rows), default=0)
    for left, right in rows:
        print(f"{left:<{width}}  {right}".rstrip())
    return 0


def _cmd_ping(client: Client, options: argparse.Namespace) -> int:
    started = time.perf_counter()
    info = client.ping()
    elapsed = (time.perf_counter() - started) * 1000
    if client.remote:  # a remote daemon's GET /health: its master answers, with no worker's pid
        print(f"pong from {client.socket_path}: {info.get('workers_ready')} of {info.get('workers_wanted')} workers "
              f"ready, generation {info.get('generation')}, {elapsed:.2f} ms")
        return 0
    print(f"pong from worker {info['worker']} (pid {info['pid']}), expertd {info['version']}, {elapsed:.2f} ms")
    return 0


def _mib(value: int | None) -> str:
    return "-" if value is None else f"{value / 2**20:.1f}M"


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = int(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def _cmd_status(client: Client, options: argparse.Namespace) -> int:
    status = client.status()
    if options.json:
        print(dumps(status))
        return 0
    print(f"expertd {status['version']}: master pid {status['pid']}, up {_duration(status['uptime_s'])}, "
          f"generation {status['generation']}, config {status['config']}")
    print(f"socket {status['socket']}: {plural(status['workers_wanted'], 'worker')} wanted, "
          f"{plural(status['requests'], 'request')} served, {plural(status['connections'], 'connection')} open")
    print(f"experts: {', '.join(status['experts'])}")
    last = status.get("last_interval")  # (the log summary's last interval; an older daemon sends none)
    if last:
        print(interval_summary(last))  # (the words of the summary's log line)
    for quarantine in status.get("quarantined", ()):  # (an older daemon sends none)
        print(f"quarantined: {quarantine['expert']} (its calls kept killing workers) until "
              f"{time.strftime('%H:%M:%S', time.localtime(quarantine['until']))}, "
              f"{_duration(quarantine['seconds_left'])} from now")
    for name, figures in status.get("pipelines", {}).items():  # (pipelines that were asked for)
        outcomes = ", ".join(f"{code}: {count}" for code, count in figures["outcomes"].items())
        print(f"pipeline {name}: {plural(figures['requests'], 'request')} ({outcomes}), mean {figures['mean_ms']} ms")
    for name, batches in status.get("batches", {}).items():  # (batched experts that have served)
        sizes = ", ".join(f"≤{bound}: {count}" for bound, count in batches["sizes"].items())
        print(f"batches of {name}: {batches['batches']} for {batches['calls']} calls, mean size "
              f"{batches['mean_batch']}, mean queueing {batches['mean_queue_delay_ms']} ms, mean batch time "
              f"{batches.get('mean_batch_ms', 0)} ms (sizes {sizes})")
    reload = status.get("last_reload")
    if reload:
        outcome = "ok" if reload["ok"] else f"FAILED: {reload['error']}"
        print(f"last reload: {outcome} ({time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(reload['at']))})")
    print()
    print(f"{'#':>3} {'PID':>7} {'GEN':>3} {'STATE':<9} {'REQUESTS':>9} {'LAST REQ':>9} {'AGE':>8} "
          f"{'RSS':>9} {'PSS':>9} {'USS':>9}")
    for worker in status["workers"]:
        last = worker["last_request_age_s"]
        print(f"{worker['number']:>3} {worker['pid']:>7} {worker['generation']:>3} {worker['state']:<9} "
              f"{worker['requests']:>9} {_duration(last) + ' ago' if last is not None else '-':>9} "
              f"{_duration(worker['age_s']):>8} {_mib(worker.get('rss')):>9} {_mib(worker.get('pss')):>9} "
              f"{_mib(worker.get('uss')):>9}")
    memory, master = status["memory"], status["master"]
    print(f"{'master':>11} {' ' * 35} {_mib(master.get('rss')):>9} {_mib(master.get('pss')):>9} "
          f"{_mib(master.get('uss')):>9}")
    print()
    print(f"memory: private {_mib(memory['private'])} (USS, master + workers), shared {_mib(memory['shared'])} "
          f"(counted once); the daemon costs {_mib(memory['total_pss'])} (PSS) where unshared processes would "
          f"take {_mib(memory['workers_rss'] + master.get('rss', 0))} (sum of RSS)")
    return 0


_RELOAD_WAIT = 24 * 3600.0
_POLL = 0.1  # seconds between looks at the daemon while reload or stop waits


def _cmd_reload(client: Client, options: argparse.Namespace) -> int:
    deadline = time.monotonic() + options.timeout
    try:
        reply = client.reload()  # answered once the new generation has loaded, or failed to
    except RequestTimeout:  # (the daemon answers a failed load with last_reload: this is our own wait)
        print(f"expertctl: no reply to the reload within --timeout ({options.timeout:g}s): expertd may still be "
              f"loading, and the reload may yet succeed; `expertctl status` shows how it goes", file=sys.stderr)
        return EXIT_TIMEOUT
    number = reply.get("reload")  # (None from a daemon older than the wait)
    last = reply.get("last_reload") or {}
    if reply.get("reloading"):
        if options.no_wait or number is None:
            print(f"reloading: generation {reply['generation']} loaded, its workers are starting")
            return 0
        # Its workers are starting: the reload ends when they are all ready, or when one fails to start.
        while not (last and last.get("reload", 0) >= number):
            if time.monotonic() >= deadline:
                print(f"expertctl: generation {reply['generation']} loaded, but its workers were not all ready "
                      f"within --timeout ({options.timeout:g}s); `expertctl status` shows how it goes",
                      file=sys.stderr)
                return EXIT_TIMEOUT
            time.sleep(_POLL)
            last = client.status().get("last_reload") or {}
    if last and not last.get("ok"):
        print(f"expertctl: reload failed, generation {last.get('generation', reply['generation'])} keeps serving: "
              f"{last.get('error')}", file=sys.stderr)
        return EXIT_FAILED
    print(f"reloaded: generation {last.get('generation', reply['generation'])} serving")
    return 0


def _running(pid: int) -> bool:
    """Whether process ``pid`` has not exited (a zombie, waiting for its parent to reap it, has)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            return stat.read().rpartition(b")")[2].split()[0] != b"Z"
    except FileNotFoundError:
        return False
    except (OSError, IndexError):  # no /proc: ask the kernel
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            pass  # another user's: alive
        return True


def _cmd_stop(client: Client, options: argparse.Namespace) -> int:
    reply = client.stop()
    pid = reply["pid"]
    if options.no_wait:
        print(f"stopping expertd (master pid {pid})")
        return 0
    deadline = time.monotonic() + options.timeout
    while _running(pid):  # in-flight requests finish first, for up to the daemon's graceful_timeout
        if time.monotonic() >= deadline:
            print(f"expertctl: expertd (master pid {pid}) is still running after --timeout ({options.timeout:g}s)",
                  file=sys.stderr)
            return EXIT_TIMEOUT
        time.sleep(_POLL)
    print(f"stopped expertd (master pid {pid})")
    return 0


def _cmd_workers(client: Client, options: argparse.Namespace) -> int:
    reply = client.set_workers(options.count)
    print(f"workers: {reply['workers']}")
    return 0


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive whole number, not {text!r}")
    return value


_FAILURES = (" An expert's failure stops the document where it failed (on_error = stop, whatever the pipeline "
             "says): the failure is one line on stderr and the exit status 1. With --on-error record (or "
             "--keep-going) the daemon goes on (on_error = continue): the document is written with errors.NAME "
             "({code, type, message}) for each expert that failed or was not run, and the exit status stays 0. "
             "With --lines, a bad document (a line that is not a JSON object, an expert's failure, a document "
             "too large) stops the stream after the documents before it are written (--on-error stop, the "
             "default; the message names its input line), is left out with one line on stderr naming its input "
             "line (skip; the exit status is then 1), or is written with its errors (record: a line that is not "
             "a JSON object becomes {\"errors\": {\"_input\": {code, message, line}}}, a document refused as a "
             "whole gets errors._request). A count of the documents skipped or written with errors ends "
             "stderr. Failures that are no document's own (unknown names, a bad target, a lost daemon) stop it either "
             "way, with one line. "
             "With --lines, a progress line (with the share read and the time left when stdin is a file) is "
             "shown when stderr is a terminal and stdout is not.")


def _document_options(command: argparse.ArgumentParser) -> None:
    command.add_argument("--lines", action="store_true", help="stream JSON Lines: one document per line, in order")
    command.add_argument("--jobs", "-j", type=_positive, default=4, metavar="N",
                         help="with --lines, connections to the daemon (at most one per worker), each with "
                              "several documents in flight; with MAP windows, windows in flight (default: 4)")
    command.add_argument("--on-error", choices=ON_ERROR, default=None,
                         help="what a bad document does: stop (default) the stream there, skip it with a line "
                              "on stderr, or record its errors in the output under errors.NAME (see above)")
    command.add_argument("--keep-going", "-k", action="store_true", help="the same as --on-error record")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="expertctl", description="Call experts served by expertd.",
                                     epilog="`expertctl COMMAND --help` explains a command and its arguments. Exit "
                                            "status: 0 done, 1 an error of the daemon, an expert or the input (or a "
                                            "failed reload), 2 a bad command line, 3 no daemon reached, 4 reload "
                                            "or stop not ended within --timeout.")
    parser.add_argument("--version", action="version", version=f"expertd {__version__}")
    parser.add_argument("--socket", "-s", metavar="PATH",
                        help=f"daemon socket, or a remote daemon's http_listen as http(s)://HOST:PORT with its "
                             f"token in $EXPERTD_TOKEN (default: $EXPERTD_SOCKET or {default_socket()})")
    parser.add_argument("--timeout", type=float, default=None, metavar="SECONDS",
                        help="how long to wait for each reply (default: 60; for reload, as long as the daemon's "
                             "reload_timeout lets loading take)")
    parser.add_argument("--traceback", action="store_true",
                        help="on an expert's error, also print the remote traceback")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    call = commands.add_parser("call", help="call an expert; print its result as JSON",
                               description="Arguments are parsed as JSON where they parse, else taken as "
                                           "strings; KEY=VALUE passes a keyword argument.")
    call.add_argument("name", metavar="NAME", help="the expert (`expertctl list` shows them)")
    call.add_argument("arguments", nargs="*", metavar="ARG | KEY=VALUE",
                      help="its arguments, in order: each parsed as JSON where it parses (5, [1, 2], null), else "
                           "taken as a string; KEY=VALUE is the keyword argument KEY (after the positional ones)")
    call.set_defaults(run=_cmd_call)

    opinion = commands.add_parser("opinion", help="add experts' opinions to a JSON document on stdin",
                                  description="Read a JSON object on stdin, run the experts on it in one request "
                                              "(a pipeline whose stages are the NAMEs, in order: each expert sees "
                                              "the opinions of those before it), and write it to stdout with each "
                                              "result under opinions.NAME. A NAME may be a pipeline. With --lines, "
                                              "a single batched expert (`expertctl list --json`: batched) gets "
                                              "windows of documents in one MAP request each; the output is the "
                                              "same as one request per document." + _FAILURES)
    opinion.add_argument("names", nargs="+", metavar="NAME",
                         help="an expert or a pipeline: each is a stage; 'a+b' is one stage of experts a and b, run "
                              "side by side (each sees the opinions of the stages before, not each other's)")
    _document_options(opinion)
    opinion.add_argument("--window", type=_positive, default=None, metavar="N",
                         help="with --lines, send documents in windows of N, one MAP request per window to a "
                              "batched expert (see `expertctl list --json`; default for a single batched expert: "
                              "its max_batch) and one call per document and expert to the others")
    opinion.set_defaults(run=_cmd_opinion)

    pipeline = commands.add_parser("pipeline", help="run a pipeline of the daemon's config on a JSON document",
                                   description="Read a JSON object on stdin, run the [pipeline:NAME] of the daemon's "
                                               "config on it in one request, and write it to stdout with each "
                                               "expert's result under opinions.NAME (`expertctl list` shows the "
                                               "pipelines)." + _FAILURES)
    pipeline.add_argument("name", metavar="NAME", help="a [pipeline:NAME] of the daemon's config")
    _document_options(pipeline)
    pipeline.set_defaults(run=_cmd_pipeline)

    listing = commands.add_parser("list", help="list the experts with their signatures, and the pipelines",
                                  description="One line per expert (its signature and the first line of its "
                                              "docstring), then the pipelines with their stages.")
    listing.add_argument("--json", action="store_true",
                         help="print the list as JSON, with each expert's details (batched, max_batch, reads)")
    listing.set_defaults(run=_cmd_list)

    ping = commands.add_parser("ping", help="check that the daemon answers",
                               description="Ask a worker for a reply: its number, pid, the version, the time taken.")
    ping.set_defaults(run=_cmd_ping)

    status = commands.add_parser("status", help="master, workers, requests and shared/private memory",
                                 description="The master, each worker (state, requests, memory), quarantined "
                                             "experts, pipelines' and batches' figures, the last reload.")
    status.add_argument("--json", action="store_true", help="print the whole status as JSON, for scripts")
    status.set_defaults(run=_cmd_status)
    reload = commands.add_parser(
        "reload", help="reload config and experts into new workers (like SIGHUP) and wait until they serve",
        description="Reload and wait until the new generation serves (exit 0) or the reload failed and the old "
                    "one keeps serving (exit 1, with the reason); exit 4 if neither happened within --timeout.")
    stop = commands.add_parser(
        "stop", help="stop the daemon gracefully (like SIGTERM) and wait until it exits",
        description="Stop the daemon gracefully and wait until its master process exits (exit 0); exit 4 if it "
                    "still runs after --timeout.")
    for command, run, default, no_wait in (
            (reload, _cmd_reload, "as long as the daemon's reload_timeout and boot_timeout let it take",
             "return once the new generation's experts have loaded, while its workers start"),
            (stop, _cmd_stop, "60", "return once the daemon has begun to stop")):
        # (SUPPRESS: without it here, the `expertctl --timeout S reload` form stays the same option.)
        command.add_argument("--timeout", type=float, default=argparse.SUPPRESS, metavar="SECONDS",
                             help=f"how long to wait in all (default: {default})")
        command.add_argument("--no-wait", action="store_true", help=no_wait)
        command.set_defaults(run=run)
    workers = commands.add_parser("workers", help="set the number of workers (like TTIN/TTOU)",
                                  description="Set how many workers serve now, as the signals TTIN and TTOU do.")
    workers.add_argument("count", type=_positive, metavar="N",
                         help="the number of workers, at least 1 (and at most the daemon's max_workers)")
    workers.set_defaults(run=_cmd_workers)
    return parser


def main(argv: list[str] | None = None) -> int:
    options = build_parser().parse_args(argv)
    timeout = options.timeout
    if timeout is None:
        # A reload's reply comes once the new generation has loaded (or failed to), which the daemon
        # bounds with reload_timeout; any other reply is quick.
        timeout = _RELOAD_WAIT if options.run is _cmd_reload else 60.0
    options.timeout = timeout
    client = Client(options.socket, timeout=timeout)
    try:
        return options.run(client, options)
    except ConnectError as exc:
        print(f"expertctl: {exc}", file=sys.stderr)
        return EXIT_UNREACHABLE
    except RemoteError as exc:
        label = f"{exc.expert}: " if exc.expert else ""
        # The request id matches the daemon's access and error logs' lines about this request.
        request = f" (request {exc.request_id})" if exc.request_id else ""
        print(f"expertctl: {label}{exc.message} [{exc.code}]{request}", file=sys.stderr)
        if options.traceback and exc.remote_traceback:
            print(exc.remote_traceback.rstrip(), file=sys.stderr)
        elif options.traceback and exc.code == "expert_failed" and options.run in (_cmd_opinion, _cmd_pipeline):
            print(f"expertctl: (an expert's failure in a pipeline carries no traceback: "
                  f"`expertctl --traceback call {exc.expert} \"$(cat DOCUMENT.json)\"` shows it)", file=sys.stderr)
        return EXIT_FAILED
    except StreamStopped as exc:
        print(f"expertctl: {exc}", file=sys.stderr)
        if options.traceback and getattr(exc.cause, "remote_traceback", None):
            print(exc.cause.remote_traceback.rstrip(), file=sys.stderr)  # type: ignore[attr-defined]
        return EXIT_FAILED
    except (ExpertdError, InputError) as exc:
        print(f"expertctl: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except BrokenPipeError:
        return EXIT_FAILED  # the reader of our stdout went away, e.g. `| head`
    except KeyboardInterrupt:
        return 130
    finally:
        client.close()


if __name__ == "__main__":
    sys.exit(main())
