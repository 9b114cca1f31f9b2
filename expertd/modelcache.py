"""Prepared models on disk: the cache's layout, its key, its lock, and the child process that fills it.

A model expert's file is prepared once for the serving runtime (see
:mod:`expertd.prepare`) and kept under the ``model_cache`` directory::

    CACHE/KEY/manifest.json      what was prepared: runtime, inputs, outputs, warnings
    CACHE/KEY/model.tflite       the converted model (LiteRT runtime), or
    CACHE/KEY/graph.pb, graph.json, weights.bin
                                 the TensorFlow fallback: a frozen graph, its weights mapped by workers
    CACHE/KEY/saved_model/       the model as saved (the last resort, for a graph that cannot be frozen)
    CACHE/KEY/xnnpack.cache      XNNPACK's packed weights, mapped read-only by every worker
    CACHE/KEY/reference.npz      inputs and the original model's outputs, for the correctness guard
    CACHE/KEY.lock               held while KEY is being prepared
    CACHE/.hashes/               model files' content hashes by file identity (a restart reads no model)

KEY is the SHA-256 of the model's content (every file of a SavedModel
directory) with the preparation format and runtime versions, so a changed
model, a new expertd or a new runtime gets a new entry and an old entry is
never reused for them.  An entry appears whole or not at all: it is prepared
in a temporary directory beside it and renamed into place.  Two daemons that
need the same entry at once take turns on the lock; the second finds the
entry ready.

This module owns nothing in memory: the state is the files.  It runs in the
master and never imports TensorFlow (preparation starts TensorFlow's runtime,
which must not run in the master: docs/experts.md); the work is done by
``python -m expertd.prepare`` in a child process.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib.util import find_spec
from typing import Any

from expertd.errors import ExpertLoadError
from expertd.runtimes import native_logs_shown

log = logging.getLogger("expertd.modelcache")

FORMAT = 2  # bump when prepare's output changes: old entries are then left alone
MODEL_SUFFIXES = (".keras", ".h5", ".tflite")
MANIFEST = "manifest.json"
_CHUNK = 1 << 20


@dataclass(frozen=True)
class Prepared:
    """A model's cache entry, ready for workers to load."""

    source: str  # the model as configured
    directory: str  # its cache entry
    manifest: dict[str, Any]

    @property
    def runtime(self) -> str:
        return self.manifest["runtime"]

    def path(self, name: str) -> str:
        return os.path.join(self.directory, name)


def cache_directory(setting: str) -> str:
    """The cache directory: the ``model_cache`` setting, else systemd's CacheDirectory=, else ~/.cache/expertd."""
    if setting:
        return setting
    systemd = os.environ.get("CACHE_DIRECTORY", "").split(":")[0]
    if systemd:
        return systemd
    return os.path.join(os.path.expanduser("~"), ".cache", "expertd")


def model_kind(source: str) -> str:
    """``keras``, ``saved_model`` or ``tflite``; ValueError with what to do for anything else."""
    if os.path.isdir(source):
        if os.path.isfile(os.path.join(source, "saved_model.pb")):
            return "saved_model"
        raise ValueError(f"{source} is a directory without saved_model.pb; give a SavedModel directory "
                         "(model.export(...) or tf.saved_model.save) or a model file")
    if not os.path.exists(source):
        raise ValueError(f"no model at {source}; check the path (relative to the config file in a config, to "
                         "the module's file in Model())")
    suffix = os.path.splitext(source)[1].lower()
    if suffix not in MODEL_SUFFIXES:
        raise ValueError(f"{source}: unknown model format {suffix or '(no suffix)'!r}; "
                         "use a .keras or .h5 file, a .tflite file or a SavedModel directory")
    return "tflite" if suffix == ".tflite" else "keras"


def content_hash(source: str, cache: str | None = None) -> str:
    """SHA-256 of a model file, or of every file in a SavedModel directory (names and contents).

    With ``cache``, the hash is remembered under CACHE/.hashes with the
    identity of the file, or of every file and directory of a SavedModel
    (device, inode, size, mtime and ctime, as git's index does), so a restart
    does not read a large unchanged model again; any write, rename or
    replacement changes a ctime and forces a new hash.  (The preparing child
    hashes the copy it prepares from again, so a file that changes while it is
    read can never be cached under the wrong hash.)
    """
    if cache is None:
        return _content_hash(source)
    identity = _identity(source)
    memo = os.path.join(cache, ".hashes", hashlib.sha256(os.fsencode(source)).hexdigest()[:32])
    try:
        with open(memo, encoding="utf-8") as handle:
            remembered = json.load(handle)
        if remembered.get("identity") == identity and isinstance(remembered.get("sha256"), str):
            return remembered["sha256"]
    except (OSError, ValueError, AttributeError):
        pass
    digest = _content_hash(source)
    if _identity(source) == identity:  # unchanged while it was read
        try:
            os.makedirs(os.path.dirname(memo), exist_ok=True)
            with tempfile.NamedTemporaryFile("w", dir=os.path.dirname(memo), delete=False, encoding="utf-8") as out:
                json.dump({"path": source, "identity": identity, "sha256": digest}, out)
            os.replace(out.name, memo)
        except OSError:
            pass  # a read-only cache only costs the next start a hash
    return digest


def _identity(source: str) -> list:
    """What changes whenever a file (or any file or directory in a SavedModel directory) is written or replaced."""
    def of(path: str) -> list[int]:
        status = os.stat(path)
        return [status.st_dev, status.st_ino, status.st_size, status.st_mtime_ns, status.st_ctime_ns]

    if not os.path.isdir(source):
        return of(source)
    found: list = []
    for root, dirs, files in os.walk(source):
        dirs.sort()
        found += [[os.path.relpath(os.path.join(root, name), source), *of(os.path.join(root, name))]
                  for name in [".", *sorted(files)]]
    return found


def _content_hash(source: str) -> str:
    digest = hashlib.sha256()
    if os.path.isdir(source):
        for root, dirs, files in os.walk(source):
            dirs.sort()
            for name in sorted(files):
                path = os.path.join(root, name)
                digest.update(os.path.relpath(path, source).encode() + b"\0")
                _hash_file(digest, path)
    else:
        _hash_file(digest, source)
    return digest.hexdigest()


def _hash_file(digest: Any, path: str) -> None:
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)


def _versions() -> str:
    """The installed TensorFlow and LiteRT, by their dist-info directories' names (e.g. tensorflow_cpu-2.21.0).

    Read beside each package without importing it, and without importlib.metadata
    (50 ms to import, a fifth of a warm start).
    """
    found = []
    runtimes = (("tensorflow", ("tensorflow_cpu-", "tensorflow-")), ("ai_edge_litert", ("ai_edge_litert-",)))
    for package, distributions in runtimes:
        spec = find_spec(package)
        if spec is None or not spec.origin:
            continue
        site = os.path.dirname(os.path.dirname(spec.origin))
        try:
            names = os.listdir(site)
        except OSError:
            continue
        found += sorted(name[: -len(".dist-info")] for name in names
                        if name.endswith(".dist-info") and name.startswith(distributions))
    return ",".join(found)


def entry_key(sha256: str) -> str:
    """The entry's name: the content hash, tied to the preparation format and runtime versions."""
    tied = hashlib.sha256(f"{FORMAT}|{_versions()}".encode()).hexdigest()[:8]
    return f"{sha256[:32]}-{tied}"


def read_manifest(directory: str) -> dict[str, Any] | None:
    try:
        with open(os.path.join(directory, MANIFEST), encoding="utf-8") as handle:
            manifest = json.load(handle)
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) and manifest.get("format") == FORMAT else None


def ensure_prepared(source: str, cache: str, timeout: float, where: str, *,
                    keepalive: Callable[[], None] | None = None, pythonpath: Sequence[str] = (),
                    imports: Sequence[str] = ()) -> Prepared:
    """The cache entry for ``source``, prepared first (in a child process) if there is none yet.

    ``where`` starts every error message (config file, section, key).
    ``keepalive`` is called about once a second while a preparation runs (the
    master pings systemd's watchdog with it).  ``pythonpath`` and ``imports``
    reach the preparing child, so that a Keras model's custom layers, which
    the experts' modules register, can be loaded there.
    """
    try:
        model_kind(source)
        sha256 = content_hash(source, cache)
    except ValueError as exc:
        raise ExpertLoadError(f"{where}: {exc}") from None
    except OSError as exc:
        raise ExpertLoadError(f"{where}: cannot read {source}: {exc.strerror or exc}") from None
    entry = os.path.join(cache, entry_key(sha256))
    manifest = _trusted_manifest(entry, where)
    if manifest is not None:
        return Prepared(source, entry, manifest)
    keepalive = _at_most_once_a_second(keepalive)
    try:
        os.makedirs(cache, mode=0o755, exist_ok=True)
        # (Read-only is enough for flock: a lock file left by another user, e.g. root's --check, still works.)
        lock = os.open(entry + ".lock", os.O_RDONLY | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        raise ExpertLoadError(
            f"{where}: cannot use the model cache {cache}: {exc.strerror or exc}; set model_cache to a directory "
            "this user can write"
        ) from None
    try:
        _lock(lock, timeout, where, entry, keepalive)
        manifest = _trusted_manifest(entry, where)  # another daemon may have prepared it while we waited
        if manifest is None:
            with native_logs_shown():  # progress lines go out now, even while the loader quiets native logs
                _prepare(source, sha256, cache, entry, timeout, where, keepalive, pythonpath, imports)
            manifest = _trusted_manifest(entry, where)
            if manifest is None:
                raise ExpertLoadError(f"{where}: preparing {source} left no manifest in {entry}")
    except OSError as exc:
        raise ExpertLoadError(f"{where}: preparing {source} in {cache} failed: {exc.strerror or exc} "
                              f"({getattr(exc, 'filename', None) or cache})") from None
    finally:
        os.close(lock)  # (closing releases the lock)
    return Prepared(source, entry, manifest)


def _at_most_once_a_second(call: Callable[[], None] | None) -> Callable[[], None] | None:
    if call is None:
        return None
    last = 0.0

    def throttled() -> None:
        nonlocal last
        now = time.monotonic()
        if now - last >= 1.0:
            last = now
            call()

    return throttled


def _trusted_manifest(entry: str, where: str) -> dict[str, Any] | None:
    """The entry's manifest, if the entry is whole; refuses an entry another user could have written.

    Workers load what an entry holds (a model, and LiteRT and TensorFlow run
    it), so an entry must belong to this user or root and be writable by no
    one else.
    """
    try:
        status = os.stat(entry)
    except FileNotFoundError:
        return None
    if status.st_uid not in (os.geteuid(), 0) or status.st_mode & 0o022:
        why = (f"belongs to uid {status.st_uid}" if status.st_uid not in (os.geteuid(), 0)
               else f"is writable by others (mode {status.st_mode & 0o777:04o})")
        raise ExpertLoadError(
            f"{where}: the model cache entry {entry} {why}, and workers would run what it holds; use a model_cache "
            "that only this user (or root) can write"
        )
    return read_manifest(entry)


def _lock(fd: int, timeout: float, where: str, entry: str, keepalive: Callable[[], None] | None) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if time.monotonic() > deadline:
                raise ExpertLoadError(
                    f"{where}: another process has been preparing {entry} for over {timeout:g}s "
                    "(it holds the lock until it ends); wait for it, or stop it"
                ) from None
            if keepalive is not None:
                keepalive()
            time.sleep(0.1)


def _prepare(source: str, sha256: str, cache: str, entry: str, timeout: float, where: str,
             keepalive: Callable[[], None] | None, pythonpath: Sequence[str], imports: Sequence[str]) -> None:
    """Run the preparing child into a scratch directory and rename it into place (we hold the entry's lock)."""
    import subprocess  # (here: a warm start never needs it)

    for stale in os.listdir(cache):  # left by a preparation that was killed
        if stale.startswith(f".{os.path.basename(entry)}."):
            shutil.rmtree(os.path.join(cache, stale), ignore_errors=True)
    if os.path.lexists(entry):  # an entry without a whole manifest (someone deleted part of it)
        shutil.rmtree(entry)
    log.info("preparing %s for serving (first use of this content; the result is kept in %s)", source, entry)
    started = time.monotonic()
    scratch = tempfile.mkdtemp(prefix=f".{os.path.basename(entry)}.", dir=cache)
    command = [sys.executable, "-m", "expertd.prepare", source, scratch, "--sha256", sha256,
               "--parent", str(os.getpid())] + [f"--import={name}" for name in imports]
    env = {key: value for key, value in os.environ.items() if key not in ("NOTIFY_SOCKET", "LISTEN_FDS")}
    env["TF_CPP_MIN_LOG_LEVEL"] = os.environ.get("TF_CPP_MIN_LOG_LEVEL", "2")
    env["PYTHONSAFEPATH"] = "1"  # (the child must not import from whatever directory it starts in)
    env["PYTHONPATH"] = os.pathsep.join([*pythonpath, *filter(None, [os.environ.get("PYTHONPATH")])])
    try:
        with tempfile.TemporaryFile() as errors:
            child = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=errors,
                                     env=env, cwd=scratch)
            deadline = started + timeout
            while child.poll() is None:
                if time.monotonic() > deadline:
                    child.kill()
                    child.wait()
                    raise ExpertLoadError(
                        f"{where}: preparing {source} took over {timeout:g}s; raise prepare_timeout or check the model"
                    )
                if keepalive is not None:
                    keepalive()
                try:
                    child.wait(1.0)
                except subprocess.TimeoutExpired:
                    pass
            errors.seek(0)
            if child.returncode != 0:
                raise ExpertLoadError(f"{where}: preparing {source} failed: {_last_error(errors.read())}")
        for root, _dirs, files in os.walk(scratch):  # workers only read: nothing in an entry is written again
            for name in files:
                os.chmod(os.path.join(root, name), 0o444)
        os.chmod(scratch, 0o755)
        os.rename(scratch, entry)
        log.info("prepared %s in %.1fs", source, time.monotonic() - started)
    finally:
        if os.path.exists(scratch):
            shutil.rmtree(scratch, ignore_errors=True)


def _last_error(stderr: bytes) -> str:
    """The child's one-line error (its last line that says ``error:``), else its last line."""
    lines = [line.strip() for line in stderr.decode("utf-8", "replace").splitlines() if line.strip()]
    for line in reversed(lines):
        if line.startswith("expertd.prepare: error: "):
            return line[len("expertd.prepare: error: "):]
    return lines[-1] if lines else "the preparing process exited without a message"
