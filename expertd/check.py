"""``expertd --check``'s trial worker: the after_fork hooks, and a trial call of each expert with an example.

Importing the experts and running their before_fork hooks (in the checking
process, as a generation's parent does: the loader refuses a runtime started
before fork) catches only half of what breaks a deploy: models are built, and
files opened, in the after_fork hooks, in each worker.  So the check forks one
trial worker, as the generation's parent forks a real one: it sets its
threads, loads the models and runs every after_fork hook, then calls each
expert that declares an example input (``@expert(example=...)``) and checks
that the result could be sent.  TensorFlow's runtime therefore starts only in
the child, never in the process that forks.

The child tells the checking process each step on a pipe, one line each
(``step``, ``ok`` or ``fail``, then text); the first failure is the check's
one-line error, and a child that hangs is killed after ``boot_timeout`` (the
hooks) or the expert's ``timeout`` (a call).

No state: :func:`trial_worker` runs one check.
"""

from __future__ import annotations

import os
import select
import signal
import time
from typing import Any

from expertd import protocol, runtimes
from expertd.config import Config
from expertd.errors import ExpertLoadError
from expertd.loader import LoadedExpert, describe_exception, run_after_fork
from expertd.text import plural


def trial_worker(config: Config, experts: dict[str, LoadedExpert]) -> list[str]:
    """Fork a trial worker and run the after_fork hooks and example calls there.

    Returns what was checked, as lines to print; raises ExpertLoadError (one
    line, naming the config file and the expert) for the first failure.
    """
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the trial worker: never returns into the check's code
        code = 1
        try:
            os.close(read_end)
            code = _child(config, experts, write_end)
        except BaseException as exc:  # (not the experts' hooks, whose failures _child says: one line all the same)
            os.write(write_end, f"fail {' '.join(describe_exception(exc).split())}\n".encode(
                "utf-8", "replace"))
            code = 0
        finally:
            os._exit(code)
    os.close(write_end)
    try:
        checked, step = _watch(config, read_end)
    except BaseException:  # a failure, a hang or ^C: the trial worker ends with the check
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        raise
    finally:
        os.close(read_end)
    _, status = os.waitpid(pid, 0)
    if status:
        how = (f"was killed by {signal.Signals(os.WTERMSIG(status)).name}" if os.WIFSIGNALED(status)
               else f"exited with status {os.waitstatus_to_exitcode(status)}")
        where = "in its after_fork hooks" if step == "after_fork" else f"in the trial call of [expert:{step}]"
        raise ExpertLoadError(f"{config.path}: trial worker {how} {where}")
    return checked


def _watch(config: Config, pipe: int) -> tuple[list[str], str]:
    """The trial worker's reports until it closes the pipe: (what was checked, the last step begun)."""
    checked: list[str] = []
    step = "after_fork"
    deadline = time.monotonic() + config.boot_timeout
    buffered = b""
    while True:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([pipe], [], [], left)[0]:
            what = (f"its after_fork hooks took longer than boot_timeout ({config.boot_timeout:g}s)"
                    if step == "after_fork" else
                    f"the trial call of [expert:{step}] took longer than its timeout "
                    f"({config.expert_timeout(step):g}s)")
            raise ExpertLoadError(f"{config.path}: trial worker: {what}; find what hangs, or raise the timeout")
        data = os.read(pipe, 65536)
        if not data:
            return checked, step
        buffered += data
        while b"\n" in buffered:
            line, buffered = buffered.split(b"\n", 1)
            kind, _, text = line.decode("utf-8", "replace").partition(" ")
            if kind == "fail":
                raise ExpertLoadError(f"{config.path}: trial worker: {text}")
            if kind == "step":  # a trial call begins: its expert's timeout applies
                step = text
                deadline = time.monotonic() + config.expert_timeout(step)
            else:
                checked.append(text)


def _child(config: Config, experts: dict[str, LoadedExpert], pipe: int) -> int:
    def say(kind: str, text: str) -> None:
        os.write(pipe, f"{kind} {' '.join(text.split())}\n".encode("utf-8", "replace"))

    # As a worker boots (expertd.worker): threads first, before any runtime starts, then models and hooks.
    intra_op = runtimes.resolve_threads(config.intra_op_threads, config.workers)
    runtimes.apply_worker_threads(intra_op, runtimes.resolve_threads(config.inter_op_threads, config.workers))
    try:
        with runtimes.quiet_native_logs(config.tf_log_level in ("warning", "error")):
            run_after_fork(experts, intra_op)
    except ExpertLoadError as exc:
        say("fail", str(exc))
        return 0
    models = len(next(iter(experts.values())).models) if experts else 0
    hooks = len({id(e.after_fork) for e in experts.values() if e.after_fork is not None})
    say("ok", f"trial worker: {plural(models, 'model')} loaded, {plural(hooks, 'after_fork hook')} ran")
    called, untried = [], []
    for name, expert in experts.items():
        if not expert.example:
            if not expert.is_model:  # (a model expert: loading its model above checked it against reference outputs)
                untried.append(name)
            continue
        say("step", name)
        started = time.perf_counter()
        problem = _trial_call(expert)
        if problem:
            say("fail", f"[expert:{name}] trial call with its example {problem}")
            return 0
        called.append(f"{name} ({(time.perf_counter() - started) * 1000:.1f} ms)")
    if called:
        say("ok", f"trial calls with their examples: {', '.join(called)}")
    if untried:
        say("ok", f"no example to call (@expert(example=...)): {', '.join(untried)}")
    return 0


def _trial_call(expert: LoadedExpert) -> str | None:
    """Why calling ``expert`` with its example fails as a request would, or None."""
    (example,) = expert.example
    try:
        result: Any = expert.function([example] if expert.batched else example)
    except BaseException as exc:  # an expert may raise anything
        return f"failed: {describe_exception(exc)}"
    if expert.batched:
        if not isinstance(result, list) or len(result) != 1:
            return ("returned no list of one result for the batch of one (a batched expert returns a list, "
                    "one result per input)")
        result = result[0]
        if isinstance(result, BaseException):
            return f"failed: {describe_exception(result)}"
    try:
        protocol.pack(result)
    except BaseException as exc:  # a result's own tolist() may raise anything
        return f"returned a value that cannot be sent: {type(exc).__name__}: {exc}"
    return None
