"""Every relative link in the README and docs/ points at a file that exists and, with #anchor, at a heading (or an
`<a id>`) of that file, slugged as GitHub does: a renamed section or a moved table breaks the front door silently."""
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def slug(heading: str) -> str:
    """GitHub's heading anchor: lower case, punctuation dropped (letters, digits, '_' and '-' kept), spaces to '-'."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    text = path.read_text()
    return ({slug(h) for h in re.findall(r"^#+ (.*)$", text, re.M)}
            | set(re.findall(r"<a id=\"([^\"]+)\"", text)))


def test_slug_follows_github():
    assert slug("One launch with the intermediates in L2 (2026-12-04): built, measured 3.3–3.9× slower") == \
        "one-launch-with-the-intermediates-in-l2-2026-12-04-built-measured-3339-slower"
    assert slug("2. End-to-end generation, beside transformers' own models (issue 16)") == \
        "2-end-to-end-generation-beside-transformers-own-models-issue-16"


def test_relative_links_and_anchors_resolve():
    broken = []
    for page in [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]:
        for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
            if target.startswith(("http://", "https://", "mailto:")):
                continue
            path, _, anchor = target.partition("#")
            linked = (page.parent / path) if path else page
            if not linked.exists():
                broken.append(f"{page.relative_to(ROOT)}: {target} (no such file)")
            elif anchor and linked.suffix == ".md" and anchor not in anchors(linked):
                broken.append(f"{page.relative_to(ROOT)}: {target} (no such heading)")
    assert not broken, "broken links:\n" + "\n".join(broken)
