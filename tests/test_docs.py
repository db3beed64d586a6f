"""The Markdown files' relative links: every linked file exists, and every #anchor is a heading of its target."""
import re
import subprocess
from pathlib import Path

import pytest

from src.config import PROJECT_ROOT

LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
LINK_TEXT = re.compile(r"\[([^\]]*)\]\([^)\s]+\)")
FENCE = re.compile(r"^```.*?^```", re.S | re.M)


def markdown_files() -> list[Path]:
    listed = subprocess.run(["git", "ls-files", "*.md"], cwd=PROJECT_ROOT, capture_output=True, text=True,
                            check=True).stdout.split()
    return [PROJECT_ROOT / name for name in listed]


def anchors(path: Path) -> set[str]:
    """GitHub's heading ids: lower case, punctuation but hyphens and underscores dropped, spaces to hyphens,
    repeats numbered."""
    seen: dict[str, int] = {}
    ids = set()
    for line in FENCE.sub("", path.read_text()).splitlines():
        if not line.startswith("#"):
            continue
        text = LINK_TEXT.sub(r"\1", line.lstrip("#").strip())  # a link in a heading keeps its text only
        slug = re.sub(r"[^\w\- ]", "", text.lower()).replace(" ", "-")
        ids.add(slug if slug not in seen else f"{slug}-{seen[slug]}")
        seen[slug] = seen.get(slug, 0) + 1
    return ids


def broken_links(path: Path) -> list[str]:
    broken = []
    for target in LINK.findall(FENCE.sub("", path.read_text())):
        if re.match(r"[a-z]+:", target):
            continue
        file, _, anchor = target.partition("#")
        linked = (path.parent / file).resolve() if file else path
        if linked.is_dir() and anchor:  # the heading is in the README.md that GitHub shows under the folder
            linked /= "README.md"
        if not linked.exists():
            broken.append(f"{target}: no such file")
        elif anchor and linked.suffix == ".md" and anchor not in anchors(linked):
            broken.append(f"{target}: no heading with that id")
    return broken


def test_the_anchor_rule_matches_githubs_ids(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("# Runtimes: SavedModel, TFLite (int8)\n## Notes\n```\n# not a heading\n```\n## Notes\n"
                    "## Results ([table](t.md))\n")
    assert anchors(page) == {"runtimes-savedmodel-tflite-int8", "notes", "notes-1", "results-table"}


def test_a_missing_file_and_a_missing_heading_are_reported(tmp_path):
    page = tmp_path / "page.md"
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "README.md").write_text("# Inside\n")
    page.write_text("# Top\n[ok](#top) [gone](missing.md) [no heading](#bottom) [web](https://example.org) "
                    "[folder](folder/#inside) [folder, no heading](folder/#outside)\n")
    assert broken_links(page) == ["missing.md: no such file", "#bottom: no heading with that id",
                                  "folder/#outside: no heading with that id"]


@pytest.mark.parametrize("path", markdown_files(), ids=lambda p: str(p.relative_to(PROJECT_ROOT)))
def test_every_relative_link_resolves(path):
    assert broken_links(path) == []
