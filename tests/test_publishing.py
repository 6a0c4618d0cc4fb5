"""The registry metadata: pyproject.toml's [tool.comfy] and [project.urls], the icon they point at,
and the webui extension-index entry docs/publishing.md shows (docs/publishing.md says what each
index reads)."""

from __future__ import annotations

import json
import re
import struct
import sys

import pytest

from hosts import REPO

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    tomllib = pytest.importorskip("tomli")

PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
PUBLISHING = (REPO / "docs" / "publishing.md").read_text()
# The A1111 extension index's tags (its tags.json), the ones an entry may carry.
INDEX_TAGS = {"script", "localization", "tab", "dropdown", "ads", "training", "models", "UI related", "prompting",
              "editing", "manipulations", "online", "animation", "query", "science", "extras"}


def png_size(data: bytes) -> tuple[int, int]:
    """Width and height from a PNG's IHDR chunk (read here, not by the library that wrote it)."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_tool_comfy_has_what_the_comfy_registry_reads():
    comfy = PYPROJECT["tool"]["comfy"]
    assert set(comfy) >= {"PublisherId", "DisplayName", "Icon"}
    assert re.fullmatch(r"[a-z0-9][a-z0-9-]*", comfy["PublisherId"])
    assert comfy["DisplayName"].strip()
    project = PYPROJECT["project"]
    # the node id: under 100 characters, letters, digits, '-', '_', '.'; not starting with a digit or sign
    assert re.fullmatch(r"[A-Za-z][A-Za-z0-9._-]{0,98}", project["name"]) and "comfyui" not in project["name"].lower()
    assert re.fullmatch(r"\d+\.\d+\.\d+", project["version"])
    assert project["urls"]["Repository"].startswith("https://github.com/")


def test_the_icon_url_is_this_repositorys_square_png_of_at_most_400_pixels():
    comfy, repository = PYPROJECT["tool"]["comfy"], PYPROJECT["project"]["urls"]["Repository"]
    owner_repo = repository.removeprefix("https://github.com/").removesuffix(".git")
    prefix = f"https://raw.githubusercontent.com/{owner_repo}/main/"
    assert comfy["Icon"].startswith(prefix), (comfy["Icon"], prefix)
    path = REPO / comfy["Icon"].removeprefix(prefix)
    width, height = png_size(path.read_bytes())
    assert width == height and 64 <= width <= 400


def test_the_documented_values_are_the_pyprojects():
    comfy = PYPROJECT["tool"]["comfy"]
    block = re.search(r"```toml\n(.*?)```", PUBLISHING, re.S).group(1)
    documented = tomllib.loads(block)
    assert documented["tool"]["comfy"] == comfy
    assert documented["project"]["urls"]["Repository"] == PYPROJECT["project"]["urls"]["Repository"]


def test_the_webui_index_entry_is_what_the_index_accepts():
    entry = json.loads(re.search(r"```json\n(.*?)```", PUBLISHING, re.S).group(1))
    assert set(entry) == {"name", "url", "description", "tags"}
    assert re.fullmatch(r"https://\S+?\.git", entry["url"])
    assert entry["url"].removesuffix(".git") == PYPROJECT["project"]["urls"]["Repository"]
    assert entry["tags"] and set(entry["tags"]) <= INDEX_TAGS
    assert entry["name"].strip() and entry["description"].strip()
