"""The client's HTTP transport: ``Client("http://host:port", token=...)`` calls a daemon on another machine.

State it owns: each remote client's URL parts, token and TLS context, and its
pool of keep-alive HTTP(S) connections (the pool list and its fork handling
are :class:`expertd.client.Client`'s; here each entry is a socket, TLS-wrapped for https://).

It speaks the daemon's HTTP/JSON API (docs/http.md) to its ``http_listen``,
with the methods and exceptions of the Unix-socket client::

    client = Client("https://experts.example.com", token=os.environ["EXPERTD_TOKEN"])
    client.fib(5)                       # POST /call/fib  [5]
    client.map("fib", [5, 6])           # POST /map/fib   [5, 6]
    client.pipeline("moderation", doc)  # POST /pipeline/moderation

:class:`HttpTransport` is a mixin: :mod:`expertd.client` puts it in front of
``Client`` the first time a URL is given, so that importing the client costs
nothing of json and ssl (ssl only for https://), and this module imports
nothing of the client's (no import circle).  Standard library only.

HTTP/1.1 is written here, and read by :mod:`expertd.client_http_reader`, rather
than with http.client, whose reply parsing (the email package's header parser)
doubled the client's CPU per call (measured on a loopback call: 225 µs with
http.client, 106 µs here, kernel included).
"""

from __future__ import annotations

import ipaddress  # (free: urllib.parse imports it)
import json
import os
import socket as _socket
from urllib.parse import quote, urlsplit

from expertd.client_http_reader import Reply, Stale, read_reply
from expertd.errors import (
    BadRequest,
    ConnectError,
    ConnectionLost,
    LocalOnly,
    Overloaded,
    ProtocolError,
    RemoteError,
    RequestTimeout,
    ShuttingDown,
    Unauthorized,
    error_from_wire,
    raise_first_failure,
)

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

TOKEN_ENV = "EXPERTD_TOKEN"  # (the daemon's fallback for its own token too: one name on both sides)
_JSON = "application/json"
_ON_ERROR = frozenset({"stop", "continue"})
_warned: set[str] = set()  # the hosts warned of a token sent in cleartext


class HttpTransport:
    """The methods of ``Client`` that travel over HTTP; the rest (pool, fork, close, attribute calls) is Client's.

    ``token`` is sent as ``Authorization: Bearer TOKEN`` (default: ``$EXPERTD_TOKEN``;
    none when both are unset or empty). ``ssl_context`` verifies an ``https://``
    server (default: ``ssl.create_default_context()``, the system's CAs; for a
    private CA, ``ssl.create_default_context(cafile=...)``).
    """

    remote = True  # (Client's is False: what expertctl asks to tell the two apart)
    socket_path: str
    timeout: float | None
    connect_timeout: float
    retries: int
    pool_size: int
    _pool: list

    def __init__(self, socket: str | None = None, *, token: str | None = None, ssl_context: Any = None,
                 **options: Any) -> None:
        super().__init__(socket, **options)  # type: ignore[call-arg]  (Client's: timeouts, retries, pool)
        self.url = self.socket_path
        parts = urlsplit(self.url)
        if parts.username is not None or parts.password is not None:
            raise ValueError("a URL for Client carries no credentials: pass the token as token= (or $EXPERTD_TOKEN)")
        if parts.query or parts.fragment:
            raise ValueError(f"{self.url!r}: a daemon's URL has no query or fragment; use http://HOST:PORT[/PREFIX]")
        try:
            port = parts.port
        except ValueError:
            raise ValueError(f"{self.url!r}: the port is not a number from 0 to 65535") from None
        if not parts.hostname:
            raise ValueError(f"{self.url!r} names no host; use http://HOST:PORT (the daemon's http_listen)")
        self._tls = parts.scheme == "https"
        self._host = parts.hostname
        self._port = port or (443 if self._tls else 80)
        self._prefix = quote(parts.path.rstrip("/"), safe="/%")  # behind a proxy that serves the daemon under a path
        if self._tls and ssl_context is None:
            import ssl

            ssl_context = ssl.create_default_context()
        self._ssl_context = ssl_context
        token = token if token is not None else os.environ.get(TOKEN_ENV)
        host = f"[{self._host}]" if ":" in self._host else self._host
        if port is not None:
            host = f"{host}:{port}"
        self._head = f"Host: {host}\r\nAccept: {_JSON}\r\n"  # (every request's fixed headers, written once)
        self._has_token = bool(token)
        if token:
            if not (token.isascii() and token.isprintable()) or " " in token:
                raise ValueError("the token must be printable ASCII without spaces (check token= or $EXPERTD_TOKEN)")
            self._head += f"Authorization: Bearer {token}\r\n"
            if not self._tls and not _is_loopback(self._host) and self._host not in _warned:
                _warned.add(self._host)  # (once per host and process: a program making a Client per call warns once)
                import warnings

                warnings.warn(f"the token for {self.url} crosses the network in cleartext (http:// to another "
                              "machine): call https:// on a TLS-terminating proxy in front of the daemon "
                              "(expertd --help-topic client, section TLS)", stacklevel=2)

    # ----------------------------------------------------------- public API
    def call(self, expert: str, /, *args: Any, **kwargs: Any) -> Any:
        """Call ``expert`` with positional or keyword arguments (not both: BadRequest; a JSON body is an array or
        an object)."""
        if args and kwargs:
            # (BadRequest, as for arguments that do not fit: a request that cannot be sent is the caller's error)
            raise BadRequest(f"over HTTP ({self.url}) an expert takes positional or keyword arguments, not both: "
                             "the body of POST /call/NAME is a JSON array or object (expertd --help-topic http); "
                             "pass them all by name, or call it on the daemon's Unix socket", expert=expert)
        return self._post("call", expert, kwargs if kwargs else list(args))

    def map(self, expert: str, items: Any, *, raise_first: bool = False) -> list:
        """As the socket client's map: one result per item, a failed item's error in its place."""
        entries = self._post("map", expert, list(items))
        if not isinstance(entries, list):
            raise ProtocolError(f"expertd at {self.url} answered a map with {type(entries).__name__}, not a list")
        outcomes = [_entry_outcome(entry) for entry in entries]
        if raise_first:
            raise_first_failure(outcomes)
        return outcomes

    def opinion(self, expert: str, document: Any) -> Any:
        """The expert's opinion on ``document``, as on the socket: ``POST /call/NAME [document]``.

        (Not ``POST /opinion/NAME``, which answers with the whole document: the
        opinion alone is what this method returns, and the document would
        travel back for nothing.)
        """
        return self._post("call", expert, [document])

    def _pipeline(self, target: str, document: dict, on_error: str | None) -> dict:
        if on_error is None:
            return self._post("pipeline", target, document)
        if on_error not in _ON_ERROR:  # (the daemon says the same; checked here so that no header can be forged)
            raise BadRequest(f"on_error must be stop or continue, not {on_error!r}", expert=target)
        return self._post("pipeline", target, document, f"X-Expertd-On-Error: {on_error}\r\n")

    def predict(self, expert: str, inputs: Any, *, arrays: bool | None = None) -> Any:
        """Run model expert ``expert`` on a batch of rows, as the socket client does, the rows as JSON.

        numpy inputs travel as nested lists (JSON has no raw arrays); the
        outputs come back as numpy arrays (numpy's default dtype for the
        numbers: float64, int64) when ``arrays`` is true, the default for
        numpy inputs, else as nested lists.  For large batches, the Unix
        socket's raw arrays are much cheaper.
        """
        def is_array(value: Any) -> bool:
            return hasattr(value, "__array_interface__") and hasattr(value, "tolist")

        if arrays is None:
            arrays = is_array(inputs) or (isinstance(inputs, dict) and any(map(is_array, inputs.values())))
        outputs = self._post("call", expert, [inputs])
        if not arrays:
            return outputs
        import numpy  # (the caller asked for arrays, so it has numpy)

        if isinstance(outputs, dict):
            return {name: numpy.asarray(rows) for name, rows in outputs.items()}
        return numpy.asarray(outputs)

    def ping(self) -> dict:
        """``GET /health``: ``{"status": "ok", "workers_ready", "workers_wanted", "generation", "stopping"}``.

        (The socket's ping answers from a worker, with its pid; over HTTP the
        daemon's master answers.)  No worker ready raises ``Overloaded``, a
        stopping daemon ``ShuttingDown``.
        """
        return self._http_request("GET", "/health", None, "")

    def experts(self) -> list[dict]:
        """``GET /experts``: the served experts, then the named pipelines, as on the socket."""
        return self._http_request("GET", "/experts", None, "")

    def status(self) -> dict:
        raise _local_only("status", self.url)

    def reload(self) -> dict:
        raise _local_only("reload", self.url)

    def stop(self) -> dict:
        raise _local_only("stop", self.url)

    def set_workers(self, count: int) -> dict:
        raise _local_only("set_workers", self.url)

    def __repr__(self) -> str:
        return f"Client(url={self.url!r})"  # (never the token)

    # ------------------------------------------------------------ internals
    def _post(self, route: str, name: str, value: Any, headers: str = "") -> Any:
        try:
            body = json.dumps(value, ensure_ascii=False, allow_nan=False, separators=(",", ":"),
                              default=_to_json).encode("utf-8")
        except ValueError as exc:
            raise ValueError(f"the arguments cannot be sent as JSON: {exc}") from None
        return self._http_request("POST", f"/{route}/{quote(name, safe=',+')}", body, headers)

    def _http_request(self, method: str, path: str, body: bytes | None, headers: str) -> Any:
        head = f"{method} {self._prefix}{path} HTTP/1.1\r\n{self._head}{headers}"
        if body is None:
            request = (head + "\r\n").encode("latin-1")
        else:
            request = (f"{head}Content-Type: {_JSON}\r\nContent-Length: {len(body)}\r\n\r\n").encode("latin-1") + body
        stale_retry = True
        lost_retries = self.retries
        while True:
            try:
                conn, reused = self._pool.pop(), True  # (atomic: see Client._request)
            except IndexError:
                conn, reused = self._connect(), False
            try:
                reply = self._round_trip(conn, request, method == "HEAD")
            except Stale as exc:
                conn.close()
                if reused and stale_retry:
                    stale_retry = False  # the daemon closed idle connections: the others are as stale
                    self.close()  # type: ignore[attr-defined]
                    continue
                raise ConnectionLost(f"expertd at {self.url} closed the connection before replying: {exc}") from None
            except BaseException:
                conn.close()
                raise
            if reply.will_close or len(self._pool) >= self.pool_size:
                conn.close()
            else:
                self._pool.append(conn)
            if reply.status == 200:
                try:
                    return json.loads(reply.body)
                except ValueError as exc:
                    raise ProtocolError(f"expertd at {self.url} answered {path} with a body that is not JSON: "
                                        f"{exc}") from None
            error = self._error(reply, path)
            if error.retryable and lost_retries > 0:
                lost_retries -= 1
                continue
            raise error

    def _round_trip(self, conn: Any, request: bytes, head_only: bool) -> Reply:
        try:
            conn.sendall(request)
        except TimeoutError:
            raise RequestTimeout(f"sending to expertd at {self.url} timed out after {self.timeout}s") from None
        except OSError as exc:
            # The daemon may have refused the request (a body over max_frame) and closed: its reply may be readable.
            try:
                conn.settimeout(0.5)
                reply = read_reply(conn, head_only)
            except (OSError, Stale, ConnectionLost, ProtocolError):
                raise Stale(exc.strerror or str(exc)) from None
            finally:
                conn.settimeout(self.timeout)
            reply.will_close = True  # (the rest of the request was never sent: the server may read what follows)
            return reply
        try:
            return read_reply(conn, head_only)
        except TimeoutError:
            raise RequestTimeout(f"no reply from expertd at {self.url} within {self.timeout}s") from None
        except ConnectionLost as exc:
            raise ConnectionLost(f"expertd at {self.url} closed the connection mid-reply: {exc}",
                                 exc.received) from None
        except ProtocolError as exc:  # (the connection is closed by the caller: never pooled after a bad reply)
            raise ProtocolError(f"{self.url} did not answer in HTTP/1.1: {exc}") from None

    def _error(self, reply: Reply, path: str) -> RemoteError:
        """The exception the socket client would raise for this error reply."""
        status = reply.status
        request_id = reply.headers.get("x-request-id")
        try:
            payload = json.loads(reply.body)
        except ValueError:
            payload = None
        wire = payload.get("error") if isinstance(payload, dict) else None
        if status == 401:
            sent = "the token was not accepted" if self._has_token else "no token was sent"
            error: RemoteError = Unauthorized(f"expertd at {self.url} refused the request: {sent}; pass "
                                              f"Client(url, token=...) or set ${TOKEN_ENV}")
        elif isinstance(wire, dict):
            error = error_from_wire(wire)
        elif isinstance(wire, str):  # Firefly's {"error": "MESSAGE"} (firefly_routes): its 403 is a token refused
            error = (Unauthorized if status == 403 else RemoteError)(wire)
        elif path.endswith("/health") and isinstance(payload, dict):  # /health's 503: not an error object
            cls = ShuttingDown if payload.get("stopping") else Overloaded
            error = cls(f"expertd at {self.url} has no worker ready ({payload.get('workers_ready')} of "
                        f"{payload.get('workers_wanted')})")
        elif status == 502:
            error = RemoteError(f"the proxy in front of {self.url} answered 502 Bad Gateway: it cannot reach the "
                                "daemon behind it (is the daemon running?)")
        elif status == 504:
            error = RequestTimeout(f"the proxy in front of {self.url} answered 504 Gateway Timeout: the daemon "
                                   "behind it did not answer in the proxy's time")
        else:
            raise ProtocolError(f"{self.url} answered {status} {reply.reason} to {path} without expertd's JSON "
                                f"error (is it an expertd http_listen?): {reply.body[:120]!r}")
        if request_id:
            error.request_id = request_id
        return error

    def _connect(self) -> Any:
        where = f"{self._host}:{self._port}"
        sock = None
        try:
            sock = _socket.create_connection((self._host, self._port), timeout=self.connect_timeout)
            sock.setsockopt(_socket.IPPROTO_TCP, _socket.TCP_NODELAY, 1)  # (a request is one write: no Nagle wait)
            if self._tls:  # the handshake, under connect_timeout too
                sock = self._ssl_context.wrap_socket(sock, server_hostname=self._host)
        except ConnectionRefusedError:
            message = f"nothing is listening on {where}: is the daemon running, with http_listen = {where}?"
        except _socket.gaierror as exc:
            message = f"cannot resolve the host {self._host!r}: {exc.strerror or exc}"
        except TimeoutError:
            message = f"connecting to {where} timed out after {self.connect_timeout}s: is the address reachable?"
        except OSError as exc:
            message = f"cannot connect to {where}: {exc.strerror or exc}"
            if self._tls:
                import ssl

                if isinstance(exc, ssl.SSLCertVerificationError):
                    message = (f"the TLS certificate of {where} is not trusted ({exc.verify_message}); for a private "
                               "CA pass ssl_context=ssl.create_default_context(cafile=CA_FILE)")
                elif isinstance(exc, ssl.SSLError):
                    message = f"the TLS handshake with {where} failed ({exc.reason}): does it serve https:// there?"
        else:
            sock.settimeout(self.timeout)  # from here on, each wait for reply bytes (as on the socket)
            return sock
        if sock is not None:
            sock.close()
        raise ConnectError(message, self.url)


def _is_loopback(host: str) -> bool:
    """Whether a URL's host (lowercase, no brackets) is this machine: localhost, 127.0.0.0/8, ::1."""
    if host in ("localhost", "localhost."):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # (a host name: another machine, as far as the client can tell without resolving it)
        return False


def _entry_outcome(entry: Any) -> Any:
    """One item of a map's reply: its result, or its error as the exception the socket client puts there."""
    if isinstance(entry, dict):
        if "result" in entry:
            return entry["result"]
        if isinstance(entry.get("error"), dict):
            return error_from_wire(entry["error"])
    raise ProtocolError(f"a map's outcome is {{'result': ...}} or {{'error': {{...}}}}, not {entry!r:.200}")


def _to_json(value: Any) -> Any:
    tolist = getattr(value, "tolist", None)  # numpy arrays and scalars: as the daemon's replies do
    if callable(tolist):
        return tolist()
    if isinstance(value, (set, frozenset, tuple)):
        return list(value)
    if isinstance(value, (bytes, bytearray)):
        raise TypeError("bytes cannot be sent as JSON over HTTP; send text, or call the daemon on its Unix socket")
    raise TypeError(f"values of type {type(value).__module__}.{type(value).__qualname__} cannot be sent as JSON")


def _local_only(verb: str, url: str) -> LocalOnly:
    return LocalOnly(f"{verb} is not served over HTTP ({url}): control is for local users on the daemon's Unix "
                     "socket (expertctl on its machine); over HTTP, ping() is GET /health, and GET /metrics has "
                     "the workers' state")
