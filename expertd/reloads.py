"""Generations, as the master sees them: loading, reloading, undoing a failed reload, the ready announcement.

A reload (HUP, ``expertctl reload``) re-reads the config here (pure parsing:
a typo fails the reload, not the master), then forks a new generation's parent
(:mod:`expertd.generation`), which loads the experts while the loop serves
with the old generation.  Once it reports LOADED, the new generation serves:
its workers start, and when all are ready the old ones retire, finishing what
they hold.  If the config or the experts fail to load, the load outlives
``reload_timeout``, or a new worker dies before it is ready, the old
generation keeps (or takes back) serving and the reason is logged, kept for
``status`` and told to ``expertctl reload``.

State owned here: the generation loading (if any), what a starting generation
replaces (to put back if it fails), every generation parent alive, a reload
asked for during another (run when that one ends) with its waiters, the last
reload's outcome, and whether the daemon has announced itself ready.
"""

from __future__ import annotations

import logging
import os
import select
import time
from collections.abc import Callable
from dataclasses import dataclass

from expertd import accesslog, protocol
from expertd.config import Config
from expertd.connections import WAITING, Connection, ConnectionTable
from expertd.errors import ConfigError
from expertd.generation import FAILED, KEEPALIVE, LOADED, RETIRED, SERVING, Generation
from expertd.notify import Notifier
from expertd.pool import Pool, describe_status
from expertd.serving import Serving
from expertd.text import plural

log = logging.getLogger("expertd.master")

_PARENT_RETRY = 10.0  # seconds between attempts to replace a lost generation parent whose replacement failed

Waiter = tuple[Connection, int]  # a RELOAD request (its connection and request id), answered with the outcome


@dataclass
class _Replaced:
    """What a loaded generation starting its workers replaces, to put back if they fail."""

    config: Config
    experts: dict[str, dict]
    parent: Generation | None
    generation: int


class Reloads:
    """Loads generations of experts and switches the daemon from one to the next."""

    def __init__(self, serving: Serving, pool: Pool, dispatcher: object, table: ConnectionTable, epoll: select.epoll,
                 notifier: Notifier, shared: tuple, own_fds: Callable[[], list[int]],
                 overrides: dict[str, str], on_first_ready: Callable[[], None],
                 on_start_failed: Callable[[str, str], None], on_reloaded: Callable[[], None],
                 start_parent: Callable[..., Generation] = Generation.start) -> None:
        self.serving = serving
        self.pool = pool
        self.dispatcher = dispatcher  # (its retire: old workers finish what they hold)
        self.table = table
        self.epoll = epoll
        self.notifier = notifier
        self.shared = shared  # the scoreboard and metrics every generation's workers write
        self.own_fds = own_fds  # the master's descriptors, which a generation's parent must not hold
        self.overrides = overrides  # command-line settings, kept across reloads
        self.on_first_ready = on_first_ready
        self.on_start_failed = on_start_failed  # (what to log, why it stops): the first generation cannot serve
        self.on_reloaded = on_reloaded  # a new generation serves (descriptors may have changed)
        self.start_parent = start_parent  # (number, config, shared, close_fds) -> Generation; tests pass a fake
        self.loading: Generation | None = None  # a generation whose parent is loading its experts
        self.replacing: _Replaced | None = None  # a loaded generation starting its workers: what it replaces
        self.parents: dict[int, Generation] = {}  # every generation parent alive, by pid
        self.by_control: dict[int, Generation] = {}  # a loading parent's control socket, watched by epoll
        self.pending = False  # a reload asked for while another ran: it runs when that one ends
        self._pending_waiters: list[Waiter] = []
        self._next_parent_try = 0.0
        self.last_reload: dict | None = None
        # Reloads begun so far: each reload's number is in its RELOAD reply and, once it ends, in last_reload,
        # so that `expertctl reload` can wait for the outcome of its own reload (expertd.cli).
        self.count = 0
        self.announced = False  # the first generation's workers are all ready (pidfile, READY=1)

    @property
    def reloading(self) -> bool:
        return self.loading is not None or self.replacing is not None

    # ----------------------------------------------------------- the first
    def load_first(self, keepalive: Callable[[], None] | None, interrupted: Callable[[], None]) -> None:
        """Load generation 1, waiting for it (start-up: no loop runs yet); ExpertLoadError if it fails."""
        parent = self._start(1, self.serving.config)
        try:
            self.serving.experts = parent.wait_loaded(keepalive, interrupted=interrupted)
        finally:
            if parent.exited or parent.state != SERVING:
                self.parents.pop(parent.pid, None)
        self.pool.parent = parent

    def _start(self, number: int, config: Config) -> Generation:
        """Fork the parent process that loads generation ``number`` (it holds none of the master's descriptors)."""
        own = self.own_fds() + list(self.by_control)
        own += [parent.control.fileno() for parent in self.parents.values() if parent.control.fileno() >= 0]
        parent = self.start_parent(number, config, self.shared, own)
        self.parents[parent.pid] = parent
        log.debug("generation %d loading in process %d", number, parent.pid)
        return parent

    # ----------------------------------------------------------- reloading
    def reload(self, waiter: Waiter | None = None) -> None:
        """HUP or RELOAD: re-read the config and load the experts into a new generation.

        A reload asked for while one runs is remembered (once) and runs when
        that one ends, so that an edit made after the first HUP is not lost.
        ``waiter``, a RELOAD request, is answered when its load ends.
        """
        if waiter is not None:
            self._pending_waiters.append(waiter)
        if self.serving.stopping:
            return
        if not self.announced or self.reloading:
            if not self.pending:
                log.info("reload requested %s; it runs when that ends",
                         "while one is in progress" if self.announced else "before the daemon finished starting")
            self.pending = True
            return
        self._begin()

    def _run_pending(self) -> None:
        if self.pending and not self.reloading and self.announced and not self.serving.stopping:
            self._begin()

    def _begin(self) -> None:
        from expertd.config import load_config

        self.pending = False
        self.count += 1
        waiters, self._pending_waiters = self._pending_waiters, []
        current = self.serving.config
        self.notifier.reloading()
        log.info("reloading %s", current.path)
        try:
            config = load_config(current.path, self.overrides)
        except ConfigError as exc:
            self._failed(str(exc), waiters)
            return
        if config.socket != current.socket:
            log.warning("the socket path changed to %s; that takes a restart, keeping %s", config.socket,
                        current.socket)
            config.socket = current.socket
        if config.http_listen != current.http_listen:
            log.warning("http_listen changed; that takes a restart, keeping the listener in force")
            config.http_listen = current.http_listen
        if current.token and not config.token:  # (a slip must not open the listener to whoever reaches it)
            log.warning("the new config sets no token; removing it takes a restart, keeping the token in force")
            config.token = current.token
        elif config.token != current.token:  # rotated (token_file read again): in force once the generation serves
            log.info("the HTTP token changed: the new one applies once generation %d serves",
                     self.serving.generation + 1)
        try:
            loading = self._start(self.serving.generation + 1, config)
        except OSError as exc:
            self._failed(f"cannot start a process to load the new generation: {exc.strerror}", waiters)
            return
        loading.waiters = waiters  # type: ignore[assignment]
        self.loading = loading
        self.by_control[loading.control.fileno()] = loading
        self.epoll.register(loading.control.fileno(), select.EPOLLIN)

    def read(self, loading: Generation) -> None:
        """Reports of a parent loading its generation: keep-alives, then LOADED or FAILED."""
        while loading is self.loading:
            report = loading.receive()
            if report is None:
                return
            op, value = report
            if op == KEEPALIVE:
                self.notifier.keep_waiting()  # preparing a model: systemd waits on
            elif op == LOADED:
                self._loaded(loading)
            elif op == FAILED:
                self._load_failed(loading, str(value))
            else:  # its end closed: it exited, and its exit status (reaped next) says how
                self._stop_watching(loading)
                return

    def _stop_watching(self, parent: Generation) -> None:
        if self.by_control.pop(parent.control.fileno(), None) is not None:
            self.epoll.unregister(parent.control.fileno())

    def _loaded(self, loading: Generation) -> None:
        serving = self.serving
        self._stop_watching(loading)
        self.loading = None
        self.replacing = _Replaced(serving.config, serving.experts, self.pool.parent, serving.generation)
        serving.config, serving.experts, self.pool.parent = loading.config, loading.experts, loading
        metrics = self.shared[1]
        for name in serving.experts:
            metrics.add_expert(name)  # before the new generation forks: its workers count it
        for name in serving.config.pipelines:
            metrics.add_pipeline(name)
        serving.generation = loading.number
        self.pool.changed()
        log.info("generation %d loaded (%d experts) in %.1fs; starting %d workers", serving.generation,
                 len(serving.experts), time.monotonic() - loading.started, serving.config.workers)
        self._answer(loading.waiters, {"generation": serving.generation, "reloading": True,  # type: ignore[arg-type]
                                       "last_reload": self.last_reload, "reload": self.count})

    def _load_failed(self, loading: Generation, reason: str) -> None:
        if loading is not self.loading:
            return
        self._stop_watching(loading)
        self.loading = None
        loading.kill()  # it may be stuck in an import: nothing it holds is needed
        self._failed(reason, loading.waiters)  # type: ignore[arg-type]

    def worker_ready(self) -> None:
        """A worker is ready: once the serving generation's all are, announce it, or finish the reload."""
        if self.serving.stopping:
            return
        ready = sum(1 for slot in self.pool.current() if slot.ready_at is not None)
        if ready < self.serving.config.workers:
            return
        status = f"{plural(ready, 'worker')} ready, generation {self.serving.generation}"
        if self.replacing is not None:
            self._finish()
            self.notifier.ready(status)
        elif not self.announced:
            self.announced = True
            log.info("expertd ready: %d workers serving %s", ready, ", ".join(sorted(self.serving.experts)))
            self.notifier.ready(status)
            self.on_first_ready()
            self._run_pending()  # one asked for while starting

    def _finish(self) -> None:
        assert self.replacing is not None
        generation = self.serving.generation
        old = [slot for slot in self.pool.workers.values() if slot.generation < generation]
        for slot in old:
            self.dispatcher.retire(slot, f"replaced by generation {generation}")  # type: ignore[attr-defined]
        saved, self.replacing = self.replacing, None
        if saved.parent is not None:
            saved.parent.close()  # it forks no more workers: it exits, and its modules and models with it
        self.last_reload = {"ok": True, "at": time.time(), "generation": generation, "error": None,
                            "reload": self.count}
        self.on_reloaded()
        log.info("reload done: generation %d serving; %d old workers retiring", generation, len(old))
        self._run_pending()

    def abort(self, reason: str) -> None:
        """A new generation's worker failed before it was ready: the old generation serves again."""
        assert self.replacing is not None
        serving = self.serving
        saved, self.replacing = self.replacing, None
        for slot in [s for s in self.pool.workers.values() if s.generation == serving.generation]:
            self.dispatcher.retire(slot, "reload aborted")  # type: ignore[attr-defined]
        if self.pool.parent is not None:
            self.pool.parent.kill()
        serving.config, serving.experts, self.pool.parent, serving.generation = (
            saved.config, saved.experts, saved.parent, saved.generation)
        self.pool.changed()
        self._failed(reason)

    def _failed(self, reason: str, waiters: list[Waiter] = ()) -> None:  # type: ignore[assignment]
        log.error("reload failed; generation %d keeps serving: %s", self.serving.generation, reason)
        self.last_reload = {"ok": False, "at": time.time(), "generation": self.serving.generation, "error": reason,
                            "reload": self.count}
        self.notifier.ready(f"reload failed: {reason}"[:200])
        self._answer(waiters, {"generation": self.serving.generation, "reloading": False,
                               "last_reload": self.last_reload, "reload": self.count})
        self._run_pending()

    def _answer(self, waiters: list[Waiter], reply: dict) -> None:
        for conn, request_id in waiters:
            if conn.state != WAITING:
                continue  # closed meanwhile
            self.table.rest(conn, self.serving.now)
            frame = protocol.encode_frame(protocol.RESULT, request_id, protocol.pack(reply))
            if accesslog.LOG is not None:
                self.table.log_access(conn, accesslog.msgpack_id(conn.conn_id, request_id),
                                      "ok", frame, target=protocol.KIND_LABELS[protocol.RELOAD])
            self.table.answer(conn, frame)

    # ----------------------------------------------------------- parents
    def pop_parent(self, pid: int) -> Generation | None:
        return self.parents.pop(pid, None)

    def parent_exited(self, parent: Generation, status: int) -> None:
        parent.exited = True
        self.pool.changed()  # (if it was the serving generation's, no worker can be forked now)
        how = describe_status(status)
        if parent is self.loading:
            self.read(parent)  # its last words come first: FAILED, or LOADED just before it died
            if parent is self.loading:
                self._load_failed(parent, f"the process loading generation {parent.number} {how}")
        if parent is self.pool.parent and parent.state != RETIRED and not self.serving.stopping:
            self.replace_parent(f"generation {parent.number}'s parent process {how}")
        elif parent is not self.pool.parent:
            log.debug("generation %d's parent (pid %d) %s", parent.number, parent.pid, how)
        if parent.control.fileno() >= 0:
            self._stop_watching(parent)
            parent.close()

    def replace_parent(self, reason: str) -> None:
        """The serving generation's parent is gone or stuck: load the config again to get a new one."""
        parent = self.pool.parent
        if parent is None or parent.state == RETIRED or self.serving.stopping:
            return
        parent.kill()
        self.pool.changed()
        if not self.announced:  # starting: there is no generation to fall back on
            self.on_start_failed(f"{reason} before the workers were ready", "the experts' process failed")
        elif self.replacing is not None:  # a new generation starting its workers: the old one takes over again
            self.abort(reason)
        else:
            log.error("%s; loading the generation again to fork its workers", reason)
            self.reload()

    def retry_lost_parent(self, now: float) -> None:
        """The serving generation has no parent to fork its workers: load it again now and then (the
        workers still alive serve meanwhile)."""
        if not self.reloading and self.announced and now >= self._next_parent_try:
            self._next_parent_try = now + _PARENT_RETRY
            log.error("generation %d has no parent process to fork its workers; loading it again",
                      self.serving.generation)
            self.reload()

    def expire(self, now: float) -> None:
        loading = self.loading
        if loading is not None and now > loading.deadline:
            self._load_failed(loading, (
                f"loading generation {loading.number} took longer than reload_timeout "
                f"({loading.config.reload_timeout:g}s) and was abandoned; find what hangs at import or in a "
                "before_fork hook, or raise reload_timeout"))

    def kill_all(self) -> None:
        """Stopping: every generation parent still alive is killed and reaped (they hold nothing to save:
        loaded experts, a load in progress)."""
        for parent in self.parents.values():
            if parent.exited:
                continue
            parent.kill()
            try:
                os.waitpid(parent.pid, 0)
            except ChildProcessError:
                pass
        self.parents.clear()

    def stop(self) -> None:
        """The daemon stops: a load in progress is abandoned."""
        if self.loading is not None:
            self._stop_watching(self.loading)
            self.loading.kill()
            self.loading = None
