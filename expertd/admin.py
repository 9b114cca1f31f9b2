"""The master's own answers: status, the experts list, health, metrics, and the control verbs.

Like gunicorn's ``ctl/handlers.py``, each verb returns a value and touches no
socket: :mod:`expertd.intake` reads the request and writes the reply, and
signals (TTIN, TTOU, HUP) reach the same verbs from the master.  Who may ask
what is decided here too: STATUS, LIST and the GET routes are open unless
``public_status = no``; RELOAD, STOP and SCALE need root, the daemon's user,
or control_uids / control_gids.

State owned here: the memory readings shared by status calls for a moment
(reading a process's smaps takes milliseconds) and the last status shared by
metrics scrapes.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from typing import Any

from expertd import __version__, firefly, http, protocol
from expertd.backoff import Quarantines
from expertd.connections import QUEUED
from expertd.errors import AccessDenied, BadRequest, UnknownExpert
from expertd.framing import READ_KINDS
from expertd.logs import Summary, Throttle
from expertd.metrics import Metrics
from expertd.pool import BOOTING, LINGERING, Pool, WorkerSlot
from expertd.scoreboard import Scoreboard
from expertd.serving import Serving

log = logging.getLogger("expertd.master")

_METRICS_MEMORY_TTL = 5.0
# STATUS shares memory readings for this long: reading a process's smaps takes milliseconds, and a
# client looping STATUS would otherwise keep the master reading them instead of serving.
_STATUS_MEMORY_TTL = 1.0


class Admin:
    """Answers the master's own requests with values, from the parts it reads."""

    def __init__(self, serving: Serving, pool: Pool, dispatcher: Any, table: Any, acceptor: Any, reloads: Any,
                 scoreboard: Scoreboard, metrics: Metrics, quarantines: Quarantines, throttle: Throttle,
                 summary: Summary, socket_path: Callable[[], str], stop: Callable[[str], None]) -> None:
        self.serving = serving
        self.pool = pool
        self.dispatcher = dispatcher
        self.table = table
        self.acceptor = acceptor
        self.reloads = reloads
        self.scoreboard = scoreboard
        self.metrics = metrics
        self.quarantines = quarantines
        self.throttle = throttle
        self.summary = summary  # (its last interval's figures, which status shows)
        self.socket_path = socket_path
        self.stop = stop  # (reason): begin a graceful stop
        self._status_cache: tuple[float, dict] | None = None
        self._memory_readings: tuple[float, dict[int, dict]] = (0.0, {})  # (when, by pid)

    # ------------------------------------------------------------- who may
    def refusal(self, kind: int, uid: int, gid: int, groups: frozenset[int], pid: int) -> AccessDenied | None:
        """None if the peer may send this request; else the refusal (logged, rate-limited)."""
        access = self.serving.access()
        if kind in READ_KINDS:
            if access.reads(uid, gid, groups):
                return None
            setting = "public_status = no: only control_uids / control_gids, root and the daemon's user may read it"
        elif access.controls(uid, gid, groups):
            return None
        else:
            setting = "control requests need root, the daemon's user, or control_uids / control_gids"
        name = protocol.KIND_NAMES.get(kind, f"0x{kind:02x}")
        self.throttle.warning("control: refused %s from uid %d (pid %d): not in control_uids or control_gids",
                              name, uid, pid, cause=("control refused", uid))
        return AccessDenied(f"uid {uid} may not send {name} to this expertd ({setting}); "
                            f"ask for uid {uid} to be added to control_uids")

    # ------------------------------------------------------------- verbs
    def command(self, kind: int, body: object, uid: int, pid: int) -> tuple[object, Callable[[], None] | None]:
        """STATUS, LIST, SCALE or STOP (the caller checked :meth:`refusal`): the reply, and what to do once it
        is sent.  BadRequest if the body is wrong."""
        if kind == protocol.STATUS:
            return self.status(), None
        if kind == protocol.LIST:
            return self.listing(), None
        if kind == protocol.SCALE:
            if not isinstance(body, int) or isinstance(body, bool) or not 1 <= body <= self.pool.max_workers:
                raise BadRequest(f"workers N needs a whole number 1 ≤ N ≤ {self.pool.max_workers}")
            log.info("control: SCALE to %d workers from uid %d (pid %d)", body, uid, pid)
            self.scale(body)
            return {"workers": self.serving.config.workers}, None
        log.info("control: STOP from uid %d (pid %d)", uid, pid)
        return {"stopping": True, "pid": os.getpid()}, lambda: self.stop("expertctl stop")

    def reload(self, waiter: tuple | None = None) -> None:
        """RELOAD (answered later, with the load's outcome) or HUP."""
        self.reloads.reload(waiter)

    def scale(self, workers: int) -> None:
        """Run ``workers`` workers from now on (TTIN/TTOU, expertctl workers N)."""
        workers = max(1, workers)
        config = self.serving.config
        if workers == config.workers:
            return
        log.info("scaling from %d to %d workers", config.workers, workers)
        config.workers = workers
        self.pool.changed()
        reloads = self.reloads
        if reloads.loading is not None:
            reloads.loading.config.workers = workers  # the operator's word holds for the generation loading too
        if reloads.replacing is not None:
            reloads.replacing.config.workers = workers  # ... and for the old one, should the new one fail to start
        for slot in self.pool.retire_order(workers):
            self.dispatcher.retire(slot, "scaled down")
        reloads.worker_ready()  # fewer workers to wait for, during start-up or a reload

    def listing(self) -> list[dict]:
        """LIST and GET /experts: each expert's description, then each named pipeline's.

        A pipeline's entry: ``{"name", "pipeline": true, "stages": [[expert, ...], ...], "on_error",
        "timeout"}``, its stages expanded (experts only) and its timeout in seconds (its own, or the sum
        over its stages).
        """
        config = self.serving.config
        entries = list(self.serving.experts.values())
        for name, spec in config.pipelines.items():
            try:
                timeout: float | None = config.plan(name).timeout
            except (BadRequest, UnknownExpert):  # (validated at load: not expected)
                timeout = spec.timeout
            entries.append({"name": name, "pipeline": True, "stages": [list(stage) for stage in spec.stages],
                            "on_error": spec.on_error, "timeout": timeout})
        return entries

    # ------------------------------------------------------------- HTTP GETs
    def http_get(self, route: str, uid: int, gid: int, groups: frozenset[int], pid: int,
                 tcp: bool) -> tuple[int, bytes, str]:
        """GET /health, /experts or /metrics, Firefly's GET / and preflights: (status, body, content type);
        AccessDenied if the peer may not."""
        if route == firefly.PREFLIGHT:  # (it says nothing, and a browser's carries no credentials)
            return 200, b"", firefly.PREFLIGHT_TYPE
        config = self.serving.config
        public = tcp and route in http.PUBLIC_HEALTH_ROUTES and config.public_health
        # Firefly's GET / with the token (checked before this): firefly.Client reads it before its first call,
        # and it lists only what the token's holder may call anyway.
        public = public or (tcp and route == firefly.INDEX and bool(config.token))
        if not (public or self.serving.access().reads(uid, gid, groups)):
            path = "/" if route == firefly.INDEX else f"/{route}"
            self.throttle.warning("refused GET %s from uid %d (pid %d): public_status = no", path, uid, pid,
                                  cause=("control refused", uid))
            who = "connections on http_listen" if tcp else f"uid {uid}"
            raise AccessDenied(f"{who} may not read {'GET /' if route == firefly.INDEX else path} (public_status = "
                               "no: only control_uids / control_gids, root and the daemon's user may)")
        if route == "health":
            return self.health()
        if route == "experts":
            return 200, http.dumps(self.listing()), http.JSON_TYPE
        if route == firefly.INDEX:
            return 200, http.dumps(firefly.index(self.serving.experts, self.serving.config.firefly)), http.JSON_TYPE
        return 200, self.metrics_text().encode("utf-8"), http.METRICS_TYPE

    def health(self) -> tuple[int, bytes, str]:
        ready = self.pool.ready_count()
        stopping = self.serving.stopping
        healthy = ready > 0 and not stopping
        return 200 if healthy else 503, http.dumps({
            "status": "ok" if healthy else "unavailable", "workers_ready": ready,
            "workers_wanted": self.serving.config.workers, "generation": self.serving.generation,
            "stopping": stopping}), http.JSON_TYPE

    def metrics_text(self) -> str:
        # Reading every process's smaps takes milliseconds: scrapes share a reading for a few seconds.
        now = time.monotonic()
        if self._status_cache is None or now - self._status_cache[0] > _METRICS_MEMORY_TTL:
            self._status_cache = (now, self.status())
        status = self._status_cache[1]
        states = {"booting": 0, "idle": 0, "busy": 0, "retiring": 0}
        for slot in self.pool.workers.values():
            states[self.worker_state(slot)] += 1
        memory = {("workers", kind): status["memory"][f"workers_{kind}"] for kind in ("rss", "pss", "uss")}
        memory.update({("master", kind): status["master"].get(kind, 0) for kind in ("rss", "pss", "uss")})
        return self.metrics.render(self.pool.boards(), {
            "batches": self.dispatcher.batcher.figures,
            "workers": states, "workers_wanted": self.serving.config.workers, "connections": len(self.table),
            "queued": sum(1 for conn in self.dispatcher.queue if conn.state == QUEUED),
            "generation": self.serving.generation,
            "memory": memory, "uptime": time.time() - self.serving.started_at, "version": __version__,
        })

    # ------------------------------------------------------------- status
    def worker_state(self, slot: WorkerSlot) -> str:
        """As status and metrics show it: a lingering worker is busy while it serves, idle while it waits."""
        if slot.leaving is not None:
            return "retiring"
        if slot.state == BOOTING:
            return "booting"
        if slot.state == LINGERING:
            return "busy" if self.scoreboard.read(slot.board)[0] else "idle"
        return "busy" if slot.conn is not None else "idle"

    def status(self) -> dict:
        """What ``expertctl status`` shows: the master, every worker, memory shared and private."""
        import psutil

        now = time.monotonic()
        serving, pool, reloads = self.serving, self.pool, self.reloads
        workers, totals = [], {"rss": 0, "pss": 0, "uss": 0}
        for slot in sorted(pool.workers.values(), key=lambda s: (s.generation, s.number)):
            memory = self._memory_reading(slot.pid, now)
            for key in totals:
                totals[key] += memory.get(key, 0)
            workers.append({
                "number": slot.number, "pid": slot.pid, "generation": slot.generation,
                "state": self.worker_state(slot),
                "requests": max(slot.requests, self.scoreboard.requests(slot.board)),
                "age_s": round(now - slot.born, 1),
                "last_request_age_s": None if slot.last_done is None else round(now - slot.last_done, 3),
                "handed_ahead": bool(slot.upcoming),  # connections handed ahead wait in its channel
                **memory,
            })
        parents, others = [], {"rss": 0, "pss": 0, "uss": 0}  # the generations' parents, then the master
        for parent in sorted(reloads.parents.values(), key=lambda p: p.number):
            memory = self._memory_reading(parent.pid, now)
            for key in others:
                others[key] += memory.get(key, 0)
            parents.append({"generation": parent.number, "pid": parent.pid, "state": parent.state,
                            "age_s": round(now - parent.started, 1), **memory})
        master = self._memory_reading(os.getpid(), now)
        for key in others:
            others[key] += master.get(key, 0)
        config = serving.config
        limit = self.acceptor.connection_limit()
        return {
            "pid": os.getpid(), "version": __version__, "config": config.path,
            "socket": self.socket_path(),
            "http_listen": "{}:{}".format(*config.http_listen) if config.http_listen else None,
            "uptime_s": round(time.time() - serving.started_at, 1), "generation": serving.generation,
            "experts": sorted(serving.experts), "workers_wanted": config.workers,
            # The log summary's figures for its last interval (from the counters /metrics shows); None before
            # the first interval ends, or with log_summary_interval = off.
            "last_interval": self.summary.figures,
            "requests": serving.requests_served + sum(  # what lingering workers served and have not reported yet
                max(0, self.scoreboard.requests(s.board) - s.requests) for s in pool.workers.values()
                if s.state == LINGERING),
            "connections": len(self.table),
            "max_connections": limit,
            "max_connections_per_uid": self.acceptor.per_uid_limit(limit),
            "last_reload": reloads.last_reload, "reloading": reloads.reloading,
            "workers": workers, "generation_parents": parents, "master": master,
            "quarantined": self.quarantines.current(),
            # Batched experts: batches handed out, calls in them, mean size, queueing delay, sizes seen.
            "batches": {name: figures.summary() for name, figures in sorted(self.dispatcher.batcher.figures.items())},
            # Pipelines that were asked for: requests, their outcomes, mean time.
            "pipelines": self.metrics.pipelines(pool.boards()),
            "memory": {
                "workers_rss": totals["rss"], "workers_pss": totals["pss"], "workers_uss": totals["uss"],
                # Counted once across the master, the generations' parents and the workers: what the
                # group really costs.
                "total_pss": totals["pss"] + others["pss"],
                "private": totals["uss"] + others["uss"],
                "shared": totals["pss"] + others["pss"] - totals["uss"] - others["uss"],
            },
            "cpu_count": psutil.cpu_count(),
        }

    def _memory_reading(self, pid: int, now: float) -> dict:
        """Process ``pid``'s memory figures, read at most once per _STATUS_MEMORY_TTL."""
        taken, readings = self._memory_readings
        if now - taken > _STATUS_MEMORY_TTL:
            readings = {}  # (also forgets the pids of workers gone since)
            self._memory_readings = (now, readings)
        memory = readings.get(pid)
        if memory is None:
            memory = readings[pid] = _memory_of(pid)
        return memory


def _memory_of(pid: int) -> dict:
    import psutil

    try:
        info = psutil.Process(pid).memory_full_info()
    except (psutil.Error, OSError):
        return {}
    return {"rss": info.rss, "pss": info.pss, "uss": info.uss}
