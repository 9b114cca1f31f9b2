"""``expertctl opinion --lines`` for a batched expert: windows of documents, one MAP request per window.

The way of streaming from before pipelines, kept where it is faster: a
single batched expert (``expertctl list --json``: batched), or any experts
with ``--window N``.  A batched expert gets each window of documents in one
MAP request, so that it runs real batches; any other expert gets a call per
document, each document's experts asked in turn.  The output is what one call
per document and expert would write; windows go ``--jobs`` at a time on
threads, their outputs written in order.
"""

from __future__ import annotations

from expertd.cli_documents import (
    RECORD,
    SKIP,
    STOP,
    InputError,
    Tally,
    check_document,
    dumps,
    is_documents_own,
    load_document,
    recorded,
    stream_error,
)
from expertd.client import Client
from expertd.errors import ExpertdError, RemoteError

TYPE_CHECKING = False  # typing costs milliseconds to import; annotations here are strings
if TYPE_CHECKING:
    from collections.abc import Iterator
    from typing import IO, Any

def batched_experts(client: Client, names: list[str], window: int | None) -> tuple[set[str], int]:
    """Which of ``names`` take their documents in MAP requests, and how many documents a window holds."""
    try:
        described = {expert.get("name"): expert for expert in client.experts()}
    except RemoteError:  # (LIST refused: public_status = no) no MAP windows
        return set(), 1
    if any(described.get(name, {}).get("pipeline") for name in names):
        return set(), 1  # (a pipeline among them: one PIPELINE request per document)
    limits = {name: int(described[name].get("max_batch") or 1) for name in names
              if name in described and described[name].get("batched")}
    batched = {name for name, limit in limits.items() if limit > 1 or window}
    return batched, window or max((limits[name] for name in batched), default=1)


def window_lines(client: Client, names: list[str], batched: set[str], size: int, source: IO[str], sink: IO[str],
                 jobs: int, tally: Tally) -> None:
    """Stream JSON Lines in windows of ``size`` documents, ``jobs`` windows in flight.

    A batched expert gets each window in one MAP request, any other expert a
    call per document; each document's experts are asked in turn.  The output
    is what one call per document and expert would write; a bad document is
    what ``tally.on_error`` says (see :mod:`expertd.cli_lines`).
    """
    progress, on_error = tally.progress, tally.on_error

    def numbered() -> Iterator[tuple[int, str]]:
        for n, line in enumerate(source, 1):
            progress.taken += len(line.encode(errors="replace"))  # (bytes, as the input's size counts them)
            if line.strip():
                yield n, line

    def handle_window(lines: list[tuple[int, str]]) -> list[tuple[int, str | None, Any]]:
        return _window_opinions(client, names, batched, lines, on_error)

    for outcomes in _ordered_map(handle_window, _windows(numbered(), size), jobs):
        for lineno, output, error in outcomes:
            if output is not None:
                sink.write(output + "\n")
                sink.flush()
                tally.written += 1
                tally.with_errors += error is not None
            elif on_error == SKIP and is_documents_own(error):  # type: ignore[arg-type]
                tally.skip(lineno, error)  # type: ignore[arg-type]
            else:
                raise tally.stop(lineno, error)  # type: ignore[arg-type]
            progress.tick()


def _windows(numbered: Iterator[tuple[int, str]], size: int) -> Iterator[list[tuple[int, str]]]:
    window: list[tuple[int, str]] = []
    for item in numbered:
        window.append(item)
        if len(window) >= size:
            yield window
            window = []
    if window:
        yield window


def _window_opinions(client: Client, names: list[str], batched: set[str], lines: list[tuple[int, str]],
                     on_error: str) -> list[tuple[int, str | None, Any]]:
    """A window of documents with their opinions: (input line, output line or None, error or None) each.

    A document's experts are asked in order, and an error stops that document
    (output None, its error) unless ``on_error`` is record and the error is the
    document's own: then it is written with the error under ``errors.NAME``
    (the same as a pipeline's ``continue``) and goes on to the next expert.
    With ``on_error`` stop, the window ends at its first failed document.
    """
    record = on_error == RECORD
    documents: list[dict | None] = []
    failures: list[BaseException | None] = []
    for lineno, line in lines:
        try:
            documents.append(load_document(line, f"stdin line {lineno}"))
            failures.append(None)
        except InputError as exc:
            documents.append(None)
            failures.append(exc)
    recorded_any = [False] * len(lines)
    as_far: list[dict | None] = [None] * len(lines)  # a failed document as far as it got (for record)
    for name in names:
        first = next((place for place, failure in enumerate(failures) if failure is not None), None)
        if first is not None and on_error == STOP:  # (nothing after the first failure is written: not asked)
            documents[first:] = [None] * (len(documents) - first)
        live = [place for place, document in enumerate(documents) if document is not None]
        if not live:
            break
        if name in batched:
            try:
                results: list[Any] = _map_split(client, name, [documents[place] for place in live])
            except ExpertdError as exc:  # the request as a whole: the window's first document did not get through
                stopped = stream_error(exc, name)
                if stopped is not None:
                    raise stopped from None  # (every document's: the stream stops, after the windows before)
                results = [exc] * (len(live) if on_error != STOP and is_documents_own(exc) else 1)
        else:
            results = []
            for place in live:
                try:
                    results.append(client.call(name, documents[place]))
                except ExpertdError as exc:
                    results.append(exc)
                    if on_error == STOP or not is_documents_own(exc):
                        break
        for place, result in zip(live, results, strict=False):
            document = documents[place]
            where = f"stdin line {lines[place][0]}"
            try:
                if isinstance(result, ExpertdError):  # (a failed item's place holds its error)
                    # An error naming the expert is written under errors.NAME; one naming none (a document
                    # too large) refused the document as a whole: under errors._request, as a pipeline's.
                    if record and getattr(result, "expert", None) and is_documents_own(result):
                        _add_error(document, name, result, where)  # type: ignore[arg-type]
                        recorded_any[place] = True
                        continue
                    raise result
                _add_opinion(document, name, result, where)  # type: ignore[arg-type]
            except (ExpertdError, InputError) as exc:
                documents[place], failures[place], as_far[place] = None, exc, document
        if len(results) < len(live):  # (stopped at a failure: the documents after it were not asked)
            for place in live[len(results):]:
                documents[place] = None
    outcomes: list[tuple[int, str | None, Any]] = []
    for place, (lineno, _line) in enumerate(lines):
        document, failure = documents[place], failures[place]
        if failure is not None:
            if record and is_documents_own(failure):
                outcomes.append((lineno, recorded(as_far[place], failure, lineno), failure))
                continue
            outcomes.append((lineno, None, failure))
            if on_error == STOP or not is_documents_own(failure):
                break  # (nothing after it is written)
            continue
        if document is None:
            break  # (not asked: the window stopped before it)
        outcomes.append((lineno, dumps(document), True if recorded_any[place] else None))
    return outcomes


def _map_split(client: Client, name: str, documents: list[dict]) -> list[Any]:
    """``documents`` through batched expert ``name`` in one MAP request, or in halves while it is too large.

    A window too large for the daemon's max_frame is no document's fault
    while each of its documents fits alone: it is split, and split again, and
    only a document too large on its own gets the error (in its place in the
    results, as a failed item's).  Any other error of a request is raised.
    """
    try:
        return client.map(name, documents)
    except RemoteError as exc:
        if exc.code != "frame_too_large":
            raise
        if len(documents) == 1:
            return [exc]
    half = len(documents) // 2
    return _map_split(client, name, documents[:half]) + _map_split(client, name, documents[half:])


def _add_opinion(document: dict, name: str, result: Any, where: str) -> None:
    opinions = document.setdefault("opinions", {})
    if not isinstance(opinions, dict):
        raise InputError(f"{where}: the document's 'opinions' is a {type(opinions).__name__}, not an object")
    opinions[name] = result


def _add_error(document: dict, name: str, error: RemoteError, where: str) -> None:
    check_document(document, where)
    document.setdefault("opinions", {}).pop(name, None)  # (as a pipeline writes it: an opinions object, even empty)
    document.setdefault("errors", {})[name] = {"code": error.code, "type": error.remote_type,
                                               "message": error.message}


def _ordered_map(function: Any, items: Iterator, jobs: int) -> Iterator:
    if jobs <= 1:
        yield from map(function, items)
        return
    from collections import deque
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
