"""Document experts for the pipeline tests: each takes a document and gives an opinion on it."""

import os
import time

from expertd import expert


def language(document):
    """'fr' when the text has a French word, else 'en'."""
    words = set(document.get("text", "").lower().split())
    return "fr" if words & {"le", "la", "est", "bonjour"} else "en"


@expert(reads=("language",))
def polite(document):
    """Reads the language opinion: whether the text greets in that language."""
    greeting = {"en": "hello", "fr": "bonjour"}[document["opinions"]["language"]]
    return greeting in document.get("text", "").lower()


def length(document):
    return len(document.get("text", ""))


def shout(document):
    text = document.get("text", "")
    return sum(c.isupper() for c in text) / max(len(text), 1)


def seen(document):
    """The opinions this expert saw when it ran (sorted names): shows what a stage's experts see."""
    return sorted(document.get("opinions", {}))


def worker_pid(document):
    return os.getpid()


def failing(document):
    raise ValueError(f"cannot judge {document.get('text', '')!r}")


def sleeper(document):
    """Sleeps document['sleep'] seconds (default 60): a stage that runs past its timeout."""
    time.sleep(document.get("sleep", 60))
    return "woke"


def stubborn(document):
    """Catches the interruption and sleeps on: the master's deadline ends it."""
    while True:
        try:
            time.sleep(60)
        except BaseException:  # (the point: an expert that will not stop)
            pass


def _burn(seconds):
    end = time.thread_time() + seconds
    while time.thread_time() < end:
        pass


def burn_a(document):
    """About document['cpu'] seconds of CPU (default 20 ms), then this worker's pid."""
    _burn(document.get("cpu", 0.02))
    return os.getpid()


def burn_b(document):
    _burn(document.get("cpu", 0.02))
    return os.getpid()


def burn_c(document):
    _burn(document.get("cpu", 0.02))
    return os.getpid()


@expert(batched=True)
def batched_length(documents):
    return [len(d.get("text", "")) for d in documents]


def exit_in_helper(document):
    """About 10 ms of CPU, then this worker's pid; but run by a worker other than the one that ran stage 1
    (``opinions.worker_pid``), that is by a helper a fanned-out stage was given to, it exits its worker
    mid-request instead: the asker must then run it itself."""
    _burn(0.01)
    ran_stage_1 = document.get("opinions", {}).get("worker_pid")
    if ran_stage_1 is not None and ran_stage_1 != os.getpid():
        os._exit(3)
    return os.getpid()


def unsendable(document):
    """An opinion msgpack cannot carry."""
    return object()


def note_pid(document):
    """Writes this worker's pid to the file document['pid_file'] names (so that a test knows, mid-request,
    which worker runs the request), and returns it."""
    path = document["pid_file"]
    with open(path + ".tmp", "w") as out:
        out.write(str(os.getpid()))
    os.replace(path + ".tmp", path)
    return os.getpid()


def crash(document):
    """Kills its worker (an expert with a fatal bug)."""
    os._exit(7)


def nap(document):
    """Sleeps document['nap'][its own name] seconds (0 if absent), then says so: stages of experts with
    different timeouts. Registered under several names (see the tests)."""
    return _nap(document, "nap")


def snooze(document):
    return _nap(document, "snooze")


def _nap(document, name):
    time.sleep(document.get("naps", {}).get(name, 0))
    return f"{name} done"


def native_sleep(document):
    """Sleeps in C (libc sleep(), which a signal cuts short): how long it really slept."""
    import ctypes

    started = time.monotonic()
    ctypes.CDLL(None).sleep(int(document.get("seconds", 2)))
    return round(time.monotonic() - started, 2)
