"""Document experts for bench/pipelines.py: three cheap ones, and three that spend ~20 ms of CPU each."""

import os
import time


def language(document):
    """Next to nothing per call: per-request costs show."""
    return "fr" if " le " in document.get("text", "") else "en"


def length(document):
    return len(document.get("text", ""))


def shout(document):
    text = document.get("text", "")
    return sum(c.isupper() for c in text) / max(len(text), 1)


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
