"""Files the daemon creates (socket, pidfile, log file) against another local user's plants.

The socket's directory must be writable by nobody but root and the daemon's
user, and its mode is set without following a symlink; the pidfile and the
log file are never written through a symlink planted at their path.  The
attacker is a real second user (tests/users.py), planting in a sticky,
world-writable directory as she would in /tmp.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest

from expertd.client import Client
from expertd.daemon_mode import PidfileError, check_pidfile, write_pidfile
from expertd.listener import Listener, ListenerError, check_socket_directory

from conftest import Daemon, run_expertd, wait_until, write_config
from users import as_user, local_user, needs_root

pytestmark = needs_root

ATTACKER = "xd-mallory"


@pytest.fixture
def mallory() -> tuple[int, int]:
    return local_user(ATTACKER)


@pytest.fixture
def shared_dir():
    """A root-owned sticky directory that every user may write to, like /tmp."""
    path = Path(tempfile.mkdtemp(prefix="xd-shared-", dir="/tmp"))
    path.chmod(0o1777)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def precious(short_dir) -> Path:
    """A root-only file the attacker wants changed."""
    path = short_dir / "precious"
    path.write_text("root only\n")
    path.chmod(0o600)
    return path


def _unchanged(path: Path) -> bool:
    info = path.stat()
    return path.read_text() == "root only\n" and stat.S_IMODE(info.st_mode) == 0o600 and info.st_uid == 0


def _mallory_mkdtemp(uid: int, gid: int, mode: int) -> Path:
    """A directory that the attacker made in advance in /tmp."""
    def make() -> str:
        made = tempfile.mkdtemp(prefix="xd-m-", dir="/tmp")
        os.chmod(made, mode)
        return made
    made = as_user(uid, gid, make)
    assert made.startswith("/tmp/xd-m-"), made
    return Path(made)


def _refused(done: subprocess.CompletedProcess, *words: str) -> None:
    assert done.returncode == 1, done.stderr
    assert done.stderr.count("\n") == 1, done.stderr  # one line, no traceback
    for word in words:
        assert word in done.stderr, done.stderr


def _nothing_runs_with(config: Path) -> bool:
    return not any(str(config) in " ".join(proc.info["cmdline"] or ())
                   for proc in psutil.process_iter(["cmdline"]))


# ---------------------------------------------------------------- the socket's directory

@pytest.mark.parametrize("mode", [0o755, 0o777, 0o1777])
@pytest.mark.parametrize("daemon_mode", [False, True])
def test_socket_directory_made_by_another_user_is_refused(short_dir, mallory, mode, daemon_mode):
    made = _mallory_mkdtemp(*mallory, mode)
    try:
        config = write_config(short_dir)
        path = made / "x.sock"
        extra = ("--daemon", "--log-file", str(short_dir / "d.log")) if daemon_mode else ()
        done = run_expertd("--config", str(config), "--socket", str(path), *extra)
        _refused(done, f"socket directory {made} is owned by another user", f"owner {ATTACKER}",
                 f"mode {mode:04o}", "/run/expertd")
        assert os.listdir(made) == []  # nothing bound, nothing left behind
        assert _nothing_runs_with(config)
    finally:
        shutil.rmtree(made)


@pytest.mark.parametrize("mode, problem", [
    (0o777, "writable by every user"),
    (0o775, f"writable by group {ATTACKER}"),
    (0o1777, "shared (sticky and writable by others)"),
])
def test_socket_directory_writable_by_others_is_refused(short_dir, mallory, mode, problem):
    directory = short_dir / "run"
    directory.mkdir()
    os.chown(directory, 0, mallory[1])
    directory.chmod(mode)
    done = run_expertd("--config", str(write_config(short_dir)), "--socket", str(directory / "x.sock"))
    _refused(done, f"socket directory {directory} is {problem}", "owner root", f"mode {mode:04o}")
    assert os.listdir(directory) == []


def test_tmp_itself_cannot_hold_the_socket(short_dir):
    path = f"/tmp/{short_dir.name}.sock"
    done = run_expertd("--config", str(write_config(short_dir)), "--socket", path)
    _refused(done, "socket directory /tmp is shared", "make a directory of its own for the socket")
    assert not os.path.lexists(path)


def test_a_directory_above_the_socket_writable_by_another_user_is_refused(short_dir, mallory):
    made = _mallory_mkdtemp(*mallory, 0o755)
    try:
        inner = made / "run"
        inner.mkdir(mode=0o755)  # root's, but she can rename it away and put her own in its place
        done = run_expertd("--config", str(write_config(short_dir)), "--socket", str(inner / "x.sock"))
        _refused(done, f"socket directory {inner} is unsafe: {made} is owned by another user")
        assert os.listdir(inner) == []
    finally:
        shutil.rmtree(made)


def test_symlinked_socket_directory(short_dir, mallory):
    real = short_dir / "real"
    real.mkdir()
    (short_dir / "link").symlink_to(real)
    daemon = Daemon(write_config(short_dir), short_dir / "link" / "x.sock", workers=1)
    try:
        daemon.start()
        assert daemon.client().call("add", 1, 2) == 3
        assert stat.S_ISSOCK((real / "x.sock").lstat().st_mode)
    finally:
        daemon.kill()
    theirs = short_dir / "theirs"
    theirs.symlink_to(real)
    os.chown(theirs, *mallory, follow_symlinks=False)
    done = run_expertd("--config", str(write_config(short_dir)), "--socket", str(theirs / "y.sock"))
    _refused(done, f"{theirs} is a symlink owned by another user")


def test_existing_directories_of_root_and_of_the_users_own(short_dir, mallory):
    run = short_dir / "run"  # like /run/expertd made by systemd's RuntimeDirectory=
    run.mkdir(mode=0o755)
    daemon = Daemon(write_config(short_dir, socket_mode="0600"), run / "x.sock", workers=1)
    try:
        daemon.start()
        assert daemon.client().call("add", 2, 3) == 5
        assert stat.S_IMODE((run / "x.sock").lstat().st_mode) == 0o600
    finally:
        daemon.kill()
    # A daemon run by the user herself may use a directory of hers, group-writable by her private group too.
    made = _mallory_mkdtemp(*mallory, 0o775)
    try:
        assert as_user(*mallory, lambda: check_socket_directory(str(made / "sub"), create=True)) == "None"
        assert stat.S_IMODE((made / "sub").stat().st_mode) == 0o755
        with pytest.raises(ListenerError, match="owned by another user"):
            check_socket_directory(str(made))  # root's daemon does not take hers
    finally:
        shutil.rmtree(made)


@pytest.mark.parametrize("swap_after", ["bind", "chown"])
def test_socket_swapped_for_a_symlink_is_not_followed(short_dir, precious, monkeypatch, swap_after):
    """Replacing the new socket by a symlink before its mode is set changes nothing through the link.

    Only root or the daemon's user can still do that (the directory check keeps everyone else
    out); the swap is simulated in-process, right after bind or after chown.
    """
    path = short_dir / "s" / "x.sock"

    def swap() -> None:
        os.rename(path, short_dir / "s" / "moved.sock")
        os.symlink(precious, path)

    if swap_after == "bind":
        real_bind = socket.socket.bind

        def bind(self, address):
            real_bind(self, address)
            swap()
        monkeypatch.setattr(socket.socket, "bind", bind)
    else:
        real_chown = os.chown

        def chown(*args, **kwargs):
            real_chown(*args, **kwargs)
            swap()
        monkeypatch.setattr(os, "chown", chown)
    with pytest.raises(ListenerError, match="was replaced by something other than the socket"):
        Listener.bind(str(path), 0o666, group=0)
    assert _unchanged(precious)
    assert path.is_symlink()  # not ours: left alone


# ---------------------------------------------------------------- the log file

def _daemon_mode(config: Path, socket_path: Path, pidfile: Path, log_file: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "expertd", "--config", str(config), "--socket", str(socket_path), "--workers", "1",
         "--daemon", "--pidfile", str(pidfile), "--log-file", str(log_file)],
        capture_output=True, text=True, timeout=120,
    )


def _stop(pidfile: Path) -> None:
    """Stop a daemon-mode expertd by its pidfile, if it started."""
    try:
        pid = int(pidfile.read_text())
    except (OSError, ValueError):
        return
    os.kill(pid, signal.SIGTERM)
    wait_until(lambda: not Path(f"/proc/{pid}").exists(), timeout=30)


def test_a_symlink_planted_at_the_log_file_is_refused(short_dir, shared_dir, mallory, precious):
    log_file = shared_dir / "expertd.log"
    as_user(*mallory, lambda: os.symlink(precious, log_file))
    config = write_config(short_dir, {"add": "testexperts:add"})
    pidfile = short_dir / "expertd.pid"
    try:
        done = _daemon_mode(config, short_dir / "x.sock", pidfile, log_file)
        assert done.returncode == 2, done.stderr
        assert f"cannot open log file {log_file}: it is a symbolic link, which expertd does not follow" \
            in done.stderr and done.stderr.count("\n") == 1
    finally:
        _stop(pidfile)
    assert _unchanged(precious)
    assert log_file.is_symlink() and not (short_dir / "x.sock").exists()


@pytest.mark.parametrize("plant", ["fifo", "hard link", "her file"])
def test_a_log_file_that_is_not_the_daemons_own_is_refused(short_dir, shared_dir, mallory, precious, plant):
    log_file = shared_dir / "expertd.log"
    if plant == "fifo":
        as_user(*mallory, lambda: os.mkfifo(log_file, 0o666))  # would hang a plain open for writing
        why = "it is not a regular file"
    elif plant == "hard link":
        os.link(precious, log_file)  # fs.protected_hardlinks keeps her from it; root (or a lax sysctl) may not
        why = "it has 2 hard links"
    else:
        as_user(*mallory, lambda: Path(log_file).write_text(""))  # she would read the log
        why = f"it belongs to {ATTACKER}"
    done = run_expertd("--config", str(write_config(short_dir)), "--log-file", str(log_file), "--check", timeout=30)
    assert done.returncode == 2, done.stderr
    assert f"cannot open log file {log_file}: {why}" in done.stderr and done.stderr.count("\n") == 1
    assert _unchanged(precious)


def test_log_reopen_refuses_a_symlink_planted_after_rotation(short_dir, shared_dir, mallory, precious):
    log_file = shared_dir / "expertd.log"
    pidfile = short_dir / "expertd.pid"
    config = write_config(short_dir, {"add": "testexperts:add"})
    done = _daemon_mode(config, short_dir / "x.sock", pidfile, log_file)
    assert done.returncode == 0, done.stderr
    pid = int(pidfile.read_text())
    try:
        rotated = shared_dir / "expertd.log.1"
        os.rename(log_file, rotated)
        as_user(*mallory, lambda: os.symlink(precious, log_file))
        os.kill(pid, signal.SIGUSR1)
        assert wait_until(lambda: "cannot reopen the log file" in rotated.read_text()), rotated.read_text()
        assert "it is a symbolic link" in rotated.read_text()
        assert _unchanged(precious)
        assert Client(str(short_dir / "x.sock")).call("add", 1, 2) == 3  # still serving, still logging to .1

        os.unlink(log_file)
        os.kill(pid, signal.SIGUSR1)
        assert wait_until(lambda: log_file.exists() and "log files reopened" in log_file.read_text())
        assert not log_file.is_symlink() and log_file.stat().st_uid == 0
    finally:
        _stop(pidfile)
    assert _unchanged(precious)


# ---------------------------------------------------------------- the pidfile

def test_symlinks_planted_at_the_pidfile_and_its_temporary_names_are_not_followed(
        short_dir, shared_dir, mallory, precious):
    """A link at the pidfile's path is replaced (never written through), and its temporary name cannot be guessed.

    Before, the pid was written to .expertd.pid.<pid> and renamed: links planted at every such name
    for the next few thousand pids caught the write.
    """
    pidfile = shared_dir / "expertd.pid"
    next_pid = int(Path("/proc/sys/kernel/ns_last_pid").read_text()) + 1

    def plant() -> str:
        os.symlink(precious, pidfile)
        for pid in range(next_pid, next_pid + 3000):
            os.symlink(precious, shared_dir / f".expertd.pid.{pid}")
        return "planted"
    assert as_user(*mallory, plant) == "planted"
    config = write_config(short_dir, {"add": "testexperts:add"})
    try:
        done = _daemon_mode(config, short_dir / "x.sock", pidfile, short_dir / "expertd.log")
        assert done.returncode == 0, done.stderr
        assert not pidfile.is_symlink() and stat.S_IMODE(pidfile.stat().st_mode) == 0o644
        pid = int(pidfile.read_text())
        assert Client(str(short_dir / "x.sock")).call("add", 2, 2) == 4
        assert _unchanged(precious)
    finally:
        _stop(pidfile)
    assert wait_until(lambda: not pidfile.exists(), timeout=30)
    assert not Path(f"/proc/{pid}").exists()
    leftovers = [p.name for p in shared_dir.iterdir() if not p.is_symlink()]
    assert leftovers == []  # no temporary file left behind
    assert _unchanged(precious)


def test_write_pidfile_uses_a_fresh_name_in_process(short_dir, precious):
    pidfile = short_dir / "p.pid"
    (short_dir / f".p.pid.{os.getpid()}").symlink_to(precious)  # the name the old code used
    write_pidfile(str(pidfile))
    assert pidfile.read_text() == f"{os.getpid()}\n" and _unchanged(precious)
    assert sorted(p.name for p in short_dir.iterdir()) == [f".p.pid.{os.getpid()}", "p.pid", "precious"]


def test_a_fifo_at_the_pidfile_is_refused_without_hanging(short_dir):
    pidfile = short_dir / "p.pid"
    os.mkfifo(pidfile)
    started = time.monotonic()
    with pytest.raises(PidfileError, match="not a regular file"):
        check_pidfile(str(pidfile))
    assert time.monotonic() - started < 5
