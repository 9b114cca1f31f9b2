"""Other local users for tests that attack expertd as someone else (CI runs as root).

``local_user(name)`` creates the user with useradd once and returns its uid and
gid; ``as_user(uid, gid, action)`` runs ``action`` in a forked child that has
dropped to that user (setgroups, setgid, setuid: the child keeps the modules
root imported, since the interpreter may live where others cannot execute it)
and returns what ``action`` returned, as text; ``in_child(action)`` is the
same for a child that changes its credentials itself.
"""

from __future__ import annotations

import os
import pwd
import subprocess
import traceback
from collections.abc import Callable

import pytest

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="acting as other users needs root")


def local_user(name: str) -> tuple[int, int]:
    """The uid and gid of local user ``name``, created (no home, no login) if it does not exist."""
    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin",
                        "--user-group", name], check=True, capture_output=True)
        entry = pwd.getpwnam(name)
    return entry.pw_uid, entry.pw_gid


def as_user(uid: int, gid: int, action: Callable[[], object], groups: tuple[int, ...] = ()) -> str:
    """Run ``action()`` as ``uid``/``gid`` in a forked child; its result (or exception) as text."""
    def dropped() -> object:
        os.setgroups(list(groups))
        os.setgid(gid)
        os.setuid(uid)
        return action()

    return in_child(dropped)


def in_child(action: Callable[[], object]) -> str:
    """Run ``action()`` in a forked child (which may change its credentials); its result or exception as text."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        os.close(read_end)
        try:
            try:
                outcome = str(action())
            except BaseException as exc:  # reported to the test as text
                outcome = f"error {type(exc).__name__}: {exc}"
                if os.environ.get("EXPERTD_TEST_TRACE"):
                    outcome += "\n" + traceback.format_exc()
            os.write(write_end, outcome.encode("utf-8", "replace"))
        finally:
            os._exit(0)
    os.close(write_end)
    os.waitpid(pid, 0)
    with os.fdopen(read_end, encoding="utf-8") as reader:
        return reader.read()
