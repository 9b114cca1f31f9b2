"""The exceptions shared by the daemon, the client and expertctl.

Every error a caller can see is an :class:`ExpertdError`.  Errors that the
daemon reports over the wire carry a short machine-readable ``code``; the
client turns a code back into the matching class with :func:`error_for_code`,
so ``except expertd.errors.UnknownExpert`` works the same on both sides.

This module imports nothing beyond the standard library: the client uses it.
"""

from __future__ import annotations


class ExpertdError(Exception):
    """Base class of everything expertd raises."""


class ConfigError(ExpertdError):
    """The configuration is invalid; the message names file, section and key."""


class ExpertLoadError(ExpertdError):
    """An expert could not be imported or its master-side hook failed."""


class ConnectError(ExpertdError, ConnectionError):
    """The client could not reach a daemon on its socket."""

    def __init__(self, message: str, socket_path: str | None = None) -> None:
        super().__init__(message)
        self.socket_path = socket_path


class ConnectionLost(ExpertdError, ConnectionError):
    """The connection closed before a reply arrived.

    ``received`` is how many bytes of the awaited data had arrived; zero means
    the peer closed before sending anything.
    """

    def __init__(self, message: str, received: int = 0) -> None:
        super().__init__(message)
        self.received = received


class ProtocolError(ExpertdError):
    """A frame did not follow docs/protocol.md (bad magic, version, size or body)."""


class RemoteError(ExpertdError):
    """An error the daemon reported in a reply.

    ``code`` is the wire code, ``remote_type`` the name of the exception class
    on the daemon side, ``remote_traceback`` its formatted traceback (only for
    exceptions raised inside an expert), ``expert`` the expert called,
    ``request_id`` the id the daemon gave the request (its access log's and
    error log's, to match them; None from a daemon that sends none).
    """

    code = "error"
    retryable = False
    request_id: str | None = None  # (set by whoever answers with it: the daemon, or error_from_wire)

    def __init__(
        self,
        message: str,
        *,
        remote_type: str | None = None,
        remote_traceback: str | None = None,
        expert: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.remote_type = remote_type or type(self).__name__
        self.remote_traceback = remote_traceback
        self.expert = expert

    def to_wire(self) -> dict:
        """The error as the map carried in an error reply."""
        wire = {
            "code": self.code,
            "type": self.remote_type,
            "message": self.message,
            "traceback": self.remote_traceback,
            "expert": self.expert,
        }
        if self.request_id is not None:
            wire["request_id"] = self.request_id
        return wire


class UnknownExpert(RemoteError):
    """No expert of that name is configured."""

    code = "unknown_expert"


class BadRequest(RemoteError):
    """The request was malformed: wrong types, arguments that do not fit the signature, limits."""

    code = "bad_request"


class FrameTooLarge(BadRequest):
    """The frame's declared length exceeds the daemon's ``max_frame``."""

    code = "frame_too_large"


class ExpertFailed(RemoteError):
    """The expert raised; ``remote_type`` and ``remote_traceback`` say what and where."""

    code = "expert_failed"


class BadResult(RemoteError):
    """The expert returned a value msgpack cannot carry."""

    code = "bad_result"


class WorkerLost(RemoteError):
    """The worker serving the request died before replying.  Safe to retry: experts are pure."""

    code = "worker_lost"
    retryable = True


class RequestTimeout(RemoteError, TimeoutError):
    """The request did not finish in time (on the daemon, or the client's read timeout)."""

    code = "timeout"


class Overloaded(RemoteError):
    """The daemon is short of a resource (descriptors, memory for slow requests). Safe to retry shortly."""

    code = "overloaded"
    retryable = True


class Quarantined(RemoteError):
    """The expert's calls kept killing their workers: it is refused for a while (quarantine_* settings)."""

    code = "quarantined"


class AccessDenied(RemoteError):
    """The daemon refused the connection: the peer's user is not allowed (allow_uids/allow_gids)."""

    code = "access_denied"


class ShuttingDown(RemoteError):
    """The daemon is stopping and did not take the request.  Safe to retry elsewhere or later."""

    code = "shutting_down"
    retryable = True


class Unauthorized(RemoteError):
    """The daemon's http_listen refused the request: no token, or not its token (pass Client(url, token=...))."""

    code = "unauthorized"


class LocalOnly(ExpertdError):
    """A request the client will not send over HTTP: control (status, reload, stop, set_workers) is for local
    users on the daemon's Unix socket, by design."""


_BY_CODE: dict[str, type[RemoteError]] = {
    cls.code: cls
    for cls in (
        RemoteError,
        UnknownExpert,
        BadRequest,
        FrameTooLarge,
        ExpertFailed,
        BadResult,
        WorkerLost,
        RequestTimeout,
        AccessDenied,
        Overloaded,
        Quarantined,
        ShuttingDown,
        Unauthorized,
    )
}


def error_for_code(code: str) -> type[RemoteError]:
    """The exception class for a wire code; unknown codes map to :class:`RemoteError`."""
    return _BY_CODE.get(code, RemoteError)


def raise_first_failure(outcomes: list) -> None:
    """Raise the first item's error among a map's outcomes (``Client.map(..., raise_first=True)``)."""
    for outcome in outcomes:
        if isinstance(outcome, RemoteError):
            raise outcome


def error_from_wire(payload: object) -> RemoteError:
    """Rebuild the exception carried by an error reply's body."""
    if not isinstance(payload, dict):
        return RemoteError(f"malformed error reply: {payload!r:.200}")
    cls = error_for_code(str(payload.get("code", "error")))
    error = cls(
        str(payload.get("message", "")),
        remote_type=payload.get("type"),
        remote_traceback=payload.get("traceback"),
        expert=payload.get("expert"),
    )
    if cls is RemoteError:
        error.code = str(payload.get("code", "error"))  # (a code this side does not know: kept, for the caller)
    request_id = payload.get("request_id")
    if isinstance(request_id, str):
        error.request_id = request_id
    return error
