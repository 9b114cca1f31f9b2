"""Classic daemon mode (``expertd --daemon``): detaching, the pidfile, the launcher's wait.

Detaching is python-daemon's DaemonContext (double fork, setsid, umask 022,
working directory /, every descriptor closed but the log file and the pipe
to the launcher).  The command that started the daemon waits on that pipe and
exits 0 only once the daemon is serving, or 1 with the reason when it failed
to start, so scripts can rely on its status.  The pidfile is written only once
every worker is ready, refused while a live expertd holds it, replaced when
stale, and removed on exit.

No file operation on the pidfile's path follows a symlink, so a link planted
there (in a shared directory such as /tmp) cannot redirect the write to a file
of someone else: the pidfile is written under a fresh, unguessable name
(mkstemp: O_EXCL, O_NOFOLLOW) and renamed over the path, which replaces a link
there rather than writing through it; it is read with O_NOFOLLOW.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import sys
import tempfile
from typing import IO

from expertd.errors import ExpertdError


class PidfileError(ExpertdError):
    """The pidfile names a running expertd, or cannot be written."""


def check_pidfile(path: str) -> None:
    """Refuse to start while a live expertd holds ``path``; remove a stale one.

    A symlink at ``path`` is not followed: expertd never writes one, so it is
    stale like a pidfile naming a dead process, and is removed (the link, not
    what it points to).
    """
    try:
        text = _read_pidfile(path)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise PidfileError(f"cannot read pidfile {path}: {exc.strerror}") from None
    pid = int(text) if text.isdigit() else 0
    if pid and pid != os.getpid() and _is_expertd(pid):
        raise PidfileError(f"expertd is already running with pid {pid} (pidfile {path}); stop it first")
    try:
        os.unlink(path)  # stale: its process is gone (or is not an expertd)
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise PidfileError(f"cannot remove stale pidfile {path}: {exc.strerror}; remove it, or keep the "
                           "pidfile in a directory only the daemon's user can write") from None


def _read_pidfile(path: str) -> str:
    """The pidfile's text; empty for a symlink (not followed). OSError for anything but a regular file."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return ""
        raise
    with os.fdopen(fd, "rb") as handle:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "it is not a regular file; remove it or choose another path")
        return handle.read(64).decode("ascii", "replace").strip()


def write_pidfile(path: str) -> None:
    """Write our pid atomically (a reader never sees a half-written file), never through a symlink."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, temporary = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", dir=directory)
    try:
        with os.fdopen(fd, "w", encoding="ascii") as handle:
            os.fchmod(fd, 0o644)
            handle.write(f"{os.getpid()}\n")
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise


def remove_pidfile(path: str) -> None:
    """Remove ``path`` if it still names this process."""
    try:
        if _read_pidfile(path) == str(os.getpid()):
            os.unlink(path)
    except OSError:
        pass


def _is_expertd(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as handle:
            return b"expertd" in handle.read()
    except OSError:
        return False


def detach(log_stream: IO[str] | None, keep: list[int] | None = None) -> IO[bytes]:
    """Become a daemon; returns the pipe on which to report readiness to the launcher.

    ``keep``: other descriptors to keep open (the access log's).  The launcher
    (this process) does not return from here: it waits for the
    daemon's word, prints why if it failed, and exits.
    """
    import daemon

    read_end, write_end = os.pipe()
    if os.fork():  # the launcher
        os.close(write_end)
        with os.fdopen(read_end, "rb") as pipe:
            # One line: workers forked before readiness hold the write end too, so EOF may never come.
            word = pipe.readline().decode("utf-8", "replace").strip()
        if word.startswith("ready"):
            os._exit(0)
        sys.stderr.write(f"expertd: {word or 'the daemon exited before it was ready; see its log file'}\n")
        os._exit(1)
    os.close(read_end)
    preserve = [write_end, *(keep or ())] + ([log_stream.fileno()] if log_stream is not None else [])
    context = daemon.DaemonContext(
        working_directory="/",
        umask=0o022,
        detach_process=True,
        files_preserve=preserve,
        signal_map={},  # the master installs its own handlers
        stdout=log_stream,
        stderr=log_stream,  # native libraries write to fd 2: keep that in the log too
    )
    context.open()
    return os.fdopen(write_end, "wb", buffering=0)
