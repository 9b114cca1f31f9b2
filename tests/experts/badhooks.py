"""Experts whose hooks fail, for start-up error tests."""

import os

from expertd import expert


def _fail_in_master():
    raise RuntimeError("cannot read model file")


def _fail_in_worker():
    raise RuntimeError("cannot build model in worker")


@expert(before_fork=_fail_in_master)
def master_fails(doc):
    return doc


@expert(after_fork=_fail_in_worker)
def worker_fails(doc):
    return doc


def _fail_later():
    # Succeeds in the first workers, fails in any respawned one.
    if os.environ.get("EXPERTD_TEST_FLAG") and os.path.exists(os.environ["EXPERTD_TEST_FLAG"]):
        raise RuntimeError("broken on respawn")


@expert(after_fork=_fail_later)
def flaky_boot(doc):
    return doc


def _crash_in_worker():
    import signal

    os.kill(os.getpid(), signal.SIGSEGV)


@expert(after_fork=_crash_in_worker)
def segfaults_on_boot(doc):
    return doc
