"""A worker process: runs the after-fork hooks, then serves one request at a time.

The worker never accepts connections itself.  The master passes it a client
connection with a complete request waiting (see :mod:`expertd.ipc`); the
worker reads exactly that request, calls the expert, writes the reply, hands
the connection back and waits for the next one.  An expert's exception, bad
arguments or an unserialisable result become structured error replies: a bad
request never kills the worker.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import sys
import time
import traceback
from types import FrameType
from typing import Any, NoReturn

from expertd import __version__, ipc, protocol, runtimes
from expertd.config import Config
from expertd.errors import (
    BadRequest,
    BadResult,
    ConnectionLost,
    ExpertFailed,
    ExpertLoadError,
    ProtocolError,
    RemoteError,
    RequestTimeout,
    UnknownExpert,
)
from expertd.loader import LoadedExpert, describe_exception, run_after_fork

log = logging.getLogger("expertd.worker")

EXIT_BOOT_FAILED = 3


class Worker:
    """The code that runs in a forked worker process (see :meth:`run`)."""

    def __init__(self, number: int, config: Config, experts: dict[str, LoadedExpert], channel: socket.socket) -> None:
        self.number = number
        self.config = config
        self.experts = experts
        self.channel = channel
        self.requests = 0
        self._idle = True
        self._stop_requested = False

    def run(self) -> NoReturn:
        """Boot, serve until told to stop, exit.  Never returns."""
        self._install_signals()
        config = self.config
        runtimes.apply_worker_threads(
            runtimes.resolve_threads(config.intra_op_threads, config.workers),
            runtimes.resolve_threads(config.inter_op_threads, config.workers),
        )
        try:
            with runtimes.quiet_native_logs(config.tf_log_level in ("warning", "error")):
                run_after_fork(self.experts)
        except ExpertLoadError as exc:
            message = f"worker {self.number}: {exc}"
            log.error("%s", message)
            _send_quietly(ipc.send_failed, self.channel, message)
            os._exit(EXIT_BOOT_FAILED)
        ipc.send_ready(self.channel, os.getpid())
        self._report_memory()
        try:
            self._serve_forever()
        except SystemExit:
            pass
        except BaseException:
            log.exception("worker %d crashed", self.number)
            os._exit(1)
        os._exit(0)

    def _report_memory(self) -> None:
        # After READY, so that reading /proc/self/smaps does not delay serving.
        import psutil

        try:
            info = psutil.Process().memory_full_info()
            ipc.send_memory(self.channel, info.uss, info.pss, info.rss)
        except (psutil.Error, OSError, AttributeError) as exc:
            log.debug("worker %d: memory figures unavailable: %s", self.number, exc)

    def _install_signals(self) -> None:
        signal.set_wakeup_fd(-1)
        # Ctrl-C in a terminal signals the whole process group; the master decides
        # when workers stop, so an interactive interrupt must not kill a request.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, self._on_term)
        for sig in (signal.SIGHUP, signal.SIGQUIT, signal.SIGCHLD, signal.SIGTTIN, signal.SIGTTOU, signal.SIGUSR1):
            signal.signal(sig, signal.SIG_DFL)

    def _on_term(self, signum: int, frame: FrameType | None) -> None:
        # Finish the request in hand, then exit; an idle worker exits at once.
        self._stop_requested = True
        if self._idle:
            raise SystemExit(0)

    def _serve_forever(self) -> None:
        while not self._stop_requested:
            self._idle = True
            command = ipc.receive_command(self.channel)
            self._idle = False
            if command is None:  # the master closed our channel: time to go
                return
            _op, conn_id, fd = command
            conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM, 0, fileno=fd)
            try:
                close = self._serve_one(conn)
            finally:
                conn.close()
            self.requests += 1
            ipc.send_done(self.channel, conn_id, close)

    def _serve_one(self, conn: socket.socket) -> bool:
        """Read one request from ``conn`` and answer it; return True if the connection must be closed."""
        started = time.monotonic()
        deadline = started + self.config.read_timeout
        try:
            kind, request_id, body = protocol.read_frame(conn, self.config.max_frame, deadline)
        except (ProtocolError, RequestTimeout, ConnectionLost, OSError) as exc:
            log.info("closing connection: %s", exc)
            return True
        expert_name = None
        try:
            if kind == protocol.CALL:
                expert_name, args, kwargs = protocol.decode_call(body)
                reply_kind, reply = protocol.RESULT, self._call(expert_name, args, kwargs)
            elif kind == protocol.PING:
                reply_kind, reply = protocol.RESULT, protocol.pack(
                    {"pid": os.getpid(), "worker": self.number, "version": __version__, "requests": self.requests}
                )
            elif kind == protocol.LIST:
                reply_kind, reply = protocol.RESULT, protocol.pack([e.describe() for e in self.experts.values()])
            else:
                raise BadRequest(f"unknown request kind 0x{kind:02x}")
            outcome = "ok"
        except RemoteError as exc:
            reply_kind, reply = protocol.ERROR, protocol.pack(exc.to_wire())
            outcome = exc.code
        try:
            conn.settimeout(self.config.read_timeout)
            conn.sendall(protocol.encode_frame(reply_kind, request_id, reply))
        except OSError as exc:
            log.info("could not deliver reply to request %d: %s", request_id, exc)
            return True
        if log.isEnabledFor(logging.DEBUG):
            log.debug(
                "request %d %s %.3f ms %s",
                request_id,
                expert_name or {protocol.PING: "(ping)", protocol.LIST: "(list)"}.get(kind, "?"),
                (time.monotonic() - started) * 1000,
                outcome,
            )
        return False

    def _call(self, name: str, args: list, kwargs: dict) -> bytes:
        expert = self.experts.get(name)
        if expert is None:
            known = ", ".join(sorted(self.experts)) or "none"
            raise UnknownExpert(f"no expert named {name!r}; known experts: {known}", expert=name)
        if expert.signature is not None:
            try:
                expert.signature.bind(*args, **kwargs)
            except TypeError as exc:
                raise BadRequest(f"{name}{expert.signature}: {exc}", expert=name) from None
        try:
            result: Any = expert.function(*args, **kwargs)
        except BaseException as exc:  # an expert's failure is a reply, never a dead worker
            raise ExpertFailed(
                f"{type(exc).__name__}: {exc}",
                remote_type=f"{type(exc).__module__}.{type(exc).__qualname__}",
                remote_traceback="".join(traceback.format_exception(type(exc), exc, exc.__traceback__.tb_next)),
                expert=name,
            ) from None
        try:
            return protocol.pack(result)
        except (TypeError, ValueError, OverflowError) as exc:
            raise BadResult(f"{name} returned a value that cannot be sent: {exc}", expert=name) from None


def _send_quietly(send: Any, *args: Any) -> None:
    try:
        send(*args)
    except OSError:
        pass


def worker_main(
    number: int, config: Config, experts: dict[str, LoadedExpert], channel: socket.socket, close_fds: list[int]
) -> NoReturn:
    """Entry point in the child right after fork(): drop the master's descriptors, then run."""
    try:
        for fd in close_fds:
            try:
                os.close(fd)
            except OSError:
                pass
        Worker(number, config, experts, channel).run()
    except BaseException as exc:
        sys.stderr.write(f"expertd: worker {number} failed to start: {describe_exception(exc)}\n")
    finally:
        os._exit(1)
