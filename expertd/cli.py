"""``expertctl``: call experts from the shell.  Standard library + msgpack only.

    expertctl call fib n=5                       # -> 8
    expertctl opinion a b c < doc.json           # one request: a, then b (seeing a's opinion), then c
    expertctl pipeline moderation < doc.json     # a [pipeline:NAME] of the daemon's config
    expertctl opinion --lines a b < docs.jsonl > opinions.jsonl   # a stream, order kept
    expertctl opinion --lines --keep-going a b < docs.jsonl       # failures under errors.NAME, not fatal
    expertctl opinion --lines --window 64 NAME < docs.jsonl   # NAME batched: 64 documents a request
    expertctl list
    expertctl ping
    expertctl status [--json] | reload | stop | workers N

Exit status: 0 on success, 1 when the daemon or an expert reports an error or
the input is bad, 2 for a bad command line, 3 when no daemon can be reached.
Every failure is one line on stderr.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from expertd.cli_documents import InputError, dumps, load_document, one_document, stages_of
from expertd.cli_lines import document_lines
from expertd.client import Client, default_socket
from expertd.errors import ConnectError, ExpertdError, RemoteError

TYPE_CHECKING = False  # typing costs milliseconds to import; annotations here are strings
if TYPE_CHECKING:
    from typing import Any

EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_UNREACHABLE = 3


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
    if options.lines:
        return document_lines(client, names, pipeline, sys.stdin, sys.stdout, options.jobs, options.keep_going,
                              getattr(options, "window", None))
    target = pipeline if names is None else stages_of(names)
    document = load_document(sys.stdin.read(), "stdin")
    print(dumps(one_document(client, target, document, "stdin", options.keep_going)))
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
    print(f"socket {status['socket']}: {status['workers_wanted']} workers wanted, "
          f"{status['requests']} requests served, {status['connections']} connections open")
    print(f"experts: {', '.join(status['experts'])}")
    for quarantine in status.get("quarantined", ()):  # (an older daemon sends none)
        print(f"quarantined: {quarantine['expert']} (its calls kept killing workers) until "
              f"{time.strftime('%H:%M:%S', time.localtime(quarantine['until']))}, "
              f"{_duration(quarantine['seconds_left'])} from now")
    for name, figures in status.get("pipelines", {}).items():  # (pipelines that were asked for)
        outcomes = ", ".join(f"{code}: {count}" for code, count in figures["outcomes"].items())
        print(f"pipeline {name}: {figures['requests']} requests ({outcomes}), mean {figures['mean_ms']} ms")
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


def _cmd_reload(client: Client, options: argparse.Namespace) -> int:
    reply = client.reload()
    last = reply.get("last_reload") or {}
    if reply.get("reloading"):
        print(f"reloading: generation {reply['generation']} loaded, its workers are starting")
        return 0
    if last and not last.get("ok"):
        print(f"expertctl: reload failed, generation {reply['generation']} keeps serving: {last.get('error')}",
              file=sys.stderr)
        return EXIT_FAILED
    print(f"reloaded: generation {reply['generation']}")
    return 0


def _cmd_stop(client: Client, options: argparse.Namespace) -> int:
    reply = client.stop()
    print(f"stopping expertd (master pid {reply['pid']})")
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
             "says): the failure is one line on stderr and the exit status 1; with --lines, the documents before it "
             "are written and the stream stops there. With --keep-going the daemon goes on (on_error = continue): "
             "documents are written with errors.NAME ({code, type, message}) for each expert that failed or was "
             "not run, and the exit status stays 0. Bad input (a line that is not a JSON object) and failures of "
             "a request as a whole (unknown names, a lost daemon) stop it either way.")


def _document_options(command: argparse.ArgumentParser) -> None:
    command.add_argument("--lines", action="store_true", help="stream JSON Lines: one document per line, in order")
    command.add_argument("--jobs", "-j", type=_positive, default=4, metavar="N",
                         help="with --lines, connections to the daemon (at most one per worker), each with "
                              "several documents in flight; with MAP windows, windows in flight (default: 4)")
    command.add_argument("--keep-going", "-k", action="store_true",
                         help="write documents whose experts failed, with errors.NAME, and exit 0 (see above)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="expertctl", description="Call experts served by expertd.")
    parser.add_argument("--socket", "-s", metavar="PATH",
                        help=f"daemon socket (default: $EXPERTD_SOCKET or {default_socket()})")
    parser.add_argument("--timeout", type=float, default=None, metavar="SECONDS",
                        help="how long to wait for each reply (default: 60; for reload, as long as the daemon's "
                             "reload_timeout lets loading take)")
    parser.add_argument("--traceback", action="store_true",
                        help="on an expert's error, also print the remote traceback")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    call = commands.add_parser("call", help="call an expert; print its result as JSON",
                               description="Arguments are parsed as JSON where they parse, else taken as "
                                           "strings; KEY=VALUE passes a keyword argument.")
    call.add_argument("name", metavar="NAME")
    call.add_argument("arguments", nargs="*", metavar="ARG | KEY=VALUE")
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
    pipeline.add_argument("name", metavar="NAME")
    _document_options(pipeline)
    pipeline.set_defaults(run=_cmd_pipeline)

    listing = commands.add_parser("list", help="list the experts with their signatures, and the pipelines")
    listing.add_argument("--json", action="store_true", help="print JSON")
    listing.set_defaults(run=_cmd_list)

    ping = commands.add_parser("ping", help="check that the daemon answers")
    ping.set_defaults(run=_cmd_ping)

    status = commands.add_parser("status", help="master, workers, requests and shared/private memory")
    status.add_argument("--json", action="store_true", help="print JSON")
    status.set_defaults(run=_cmd_status)
    commands.add_parser("reload", help="reload config and experts into new workers (like SIGHUP)"
                        ).set_defaults(run=_cmd_reload)
    commands.add_parser("stop", help="stop the daemon gracefully (like SIGTERM)").set_defaults(run=_cmd_stop)
    workers = commands.add_parser("workers", help="set the number of workers (like TTIN/TTOU)")
    workers.add_argument("count", type=int, metavar="N")
    workers.set_defaults(run=_cmd_workers)
    return parser


def main(argv: list[str] | None = None) -> int:
    options = build_parser().parse_args(argv)
    timeout = options.timeout
    if timeout is None:
        # A reload's reply comes once the new generation has loaded (or failed to), which the daemon
        # bounds with reload_timeout; any other reply is quick.
        timeout = _RELOAD_WAIT if options.run is _cmd_reload else 60.0
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
