"""The listening Unix socket: safe creation, stale-socket handling and removal.

A socket file left by a daemon that died is replaced; one that a live daemon
still answers on is refused, so two daemons never fight over a path.  The file
is created under a tight umask and then given ``socket_mode``, so there is no
moment at which it is more open than configured.  On exit the file is removed
only if it is still the one this process created.

The socket's directory must be one that no other user can write to (nor any
directory above it, except sticky ones such as /tmp, whose entries only their
owner may move): otherwise another local user could swap the socket between
bind and chmod, or rename it away and listen in its place.  Such a directory
is refused at start-up.  The group and mode are then set without following a
symlink, and the result is checked with lstat.
"""

from __future__ import annotations

import errno
import grp
import logging
import os
import pwd
import socket
import stat

from expertd.errors import ExpertdError

log = logging.getLogger("expertd.listener")


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
        check_socket_directory(os.path.dirname(path) or ".", create=True)
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
            inode = _set_group_and_mode(path, mode, group)
        except ListenerError:
            sock.close()
            raise
        sock.listen(backlog)
        return cls(sock, path, inode)

    @classmethod
    def inherit(cls, fd: int, instead_of: str | None = None) -> Listener:
        """Use a listening socket handed over by socket activation (systemd owns its file).

        ``instead_of`` is the configured ``socket``: when the socket passed is
        another, the log says so, for whoever looks for the daemon there.
        """
        try:
            sock = socket.socket(fileno=fd)
        except OSError as exc:
            raise ListenerError(f"socket activation passed fd {fd}, which is not a socket: {exc.strerror}") from None
        if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM:
            raise ListenerError(f"socket activation passed fd {fd}, which is not a Unix stream socket; "
                                "use ListenStream=/run/expertd/expertd.sock in the .socket unit")
        if not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
            raise ListenerError(f"socket activation passed fd {fd}, which is not listening")
        path = sock.getsockname() or f"fd {fd}"
        if instead_of is not None and os.path.abspath(instead_of) != path:
            log.info("using the socket passed by systemd (LISTEN_FDS), %s, instead of socket = %s: the .socket "
                     "unit's ListenStream= decides where expertd listens", path, instead_of)
        return cls(sock, path, None)

    def fileno(self) -> int:
        return self.sock.fileno()

    def close(self) -> None:
        """Stop listening and remove the socket file if it is still ours."""
        if self.sock.fileno() >= 0:
            self.sock.close()
        if self._inode is None:
            return
        try:
            if os.lstat(self.path).st_ino == self._inode:
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


def check_socket_directory(directory: str, create: bool = False) -> None:
    """Raise ListenerError unless only root and this process's user can write ``directory``.

    Every directory from / down is checked (with lstat, following only
    symlinks that root or this user owns).  One owned by another user, or
    writable by group or others, is refused: whoever can write it can swap the
    socket.  Above the socket's own directory a sticky one (such as /tmp) is
    accepted, since nobody else may move an entry of ours out of it; as the
    socket's own directory it is refused, since anyone may create names in it.
    A group-writable directory is accepted when the group is the owner's
    private group (named after the owner, with no other member).  With
    ``create``, missing directories are created (mode 0755); without, the
    check stops at the first missing one.
    """
    try:
        _walk_socket_directory(directory, create)
    except OSError as exc:
        raise ListenerError(f"cannot check socket directory {directory}: {exc.strerror}") from None


def _walk_socket_directory(directory: str, create: bool) -> None:
    trusted = {0, os.geteuid()}
    pending = [part for part in reversed(os.path.abspath(directory).split("/")) if part]
    current = "/"
    _check_directory(directory, current, os.lstat(current), trusted)
    links = 0
    while pending:
        part = pending.pop()
        if part in (".", ".."):
            current = os.path.dirname(current) if part == ".." else current
            continue
        candidate = os.path.join(current, part)
        try:
            info = _lstat_or_create(directory, candidate, create)
        except FileNotFoundError:
            return  # created (and checked) when the socket is bound
        if stat.S_ISLNK(info.st_mode):
            if info.st_uid not in trusted:
                raise _unsafe(directory, candidate, info, "a symlink owned by another user")
            links += 1
            if links > 40:
                raise ListenerError(f"socket directory {directory}: too many levels of symbolic links")
            target = os.readlink(candidate)
            if target.startswith("/"):
                current = "/"
            pending.extend(part for part in reversed(target.split("/")) if part)
            continue
        _check_directory(directory, candidate, info, trusted)
        current = candidate
    info = os.lstat(current)
    if info.st_mode & stat.S_ISVTX and info.st_mode & 0o022:
        raise _unsafe(directory, current, info, "shared (sticky and writable by others)",
                      "make a directory of its own for the socket, or use /run/expertd")


def _lstat_or_create(directory: str, path: str, create: bool) -> os.stat_result:
    try:
        return os.lstat(path)
    except FileNotFoundError:
        if not create:
            raise
    except OSError as exc:
        raise ListenerError(f"cannot check socket directory {directory}: {path}: {exc.strerror}") from None
    try:
        os.mkdir(path, 0o755)
    except FileExistsError:
        pass  # made meanwhile, by whoever: checked like any other
    except OSError as exc:
        raise ListenerError(f"cannot create socket directory {path}: {exc.strerror}") from None
    return os.lstat(path)


def _check_directory(directory: str, path: str, info: os.stat_result, trusted: set[int]) -> None:
    if not stat.S_ISDIR(info.st_mode):
        raise ListenerError(f"socket directory {directory}: {path} is not a directory")
    if info.st_uid not in trusted:
        raise _unsafe(directory, path, info, "owned by another user")
    if info.st_mode & stat.S_ISVTX:
        return  # nobody else may rename or remove our entries; the socket's own directory is checked apart
    if info.st_mode & 0o002:
        raise _unsafe(directory, path, info, "writable by every user")
    if info.st_mode & 0o020 and not _private_group(info):
        raise _unsafe(directory, path, info, f"writable by group {_name(grp.getgrgid, info.st_gid)}")


def _private_group(info: os.stat_result) -> bool:
    """Whether the file's group is its owner's private group (user private groups, umask 002)."""
    try:
        owner = pwd.getpwuid(info.st_uid).pw_name
        group = grp.getgrgid(info.st_gid)
    except KeyError:
        return False
    if group.gr_name != owner or set(group.gr_mem) - {owner}:
        return False
    return all(entry.pw_gid != info.st_gid or entry.pw_uid == info.st_uid for entry in pwd.getpwall())


def _name(lookup, number: int) -> str:
    try:
        return lookup(number)[0]
    except KeyError:
        return str(number)


def _unsafe(directory: str, path: str, info: os.stat_result, problem: str, remedy: str = "") -> ListenerError:
    where = f"socket directory {directory}" if os.path.abspath(directory) == path else \
        f"socket directory {directory} is unsafe: {path}"
    if not remedy:
        me = "root" if os.geteuid() == 0 else f"root or {_name(pwd.getpwuid, os.geteuid())}"
        remedy = f"use a directory that only {me} can write, such as /run/expertd"
    return ListenerError(
        f"{where} is {problem} (owner {_name(pwd.getpwuid, info.st_uid)}, group {_name(grp.getgrgid, info.st_gid)}, "
        f"mode {stat.S_IMODE(info.st_mode):04o}), so another user could replace the socket; {remedy}"
    )


def _set_group_and_mode(path: str, mode: int, group: int | None) -> int:
    """Give the socket just bound at ``path`` its group and mode, never through a symlink; its inode.

    The checked directory lets nobody but root and this user replace the file
    meanwhile; lstat before and after confirms it is still our socket.
    """
    try:
        before = os.lstat(path)
        if not stat.S_ISSOCK(before.st_mode) or before.st_uid != os.geteuid():
            raise _replaced(path)
        if group is not None:
            os.chown(path, -1, group, follow_symlinks=False)
        try:
            os.chmod(path, mode, follow_symlinks=False)
        except NotImplementedError:  # a C library without fchmodat(AT_SYMLINK_NOFOLLOW) (glibc < 2.32)
            _chmod_socket_through_proc(path, mode)
        after = os.lstat(path)
    except OSError as exc:
        _remove_our_socket(path)
        raise ListenerError(f"cannot set group or mode of {path}: {exc.strerror}") from None
    if (after.st_ino, after.st_dev) != (before.st_ino, before.st_dev) or not stat.S_ISSOCK(after.st_mode):
        raise _replaced(path)
    if stat.S_IMODE(after.st_mode) != mode or (group is not None and after.st_gid != group):
        _remove_our_socket(path)
        wanted = f"mode {mode:04o}" + (f" and group {group}" if group is not None else "")
        raise ListenerError(f"{path} did not take {wanted}")
    return after.st_ino


def _chmod_socket_through_proc(path: str, mode: int) -> None:
    """chmod the socket at ``path`` through an O_PATH descriptor, as newer C libraries do, so no symlink is followed."""
    fd = os.open(path, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        if not stat.S_ISSOCK(os.fstat(fd).st_mode):
            raise _replaced(path)
        os.chmod(f"/proc/self/fd/{fd}", mode)
    finally:
        os.close(fd)


def _replaced(path: str) -> ListenerError:
    return ListenerError(f"{path} was replaced by something other than the socket expertd bound; "
                         "check who else can write to its directory")


def _remove_our_socket(path: str) -> None:
    try:
        info = os.lstat(path)
        if stat.S_ISSOCK(info.st_mode) and info.st_uid == os.geteuid():
            os.unlink(path)
    except OSError:
        pass


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
