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
    """A listening, non-blocking Unix stream socket: bound here, or inherited from systemd."""

    def __init__(self, sock: socket.socket, path: str, inode: int | None) -> None:
        self.sock = sock
        self.path = path
        self._inode = inode  # None: not ours to remove (socket activation)
        self.sock.setblocking(False)

    @classmethod
    def bind(cls, path: str, mode: int = 0o660, group: int | None = None,
             backlog: int = socket.SOMAXCONN) -> Listener:
        """Create the socket file at ``path`` (replacing a stale one) and listen on it."""
        directory = os.path.dirname(path) or "."
        try:
            os.makedirs(directory, mode=0o755, exist_ok=True)
        except OSError as exc:
            raise ListenerError(f"cannot create socket directory {directory}: {exc.strerror}") from None
        _clear_stale(path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        previous_umask = os.umask(0o177)
        try:
            sock.bind(path)
        except OSError as exc:
            sock.close()
            raise ListenerError(f"cannot bind {path}: {exc.strerror}") from None
        finally:
            os.umask(previous_umask)
        try:
            if group is not None:
                os.chown(path, -1, group)
            os.chmod(path, mode)
        except OSError as exc:
            sock.close()
            os.unlink(path)
            raise ListenerError(f"cannot set group or mode of {path}: {exc.strerror}") from None
        sock.listen(backlog)
        return cls(sock, path, os.stat(path).st_ino)

    @classmethod
    def inherit(cls, fd: int) -> Listener:
        """Use a listening socket handed over by socket activation (systemd owns its file)."""
        try:
            sock = socket.socket(fileno=fd)
        except OSError as exc:
            raise ListenerError(f"socket activation passed fd {fd}, which is not a socket: {exc.strerror}") from None
        if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM:
            raise ListenerError(f"socket activation passed fd {fd}, which is not a Unix stream socket; "
                                "use ListenStream=/run/expertd/expertd.sock in the .socket unit")
        if not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
            raise ListenerError(f"socket activation passed fd {fd}, which is not listening")
        return cls(sock, sock.getsockname() or f"fd {fd}", None)

    def fileno(self) -> int:
        return self.sock.fileno()

    def close(self) -> None:
        """Stop listening and remove the socket file if it is still ours."""
        if self.sock.fileno() >= 0:
            self.sock.close()
        if self._inode is None:
            return
        try:
            if os.stat(self.path).st_ino == self._inode:
                os.unlink(self.path)
        except FileNotFoundError:
            pass


def check_socket_free(path: str) -> bool:
    """Raise ListenerError if ``path`` is taken; return True if a stale socket file is there.

    A socket nobody listens on is stale (its daemon died); one a process
    answers on, or a file that is not a socket, is taken.
    """
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return False
    if not stat.S_ISSOCK(info.st_mode):
        raise ListenerError(f"{path} exists and is not a socket; remove it or choose another socket path")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(path)
    except ConnectionRefusedError:
        return True
    except FileNotFoundError:
        return False
    except TimeoutError:
        raise ListenerError(f"a process is listening on {path} but not accepting; stop it first") from None
    except OSError as exc:
        if exc.errno != errno.EAGAIN:  # EAGAIN: backlog full, so somebody is listening
            raise ListenerError(f"cannot check existing socket {path}: {exc.strerror}") from None
    finally:
        probe.close()
    raise ListenerError(f"another daemon is listening on {path}; stop it first or use another socket")


def _clear_stale(path: str) -> None:
    if check_socket_free(path):
        os.unlink(path)  # nobody listens: a daemon died without cleaning up


def bind_tcp(host: str, port: int) -> socket.socket:
    """The http_listen socket: bound, listening and non-blocking (ListenerError with the reason if not)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = None
    try:
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # restart while old connections linger
        sock.bind((host, port))
        sock.listen(1024)
    except OSError as exc:
        if sock is not None:
            sock.close()
        if exc.errno in (errno.EAFNOSUPPORT, errno.EPERM, errno.EACCES) and port >= 1024:
            hint = "TCP is not allowed here (under systemd: RestrictAddressFamilies needs AF_INET AF_INET6)"
        elif exc.errno == errno.EACCES:
            hint = "ports below 1024 need privileges; choose a port of 1024 or above"
        else:
            hint = "choose a free port, or stop what holds this one"
        raise ListenerError(f"http_listen = {host}:{port}: cannot listen: {exc.strerror or exc}; {hint}") from None
    sock.setblocking(False)
    sock.set_inheritable(False)
    return sock
