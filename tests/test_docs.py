"""The front page and the documents: every relative link resolves, and every path they name in backticks
as megamdm's (``megamdm/...``, ``tools/...``, ``configs/...``, ``launch/...``) exists."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = sorted([ROOT / "README.md", ROOT / "CHANGELOG.md", *ROOT.glob("docs/**/*.md"), *ROOT.glob("docker/*.md")])
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
PATH = re.compile(r"`((?:megamdm|tools|configs|launch|tests)/[\w./-]*[\w/])`")


def _rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


@pytest.mark.parametrize("doc", DOCS, ids=_rel)
def test_relative_links_resolve(doc):
    broken = []
    for target in LINK.findall(doc.read_text()):
        if re.match(r"[a-z]+:", target) or target.startswith("#"):
            continue  # a web address, or an anchor on the same page
        if not (doc.parent / target.split("#")[0]).exists():
            broken.append(target)
    assert broken == []


@pytest.mark.parametrize("doc", [d for d in DOCS if d.name != "CHANGELOG.md"], ids=_rel)
def test_the_paths_a_document_names_exist(doc):
    """A path in backticks is the project's as it is today (the CHANGELOG keeps the old ones as history)."""
    missing = sorted({p for p in PATH.findall(doc.read_text()) if "*" not in p and not (ROOT / p).exists()})
    assert missing == []
