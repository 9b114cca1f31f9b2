"""Classic daemon mode (``expertd --daemon``): detaching, the pidfile, the launcher's wait.

Detaching is python-daemon's DaemonContext (double fork, setsid, umask 022,
every descriptor closed but the log file and the pipe to the launcher).  The
working directory is kept, not changed to /: an expert that opens a relative
path must find the same file in the foreground and as a daemon.  The command
that started the daemon waits on that pipe and exits 0 only once the daemon
is serving, or prints the one-line reason and exits with the status the
daemon would have (3 experts, 1 otherwise) when it failed to start, so that
scripts can rely on its status and the terminal shows why.  The pidfile is
written only once every worker is ready, refused while a live expertd holds
it, replaced when stale, and removed on exit.

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


def detach(log_stream: IO[str] | None, log_path: str | None = None, keep: list[int] | None = None) -> IO[bytes]:
    """Become a daemon; returns the pipe on which to report readiness to the launcher.

    ``log_path``: where the log goes (the launcher names it when the daemon died without saying why);
    ``keep``: other descriptors to keep open (the access log's).  The launcher
    (this process) does not return from here: it waits for the daemon's word
    (``ready``, or ``STATUS REASON``), prints the reason if it failed, and exits.
    """
    import daemon

    read_end, write_end = os.pipe()
    if os.fork():  # the launcher
        os.close(write_end)
        with os.fdopen(read_end, "rb") as pipe:
            # One line: workers forked before readiness hold the write end too, so EOF may never come.
            word = pipe.readline().decode("utf-8", "replace").strip()
        status, message = launcher_outcome(word, log_path)
        if message:
            sys.stderr.write(f"expertd: {message}\n")
        os._exit(status)
    os.close(read_end)
    preserve = [write_end, *(keep or ())] + ([log_stream.fileno()] if log_stream is not None else [])
    context = daemon.DaemonContext(
        working_directory=os.getcwd(),  # kept: relative paths in hooks mean what they meant in the foreground
        umask=0o022,
        detach_process=True,
        files_preserve=preserve,
        signal_map={},  # the master installs its own handlers
        stdout=log_stream,
        stderr=log_stream,  # native libraries write to fd 2: keep that in the log too
    )
    context.open()
    return os.fdopen(write_end, "wb", buffering=0)


def launcher_outcome(word: str, log_path: str | None) -> tuple[int, str]:
    """The launcher's exit status and what it prints, from the daemon's one line (empty: it died first)."""
    if word == "ready":
        return 0, ""
    status, _, message = word.partition(" ")
    if status.isdigit() and message:
        return int(status) or 1, message
    where = f"; see its log, {log_path}" if log_path else ""
    return 1, f"the daemon exited before it was ready{where}"
