"""Every relative link in README.md and docs/*.md reaches a file that exists, and its `#anchor` a heading there.

The README is a short page that links to docs/ pages for everything else: a section moved or renamed without its
links would strand a reader one click from the README. Anchors are GitHub's: a heading lower-cased, its punctuation
dropped, spaces turned into hyphens, `-N` added to repeats.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCED = re.compile(r"^```.*?^```", re.S | re.M)
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(([^)\s]+)\)")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$", re.M)


def _prose(text: str) -> str:
    """The text outside fenced code blocks and inline code, where a markdown link is a link."""
    return re.sub(r"`[^`\n]*`", "", FENCED.sub("", text))


def anchors(text: str) -> set[str]:
    """GitHub's anchors of a page's headings (and explicit `<a name=...>` / `id=...` targets)."""
    found: set[str] = set()
    counts: dict[str, int] = {}
    for _, title in HEADING.findall(FENCED.sub("", text)):
        title = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", title)  # a link in a heading keeps its text
        slug = re.sub(r"[^\w\- ]", "", title.strip().lower().replace("`", "")).replace(" ", "-")
        found.add(slug if slug not in counts else f"{slug}-{counts[slug]}")
        counts[slug] = counts.get(slug, 0) + 1
    found |= set(re.findall(r"""<a\s+(?:name|id)=["']([^"']+)["']""", text))
    return found


def broken_links(page: Path, root: Path = ROOT) -> list[str]:
    broken = []
    for target in LINK.findall(_prose(page.read_text(encoding="utf-8"))):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto:, ...
            continue
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.exists():
            broken.append(f"{page.relative_to(root)}: {target} (no file {path})")
        elif anchor and file.suffix == ".md" and anchor not in anchors(file.read_text(encoding="utf-8")):
            broken.append(f"{page.relative_to(root)}: {target} (no heading #{anchor} in {path or page.name})")
    return broken


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(ROOT)) for p in PAGES])
def test_every_relative_link_resolves(page):
    assert not broken_links(page), "\n".join(broken_links(page))


def test_the_readme_reaches_every_docs_page_that_holds_a_moved_section():
    """Each page a README section moved to is one click from the README."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    linked = {Path(target.partition("#")[0]).name for target in LINK.findall(_prose(readme))
              if target.startswith("docs/")}
    moved = {"walkthrough.md", "composing.md", "training.md", "routing-report.md", "sharing.md", "exporting.md",
             "serving.md", "multimodal.md", "architectures.md", "merging.md", "coming-from-mixturekit.md",
             "how-it-works.md", "results.md", "reliability.md", "layout.md", "testing.md"}
    assert moved <= linked, moved - linked


def test_the_checks_see_a_missing_file_and_a_missing_anchor(tmp_path):
    (tmp_path / "other.md").write_text("# A `title`: here (1)\n\n## Same\n\n## Same\n")
    page = tmp_path / "page.md"
    page.write_text("[ok](other.md#a-title-here-1) [ok](other.md#same-1) [gone](missing.md) [bad](other.md#nope)\n"
                    "`[code](missing.md)`\n```\n[fenced](missing.md)\n```\n[web](https://example.com/x)\n")
    assert broken_links(page, tmp_path) == ["page.md: missing.md (no file missing.md)",
                                            "page.md: other.md#nope (no heading #nope in other.md)"]


def test_the_readme_stays_a_page_a_newcomer_finishes():
    """Issue 41: under 250 lines, none over 120 characters."""
    lines = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) < 250, len(lines)
    long = [f"{number}: {len(line)}" for number, line in enumerate(lines, 1) if len(line) > 120]
    assert not long, long
