"""``expertd --help-topic NAME``: the documentation pages the installed package carries.

The pages are docs/*.md of the source tree, their one source: the package
reaches them through the link ``expertd/docs -> ../docs`` in a checkout (an
editable install), and a wheel carries copies made by the build
(setup.cfg, ``[options.package_data]``).  Error messages that point at a page
name its topic here, so that the page is there wherever expertd is installed.
Owns no state.
"""

from __future__ import annotations

from importlib import resources


def topics() -> dict[str, str]:
    """Each topic's name (a page's file name without .md) and its first heading."""
    found = {}
    folder = resources.files("expertd") / "docs"
    if not folder.is_dir():
        return {}
    for entry in sorted(folder.iterdir(), key=lambda entry: entry.name):
        if entry.name.endswith(".md"):
            first = next((line for line in entry.read_text(encoding="utf-8").splitlines() if line.strip()), "")
            found[entry.name[:-3]] = first.lstrip("# ").strip()
    return found


def page(name: str) -> str:
    """The text of topic ``name`` (LookupError, naming the topics there are, when there is none)."""
    known = topics()
    if name not in known:
        listed = ", ".join(known) or "none: this installation carries no documentation"
        raise LookupError(f"no help topic {name!r}; the topics: {listed}")
    return (resources.files("expertd") / "docs" / f"{name}.md").read_text(encoding="utf-8")


def listing() -> str:
    """The topics, one a line, for ``expertd --help-topic`` with no name."""
    known = topics()
    width = max((len(name) for name in known), default=0)
    return "".join(f"{name:<{width}}  {title}\n" for name, title in known.items())
