"""The documentation stays navigable: every relative link in README.md and docs/*.md points
to a file that exists (and, with a ``#fragment``, to a heading of that file), the README
stays a short read, and the docs speak of the product, not of how it was built."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
README_MAX_LINES = 200

_FENCE = re.compile(r"^\s*(```|~~~)")
_INLINE_CODE = re.compile(r"`[^`]*`")
_LINK = re.compile(r"!?\[(?:[^\]\\]|\\.)*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
_SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")

HISTORY_WORDS = re.compile(
    r"DESIGN\.md|seeds/|\bthe seed\b|\b[Ii]ssue #?\d|\bpreviously\b",
)


def _unfenced(text: str) -> Iterator[tuple[int, str]]:
    """(line number, line) of the lines outside fenced code blocks."""
    in_fence = False
    for number, line in enumerate(text.splitlines(), 1):
        if _FENCE.match(line):
            in_fence = not in_fence
        elif not in_fence:
            yield number, line


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: link text kept, punctuation dropped, spaces to '-'."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading).replace("`", "").strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every heading anchor of a Markdown file (repeated headings get -1, -2, ...)."""
    seen: dict[str, int] = {}
    found: set[str] = set()
    for _, line in _unfenced(path.read_text(encoding="utf-8")):
        match = _HEADING.match(line)
        if not match:
            continue
        base = slug(match.group(2))
        count = seen.get(base, 0)
        seen[base] = count + 1
        found.add(base if count == 0 else f"{base}-{count}")
    return found


def broken_links(doc: Path) -> list[str]:
    """The relative links of ``doc`` that do not resolve, as 'file:line: target (why)'."""
    problems = []
    for number, line in _unfenced(doc.read_text(encoding="utf-8")):
        for target in _LINK.findall(_INLINE_CODE.sub("", line)):
            if _SCHEME.match(target):
                continue
            file_part, _, fragment = target.partition("#")
            dest = (doc.parent / file_part).resolve() if file_part else doc
            where = f"{doc.relative_to(ROOT) if doc.is_relative_to(ROOT) else doc.name}:{number}"
            if not dest.exists():
                problems.append(f"{where}: {target} (no such file)")
            elif fragment and dest.suffix == ".md" and fragment not in anchors(dest):
                problems.append(f"{where}: {target} (no heading #{fragment} in {dest.name})")
    return problems


def doc_files() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


@pytest.fixture(scope="module")
def docs() -> list[Path]:
    if not (ROOT / "docs").is_dir() or not (ROOT / "README.md").exists():
        pytest.skip("no README.md and docs/ next to the tests (installed package)")
    return doc_files()


def test_relative_links_resolve(docs: list[Path]) -> None:
    problems = [p for doc in docs for p in broken_links(doc)]
    assert not problems, "broken relative links:\n" + "\n".join(problems)


def test_readme_is_a_short_read(docs: list[Path]) -> None:
    lines = docs[0].read_text(encoding="utf-8").count("\n")
    assert lines < README_MAX_LINES, (
        f"README.md has {lines} lines (limit {README_MAX_LINES}): move the detail into docs/"
    )


def test_docs_speak_of_the_product(docs: list[Path]) -> None:
    hits = [
        f"{doc.name}:{number}: {line.strip()}"
        for doc in docs
        for number, line in enumerate(doc.read_text(encoding="utf-8").splitlines(), 1)
        if HISTORY_WORDS.search(line)
    ]
    assert not hits, "words about how the engine was built, not what it is:\n" + "\n".join(hits)


def test_the_checker_finds_broken_links(tmp_path: Path) -> None:
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "b.md").write_text("# Title\n\n## Some `code` section: here\n")
    page = tmp_path / "docs" / "a.md"
    page.write_text(
        "# A\n\n"
        "[ok](b.md) [ok anchor](b.md#some-code-section-here) [own](#a) [web](https://x.y/z)\n"
        "[gone](missing.md) [bad anchor](b.md#nowhere)\n"
        "```\n[in a fence](missing-too.md)\n```\n"
        "`[inline](missing-three.md)`\n"
    )
    problems = broken_links(page)
    assert len(problems) == 2, problems
    assert "missing.md (no such file)" in problems[0]
    assert "b.md#nowhere (no heading #nowhere in b.md)" in problems[1]


def test_slugs_follow_github() -> None:
    assert slug("HTTP: POST /v1/redemptions") == "http-post-v1redemptions"
    assert slug("What the group commit's decision marks cost (2026-12-02)") == (
        "what-the-group-commits-decision-marks-cost-2026-12-02"
    )
    assert slug("Checkout: validations, redemptions, reservations") == (
        "checkout-validations-redemptions-reservations"
    )
