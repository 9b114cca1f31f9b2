"""The documentation where users look: ``expertd --help-topic``, messages that point at it, the wheel and the units."""

from __future__ import annotations

import ast
import re
import shutil
import subprocess
import sys
import zipfile

import pytest

from expertd.help_topics import topics

from conftest import ROOT, run_expertd

PAGES = sorted(path.stem for path in (ROOT / "docs").glob("*.md"))


def test_help_topic_prints_each_page_of_docs(short_dir):
    assert sorted(topics()) == PAGES
    for name in PAGES:
        done = run_expertd("--help-topic", name)
        assert (done.returncode, done.stdout) == (0, (ROOT / "docs" / f"{name}.md").read_text()), name


def test_help_topic_with_no_name_lists_the_pages_and_an_unknown_one_is_a_usage_error():
    listed = run_expertd("--help-topic")
    assert listed.returncode == 0
    assert [line.split()[0] for line in listed.stdout.splitlines()] == PAGES
    assert "Configuration reference" in listed.stdout
    unknown = run_expertd("--help-topic", "nope")
    assert unknown.returncode == 2 and unknown.stderr.count("\n") == 1
    assert unknown.stderr.startswith("expertd: no help topic 'nope'; the topics: client, config, ")


def _strings(path) -> list[str]:
    """The string constants of a module, docstrings left out (they are for readers of the source)."""
    tree = ast.parse(path.read_text())
    docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                  if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
                  and node.body and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)}
    return [node.value for node in ast.walk(tree) if isinstance(node, ast.Constant) and isinstance(node.value, str)
            and id(node) not in docstrings]


def test_messages_point_at_help_topics_the_package_has_not_at_files_of_a_checkout():
    named = set()
    for path in sorted((ROOT / "expertd").glob("*.py")):
        if path.name == "config_docs.py":
            continue  # (renders docs/config.md itself)
        for text in _strings(path):
            assert not re.search(r"docs/\w+\.md", text), f"{path.name}: {text!r} names a file of the checkout"
            named.update(re.findall(r"--help-topic (\w+)", text))
    assert named and named <= set(topics())


@pytest.mark.timeout(120)
def test_a_built_wheel_carries_the_docs_where_help_topic_and_the_units_find_them(short_dir):
    tree = short_dir / "tree"
    shutil.copytree(ROOT, tree, symlinks=True, ignore=shutil.ignore_patterns(
        ".git", ".venv", "build", "*.egg-info", "__pycache__", "tests", "bench", "run", "examples"))
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                           "-w", str(short_dir / "wheel"), str(tree)], capture_output=True, text=True, timeout=110)
    assert done.returncode == 0, done.stderr
    (wheel,) = (short_dir / "wheel").glob("expertd-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    data = {name.split("/share/doc/expertd/")[1] for name in names if "/share/doc/expertd/" in name}
    assert {f"expertd/docs/{page}.md" for page in PAGES} <= names  # (--help-topic)
    assert {"README.md", *(f"{page}.md" for page in PAGES)} <= data
    # Each unit's Documentation= names files of that data, under the venv its ExecStart= runs from.
    service = (ROOT / "systemd" / "expertd.service").read_text()
    prefix = re.search(r"^ExecStart=(\S+)/bin/expertd ", service, re.M).group(1)
    for unit in ("expertd.service", "expertd.socket"):
        text = (ROOT / "systemd" / unit).read_text()
        (line,) = re.findall(r"^Documentation=(.*)$", text, re.M)
        for uri in line.split():
            assert uri.startswith(f"file://{prefix}/share/doc/expertd/"), (unit, uri)
            assert uri.rsplit("/", 1)[1] in data, (unit, uri)
