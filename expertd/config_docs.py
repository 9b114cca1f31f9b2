"""The configuration reference, docs/config.md, rendered from the settings table.

:func:`render_markdown` formats the table :mod:`expertd.config` hands it
(``python -m expertd.config`` prints the result); this module adds only the
prose around the tables.  No state, and no import of expertd.config, which
imports this module.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

# Prose under each section's title, by the section's key in the settings table.
_INTRO = {
    "expert": [
        "One section per expert. NAME is what clients call; it starts with a letter or `_` and",
        "holds letters, digits, `_`, `.` and `-`.",
    ],
    "pipeline": [
        "One section per named pipeline: experts run in stages on one document in one request",
        "(`expertctl pipeline NAME`, `POST /pipeline/NAME`), each adding its opinion under `opinions.NAME`.",
        "NAME follows the rules of expert names and may not be an expert's name. In `stages`, `,`",
        "separates the stages, run in order, and `+` joins the experts of one stage, which see the",
        "document as it was before the stage (and may run in parallel): `language, sentiment + toxicity`.",
        "A stage may name another pipeline, alone in its stage. Unknown names, an expert named twice,",
        "and pipelines that name each other in a cycle stop start-up (and reload) with one line. An",
        "expert that declares `@expert(reads=(\"language\",))` must find `language` in an earlier stage",
        "of every pipeline it is in.",
    ],
}


def render_markdown(settings: Iterable[Any], sections: Sequence[tuple[str, str]]) -> str:
    """docs/config.md: one table per ``(section key, title)`` of the settings whose ``section`` is that key."""
    settings = list(settings)
    lines = [
        "# Configuration reference",
        "",
        "<!-- Generated from expertd/settings.py by `python -m expertd.config`; do not edit by hand. -->",
        "",
        "expertd reads one INI file (`expertd --config FILE`, default `/etc/expertd.conf`).",
        "Relative paths in it are relative to the file's directory. A misspelt key, a bad value,",
        "an unknown section or an expert that fails to import stops start-up with one line naming",
        "the file, section and key, and a non-zero exit status.",
        "",
        "Firefly's YAML config (a `.yml` or `.yaml` file) and Firefly's command line",
        "(`expertd module.function ...`) are read into these same settings and checked by the",
        "same rules (`expertd --help-topic firefly`).",
        "",
    ]
    for section, title in sections:
        lines += [f"## `{title}`", ""]
        if section in _INTRO:
            lines += [*_INTRO[section], ""]
        lines += ["| key | type | default | command line | meaning |", "| --- | --- | --- | --- | --- |"]
        for setting in settings:
            if setting.section != section:
                continue
            if setting.default is None:
                default = "(required)"
            else:
                default = f"`{setting.default}`" if setting.default else "(empty)"
            flag = f"`{setting.flag}`" if setting.cli else ""
            lines.append(f"| `{setting.name}` | {setting.type.name} | {default} | {flag} | {setting.help} |")
        lines.append("")
    lines += [
        "## Files named on the command line",
        "",
        "`--pidfile PATH` and `--log-file PATH` are never written through a symlink, so a link",
        "planted at their path (in a shared directory such as /tmp) redirects nothing:",
        "",
        "- The pidfile is written under a fresh, unguessable name in its directory (created",
        "  exclusively, mode 0644) and renamed over PATH. A symlink at PATH is stale (expertd never",
        "  writes one): it is replaced, not followed. A live expertd named by the pidfile is refused.",
        "- The log file is opened for appending without following a symlink, at start-up and when",
        "  SIGUSR1 reopens it. It must be a regular file with one link, owned by root or the daemon's",
        "  user (created mode 0644 if missing); anything else (a symlink, a FIFO, a hard link, another",
        "  user's file) stops start-up with one line, or, on SIGUSR1, is logged and the old file kept.",
        "",
    ]
    return "\n".join(lines)
