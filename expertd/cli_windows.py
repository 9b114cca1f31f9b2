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

from expertd.cli_documents import InputError, Progress, check_document, dumps, load_document
from expertd.client import Client
from expertd.errors import ExpertdError, RemoteError

TYPE_CHECKING = False  # typing costs milliseconds to import; annotations here are strings
if TYPE_CHECKING:
    from collections.abc import Iterator
    from typing import IO, Any

# Errors of one expert, written under errors.NAME with --keep-going.
_EXPERT_ERRORS = ("expert_failed", "bad_request", "bad_result", "timeout")


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
                 jobs: int, keep_going: bool, progress: Progress) -> None:
    """Stream JSON Lines in windows of ``size`` documents, ``jobs`` windows in flight.

    A batched expert gets each window in one MAP request, any other expert a
    call per document; each document's experts are asked in turn.  The output
    is what one call per document and expert would write.
    """
    numbered = ((n, line) for n, line in enumerate(source, 1) if line.strip())

    def handle_window(lines: list[tuple[int, str]]) -> tuple[list[str], BaseException | None]:
        return _window_opinions(client, names, batched, lines, keep_going)

    for written, error in _ordered_map(handle_window, _windows(numbered, size), jobs):
        for output in written:
            sink.write(output + "\n")
            sink.flush()
            progress.tick()
        if error is not None:
            raise error


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
                     keep_going: bool) -> tuple[list[str], BaseException | None]:
    """A window of documents with their opinions: the outputs of those before the first failure, and that failure.

    What fails is what one call per document would have failed on first: the
    earliest document's bad JSON or error (a document's experts are asked in
    order, and an error stops its document and those after it).  With
    ``keep_going`` an expert's error is written under ``errors.NAME`` instead.
    """
    documents: list[dict] = []
    failed: tuple[int, BaseException] | None = None  # (document's place in the window, its error)
    for lineno, line in lines:
        try:
            documents.append(load_document(line, f"stdin line {lineno}"))
        except InputError as exc:
            failed = (len(documents), exc)
            break
    for name in names:
        if name in batched and documents:
            try:
                results: list[Any] = client.map(name, documents)
            except ExpertdError as exc:  # the request as a whole: the window's first document did not get through
                results = [exc] * (len(documents) if keep_going and _recordable(exc) else 1)
        else:
            results = []
            for document in documents:
                try:
                    results.append(client.call(name, document))
                except ExpertdError as exc:
                    results.append(exc)
                    if not (keep_going and _recordable(exc)):
                        break
        for place, (document, result) in enumerate(zip(documents, results, strict=False)):
            try:
                if isinstance(result, ExpertdError):  # (a failed item's place holds its error)
                    if keep_going and _recordable(result):
                        _add_error(document, name, result, f"stdin line {lines[place][0]}")
                        continue
                    raise result
                _add_opinion(document, name, result, f"stdin line {lines[place][0]}")
            except (ExpertdError, InputError) as exc:
                if failed is None or place < failed[0]:
                    failed = (place, exc)
                del documents[place:]  # not asked any further: its opinions stop here, as the output does
                break
    return [dumps(document) for document in documents], failed[1] if failed else None


def _recordable(error: ExpertdError) -> bool:
    return isinstance(error, RemoteError) and error.code in _EXPERT_ERRORS


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
