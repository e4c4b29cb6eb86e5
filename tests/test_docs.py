"""The README stays a five-minute read, and every relative link of README.md and docs/*.md resolves: to a file
of the repository and, with a #fragment, to a heading of the Markdown file it names (GitHub's anchors)."""

import glob
import os
import re

import pytest
from conftest import REPO

README_LIMIT = 15_000
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
FENCE = re.compile(r"^(```|~~~).*?^\1", re.S | re.M)


def markdown_files():
    return [os.path.join(REPO, "README.md"), *sorted(glob.glob(os.path.join(REPO, "docs", "*.md")))]


def github_anchor(heading: str) -> str:
    """The anchor GitHub gives a heading: lower case, markup and punctuation dropped, spaces -> '-'."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip())  # a link keeps its text
    text = text.lower().replace("`", "")
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: str) -> set[str]:
    """Every heading's anchor in a Markdown file (a repeated heading gets -1, -2, ... as on GitHub)."""
    seen: dict[str, int] = {}
    found = set()
    text = FENCE.sub("", open(path, encoding="utf-8").read())
    for match in re.finditer(r"^#{1,6}\s+(.+?)\s*#*\s*$", text, re.M):
        anchor = github_anchor(match.group(1))
        found.add(anchor if anchor not in seen else f"{anchor}-{seen[anchor]}")
        seen[anchor] = seen.get(anchor, 0) + 1
    return found


def relative_links(path: str) -> list[str]:
    text = FENCE.sub("", open(path, encoding="utf-8").read())
    text = re.sub(r"<!--.*?-->", "", text, flags=re.S)
    return [target for target in LINK.findall(text) if not re.match(r"[a-z][a-z0-9+.-]*:", target)]


def test_readme_is_at_most_15000_characters():
    size = len(open(os.path.join(REPO, "README.md"), encoding="utf-8").read())
    assert size <= README_LIMIT, f"README.md has {size} characters (limit {README_LIMIT}): move depth to docs/"


@pytest.mark.parametrize("path", markdown_files(), ids=lambda p: os.path.relpath(p, REPO))
def test_every_relative_link_resolves(path):
    broken = []
    for target in relative_links(path):
        file_part, _, fragment = target.partition("#")
        resolved = os.path.normpath(os.path.join(os.path.dirname(path), file_part)) if file_part else path
        if not os.path.exists(resolved):
            broken.append(f"{target} (no file {os.path.relpath(resolved, REPO)})")
        elif fragment and resolved.endswith(".md") and fragment not in anchors(resolved):
            broken.append(f"{target} (no heading #{fragment} in {os.path.relpath(resolved, REPO)})")
    assert not broken, f"{os.path.relpath(path, REPO)}: broken links: {broken}"


def test_the_link_checker_sees_broken_links_and_anchors(tmp_path):
    (tmp_path / "a.md").write_text("# Title: the `x` part\n\n## Notes and limits\n\n```\n# not a heading\n```\n"
                                   "[ok](a.md#title-the-x-part) [ok](#notes-and-limits) [site](https://example.org)\n"
                                   "[gone](b.md) [bad anchor](a.md#not-a-heading) ![img](pic.png)\n")
    assert anchors(str(tmp_path / "a.md")) == {"title-the-x-part", "notes-and-limits"}
    assert relative_links(str(tmp_path / "a.md")) == ["a.md#title-the-x-part", "#notes-and-limits", "b.md",
                                                     "a.md#not-a-heading", "pic.png"]
