"""Every link between the README and docs/ lands: the file exists and, for a link to a section,
the section does, by the anchor GitHub derives from its heading. A renamed heading otherwise
leaves a link that opens the page at its top, silently."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def github_anchor(heading: str) -> str:
    """GitHub's slug: lower case, punctuation dropped (word characters, hyphens and spaces
    kept), spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    """The anchors of a page's headings (outside code blocks); a repeated one gets -1, -2..."""
    found, seen, in_code = set(), {}, False
    for line in page.read_text().splitlines():
        if line.startswith("```"):
            in_code = not in_code
        heading = None if in_code else re.match(r"^#+\s+(.*)$", line)
        if heading:
            slug = github_anchor(heading.group(1))
            count = seen.get(slug, 0)
            seen[slug] = count + 1
            found.add(slug if count == 0 else f"{slug}-{count}")
    return found


def test_the_slug_rule_on_headings_of_these_docs():
    assert github_anchor("Where the CPU targets stand (2026-12-06, quiet machine)") == \
        "where-the-cpu-targets-stand-2026-12-06-quiet-machine"
    assert github_anchor("FedSVD in its authors' protocol (`configs/fedsvd-paper.toml`, 10 seeds)") == \
        "fedsvd-in-its-authors-protocol-configsfedsvd-papertoml-10-seeds"


def test_every_relative_link_and_its_section_exist():
    broken = []
    for page in PAGES:
        for target, anchor in re.findall(r"\]\(([^)\s#:]*)(?:#([^)\s]+))?\)", page.read_text()):
            linked = (page.parent / target) if target else page
            if not linked.exists():
                broken.append(f"{page.name}: {target} (no such file)")
            elif anchor and linked.suffix == ".md" and anchor not in anchors(linked):
                broken.append(f"{page.name}: {target}#{anchor} (no such section)")
    assert broken == []
