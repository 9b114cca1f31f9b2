"""A generation's parent: the process that loads one generation of experts and forks its workers.

The master never runs expert code.  For each generation (the first at start-up,
then one per reload) it forks a *generation parent*, which imports the experts,
prepares their models and runs their before-fork hooks, then forks the
generation's workers on the master's request.  So:

* an import that hangs or crashes freezes nothing: the master's loop goes on
  serving with the old generation, and abandons the load after ``reload_timeout``;
* each generation's modules live in an interpreter of their own: a reload
  never mixes old and new code, and never has to put ``sys.modules`` back;
* workers still share the loaded libraries and models copy-on-write with
  their parent, and the master's own preloads (TensorFlow) with everyone.

Workers stay the master's children, which its supervision relies on (waitpid,
exit statuses, SIGKILL without pid reuse): the master is a child subreaper, and
the parent forks each worker through a short-lived intermediate process that
exits at once, so the worker is re-parented to the master before the master
hears its pid.

The master talks to a parent over a SOCK_SEQPACKET pair (one message a packet,
msgpack bodies):

    parent -> master   KEEPALIVE | LOADED {name: description} | FAILED text
                       | SPAWNED pid | SPAWN_FAILED text
    master -> parent   SPAWN {number, board, index} (+ the worker's channel end)

The parent exits when the master closes its end (the generation is retired or
the master is gone; a parent-death signal covers a load that never returns).

State owned here: on the master's side, a :class:`Generation` per parent
process (its pid, control socket, what it loaded and its state); in the parent,
the loaded experts.
"""

from __future__ import annotations

import ctypes
import gc
import logging
import os
import select
import signal
import socket
import struct
import sys
import time
from collections.abc import Callable

import msgpack

from expertd import firefly, ipc
from expertd.config import Config
from expertd.errors import ExpertLoadError
from expertd.metrics import Metrics
from expertd.scoreboard import Scoreboard

log = logging.getLogger("expertd.generation")

KEEPALIVE, LOADED, FAILED, SPAWN, SPAWNED, SPAWN_FAILED = b"K", b"L", b"F", b"S", b"P", b"X"
_MAX_MESSAGE = 64 * 1024
_MAX_FAILURE = 16 * 1024  # bytes of a load's error message (one line, normally short)
_PID = struct.Struct("!i")
_SPAWN_TIMEOUT = 10.0  # two forks of a large process take milliseconds; this long means the parent is stuck
_PR_SET_PDEATHSIG, _PR_SET_CHILD_SUBREAPER = 1, 36

LOADING, SERVING, RETIRED = "loading", "serving", "retired"


class GenerationError(Exception):
    """The generation's parent cannot do what was asked (it is gone or stuck)."""


def _readable(sock: socket.socket, timeout: float) -> bool:
    # poll, not select: the master may hold descriptors numbered past select's limit of 1024.
    poller = select.poll()
    poller.register(sock.fileno(), select.POLLIN)
    return bool(poller.poll(timeout * 1000))


def become_subreaper() -> None:
    """Make orphaned descendants (the workers, once their intermediate exits) children of this process."""
    _prctl(_PR_SET_CHILD_SUBREAPER, 1)


def _prctl(option: int, value: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(option, value, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), f"prctl({option}) failed: {os.strerror(ctypes.get_errno())}")


class Generation:
    """The master's handle on one generation's parent process."""

    def __init__(self, number: int, config: Config, pid: int, control: socket.socket) -> None:
        self.number = number
        self.config = config
        self.pid = pid
        self.control = control
        self.state = LOADING
        self.experts: dict[str, dict] = {}  # name -> description, once loaded
        self.started = time.monotonic()
        self.deadline = self.started + config.reload_timeout
        self.exited = False  # reaped by the master
        self.waiters: list[tuple[object, int]] = []  # RELOAD requests to answer with the load's outcome

    # ------------------------------------------------------------ starting
    @classmethod
    def start(cls, number: int, config: Config, shared: tuple[Scoreboard, Metrics], close_fds: list[int],
              ) -> Generation:
        """Fork the parent of generation ``number``; it begins loading ``config``'s experts at once.

        ``shared`` is the scoreboard and the metrics the workers write (shared memory the master made);
        ``close_fds`` the master's descriptors the parent must not hold.
        """
        master_end, parent_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        master_pid = os.getpid()
        try:
            pid = os.fork()
        except OSError:
            master_end.close()
            parent_end.close()
            raise
        if pid == 0:  # the parent of the new generation
            code = 1
            try:
                signal.set_wakeup_fd(-1)  # first: a signal must not write to a descriptor about to close
                master_end.close()
                for fd in close_fds:
                    try:
                        os.close(fd)
                    except OSError:
                        pass
                code = _Parent(number, config, parent_end, *shared, master_pid=master_pid).run()
            except BaseException as exc:  # never return into the master's code
                try:
                    sys.stderr.write(f"expertd: generation {number}: {exc}\n")
                except BaseException:
                    pass
            finally:
                os._exit(code)
        parent_end.close()
        master_end.setblocking(False)
        return cls(number, config, pid, master_end)

    def receive(self) -> tuple[bytes, object] | None:
        """One report without blocking: (KEEPALIVE | LOADED | FAILED, value), None, or (b"", None) at its end."""
        message = ipc.receive_nowait(self.control, _MAX_MESSAGE)
        if message is None:
            return None
        data, fds = message
        if not data:
            return b"", None
        op, body = data[:1], data[1:]
        if op == KEEPALIVE:
            return KEEPALIVE, None
        for fd in fds[1:]:
            os.close(fd)
        if op == LOADED and fds:
            # In a memfd: the descriptions of many experts may not fit in one packet.
            try:
                described = msgpack.unpackb(ipc.read_memfd(fds[0]))
            except (ValueError, msgpack.UnpackException) as exc:
                return FAILED, f"generation {self.number}'s description of its experts is unreadable ({exc})"
            if not isinstance(described, dict):
                return FAILED, f"generation {self.number}'s description of its experts is unreadable"
            self.experts = described
            self.state = SERVING
            return LOADED, self.experts
        if fds:
            os.close(fds[0])
        if op == FAILED:
            return FAILED, body.decode("utf-8", "replace")
        return b"", None  # nothing else is sent unasked: a parent that does is broken

    def wait_loaded(self, keepalive: Callable[[], None] | None = None,
                    interrupted: Callable[[], None] | None = None) -> dict[str, dict]:
        """Block until the experts are loaded (start-up, when there is no loop to run yet).

        ``interrupted`` is called about once a second and after every signal; it may end the process.
        """
        while True:
            if interrupted is not None:
                try:
                    interrupted()
                except BaseException:
                    self.kill()
                    raise
            left = self.deadline - time.monotonic()
            if left <= 0:
                self.kill()
                raise ExpertLoadError(f"{self.config.path}: loading the experts took longer than reload_timeout "
                                      f"({self.config.reload_timeout:g}s); raise it, or find what hangs at import")
            if not _readable(self.control, min(left, 1.0)):
                continue
            op, value = self.receive() or (KEEPALIVE, None)
            if op == KEEPALIVE:
                if keepalive is not None:
                    keepalive()
            elif op == LOADED:
                return value  # type: ignore[return-value]
            elif op == FAILED:
                self.reap()
                raise ExpertLoadError(str(value))
            else:
                raise ExpertLoadError(f"loading the experts ended without a word: the loading process {self.reap()}")

    # ------------------------------------------------------------ spawning
    def spawn(self, number: int, board: int, channel: socket.socket, index: dict[str, int]) -> int:
        """Have the parent fork worker ``number`` on ``channel`` (the worker's end); its pid.

        Blocks for the forks (milliseconds): the same wait the master had when it forked workers itself.
        """
        body = msgpack.packb({"number": number, "board": board, "index": index})
        try:
            socket.send_fds(self.control, [SPAWN + body], [channel.fileno()])
        except OSError as exc:
            raise GenerationError(f"generation {self.number}'s parent is gone ({exc.strerror})") from None
        deadline = time.monotonic() + _SPAWN_TIMEOUT
        while True:
            left = deadline - time.monotonic()
            if not _readable(self.control, max(0.0, left)):
                raise GenerationError(f"generation {self.number}'s parent did not fork a worker within "
                                      f"{_SPAWN_TIMEOUT:g}s")
            try:
                data = self.control.recv(_MAX_MESSAGE)
            except OSError as exc:
                raise GenerationError(f"generation {self.number}'s parent is gone ({exc.strerror})") from None
            if data[:1] == SPAWNED:
                return _PID.unpack_from(data, 1)[0]
            if data[:1] == SPAWN_FAILED:
                raise OSError(f"cannot fork a worker: {data[1:].decode('utf-8', 'replace')}")
            if not data:
                raise GenerationError(f"generation {self.number}'s parent is gone")
            # (a late KEEPALIVE: nothing to do)

    # ------------------------------------------------------------ ending
    def close(self) -> None:
        """Retire the parent: it exits when its control socket closes."""
        self.state = RETIRED
        if self.control.fileno() >= 0:
            self.control.close()

    def kill(self) -> None:
        """Stop a parent that is stuck loading (or broken)."""
        self.close()
        if not self.exited:
            try:
                os.kill(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def reap(self) -> str:
        """Wait for the parent to exit (start-up only: the master's loop reaps with the workers); how it ended."""
        try:
            _pid, status = os.waitpid(self.pid, 0)
        except ChildProcessError:
            return "is gone"
        self.exited = True
        if os.WIFSIGNALED(status):
            return f"was killed by {signal.Signals(os.WTERMSIG(status)).name}"
        return f"exited with status {os.WEXITSTATUS(status)}"


def _reopen_log_files(signum: int, frame: object) -> None:
    from expertd.logfile import reopen_log_files

    try:
        reopen_log_files()
    except OSError:
        pass  # the master logs why; workers forked from here keep the old file until the next USR1


class _Parent:
    """Inside the generation's parent process: load, report, then fork workers until told to stop."""

    def __init__(self, number: int, config: Config, control: socket.socket, scoreboard: Scoreboard,
                 metrics: Metrics, master_pid: int) -> None:
        self.number = number
        self.config = config
        self.control = control
        self.scoreboard = scoreboard
        self.metrics = metrics
        self.master_pid = master_pid
        self._last_keepalive = 0.0

    def run(self) -> int:
        from expertd.loader import load_experts
        from expertd.notify import set_title
        from expertd.runtimes import quiet_native_logs

        # A load that never returns must not outlive the master (closing the control socket cannot reach it).
        _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != self.master_pid:
            return 1  # the master died before the line above
        for sig in (signal.SIGINT, signal.SIGHUP, signal.SIGTTIN, signal.SIGTTOU, signal.SIGUSR2):
            signal.signal(sig, signal.SIG_IGN)  # the master's words, not this process's
        # USR1 (logrotate): the workers forked from here later must write to the new log file.
        signal.signal(signal.SIGUSR1, _reopen_log_files)
        for sig in (signal.SIGTERM, signal.SIGQUIT, signal.SIGCHLD):
            signal.signal(sig, signal.SIG_DFL)
        set_title(f"expertd: generation {self.number} [{self.config.path}]")
        try:
            with quiet_native_logs(self.config.tf_log_level in ("warning", "error")):
                experts = load_experts(self.config, keepalive=self._keepalive)
        except ExpertLoadError as exc:
            self._send(FAILED + str(exc).encode("utf-8", "replace")[:_MAX_FAILURE])
            return 3
        descriptions = {name: expert.describe() for name, expert in experts.items()}
        if self.config.firefly_routes:  # the master answers Firefly's GET / from each function's doc and parameters
            for name, expert in experts.items():
                descriptions[name]["firefly"] = firefly.metadata(expert)
        described = ipc.write_memfd("expertd-experts", msgpack.packb(descriptions))
        try:
            socket.send_fds(self.control, [LOADED], [described])
        except OSError:
            return 0  # the master is gone
        finally:
            os.close(described)
        # Everything loaded so far is shared with the workers; freezing it keeps the
        # collector from touching (and so copying) those pages in every worker.
        gc.freeze()
        while True:
            try:
                data, fds, _flags, _addr = socket.recv_fds(self.control, _MAX_MESSAGE, 1)
            except OSError:
                return 0
            if not data:
                return 0  # the master retired this generation, or is gone
            if data[:1] != SPAWN or not fds:
                for fd in fds:
                    os.close(fd)
                continue
            request = msgpack.unpackb(data[1:])
            self._fork_worker(request, fds[0], experts)

    def _fork_worker(self, request: dict, channel_fd: int, experts: dict) -> None:
        from expertd.worker import worker_main

        # (An expert may have set SIGCHLD to SIG_IGN, and waitpid below would then fail.)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        read_end, write_end = os.pipe()
        try:
            intermediate = os.fork()
        except OSError as exc:
            os.close(channel_fd)
            os.close(read_end)
            os.close(write_end)
            self._send(SPAWN_FAILED + exc.strerror.encode())
            return
        if intermediate == 0:
            try:
                os.close(read_end)
                worker = os.fork()
                if worker == 0:
                    os.close(write_end)
                    # Start only once adopted by the master (this process's parent is exiting): the
                    # worker's parent-death signal must be about the master, not about that exit.
                    adopted_by = time.monotonic() + _SPAWN_TIMEOUT
                    while os.getppid() != self.master_pid and time.monotonic() < adopted_by:
                        time.sleep(0.0002)
                    channel = socket.socket(fileno=channel_fd)
                    self.metrics.index = dict(request["index"])  # the master's, with this generation's experts
                    worker_main(request["number"], self.config, experts, channel, [self.control.fileno()],
                                self.scoreboard, request["board"], self.metrics.recorder(request["board"]),
                                master_pid=self.master_pid)
                os.write(write_end, _PID.pack(worker))
            except BaseException:
                os.write(write_end, _PID.pack(0))
            finally:
                os._exit(0)
        os.close(write_end)
        os.close(channel_fd)
        try:
            raw = os.read(read_end, _PID.size)
        finally:
            os.close(read_end)
        os.waitpid(intermediate, 0)
        pid = _PID.unpack(raw)[0] if len(raw) == _PID.size else 0
        self._send(SPAWNED + _PID.pack(pid) if pid else SPAWN_FAILED + b"the second fork failed")

    def _keepalive(self) -> None:
        now = time.monotonic()
        if now - self._last_keepalive >= 1.0:
            self._last_keepalive = now
            self._send(KEEPALIVE)

    def _send(self, message: bytes) -> None:
        try:
            self.control.send(message)
        except OSError:
            pass  # the master is gone: the next read ends this process
