"""Sections of a report that another benchmark owns: BENCHMARKS.md is written whole by bench/compare.py,
except its section on the model servers, which bench/peers.py writes (`make bench-peers`, a run of its own).

A section is the text between ``<!-- section NAME: ... -->`` and ``<!-- end of section NAME -->``.  Each
writer replaces its own section and carries the others over unchanged, so that either benchmark can be
run alone without losing the other's figures.
"""

from __future__ import annotations

import re
from pathlib import Path


def _begin(name: str, owner: str) -> str:
    return f"<!-- section {name}: written by {owner}; edits here are lost on its next run -->"


def _end(name: str) -> str:
    return f"<!-- end of section {name} -->"


def _pattern(name: str) -> re.Pattern[str]:
    return re.compile(rf"<!-- section {re.escape(name)}: .*?-->\n.*?{re.escape(_end(name))}\n?", re.S)


def sections(text: str) -> dict[str, str]:
    """Every section in ``text``, by name, with its markers."""
    found = {}
    for match in re.finditer(r"<!-- section ([\w-]+): ", text):
        whole = _pattern(match.group(1)).search(text, match.start())
        if whole:
            found[match.group(1)] = whole.group(0)
    return found


def replace(path: Path, name: str, owner: str, body: str) -> None:
    """Write ``body`` as section ``name`` of ``path``: in place if it is there, else at the end."""
    text = path.read_text() if path.exists() else ""
    section = f"{_begin(name, owner)}\n{body.rstrip()}\n{_end(name)}\n"
    pattern = _pattern(name)
    if pattern.search(text):
        text = pattern.sub(lambda _: section, text, count=1)
    else:
        text = text.rstrip() + ("\n\n" if text.strip() else "") + section
    path.write_text(text)


def carry(path: Path, new_text: str) -> str:
    """``new_text`` (a whole report about to replace ``path``) with the sections of ``path`` it lacks."""
    old = sections(path.read_text()) if path.exists() else {}
    kept = [section for name, section in old.items() if name not in sections(new_text)]
    return new_text.rstrip() + "".join("\n\n" + section.rstrip() for section in kept) + "\n"
