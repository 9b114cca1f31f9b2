"""The log file (``--log-file``), opened so that nothing planted at its path can redirect it.

The file is opened for appending with O_NOFOLLOW (a symlink at the path is
refused, never followed) and O_NONBLOCK (a FIFO there cannot hang start-up),
then checked: it must be a regular file with a single link, owned by root or
the daemon's user.  Otherwise another local user who can write to the log's
directory could have the daemon append to a file of their choosing (a
root-only file through a link) or read the log in a file of their own.  The
same open serves start-up and SIGUSR1's reopen after logrotate.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import pwd
import stat
from collections.abc import Callable
from typing import TextIO

LOG_FILE_MODE = 0o644  # before the umask, as for any file expertd creates


def open_log_file(path: str, encoding: str | None = "utf-8", errors: str | None = None) -> TextIO:
    """Open ``path`` for appending, created if missing; OSError, whose strerror says why and what to do, if unsafe."""
    fd = open_log_fd(path)
    try:
        return open(fd, "a", encoding=encoding, errors=errors)
    except BaseException:
        os.close(fd)
        raise


def open_log_fd(path: str) -> int:
    """The descriptor of ``path`` opened for appending (blocking, close-on-exec), checked as open_log_file says."""
    flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    try:
        fd = os.open(path, flags, LOG_FILE_MODE)
    except OSError as exc:
        if exc.errno == errno.ELOOP or os.path.islink(path):  # some kernels say EACCES (O_CREAT, sticky dir)
            raise OSError(errno.ELOOP, "it is a symbolic link, which expertd does not follow; "
                                       "give the path of the file itself, or remove the link", path) from None
        if exc.errno == errno.ENXIO:  # a FIFO nobody reads
            raise OSError(errno.ENXIO, "it is not a regular file; remove it or choose another path", path) from None
        raise
    try:
        _check(fd, path)
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
        return fd
    except BaseException:
        os.close(fd)
        raise


def _check(fd: int, path: str) -> None:
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        raise OSError(errno.EINVAL, "it is not a regular file; remove it or choose another path", path)
    if info.st_uid not in (0, os.geteuid()):
        try:
            owner = pwd.getpwuid(info.st_uid).pw_name
        except KeyError:
            owner = f"uid {info.st_uid}"
        raise OSError(errno.EPERM, f"it belongs to {owner}, who could read the log or put lines in it; "
                                   "remove it, or keep the log in a directory only the daemon's user can write", path)
    if info.st_nlink != 1:
        raise OSError(errno.EMLINK, f"it has {info.st_nlink} hard links, so it may be another file "
                                    "under a second name; remove it or choose another path", path)


class LogFileHandler(logging.FileHandler):
    """A logging.FileHandler whose file is opened with open_log_file."""

    def __init__(self, path: str) -> None:
        super().__init__(path, encoding="utf-8")

    def _open(self) -> TextIO:
        return open_log_file(self.baseFilename, self.encoding, self.errors)


def reopen(handler: logging.FileHandler) -> None:
    """Point ``handler`` at a freshly opened file at its path; on OSError it keeps its current file."""
    handler.acquire()
    try:
        fresh = open_log_file(handler.baseFilename, handler.encoding, handler.errors)
        old, handler.stream = handler.stream, fresh
        if old is not None:
            try:
                follow = os.path.samestat(os.fstat(2), os.fstat(old.fileno()))
            except (OSError, ValueError):
                follow = False
            with contextlib.suppress(OSError, ValueError):
                old.close()
            if follow:  # stderr was the log (daemon mode: native libraries write to fd 2): it follows
                os.dup2(fresh.fileno(), 1)
                os.dup2(fresh.fileno(), 2)
    finally:
        handler.release()


def reopen_log_files() -> None:
    """Reopen every file the log writes to (after logrotate moved it), never through a symlink.

    Where stderr is that same file (daemon mode: native libraries write to fd 2
    directly), stdout and stderr follow it to the new file.  OSError (with the
    reason) if a file cannot be opened safely: that handler keeps its old file.
    """
    failure: OSError | None = None
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            try:
                reopen(handler)
            except OSError as exc:
                failure = failure or exc
    for also in _ALSO_REOPEN:  # (the access log: one file's failure does not keep the others on old files)
        try:
            also()
        except OSError as exc:
            failure = failure or exc
    if failure is not None:
        raise failure


_ALSO_REOPEN: list[Callable[[], None]] = []  # files other than the log's handlers (see also_reopen)


def also_reopen(reopen_file: Callable[[], None]) -> None:
    """Have :func:`reopen_log_files` call ``reopen_file`` too (the access log's, which this module does not know)."""
    if reopen_file not in _ALSO_REOPEN:
        _ALSO_REOPEN.append(reopen_file)
