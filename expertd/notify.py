"""How the daemon presents itself to the service manager and the OS.

systemd integration without libsystemd: sd_notify messages and socket
activation; and process titles (``expertd: master [CONFIG]``).

* :class:`Notifier` sends ``READY=1``, ``STATUS=…``, ``RELOADING=1``,
  ``STOPPING=1`` and ``WATCHDOG=1`` datagrams to ``$NOTIFY_SOCKET`` (a path,
  or an abstract socket when it starts with ``@``).  Without the variable
  every call is a no-op, so the master calls it unconditionally.
* :func:`listen_fds` returns the listening socket systemd passed
  (``$LISTEN_FDS``/``$LISTEN_PID``, first descriptor 3), if any.

Both clear their environment variables so that workers do not inherit them.
"""

from __future__ import annotations

import os
import socket
import time

SD_LISTEN_FDS_START = 3


class Notifier:
    """Talks to the service manager, if there is one."""

    def __init__(self) -> None:
        address = os.environ.pop("NOTIFY_SOCKET", "")
        self.address = "\0" + address[1:] if address.startswith("@") else address
        self._sock: socket.socket | None = None
        if self.address:
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            self._sock.setblocking(False)
        self.watchdog_interval = _watchdog_interval()
        self._last_watchdog = 0.0
        self._last_status = ""

    @property
    def enabled(self) -> bool:
        return self._sock is not None

    def send(self, *fields: str) -> None:
        """Send one message of ``KEY=VALUE`` fields (lost silently if the manager is gone)."""
        if self._sock is None:
            return
        try:
            self._sock.sendto("\n".join(fields).encode(), self.address)
        except OSError:
            pass

    def ready(self, status: str) -> None:
        self.send("READY=1", f"STATUS={status}", f"MAINPID={os.getpid()}")

    def reloading(self) -> None:
        monotonic_usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        self.send("RELOADING=1", f"MONOTONIC_USEC={monotonic_usec}", "STATUS=reloading")

    def stopping(self) -> None:
        self.send("STOPPING=1", "STATUS=stopping")

    def status(self, text: str) -> None:
        if text != self._last_status:
            self._last_status = text
            self.send(f"STATUS={text}")

    def keep_waiting(self) -> None:
        """A long step in the loop (a model being prepared): ping the watchdog, and give the manager 10 s more."""
        self.watchdog(time.monotonic())
        self.send("EXTEND_TIMEOUT_USEC=10000000")

    def watchdog(self, now: float) -> None:
        """Ping the watchdog at half its interval (call it from the main loop)."""
        if self.watchdog_interval and now - self._last_watchdog >= self.watchdog_interval / 2:
            self._last_watchdog = now
            self.send("WATCHDOG=1")


def extend_start_timeout() -> None:
    """Before the master's Notifier exists (start-up preparing models): 10 s more to become ready."""
    address = os.environ.get("NOTIFY_SOCKET", "")
    if not address:
        return
    address = "\0" + address[1:] if address.startswith("@") else address
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.sendto(b"EXTEND_TIMEOUT_USEC=10000000", address)
    except OSError:
        pass


def _watchdog_interval() -> float:
    usec = os.environ.pop("WATCHDOG_USEC", "")
    pid = os.environ.pop("WATCHDOG_PID", "")
    if not usec.isdigit() or (pid and pid != str(os.getpid())):
        return 0.0
    return int(usec) / 1e6


def listen_fds() -> list[int]:
    """Descriptors passed by socket activation, meant for this process; [] when there are none."""
    fds = os.environ.pop("LISTEN_FDS", "")
    pid = os.environ.pop("LISTEN_PID", "")
    os.environ.pop("LISTEN_FDNAMES", None)
    if not fds.isdigit() or pid != str(os.getpid()):
        return []
    return list(range(SD_LISTEN_FDS_START, SD_LISTEN_FDS_START + int(fds)))


def set_title(title: str) -> None:
    """Set the process title shown by ps and top (needs setproctitle; skipped without it)."""
    try:
        import setproctitle
    except ImportError:
        return
    setproctitle.setproctitle(title)
