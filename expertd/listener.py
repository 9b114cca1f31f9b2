"""The listening Unix socket: safe creation, stale-socket handling and removal.

A socket file left by a daemon that died is replaced; one that a live daemon
still answers on is refused, so two daemons never fight over a path.  The file
is created under a tight umask and then given ``socket_mode``, so there is no
moment at which it is more open than configured.  On exit the file is removed
only if it is still the one this process created.
"""

from __future__ import annotations

import errno
import os
import socket
import stat

from expertd.errors import ExpertdError


class ListenerError(ExpertdError):
    """The socket could not be set up; the message says why and what to do."""


class Listener:
    """A bound, listening, non-blocking Unix stream socket."""

    def __init__(self, path: str, mode: int = 0o660, group: int | None = None, backlog: int = socket.SOMAXCONN) -> None:
        self.path = path
        directory = os.path.dirname(path) or "."
        try:
            os.makedirs(directory, mode=0o755, exist_ok=True)
        except OSError as exc:
            raise ListenerError(f"cannot create socket directory {directory}: {exc.strerror}") from None
        _clear_stale(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        previous_umask = os.umask(0o177)
        try:
            self.sock.bind(path)
        except OSError as exc:
            self.sock.close()
            raise ListenerError(f"cannot bind {path}: {exc.strerror}") from None
        finally:
            os.umask(previous_umask)
        try:
            if group is not None:
                os.chown(path, -1, group)
            os.chmod(path, mode)
        except OSError as exc:
            self.sock.close()
            os.unlink(path)
            raise ListenerError(f"cannot set group or mode of {path}: {exc.strerror}") from None
        self._inode = os.stat(path).st_ino
        self.sock.listen(backlog)
        self.sock.setblocking(False)

    def fileno(self) -> int:
        return self.sock.fileno()

    def close(self) -> None:
        """Stop listening and remove the socket file if it is still ours."""
        if self.sock.fileno() >= 0:
            self.sock.close()
        try:
            if os.stat(self.path).st_ino == self._inode:
                os.unlink(self.path)
        except FileNotFoundError:
            pass


def _clear_stale(path: str) -> None:
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(info.st_mode):
        raise ListenerError(f"{path} exists and is not a socket; remove it or choose another socket path")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(path)
    except ConnectionRefusedError:
        os.unlink(path)  # nobody listens: a daemon died without cleaning up
        return
    except FileNotFoundError:
        return
    except TimeoutError:
        raise ListenerError(f"a process is listening on {path} but not accepting; stop it first") from None
    except OSError as exc:
        if exc.errno == errno.EAGAIN:  # backlog full: somebody is listening
            raise ListenerError(f"another daemon is listening on {path}; stop it first or use another socket") from None
        raise ListenerError(f"cannot check existing socket {path}: {exc.strerror}") from None
    finally:
        probe.close()
    raise ListenerError(f"another daemon is listening on {path}; stop it first or use another socket")
