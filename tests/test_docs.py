"""Every ```python block of README.md and docs/*.md runs as shown.

Blocks of one file run in order in one namespace (later blocks may use names from earlier ones), in a
temporary working directory. A block that needs a host program or real weights is marked in the
markdown by an HTML comment on the line before its fence, `<!-- not run: REASON -->`; NOT_RUN below
lists every such block, so that none escapes unnoticed.

Training examples read KDISTPP_DOCS_SCALE (default 1): this test sets it to shrink their iteration
counts, so that the file runs in seconds; the documented numbers are what a reader runs.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FILES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
FENCE = re.compile(r"^```python[ \t]*\n(.*?)^```[ \t]*$", re.S | re.M)
NOT_RUN_MARK = re.compile(r"<!--\s*not run:\s*(.*?)\s*-->\s*$")

# (file, index of the python block in that file) -> why it cannot run here
NOT_RUN = {
    ("docs/cfg_pp.md", 0): "needs the A1111 or Forge webui",
}


def python_blocks(path: Path) -> list[tuple[str, str | None]]:
    """(source, reason it is not run or None) for each ```python block, in order."""
    text = path.read_text()
    blocks = []
    for match in FENCE.finditer(text):
        before = text[:match.start()].rstrip("\n").rsplit("\n", 1)[-1]
        mark = NOT_RUN_MARK.search(before)
        blocks.append((match.group(1), mark.group(1) if mark else None))
    return blocks


def relative(path: Path) -> str:
    return path.relative_to(REPO).as_posix()


DOCUMENTED = [path for path in FILES if python_blocks(path)]


def test_the_blocks_that_do_not_run_are_the_listed_ones():
    marked = {(relative(path), k): reason for path in FILES for k, (_, reason) in enumerate(python_blocks(path))
              if reason is not None}
    assert marked == NOT_RUN


def test_documented_files_are_found():
    # a change of fence style (```py, ~~~) must not silently drop every block
    names = {relative(path) for path in DOCUMENTED}
    assert {"README.md", "docs/sfd.md", "docs/cfg_pp.md", "docs/diffusers.md"} <= names
    for path in FILES:
        assert "```py\n" not in path.read_text() and "~~~" not in path.read_text(), relative(path)


@pytest.mark.parametrize("path", DOCUMENTED, ids=relative)
def test_python_blocks_run(path, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # examples may write files (checkpoints)
    monkeypatch.setenv("KDISTPP_DOCS_SCALE", "0.02")
    namespace = {"__name__": f"docs_{path.stem}"}
    ran = 0
    for k, (source, reason) in enumerate(python_blocks(path)):
        if reason is not None:
            continue
        code = compile(source, f"{relative(path)}, python block {k}", "exec")
        exec(code, namespace)  # noqa: S102 - the documentation's own examples
        ran += 1
    assert ran > 0


# Words about how the project was made, not about the software: user docs must not carry them.
PROCESS_WORDS = re.compile(r"\bissues? \d|\bthe review\b|\bwas lent\b|\bsessions?\b|\bagainst fakes\b|\bCEO\b"
                           r"|\btime set aside\b|\bran out\b|\bprototype\b|\bwere added after\b", re.I)


@pytest.mark.parametrize("path", [*FILES, *sorted((REPO / "docs" / "bench").glob("*.md"))], ids=relative)
def test_docs_describe_the_software_not_its_making(path):
    found = [(n, line.strip()) for n, line in enumerate(path.read_text().splitlines(), 1) if PROCESS_WORDS.search(line)]
    assert not found, f"{relative(path)}: {found}"


def test_readme_runs_with_its_own_set_up_which_has_no_k_diffusion(tmp_path, monkeypatch):
    """The README's set-up installs kdistpp alone: its blocks must run where k-diffusion cannot be imported."""
    import sys

    monkeypatch.chdir(tmp_path)
    for name in [m for m in sys.modules if m == "k_diffusion" or m.startswith("k_diffusion.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "k_diffusion", None)  # import k_diffusion now raises ImportError
    namespace = {"__name__": "docs_README"}
    for k, (source, reason) in enumerate(python_blocks(REPO / "README.md")):
        assert reason is None
        exec(compile(source, f"README.md, python block {k}", "exec"), namespace)  # noqa: S102
