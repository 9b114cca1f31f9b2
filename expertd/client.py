"""The client library: call experts on a running expertd.  Standard library + msgpack only.

    from expertd.client import Client

    client = Client()                 # EXPERTD_SOCKET, else /run/expertd/expertd.sock
    client.call("fib", 5)             # positional ...
    client.fib(n=5)                   # ... or named arguments, as attribute calls
    client.opinion("sentiment", {"text": "what a lovely day"})
    client.map("fib", [5, 6, 7])      # [8, 13, 21]: many items in one request (a failed item holds its error)
    client.opinions({"text": "hi"}, ["language", ("sentiment", "keywords")])  # experts in stages, one request
    client.pipeline("moderation", {"text": "hi"})                             # a [pipeline:NAME] of the config

A :class:`Client` is safe to share between threads: it keeps a small pool of
connections and gives each call its own.  After ``os.fork()`` (multiprocessing
included) the child drops the inherited pool and opens its own connections;
a fork made behind Python's back (a C library calling fork() and then running
Python in the child) skips that hook, and must not reuse a Client made before it.

``Client("http://host:port", token=...)`` (or ``https://``) calls a daemon on
another machine over its HTTP/JSON API (``http_listen``), with the same methods
and error classes: see :mod:`expertd.client_http` and docs/client.md.  That
transport, and http.client, ssl and json with it, is imported only then.

Retries (see docs/protocol.md): a call is sent again, once, on a fresh
connection when a pooled connection turns out to have been closed by the
daemon before any reply byte arrived (the request was never served), and,
``retries`` times (default once; 0 turns it off) when the daemon reports that
the worker serving it was lost or that the daemon is shutting down.  Experts
are pure opinions, which is what makes that retry safe.
"""

from __future__ import annotations

import _socket  # socket.py's C core: the wrapper costs a one-shot expertctl ~7 ms of enum set-up
import _thread  # threading's lock, without importing threading (~3 ms per process start)
import itertools
import os
import struct
import time
from _weakrefset import WeakSet

from expertd import arrays as _arrays
from expertd import protocol
from expertd.errors import (
    ConnectError,
    ConnectionLost,
    ExpertdError,
    ProtocolError,
    RequestTimeout,
    error_from_wire,
    raise_first_failure,
)

TYPE_CHECKING = False  # typing costs milliseconds to import; annotations here are strings
if TYPE_CHECKING:
    from typing import Any

__all__ = ["Client", "default_socket"]

DEFAULT_TIMEOUT = 60.0
_TIMEVAL = struct.Struct("@ll")
DEFAULT_CONNECT_TIMEOUT = 5.0
_MAX_REPLY = 1 << 30
_FIRST_READ = 64 * 1024
_HEADER = protocol.HEADER
_HEADER_SIZE = protocol.HEADER_SIZE
_MAGIC, _VERSION = protocol.MAGIC, protocol.VERSION
_RESULT, _ERROR, _CALL, _MAP = protocol.RESULT, protocol.ERROR, protocol.CALL, protocol.MAP
_PIPELINE = protocol.PIPELINE
_MAX_REQUEST_ID = protocol.MAX_REQUEST_ID
_pack = protocol.pack


def default_socket() -> str:
    """The socket a client uses when given none: ``$EXPERTD_SOCKET`` or the daemon's default path."""
    return os.environ.get(protocol.SOCKET_ENV) or protocol.DEFAULT_SOCKET


class Client:
    """A connection pool to one expertd socket.

    ``timeout`` bounds each wait for reply bytes (None waits for ever);
    ``connect_timeout`` bounds connecting; ``retries`` is how many more attempts
    a call gets after a lost worker (0 for experts with side effects);
    ``pool_size`` is how many idle connections are kept.  A ``socket`` that is
    an ``http://`` or ``https://`` URL makes a remote client (expertd.client_http),
    which also takes ``token`` (else ``$EXPERTD_TOKEN``) and ``ssl_context``;
    on a Unix socket, which asks for no token, they are ignored.
    """

    remote = False  # True for a remote client (an http(s):// URL): see expertd.client_http

    def __new__(cls, socket: str | None = None, *args: Any, **options: Any) -> Client:
        # The transport is chosen once, here: a call on the Unix socket pays nothing for the choice.
        where = socket or default_socket()
        if cls is Client and isinstance(where, str) and where.startswith(("http://", "https://")):
            return object.__new__(_http_client_class())
        return object.__new__(cls)

    def __init__(
        self,
        socket: str | None = None,
        *,
        timeout: float | None = DEFAULT_TIMEOUT,
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
        retries: int = 1,
        pool_size: int = 8,
        token: str | None = None,  # (the remote client's: see __new__)
        ssl_context: object = None,
    ) -> None:
        self.socket_path = socket or default_socket()
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self.retries = retries
        self.pool_size = pool_size
        self._pool: list[Any] = []
        self._lock = _thread.allocate_lock()
        self._ids = itertools.count(1)
        _clients.add(self)

    # ----------------------------------------------------------- public API
    def call(self, expert: str, /, *args: Any, **kwargs: Any) -> Any:
        """Call ``expert`` with positional and/or keyword arguments and return its result."""
        return self._request(_CALL, _pack([expert, list(args), kwargs]))

    def map(self, expert: str, items: Any, *, raise_first: bool = False) -> list:
        """Call ``expert`` once per item (its one positional argument), all in one request; the results, in order.

        A failed item's place in the list holds its error: the instance of the
        :class:`~expertd.errors.RemoteError` subclass a failed :meth:`call`
        would raise (``ExpertFailed`` with ``remote_type`` and
        ``remote_traceback``, ``BadRequest``, ``BadResult``); the other items
        are answered all the same.  Tell them apart with
        ``isinstance(result, RemoteError)``, or pass ``raise_first=True`` to
        raise the first failed item's error instead.  A failure of the request
        as a whole (no such expert, a timeout, a lost worker, a malformed
        request) is raised, and retried as :meth:`call` retries.

        A batched expert (``@expert(batched=True)``, model experts) takes the
        items in batches of its ``max_batch``; any other expert is called once
        per item, on one worker.  One request carries at most
        ``protocol.MAX_MAP_ITEMS`` items and ``max_frame`` bytes, and runs
        under the expert's one ``timeout``.
        """
        outcomes = protocol.map_outcomes(self._request(_MAP, _pack([expert, list(items)])))
        if raise_first:
            raise_first_failure(outcomes)
        return outcomes

    def opinion(self, expert: str, document: Any) -> Any:
        """Ask ``expert`` for its opinion on ``document`` (the expert's one positional argument)."""
        return self.call(expert, document)

    def opinions(self, document: dict, names: Any, *, on_error: str | None = None) -> dict:
        """Run experts on ``document`` in stages, in one request; the document back with their opinions.

        ``names`` lists the stages in order: an expert's or a pipeline's name
        is a stage of its own, and a tuple (or list) of expert names is one
        stage whose experts are independent (each sees the document as it was
        before the stage; the daemon may run them side by side)::

            doc = client.opinions({"text": "bonjour"}, ["language", ("sentiment", "keywords")])
            doc["opinions"]["language"]       # 'fr'; sentiment and keywords saw it
            doc.get("errors", {})             # {NAME: {"code", "type", "message"}} per expert that failed

        Every expert asked for ends up under ``opinions.NAME`` or, when it
        failed or was not run, under ``errors.NAME`` (code ``skipped`` for
        those not run): an expert's failure is not raised.  ``on_error`` is
        ``"continue"`` (the default for a list of experts: later stages still
        run) or ``"stop"`` (they are skipped); it overrides a pipeline's own.
        What fails the request as a whole is raised as :meth:`call` raises it:
        an unknown name (``UnknownExpert``), a malformed list or document
        (``BadRequest``), the plan's timeout, a lost worker (retried).
        """
        return self._pipeline(target_of(names), document, on_error)

    def pipeline(self, name: str, document: dict, *, on_error: str | None = None) -> dict:
        """Run the pipeline ``name`` (a ``[pipeline:NAME]`` of the daemon's config) on ``document``, in one request.

        The reply is the document with ``opinions.NAME`` for each of the
        pipeline's experts that answered and ``errors.NAME`` for each that
        failed or was not run, as :meth:`opinions` returns it; ``on_error``
        (``"continue"`` or ``"stop"``) overrides the pipeline's own::

            doc = client.pipeline("moderation", {"text": "you idiot"})
            doc["opinions"]["keywords"]["flagged"]      # ['idiot']
        """
        if not isinstance(name, str) or not name:
            raise ValueError(f"a pipeline's name is a non-empty string, not {name!r}")
        return self._pipeline(name, document, on_error)

    def _pipeline(self, target: str, document: dict, on_error: str | None) -> dict:
        body = [target, document] if on_error is None else [target, document, {"on_error": on_error}]
        return self._request(_PIPELINE, _pack(body))

    def predict(self, expert: str, inputs: Any, *, arrays: bool | None = None) -> Any:
        """Run model expert ``expert`` on a batch: one output row per input row.

        ``inputs`` is a batch of rows (a numpy array or nested lists), or a
        dict of them by input name for a model with several inputs.  numpy
        arrays travel as raw bytes (docs/protocol.md, "Arrays"), not as lists
        of numbers.  The outputs come back as numpy arrays (a dict of them for
        a model with several outputs) when ``arrays`` is true, which is the
        default when ``inputs`` holds a numpy array, else as nested lists.
        """
        if _arrays.is_array(inputs):
            encoded: Any = _arrays.encode(inputs)
        elif isinstance(inputs, dict):
            encoded = {name: _arrays.encode(rows) if _arrays.is_array(rows) else rows for name, rows in inputs.items()}
        else:
            encoded = inputs
        if arrays is None:
            arrays = _arrays.is_encoded(encoded) or (
                isinstance(encoded, dict) and any(_arrays.is_encoded(rows) for rows in encoded.values()))
        if not arrays:
            return self.call(expert, encoded)
        return _arrays.decode_tree(self.call(expert, encoded, arrays=True))

    def ping(self) -> dict:
        """Round-trip to a worker; returns its pid, number, version and request count."""
        return self._request(protocol.PING, b"")

    def experts(self) -> list[dict]:
        """The served experts (name, function, signature, first docstring line...), then the named pipelines.

        A pipeline's entry is ``{"name", "pipeline": True, "stages": [[expert, ...], ...], "on_error",
        "timeout"}`` (its stages with nested pipelines expanded; its timeout in seconds).
        """
        return self._request(protocol.LIST, b"")

    # Requests the master answers.  status (like experts) is open to every caller unless the daemon's
    # public_status is no; reload, stop and set_workers need root, the daemon's own user or the daemon's
    # control_uids / control_gids: others get AccessDenied.
    def status(self) -> dict:
        """The master's view: workers, their state, requests and memory (see ``expertctl status``)."""
        return self._request(protocol.STATUS, b"")

    def reload(self) -> dict:
        """Reload config and experts into a new generation of workers (like SIGHUP)."""
        return self._request(protocol.RELOAD, b"")

    def stop(self) -> dict:
        """Stop the daemon gracefully (like SIGTERM)."""
        return self._request(protocol.STOP, b"")

    def set_workers(self, count: int) -> dict:
        """Run ``count`` workers from now on (like TTIN/TTOU)."""
        return self._request(protocol.SCALE, protocol.pack(count))

    def close(self) -> None:
        """Close the pooled connections (calls made later open new ones)."""
        # Popped one at a time, as calls do: each connection is taken by a call or closed here.
        while True:
            try:
                conn = self._pool.pop()
            except IndexError:
                return
            conn.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        return _ExpertMethod(self, name)

    def __repr__(self) -> str:
        return f"Client(socket={self.socket_path!r})"

    # ------------------------------------------------------------ internals
    def _request(self, kind: int, body: bytes) -> Any:
        stale_retry = True
        lost_retries = self.retries
        while True:
            # list.pop and list.append are atomic: the pool itself needs no lock on the way.
            # After a fork the at-fork hook has emptied the child's pool (os.getpid() here
            # would be a system call on every call).
            try:
                conn, reused = self._pool.pop(), True
            except IndexError:
                conn, reused = self._connect(), False
            request_id = next(self._ids) % _MAX_REQUEST_ID + 1  # 1..2**32-1: 0 is the daemon's
            try:
                reply_kind, reply = self._round_trip(conn, kind, request_id, body)
            except _Stale as exc:
                conn.close()
                if reused and stale_retry:
                    # The daemon closed idle connections (restart, idle_timeout): the rest
                    # of the pool is as stale as this one, so retry on a fresh connection.
                    stale_retry = False
                    self.close()
                    continue
                raise ConnectionLost(
                    f"expertd at {self.socket_path} closed the connection before replying: {exc}"
                ) from None
            except BaseException:
                conn.close()
                raise
            if reply_kind == _RESULT:
                if len(self._pool) < self.pool_size:
                    self._pool.append(conn)
                else:
                    conn.close()
                return reply
            conn.close()  # the daemon may close after an error; never reuse the connection
            error = error_from_wire(reply)
            if error.retryable and lost_retries > 0:
                lost_retries -= 1
                continue
            raise error

    def _round_trip(self, conn: _socket.socket, kind: int, request_id: int, body: bytes) -> tuple[int, Any]:
        # The kernel bounds each read and write (SO_RCVTIMEO, SO_SNDTIMEO: see _connect).
        try:
            conn.sendall(_HEADER.pack(_MAGIC, _VERSION, kind, request_id, len(body)) + body)
        except (TimeoutError, BlockingIOError):
            raise RequestTimeout(f"sending to expertd at {self.socket_path} timed out after {self.timeout}s") from None
        except OSError as exc:
            # The daemon may have refused the request (too large) and closed: its reply is still readable.
            early = self._read_early_reply(conn, request_id)
            if early is not None:
                return early
            raise _Stale(exc.strerror or str(exc)) from None
        try:
            data = conn.recv(_FIRST_READ)  # one read: a reply usually arrives whole
        except (TimeoutError, BlockingIOError):  # BlockingIOError: SO_RCVTIMEO expired
            raise RequestTimeout(f"no reply from expertd at {self.socket_path} within {self.timeout}s") from None
        except (ConnectionResetError, BrokenPipeError) as exc:
            raise _Stale(exc.strerror or str(exc)) from None
        if not data:
            raise _Stale("closed with no reply")
        try:
            if len(data) < _HEADER_SIZE:
                data += protocol.recv_exact(conn, _HEADER_SIZE - len(data))
            magic, version, reply_kind, reply_id, length = _HEADER.unpack_from(data)
            if magic != _MAGIC or version != _VERSION:
                protocol.parse_header(data[:_HEADER_SIZE])  # raises the ProtocolError that says which
            missing = _HEADER_SIZE + length - len(data)
            if missing:
                if missing < 0:  # one request in flight per connection: nothing may follow its reply
                    raise ProtocolError(f"{-missing} unexpected bytes after the reply")
                if length > _MAX_REPLY:
                    raise ProtocolError(f"reply of {length} bytes is larger than the client accepts")
                data = self._read_rest(conn, data, _HEADER_SIZE + length)
        except (ConnectionLost, ConnectionResetError) as exc:
            raise ConnectionLost(f"expertd at {self.socket_path} closed the connection mid-reply: {exc}") from None
        except (RequestTimeout, TimeoutError, BlockingIOError):
            raise RequestTimeout(f"no reply from expertd at {self.socket_path} within {self.timeout}s") from None
        if reply_id != request_id and not (reply_kind == _ERROR and reply_id == 0):
            # (Request id 0 is never used by clients: the daemon answers with it when
            # it refuses the connection itself, e.g. access denied.)
            raise ProtocolError(f"reply for request {reply_id} arrived while waiting for {request_id}")
        if reply_kind != _RESULT and reply_kind != _ERROR:
            raise ProtocolError(f"unknown reply kind 0x{reply_kind:02x}")
        try:
            return reply_kind, protocol.unpack(memoryview(data)[_HEADER_SIZE:] if missing else data[_HEADER_SIZE:])
        except ValueError as exc:
            raise ProtocolError(f"reply body is not valid msgpack: {exc}") from None

    @staticmethod
    def _read_rest(conn: _socket.socket, data: bytes, size: int) -> bytearray:
        """A large reply: the rest straight into one buffer of its size."""
        whole = bytearray(size)
        whole[: len(data)] = data
        view = memoryview(whole)[len(data) :]
        while view:
            got = conn.recv_into(view)
            if not got:
                raise ConnectionLost("closed mid-reply")
            view = view[got:]
        return whole

    def _read_early_reply(self, conn: _socket.socket, request_id: int) -> tuple[int, Any] | None:
        try:
            conn.settimeout(0.5)
            kind, reply_id, body = protocol.read_frame(conn, _MAX_REPLY, time.monotonic() + 0.5)
            if kind == protocol.ERROR and reply_id in (request_id, 0):
                return kind, protocol.unpack(body)
        except (ExpertdError, OSError, ValueError):
            pass
        return None

    def _after_fork_in_child(self) -> None:
        # The pool's connections belong to the parent; another thread of the parent
        # may have held the lock at fork time, so both are replaced, not waited on.
        self._lock = _thread.allocate_lock()
        for conn in self._pool:
            conn.close()  # our copies only: the parent's connections stay open
        self._pool = []

    def _connect(self) -> _socket.socket:
        path = self.socket_path
        conn = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
        conn.settimeout(self.connect_timeout)
        try:
            conn.connect(path)
        except FileNotFoundError:
            conn.close()
            raise ConnectError(
                f"no expertd socket at {path}: is the daemon running? (--socket PATH or $EXPERTD_SOCKET says where)",
                path,
            ) from None
        except ConnectionRefusedError:
            conn.close()
            raise ConnectError(
                f"nothing is listening on {path}: the socket file is left from a daemon that stopped", path
            ) from None
        except PermissionError:
            conn.close()
            raise ConnectError(
                f"permission denied on {path}: join the socket's group or ask for its socket_mode to be widened", path
            ) from None
        except TimeoutError:
            conn.close()
            raise ConnectError(
                f"connecting to {path} timed out after {self.connect_timeout}s: the daemon is not accepting", path
            ) from None
        except OSError as exc:
            conn.close()
            raise ConnectError(f"cannot connect to {path}: {exc.strerror or exc}", path) from None
        # From here on the socket is "blocking" for Python and the kernel enforces the timeout:
        # with a Python-level timeout every read and write would cost an extra poll() call.
        conn.settimeout(None)
        if self.timeout is not None:
            seconds = int(self.timeout)
            limit = _TIMEVAL.pack(seconds, int((self.timeout - seconds) * 1e6))
            conn.setsockopt(_socket.SOL_SOCKET, _socket.SO_RCVTIMEO, limit)
            conn.setsockopt(_socket.SOL_SOCKET, _socket.SO_SNDTIMEO, limit)
        return conn


_clients: WeakSet[Client] = WeakSet()
_http_client: type | None = None


def _http_client_class() -> type:
    """Client with the HTTP transport's methods on top, made on first use (client_http imports nothing of ours)."""
    global _http_client
    if _http_client is None:
        from expertd.client_http import HttpTransport

        _http_client = type("HttpClient", (HttpTransport, Client), {"__module__": __name__})
    return _http_client


def _reset_clients_after_fork() -> None:
    for client in list(_clients):
        client._after_fork_in_child()


os.register_at_fork(after_in_child=_reset_clients_after_fork)


def target_of(names: Any) -> str:
    """The target a list of stages writes: ``["a", ("b", "c")]`` -> ``"a,b+c"`` (names checked lightly)."""
    if isinstance(names, str) or not isinstance(names, (list, tuple)) or not names:
        raise ValueError(f"names must be a non-empty list of expert or pipeline names, not {names!r}")
    return ",".join("+".join(_name(name) for name in stage) if isinstance(stage, (list, tuple)) and stage
                    else _name(stage) for stage in names)


def _name(name: Any) -> str:
    if not isinstance(name, str) or not name or "," in name or "+" in name:
        raise ValueError(f"{name!r} is not an expert or pipeline name (a non-empty string without ',' or '+'; "
                         "a tuple of names is one stage)")
    return name


class _Stale(Exception):
    """The connection was closed by the daemon before any reply byte: the request was not served."""


class _ExpertMethod:
    """``client.fib`` — calls the expert of that name with whatever arguments it is given."""

    __slots__ = ("_client", "_name")

    def __init__(self, client: Client, name: str) -> None:
        self._client = client
        self._name = name

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._client.call(self._name, *args, **kwargs)

    def __repr__(self) -> str:
        return f"<expert {self._name!r} on {self._client.socket_path}>"

