"""Native runtimes that do not survive fork(): guards, per-worker threads, log noise.

TensorFlow's runtime (its thread pools and locks) and CUDA contexts are
per-process state that a forked child inherits in a broken form: TensorFlow
deadlocks in the child as soon as an op shards across its thread pool (see
docs/experts.md).  The master may import such libraries and read model files,
but must not start them.  This module

* detects, without starting anything, whether a runtime has started in the
  master (:func:`started_runtimes`), so the loader can name the import or
  hook that did it;
* applies the per-worker thread settings after fork, before the worker's own
  runtime starts (:func:`apply_worker_threads`);
* keeps TensorFlow's native start-up chatter off the log unless asked
  (:func:`quiet_native_logs`), and libraries' debug lines out of ``log_level =
  debug`` (:func:`quiet_library_loggers`).

Nothing here imports TensorFlow or torch: they are inspected only if the
experts already imported them.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import tempfile
import threading
from collections.abc import Iterator

# TF_CPP_MIN_LOG_LEVEL: 0 shows INFO, 1 hides INFO, 2 hides WARNING, 3 hides ERROR.
_TF_CPP_LEVEL = {"debug": "0", "info": "0", "warning": "1", "error": "2"}
_NATIVE_NOISE = re.compile(
    r"^(WARNING: All log messages before absl::InitializeLog\(\) is called are written to STDERR"
    r"|I\d{4} [\d:.]+ +\d+ [\w.]+:\d+\] .*"
    # LiteRT's start-up notices: accelerators it registers, the NPU support it looks for.
    r"|INFO: \[[\w./]+:\d+\] .*|INFO: Created TensorFlow Lite XNNPACK delegate for CPU\."
    r"|WARNING: \[npu_registry\.cc:\d+\] NPU accelerator could not be loaded.*)$"
)


def started_runtimes() -> list[str]:
    """Runtimes already started in this process that a forked child could not use."""
    found = []
    if "tensorflow" in sys.modules:
        context_module = sys.modules.get("tensorflow.python.eager.context")
        context = getattr(context_module, "_context", None) if context_module else None
        if context is not None and getattr(context, "_initialized", False):
            found.append("TensorFlow's runtime (an op ran, or a variable, model or tf.function was built or loaded)")
    torch = sys.modules.get("torch")
    cuda = getattr(torch, "cuda", None) if torch is not None else None
    if cuda is not None and getattr(cuda, "is_initialized", lambda: False)():
        found.append("a CUDA context (torch.cuda was used)")
    return found


def extra_threads() -> list[str]:
    """Names of Python threads other than the main one (threads do not survive fork())."""
    main = threading.main_thread()
    return [t.name for t in threading.enumerate() if t is not main and t.is_alive()]


def resolve_threads(setting: int | None, workers: int) -> int:
    """``auto`` (None) shares the cores among the workers: cores // workers, at least 1."""
    if setting is not None:
        return setting
    return max(1, (os.cpu_count() or 1) // workers)


def apply_worker_threads(intra_op: int, inter_op: int) -> None:
    """Size the runtimes' thread pools in a fresh worker, before anything starts them."""
    # Environment first, for libraries imported later in after_fork hooks.
    os.environ["TF_NUM_INTRAOP_THREADS"] = str(intra_op)
    os.environ["TF_NUM_INTEROP_THREADS"] = str(inter_op)
    os.environ["OMP_NUM_THREADS"] = str(intra_op)
    if "tensorflow" in sys.modules:
        import tensorflow as tf

        tf.config.threading.set_intra_op_parallelism_threads(intra_op)
        tf.config.threading.set_inter_op_parallelism_threads(inter_op)
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.set_num_threads(intra_op)


def set_native_log_level(level: str) -> None:
    """Set TensorFlow's native log threshold (unless the environment already sets it)."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", _TF_CPP_LEVEL[level])


def quiet_python_loggers(level: str) -> None:
    """Apply ``level`` to TensorFlow's Python logger (also when an after_fork hook imports TensorFlow later)."""
    import logging

    logging.getLogger("tensorflow").setLevel(level.upper())


def quiet_library_loggers(names: list[str], log_level: str) -> None:
    """With ``log_level`` debug, hold the libraries' loggers ``names`` at info (quiet_loggers).

    Their debug lines (h5py's per conversion, TensorFlow's, matplotlib's font search)
    would drown expertd's and the experts' own.  A logger that already has a level
    (set by the operator's code before this) keeps it.
    """
    if log_level != "debug":
        return
    import logging

    for name in names:
        logger = logging.getLogger(name)
        if logger.level == logging.NOTSET:
            logger.setLevel(logging.INFO)


@contextlib.contextmanager
def quiet_native_logs(enabled: bool) -> Iterator[None]:
    """Hold back native INFO chatter written straight to fd 2 while the block runs.

    TensorFlow logs through absl before its log threshold is read, so some INFO
    lines (oneDNN notices) ignore TF_CPP_MIN_LOG_LEVEL.  While the block runs,
    fd 2 goes to a temporary file; afterwards every other line is written to the
    real stderr, in order, so warnings and errors are never lost.
    """
    if not enabled:
        yield
        return
    global _real_stderr
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as capture:
        os.dup2(capture.fileno(), 2)
        _real_stderr = saved
        try:
            yield
        finally:
            _real_stderr = None
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            capture.seek(0)
            kept = [line for line in capture.read().decode("utf-8", "replace").splitlines(keepends=True)
                    if not _NATIVE_NOISE.match(line.rstrip("\n"))]
            if kept:
                sys.stderr.write("".join(kept))
                sys.stderr.flush()


_real_stderr: int | None = None  # the real fd 2 while quiet_native_logs holds it


@contextlib.contextmanager
def native_logs_shown() -> Iterator[None]:
    """Inside quiet_native_logs, let a block write to the real stderr at once (e.g. progress of a long step)."""
    if _real_stderr is None:
        yield
        return
    sys.stderr.flush()
    capture = os.dup(2)
    os.dup2(_real_stderr, 2)
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(capture, 2)
        os.close(capture)
