"""``expertctl``: call experts from the shell.  Standard library + msgpack only.

    expertctl call fib n=5                       # -> 8
    cat doc.json | expertctl opinion a | expertctl opinion b
    expertctl opinion --lines sentiment < docs.jsonl > opinions.jsonl
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
from collections import deque

from expertd.client import Client, default_socket
from expertd.errors import ConnectError, ExpertdError, RemoteError

TYPE_CHECKING = False  # typing costs milliseconds to import; annotations here are strings
if TYPE_CHECKING:
    from collections.abc import Iterator
    from typing import IO, Any

EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_UNREACHABLE = 3


class _InputError(Exception):
    """Bad input on stdin; the message names where."""


def _json_default(value: Any) -> Any:
    if isinstance(value, (bytes, bytearray)):
        try:
            return bytes(value).decode("utf-8")
        except UnicodeDecodeError:
            import base64

            return {"base64": base64.b64encode(value).decode("ascii")}
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def _dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, default=_json_default)


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
                raise _InputError(f"positional argument {word!r} after keyword arguments")
            args.append(_parse_value(word))
    return args, kwargs


def _load_document(text: str, where: str) -> dict:
    try:
        document = json.loads(text)
    except ValueError as exc:
        raise _InputError(f"{where}: invalid JSON: {exc}") from None
    if not isinstance(document, dict):
        raise _InputError(f"{where}: the document must be a JSON object, not {type(document).__name__}")
    return document


def _add_opinions(client: Client, names: list[str], document: dict, where: str) -> dict:
    for name in names:
        _add_opinion(document, name, client.call(name, document), where)
    return document


def _add_opinion(document: dict, name: str, result: Any, where: str) -> None:
    opinions = document.setdefault("opinions", {})
    if not isinstance(opinions, dict):
        raise _InputError(f"{where}: the document's 'opinions' is a {type(opinions).__name__}, not an object")
    opinions[name] = result


def _cmd_call(client: Client, options: argparse.Namespace) -> int:
    args, kwargs = _split_call_arguments(options.arguments)
    print(_dumps(client.call(options.name, *args, **kwargs)))
    return 0


def _cmd_opinion(client: Client, options: argparse.Namespace) -> int:
    if options.lines:
        return _opinion_lines(client, options.names, sys.stdin, sys.stdout, options.jobs, options.window)
    document = _load_document(sys.stdin.read(), "stdin")
    print(_dumps(_add_opinions(client, options.names, document, "stdin")))
    return 0


def _opinion_lines(client: Client, names: list[str], source: IO[str], sink: IO[str], jobs: int,
                   window: int | None = None) -> int:
    """Stream JSON Lines: each document gets its opinions; output keeps input order.

    Documents go one call each, ``jobs`` in flight.  When an expert is batched
    (``expertctl list --json`` says ``batched``), windows of documents go
    instead, ``jobs`` windows in flight: a batched expert gets each window in
    one MAP request, an unbatched one a call per document.  A window holds
    ``window`` documents, by default the largest ``max_batch`` of the batched
    experts.  The output is the same either way.
    """
    progress = _Progress(sys.stderr)
    numbered = ((n, line) for n, line in enumerate(source, 1) if line.strip())
    batched, size = _batched_experts(client, names, window)
    if batched:
        def handle_window(lines: list[tuple[int, str]]) -> tuple[list[str], BaseException | None]:
            return _window_opinions(client, names, batched, lines)

        outputs: Iterator = _ordered_map(handle_window, _windows(numbered, size), jobs)
    else:
        def handle(numbered: tuple[int, str]) -> tuple[list[str], None]:
            lineno, line = numbered
            where = f"stdin line {lineno}"
            return [_dumps(_add_opinions(client, names, _load_document(line, where), where))], None

        outputs = _ordered_map(handle, numbered, jobs)
    try:
        for written, error in outputs:
            for output in written:
                sink.write(output + "\n")
                sink.flush()
                progress.tick()
            if error is not None:
                raise error
    finally:
        progress.done()
    return 0


def _batched_experts(client: Client, names: list[str], window: int | None) -> tuple[set[str], int]:
    """Which of ``names`` take their documents in MAP requests, and how many documents a window holds."""
    try:
        described = {expert.get("name"): expert for expert in client.experts()}
    except RemoteError:  # (LIST refused: public_status = no) a call per document, as for any expert
        return set(), 1
    limits = {name: int(described[name].get("max_batch") or 1) for name in names
              if name in described and described[name].get("batched")}
    batched = {name for name, limit in limits.items() if limit > 1 or window}
    return batched, window or max((limits[name] for name in batched), default=1)


def _windows(numbered: Iterator[tuple[int, str]], size: int) -> Iterator[list[tuple[int, str]]]:
    window: list[tuple[int, str]] = []
    for item in numbered:
        window.append(item)
        if len(window) >= size:
            yield window
            window = []
    if window:
        yield window


def _window_opinions(client: Client, names: list[str], batched: set[str],
                     lines: list[tuple[int, str]]) -> tuple[list[str], BaseException | None]:
    """A window of documents with their opinions: the outputs of those before the first failure, and that failure.

    What fails is what one call per document would have failed on first: the
    earliest document's bad JSON or error (a document's experts are asked in
    order, and an error stops its document and those after it).
    """
    documents: list[dict] = []
    failed: tuple[int, BaseException] | None = None  # (document's place in the window, its error)
    for lineno, line in lines:
        try:
            documents.append(_load_document(line, f"stdin line {lineno}"))
        except _InputError as exc:
            failed = (len(documents), exc)
            break
    for name in names:
        if name in batched and documents:
            try:
                results: list[Any] = client.map(name, documents)
            except ExpertdError as exc:  # the request as a whole: the window's first document did not get through
                results = [exc]
        else:
            results = []
            for document in documents:
                try:
                    results.append(client.call(name, document))
                except ExpertdError as exc:
                    results.append(exc)
                    break
        for place, (document, result) in enumerate(zip(documents, results, strict=False)):
            try:
                if isinstance(result, ExpertdError):  # (a failed item's place holds its error)
                    raise result
                _add_opinion(document, name, result, f"stdin line {lines[place][0]}")
            except (ExpertdError, _InputError) as exc:
                if failed is None or place < failed[0]:
                    failed = (place, exc)
                del documents[place:]  # not asked any further: its opinions stop here, as the output does
                break
    return [_dumps(document) for document in documents], failed[1] if failed else None


def _ordered_map(function: Any, items: Iterator, jobs: int) -> Iterator:
    if jobs <= 1:
        yield from map(function, items)
        return
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=jobs) as pool:
        window: deque = deque()
        try:
            for item in items:
                window.append(pool.submit(function, item))
                if len(window) >= 2 * jobs:
                    yield window.popleft().result()
            while window:
                yield window.popleft().result()
        finally:
            for future in window:
                future.cancel()


class _Progress:
    """A self-overwriting progress line on stderr, only when it is a terminal."""

    def __init__(self, stream: IO[str]) -> None:
        self.stream = stream
        self.enabled = stream.isatty()
        self.count = 0
        self.started = self.shown = time.monotonic()

    def tick(self) -> None:
        self.count += 1
        now = time.monotonic()
        if self.enabled and now - self.shown >= 0.2:
            self.shown = now
            rate = self.count / max(now - self.started, 1e-9)
            self.stream.write(f"\r{self.count} documents, {rate:.0f}/s ")
            self.stream.flush()

    def done(self) -> None:
        if self.enabled and self.count:
            self.stream.write(f"\r{self.count} documents in {time.monotonic() - self.started:.1f}s\n")
            self.stream.flush()


def _cmd_list(client: Client, options: argparse.Namespace) -> int:
    experts = client.experts()
    if options.json:
        print(_dumps(experts))
        return 0
    width = max((len(e["signature"]) for e in experts), default=0)
    for expert in experts:
        print(f"{expert['signature']:<{width}}  {expert['doc']}".rstrip())
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
        print(_dumps(status))
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
                                  description="Read a JSON object on stdin, ask each expert in turn (each sees "
                                              "the document as it stands), and write it to stdout with each "
                                              "result under opinions.NAME. With --lines, a batched expert "
                                              "(`expertctl list --json`: batched) gets windows of documents in one "
                                              "MAP request each; the output is the same as one call per document.")
    opinion.add_argument("names", nargs="+", metavar="NAME")
    opinion.add_argument("--lines", action="store_true", help="stream JSON Lines: one document per line, in order")
    opinion.add_argument("--jobs", "-j", type=int, default=4, metavar="N",
                         help="with --lines, documents (for batched experts: windows of documents) in flight at "
                              "once (default: 4)")
    opinion.add_argument("--window", type=_positive, default=None, metavar="N",
                         help="with --lines, documents a batched expert (see `expertctl list --json`) gets in one "
                              "MAP request (default: its max_batch); other experts get one call per document")
    opinion.set_defaults(run=_cmd_opinion)

    listing = commands.add_parser("list", help="list the experts with their signatures")
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
        print(f"expertctl: {label}{exc.message} [{exc.code}]", file=sys.stderr)
        if options.traceback and exc.remote_traceback:
            print(exc.remote_traceback.rstrip(), file=sys.stderr)
        return EXIT_FAILED
    except (ExpertdError, _InputError) as exc:
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
