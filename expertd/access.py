"""Who a Unix-socket peer is, and what it may do: pure decisions on credentials.

The kernel records a peer's credentials when it connects (SO_PEERCRED,
SO_PEERGROUPS); they are read once, at accept, never later from /proc by a pid
another process may have by then.  :class:`Access` turns the config's
allow_uids/allow_gids, control_uids/control_gids and public_status into three
questions a connection's credentials answer.

State owned here: none beyond an :class:`Access` built from one config (the
master builds a new one when a reload changes the config).
"""

from __future__ import annotations

import errno
import os
import socket
import struct

from expertd.config import Config

NO_PEER = -1  # the uid, gid and pid of a connection without credentials (http_listen)
_PEERCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid
_SO_PEERGROUPS = getattr(socket, "SO_PEERGROUPS", 59)  # Linux 4.13


class Access:
    """Who may connect (allow_uids/gids), send control requests (control_uids/gids) and read status."""

    def __init__(self, config: Config) -> None:
        own = {0, os.getuid()}  # root and the daemon's own user: always
        # None: no allow-list, anyone who can open the socket may connect.
        self.allowed_uids = set(config.allow_uids) | own if config.allow_uids or config.allow_gids else None
        self.allowed_gids = set(config.allow_gids)
        self.control_uids = set(config.control_uids) | own
        self.control_gids = set(config.control_gids)
        self.public_status = config.public_status
        self.uses_groups = bool(self.allowed_gids or self.control_gids)

    def allows(self, uid: int, gid: int, groups: frozenset[int]) -> bool:
        return (self.allowed_uids is None or uid in self.allowed_uids
                or in_groups(self.allowed_gids, gid, groups))

    def controls(self, uid: int, gid: int, groups: frozenset[int]) -> bool:
        return uid != NO_PEER and (uid in self.control_uids or in_groups(self.control_gids, gid, groups))

    def reads(self, uid: int, gid: int, groups: frozenset[int]) -> bool:
        """Whether the peer may read the daemon's state (STATUS, LIST, /health, /experts, /metrics)."""
        return self.public_status or self.controls(uid, gid, groups)


def in_groups(gids: set[int], gid: int, groups: frozenset[int]) -> bool:
    """Whether a peer (primary ``gid``, supplementary ``groups``) is in one of ``gids``."""
    return bool(gids) and (gid in gids or bool(gids & groups))


def peer_credentials(sock: socket.socket) -> tuple[int, int, int]:
    """A Unix socket peer's (pid, uid, gid) as the kernel recorded them at connect; OSError if gone."""
    return _PEERCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size))


def peer_groups(sock: socket.socket) -> frozenset[int]:
    """The supplementary groups of a Unix socket's peer, as the kernel recorded them when it connected."""
    for count in (256, 65536):  # (NGROUPS_MAX is 65536; most users have a few)
        try:
            raw = sock.getsockopt(socket.SOL_SOCKET, _SO_PEERGROUPS, 4 * count)
        except OSError as exc:
            if exc.errno == errno.ERANGE:
                continue
            return frozenset()
        return frozenset(struct.unpack(f"{len(raw) // 4}I", raw[: len(raw) // 4 * 4]))
    return frozenset()
