"""Document experts for bench/pipelines.py: three cheap ones, and three that spend ~20 ms of CPU each.

The cheap three cost about the same (a microsecond or less: one look at the text), so that one call of
one of them against one request for all three measures what the daemon adds, not what they compute.
"""

import os
import time


def language(document):
    """Next to nothing per call: per-request costs show."""
    return "fr" if " le " in document.get("text", "") else "en"


def length(document):
    return len(document.get("text", ""))


def shout(document):
    return document.get("text", "").isupper()


def _burn(seconds):
    end = time.thread_time() + seconds
    while time.thread_time() < end:
        pass


def heavy_a(document):
    """About 20 ms of CPU (document['cpu'] seconds if given); answers with its worker's pid."""
    _burn(document.get("cpu", 0.02))
    return os.getpid()


def heavy_b(document):
    _burn(document.get("cpu", 0.02))
    return os.getpid()


def heavy_c(document):
    _burn(document.get("cpu", 0.02))
    return os.getpid()


def wait_a(document):
    """Waits 20 ms without computing (a stand-in for a machine with a core per expert); answers its pid."""
    time.sleep(document.get("wait", 0.02))
    return os.getpid()


def wait_b(document):
    time.sleep(document.get("wait", 0.02))
    return os.getpid()


def wait_c(document):
    time.sleep(document.get("wait", 0.02))
    return os.getpid()
